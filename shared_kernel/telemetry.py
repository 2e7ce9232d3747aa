"""Structured logging, called once by each process entry point: JSON lines that carry
the trace and span ids of the span they were logged in (shared_kernel.tracing)."""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any

import orjson
from opentelemetry import trace

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            doc["trace_id"] = format(span.trace_id, "032x")
            doc["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


# Client libraries that log every request or reconnect at INFO: keep their warnings only.
QUIET_LOGGERS = ("aiokafka", "opensearch", "elastic_transport")


def logging_config(level: str = "INFO", json: bool = True) -> dict[str, Any]:
    """A `logging.config.dictConfig` that routes every logger to stderr, as JSON lines
    unless `json` is false (also handed to Faust, which sets up logging itself)."""
    level = level.upper()
    quiet = max(logging.WARNING, logging.getLevelName(level))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": JsonFormatter},
            "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json" if json else "text",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": logging.getLevelName(quiet)} for name in QUIET_LOGGERS},
    }


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    """Route every logger to stderr, as JSON lines unless `json` is false."""
    logging.config.dictConfig(logging_config(level, json))
