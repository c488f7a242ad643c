"""Triton kernels for bit-flip LoRA layers.

* ``merge_flip``: ``flip(W + s * L @ R)`` reading ``W`` once — the LoRA product of a tile is
  formed in registers (float32, IEEE), added to ``W`` in float32, rounded to ``W``'s dtype and
  then to the output dtype, flipped and zeroed in registers with the shared fault model
  (:func:`~peft_bitflip.kernels.triton_bitflip.flip_and_zero`; tiles of 16 x 64 elements, up to
  ``MERGE_SINGLES`` groups holding a flip taken singly through the gap sampling) and stored;
  optionally writes a uint8 mask of the zeroed elements.  ``L @ R`` is ``B @ A`` for an
  ``nn.Linear`` weight ``(out, in)`` and ``A^T @ B^T`` for a Conv1D weight ``(in, out)``
  (strides say which).
  ``merge_flip_with_x`` also flips the layer's input in the same launch (the forward: one
  launch per layer instead of two).
* ``subtract_zeroed_correction_``: for LoRA gradients.  Where the weight flip zeroed an element
  ``(o, k)``, the product ``Z[o, k] = sum_t dY[t, o] * X[t, k]`` is formed and ``Z @ A^T`` /
  ``B^T @ Z`` are subtracted from the float32 gradients of B and A in place (float32 atomics).
  Only tiles of the mask holding such an element do work: a few zeroed elements are taken
  singly (two columns of T values each), more form a dense tile product.  The same launch
  zeroes the input gradient where x's packed zero mask says (the backward: one launch for
  both).

Each kernel runs on a 1-D grid: the first programs do the x part, the rest the weight tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launcher import KernelLauncher
from .sampling import ceil_div, flips_mode, group_size, write_next_call, zero_mask_size
from .triton_bitflip import (
    MASK_ROWS_PER_PROGRAM,
    ROWS_PER_PROGRAM,
    SINGLE_GROUPS,
    _flip_block,
    _zero_by_mask_block,
    flip_and_zero,
    flip_args,
    flip_constexprs,
    store_next_call,
    stream_args,
)


@triton.jit
def _merge_flip_tile(
    pid_m,
    pid_n,
    w_ptr,
    l_ptr,
    r_ptr,
    out_ptr,
    mask_ptr,
    ls_ptr,
    rs_ptr,
    M,
    N,
    RANK,
    scale,
    l_s0,
    l_s1,
    r_s0,
    r_s1,
    table_ptr,
    call_ptr,
    k0,
    k1,
    threshold,
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    WANT_MASK: tl.constexpr,
    WRITE_FACTORS: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    G: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLES: tl.constexpr,
):
    """Tile (pid_m, pid_n) of ``flip(W + scale * L @ R)`` (BM x BN elements of the (M, N)
    weight), with its zeroed mask when WANT_MASK.  WRITE_FACTORS: the tiles of the first
    column / row also store ``scale * L`` (M, RANK) and ``scale * R`` (RANK, N), contiguous,
    rounded to their buffers' dtype (the scaled factors the LoRA gradients multiply with)."""
    rm = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    rr = tl.arange(0, RP)
    lt = tl.load(
        l_ptr + rm[:, None] * l_s0 + rr[None, :] * l_s1,
        mask=(rm[:, None] < M) & (rr[None, :] < RANK),
        other=0.0,
    ).to(tl.float32)
    rt = tl.load(
        r_ptr + rr[:, None] * r_s0 + rn[None, :] * r_s1,
        mask=(rr[:, None] < RANK) & (rn[None, :] < N),
        other=0.0,
    ).to(tl.float32)
    if WRITE_FACTORS:
        if pid_n == 0:
            tl.store(
                ls_ptr + rm[:, None] * RANK + rr[None, :],
                (lt * scale).to(ls_ptr.dtype.element_ty),
                mask=(rm[:, None] < M) & (rr[None, :] < RANK),
            )
        if pid_m == 0:
            tl.store(
                rs_ptr + rr[:, None] * N + rn[None, :],
                (rt * scale).to(rs_ptr.dtype.element_ty),
                mask=(rr[:, None] < RANK) & (rn[None, :] < N),
            )
    delta = tl.dot(lt, rt, input_precision=DOT_PRECISION) * scale
    if HAS_FLIPS or HAS_ZERO:
        # The whole tile in registers as R = BM * BN / G groups of G consecutive elements of a
        # row (N % G == 0), addressed as groups (so that loads and stores take G elements at a
        # time): one Philox draw per group settles the groups without a flip, and up to
        # SINGLES groups holding one go singly through the gap sampling.
        GPR: tl.constexpr = BN // G  # groups per tile row
        R: tl.constexpr = BM * GPR
        r = tl.arange(0, R)
        row = pid_m * BM + r // GPR
        col0 = pid_n * BN + (r % GPR) * G  # the group's first column
        groups = row * (N // G) + col0 // G  # int64 group indices
        cols = tl.arange(0, G)
        offs_g = groups[:, None] * G + cols[None, :]
        inb_g = (row < M)[:, None] & ((col0[:, None] + cols[None, :]) < N)
        w = tl.load(w_ptr + offs_g, mask=inb_g, other=0.0)
        merged = (w.to(tl.float32) + tl.reshape(delta, (R, G))).to(w_ptr.dtype.element_ty)
        y, keep = flip_and_zero(
            merged.to(out_ptr.dtype.element_ty), groups, cols, call_ptr, k0, k1, table_ptr,
            threshold, HAS_FLIPS, HAS_ZERO, ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E,
            STEPS_F, N_ROUNDS, SINGLES,
        )  # fmt: skip
        tl.store(out_ptr + offs_g, y, mask=inb_g)
        if WANT_MASK:
            tl.store(mask_ptr + offs_g, (~keep).to(tl.uint8), mask=inb_g)
    else:
        offs = rm[:, None] * N + rn[None, :]
        inb = (rm[:, None] < M) & (rn[None, :] < N)
        w = tl.load(w_ptr + offs, mask=inb, other=0.0)
        merged = (w.to(tl.float32) + delta).to(w_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["k0", "k1", "x_k0", "x_k1", "programs_x"])
def _merge_flip_kernel(
    w_ptr,
    l_ptr,
    r_ptr,
    out_ptr,
    mask_ptr,
    ls_ptr,
    rs_ptr,
    M,
    N,
    RANK,
    scale,
    l_s0,
    l_s1,
    r_s0,
    r_s1,
    table_ptr,
    call_ptr,
    next_call_ptr,
    k0,
    k1,
    threshold,
    x_ptr,
    x_out_ptr,
    x_mask_ptr,
    n_x,
    x_table_ptr,
    x_k0,
    x_k1,
    x_threshold,
    programs_x,
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    WANT_MASK: tl.constexpr,
    WRITE_FACTORS: tl.constexpr,
    WRITE_NEXT_CALL: tl.constexpr,
    WITH_X: tl.constexpr,
    X_MASK: tl.constexpr,
    X_FLIPS: tl.constexpr,
    X_ZERO: tl.constexpr,
    X_ROWS: tl.constexpr,
    SINGLES: tl.constexpr,
    ELEM_BITS: tl.constexpr,
    N_EXP: tl.constexpr,
    N_FRAC: tl.constexpr,
    G: tl.constexpr,
    N_E: tl.constexpr,
    N_F: tl.constexpr,
    STEPS_E: tl.constexpr,
    STEPS_F: tl.constexpr,
    N_ROUNDS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MERGE_SINGLES: tl.constexpr,
):
    """A LoRA layer's forward flips in one launch (1-D grid): with WITH_X the first
    ``programs_x`` programs flip the input x (blocks of X_ROWS groups, as the flip kernel does,
    X_MASK: with its packed zero mask); the others each take a tile of the merged weight
    (:func:`_merge_flip_tile`, tiles in column-major order).  WRITE_NEXT_CALL: program 0 also
    stores the call index + 1."""
    store_next_call(call_ptr, next_call_ptr, WRITE_NEXT_CALL)
    pid = tl.program_id(0).to(tl.int64)
    if pid < programs_x:
        if WITH_X:
            _flip_block(
                pid, x_ptr, x_out_ptr, x_ptr, x_mask_ptr, n_x, x_table_ptr, call_ptr, x_k0,
                x_k1, x_threshold, True, 0, X_MASK, X_FLIPS, X_ZERO, ELEM_BITS, N_EXP, N_FRAC,
                G, X_ROWS, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, SINGLES,
            )  # fmt: skip
    else:
        tile = pid - programs_x
        tiles_m = tl.cdiv(M, BM)
        _merge_flip_tile(
            tile % tiles_m, tile // tiles_m, w_ptr, l_ptr, r_ptr, out_ptr, mask_ptr, ls_ptr,
            rs_ptr, M, N, RANK, scale, l_s0, l_s1, r_s0, r_s1, table_ptr, call_ptr, k0, k1,
            threshold, HAS_FLIPS, HAS_ZERO, WANT_MASK, WRITE_FACTORS, ELEM_BITS, N_EXP, N_FRAC,
            G, N_E, N_F, STEPS_E, STEPS_F, N_ROUNDS, BM, BN, RP, DOT_PRECISION, MERGE_SINGLES,
        )  # fmt: skip


@triton.jit
def _zeroed_correction_dense(
    ro,
    rk,
    zeroed,
    g_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    da_ptr,
    db_ptr,
    T,
    OUT,
    IN,
    RANK,
    scale,
    PRECISION: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    RP: tl.constexpr,
):
    """On the (BO, BK) tile of rows ``ro`` and columns ``rk`` (int64) with its mask ``zeroed``:
    Z = scale * zeroed * (g^T x) as one dense product over all T rows; da[:, k] -= B[o]^T Z,
    db[o, :] -= Z A[:, k]^T (float32 atomics)."""
    acc = tl.zeros((BO, BK), tl.float32)
    rt = tl.arange(0, BT).to(tl.int64)
    for t0 in range(0, T, BT):
        t = t0 + rt
        gt = tl.load(
            g_ptr + t[:, None] * OUT + ro[None, :],
            mask=(t[:, None] < T) & (ro[None, :] < OUT),
            other=0.0,
        )
        xt = tl.load(
            x_ptr + t[:, None] * IN + rk[None, :],
            mask=(t[:, None] < T) & (rk[None, :] < IN),
            other=0.0,
        )
        acc = tl.dot(tl.trans(gt), xt, acc, input_precision=PRECISION)
    z = tl.where(zeroed, acc, 0.0) * scale
    rr = tl.arange(0, RP)
    a = tl.load(
        a_ptr + rr[:, None] * IN + rk[None, :],
        mask=(rr[:, None] < RANK) & (rk[None, :] < IN),
        other=0.0,
    ).to(tl.float32)
    b = tl.load(
        b_ptr + ro[:, None] * RANK + rr[None, :],
        mask=(ro[:, None] < OUT) & (rr[None, :] < RANK),
        other=0.0,
    ).to(tl.float32)
    db = tl.dot(z, tl.trans(a), input_precision="ieee")  # (BO, RP)
    da = tl.dot(tl.trans(b), z, input_precision="ieee")  # (RP, BK)
    tl.atomic_add(
        db_ptr + ro[:, None] * RANK + rr[None, :],
        -db,
        mask=(ro[:, None] < OUT) & (rr[None, :] < RANK),
    )
    tl.atomic_add(
        da_ptr + rr[:, None] * IN + rk[None, :],
        -da,
        mask=(rr[:, None] < RANK) & (rk[None, :] < IN),
    )


@triton.jit
def _zeroed_correction_one(
    o,
    k,
    g_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    da_ptr,
    db_ptr,
    T,
    OUT,
    IN,
    RANK,
    scale,
    BTS: tl.constexpr,
    RP: tl.constexpr,
):
    """One zeroed weight (o, k): z = scale * sum_t g[t, o] * x[t, k] (float32, BTS rows per
    step); db[o, :] -= z * A[:, k], da[:, k] -= z * B[o, :] (float32 atomics)."""
    rt = tl.arange(0, BTS).to(tl.int64)
    part = tl.zeros((BTS,), tl.float32)
    for t0 in range(0, T, BTS):
        t = t0 + rt
        gv = tl.load(g_ptr + t * OUT + o, mask=t < T, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + t * IN + k, mask=t < T, other=0.0).to(tl.float32)
        part += gv * xv
    z = tl.sum(part, axis=0) * scale
    rr = tl.arange(0, RP)
    a_k = tl.load(a_ptr + rr * IN + k, mask=rr < RANK, other=0.0).to(tl.float32)
    b_o = tl.load(b_ptr + o * RANK + rr, mask=rr < RANK, other=0.0).to(tl.float32)
    tl.atomic_add(db_ptr + o * RANK + rr, -(z * a_k), mask=rr < RANK)
    tl.atomic_add(da_ptr + rr * IN + k, -(b_o * z), mask=rr < RANK)


@triton.jit
def _zeroed_correction_tile(
    pid_o,
    pid_k,
    mask_ptr,
    g_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    da_ptr,
    db_ptr,
    T,
    OUT,
    IN,
    RANK,
    m_so,
    m_sk,
    scale,
    PRECISION: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    BTS: tl.constexpr,
    RP: tl.constexpr,
    SINGLES: tl.constexpr,
):
    """The correction on the (BO, BK) tile (pid_o, pid_k) of the zeroed mask.  A tile with no
    zeroed weight only reads its mask; one with at most SINGLES of them takes each alone
    (:func:`_zeroed_correction_one`: two columns of T values, not a (BO, BK) product over
    all T rows); more, and the tile forms the dense product (:func:`_zeroed_correction_dense`)."""
    ro = pid_o * BO + tl.arange(0, BO).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK).to(tl.int64)
    inb = (ro[:, None] < OUT) & (rk[None, :] < IN)
    zeroed = tl.load(mask_ptr + ro[:, None] * m_so + rk[None, :] * m_sk, mask=inb, other=0) != 0
    n = tl.sum(zeroed.to(tl.int32))
    if n > 0:
        if n <= SINGLES:
            flat = tl.arange(0, BO)[:, None] * BK + tl.arange(0, BK)[None, :]
            while tl.max(zeroed.to(tl.int32)) > 0:
                i = tl.min(tl.where(zeroed, flat, BO * BK))  # the next zeroed weight
                zeroed = zeroed & (flat != i)
                o = (pid_o * BO + i // BK).to(tl.int64)
                k = (pid_k * BK + i % BK).to(tl.int64)
                _zeroed_correction_one(
                    o, k, g_ptr, x_ptr, a_ptr, b_ptr, da_ptr, db_ptr, T, OUT, IN, RANK, scale,
                    BTS, RP,
                )  # fmt: skip
        else:
            _zeroed_correction_dense(
                ro, rk, zeroed, g_ptr, x_ptr, a_ptr, b_ptr, da_ptr, db_ptr, T, OUT, IN, RANK,
                scale, PRECISION, BO, BK, BT, RP,
            )  # fmt: skip


@triton.jit(do_not_specialize=["programs_gx"])
def _zeroed_correction_kernel(
    mask_ptr,
    g_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    da_ptr,
    db_ptr,
    T,
    OUT,
    IN,
    RANK,
    m_so,
    m_sk,
    scale,
    gx_ptr,
    gx_mask_ptr,
    n_gx,
    programs_gx,
    WITH_GX: tl.constexpr,
    G_X: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    BTS: tl.constexpr,
    RP: tl.constexpr,
    SINGLES: tl.constexpr,
):
    """A LoRA layer's backward corrections in one launch (1-D grid): with WITH_GX the first
    ``programs_gx`` programs set the input gradient to 0 where x's packed zero mask has a bit
    set (groups of G_X, MASK_ROWS groups per program); the others each take a tile of
    :func:`_zeroed_correction_tile` (tiles in column-major order)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < programs_gx:
        if WITH_GX:
            _zero_by_mask_block(pid, gx_ptr, gx_mask_ptr, n_gx, G_X, MASK_ROWS)
    else:
        tile = pid - programs_gx
        tiles_o = tl.cdiv(OUT, BO)
        _zeroed_correction_tile(
            tile % tiles_o, tile // tiles_o, mask_ptr, g_ptr, x_ptr, a_ptr, b_ptr, da_ptr,
            db_ptr, T, OUT, IN, RANK, m_so, m_sk, scale, PRECISION, BO, BK, BT, BTS, RP,
            SINGLES,
        )  # fmt: skip


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


# tuned on the H200 (benchmarks/tuning/tune_lora_kernels.py merge, docs/benchmarks.md; 2 warps:
# 7-9 % faster than 4 for the W-only and forward launches in benchmarks/tuning/ncu_kernels.py)
MERGE_BM, MERGE_BN, MERGE_WARPS = 16, 64, 2
MERGE_PRECISION = "ieee"  # of the rank-r product B @ A in the merge
MERGE_SINGLES = 4  # a tile with at most this many groups holding a flip takes them singly
MERGE_X_ROWS = ROWS_PER_PROGRAM  # groups of x per program when the merge launch flips x too
# the correction (tuned on the H200, tune_lora_kernels.py correction): (BO, BK) tiles of the
# zeroed mask per program; a tile with at most CORRECTION_SINGLES zeroed weights takes them
# singly (BTS rows per step), more and it forms the dense product (BT rows per step)
CORRECTION_BO, CORRECTION_BK, CORRECTION_BT, CORRECTION_WARPS = 64, 64, 32, 4
CORRECTION_SINGLES, CORRECTION_BTS = 4, 1024


def merge_flip(
    w: torch.Tensor,
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    table: torch.Tensor,
    call: torch.Tensor,
    k0: int,
    k1: int,
    threshold: float | None,
    has_flips: bool,
    want_mask: bool,
    next_call: torch.Tensor | None = None,
):
    """(flip(W + scale * lhs @ rhs) in ``out_dtype``, uint8 zeroed mask or None); W contiguous
    (M, N) with N a multiple of the group size of ``out_dtype``; lhs (M, r), rhs (r, N) of any
    strides.  ``next_call``: a 0-dim int64 tensor on W's device that receives ``call + 1``."""
    out, mask, _, _ = merge_flip_with_x(
        w, lhs, rhs, scale, out_dtype, table, call, k0, k1, threshold, has_flips, want_mask,
        next_call,
    )  # fmt: skip
    return out, mask


def merge_flip_with_x(
    w, lhs, rhs, scale, out_dtype, table, call, k0, k1, threshold, has_flips, want_mask,
    next_call=None, x=None, x_table=None, x_key=(0, 0), x_threshold=None, x_flips=False,
    want_x_mask=False, factors=None,
):  # fmt: skip
    """:func:`merge_flip` and, in the same launch, the flip of a layer's input ``x``
    (contiguous, dtype ``out_dtype``; its own table, stream key, threshold and flips switch):
    returns (W flipped, W's zeroed mask or None, x flipped or None, x's packed zero mask or
    None).  x's mask is written when ``want_x_mask`` and x has a threshold.  ``factors``:
    None, or two contiguous tensors (M, r) and (r, N) that receive ``scale * lhs`` and
    ``scale * rhs`` rounded to their dtype."""
    m, n = w.shape
    rank = lhs.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=w.device)
    mask = (
        torch.empty((m, n), dtype=torch.uint8, device=w.device)
        if want_mask and threshold is not None
        else None
    )
    x_out = x_mask = None
    x_part, programs_x = None, 0
    if x is not None:
        want_x_mask = want_x_mask and x_threshold is not None
        x_part = (want_x_mask, flips_mode(x_table, x_flips), x_threshold is not None)
        x_out = torch.empty_like(x)
        if want_x_mask:
            size = zero_mask_size(x.numel(), x.dtype)
            x_mask = torch.empty(size, dtype=torch.uint8, device=x.device)
        programs_x = ceil_div(x.numel(), MERGE_X_ROWS * group_size(x.dtype))
    programs = programs_x + ceil_div(m, MERGE_BM) * ceil_div(n, MERGE_BN)
    if programs == 0:
        write_next_call(call, next_call)
        return out, mask, x_out, x_mask
    config = _merge_config(
        out_dtype, flips_mode(table, has_flips), threshold is not None, mask is not None,
        next_call is not None, rank, x_part, factors is not None,
    )  # fmt: skip
    x_args = (
        (x, x_out, x if x_mask is None else x_mask, x.numel(), x_table)
        + stream_args(x_key, x_threshold)
        if x is not None
        else (w, w, w, 0, table, 0, 0, 0.0)
    )
    _launch_merge_flip(
        (programs,),
        (
            w,
            lhs,
            rhs,
            out,
            mask if mask is not None else out,
            *(factors if factors is not None else (out, out)),
            m,
            n,
            rank,
            float(scale),
            lhs.stride(0),
            lhs.stride(1),
            rhs.stride(0),
            rhs.stride(1),
        )
        + flip_args(table, call, next_call, k0, k1, threshold)
        + x_args
        + (programs_x,),
        config,
    )
    return out, mask, x_out, x_mask


