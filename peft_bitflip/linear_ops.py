"""The tensor math of a flipped linear layer, shared by its eager autograd Functions
(:mod:`peft_bitflip.flipped_linear`) and the ops that carry it through ``torch.compile``
(:mod:`peft_bitflip.compiled_linear`): the plain matmul, the LoRA forward, and the gradients
computed from what a forward kept.  No modules, no autograd Functions here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .functional import apply_flip_spec_masked, flip_spec_grad_, zero_masked_
from .kernels.lora import (
    merge_flip_lora,
    merge_flip_lora_and_x,
    merge_flip_lora_for_grads,
    merged_lora_weight,
    mm_float32,
    subtract_zeroed_correction_,
)

__all__ = ["linear", "linear_grads", "lora_forward", "lora_grads"]


def linear(x, weight, bias, conv1d=False):
    """``x @ weight^T + bias``, or ``x @ weight + bias`` for Conv1D's (in, out) weight layout."""
    if conv1d:
        out = x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.size(-1)), weight)
        return out.view(*x.shape[:-1], weight.size(-1))
    return F.linear(x, weight, bias)


def _autocast_dtype(x: torch.Tensor):
    """The autocast dtype a matmul on ``x`` runs in, or None (autocast off or not a float)."""
    device = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _built_weight(build, compute, device_type):
    """``build()`` under the autocast state of the forward, cast to its compute dtype."""
    ctx = (
        torch.autocast(device_type, dtype=compute)
        if compute is not None
        else contextlib.nullcontext()
    )
    with ctx:
        weight = build()
    return weight if compute is None else weight.to(compute)


def linear_grads(
    g2, kept, x_mask, weight, call, x_shape, x_dtype, x_spec, w_spec, x_key, w_key, conv1d,
    recompute, need_x, need_w, x_lanes=None, w_stuck=None,
):  # fmt: skip
    """(dX, dW) of ``flip(x) @ flip(W)^T`` (None where not wanted) from what the forward kept.

    ``g2``: dY as (tokens, out); ``kept``: flip(x), or x itself when ``recompute`` (then
    flip(x) and x's zero-out are recomputed in one pass over x); ``x_mask``: x's packed zero
    mask (when not ``recompute``); ``weight``: W (detached), flipped again here with its zero
    mask.  Straight-through, zero where the forward zeroed x or W.  Shared by the eager
    autograd Function and the op that carries the layer through ``torch.compile``.
    ``x_lanes``: the stuck input lanes the forward forced before flipping x (the kept x of
    ``recompute`` is x before them; see :func:`~peft_bitflip.functional.apply_flip_specs`);
    ``w_stuck``: W's listed stuck bits, forced again before W is flipped again."""
    grad_x = grad_w = w_mask = None
    if need_x:  # flip(W) again; its zero mask too if dW will need it
        wf, w_mask = apply_flip_spec_masked(weight, w_spec, w_key, call, need_w, stuck=w_stuck)
        grad_x = (g2 @ (wf.t() if conv1d else wf)).view(x_shape)
        del wf
    xf = kept
    if recompute:  # one pass over x: zero grad_x where the forward zeroed, flip(x) if needed
        xf = flip_spec_grad_(grad_x, kept, x_spec, x_key, call, need_w, x_lanes)
    if need_w:
        xf = xf.reshape(-1, xf.size(-1))
        grad_w = xf.t() @ g2 if conv1d else g2.t() @ xf
        if not need_x:  # one read of W finds the zeroed weights
            flip_spec_grad_(grad_w, weight, w_spec, w_key, call, stuck=w_stuck)
    if need_x:  # zero dX and dW where the forward zeroed x and W: one launch
        more = (grad_w, w_mask, weight.dtype) if w_mask is not None else ()
        zero_masked_(grad_x, x_mask, x_dtype, *more)
    return grad_x, grad_w


