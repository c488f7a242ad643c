"""Triton kernels for bit-flip LoRA layers.

* ``merge_flip``: ``flip(W + s * L @ R)`` reading ``W`` once — the LoRA product of a tile is
  formed in registers (float32, IEEE), added to ``W`` in float32, rounded to ``W``'s dtype and
  then to the output dtype and stored; the stored tile is then flipped and zeroed again in
  slices of 64 groups with the shared fault model
  (:func:`~peft_bitflip.kernels.triton_bitflip.flip_and_zero`); optionally writes a uint8 mask
  of the zeroed elements.  ``L @ R`` is ``B @ A`` for an ``nn.Linear`` weight
  ``(out, in)`` and ``A^T @ B^T`` for a Conv1D weight ``(in, out)`` (strides say which).
* ``zeroed_correction``: for LoRA gradients.  Where the weight flip zeroed an element
  ``(o, k)``, the product ``Z[o, k] = sum_t dY[t, o] * X[t, k]`` is formed (only tiles holding
  such an element do any work) and ``Z @ A^T`` / ``B^T @ Z`` are added to float32 buffers.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launcher import KernelLauncher
from .sampling import ceil_div, group_size, write_next_call
from .triton_bitflip import (
    ROWS_PER_PROGRAM,
    flip_and_zero,
    flip_args,
    flip_constexprs,
    store_next_call,
)


@triton.jit(do_not_specialize=["k0", "k1"])
def _merge_flip_kernel(
    w_ptr,
    l_ptr,
    r_ptr,
    out_ptr,
    mask_ptr,
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
    HAS_FLIPS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    WANT_MASK: tl.constexpr,
    WRITE_NEXT_CALL: tl.constexpr,
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
    SUB: tl.constexpr,
    RP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    store_next_call(call_ptr, next_call_ptr, WRITE_NEXT_CALL)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
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
    delta = tl.dot(lt, rt, input_precision=DOT_PRECISION) * scale
    offs = rm[:, None] * N + rn[None, :]
    inb = (rm[:, None] < M) & (rn[None, :] < N)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    merged = (w.to(tl.float32) + delta).to(w_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, merged, mask=inb)
    if HAS_FLIPS or HAS_ZERO:
        # Flip the stored tile again in slices of SUB rows (ROWS_PER_PROGRAM groups): a slice
        # without a flip is settled by one Philox draw per group, and only slices holding a
        # flip run the gap-sampling loop (over the whole tile at once, most tiles would).
        tl.debug_barrier()  # the tile's stores are visible to every thread of the program
        R: tl.constexpr = SUB * BN // G
        cols = tl.arange(0, G)
        for s in range(0, BM // SUB):
            rs = pid_m * BM + s * SUB + tl.arange(0, SUB).to(tl.int64)
            offs_s = tl.reshape(rs[:, None] * N + rn[None, :], (R, G))
            inb_s = tl.reshape((rs[:, None] < M) & (rn[None, :] < N), (R, G))
            v = tl.load(out_ptr + offs_s, mask=inb_s, other=0)
            # groups of G consecutive elements of a row (N % G == 0)
            y, keep = flip_and_zero(
                v, tl.min(offs_s, axis=1) // G, cols, call_ptr, k0, k1, table_ptr, threshold,
                HAS_FLIPS, HAS_ZERO, ELEM_BITS, N_EXP, N_FRAC, N_E, N_F, STEPS_E, STEPS_F,
                N_ROUNDS,
            )  # fmt: skip
            tl.store(out_ptr + offs_s, y, mask=inb_s)
            if WANT_MASK:
                tl.store(mask_ptr + offs_s, (~keep).to(tl.uint8), mask=inb_s)


@triton.jit
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
    PRECISION: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    RP: tl.constexpr,
):
    """Z = mask * (g^T x) on one (BO, BK) tile; da[:, k] += B[o]^T Z, db[o, :] += Z A[:, k]^T
    (float32 atomics)."""
    pid_o = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    ro = pid_o * BO + tl.arange(0, BO).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK).to(tl.int64)
    inb = (ro[:, None] < OUT) & (rk[None, :] < IN)
    zeroed = tl.load(mask_ptr + ro[:, None] * m_so + rk[None, :] * m_sk, mask=inb, other=0) != 0
    if tl.max(zeroed.to(tl.int32)) > 0:
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
        z = tl.where(zeroed, acc, 0.0)
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
            db,
            mask=(ro[:, None] < OUT) & (rr[None, :] < RANK),
        )
        tl.atomic_add(
            da_ptr + rr[:, None] * IN + rk[None, :],
            da,
            mask=(rr[:, None] < RANK) & (rk[None, :] < IN),
        )


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


MERGE_BM, MERGE_BN, MERGE_WARPS = 64, 64, 4
MERGE_PRECISION = "ieee"  # of the rank-r product B @ A in the merge
CORRECTION_BO, CORRECTION_BK, CORRECTION_BT, CORRECTION_WARPS = 64, 64, 32, 4


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
    m, n = w.shape
    if m * n == 0:
        write_next_call(call, next_call)
        next_call = None
    rank = lhs.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=w.device)
    mask = (
        torch.empty((m, n), dtype=torch.uint8, device=w.device)
        if want_mask and threshold is not None
        else None
    )
    grid = (ceil_div(m, MERGE_BM), ceil_div(n, MERGE_BN))
    config = _merge_config(
        out_dtype, has_flips, threshold is not None, mask is not None, next_call is not None, rank
    )
    _launch_merge_flip(
        grid,
        (
            w,
            lhs,
            rhs,
            out,
            mask if mask is not None else out,
            m,
            n,
            rank,
            float(scale),
            lhs.stride(0),
            lhs.stride(1),
            rhs.stride(0),
            rhs.stride(1),
        )
        + flip_args(table, call, next_call, k0, k1, threshold),
        config,
    )
    return out, mask


_launch_merge_flip = KernelLauncher(_merge_flip_kernel)
_launch_zeroed_correction = KernelLauncher(_zeroed_correction_kernel)


@functools.cache
def _merge_config(out_dtype, has_flips, has_zero, want_mask, writes_next_call, rank) -> dict:
    """The merge kernel's constexpr arguments and launch options (one dict per setting)."""
    return dict(
        WANT_MASK=want_mask,
        WRITE_NEXT_CALL=writes_next_call,
        BM=MERGE_BM,
        BN=MERGE_BN,
        SUB=max(1, ROWS_PER_PROGRAM * group_size(out_dtype) // MERGE_BN),
        RP=_rank_pad(rank),
        DOT_PRECISION=MERGE_PRECISION,
        num_warps=MERGE_WARPS,
        **flip_constexprs(out_dtype, has_flips, has_zero),
    )


@functools.cache
def _correction_config(fp32: bool, rank: int) -> dict:
    return dict(
        PRECISION="ieee" if fp32 else "tf32",
        BO=CORRECTION_BO,
        BK=CORRECTION_BK,
        BT=CORRECTION_BT,
        RP=_rank_pad(rank),
        num_warps=CORRECTION_WARPS,
    )


def zeroed_correction(mask_ok: torch.Tensor, g: torch.Tensor, x: torch.Tensor, a, b):
    """(B^T Z, Z A^T) in float32 for Z = mask_ok * (g^T x): ``mask_ok`` (OUT, IN) view of the
    uint8 zeroed mask (any strides), g (T, OUT), x (T, IN) contiguous, A (r, IN), B (OUT, r)."""
    t, n_out = g.shape
    n_in = x.shape[1]
    rank = a.shape[0]
    a = a.contiguous()
    b = b.contiguous()
    da = torch.zeros((rank, n_in), dtype=torch.float32, device=g.device)
    db = torch.zeros((n_out, rank), dtype=torch.float32, device=g.device)
    grid = (ceil_div(n_out, CORRECTION_BO), ceil_div(n_in, CORRECTION_BK))
    _launch_zeroed_correction(
        grid,
        (mask_ok, g, x, a, b, da, db, t, n_out, n_in, rank, mask_ok.stride(0), mask_ok.stride(1)),
        _correction_config(g.dtype == torch.float32, rank),
    )
    return da, db