_launch_merge_flip = KernelLauncher(_merge_flip_kernel)
_launch_zeroed_correction = KernelLauncher(_zeroed_correction_kernel)


@functools.cache
def _merge_config(
    out_dtype, has_flips, has_zero, want_mask, writes_next_call, rank, x_part=None, factors=False
) -> dict:
    """The merge kernel's constexpr arguments and launch options (one dict per setting);
    ``x_part``: None, or (x mask, x flips, x zero-out) when the launch flips x too;
    ``factors``: whether it writes the scaled factors."""
    x_mask, x_flips, x_zero = x_part or (False, False, False)
    return dict(
        WANT_MASK=want_mask,
        WRITE_FACTORS=factors,
        WRITE_NEXT_CALL=writes_next_call,
        WITH_X=x_part is not None,
        X_MASK=x_mask,
        X_FLIPS=x_flips,
        X_ZERO=x_zero,
        X_ROWS=MERGE_X_ROWS,
        SINGLES=SINGLE_GROUPS,
        BM=MERGE_BM,
        BN=MERGE_BN,
        RP=_rank_pad(rank),
        DOT_PRECISION=MERGE_PRECISION,
        MERGE_SINGLES=MERGE_SINGLES,
        num_warps=MERGE_WARPS,
        **flip_constexprs(out_dtype, has_flips, has_zero),
    )


