"""Triton kernel for random bit flips with zero-out (forward) and its masked gradient (backward).

The sampling scheme is described in :mod:`peft_bitflip.kernels.sampling`; the PyTorch
reference in :mod:`peft_bitflip.kernels.reference` follows it bit for bit.  Each program
handles ``ROWS`` groups of ``G`` elements.  At realistic error rates a group is settled by a
single Philox draw and two 64-bit comparisons; only programs that hold a flip enter the
gap-sampling loop.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..spec import check_dtype
from .launcher import KernelLauncher
from .sampling import (
    COUNT_SLOTS,
    DENSE_FREE_DIGITS,
    DENSE_ITERATION,
    FLIPS_DENSE_ONLY,
    FLIPS_SPARSE_ONLY,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    ceil_div,
    field_sizes,
    flips_mode,
    group_size,
    search_steps,
    write_next_call,
    zero_mask_size,
)
from .sparse_stuck import SparseStuck


# Constants reach the kernels as constexpr parameter defaults, not as module globals: Triton
# re-checks every global a kernel reads on each launch (host time on every call).
@triton.jit
def _philox4x32(
    c0,
    c1,
    c2,
    c3,
    k0,
    k1,
    N_ROUNDS: tl.constexpr,
    M0: tl.constexpr = PHILOX_M0,
    M1: tl.constexpr = PHILOX_M1,
    W0: tl.constexpr = PHILOX_W0,
    W1: tl.constexpr = PHILOX_W1,
):
    """Philox4x32-N_ROUNDS on uint32 tensors (counter c0..c3, key k0, k1)."""
    for _ in tl.static_range(N_ROUNDS):
        m0 = tl.full(c0.shape, M0, tl.uint32)
        m1 = tl.full(c0.shape, M1, tl.uint32)
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def _u63(hi, lo):
    """A uniform integer in [0, 2^63) from two uint32 words."""
    return ((hi >> 1).to(tl.int64) << 32) | lo.to(tl.int64)


@triton.jit
def _gap(table_ptr, u, active, N: tl.constexpr, STEPS: tl.constexpr):
    """Number of j in [0, N) with table[j] < u (the gap to the next flip), for active lanes."""
    lo = tl.zeros(u.shape, tl.int32)
    for s in tl.static_range(STEPS):
        cand = lo + (1 << (STEPS - 1 - s))
        ok = active & (cand <= N)
        t = tl.load(table_ptr + (cand - 1), mask=ok, other=0)
        lo = tl.where(ok & (t < u), cand, lo)
    return lo


@triton.jit
def _flip_field_bits(
    pos,
    gap,
    active,
    cols,
    N: tl.constexpr,
    N_PER_ELEM: tl.constexpr,
    SHIFT: tl.constexpr,
    UINT: tl.constexpr,
):
    """XOR mask for one flip per active lane at field bit pos+gap; returns (mask, new pos, take)."""
    q = pos + gap
    take = active & (q < N)
    elem = q // N_PER_ELEM
    bit = (q % N_PER_ELEM + SHIFT).to(UINT)
    one = tl.full(bit.shape, 1, UINT)
    m = tl.where(take[:, None] & (cols[None, :] == elem[:, None]), (one << bit)[:, None], 0)
    return m.to(UINT), q + 1, take


@triton.jit
def _philox_words(rows, k0, k1):
    """Per group of ``rows`` [R] (int64 group indices): the counter's words 0 and 1 (the group
    index, low and high 32 bits), a uint32 zero, and the stream key's two words."""
    c0 = rows.to(tl.uint32)
    c1 = (rows >> 32).to(tl.uint32)
    zero = c0 * 0
    return c0, c1, zero, (zero + k0).to(tl.uint32), (zero + k1).to(tl.uint32)


