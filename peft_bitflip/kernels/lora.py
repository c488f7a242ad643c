"""LoRA weight merge with flips, and the LoRA-gradient correction at zeroed weights.

Dispatch between the Triton kernels (:mod:`.triton_lora`) and PyTorch references that define
the same arithmetic:

* :func:`merge_lora_weight`: ``W + s * B @ A`` (``(B @ A)^T`` for a Conv1D weight), formed as
  ``round_to_W_dtype(float32(W) + float32(B) @ float32(A) * s)``.
* :func:`merge_flip_lora`: the flip of that merged weight (cast to the compute dtype) with a
  FlipSpec, and optionally a uint8 mask of the elements the zero-out removed.
* :func:`zeroed_correction`: ``(B^T Z, Z A^T)`` for ``Z = zeroed * (dY^T X)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import FlipSpec
from .op import backend_for, bitflip_backward_impl, bitflip_impl, kernel_next_call
from .sampling import flip_table, group_size, write_next_call


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
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, out_dtype, w.device)
    threshold = spec.zero_out_threshold
    want_mask = want_mask and threshold is not None
    if _use_triton(w, out_dtype):
        from . import triton_lora

        lhs, rhs = (a.t(), b.t()) if conv1d else (b, a)
        return triton_lora.merge_flip(
            w, lhs, rhs, scale, out_dtype, table, call, *key, threshold, spec.flips, want_mask,
            kernel_next_call(call, next_call, w.device),
        )  # fmt: skip
    write_next_call(call, next_call)
    merged = merge_lora_weight(w, a, b, scale, conv1d).to(out_dtype)
    if spec.is_identity:
        return merged, None
    wf = bitflip_impl(merged, table, call, key[0], key[1], threshold, spec.flips)
    mask = None
    if want_mask:
        ones = torch.ones_like(merged)
        kept = bitflip_backward_impl(ones, merged, table, call, *key, threshold, spec.flips)
        mask = (kept == 0).to(torch.uint8)
    return wf, mask


def zeroed_correction(zeroed: Tensor, g: Tensor, x: Tensor, a: Tensor, b: Tensor):
    """``(B^T Z, Z A^T)`` in float32 for ``Z = zeroed * (g^T x)``.

    ``zeroed``: (OUT, IN) uint8 (any strides), g: (T, OUT), x: (T, IN), A: (r, IN), B: (OUT, r).
    On the GPU only tiles of ``zeroed`` that hold a 1 do work (a zeroed weight is rare), and
    the sums go through float32 atomics; with deterministic algorithms enabled, and on the CPU,
    the dense product is formed instead.
    """
    if (
        backend_for(x.device) == "triton"
        and not torch.are_deterministic_algorithms_enabled()
        and g.is_contiguous()
        and x.is_contiguous()
    ):
        from . import triton_lora

        return triton_lora.zeroed_correction(zeroed, g, x, a, b)
    z = zeroed.float() * (g.float().t() @ x.float())
    return b.float().t() @ z, z @ a.float().t()
