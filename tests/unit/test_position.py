"""Position tokens: opaque to clients, exact for the read side."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_kernel.position import InvalidToken, Position, PositionToken


def test_a_token_covers_the_offsets_just_after_the_positions() -> None:
    token = PositionToken.after(
        [Position("app.events.datasets", 2, 41), Position("app.events.datasets", 2, 40)]
    )
    assert token.offsets == {"app.events.datasets": {2: 42}}


@given(
    st.dictionaries(st.sampled_from(["a", "b.c"]), st.dictionaries(st.integers(0, 99), st.integers(0, 2**62)))
)
def test_tokens_round_trip(offsets: dict[str, dict[int, int]]) -> None:
    assert PositionToken.decode(PositionToken(offsets).encode()).offsets == offsets


def test_merging_keeps_the_furthest_offset_per_partition() -> None:
    a = PositionToken({"t": {0: 5, 1: 9}})
    b = PositionToken({"t": {0: 7}, "u": {3: 1}})
    assert a.merge(b).offsets == {"t": {0: 7, 1: 9}, "u": {3: 1}}


def test_the_empty_token_covers_nothing() -> None:
    assert PositionToken.decode(PositionToken({}).encode()).offsets == {}


@pytest.mark.parametrize("garbage", ["", "not-base64!", "WzFd", "eyJ0Ijp7IjAiOi0xfX0"])
def test_anything_else_is_an_invalid_token(garbage: str) -> None:
    with pytest.raises(InvalidToken):
        PositionToken.decode(garbage)
