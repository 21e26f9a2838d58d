"""The one exception the CLI turns into a one-line message and exit status 2, and the range checks every
command shares."""

from __future__ import annotations

import math


class FrugalError(Exception):
    """Bad input or an impossible request: the message names the problem and the fix."""


def check_positive(value: float | None, flag: str) -> None:
    """FrugalError unless ``value`` is a positive finite number (None passes: the default applies)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise FrugalError(f"{flag} {value!r} must be a positive finite number")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """FrugalError unless ``seed`` is one that NumPy, torch and the Trainer all take (0 .. 2**32 - 1)."""
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise FrugalError(f"{flag} {seed!r} is out of range: a seed is a whole number from 0 to {2**32 - 1}")
