"""LoRA weight merge with flips, and the LoRA-gradient correction at zeroed weights.

Dispatch between the Triton kernels (:mod:`.triton_lora`) and PyTorch references that define
the same arithmetic:

* :func:`merge_lora_weight`: ``W + s * B @ A`` (``(B @ A)^T`` for a Conv1D weight), formed as
  ``round_to_W_dtype(float32(W) + float32(B) @ float32(A) * s)``.
* :func:`merge_flip_lora`: the flip of that merged weight (cast to the compute dtype) with a
  FlipSpec, and optionally a uint8 mask of the elements the zero-out removed.
* :func:`merge_flip_lora_and_x`: the same and the flip of the layer's input in one launch;
  :func:`merge_flip_lora_for_grads`: the same with the scaled factors for the gradients.
* :func:`subtract_zeroed_correction_`: ``dA -= B^T Z``, ``dB -= Z A^T`` for
  ``Z = zeroed * (dY^T X)``, and the input gradient's zero mask, in one launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import FlipSpec, require_group_rates
from .op import (
    backend_for,
    bitflip_backward_impl,
    bitflip_impl,
    kernel_next_call,
    zero_by_masks_impl,
)
from .sampling import flip_table, group_size, write_next_call

_KERNELS = None


def lora_kernels():
    """The Triton module :mod:`.triton_lora`, imported on first use and then kept (as
    :func:`.op.kernels`: a function-level import costs host time on every call)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_lora

        _KERNELS = triton_lora
    return _KERNELS


def merge_lora_weight(w: Tensor, a: Tensor, b: Tensor, scale: float, conv1d: bool) -> Tensor:
    """``W + scale * B @ A`` in float32, rounded to ``W``'s dtype (reference arithmetic)."""
    delta = (b.float() @ a.float()) * scale
    return (w.float() + (delta.t() if conv1d else delta)).to(w.dtype)


_NO_FLIPS = FlipSpec(0.0, 0.0, None)


def merged_lora_weight(w: Tensor, a: Tensor, b: Tensor, scale: float, conv1d: bool) -> Tensor:
    """:func:`merge_lora_weight` computed as the fast layer path computes it before flipping:
    by the merge kernel on the GPU (whose float32 sums may differ from cuBLAS's in the last
    bit), by the reference elsewhere.  ``merge()`` uses this, so a merged layer reproduces the
    adapter layer bit for bit."""
    call = torch.zeros((), dtype=torch.int64, device=w.device)
    return merge_flip_lora(w, a, b, scale, conv1d, w.dtype, _NO_FLIPS, (0, 0), call)[0]


def _use_triton(w: Tensor, out_dtype) -> bool:
    return (
        backend_for(w.device) == "triton"
        and w.is_contiguous()
        and w.dim() == 2
        and w.shape[1] % group_size(out_dtype) == 0
    )


