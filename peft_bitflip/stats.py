"""Counting flipped bits and zeroed elements: for tests, the demo and logging."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import check_dtype

INT_VIEW = {16: torch.int16, 32: torch.int32}


def as_unsigned(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor as int64 values in [0, 2^bits)."""
    n_bits = check_dtype(t.dtype).n_bits
    return t.contiguous().view(INT_VIEW[n_bits]).to(torch.int64) & ((1 << n_bits) - 1)


def flipped_bits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """int64 XOR of the bit patterns of x and y (bit b set where bit b differs)."""
    return as_unsigned(x) ^ as_unsigned(y)


def per_bit_counts(diff: torch.Tensor, n_bits: int) -> torch.Tensor:
    """How many elements have bit b set in ``diff``, for b = 0 (LSB) .. n_bits-1."""
    return torch.stack([((diff >> b) & 1).sum() for b in range(n_bits)])


@dataclass(frozen=True)
class FlipCounts:
    """Flipped bits by group between a tensor and its flipped copy (before zero-out)."""

    n_elements: int
    exp_bits: int  # flipped sign/exponent bits
    frac_bits: int  # flipped mantissa bits
    n_exp: int  # exp-group bits per element
    n_frac: int  # mantissa bits per element

    def z_scores(self, p_exp: float, p_frac: float) -> tuple[float, float]:
        """How many binomial standard deviations each count lies from its expectation."""
        return (
            binomial_z(self.exp_bits, self.n_elements * self.n_exp, p_exp),
            binomial_z(self.frac_bits, self.n_elements * self.n_frac, p_frac),
        )


def count_flips(x: torch.Tensor, y: torch.Tensor) -> FlipCounts:
    """Count flipped exp (incl. sign) and mantissa bits between ``x`` and ``y``."""
    layout = check_dtype(x.dtype)
    diff = flipped_bits(x, y)
    frac_mask = (1 << layout.n_frac) - 1
    frac = _popcount(diff & frac_mask)
    exp = _popcount(diff >> layout.n_frac)
    return FlipCounts(x.numel(), int(exp), int(frac), layout.n_exp, layout.n_frac)


def _popcount(v: torch.Tensor) -> int:
    total = 0
    while bool((v != 0).any()):
        total += int((v & 1).sum())
        v = v >> 1
    return total


def binomial_z(count: int, trials: int, p: float) -> float:
    """(count - trials p) / sqrt(trials p (1 - p)); 0 when the variance is 0 and count matches."""
    mean = trials * p
    var = trials * p * (1 - p)
    if var == 0:
        return 0.0 if count == mean else math.inf
    return (count - mean) / math.sqrt(var)
