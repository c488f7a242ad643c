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


# zero-out thresholds at the edges of the dtypes: 0 and -0 (everything zeroed), below the
# smallest float16 normal, values between bf16 / float16 patterns, float16's largest finite
# value and the two sides of its rounding to Inf, past every 16-bit format, Inf (only NaN and
# Inf zeroed)
EDGE_THRESHOLDS = (0.0, -0.0, 3e-8, 0.1, 1.0, 1.25, 30.0, 65504.0, 65510.0, 65520.0, 3e38, math.inf)


def edge_values(dtype):
    """Values that probe a zero-out's comparison: every bit pattern of a 16-bit dtype; for
    float32 the patterns within 2 of each of EDGE_THRESHOLDS (both signs), zeros, the smallest
    subnormal, the largest finite value, Inf, NaNs and 4096 random patterns."""
    import torch

    if dtype != torch.float32:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    near = torch.tensor(EDGE_THRESHOLDS, dtype=torch.float32).abs().view(torch.int32)
    near = (near[:, None] + torch.arange(-2, 3)).clamp(0, 0x7FFFFFFF).flatten()
    special = torch.tensor([0, 1, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(-(1 << 31), 1 << 31, (4096,), generator=gen)
    magnitudes = torch.cat([near, special]).to(torch.int32)
    both = torch.cat([magnitudes, magnitudes | -(1 << 31), noise.to(torch.int32)])
    return both.view(torch.float32)
