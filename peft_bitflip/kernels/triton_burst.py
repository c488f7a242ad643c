"""Triton kernel of burst faults (k adjacent bits of one element), with optional zero-out.

The scheme is in :mod:`.burst_sampling`; :mod:`.burst_reference` follows it bit for bit.  Each
program handles ``ROWS`` groups of ``G`` elements: one Philox draw per group settles every
group without an event (the cost at realistic rates, as in the flip kernel); only programs that
hold an event enter the gap-sampling loop.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..spec import check_dtype
from .burst_sampling import BurstShape
from .launcher import KernelLauncher
from .sampling import PHILOX_ROUNDS, ceil_div, group_size, search_steps
from .triton_bitflip import _gap, _philox4x32, _philox_words, _u63, stream_args


@triton.jit
def _burst_masks(w2, w3, table_ptr, G: tl.constexpr, K_MIN: tl.constexpr,
                 N_LEN: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """The uint32 XOR mask of the burst of each lane: length from ``w3`` (thresholds at
    ``table_ptr + G``), lowest bit from ``w2`` (uniform over where it fits in the field)."""
    k = (w3 * 0 + K_MIN).to(tl.uint32)
    for j in tl.static_range(N_LEN):
        c = tl.load(table_ptr + (G + j))
        k += (c <= w3.to(tl.int64)).to(tl.uint32)
    start = tl.umulhi(w2, WIDTH + 1 - k) + SHIFT
    ones = tl.full(w2.shape, 0xFFFFFFFF, tl.uint32) >> (32 - k)
    return ones << start


@triton.jit(do_not_specialize=["k0", "k1"])
def _burst_kernel(
    x_ptr,
    out_ptr,
    n_elements,
    table_ptr,
    call_ptr,
    k0,
    k1,
    threshold,
    HAS_ZERO: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    STEPS: tl.constexpr,
    K_MIN: tl.constexpr,
    N_LEN: tl.constexpr,
    SHIFT: tl.constexpr,
    WIDTH: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """Block ``program_id`` (ROWS groups of G elements) of a flat tensor: burst events, then
    zero-out (``|y| >= threshold``, NaN, Inf -> 0) when HAS_ZERO; writes y."""
    UINT: tl.constexpr = tl.uint16 if ELEM_BITS == 16 else tl.uint32
    SINT: tl.constexpr = tl.int16 if ELEM_BITS == 16 else tl.int32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, G)
    offs = rows[:, None] * G + cols[None, :]
    inb = offs < n_elements
    x = tl.load(x_ptr + offs, mask=inb, other=0)
    bits = x.to(SINT, bitcast=True).to(UINT, bitcast=True)
    call = tl.load(call_ptr).to(tl.uint32)
    c0, c1, zero, key0, key1 = _philox_words(rows, k0, k1)
    w0, w1, w2, w3 = _philox4x32(c0, c1, zero, zero + call, key0, key1, N_ROUNDS)
    u = _u63(w0, w1)
    active = u <= tl.load(table_ptr + (G - 1))  # the group holds an event
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        pos = (rows * 0).to(tl.int32)
        it = zero
        while tl.max(active.to(tl.int32), axis=0) > 0:
            q = pos + _gap(table_ptr, u, active, G, STEPS)
            take = active & (q < G)
            m = _burst_masks(w2, w3, table_ptr, G, K_MIN, N_LEN, SHIFT, WIDTH)
            hit = take[:, None] & (cols[None, :] == q[:, None])
            bits = bits ^ tl.where(hit, m[:, None], 0).to(UINT)
            pos = q + 1
            active = take & (pos < G)
            it += 1
            w0, w1, w2, w3 = _philox4x32(c0, c1, it, zero + call, key0, key1, N_ROUNDS)
            u = _u63(w0, w1)
    y = bits.to(SINT, bitcast=True).to(x.dtype, bitcast=True)
    if HAS_ZERO:
        keep = tl.abs(y.to(tl.float32)) < threshold  # NaN and Inf compare false -> zeroed
        y = tl.where(keep, y, 0)
    tl.store(out_ptr + offs, y, mask=inb)


ROWS_PER_PROGRAM = 64  # as the flip kernel (tuned there on H100 for p <= 2^-16)
NUM_WARPS = 2
_launch_burst = KernelLauncher(_burst_kernel)


@functools.cache
def _constexprs(dtype, shape: BurstShape, has_zero: bool, rows: int, num_warps: int) -> dict:
    g = group_size(dtype)
    return dict(
        HAS_ZERO=has_zero,
        ELEM_BITS=check_dtype(dtype).n_bits,
        G=g,
        ROWS=rows,
        STEPS=search_steps(g),
        K_MIN=shape.k_min,
        N_LEN=shape.n_len,
        SHIFT=shape.shift,
        WIDTH=shape.width,
        N_ROUNDS=PHILOX_ROUNDS,
        num_warps=num_warps,
    )


def launch_burst(
    x: torch.Tensor,
    table: torch.Tensor,
    shape: BurstShape,
    call: torch.Tensor,
    k0: int,
    k1: int,
    threshold: float | None,
    rows: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The burst kernel on contiguous ``x`` (``call``: 0-dim int64 tensor on x's device);
    returns y, a new tensor."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    rows = rows or ROWS_PER_PROGRAM
    constexprs = _constexprs(x.dtype, shape, threshold is not None, rows, num_warps or NUM_WARPS)
    grid = (ceil_div(n, rows * group_size(x.dtype)),)
    _launch_burst(grid, (x, out, n, table, call) + stream_args((k0, k1), threshold), constexprs)
    return out
