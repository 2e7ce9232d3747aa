"""The rules every input of the API obeys, each written once here and reused by every
route, every request body and the stream routes (the routes only say which rule a
parameter follows, and its length when it has its own).

- Strings are valid Unicode with no NUL (U+0000: PostgreSQL's text and jsonb refuse it)
  and no lone surrogate, and bounded. One-line strings (names, keys, tags, filters,
  header values, path parameters) have no control character either (`Chars`).
- Numbers are finite and fit what they are stored as: `Finite` (an Avro double),
  `Int32` (a PostgreSQL int, a Kafka partition), `Int64` (an Avro long, a PostgreSQL
  bigint, a Kafka offset), `Instant` (a timestamptz: with a zone, within 0001-9999 in UTC).
- `Json` is any JSON value whose nested strings, keys and numbers obey the same rules,
  bounded in depth, in values and in text (dataset metadata).
- Headers: a header the API reads is valid or absent; an empty one is an error, not an
  absence (`HEADER_RULES`, checked where the routes read them and by `InputGuard`).
- The request itself (`InputGuard`, ahead of every route and of the read cache): a JSON
  body is strict JSON (no NaN or Infinity, no number beyond a double, no nesting
  beyond what a parser can hold), query strings and paths are valid UTF-8, and the
  headers of `HEADER_RULES` are valid wherever they are read. `check_path_params` (an
  application dependency) keeps every path parameter to one line of valid text.

Every refusal is a 422 in FastAPI's shape, `{"detail": [{"loc", "msg", "type"}]}`;
`validation_errors` renders them without echoing the input, so a 422 never fails to
render (lone surrogates in a location or message become U+FFFD).
"""

from __future__ import annotations

import email.message
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import unquote, unquote_to_bytes

import orjson
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared_kernel.position import INT32_MAX, INT64_MAX, MAX_TOKEN_CHARS

# ---- the limits ------------------------------------------------------------------------

INT32_MIN = -(2**31)
INT64_MIN = -(2**63)
TEXT_MAX = 10_000  # free text: descriptions, notes, reasons, comments
NAME_MAX = 200  # one line: names, titles, people, owners, metadata keys, header values
TAG_MAX = 64
WORDS_MAX = 1_000  # a search text
ETAGS_MAX = 1_000  # If-Match / If-None-Match: a list of ETags
CURSOR_MAX = 512  # the cursors of `api.reads` have about 110 characters
FILTER_MAX = 40_000  # a subscription filter: up to 1000 comma-separated ids
JSON_DEPTH_MAX = 16  # arrays and objects nested in one JSON value
JSON_VALUES_MAX = 1_000  # values (scalars, arrays, objects) in one JSON value
# Characters of all the strings and keys of one JSON value. No bound on one string of
# it: the search document keeps the first 2,000 characters of each (a term's limit).
JSON_TEXT_MAX = 262_144
JSON_DIGITS_MAX = 400  # digits of a number in a JSON body (a double has at most 309)
METADATA_MAX = 100  # entries of a dataset's metadata
TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"  # W3C trace context

# ---- strings -----------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
TEXT_PATTERN = r"^[^\u0000]*$"  # in the OpenAPI document (a surrogate cannot be written there)
LINE_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"


def text_problem(value: str, *, line: bool = False) -> tuple[str, str] | None:
    """(error type, message) when `value` breaks the string rule, else None."""
    if "\x00" in value:
        return "string_nul", "String must not contain NUL (U+0000)"
    if _SURROGATE.search(value):
        return "string_unicode", "String must be valid Unicode (it has a lone surrogate)"
    if line and _CONTROL.search(value):
        return "string_control", "String must be one line, without control characters"
    return None


@dataclass(frozen=True)
class Chars:
    """The string rule as an annotation: `Annotated[str, StringConstraints(...), Chars()]`.
    `line`: one line (no control character either). It shows in the OpenAPI document as
    a `pattern`, so generated inputs obey it."""

    line: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        found = handler(schema)
        found["pattern"] = LINE_PATTERN if self.line else TEXT_PATTERN
        return found

    def check(self, value: str) -> str:
        problem = text_problem(value, line=self.line)
        if problem is not None:
            raise PydanticCustomError(*problem)
        return value


Text = Annotated[str, StringConstraints(max_length=TEXT_MAX), Chars()]
SomeText = Annotated[str, StringConstraints(min_length=1, max_length=TEXT_MAX), Chars()]
Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), Chars(line=True)]
Label = Annotated[str, StringConstraints(max_length=NAME_MAX), Chars(line=True)]  # may be empty
Tag = Annotated[str, StringConstraints(min_length=1, max_length=TAG_MAX), Chars(line=True)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), Chars(line=True)]
Words = Annotated[str, StringConstraints(max_length=WORDS_MAX), Chars()]
Filter = Annotated[str, StringConstraints(max_length=NAME_MAX), Chars(line=True)]  # equality filters
FilterValues = Annotated[str, StringConstraints(max_length=FILTER_MAX), Chars(line=True)]
CursorText = Annotated[str, StringConstraints(max_length=CURSOR_MAX), Chars(line=True)]
TokenText = Annotated[str, StringConstraints(max_length=MAX_TOKEN_CHARS), Chars(line=True)]

