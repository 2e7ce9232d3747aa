"""Hypothesis strategies for what a client may put in a request: JSON bodies built from
a JSON schema (the API's own, from its OpenAPI document), with the texts and numbers
that break storage further down (NUL, lone surrogates, control and format characters,
numbers past float and int8 range, NaN and infinities), and the raw bytes a client
sends for them (`json_bytes`: NaN and Infinity as Python's json writes them, lone
surrogates as `\\ud800` escapes, or as invalid UTF-8).

Strings honour the schema's length bounds and enums are drawn from (so most bodies
pass the edge validation and reach the domain), with a few values outside them too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

Schema = Mapping[str, Any]

# Texts that each break something somewhere (PostgreSQL text and jsonb, UTF-8, JSON,
# Avro, OpenSearch), or that a validation stripping or counting characters mishandles.
NASTY_TEXTS: tuple[str, ...] = (
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\ud83d",  # the first half of an emoji's surrogate pair, alone
    "\U0001f600",
    " ",
    "\t\r\n",
    "\u2028\u2029",
    "\ufeff",
    "\u202e",
    "\u200b",
    "\x7f",
    "\x1b[31m",
    "\\u0000",  # a backslash, then u0000: harmless text that looks like an escape
    "\\",
    '"',
    "'; --",
    "%00",
    "null",
    "\u0130",  # İ: lower() makes two characters of it
    "\ufb03",  # ﬃ: upper() makes three
)

# Every kind of character, with the ones that matter drawn often.
CHARACTERS = st.one_of(
    st.characters(codec=None, categories=["Cs"]),  # lone surrogates
    st.characters(min_codepoint=0, max_codepoint=0x1F),  # C0 controls, NUL among them
    st.sampled_from(["\x00", "\ud800", "\udfff", "\ufeff", "\u2028", " "]),
    st.characters(),
)
# Characters a strict edge lets through (valid UTF-8, no NUL), and still odd ones: other
# controls, noncharacters (U+FFFE), private use, combining marks, line separators.
ODD_CHARACTERS = st.one_of(
    st.characters(min_codepoint=1, max_codepoint=0x9F, codec="utf-8"),
    st.sampled_from(["\ufffe", "\uffff", "\U0010ffff", "\ue000", "\u0301", "\u2028", "\u00a0", "\u3000"]),
    st.characters(codec="utf-8", exclude_characters="\x00"),
)

# Numbers as JSON can say them: past int8 and float range, NaN, infinities, -0.0.
BIG_NUMBERS: tuple[int | float, ...] = (
    0,
    -0.0,
    2**31,
    -(2**31) - 1,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**40,
    -(10**40),
    10**400,
    1e308,
    -1e308,
    5e-324,
    math.nan,
    math.inf,
    -math.inf,
)
NUMBERS = st.one_of(
    st.sampled_from(BIG_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
LONG_TEXTS = ("x" * 40_000, "\u00e9" * 20_000)  # past Lucene's 32,766-byte term, in UTF-8
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    st.text(ODD_CHARACTERS, max_size=12),
    st.text(CHARACTERS, max_size=12),
    st.sampled_from(NASTY_TEXTS + LONG_TEXTS),
)


def _keys() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(ODD_CHARACTERS, min_size=1, max_size=8),
        st.sampled_from(NASTY_TEXTS),
        st.text(CHARACTERS, max_size=8),
    )


# Any JSON value, nested a few levels: what a JsonValue field takes.
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_keys(), children, max_size=4),
    ),
    max_leaves=12,
)


def texts(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    """Texts of `min_size` to `max_size` characters: nasty ones, random ones of every
    kind of character, and some at the bounds (filled up with a nasty character)."""
    hi = 10_000 if max_size is None else max_size
    small = max(min(hi, 24), min_size)
    odd = st.text(ODD_CHARACTERS, min_size=min_size, max_size=small)
    # odd texts half of the time, so that bodies of several fields still pass a strict edge
    options: list[st.SearchStrategy[str]] = [
        odd,
        odd,
        odd,
        st.text(CHARACTERS, min_size=min_size, max_size=small),
    ]
    nasty = [t for t in NASTY_TEXTS if min_size <= len(t) <= hi]
    if nasty:
        options.append(st.sampled_from(nasty))
    # nasty texts padded to the lower bound ("\x00xxxx" for a 5-character minimum)
    if min_size > 1:
        options.append(st.sampled_from(NASTY_TEXTS[:6]).map(lambda t: (t + "x" * min_size)[:min_size]))
    # at the upper bound, once with a nasty character in it
    if hi > small:
        options.append(st.sampled_from(["x" * hi, "\x00" + "x" * (hi - 1), "\ud800" + "x" * (hi - 1)]))
    return st.one_of(options)


def resolve(schema: Schema, components: Schema) -> Schema:
    """Follow `$ref`s (`#/components/schemas/X` or `#/$defs/X`) in `components`."""
    while "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        schema = components[name]
    return schema


def from_schema(schema: Schema, components: Schema | None = None) -> st.SearchStrategy[Any]:
    """Values for a JSON schema (the subset pydantic writes): mostly valid, nastily so."""
    components = components or {}
    schema = resolve(schema, components)
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema.get("anyOf", schema.get("oneOf", []))])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        # the allowed values, and now and then one that is not
        return st.one_of(st.sampled_from(list(schema["enum"])), st.sampled_from(NASTY_TEXTS))
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "uuid":
            return st.one_of(st.uuids().map(str), st.sampled_from(NASTY_TEXTS))
        return texts(int(schema.get("minLength", 0)), schema.get("maxLength"))
    if kind in ("number", "integer"):
        return NUMBERS
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), components)
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        few = st.lists(items, min_size=lo, max_size=max(lo, min(5, hi if hi is not None else 5)))
        if hi is None or hi <= 5:
            return few
        return st.one_of(few, st.lists(items, min_size=hi, max_size=hi))
    if kind == "object" or "properties" in schema:
        return _object(schema, components)
    return JSON_VALUES  # {}: any JSON value (pydantic's JsonValue)


def _object(schema: Schema, components: Schema) -> st.SearchStrategy[dict[str, Any]]:
    properties: Mapping[str, Schema] = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, components) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, components) for k, v in properties.items() if k not in required},
        )
    extra = schema.get("additionalProperties", True)
    if extra is False:
        return st.just({})
    names: Schema = schema.get("propertyNames", {})
    keys = texts(int(names.get("minLength", 0)), names.get("maxLength"))
    values = JSON_VALUES if extra is True else from_schema(extra, components)
    return st.dictionaries(keys, values, max_size=4)


@st.composite
def json_bytes(draw: st.DrawFn, value: Any) -> bytes:
    """`value` as a client sends it: JSON with every non-ASCII character escaped (lone
    surrogates too: `"\\ud800"`), or written as UTF-8 with lone surrogates passed
    through (invalid UTF-8, which a server must refuse cleanly). NaN and Infinity are
    written as Python's json writes them (not JSON, but json.loads reads them)."""
    if draw(st.booleans()):
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
