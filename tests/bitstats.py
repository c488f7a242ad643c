"""Test helpers: bit counts and binomial tolerance checks."""

from __future__ import annotations

import math

from peft_bitflip.spec import check_dtype
from peft_bitflip.stats import INT_VIEW, as_unsigned, flipped_bits, per_bit_counts  # noqa: F401


def group_counts(x, y) -> tuple[int, int]:
    """(flipped exp bits incl. sign, flipped mantissa bits) between x and y."""
    layout = check_dtype(x.dtype)
    counts = per_bit_counts(flipped_bits(x, y), layout.n_bits)
    return int(counts[layout.n_frac :].sum()), int(counts[: layout.n_frac].sum())


def assert_binomial(count: int, trials: int, p: float, sigmas: float = 5.0, what: str = ""):
    """Assert ``count`` is within ``sigmas`` standard deviations of Binomial(trials, p)."""
    mean = trials * p
    sd = math.sqrt(trials * p * (1 - p))
    assert abs(count - mean) <= sigmas * sd, (
        f"{what}: {count} flips, expected {mean:.1f} +- {sigmas}*{sd:.2f} (p={p}, trials={trials})"
    )