@triton.jit
def _flips_of_groups(
    rows,
    cols,
    call,
    key0,
    key1,
    table_ptr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """The XOR masks [R, G] of the groups ``rows`` [R] (int64 group indices): the whole gap
    sampling, from iteration 0 until every field of every group is settled.  Returns (masks,
    the flips of each group's sign/exponent field [R], of its mantissa field [R]): each flip
    is one bit (the positions of a field are distinct), so these are the masks' bit counts."""
    UINT: tl.constexpr = tl.uint16 if ELEM_BITS == 16 else tl.uint32
    c0, c1, zero, key0, key1 = _philox_words(rows, key0, key1)
    flips = (zero[:, None] + cols[None, :] * 0).to(UINT)
    pos_e = (rows * 0).to(tl.int32)
    pos_f = pos_e
    it = pos_e * 0
    n_e = pos_e
    n_f = pos_e
    active_e = pos_e == 0
    active_f = active_e
    while tl.max((active_e | active_f).to(tl.int32), axis=0) > 0:
        w0, w1, w2, w3 = _philox4x32(c0, c1, it.to(tl.uint32), zero + call, key0, key1, N_ROUNDS)
        u_e = _u63(w0, w1)
        u_f = _u63(w2, w3)
        gap_e = _gap(table_ptr, u_e, active_e, N_E, STEPS_E)
        m_e, pos_e, active_e = _flip_field_bits(
            pos_e, gap_e, active_e, cols, N_E, N_EXP, ELEM_BITS - N_EXP, UINT
        )
        gap_f = _gap(table_ptr + N_E, u_f, active_f, N_F, STEPS_F)
        m_f, pos_f, active_f = _flip_field_bits(pos_f, gap_f, active_f, cols, N_F, N_FRAC, 0, UINT)
        flips = flips ^ m_e ^ m_f
        n_e += active_e.to(tl.int32)  # active here: a flip taken in this iteration
        n_f += active_f.to(tl.int32)
        active_e = active_e & (pos_e < N_E)
        active_f = active_f & (pos_f < N_F)
        it += 1
    return flips, n_e, n_f


@triton.jit
def _dense_step(undecided, less, r, digit):
    """One digit of the bit-sliced comparison of 32 lanes: a lane whose random digit ``r`` is 0
    where P's ``digit`` is 1 is below P (flips); one where they differ the other way is not."""
    less = less | (undecided & ~r & digit)
    return undecided & ~(r ^ digit), less


@triton.jit
def _digits_of(p):
    """Binary digits of P / 2^64 up to its last 1 (0 for P = 0), for a uint64 scalar P."""
    low = (p & (~p + 1)).to(tl.float64)  # its lowest set bit, a power of two: exact
    e = ((low.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1023
    return tl.where(p != 0, 64 - e, 0)


@triton.jit
def _dense_counter(zero, k, DENSE_BASE: tl.constexpr):
    """The Philox iteration word (uint32, like ``zero``) of dense digit ``k``."""
    k = tl.zeros([], tl.int32) + k  # a Python int under the interpreter
    return (zero + k.to(tl.uint32) + DENSE_BASE).to(tl.uint32)


@triton.jit
def _dense_words_step(u0, u1, u2, u3, l0, l1, l2, l3, r0, r1, r2, r3, p_e, p_f, k,
                      EXP_LANES: tl.constexpr, FRAC_LANES: tl.constexpr):  # fmt: skip
    """Digit ``k`` (a scalar) of the bit-sliced comparison from its draw ``r`` (four words)."""
    k = tl.zeros([], tl.int32) + k  # a Python int under the interpreter
    shift = (63 - k).to(tl.uint64)
    digit = tl.where(((p_e >> shift) & 1) != 0, EXP_LANES, 0) | tl.where(
        ((p_f >> shift) & 1) != 0, FRAC_LANES, 0
    )
    digit = digit.to(tl.uint32)
    u0, l0 = _dense_step(u0, l0, r0, digit)
    u1, l1 = _dense_step(u1, l1, r1, digit)
    u2, l2 = _dense_step(u2, l2, r2, digit)
    u3, l3 = _dense_step(u3, l3, r3, digit)
    return u0, u1, u2, u3, l0, l1, l2, l3


@triton.jit
def _dense_digit(u0, u1, u2, u3, l0, l1, l2, l3, c0, c1, zero, call, key0, key1, p_e, p_f, k,
                 EXP_LANES: tl.constexpr, FRAC_LANES: tl.constexpr, N_ROUNDS: tl.constexpr,
                 DENSE_BASE: tl.constexpr):  # fmt: skip
    """Digit ``k`` (a scalar) of the bit-sliced comparison: one Philox draw, four lane words."""
    r0, r1, r2, r3 = _philox4x32(
        c0, c1, _dense_counter(zero, k, DENSE_BASE), zero + call, key0, key1, N_ROUNDS
    )
    return _dense_words_step(
        u0, u1, u2, u3, l0, l1, l2, l3, r0, r1, r2, r3, p_e, p_f, k, EXP_LANES, FRAC_LANES
    )  # fmt: skip


@triton.jit
def _dense_flips(
    rows,
    cols,
    call,
    k0,
    k1,
    p_e,
    p_f,
    ELEM_BITS: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    DENSE_BASE: tl.constexpr = DENSE_ITERATION,
    FREE_DIGITS: tl.constexpr = DENSE_FREE_DIGITS,
):
    """The XOR masks [R, G] of the dense fields of groups ``rows`` [R] (int64 group indices),
    and each group's flipped sign/exponent and mantissa bits [R] (out-of-bounds elements
    included; unused counts cost nothing):
    ``p_e``, ``p_f`` (uint64) are P of the exp and frac field (0: sparse, no lane).  Lane
    (word w, bit j) of a group flips iff its uniform (digit k: bit j of word w of the draw at
    iteration DENSE_BASE + k) is below P / 2^64 (see :mod:`.sampling`); four uint32 words per
    group hold the lanes.

    Digits past P's last 1 cannot change a result, nor can digits once every lane is decided,
    so the loop length is free as long as it covers what the lanes need: the first
    FREE_DIGITS digits (at most up to P's last 1) run without looking at the lanes (no
    block-wide reduction: at p = 2^-n that is the whole loop); later digits run while a lane
    that can still flip is undecided (the long expansion of a p like 0.3)."""
    UINT: tl.constexpr = tl.uint16 if ELEM_BITS == 16 else tl.uint32
    FRAC_LANES: tl.constexpr = ((1 << N_FRAC) - 1) * (0x10001 if ELEM_BITS == 16 else 1)
    EXP_LANES: tl.constexpr = 0xFFFFFFFF ^ FRAC_LANES
    c0, c1, zero, key0, key1 = _philox_words(rows, k0, k1)
    lanes = tl.where(p_e != 0, EXP_LANES, 0) | tl.where(p_f != 0, FRAC_LANES, 0)
    u0 = zero + lanes.to(tl.uint32)
    u1 = u0
    u2 = u0
    u3 = u0
    l0 = zero
    l1 = zero
    l2 = zero
    l3 = zero
    d_e = _digits_of(p_e)
    d_f = _digits_of(p_f)
    n_digits = tl.maximum(d_e, d_f)
    free = tl.minimum(n_digits, FREE_DIGITS)
    quads = free - free % 4
    for k in range(0, quads, 4):  # four independent draws per iteration (ILP)
        r0, r1, r2, r3 = _philox4x32(
            c0, c1, _dense_counter(zero, k, DENSE_BASE), zero + call, key0, key1, N_ROUNDS
        )
        s0, s1, s2, s3 = _philox4x32(
            c0, c1, _dense_counter(zero, k + 1, DENSE_BASE), zero + call, key0, key1, N_ROUNDS
        )
        t0, t1, t2, t3 = _philox4x32(
            c0, c1, _dense_counter(zero, k + 2, DENSE_BASE), zero + call, key0, key1, N_ROUNDS
        )
        v0, v1, v2, v3 = _philox4x32(
            c0, c1, _dense_counter(zero, k + 3, DENSE_BASE), zero + call, key0, key1, N_ROUNDS
        )
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_words_step(
            u0, u1, u2, u3, l0, l1, l2, l3, r0, r1, r2, r3, p_e, p_f, k, EXP_LANES, FRAC_LANES
        )
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_words_step(
            u0, u1, u2, u3, l0, l1, l2, l3, s0, s1, s2, s3, p_e, p_f, k + 1, EXP_LANES, FRAC_LANES
        )
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_words_step(
            u0, u1, u2, u3, l0, l1, l2, l3, t0, t1, t2, t3, p_e, p_f, k + 2, EXP_LANES, FRAC_LANES
        )
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_words_step(
            u0, u1, u2, u3, l0, l1, l2, l3, v0, v1, v2, v3, p_e, p_f, k + 3, EXP_LANES, FRAC_LANES
        )
    for k in range(quads, free):
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_digit(
            u0, u1, u2, u3, l0, l1, l2, l3, c0, c1, zero, call, key0, key1, p_e, p_f, k,
            EXP_LANES, FRAC_LANES, N_ROUNDS, DENSE_BASE,
        )  # fmt: skip
    k = free
    pending = (n_digits > free).to(tl.int32)  # no block-wide reduction where P has ended
    if n_digits > free:
        live = (tl.where(d_e > k, EXP_LANES, 0) | tl.where(d_f > k, FRAC_LANES, 0)).to(tl.uint32)
        pending = tl.max((((u0 | u1 | u2 | u3) & live) != 0).to(tl.int32), axis=0)
    while pending > 0:
        u0, u1, u2, u3, l0, l1, l2, l3 = _dense_digit(
            u0, u1, u2, u3, l0, l1, l2, l3, c0, c1, zero, call, key0, key1, p_e, p_f, k,
            EXP_LANES, FRAC_LANES, N_ROUNDS, DENSE_BASE,
        )  # fmt: skip
        k += 1
        live = (tl.where(d_e > k, EXP_LANES, 0) | tl.where(d_f > k, FRAC_LANES, 0)).to(tl.uint32)
        pending = tl.max((((u0 | u1 | u2 | u3) & live) != 0).to(tl.int32), axis=0)
    if ELEM_BITS == 16:  # element c: half c % 2 of word c // 2
        w = tl.where(cols < 4, tl.where(cols < 2, l0[:, None], l1[:, None]), 0)
        w = tl.where(cols >= 4, tl.where(cols < 6, l2[:, None], l3[:, None]), w)
        m = (w >> ((cols % 2) * 16).to(tl.uint32)[None, :]) & 0xFFFF
    else:  # element c: word c
        m = tl.where(cols < 2, tl.where(cols == 0, l0[:, None], l1[:, None]), 0)
        m = tl.where(cols >= 2, tl.where(cols == 2, l2[:, None], l3[:, None]), m)
    n_all = _set_bits(l0) + _set_bits(l1) + _set_bits(l2) + _set_bits(l3)
    n_f = _set_bits(l0 & FRAC_LANES) + _set_bits(l1 & FRAC_LANES)
    n_f += _set_bits(l2 & FRAC_LANES) + _set_bits(l3 & FRAC_LANES)
    return m.to(UINT), n_all - n_f, n_f


@triton.jit
def _set_bits(word):
    """Set bits of each uint32 word (int32)."""
    return popcount32(word.to(tl.int32, bitcast=True))


@triton.jit
def _dense_words(table_ptr, N_E: tl.constexpr, N_F: tl.constexpr):
    """P of the exp and frac field (uint64 scalars; 0: sparse), the flip table's last words."""
    p_e = tl.load(table_ptr + (N_E + N_F)).to(tl.uint64, bitcast=True)
    p_f = tl.load(table_ptr + (N_E + N_F + 1)).to(tl.uint64, bitcast=True)
    return p_e, p_f


@triton.jit
def flip_group_bits(
    bits,
    rows,
    cols,
    call,
    k0,
    k1,
    table_ptr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr = 1,
):
    """The sampling scheme on a block of groups: ``bits`` [R, G] (raw element bits, uint16 or
    uint32), ``rows`` [R] their int64 group indices (distinct), ``call`` the uint32 call index;
    returns the bits with the flips applied.  Shared by every kernel that flips.

    One Philox draw per group settles every group without a flip (the fast path, on the whole
    block).  If at most SINGLES groups of the block hold a flip, they are taken one at a time
    through the gap sampling (:func:`_flips_of_groups` on a single group: the loop then costs
    in proportion to those groups, not to the block); more, and the whole block runs it.

    Dense fields (P words at the end of the table, nonzero) are flipped by the bit-sliced
    comparison (:func:`_dense_flips`); the gap sampling runs unless both fields are dense.
    With both fields sparse this costs two scalar loads and a uniform branch per program.

    Returns (bits, hits, n_e, n_f): ``hits`` (an int32 scalar) is 0 when no bit of the block
    flipped (nonzero does not promise a flip: a dense field always reads as a hit); ``n_e`` /
    ``n_f`` each group's flipped sign/exponent and mantissa bits [R] (out-of-bounds elements
    included; unused counts cost nothing)."""
    p_e, p_f = _dense_words(table_ptr, N_E, N_F)
    hits = ((p_e | p_f) != 0).to(tl.int32)
    n_e = (rows * 0).to(tl.int32)
    n_f = n_e
    if (p_e | p_f) != 0:
        flips, n_e, n_f = _dense_flips(
            rows, cols, call, k0, k1, p_e, p_f, ELEM_BITS, N_FRAC, N_ROUNDS
        )  # fmt: skip
        bits = bits ^ flips
    if (p_e == 0) | (p_f == 0):  # a dense field's table never flips: the counts add up
        bits, n_hit, s_e, s_f = _sparse_group_bits(
            bits, rows, cols, call, k0, k1, table_ptr,
            ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
        hits = hits + n_hit
        n_e += s_e
        n_f += s_f
    return bits, hits, n_e, n_f


@triton.jit
def _sparse_group_bits(
    bits,
    rows,
    cols,
    call,
    k0,
    k1,
    table_ptr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr,
):
    """The gap sampling of :func:`flip_group_bits` (a dense field's table never flips).
    Returns (bits, the number of the block's groups that hold a flip, each group's flipped
    sign/exponent bits [R], its flipped mantissa bits [R]); unused results cost nothing."""
    UINT: tl.constexpr = tl.uint16 if ELEM_BITS == 16 else tl.uint32
    c0, c1, zero, key0, key1 = _philox_words(rows, k0, k1)
    w0, w1, w2, w3 = _philox4x32(c0, c1, zero, zero + call, key0, key1, N_ROUNDS)
    last_e = tl.load(table_ptr + (N_E - 1))
    last_f = tl.load(table_ptr + (N_E + N_F - 1))
    hit = (_u63(w0, w1) <= last_e) | (_u63(w2, w3) <= last_f)
    n_hit = tl.sum(hit.to(tl.int32), axis=0)
    n_e = (rows * 0).to(tl.int32)
    n_f = n_e
    if n_hit > 0:
        if n_hit <= SINGLES:
            flips = bits * 0
            while tl.max(hit.to(tl.int32), axis=0) > 0:
                g = tl.min(tl.where(hit, rows, 0x7FFFFFFFFFFFFFFF), axis=0)  # next such group
                one = tl.zeros([1], tl.int64) + g
                f, f_e, f_f = _flips_of_groups(
                    one, cols, call, k0, k1, table_ptr,
                    ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS,
                )  # fmt: skip
                chosen = rows == g
                flips = flips ^ tl.where(chosen[:, None], f, 0).to(UINT)
                n_e = tl.where(chosen, f_e, n_e)
                n_f = tl.where(chosen, f_f, n_f)
                hit = hit & ~chosen
        else:
            flips, n_e, n_f = _flips_of_groups(
                rows, cols, call, k0, k1, table_ptr,
                ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS,
            )  # fmt: skip
        bits = bits ^ flips
    return bits, n_hit, n_e, n_f


@triton.jit
def flip_block_bits(
    x,
    rows,
    cols,
    call_ptr,
    k0,
    k1,
    table_ptr,
    HAS_FLIPS: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr = 1,
    SPARSE_ONLY: tl.constexpr = FLIPS_SPARSE_ONLY,
    DENSE_ONLY: tl.constexpr = FLIPS_DENSE_ONLY,
):
    """The flips of :func:`flip_and_zero` without its zero-out: (y, hits, n_e, n_f).
    ``hits``: the number of the block's groups holding a flip with a sparse-only table, else
    0 when no bit of the block flipped (an int32 scalar, or the constant 0 without flips;
    nonzero does not promise a flip: a dense field always reads as a hit).
    ``n_e`` / ``n_f``: each group's flipped sign/exponent and mantissa bits [R] (out-of-bounds
    elements included; zeros without flips)."""
    UINT: tl.constexpr = tl.uint16 if ELEM_BITS == 16 else tl.uint32
    SINT: tl.constexpr = tl.int16 if ELEM_BITS == 16 else tl.int32
    bits = x.to(SINT, bitcast=True).to(UINT, bitcast=True)
    hits = 0
    n_e = rows.to(tl.int32) * 0
    n_f = n_e
    if HAS_FLIPS == SPARSE_ONLY:  # the host knows the table has no dense field
        call = tl.load(call_ptr).to(tl.uint32)
        bits, hits, n_e, n_f = _sparse_group_bits(
            bits, rows, cols, call, k0, k1, table_ptr,
            ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
    elif HAS_FLIPS == DENSE_ONLY:  # the host knows both fields are dense: no gap sampling
        call = tl.load(call_ptr).to(tl.uint32)
        p_e, p_f = _dense_words(table_ptr, N_E, N_F)
        flips, n_e, n_f = _dense_flips(
            rows, cols, call, k0, k1, p_e, p_f, ELEM_BITS, N_FRAC, N_ROUNDS
        )  # fmt: skip
        bits = bits ^ flips
        hits = 1
    elif HAS_FLIPS:
        call = tl.load(call_ptr).to(tl.uint32)
        bits, hits, n_e, n_f = flip_group_bits(
            bits, rows, cols, call, k0, k1, table_ptr,
            ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
    return bits.to(SINT, bitcast=True).to(x.dtype, bitcast=True), hits, n_e, n_f


@triton.jit
def flip_and_zero(
    x,
    rows,
    cols,
    call_ptr,
    k0,
    k1,
    table_ptr,
    threshold,
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr = 1,
    SPARSE_ONLY: tl.constexpr = FLIPS_SPARSE_ONLY,
):
    """The fault model on a block of groups ``x`` [R, G] (float values; ``rows`` [R] their
    int64 group indices): flips, then zero-out (``|y| >= threshold``, NaN, Inf -> 0).
    Returns (y, keep): keep is False where the zero-out removed the element.

    HAS_FLIPS: False (no flips), True (the table may hold dense fields: read from its end),
    FLIPS_SPARSE_ONLY (:func:`flips_mode`: the host knows both fields are sparse, so the
    program compiles without the dense path and its table reads) or FLIPS_DENSE_ONLY (both
    are dense: the program compiles without the gap sampling)."""
    y, _, _, _ = flip_block_bits(
        x, rows, cols, call_ptr, k0, k1, table_ptr, HAS_FLIPS,
        ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES, SPARSE_ONLY,
    )  # fmt: skip
    if HAS_ZERO:
        keep = tl.abs(y.to(tl.float32)) < threshold  # NaN and Inf compare false -> zeroed
        y = tl.where(keep, y, 0)
    else:
        keep = tl.full(y.shape, 1, tl.int1)
    return y, keep


# inline PTX on NVIDIA GPUs: the population count (one instruction; the SWAR fallback is ~12
# integer ops per element, which made the counted flip compute-bound) and _kept_mask32; the
# interpreter and ROCm take the plain Triton forms
HW_POPCOUNT = (
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    and getattr(torch.version, "hip", None) is None
)


@triton.jit
def popcount32(v, HW: tl.constexpr = HW_POPCOUNT):
    """Set bits of each element of a non-negative int32 tensor (``popc.b32``, or SWAR)."""
    if HW:
        return tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1
        )
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return v & 0x3F


@triton.jit
def _kept_mask32(y, threshold, HW: tl.constexpr = HW_POPCOUNT):
    """-1 (every bit set) where ``|y| < threshold`` (float32 tensor and scalar; NaN compares
    false), else 0.  On NVIDIA GPUs PTX ``set``, whose result is this integer mask: from
    ``tl.where`` LLVM keeps a predicate per element instead, which ptxas saves to registers
    and back (P2R / R2P in the SASS of the counted launch)."""
    if HW:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 a; abs.f32 a, $1; set.lt.u32.f32 $0, a, $2; }",
            "=r,r,r", [y, threshold + tl.zeros_like(y)], dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    return tl.where(tl.abs(y) < threshold, -1, 0)


@triton.jit
def zero_out_bits(y, threshold, inb, full):
    """The zero-out of :func:`flip_and_zero` (``|y| >= threshold``, NaN, Inf -> 0) for the
    counted launch, without a predicate per element: returns (y, zeroed in-bounds elements per
    group [R]).  ``full``: no element of the block is out of bounds (then ``inb`` is not read).

    16-bit values, two to a 32-bit word: non-negative floats order as their bit patterns and
    NaN / Inf patterns lie above every finite one, so ``|y| < threshold`` is ``(bits & 0x7FFF)
    < T`` with T the smallest pattern of y's dtype whose value is >= threshold; a per-lane add
    carries that comparison into each lane's top bit.  float32: the comparison's integer mask
    (:func:`_kept_mask32`)."""
    R: tl.constexpr = y.shape[0]
    G: tl.constexpr = y.shape[1]
    threshold = tl.zeros((), tl.float32) + threshold  # a float32 (the interpreter: a float)
    if y.dtype.primitive_bitwidth == 16:
        t = threshold.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # -0.0 as +0.0
        if y.dtype == tl.bfloat16:  # the smallest bf16 pattern >= t: round t's bits up
            t16 = (t + 0xFFFF) >> 16
        else:  # float16: the nearest pattern, one up when it lies below the threshold
            magnitude = t.to(tl.float32, bitcast=True)
            h = magnitude.to(tl.float16)
            t16 = h.to(tl.int16, bitcast=True).to(tl.int32)
            t16 = t16 + (h.to(tl.float32) < magnitude).to(tl.int32)
        halves = y.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo, hi = tl.split(tl.reshape(halves, [R, G // 2, 2]))
        word = lo | (hi << 16)
        # lane top bit set <=> |lane| >= t16 (a lane <= 0x7FFF plus <= 0x8000: no carry out)
        flag = (((word & 0x7FFF7FFF) + (0x8000 - t16) * 0x10001) >> 15) & 0x10001
        word = word & ~(flag * 0xFFFF)
        if not full:
            in_lo, in_hi = tl.split(tl.reshape(inb.to(tl.int32), [R, G // 2, 2]))
            flag = flag & (in_lo | (in_hi << 16))
        lanes = tl.sum(flag, axis=1)
        n_zeroed = (lanes & 0xFFFF) + (lanes >> 16)
        halves = tl.reshape(tl.join(word & 0xFFFF, word >> 16), [R, G])
        y = halves.to(tl.int16).to(y.dtype, bitcast=True)
    else:
        bits = y.to(tl.int32, bitcast=True)
        kept = _kept_mask32(y, threshold)  # -1 where |y| < threshold, else 0
        y = (bits & kept).to(y.dtype, bitcast=True)
        n_zeroed = tl.sum(kept, axis=1) + G
        if not full:
            n_zeroed = tl.sum(tl.where(inb, kept + 1, 0), axis=1)
    return y, n_zeroed


@triton.jit
def add_flip_counts(
    rows, hits, n_e, n_f, n_zeroed, full, count_ptr, slot, HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr, COUNT_SLOTS: tl.constexpr, SINGLES: tl.constexpr,
    SPARSE_ONLY: tl.constexpr = FLIPS_SPARSE_ONLY,
):  # fmt: skip
    """Adds a block's [sign/exponent flips, mantissa flips, zeroed elements] to ``count_ptr``
    (int64 [COUNT_SLOTS, 3], summed over its rows): ``n_e`` / ``n_f`` / ``n_zeroed`` per group
    [R] (in-bounds elements only; the zeroed only with HAS_ZERO), ``rows`` [R] the block's
    group indices, ``slot`` the block's row of ``count_ptr``.

    ``hits``: 0 when the block holds no flip (:func:`flip_block_bits`; at small p nearly every
    block), which then adds only its zeroed elements.  A ``full`` block (no element out of
    bounds) with at most SINGLES groups holding flips (a sparse-only table) lets those groups
    add their own counts (masked atomic adds to row ``group % COUNT_SLOTS``: no reduction over
    the block); any other block reduces its counts (one packed reduction) and adds them to
    ``slot``.  Nothing to add: no atomic add."""
    if HAS_FLIPS == SPARSE_ONLY:
        if hits != 0:
            if full & (hits <= SINGLES):
                by_group = count_ptr + (rows % COUNT_SLOTS) * 3
                # relaxed: the default acq_rel orders memory around each add (a fence per add)
                tl.atomic_add(by_group, n_e.to(tl.int64), mask=n_e != 0, sem="relaxed")
                tl.atomic_add(by_group + 1, n_f.to(tl.int64), mask=n_f != 0, sem="relaxed")
                if HAS_ZERO:
                    _add_zeroed(n_zeroed, slot)
            else:
                _add_block_counts(n_e, n_f, n_zeroed, slot, HAS_ZERO)
        elif HAS_ZERO:
            _add_zeroed(n_zeroed, slot)
    elif HAS_FLIPS:
        if hits != 0:
            _add_block_counts(n_e, n_f, n_zeroed, slot, HAS_ZERO)
        elif HAS_ZERO:
            _add_zeroed(n_zeroed, slot)
    elif HAS_ZERO:
        _add_zeroed(n_zeroed, slot)


@triton.jit
def _add_zeroed(n_zeroed, slot):
    """Adds the block's zeroed elements (``n_zeroed`` per group [R]) to ``slot[2]``."""
    zeroed = tl.sum(n_zeroed, axis=0)
    if zeroed != 0:
        tl.atomic_add(slot + 2, zeroed.to(tl.int64), sem="relaxed")


@triton.jit
def _add_block_counts(n_exp, n_frac, n_zeroed, slot, HAS_ZERO: tl.constexpr):
    """Adds a block's per-group counts [R] (<= 92 flips a field, 8 zeroed; the zeroed only
    with HAS_ZERO) to its row ``slot[0:3]``: the flips packed into one int32 per group (16
    bits each: exact for up to 712 groups per block), summed in one reduction, the zeroed in
    another, then one atomic add per count."""
    tl.static_assert(n_exp.shape[0] <= 512, "the block counts are packed in 16 bits")
    total = tl.sum(n_exp | (n_frac << 16), axis=0)
    if total != 0:
        tl.atomic_add(slot, (total & 0xFFFF).to(tl.int64), sem="relaxed")
        tl.atomic_add(slot + 1, ((total >> 16) & 0xFFFF).to(tl.int64), sem="relaxed")
    if HAS_ZERO:
        _add_zeroed(n_zeroed, slot)


@triton.jit
def _differing_bits(x, flipped, inb, SINT: tl.constexpr, N_FRAC: tl.constexpr):
    """Per group of ``x`` / ``flipped`` [R, G]: (differing sign/exponent bits, differing
    mantissa bits) [R] of the in-bounds elements (``popc.b32`` per element)."""
    d = (x.to(SINT, bitcast=True) ^ flipped.to(SINT, bitcast=True)).to(tl.int32)
    if x.dtype.primitive_bitwidth == 16:  # the xor widened sign-extended: its own 16 bits
        d = d & 0xFFFF
    d = tl.where(inb, d, 0)  # every bit is a sign/exponent or a mantissa bit
    n_all = tl.sum(popcount32(d), axis=1)
    n_frac = tl.sum(popcount32(d & ((1 << N_FRAC) - 1)), axis=1)
    return n_all - n_frac, n_frac


@triton.jit
def stick_lanes(x, pid, cols, lanes_ptr, n_lanes, G: tl.constexpr, ROWS: tl.constexpr):
    """Block ``pid`` (ROWS groups of G elements) ``x`` [ROWS, G] of a row-major tensor whose
    last dimension has ``n_lanes`` elements (a multiple of G) with its stuck input lanes forced:
    ``bits = (bits & keep[f]) | ones[f]`` for the element's feature f (its index modulo
    n_lanes); ``lanes_ptr``: keep (n_lanes words) then ones (n_lanes words), in the signed
    integer type of x's bits.  One scalar int64 modulo per program, int32 arithmetic per
    group; groups never straddle a row."""
    SINT: tl.constexpr = lanes_ptr.dtype.element_ty
    first = ((pid * (ROWS * G)) % n_lanes).to(tl.int32)  # feature of the block's first element
    lane = (first + tl.arange(0, ROWS) * G) % n_lanes
    feature = lane[:, None] + cols[None, :]
    keep = tl.load(lanes_ptr + feature)
    ones = tl.load(lanes_ptr + n_lanes + feature)
    bits = (x.to(SINT, bitcast=True) & keep) | ones
    return bits.to(x.dtype, bitcast=True)


@triton.jit
def stick_sparse(x, pid, offs, starts_ptr, stuck_ptr):
    """Block ``pid`` ``x`` [ROWS, G] (element indices ``offs``) with the stuck bits listed for
    it forced: ``bits = (bits & keep) | ones`` at each entry ``starts[pid] <= j <
    starts[pid + 1]`` of ``stuck_ptr`` (int64 pairs: element index, keep in the low and ones
    in the high 32 bits; see :class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck`).  A
    block without an entry costs the two offset loads."""
    SINT: tl.constexpr = tl.int16 if x.dtype.primitive_bitwidth == 16 else tl.int32
    lo = tl.load(starts_ptr + pid)
    hi = tl.load(starts_ptr + pid + 1)
    bits = x.to(SINT, bitcast=True)
    for j in range(lo, hi):
        index = tl.load(stuck_ptr + 2 * j)
        word = tl.load(stuck_ptr + 2 * j + 1)
        keep = word.to(tl.int32).to(SINT)
        ones = (word >> 32).to(tl.int32).to(SINT)
        bits = tl.where(offs == index, (bits & keep) | ones, bits)
    return bits.to(x.dtype, bitcast=True)


# what a flip kernel does with a gradient (the GRAD_MODE constexpr): nothing; write
# out = grad where kept, else 0; or set grad[zeroed] = 0 in place
_GRAD_NONE, _GRAD_MASKED_COPY, _GRAD_ZERO_IN_PLACE = 0, 1, 2
# how a flip kernel writes y (the WRITE_Y constexpr; False: not at all): every element, or (in
# place: out is x) only the groups whose bits changed
_Y_ALL, _Y_CHANGED = 1, 2


@triton.jit
def _flip_block(
    pid,
    x_ptr,
    out_ptr,
    grad_ptr,
    mask_ptr,
    n_elements,
    table_ptr,
    call_ptr,
    k0,
    k1,
    threshold,
    WRITE_Y: tl.constexpr,
    GRAD_MODE: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr,
    HAS_LANES: tl.constexpr = False,
    lanes_ptr=None,
    n_lanes=None,
    HAS_STUCK: tl.constexpr = False,
    starts_ptr=None,
    stuck_ptr=None,
    COUNT: tl.constexpr = False,
    count_ptr=None,
    COUNT_SLOTS: tl.constexpr = 1,
    DENSE_ONLY: tl.constexpr = FLIPS_DENSE_ONLY,
):
    """Block ``pid`` (ROWS groups of G elements) of a flat tensor: flip + zero-out, then write
    y, the gradient mask (GRAD_MODE) and/or the packed zero mask (WRITE_MASK: one uint8 per
    group, bit j set when element j of the group was zeroed).  HAS_LANES: force the stuck
    input lanes first (:func:`stick_lanes`); HAS_STUCK: force the listed stuck bits first
    (:func:`stick_sparse`); the flips, the zero-out and its masks act on the stuck values.
    COUNT: add the block's flips and zeroed elements to row ``pid % COUNT_SLOTS`` of
    ``count_ptr`` (int64 [COUNT_SLOTS, 3], :func:`add_flip_counts`; the rows spread the
    atomic adds, their sum is the count; the flips of the values after the stuck bits)."""
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # group indices
    cols = tl.arange(0, G)
    offs = rows[:, None] * G + cols[None, :]
    inb = offs < n_elements
    x = tl.load(x_ptr + offs, mask=inb, other=0)
    SINT: tl.constexpr = tl.int16 if x.dtype.primitive_bitwidth == 16 else tl.int32
    x_in = x  # as in memory (before the stuck bits)
    if HAS_LANES:
        x = stick_lanes(x, pid, cols, lanes_ptr, n_lanes, G, ROWS)
    if HAS_STUCK:
        x = stick_sparse(x, pid, offs, starts_ptr, stuck_ptr)
    if COUNT:  # the flips before the zero-out, counted; then the zero-out
        y, hits, n_e, n_f = flip_block_bits(
            x, rows, cols, call_ptr, k0, k1, table_ptr, HAS_FLIPS,
            ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
        full = (pid.to(tl.int64) + 1) * (ROWS * G) <= n_elements  # no element out of bounds
        if HAS_FLIPS:
            if not full:  # the sampling's counts include out-of-bounds elements: count bits
                n_e, n_f = _differing_bits(x, y, inb, SINT, N_FRAC)
        tl.static_assert((GRAD_MODE == 0) and not WRITE_MASK, "a counted launch has no masks")
        n_zeroed = rows.to(tl.int32) * 0
        if HAS_ZERO:
            y, n_zeroed = zero_out_bits(y, threshold, inb, full)
    else:
        y, keep = flip_and_zero(
            x, rows, cols, call_ptr, k0, k1, table_ptr, threshold, HAS_FLIPS, HAS_ZERO,
            ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
    if WRITE_Y == 2 and HAS_FLIPS == DENSE_ONLY:  # in place, most groups changed
        tl.store(out_ptr + offs, y, mask=inb)
    elif WRITE_Y == 2:  # _Y_CHANGED, in place: the groups whose bits changed (small p: few)
        if COUNT and not HAS_LANES and not HAS_STUCK:  # flipped or zeroed: the counts tell
            changed = (n_e | n_f | n_zeroed) != 0
        else:
            diff = (y.to(SINT, bitcast=True) != x_in.to(SINT, bitcast=True)).to(tl.int32)
            changed = tl.max(diff, axis=1) != 0
        tl.store(out_ptr + offs, y, mask=inb & changed[:, None])
    elif WRITE_Y:
        tl.store(out_ptr + offs, y, mask=inb)
    if GRAD_MODE == 1:  # _GRAD_MASKED_COPY
        g = tl.load(grad_ptr + offs, mask=inb, other=0)
        tl.store(out_ptr + offs, tl.where(keep, g, 0), mask=inb)
    if GRAD_MODE == 2:  # _GRAD_ZERO_IN_PLACE: writes only the (rare) zeroed elements
        tl.store(grad_ptr + offs, tl.zeros_like(x).to(grad_ptr.dtype.element_ty), mask=inb & ~keep)
    if WRITE_MASK:
        zeroed = tl.where(keep | ~inb, 0, (1 << cols)[None, :])  # no bits past the end
        tl.store(mask_ptr + rows, tl.sum(zeroed, axis=1).to(tl.uint8), mask=rows * G < n_elements)
    if COUNT:  # after the stores: y and the mask are no longer held
        slot = count_ptr + (pid % COUNT_SLOTS) * 3
        add_flip_counts(
            rows, hits, n_e, n_f, n_zeroed, full, count_ptr, slot, HAS_FLIPS, HAS_ZERO,
            COUNT_SLOTS, SINGLES,
        )  # fmt: skip


@triton.jit
def store_next_call(call_ptr, next_call_ptr, WRITE_NEXT_CALL: tl.constexpr):
    """Program (0, 0) stores ``*call_ptr + 1`` to ``next_call_ptr`` (a different tensor: the
    other programs still read the call index), so a layer's counter advances without a launch."""
    if WRITE_NEXT_CALL:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(next_call_ptr, tl.load(call_ptr) + 1)


@triton.jit(do_not_specialize=["k0", "k1"])
def _bitflip_kernel(
    x_ptr,
    out_ptr,
    grad_ptr,
    mask_ptr,
    n_elements,
    table_ptr,
    call_ptr,
    next_call_ptr,
    k0,
    k1,
    threshold,
    lanes_ptr,
    n_lanes,
    starts_ptr,
    stuck_ptr,
    count_ptr,
    WRITE_Y: tl.constexpr,
    GRAD_MODE: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    WRITE_NEXT_CALL: tl.constexpr,
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr,
    HAS_LANES: tl.constexpr,
    HAS_STUCK: tl.constexpr,
    COUNT: tl.constexpr,
    COUNT_SLOTS: tl.constexpr,
):
    """:func:`_flip_block` over a flat tensor; WRITE_NEXT_CALL: program 0 also stores the call
    index + 1 to ``next_call_ptr`` (a layer's counter for its next forward); HAS_LANES: stuck
    input lanes from ``lanes_ptr`` (``n_lanes`` features); HAS_STUCK: listed stuck bits from
    ``stuck_ptr`` with per-program offsets ``starts_ptr``; COUNT: add the flips and zeroed
    elements to ``count_ptr`` (int64 [COUNT_SLOTS, 3]) (each pointer unused otherwise)."""
    store_next_call(call_ptr, next_call_ptr, WRITE_NEXT_CALL)
    _flip_block(
        tl.program_id(0).to(tl.int64), x_ptr, out_ptr, grad_ptr, mask_ptr, n_elements,
        table_ptr, call_ptr, k0, k1, threshold, WRITE_Y, GRAD_MODE, WRITE_MASK, HAS_FLIPS,
        HAS_ZERO, ELEM_BITS, N_EXP, N_FRAC, G, ROWS, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS,
        SINGLES, HAS_LANES, lanes_ptr, n_lanes, HAS_STUCK, starts_ptr, stuck_ptr, COUNT,
        count_ptr, COUNT_SLOTS,
    )  # fmt: skip


@triton.jit(do_not_specialize=["x_k0", "x_k1", "w_k0", "w_k1", "programs_x"])
def _bitflip_pair_kernel(
    x_ptr,
    x_out_ptr,
    x_mask_ptr,
    n_x,
    x_table_ptr,
    x_k0,
    x_k1,
    x_threshold,
    w_ptr,
    w_out_ptr,
    n_w,
    w_table_ptr,
    w_k0,
    w_k1,
    w_threshold,
    call_ptr,
    next_call_ptr,
    programs_x,
    x_lanes_ptr,
    n_lanes,
    w_starts_ptr,
    w_stuck_ptr,
    X_MASK: tl.constexpr,
    WRITE_NEXT_CALL: tl.constexpr,
    X_FLIPS: tl.constexpr,
    X_ZERO: tl.constexpr,
    W_FLIPS: tl.constexpr,
    W_ZERO: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    SINGLES: tl.constexpr,
    X_LANES: tl.constexpr,
    W_STUCK: tl.constexpr,
):
    """The forward flips of a layer's input and weight (same dtype) in one launch: the first
    ``programs_x`` programs flip x, the others W, each with its own table, key and threshold;
    X_MASK: also write x's packed zero mask; WRITE_NEXT_CALL: as in :func:`_bitflip_kernel`;
    X_LANES: x's stuck input lanes from ``x_lanes_ptr`` (``n_lanes`` features); W_STUCK: W's
    listed stuck bits (``w_stuck_ptr``, per-program offsets ``w_starts_ptr``)."""
    store_next_call(call_ptr, next_call_ptr, WRITE_NEXT_CALL)
    pid = tl.program_id(0).to(tl.int64)
    if pid < programs_x:
        _flip_block(
            pid, x_ptr, x_out_ptr, x_ptr, x_mask_ptr, n_x, x_table_ptr, call_ptr, x_k0, x_k1,
            x_threshold, True, 0, X_MASK, X_FLIPS, X_ZERO, ELEM_BITS, N_EXP, N_FRAC, G,
            ROWS, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES, X_LANES, x_lanes_ptr, n_lanes,
        )  # fmt: skip
    else:
        _flip_block(
            pid - programs_x, w_ptr, w_out_ptr, w_ptr, w_ptr, n_w, w_table_ptr, call_ptr, w_k0,
            w_k1, w_threshold, True, 0, False, W_FLIPS, W_ZERO, ELEM_BITS, N_EXP, N_FRAC,
            G, ROWS, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES, False, w_ptr, 0, W_STUCK,
            w_starts_ptr, w_stuck_ptr,
        )  # fmt: skip


@triton.jit
def _zero_by_mask_block(pid, grad_ptr, mask_ptr, n_elements, G: tl.constexpr, ROWS: tl.constexpr):
    """Block ``pid`` (ROWS groups of G): set ``grad`` to 0 where the packed zero mask (one uint8
    per group) has a bit set.  Reads the mask, writes only the (rare) masked elements."""
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    packed = tl.load(mask_ptr + rows, mask=rows * G < n_elements, other=0).to(tl.int32)
    if tl.max(packed, axis=0) > 0:
        cols = tl.arange(0, G)
        offs = rows[:, None] * G + cols[None, :]
        hit = ((packed[:, None] >> cols[None, :]) & 1) != 0
        zeros = tl.zeros([ROWS, G], dtype=grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + offs, zeros, mask=hit & (offs < n_elements))


@triton.jit(do_not_specialize=["programs_a"])
def _zero_by_masks_kernel(
    a_ptr,
    a_mask_ptr,
    n_a,
    b_ptr,
    b_mask_ptr,
    n_b,
    programs_a,
    G_A: tl.constexpr,
    G_B: tl.constexpr,
    ROWS: tl.constexpr,
):
    """:func:`_zero_by_mask_block` on two tensors in one launch (a layer's dX and dW): the first
    ``programs_a`` programs mask a, the others b."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < programs_a:
        _zero_by_mask_block(pid, a_ptr, a_mask_ptr, n_a, G_A, ROWS)
    else:
        _zero_by_mask_block(pid - programs_a, b_ptr, b_mask_ptr, n_b, G_B, ROWS)


MASK_ROWS_PER_PROGRAM = 1024  # groups per program of the mask-zeroing kernel
ROWS_PER_PROGRAM = 64  # tuned on H100 (benchmarks/tuning/tune_kernel.py): best at p <= 2^-16
NUM_WARPS = 2
# launches whose table holds a dense field: 4 groups per thread give the dense loop's
# independent Philox draws room to overlap (H100, tune_kernel.py, 2026-12-06: 2^-4 bf16 65 %
# of copy vs 53 % at 64 x 2, 2^-6 48 vs 40 %, 2^-9 34 vs 29 %)
DENSE_ROWS_PER_PROGRAM = 128
DENSE_NUM_WARPS = 1
# counted launches (training-fault sites) of sparse tables: (rows, warps), None: the flip's
# shape.  One warp of two groups per thread: the in-place launch is latency-bound at small p,
# and this keeps twice the flip shape's bytes in flight per warp, with its block reductions
# inside the warp (H100, tune_counted.py --shapes 64x1,128x1,32x1, 2026-12-07, on three forms
# of the counting, the shipped one not among them: faster than 64 x 2 in 34 of 36 cells, the
# other two within 0.5 us; e.g. bf16 2^-16 with a zero-out 44.1 -> 40.7 us, fp32 2^-10
# 189.1 -> 159.7 us for the previous form; 32 x 1 and 128 x 1 slower)
COUNT_SHAPE: tuple[int, int] | None = (64, 1)
SINGLE_GROUPS = 1  # a block with at most this many groups holding a flip takes them singly


def key_word(k: int) -> int:
    """A uint32 stream-key word as the int32 with the same bits: the kernels take the words
    as 32-bit integers whatever their value (one compiled kernel, not one per value range)."""
    return k - (1 << 32) if k >= (1 << 31) else k


def stream_args(key: tuple[int, int], threshold: float | None) -> tuple[int, int, float]:
    """A tensor's stream-key words (see :func:`key_word`) and zero-out threshold (0.0 when
    None: then the kernel does not read it), as every flip kernel takes them."""
    return key_word(key[0]), key_word(key[1]), float(threshold) if threshold is not None else 0.0


def has_dense_field(table, has_flips: bool) -> bool:
    """Whether a launch with ``table`` runs the dense path: the table is known (made by
    :func:`~peft_bitflip.kernels.sampling.flip_table`) to hold a dense field."""
    return bool(has_flips) and getattr(table, "_bitflip_sparse_only", True) is False


def flip_args(table, call, next_call, k0, k1, threshold) -> tuple:
    """The runtime arguments that follow the tensors of :func:`_bitflip_kernel` (and of the
    LoRA merge kernel): flip table, call index, the tensor that receives call + 1 (the call
    index itself when None: not written), then :func:`stream_args`."""
    nxt = call if next_call is None else next_call
    return (table, call, nxt) + stream_args((k0, k1), threshold)


_launch_single = KernelLauncher(_bitflip_kernel)
_launch_pair = KernelLauncher(_bitflip_pair_kernel)
_launch_zero_by_masks = KernelLauncher(_zero_by_masks_kernel)


@functools.cache
def _mask_config(g_a: int, g_b: int) -> dict:
    return dict(G_A=g_a, G_B=g_b, ROWS=MASK_ROWS_PER_PROGRAM)


@functools.cache
def flip_constexprs(dtype, has_flips: bool, has_zero: bool) -> dict:
    """The constexpr arguments of :func:`flip_group_bits` (and the zero-out switch) for
    ``dtype``: shared by every kernel that flips."""
    layout = check_dtype(dtype)
    n_e, n_f = field_sizes(dtype)
    return dict(
        HAS_FLIPS=has_flips,
        HAS_ZERO=has_zero,
        ELEM_BITS=layout.n_bits,
        N_EXP=layout.n_exp,
        N_FRAC=layout.n_frac,
        G=group_size(dtype),
        N_E=n_e,
        N_F=n_f,
        STEPS_E=search_steps(n_e),
        STEPS_F=search_steps(n_f),
        N_ROUNDS=PHILOX_ROUNDS,
    )


@functools.cache
def _launch_config(
    dtype,
    write_y: bool,
    grad_mode: int,
    write_mask: bool,
    has_zero: bool,
    has_flips: bool,
    rows,
    num_warps,
    writes_next_call: bool = False,
    dense: bool = False,
    has_lanes: bool = False,
    has_stuck: bool = False,
    count: bool = False,
):
    """(elements per program, the kernel's constexpr arguments): computed once per setting,
    so a launch costs little Python.  ``dense``: the table holds a dense field (its block
    shape unless ``rows`` / ``num_warps`` are given)."""
    if dense:
        rows, num_warps = rows or DENSE_ROWS_PER_PROGRAM, num_warps or DENSE_NUM_WARPS
    elif count and COUNT_SHAPE is not None:
        rows, num_warps = rows or COUNT_SHAPE[0], num_warps or COUNT_SHAPE[1]
    rows = rows or ROWS_PER_PROGRAM
    constexprs = dict(
        flip_constexprs(dtype, has_flips, has_zero),
        WRITE_Y=write_y,
        GRAD_MODE=grad_mode,
        WRITE_MASK=write_mask,
        WRITE_NEXT_CALL=writes_next_call,
        ROWS=rows,
        SINGLES=SINGLE_GROUPS,
        HAS_LANES=has_lanes,
        HAS_STUCK=has_stuck,
        COUNT=count,
        COUNT_SLOTS=COUNT_SLOTS,
        num_warps=num_warps or NUM_WARPS,
    )
    return rows * group_size(dtype), constexprs


def lanes_args(x: torch.Tensor, lanes: torch.Tensor | None) -> tuple:
    """The (lanes pointer, number of lanes) kernel arguments of ``x``'s stuck input lanes:
    ``lanes`` a (2, in_features) tensor of keep / ones words (see
    :meth:`~peft_bitflip.stuck_at.StuckAt.lanes`); ``(x, 0)`` (not read) when None.  Raises
    ``ValueError`` naming what does not fit."""
    if lanes is None:
        return x, 0
    n = lanes.size(-1)
    if lanes.shape != (2, x.size(-1)) or n % group_size(x.dtype) or lanes.device != x.device:
        raise ValueError(
            f"stuck lanes of shape {tuple(lanes.shape)} on {lanes.device} do not fit x of "
            f"shape {tuple(x.shape)} on {x.device} (need (2, in_features), in_features a "
            f"multiple of {group_size(x.dtype)})"
        )
    return lanes, n


def stuck_args(x: torch.Tensor, stuck: SparseStuck | None, per_program: int) -> tuple:
    """The (per-program offsets, entries) kernel arguments of ``x``'s listed stuck bits
    (:class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck`, drawn for x's element count,
    dtype and device: else ``ValueError``) for a launch of ``per_program`` elements per
    program; ``(x, x)`` (not read) when None."""
    if stuck is None:
        return x, x
    stuck.check_fits(x)
    return stuck.starts(per_program), stuck.entries


def _run(
    x,
    out,
    grad,
    table,
    call,
    k0,
    k1,
    threshold,
    has_flips,
    write_y,
    grad_mode,
    rows=None,
    num_warps=None,
    mask=None,
    next_call=None,
    lanes=None,
    stuck=None,
    counts=None,
):
    """One launch of :func:`_bitflip_kernel`; ``next_call``: a 0-dim int64 tensor on x's
    device that receives ``call + 1`` (see :func:`write_next_call`); ``lanes``: x's stuck
    input lanes (:func:`lanes_args`) or None; ``stuck``: x's listed stuck bits
    (:func:`stuck_args`) or None; ``counts``: None or a contiguous int64 (COUNT_SLOTS, 3)
    tensor on x's device: the launch adds its [sign/exponent flips, mantissa flips, zeroed
    elements] spread over the rows (their sum is the count)."""
    n = x.numel()
    if n == 0:
        write_next_call(call, next_call)
        return
    per_program, constexprs = _launch_config(
        x.dtype,
        write_y,
        grad_mode,
        mask is not None,
        threshold is not None,
        flips_mode(table, has_flips),
        rows,
        num_warps,
        next_call is not None,
        has_dense_field(table, has_flips),
        lanes is not None,
        stuck is not None,
        counts is not None,
    )
    _launch_single(
        (ceil_div(n, per_program),),
        (x, out, grad, x if mask is None else mask, n)
        + flip_args(table, call, next_call, k0, k1, threshold)
        + lanes_args(x, lanes)
        + stuck_args(x, stuck, per_program)
        + (x if counts is None else counts,),
        constexprs,
    )


def launch(
    x: torch.Tensor,
    table: torch.Tensor,
    call: torch.Tensor,
    k0: int,
    k1: int,
    threshold: float | None,
    has_flips: bool,
    grad: torch.Tensor | None = None,
    rows: int | None = None,
    num_warps: int | None = None,
    next_call: torch.Tensor | None = None,
    lanes: torch.Tensor | None = None,
    stuck: SparseStuck | None = None,
    counts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the kernel on contiguous ``x``; returns y (forward) or the masked ``grad`` (backward,
    a new tensor).  ``next_call`` (forward only): receives ``call + 1``; ``lanes``, ``stuck``
    (forward only): x's stuck input lanes (see :func:`lanes_args`) and listed stuck bits
    (:func:`stuck_args`), forced before the flips; ``counts`` (forward only): see
    :func:`_run`; ``out`` (forward only): where y goes (``x`` itself: in place, each program
    reads its block before it writes it), default a new tensor."""
    if grad is None:
        out = torch.empty_like(x) if out is None else out
        mode = _GRAD_NONE
        write_y = _Y_CHANGED if out.data_ptr() == x.data_ptr() else _Y_ALL
        _run(
            x, out, x, table, call, k0, k1, threshold, has_flips, write_y, mode, rows, num_warps,
            next_call=next_call, lanes=lanes, stuck=stuck, counts=counts,
        )  # fmt: skip
    else:
        out = torch.empty_like(grad)
        mode = _GRAD_MASKED_COPY
        _run(x, out, grad, table, call, k0, k1, threshold, has_flips, False, mode, rows, num_warps)
    return out


def launch_with_mask(
    x: torch.Tensor,
    table: torch.Tensor,
    call: torch.Tensor,
    k0: int,
    k1: int,
    threshold: float,
    has_flips: bool,
    next_call: torch.Tensor | None = None,
    lanes: torch.Tensor | None = None,
    stuck: SparseStuck | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flip of contiguous ``x``, its packed zero mask) from one pass over ``x``;
    ``next_call``: receives ``call + 1``; ``lanes``, ``stuck``: as in :func:`launch`."""
    out = torch.empty_like(x)
    mask = torch.empty(zero_mask_size(x.numel(), x.dtype), dtype=torch.uint8, device=x.device)
    _run(
        x, out, x, table, call, k0, k1, threshold, has_flips, True, _GRAD_NONE, mask=mask,
        next_call=next_call, lanes=lanes, stuck=stuck,
    )  # fmt: skip
    return out, mask


def zero_by_masks_(grads, masks, groups) -> None:
    """Set each contiguous ``grads[i]`` (one or two tensors) to 0 in place where the packed zero
    mask ``masks[i]`` (groups of ``groups[i]`` elements, in that tensor's element order) has a
    bit set; one launch."""
    programs = [
        ceil_div(ceil_div(g.numel(), gs), MASK_ROWS_PER_PROGRAM) for g, gs in zip(grads, groups)
    ]
    if sum(programs) == 0:
        return
    if len(grads) == 1:
        grads, masks, groups, programs = grads * 2, masks * 2, groups * 2, programs + [0]
    (a, b), (ma, mb), (ga, gb) = grads, masks, groups
    _launch_zero_by_masks(
        (programs[0] + programs[1],),
        (a, ma, a.numel(), b, mb, b.numel(), programs[0]),
        _mask_config(ga, gb),
    )


def launch_zero_grad_(
    x: torch.Tensor,
    grad: torch.Tensor,
    table: torch.Tensor,
    call: torch.Tensor,
    k0: int,
    k1: int,
    threshold: float,
    has_flips: bool,
    want_y: bool,
    lanes: torch.Tensor | None = None,
    stuck: SparseStuck | None = None,
) -> torch.Tensor | None:
    """Set ``grad`` (contiguous, ``x``'s element order) to 0 in place where the fault model
    zeroes ``x``; returns flip(x) too when ``want_y`` (one pass over ``x``).  ``lanes``,
    ``stuck``: x's stuck input lanes and listed stuck bits (as in :func:`launch`: the
    forward's zero-out of the stuck x)."""
    out = torch.empty_like(x) if want_y else x
    _run(
        x, out, grad, table, call, k0, k1, threshold, has_flips, want_y, _GRAD_ZERO_IN_PLACE,
        lanes=lanes, stuck=stuck,
    )  # fmt: skip
    return out if want_y else None


@functools.cache
def _pair_config(
    dtype,
    x_mask: bool,
    x_flips: bool,
    x_zero: bool,
    w_flips: bool,
    w_zero: bool,
    writes_next_call: bool = False,
    dense: bool = False,
    x_lanes: bool = False,
    w_stuck: bool = False,
):
    rows = DENSE_ROWS_PER_PROGRAM if dense else ROWS_PER_PROGRAM
    base = flip_constexprs(dtype, False, False)
    constexprs = {k: v for k, v in base.items() if k not in ("HAS_FLIPS", "HAS_ZERO")}
    constexprs.update(
        X_MASK=x_mask,
        WRITE_NEXT_CALL=writes_next_call,
        X_FLIPS=x_flips,
        X_ZERO=x_zero,
        W_FLIPS=w_flips,
        W_ZERO=w_zero,
        ROWS=rows,
        SINGLES=SINGLE_GROUPS,
        X_LANES=x_lanes,
        W_STUCK=w_stuck,
        num_warps=DENSE_NUM_WARPS if dense else NUM_WARPS,
    )
    return rows * group_size(dtype), constexprs


def launch_pair(
    x,
    w,
    x_table,
    w_table,
    call,
    x_key,
    w_key,
    x_threshold,
    w_threshold,
    x_flips,
    w_flips,
    want_x_mask=False,
    next_call=None,
    x_lanes=None,
    w_stuck=None,
):
    """flip(x) and flip(w) (contiguous, the same dtype, each with its own table, stream key,
    threshold and flips switch) in one launch; returns (x flipped, w flipped, x's packed zero
    mask or None).  The mask is written when ``want_x_mask`` and x has a threshold;
    ``next_call`` receives ``call + 1``; ``x_lanes``: x's stuck input lanes, forced before
    its flips (see :func:`lanes_args`); ``w_stuck``: w's listed stuck bits, forced before
    its flips (see :func:`stuck_args`)."""
    want_x_mask = want_x_mask and x_threshold is not None
    per_program, constexprs = _pair_config(
        x.dtype,
        want_x_mask,
        flips_mode(x_table, x_flips),
        x_threshold is not None,
        flips_mode(w_table, w_flips),
        w_threshold is not None,
        next_call is not None,
        has_dense_field(x_table, x_flips) or has_dense_field(w_table, w_flips),
        x_lanes is not None,
        w_stuck is not None,
    )
    x_out, w_out = torch.empty_like(x), torch.empty_like(w)
    x_mask = None
    if want_x_mask:
        size = zero_mask_size(x.numel(), x.dtype)
        x_mask = torch.empty(size, dtype=torch.uint8, device=x.device)
    programs_x = ceil_div(x.numel(), per_program)
    programs = programs_x + ceil_div(w.numel(), per_program)
    if programs == 0:
        write_next_call(call, next_call)
        return x_out, w_out, x_mask
    _launch_pair(
        (programs,),
        (
            x,
            x_out,
            x if x_mask is None else x_mask,
            x.numel(),
            x_table,
            *stream_args(x_key, x_threshold),
            w,
            w_out,
            w.numel(),
            w_table,
            *stream_args(w_key, w_threshold),
            call,
            call if next_call is None else next_call,
            programs_x,
            *lanes_args(x, x_lanes),
            *stuck_args(w, w_stuck, per_program),
        ),
        constexprs,
    )
    return x_out, w_out, x_mask