@functools.cache
def _correction_config(fp32: bool, rank: int, g_x) -> dict:
    """The correction kernel's constexpr arguments; ``g_x``: the group size of the input
    gradient's packed zero mask when the launch masks it too, else None."""
    return dict(
        WITH_GX=g_x is not None,
        G_X=g_x or 1,
        MASK_ROWS=MASK_ROWS_PER_PROGRAM,
        PRECISION="ieee" if fp32 else "tf32",
        BO=CORRECTION_BO,
        BK=CORRECTION_BK,
        BT=CORRECTION_BT,
        BTS=CORRECTION_BTS,
        RP=_rank_pad(rank),
        SINGLES=CORRECTION_SINGLES,
        num_warps=CORRECTION_WARPS,
    )


def subtract_zeroed_correction_(
    da, db, mask_ok, g, x, a, b, grad_x=None, x_mask=None, x_group=1, scale=1.0
) -> None:
    """``da -= B^T Z`` and ``db -= Z A^T`` in place (float32, contiguous: da (r, IN), db
    (OUT, r)) for Z = scale * mask_ok * (g^T x): ``mask_ok`` (OUT, IN) view of the uint8 zeroed mask
    (any strides, or None: no correction), g (T, OUT), x (T, IN) contiguous, A (r, IN),
    B (OUT, r).  In the same launch, ``grad_x`` (contiguous) is set to 0 where the packed zero
    mask ``x_mask`` (groups of ``x_group`` elements) has a bit set, when both are given."""
    t, n_out = g.shape
    n_in = x.shape[1]
    rank = a.shape[0]
    with_gx = grad_x is not None and x_mask is not None
    programs_gx = 0
    if with_gx:
        programs_gx = ceil_div(ceil_div(grad_x.numel(), x_group), MASK_ROWS_PER_PROGRAM)
    if mask_ok is None:
        mask_ok, tiles = g, 0  # no tile: not read
    else:
        tiles = ceil_div(n_out, CORRECTION_BO) * ceil_div(n_in, CORRECTION_BK)
    if programs_gx + tiles == 0:
        return
    _launch_zeroed_correction(
        (programs_gx + tiles,),
        (
            mask_ok, g, x, a.contiguous(), b.contiguous(), da, db, t, n_out, n_in, rank,
            mask_ok.stride(0), mask_ok.stride(1), float(scale),
            grad_x if with_gx else g, x_mask if with_gx else g, grad_x.numel() if with_gx else 0,
            programs_gx,
        ),
        _correction_config(g.dtype == torch.float32, rank, x_group if with_gx else None),
    )  # fmt: skip
