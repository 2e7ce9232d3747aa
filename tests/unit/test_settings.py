"""Settings that would make the service misbehave are refused at start, naming them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared_kernel.settings import Settings


def test_a_catch_up_threshold_at_or_below_the_bulk_hand_over_is_refused() -> None:
    with pytest.raises(ValidationError, match="APP_PROJECTION_CATCH_UP_BEHIND"):
        Settings(environment="test", projection_catch_up_behind=1_000, rebuild_bulk_until_behind=1_000)
    assert Settings(environment="test", projection_catch_up_behind=0).projection_catch_up_behind == 0
    assert Settings(environment="test", projection_catch_up_behind=1_001, rebuild_bulk_until_behind=1_000)