# ---- numbers and instants ---------------------------------------------------------------

Finite = Annotated[float, Field(allow_inf_nan=False)]
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
AggregateVersion = Annotated[int, Field(ge=1, le=INT32_MAX)]  # versions are PostgreSQL ints


def utc(value: datetime) -> datetime:
    """The instant in UTC, as PostgreSQL's timestamptz holds it (and asyncpg sends it)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise PydanticCustomError("timezone_aware", "Datetime must have a time zone (e.g. Z or +02:00)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_range", "Datetime must be within 0001-01-01 and 9999-12-31 in UTC"
        ) from None


Instant = Annotated[datetime, AfterValidator(utc)]

# ---- JSON values ------------------------------------------------------------------------


def json_problem(value: Any) -> str | None:
    """What makes `value` (parsed JSON) unfit to store, else None. Iterative: the bounds
    hold before anything recurses over the value."""
    values = text = 0
    todo: list[tuple[Any, str, int]] = [(value, "", 1)]
    while todo:
        item, where, depth = todo.pop()
        here = where or "the value"
        values += 1
        if values > JSON_VALUES_MAX:
            return f"a JSON value holds at most {JSON_VALUES_MAX} values"
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                return f"{here}: integers are {INT64_MIN} to {INT64_MAX} (64 bits)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{here}: numbers must be finite"
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                return f"{here}: {problem[1]}"
            text += len(item)
        elif isinstance(item, list | dict):
            if depth > JSON_DEPTH_MAX:
                return f"{here}: arrays and objects nest at most {JSON_DEPTH_MAX} levels"
            if isinstance(item, list):
                todo += [(v, f"{where}[{i}]", depth + 1) for i, v in reversed(list(enumerate(item)))]
                continue
            for k in item:
                if not isinstance(k, str):
                    return f"{here}: keys must be strings"
                problem = text_problem(k, line=True)
                if problem is not None:
                    return f"{here}: a key: {problem[1]}"
                if len(k) > NAME_MAX:
                    return f"{here}: keys have at most {NAME_MAX} characters"
                text += len(k)
            todo += [(v, f"{where}.{k}" if where else k, depth + 1) for k, v in reversed(item.items())]
        else:
            return f"{here}: not a JSON value"
        if text > JSON_TEXT_MAX:
            return f"a JSON value holds at most {JSON_TEXT_MAX} characters of strings and keys"
    return None


def _json(value: Any) -> Any:
    problem = json_problem(value)
    if problem is not None:
        raise PydanticCustomError("json_value", "{problem}", {"problem": problem})
    return value


def _keys_by_name(schema: dict[str, Any]) -> None:
    """pydantic documents a pattern of the keys as `patternProperties`, which lets any
    other key through: say it with `propertyNames`, which holds for every key."""
    patterns = schema.pop("patternProperties", None)
    if isinstance(patterns, dict) and len(patterns) == 1:
        (pattern, values), names = next(iter(patterns.items())), schema.setdefault("propertyNames", {})
        names["pattern"] = pattern
        schema["additionalProperties"] = values


Json = Annotated[JsonValue, BeforeValidator(_json)]
Metadata = Annotated[dict[Key, Json], Field(max_length=METADATA_MAX, json_schema_extra=_keys_by_name)]

# ---- headers ------------------------------------------------------------------------------

HeaderText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX), Chars(line=True)
]
ETags = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=ETAGS_MAX), Chars(line=True)
]
TokenHeader = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TOKEN_CHARS),
    Chars(line=True),
]
TraceParent = Annotated[str, StringConstraints(strip_whitespace=True, pattern=TRACEPARENT)]

# Every header the API reads, and its rule (the routes declare them with the same types).
HEADER_RULES: Mapping[str, Any] = {
    "idempotency-key": HeaderText,
    "if-match": ETags,
    "if-none-match": ETags,
    "x-consistency-token": TokenHeader,
    "x-correlation-id": HeaderText,
    "traceparent": TraceParent,
    "last-event-id": TokenHeader,
}
_HEADERS: dict[str, TypeAdapter[str]] = {name: TypeAdapter(rule) for name, rule in HEADER_RULES.items()}


def header_errors(name: str, value: str) -> list[dict[str, Any]]:
    """The 422 errors of one header the API reads (none when valid or not one of them)."""
    adapter = _HEADERS.get(name.lower())
    if adapter is None:
        return []
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return [{"loc": ["header", name.lower()], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return []


def correlation_id(value: str | None) -> str:
    """The caller's X-Correlation-Id when it is valid, else a new one."""
    if value is not None and not header_errors("x-correlation-id", value):
        return value.strip()
    return str(uuid.uuid4())


