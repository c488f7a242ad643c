"""The sampling scheme shared by the Triton kernel and the PyTorch reference.

Both implementations follow exactly these rules, so they agree bit for bit:

* Elements are taken in logical (row-major) order and cut into *groups* of ``G`` consecutive
  elements (``G = 128 // bits_per_element``: 8 for 16-bit dtypes, 4 for float32).
* Each group has two *fields*: the exp field (the sign+exponent bits of its G elements,
  ``N_E = G * n_exp`` bits) and the frac field (``N_F = G * n_frac`` mantissa bits).  Field bit
  ``q`` lives in element ``q // n`` of the group, at bit ``q % n`` of that element's field.
* Random words come from Philox4x32 (10 rounds) keyed by the stream key ``(k0, k1)`` with the
  counter ``(group index low 32 bits, group index high 32 bits, iteration, call index)``.
  Words 0-1 of a draw give a 63-bit uniform for the exp field, words 2-3 one for the frac field.
* Flip positions in a field are found by gap sampling: the gap to the next flipped bit is
  geometric, ``P(gap = j) = (1 - p)^j p``, drawn by inverting the table
  ``T[j] = floor(2^63 (1 - (1 - p)^(j + 1)))``: the gap is the number of ``j`` with
  ``T[j] <= u``.  Iteration 0 draws the first gap; a flip beyond the field ends the field.
  So each bit flips independently with probability ``p`` (to within 2^-63) for any p in [0, 1],
  and at small p almost every group is settled by one draw and one comparison.

Tables are stored as ``T[j] - 1`` in int64 so that p = 1 (``T = 2^63``) fits.

**Dense fields.**  At large p the gap loop runs once per flip; a field may instead be *dense*
(chosen per tensor and per field on the host, :func:`field_is_dense`): each of its bits flips
iff a uniform ``U < P / 2^64`` with ``P = floor(p 2^64)`` (so to within 2^-64 of p, for p in
(0, 1)), and the uniforms of all bits are compared bit-sliced, 32 bits per random word:

* The group's 128 data bits are read as four little-endian uint32 *words* (word ``w`` holds
  elements ``2w`` (low half) and ``2w + 1`` (high half) for 16-bit dtypes, element ``w`` for
  float32); bit ``j`` of word ``w`` is one data bit, a *lane*.
* Digit ``k`` (k = 0..63, weight 2^-(k+1)) of the uniform of lane (w, j) is bit ``j`` of word
  ``w`` of the Philox draw with counter ``(group low, group high, DENSE_ITERATION + k, call)``
  (the sparse path only uses iterations below 2^31, so no counter is shared).
* A lane flips iff its first differing digit from P's binary expansion (MSB first) is 0 in U
  and 1 in P; a lane equal to P in all 64 digits does not flip.  A lane's P is the P of its
  field (exp lanes: the sign and exponent bits of their element).

An implementation may stop drawing digits once every lane is decided or P has no 1 digit left
(the remaining lanes cannot flip): the result is the same.  At ``p = 2^-n`` that is after n
draws, at p = 0.5 after one.  A dense field's gap table holds -1 (it never flips in the gap
sampling); the flip table ends with two int64 words, ``P`` of the exp and frac field (0 for a
sparse field), so kernels branch on them per program.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch

from ..spec import BitLayout, check_dtype

GROUP_BITS = 128  # data bits per group: one Philox draw (4 words) settles a group at small p
PHILOX_ROUNDS = 10
U63 = 1 << 63
DENSE_ITERATION = 1 << 31  # dense digit k draws at Philox iteration DENSE_ITERATION + k
DENSE_DIGITS = 64  # binary digits of p compared: resolution 2^-64

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


@functools.cache
def group_size(dtype: torch.dtype) -> int:
    """Elements per group for ``dtype``."""
    return GROUP_BITS // check_dtype(dtype).n_bits


def field_sizes(dtype: torch.dtype) -> tuple[int, int]:
    """(N_E, N_F): bits in the exp and frac field of one group."""
    layout: BitLayout = check_dtype(dtype)
    g = group_size(dtype)
    return g * layout.n_exp, g * layout.n_frac


@functools.lru_cache(maxsize=4096)
def gap_table(p: float, n: int) -> tuple[int, ...]:
    """``T[j] - 1`` for j in [0, n): the geometric gap CDF scaled to 2^63, minus one."""
    if p <= 0.0:
        return (-1,) * n
    if p >= 1.0:
        return (U63 - 1,) * n
    log_q = math.log1p(-p)
    out = []
    for j in range(n):
        cdf = -math.expm1((j + 1) * log_q)  # 1 - (1-p)^(j+1), accurate for tiny p
        out.append(min(int(math.ldexp(cdf, 63)), U63) - 1)
    return tuple(out)


def dense_word(p: float) -> int:
    """``P = floor(p 2^64)`` (exact for a float p in [0, 1)) as the int64 with the same bits:
    the threshold of a dense field."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"a dense field needs 0 <= p < 1, got {p}")
    word = int(math.ldexp(p, DENSE_DIGITS))
    return word - (1 << 64) if word >= U63 else word


