"""OpenTelemetry traces of every process, exported by OTLP as the standard `OTEL_*`
variables say (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, ...; no endpoint, no
export: the spans still give the logs their trace ids).

One trace runs from the HTTP request through Kafka to every read model that applied its
events: the W3C `traceparent` of the span that sent a command travels in the command
envelope and in every event's headers (`shared_kernel.envelope`), and each consumer
(the processor's decision, a projection's batch, a job's handling, a subscription's
delivery) starts its span as a child of it. A batch that holds the events of many traces
is one span with a link to each, plus one child span in each trace it applied.

PostgreSQL (asyncpg) and Redis are traced by the OpenTelemetry instrumentation packages;
the HTTP server's spans are this module's (`server_span`: the ASGI instrumentation cost
too much, see there). Kafka's produce and fetch are not: the aiokafka
instrumentation adds a header to every record it sends, and the records here are sized
against the topics' limit before they are produced (commands.sizes) and carry their
trace context already.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import Link, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False
_follows_parent = False  # the sampler records no child of a caller's unsampled span
_UNSAMPLED = frozenset(f"{flags:02x}" for flags in range(0, 256, 2))  # trace flags, sampled bit clear

tracer = trace.get_tracer("kafka-cqrs")


def _disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"


def configure(service: str) -> None:
    """The process's tracer provider (once): named `service`, exporting by OTLP when an
    endpoint is set, sampling as `OTEL_TRACES_SAMPLER` says (default: parent-based,
    always on); and the instrumentation of asyncpg and Redis."""
    global _configured, _follows_parent
    if _configured or _disabled():
        return
    _configured = True
    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    _follows_parent = isinstance(provider.sampler, ParentBased)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint and os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument()
    log.debug("tracing configured", extra={"service": name, "otlp": endpoint or None})


@contextlib.contextmanager
def server_span(scope: Any) -> Iterator[Span]:
    """The server span of one HTTP request (an ASGI scope), continuing the caller's
    `traceparent`, current while the request is handled; named by the method until the
    route is known (`name_by_route`).

    Not OpenTelemetry's ASGI instrumentation: measured in S11, its middleware cost 62 %
    of a cached read's throughput at a 10 % sampling ratio (7.8k/s off, 2.9k/s with it),
    most of it spent on requests it does not sample (request attributes, a wrapper per
    ASGI message, the FastAPI flavour's second route lookup). Here an unsampled request
    costs one context extraction and a non-recording span; the attributes are those of
    the HTTP semantic conventions, set only on spans that record."""
    if _disabled():
        yield trace.INVALID_SPAN
        return
    carrier: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key in (b"traceparent", b"tracestate"):
            carrier[key.decode()] = value.decode("latin-1")
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    span = tracer.start_span(scope.get("method") or "HTTP", context=parent, kind=SpanKind.SERVER)
    if span.is_recording():
        client = scope.get("client")
        span.set_attributes(
            {
                "http.request.method": scope.get("method", ""),
                "url.path": scope.get("path", ""),
                "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", ""),
                **({"client.address": client[0]} if client else {}),
            }
        )
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def name_by_route(span: Span, method: str, route: str, status: int) -> None:
    """The server span named `METHOD /route/{template}`, as the HTTP conventions say,
    with its status (5xx is an error)."""
    if span.is_recording():
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(trace.StatusCode.ERROR)


def parent_of(traceparent: str) -> otel_context.Context | None:
    """The context a `traceparent` header names (None when it names none)."""
    if not traceparent:
        return None
    found = _PROPAGATOR.extract({"traceparent": traceparent})
    span = trace.get_current_span(found)
    return found if span.get_span_context().is_valid else None


def span_context_of(traceparent: str) -> SpanContext | None:
    parent = parent_of(traceparent)
    return None if parent is None else trace.get_current_span(parent).get_span_context()


def current_traceparent(fallback: str = "") -> str:
    """The W3C `traceparent` of the current span (what a consumer of what is sent now
    continues), or `fallback` when no span is recording a valid context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", fallback)


@contextlib.contextmanager
def continued(name: str, traceparent: str, **attributes: Any) -> Iterator[Span]:
    """A consumer's span that continues the trace of `traceparent` (a root one when it
    names none)."""
    with tracer.start_as_current_span(
        name, context=parent_of(traceparent), kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


@contextlib.contextmanager
def batch(name: str, traceparents: Iterable[str], **attributes: Any) -> Iterator[Span]:
    """A span over a batch of records of many traces: linked to each of them."""
    contexts = {tp: span_context_of(tp) for tp in dict.fromkeys(traceparents) if tp}
    links = [Link(c) for c in contexts.values() if c is not None]
    with tracer.start_as_current_span(
        name,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={**attributes, "messaging.batch.message_count": len(links)},
    ) as span:
        yield span


def in_each_trace(
    name: str, traceparents: Sequence[str], start_ns: int, end_ns: int, **attributes: Any
) -> None:
    """One span of `name` in each trace named (between `start_ns` and `end_ns`): the part
    a batch had in it, so the batch shows up in every trace whose records it handled."""
    current = trace.get_current_span().get_span_context()
    links = [Link(current)] if current.is_valid else []
    for tp in dict.fromkeys(traceparents):
        if _follows_parent and tp[-2:] in _UNSAMPLED:
            continue  # its span would not record: not worth making (most, at a 10 % ratio)
        parent = parent_of(tp)
        if parent is None:
            continue
        span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
            start_time=start_ns,
        )
        span.end(end_time=end_ns)