def lora_forward(
    x, weight, lora_a, lora_b, bias, x_spec, w_spec, x_key, w_key, call, conv1d, scale,
    out_dtype, need_x, need_factors, stats=None, next_call=None,
):  # fmt: skip
    """(``flip(x) @ flip(W + s B@A)^T + b``, flip(x) if ``need_factors`` else None, x's packed
    zero mask if ``need_x`` and x has a threshold, else None): the forward of the fused LoRA
    layer, shared by the eager autograd Function and the op that carries it through
    ``torch.compile``.  The merge kernel advances the counter when x has no flip kernel."""
    pair = merge_flip_lora_and_x(
        weight, lora_a, lora_b, scale, conv1d, out_dtype, w_spec, w_key, x, x_spec, x_key, call,
        need_x, next_call,
    )  # fmt: skip
    if pair is not None:  # one launch
        wf, xf, x_mask = pair
    else:
        w_next, x_next = (next_call, None) if x_spec.is_identity else (None, next_call)
        wf, _ = merge_flip_lora(
            weight, lora_a, lora_b, scale, conv1d, out_dtype, w_spec, w_key, call, False, w_next
        )
        xf, x_mask = apply_flip_spec_masked(x, x_spec, x_key, call, need_x, x_next)
    out = linear(xf, wf, bias, conv1d)
    if stats is not None:
        merged = merged_lora_weight(weight, lora_a, lora_b, scale, conv1d).to(out_dtype)
        stats.record("x", x, xf, x_spec, x_key, call)
        stats.record("w", merged, wf, w_spec, w_key, call)
        stats.record_output(out)
    return out, (xf if need_factors else None), x_mask


def lora_grads(
    g2, xf, x_mask, weight, lora_a, lora_b, call, x_shape, x_dtype, w_spec, w_key, conv1d,
    scale, out_dtype, need_x, need_w, need_a, need_b,
):  # fmt: skip
    """(dX, dW, dA, dB) of :func:`lora_forward` (None where not wanted) from what it kept:
    ``g2`` dY as (tokens, out), ``xf`` flip(x), ``x_mask`` x's zero mask.  The merged weight
    is merged and flipped again (with its zero mask when a factor needs a gradient); dA and dB
    come from rank-r products plus a correction at the zeroed weights, unless W trains too."""
    need_factors = need_w or need_a or need_b
    rank_r = need_factors and not need_w  # dA, dB from rank-r products
    a_s = b_s = None
    if rank_r:  # with the scaled factors s*A, s*B in the compute dtype, from the same launch
        wf, zeroed, a_s, b_s = merge_flip_lora_for_grads(
            weight, lora_a, lora_b, scale, conv1d, out_dtype, w_spec, w_key, call
        )
    else:
        wf, zeroed = merge_flip_lora(
            weight, lora_a, lora_b, scale, conv1d, out_dtype, w_spec, w_key, call, need_factors
        )
    grad_x = grad_w = grad_a = grad_b = None
    if need_x:
        grad_x = (g2 @ (wf.t() if conv1d else wf)).view(x_shape)
    del wf
    if not rank_r and grad_x is not None:
        zero_masked_(grad_x, x_mask, x_dtype)
    if not need_factors:
        return grad_x, grad_w, grad_a, grad_b
    xf = xf.reshape(-1, xf.size(-1))
    zeroed_oi = None if zeroed is None else (zeroed.t() if conv1d else zeroed)
    if need_w:  # the base weight trains too: the full product is needed anyway
        dm = (g2.t() @ xf).float()
        if zeroed_oi is not None:
            dm = dm.masked_fill(zeroed_oi.bool(), 0.0)
        grad_w = (dm.t() if conv1d else dm).to(weight.dtype)
        da = (lora_b.float().t() @ dm).mul_(scale)
        db = (dm @ lora_a.float().t()).mul_(scale)
    else:  # rank-r products, corrected where the zero-out removed a weight (with dX's mask)
        da = mm_float32((g2 @ b_s).t(), xf)
        db = mm_float32(g2.t(), xf @ a_s.t())
        subtract_zeroed_correction_(
            da, db, zeroed_oi, g2, xf, lora_a, lora_b, grad_x, x_mask, x_dtype, scale
        )
    grad_a = da.to(lora_a.dtype) if need_a else None
    grad_b = db.to(lora_b.dtype) if need_b else None
    return grad_x, grad_w, grad_a, grad_b