# The cost model that picks a field's path, in units of the sparse path's Philox draw per
# group.  Programs run in lock step over COST_BLOCK_GROUPS groups (ROWS_PER_PROGRAM of
# triton_bitflip.py):
# * sparse: the first draw, then one iteration per flip of the field with the most flips in
#   the block, plus one that finds no more; an iteration is a draw, a binary search of the
#   gap table (STEPS dependent loads) and the mask update of the block: SPARSE_ITERATION_COST;
# * dense: one draw per digit and four 32-lane compare-and-update steps (DENSE_DIGIT_COST),
#   for min(digits up to P's last 1, the expected largest number of digits a lane of the
#   block needs until it differs from P: a geometric(1/2) maximum over the block's lanes).
# Calibrated on an H100 (benchmarks/tuning/dense_crossover.py, docs/kernel.md): with no
# block-wide reduction for the first DENSE_FREE_DIGITS digits a dense digit costs about half
# the sparse path's unit, so on the GPU alone both paths would cost the same near p = 2^-11.
# DENSE_DIGIT_COST is set higher, so that dyadic p go dense from 2^-9 and stay sparse at
# 2^-10 and below: the CPU reference takes the same path (bit-identical results), and there a
# dense field costs one Philox pass over every group per digit against one pass in all for
# the sparse path at small p.
COST_BLOCK_GROUPS = 64
SPARSE_ITERATION_COST = 2.5
DENSE_DIGIT_COST = 0.68
DENSE_FREE_DIGITS = 12  # dense digits run before the kernel checks for undecided lanes


def _expected_max_lane_digits(lanes: int) -> float:
    """E[max over ``lanes`` of a geometric(1/2) number of digits (>= 1)]."""
    return sum(1.0 - (1.0 - 0.5**m) ** lanes for m in range(0, 200))


