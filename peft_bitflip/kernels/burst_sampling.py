"""The sampling scheme of burst faults, shared by the Triton kernel and the PyTorch reference.

A burst event inverts ``k`` adjacent bits of one element.  Both implementations follow exactly
these rules, so they agree bit for bit:

* Elements are cut into the groups of the flip kernel (:mod:`.sampling`: ``G`` consecutive
  elements, 8 for 16-bit dtypes, 4 for float32).  Each element holds an event with probability
  ``q`` (the event rate), independently; an element holds at most one event per call.
* Random words come from Philox4x32-10 keyed by the burst stream's key with the counter
  ``(group index low 32 bits, group index high 32 bits, iteration, call index)``, as in the
  flip kernel (the stream key differs, so the words are independent of the flips').
* Words 0-1 of the draw at iteration ``i`` give a 63-bit uniform ``u`` for gap sampling over
  the group's G elements with the geometric gap table of the flip kernel at ``q``
  (``gap_table(q, G)``: exact to 2^-63): the gap is the number of table entries below ``u``.
  Iteration 0 draws the first gap; the event of iteration ``i`` lands on element ``pos + gap``
  (``pos``: one past the previous event, 0 at first); a gap beyond the group ends it.
* The same draw's word 3 (``w3``, uniform in [0, 2^32)) picks the burst length: ``k = K_MIN +
  (number of j with C[j] <= w3)``, ``C[j] = floor(2^32 * P(k <= K_MIN + j))`` for
  ``j < N_LEN = K_MAX - K_MIN``: each length has its probability to within 2^-32.
* Word 2 (``w2``) picks the burst's lowest bit among the ``n = WIDTH - k + 1`` positions where
  ``k`` adjacent bits fit inside the field: ``start = SHIFT + floor(w2 * n / 2^32)``, each
  position with probability ``1/n`` to within 2^-32.  Fields: ``any`` (all bits of the element,
  SHIFT 0), ``exp`` (the sign and exponent bits: the top ``n_exp``), ``frac`` (the mantissa
  bits, SHIFT 0).  The event's XOR mask is ``(2^k - 1) << start``.

The table (int64) is ``[T[0] - 1, ..., T[G-1] - 1, C[0], ..., C[N_LEN-1]]``; the shape
constants (K_MIN, N_LEN, SHIFT, WIDTH) are compile-time constants of the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..spec import check_dtype
from .sampling import _cached_device_tensor, gap_table, graph_constant, group_size

__all__ = ["BURST_FIELDS", "BurstShape", "burst_shape", "burst_table", "length_thresholds"]

BURST_FIELDS = ("any", "exp", "frac")
"""Where a burst may lie: anywhere in the element, in its sign+exponent bits, in its mantissa."""
WORD = 1 << 32


class BurstShape(NamedTuple):
    """Compile-time constants of a burst setting for one dtype: the shortest length ``k_min``,
    the number of length thresholds ``n_len`` (``k_max - k_min``), the field's lowest bit
    ``shift`` and its ``width`` in bits."""

    k_min: int
    n_len: int
    shift: int
    width: int


def field_bits(field: str, dtype: torch.dtype) -> tuple[int, int]:
    """(lowest bit, width) of burst field ``field`` in an element of ``dtype``."""
    layout = check_dtype(dtype)
    if field == "any":
        return 0, layout.n_bits
    if field == "exp":
        return layout.n_frac, layout.n_exp
    if field == "frac":
        return 0, layout.n_frac
    raise ValueError(f"burst field must be one of {BURST_FIELDS}, got {field!r}")


def burst_shape(lengths: tuple[tuple[int, float], ...], field: str, dtype) -> BurstShape:
    """The :class:`BurstShape` of ``lengths`` (``(k, probability)`` pairs, k increasing,
    probabilities > 0 summing to 1) in ``field`` of ``dtype``; ``ValueError`` when the longest
    burst does not fit in the field."""
    shift, width = field_bits(field, dtype)
    k_min, k_max = lengths[0][0], lengths[-1][0]
    if k_max > width:
        raise ValueError(
            f"burst_length up to {k_max} bits does not fit in the {field!r} field of {dtype} "
            f"({width} bits); use shorter bursts or another burst_field"
        )
    return BurstShape(k_min, k_max - k_min, shift, width)


def length_thresholds(lengths: tuple[tuple[int, float], ...]) -> tuple[int, ...]:
    """``C[j] = floor(2^32 P(k <= k_min + j))`` for j in [0, k_max - k_min)."""
    probs = dict(lengths)
    k_min, k_max = lengths[0][0], lengths[-1][0]
    out, cdf = [], 0.0
    for k in range(k_min, k_max):
        cdf += probs.get(k, 0.0)
        out.append(min(int(math.ldexp(cdf, 32)), WORD))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _table_values(rate: float, lengths, dtype) -> tuple[int, ...]:
    return gap_table(rate, group_size(dtype)) + length_thresholds(lengths)


_TABLES: dict = {}
_MAX_CACHED = 256


@graph_constant
def burst_table(rate: float, lengths: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """The int64 burst table (see the module doc) on ``device`` (cached)."""
    device = torch.device(device)
    key = (float(rate), lengths, dtype, device)
    t = _TABLES.get(key)
    if t is None:
        t = _cached_device_tensor(_table_values(float(rate), lengths, dtype), device)
        if len(_TABLES) >= _MAX_CACHED:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = t
    return t