def merge_flip_lora(
    w: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    conv1d: bool,
    out_dtype: torch.dtype,
    spec: FlipSpec,
    key: tuple[int, int],
    call: Tensor,
    want_mask: bool = False,
    next_call: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(``flip(merge_lora_weight(...).to(out_dtype))``, zeroed mask or None) in one pass on
    the GPU.  The mask (uint8, W's layout, 1 = zeroed) is returned when ``want_mask`` and the
    spec has a threshold.  ``next_call``: an optional 0-dim int64 tensor that receives
    ``call + 1`` (written by the merge kernel on the GPU)."""
    return _merge_flip_lora(
        w, a, b, scale, conv1d, out_dtype, spec, key, call, want_mask, next_call, False
    )[:2]


def merge_flip_lora_for_grads(
    w: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    conv1d: bool,
    out_dtype: torch.dtype,
    spec: FlipSpec,
    key: tuple[int, int],
    call: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """:func:`merge_flip_lora` with the mask, and the scaled factors the LoRA gradients
    multiply with: ``(scale * A).to(out_dtype)`` and ``(scale * B).to(out_dtype)`` (products in
    float32, rounded once), written by the same launch on the GPU."""
    return _merge_flip_lora(w, a, b, scale, conv1d, out_dtype, spec, key, call, True, None, True)


def _merge_flip_lora(w, a, b, scale, conv1d, out_dtype, spec, key, call, want_mask, next_call,
                     want_factors):  # fmt: skip
    require_group_rates("the fused LoRA merge-and-flip", spec)
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, out_dtype, w.device)
    threshold = spec.zero_out_threshold
    want_mask = want_mask and threshold is not None
    if _use_triton(w, out_dtype):
        lhs, rhs = (a.t(), b.t()) if conv1d else (b, a)
        factors = None
        if want_factors:  # scale * lhs, scale * rhs
            factors = (
                torch.empty(lhs.shape, dtype=out_dtype, device=w.device),
                torch.empty(rhs.shape, dtype=out_dtype, device=w.device),
            )
        wf, mask, _, _ = lora_kernels().merge_flip_with_x(
            w, lhs, rhs, scale, out_dtype, table, call, *key, threshold, spec.flips, want_mask,
            kernel_next_call(call, next_call, w.device), factors=factors,
        )  # fmt: skip
        if factors is None:
            return wf, mask, None, None
        ls, rs = factors
        return (wf, mask, ls.t(), rs.t()) if conv1d else (wf, mask, rs, ls)
    write_next_call(call, next_call)
    merged = merge_lora_weight(w, a, b, scale, conv1d).to(out_dtype)
    a_s = b_s = None
    if want_factors:
        a_s, b_s = (a.float() * scale).to(out_dtype), (b.float() * scale).to(out_dtype)
    if spec.is_identity:
        return merged, None, a_s, b_s
    wf = bitflip_impl(merged, table, call, key[0], key[1], threshold, spec.flips)
    mask = None
    if want_mask:
        ones = torch.ones_like(merged)
        kept = bitflip_backward_impl(ones, merged, table, call, *key, threshold, spec.flips)
        mask = (kept == 0).to(torch.uint8)
    return wf, mask, a_s, b_s


def merge_flip_lora_and_x(
    w: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    conv1d: bool,
    out_dtype: torch.dtype,
    w_spec: FlipSpec,
    w_key: tuple[int, int],
    x: Tensor,
    x_spec: FlipSpec,
    x_key: tuple[int, int],
    call: Tensor,
    want_x_mask: bool,
    next_call: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(:func:`merge_flip_lora`'s flipped weight, ``flip(x)`` with ``x_spec``, x's packed zero
    mask or None) from one kernel launch: a LoRA layer's forward.  The mask is returned when
    ``want_x_mask`` and ``x_spec`` has a threshold.  None when that launch cannot take x
    (not on the GPU, x's dtype is not ``out_dtype``, devices differ, or x's spec is the
    identity): the caller then flips x separately.  ``next_call``: as in
    :func:`merge_flip_lora`."""
    require_group_rates("the fused LoRA merge-and-flip", w_spec, x_spec)
    if (
        x_spec.is_identity
        or x.dtype != out_dtype
        or x.device != w.device
        or not _use_triton(w, out_dtype)
    ):
        return None
    lhs, rhs = (a.t(), b.t()) if conv1d else (b, a)
    w_table = flip_table(w_spec.effective_p_exp, w_spec.effective_p_frac, out_dtype, w.device)
    x_table = flip_table(x_spec.effective_p_exp, x_spec.effective_p_frac, x.dtype, x.device)
    wf, _, xf, x_mask = lora_kernels().merge_flip_with_x(
        w, lhs, rhs, scale, out_dtype, w_table, call, *w_key, w_spec.zero_out_threshold,
        w_spec.flips, False, kernel_next_call(call, next_call, w.device), x.contiguous(),
        x_table, x_key, x_spec.zero_out_threshold, x_spec.flips, want_x_mask,
    )  # fmt: skip
    return wf, xf, x_mask


_MM_OUT_DTYPE = {}  # input dtype -> whether torch.mm(..., out_dtype=float32) works on CUDA


def mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as float32.  For 16-bit CUDA inputs the product is written in float32 by the
    matmul itself (``torch.mm(..., out_dtype=)``, where this PyTorch has it for that dtype: no
    rounding to 16 bits and no cast launch); otherwise ``(a @ b).float()``."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        works = _MM_OUT_DTYPE.get(a.dtype)
        if works is None:  # first product of this dtype: try it once
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE[a.dtype] = True
                return out
            except (TypeError, RuntimeError, NotImplementedError):
                works = _MM_OUT_DTYPE[a.dtype] = False
        if works:
            return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def subtract_zeroed_correction_(
    da: Tensor,
    db: Tensor,
    zeroed: Tensor | None,
    g: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    grad_x: Tensor | None = None,
    x_mask: Tensor | None = None,
    x_dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> None:
    """In place: ``da -= B^T Z`` and ``db -= Z A^T`` for ``Z = scale * zeroed * (g^T x)`` (the LoRA
    gradients' correction at the weights the zero-out removed), and ``grad_x`` set to 0 where
    x's packed zero mask ``x_mask`` (of a tensor of ``x_dtype``) has a bit set.

    ``da`` (r, IN) and ``db`` (OUT, r): float32, contiguous; ``zeroed``: (OUT, IN) uint8 (any
    strides) or None (no correction); g: (T, OUT), x: (T, IN), A: (r, IN), B: (OUT, r);
    ``grad_x`` contiguous or None.  On the GPU one launch does both, and only tiles of
    ``zeroed`` that hold a 1 do work (a zeroed weight is rare), their sums through float32
    atomics; with deterministic algorithms enabled, and on the CPU, the dense product is
    formed instead.
    """
    want_gx = grad_x is not None and x_mask is not None
    if (
        backend_for(x.device) == "triton"
        and not torch.are_deterministic_algorithms_enabled()
        and g.is_contiguous()
        and x.is_contiguous()
    ):
        group = group_size(x_dtype) if want_gx else 1
        lora_kernels().subtract_zeroed_correction_(
            da, db, zeroed, g, x, a, b, grad_x, x_mask, group, scale
        )
        return
    if zeroed is not None:
        z = zeroed.float() * (g.float().t() @ x.float()) * scale
        da.sub_(b.float().t() @ z)
        db.sub_(z @ a.float().t())
    if want_gx:
        zero_by_masks_impl([grad_x], [x_mask], [group_size(x_dtype)])