# ---- path parameters -------------------------------------------------------------------------


async def check_path_params(connection: HTTPConnection) -> None:
    """An application dependency: every path parameter is one line of valid text (each
    route's own type then says what else it is)."""
    errors = [
        {"loc": ("path", name), "msg": problem[1], "type": problem[0]}
        for name, value in connection.path_params.items()
        if isinstance(value, str) and (problem := text_problem(value, line=True)) is not None
    ]
    if errors and connection.scope["type"] == "websocket":
        raise WebSocketRequestValidationError(errors)
    if errors:
        raise RequestValidationError(errors)


# ---- rendering 422s -------------------------------------------------------------------------


def scrub(value: str, limit: int = 1_000) -> str:
    """`value` made safe to render: lone surrogates replaced, at most `limit` characters."""
    value = _SURROGATE.sub("\ufffd", value)
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def renderable(value: Any) -> Any:
    """A JSON-able body with every string scrubbed of lone surrogates."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {renderable(k): renderable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [renderable(v) for v in value]
    return value


def validation_errors(errors: Iterable[Any]) -> list[dict[str, Any]]:
    """Validation errors as the API answers them: location, message and type only (the
    input and its context are not echoed: they may not even be renderable)."""
    return [
        {
            "loc": [p if isinstance(p, int) else scrub(str(p), 200) for p in e.get("loc", ())],
            "msg": scrub(str(e.get("msg", ""))),
            "type": scrub(str(e.get("type", "value_error")), 100),
        }
        for e in errors
    ]


def invalid(errors: Iterable[Any]) -> JSONResponse:
    return JSONResponse({"detail": validation_errors(errors)}, status_code=422)


# ---- the request itself ----------------------------------------------------------------------


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number is beyond the range of a double")
    return value


def _strict_int(text: str) -> int:
    if len(text) > JSON_DIGITS_MAX:
        raise ValueError(f"a number has more than {JSON_DIGITS_MAX} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def body_errors(body: bytes) -> list[dict[str, Any]]:
    """Why a JSON body is not strict JSON (RFC 8259 and numbers a double holds), else
    []. A lone surrogate escape is left to the fields' rules, which name the field."""
    try:
        orjson.loads(body)  # refuses NaN, Infinity, 1e400, bad UTF-8, lone surrogates, depth > 1024
        return []
    except orjson.JSONDecodeError:
        pass
    try:  # as Starlette will parse it, minus what a double cannot hold
        json.loads(body, parse_float=_strict_float, parse_int=_strict_int, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return [{"loc": ["body", exc.pos], "msg": f"JSON decode error: {exc.msg}", "type": "json_invalid"}]
    except RecursionError:
        return [{"loc": ["body"], "msg": "JSON decode error: nested too deeply", "type": "json_invalid"}]
    except UnicodeDecodeError:
        return [{"loc": ["body"], "msg": "JSON decode error: not valid UTF-8", "type": "json_invalid"}]
    except ValueError as exc:  # ours, from the hooks above
        return [{"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}]
    return []


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (as it decides it)."""
    if not content_type:
        return False  # FastAPI's strict content type: such a body is not parsed as JSON
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def query_errors(query_string: bytes) -> list[dict[str, Any]]:
    """Query parameters whose names or values are not valid UTF-8 once percent-decoded
    (Starlette would silently turn them into U+FFFD)."""
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        for raw in (name, value):
            try:
                unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                where = unquote(name.decode("latin-1").replace("+", " "), errors="replace")
                return [
                    {
                        "loc": ["query", where],
                        "msg": "Query parameters must be valid UTF-8 (percent-encoded)",
                        "type": "string_unicode",
                    }
                ]
    return []


def path_errors(raw_path: bytes | None) -> list[dict[str, Any]]:
    if raw_path is None:
        return []
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return [
            {
                "loc": ["path"],
                "msg": "The path must be valid UTF-8 (percent-encoded)",
                "type": "string_unicode",
            }
        ]
    return []


_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class InputGuard:
    """ASGI middleware ahead of every route and of the read cache: refuses (422) a
    request whose query string or path is not valid UTF-8, whose headers of
    `HEADER_RULES` break their rule, or whose JSON body is not strict JSON; passes the
    others on untouched (a body it read is handed on as it came)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        errors = query_errors(scope.get("query_string", b"")) or path_errors(scope.get("raw_path"))
        content_type: str | None = None
        for name, value in scope["headers"]:
            if not errors:
                errors = header_errors(name.decode("latin-1"), value.decode("latin-1"))
            if name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        if errors:
            await invalid(errors)(scope, receive, send)
            return
        if scope["method"] in _WITHOUT_BODY or not _is_json(content_type):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client is gone
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        errors = body_errors(body) if body else []
        if errors:
            await invalid(errors)(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then what the client sends next."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