def _expected_max_iterations(p: float, n: int, groups: int) -> float:
    """E[max over ``groups`` fields of n bits of the gap iterations: 0 without a flip, else
    flips + 1]."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    cdf, total, out = [], 0.0, 0.0
    for v in pmf:
        total += v
        cdf.append(min(total, 1.0))
    for m in range(1, n + 2):  # P(iterations < m) = P(X = 0) + P(1 <= X <= m - 2)
        below = cdf[0] + (cdf[m - 2] - cdf[0] if m >= 2 else 0.0)
        out += 1.0 - below**groups
    return out


def sparse_cost(p: float, n: int) -> float:
    """Modelled cost (Philox draws per group) of a sparse field of n bits at p."""
    return 1.0 + SPARSE_ITERATION_COST * _expected_max_iterations(p, n, COST_BLOCK_GROUPS)


def dense_cost(p: float, n: int) -> float:
    """Modelled cost (Philox draws per group) of a dense field of n bits at p."""
    word = dense_word(p) % (1 << 64)
    if word == 0:
        return 0.0
    digits = DENSE_DIGITS - ((word & -word).bit_length() - 1)  # up to P's last 1 digit
    lanes = _expected_max_lane_digits(COST_BLOCK_GROUPS * n)
    return DENSE_DIGIT_COST * min(digits, lanes)


@functools.lru_cache(maxsize=4096)
def field_is_dense(p: float, n: int) -> bool:
    """Whether a field of ``n`` bits flipped at ``p`` takes the dense path: the cheaper one
    by the cost model above (never at p = 0, p = 1 or p < 2^-64)."""
    if not 0.0 < p < 1.0 or dense_word(p) == 0:
        return False
    return dense_cost(p, n) < sparse_cost(p, n)


def table_values(
    p_exp: float, p_frac: float, dtype: torch.dtype, dense: tuple[bool, bool] | None = None
) -> tuple[int, ...]:
    """The flip table's int64 values: ``T_E - 1``, ``T_F - 1``, then P of the exp and frac field
    (0 where sparse).  ``dense``: force each field's path (None: :func:`field_is_dense`); a
    dense field whose P is 0 (p < 2^-64) stays sparse."""
    n_e, n_f = field_sizes(dtype)
    out, words = [], []
    for i, (p, n) in enumerate(((float(p_exp), n_e), (float(p_frac), n_f))):
        want = field_is_dense(p, n) if dense is None else bool(dense[i]) and 0.0 < p < 1.0
        word = dense_word(p) if want else 0
        out += gap_table(p, n) if word == 0 else (-1,) * n
        words.append(word)
    return tuple(out + words)


def dense_words(table: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """(P of the exp field, P of the frac field) of a flip table as unsigned ints (0: the field
    is sparse); tables of gap entries only (no P words) have none."""
    n_e, n_f = field_sizes(dtype)
    if table.numel() < n_e + n_f + 2:
        return 0, 0
    e, f = table[n_e + n_f : n_e + n_f + 2].tolist()
    return e % (1 << 64), f % (1 << 64)


# rows of a counted flip launch's counts: program i adds to row i % COUNT_SLOTS (at p = 2^-10
# every program of a 4096^2 tensor has flips, and atomic adds to one address serialise: the
# counted flip took 2x the flip's time on an H100 with one row)
COUNT_SLOTS = 64


def check_flip_counts(x: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None) -> None:
    """Raise ValueError unless ``counts`` is an int64 (COUNT_SLOTS, 3) contiguous tensor on x's
    device (``op.new_flip_counts``) and ``out`` is None or a contiguous tensor of x's dtype,
    shape and device (a counted flip writes there)."""
    shape = (COUNT_SLOTS, 3)
    if (
        counts.dtype != torch.int64
        or tuple(counts.shape) != shape
        or counts.device != x.device
        or not counts.is_contiguous()
    ):
        raise ValueError(
            f"counts must be a contiguous int64 tensor of shape {shape} on {x.device} "
            f"(new_flip_counts), got {counts.dtype} {tuple(counts.shape)} on {counts.device}"
        )
    if out is not None and (
        out.dtype != x.dtype
        or out.shape != x.shape
        or out.device != x.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on "
            f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


_DEVICE_TABLES: dict = {}


def graph_constant(make):
    """``make`` (a function returning a tensor that depends on its arguments only, e.g. a
    cached table), made a constant of a ``torch.compile`` graph: while tracing it runs once
    and the graph holds its result (as ``torch.compiler.assume_constant_result`` gives), under
    a name of its own per result.  (Dynamo names a tensor that an ``assume_constant_result``
    function returns after the function, so two different results in one graph, e.g. the
    tables of x and of W, failed in AOTAutograd: "source ConstantSource(...) already in
    seen_sources"; the result of one inside a tuple gets a unique name.)"""

    @torch.compiler.assume_constant_result
    def in_tuple(*args, **kwargs):
        return (make(*args, **kwargs),)

    @functools.wraps(make)
    def constant(*args, **kwargs):
        if torch.compiler.is_compiling():
            return in_tuple(*args, **kwargs)[0]
        return make(*args, **kwargs)

    return constant


def _cached_device_tensor(values, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device`` that a cache may keep for the process.

    On CUDA it is allocated by another thread: while CUDA graphs are warmed up or captured
    (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``) the allocations of the
    current thread or stream go to the graph's private memory pool, whose memory is reused by
    later replays unless the graph tracks the tensor; a table kept there would be overwritten.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    made, failed = [], []

    def make():
        try:
            with torch.cuda.device(device):
                made.append(torch.tensor(values, dtype=torch.int64, device=device))
                torch.cuda.current_stream(device).synchronize()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=make, name="peft_bitflip-table")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    t = made[0]
    t.record_stream(torch.cuda.current_stream(device))  # not reused under our kernels if evicted
    return t


_MAX_CACHED_TABLES = 1024
# PEFT_BITFLIP_DENSE=1 / 0 (read at import): every field with 0 < p < 1 dense / sparse, for
# benchmarks; unset or "auto": the cost model decides
FORCE_DENSE = {"1": True, "0": False}.get(os.environ.get("PEFT_BITFLIP_DENSE", "auto"))


@graph_constant
def flip_table(
    p_exp: float, p_frac: float, dtype: torch.dtype, device, dense: tuple[bool, bool] | None = None
) -> torch.Tensor:
    """The int64 table of :func:`table_values` (``[T_E - 1 (N_E entries), T_F - 1 (N_F
    entries), P_E, P_F]``) on ``device`` (cached); ``dense``: force each field's path."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if dense is None and FORCE_DENSE is not None:
        dense = (FORCE_DENSE, FORCE_DENSE)
    key = (float(p_exp), float(p_frac), dtype, device, dense)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        values = table_values(p_exp, p_frac, dtype, dense)
        t = _cached_device_tensor(values, device)
        t._bitflip_sparse_only = not any(values[-2:])  # read by flips_mode
        t._bitflip_dense_only = all(values[-2:])
        if len(_DEVICE_TABLES) >= _MAX_CACHED_TABLES:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
        _DEVICE_TABLES[key] = t
    return t


FLIPS_SPARSE_ONLY = 2  # the HAS_FLIPS value of a launch whose table has no dense field
FLIPS_DENSE_ONLY = 3  # ... whose table's two fields are both dense


def flips_mode(table: torch.Tensor, has_flips: bool) -> int | bool:
    """The HAS_FLIPS constexpr of a flip launch: False without flips; FLIPS_SPARSE_ONLY when
    ``table`` is known (made by :func:`flip_table`) to hold no dense field, so the kernel
    compiles without the dense path; FLIPS_DENSE_ONLY when it is known to hold two, so the
    kernel compiles without the gap sampling (fewer registers); else True (the kernel reads
    the table's P words and takes the paths they ask for)."""
    if not has_flips:
        return False
    if getattr(table, "_bitflip_sparse_only", False):
        return FLIPS_SPARSE_ONLY
    return FLIPS_DENSE_ONLY if getattr(table, "_bitflip_dense_only", False) else True


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints >= 0 (plain Python: ``triton.cdiv`` costs a few us per call from
    the host in recent Triton releases, where it is a constexpr function)."""
    return -(-a // b)


def zero_mask_size(n_elements: int, dtype: torch.dtype) -> int:
    """Bytes of the packed zero mask of ``n_elements`` elements of ``dtype``: one uint8 per
    group, bit j set when element j of the group was zeroed."""
    return ceil_div(n_elements, group_size(dtype))


def search_steps(n: int) -> int:
    """Binary-search steps to find a count in [0, n]."""
    return max(1, (n).bit_length())


def write_next_call(call, next_call) -> None:
    """``next_call = call + 1`` (0-dim int64 tensors) with a torch op: a layer's call counter
    for its next forward, where no flip kernel ran to write it."""
    if next_call is None:
        return
    if next_call.device == call.device:
        torch.add(call, 1, out=next_call)  # one launch
    else:
        next_call.copy_(call + 1)
