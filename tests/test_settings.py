"""Settings refuse values that would break the write path's rules."""

from __future__ import annotations

import math

import pytest

from flowray.config import Settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"replicas": 2}, "replicas must be an odd number"),
        ({"batch_events_max": 0}, "batch_events_max must be at least 1"),
        ({"future_skew_s": -1.0}, "future_skew_s must be 0 or more"),
        ({"future_skew_s": math.nan}, "future_skew_s must be 0 or more"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides).validate()  # type: ignore[arg-type]


def test_the_defaults_are_valid() -> None:
    assert Settings().validate() == Settings()
