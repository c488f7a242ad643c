"""The fused bit-flip linear layer as two ``torch.library`` ops, for ``torch.compile``.

In eager mode a layer runs :class:`~peft_bitflip.flipped_linear._FlippedLinear`, an autograd
Function that keeps ``flip(x)``, x's packed zero mask and ``W`` for backward and flips ``W`` again
there.  Dynamo does not trace into its kernel launches, so these ops carry the same forward
and backward into a compiled graph as two opaque nodes:

* ``peft_bitflip::flipped_linear`` -> ``(y, flip(x) or an empty tensor, x's zero mask or an
  empty tensor)``: the layer's forward (one flip launch for x and W, then the matmul);
* ``peft_bitflip::flipped_linear_backward`` -> ``(dX, dW, db)`` (empty where not wanted): the
  layer's backward (:func:`~peft_bitflip.linear_ops.linear_grads`).

The fused bit-flip LoRA layer (one adapter merged into the weight) has the same pair,
``peft_bitflip::flipped_lora_linear`` / ``flipped_lora_linear_backward`` (the forward and
backward of :class:`~peft_bitflip.flipped_linear._FlippedLoraLinear`).

Compiled graphs thereby keep what the eager layer keeps (no flipped weight per layer, as the
unfused form under compile kept) and run the same kernels, and CUDA graphs capture both.  The
fault settings travel as plain numbers (the probabilities the kernel uses and the threshold),
so a graph guards on them like on any constant.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .kernels.sampling import zero_mask_size
from .linear_ops import linear, linear_grads, lora_forward, lora_grads
from .spec import FlipSpec, require_group_rates

__all__ = ["compiled_flipped_linear", "compiled_flipped_lora_linear"]


@functools.lru_cache(maxsize=1024)
def _spec(p_exp: float, p_frac: float, threshold: float | None) -> FlipSpec:
    return FlipSpec(p_exp, p_frac, threshold)


def _has_x_mask(keep_x_mask: bool, x_t: float | None) -> bool:
    """Whether the forward writes x's zero mask: wanted, and x has a threshold."""
    return keep_x_mask and x_t is not None


@torch.library.custom_op("peft_bitflip::flipped_linear", mutates_args=())
def flipped_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    call: Tensor,
    x_p_exp: float,
    x_p_frac: float,
    x_t: float | None,
    w_p_exp: float,
    w_p_frac: float,
    w_t: float | None,
    keys: list[int],
    conv1d: bool,
    keep_flipped_x: bool,
    keep_x_mask: bool,
    keep_input: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(flip(x) @ flip(W)^T + b, flip(x) if keep_flipped_x, x's packed zero mask if
    keep_x_mask and x has a threshold)``; the parts not kept are empty tensors.  ``keys``: the
    x and W stream keys, ``[x_k0, x_k1, w_k0, w_k1]``.  ``keep_input``: backward keeps the
    input x instead (read by the autograd setup only)."""
    from .functional import flip_specs_masked

    x_spec, w_spec = _spec(x_p_exp, x_p_frac, x_t), _spec(w_p_exp, w_p_frac, w_t)
    xf, wf, x_mask = flip_specs_masked(
        x, weight, x_spec, w_spec, (keys[0], keys[1]), (keys[2], keys[3]), call,
        _has_x_mask(keep_x_mask, x_t),
    )  # fmt: skip
    out = linear(xf, wf, bias, conv1d)
    # keep_flipped_x is never set for an identity x spec (then xf is x, and an op may not
    # return its input): compiled_flipped_linear keeps the input instead
    kept = xf if keep_flipped_x else x.new_empty(0)
    return out, kept, x_mask if x_mask is not None else x.new_empty(0, dtype=torch.uint8)


@flipped_linear_op.register_fake
def _flipped_linear_fake(
    x, weight, bias, call, x_p_exp, x_p_frac, x_t, w_p_exp, w_p_frac, w_t, keys, conv1d,
    keep_flipped_x, keep_x_mask, keep_input,
):  # fmt: skip
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    out = x.new_empty((*x.shape[:-1], out_features))
    kept = x.new_empty(x.shape) if keep_flipped_x else x.new_empty(0)
    if _has_x_mask(keep_x_mask, x_t):
        mask = x.new_empty(zero_mask_size(x.numel(), x.dtype), dtype=torch.uint8)
    else:
        mask = x.new_empty(0, dtype=torch.uint8)
    return out, kept, mask


@torch.library.custom_op("peft_bitflip::flipped_linear_backward", mutates_args=())
def flipped_linear_backward_op(
    grad_out: Tensor,
    kept: Tensor | None,
    x_mask: Tensor | None,
    weight: Tensor,
    call: Tensor,
    x_p_exp: float,
    x_p_frac: float,
    x_t: float | None,
    w_p_exp: float,
    w_p_frac: float,
    w_t: float | None,
    keys: list[int],
    conv1d: bool,
    recompute: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dX, dW, db)`` of :func:`flipped_linear_op` (empty tensors where not wanted), as the
    eager layer's backward computes them."""

    x_spec, w_spec = _spec(x_p_exp, x_p_frac, x_t), _spec(w_p_exp, w_p_frac, w_t)
    g2 = grad_out.reshape(-1, grad_out.size(-1))
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    grad_x, grad_w = linear_grads(
        g2, kept, x_mask, weight, call, (*grad_out.shape[:-1], in_features), weight.dtype,
        x_spec, w_spec, (keys[0], keys[1]), (keys[2], keys[3]), conv1d, recompute, need_x,
        need_w,
    )  # fmt: skip
    empty = grad_out.new_empty(0)
    return (
        grad_x if grad_x is not None else empty,
        grad_w if grad_w is not None else empty.clone(),
        g2.sum(0) if need_b else empty.clone(),
    )


@flipped_linear_backward_op.register_fake
def _flipped_linear_backward_fake(
    grad_out, kept, x_mask, weight, call, x_p_exp, x_p_frac, x_t, w_p_exp, w_p_frac, w_t,
    keys, conv1d, recompute, need_x, need_w, need_b,
):  # fmt: skip
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    gx = grad_out.new_empty((*grad_out.shape[:-1], in_features)) if need_x else None
    gw = grad_out.new_empty(weight.shape) if need_w else None
    gb = grad_out.new_empty(grad_out.shape[-1]) if need_b else None
    return tuple(g if g is not None else grad_out.new_empty(0) for g in (gx, gw, gb))


_N_INPUTS = 15  # arguments of flipped_linear_op


def _setup_context(ctx, inputs, output):
    x, weight, bias, call = inputs[:4]
    keep_flipped_x, keep_x_mask, keep_input = inputs[12:15]
    _, kept, x_mask = output
    ctx.fault = inputs[4:12]  # probabilities, thresholds, keys, conv1d
    ctx.recompute = keep_input
    saved_x = x if keep_input else (kept if keep_flipped_x else None)
    saved_mask = x_mask if _has_x_mask(keep_x_mask, inputs[6]) else None
    ctx.save_for_backward(saved_x, saved_mask, weight, call)
    ctx.mark_non_differentiable(kept, x_mask)


def _backward(ctx, grad_out, _grad_kept, _grad_mask):
    kept, x_mask, weight, call = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = flipped_linear_backward_op(
        grad_out.contiguous(), kept, x_mask, weight, call, *ctx.fault, ctx.recompute,
        need_x, need_w, need_b,
    )  # fmt: skip
    grads = (gx if need_x else None, gw if need_w else None, gb if need_b else None)
    return grads + (None,) * (_N_INPUTS - 3)


flipped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_flipped_linear(
    x, weight, bias, x_spec, w_spec, x_key, w_key, call, conv1d=False, recompute_input=False
):
    """The layer's ``flip(x) @ flip(W)^T + b`` through :func:`flipped_linear_op` (what a
    compiled graph holds; also callable in eager mode).  Keeps for backward what
    :class:`~peft_bitflip.flipped_linear._FlippedLinear` keeps.  ``x`` and ``weight`` must
    already be in the compute dtype (the caller applies an autocast)."""
    require_group_rates("compiled_flipped_linear", x_spec, w_spec)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_w = grad and weight.requires_grad
    keep_input = (recompute_input or x_spec.is_identity) and (need_x or need_w)
    out, _, _ = flipped_linear_op(
        x, weight, bias, call,
        x_spec.effective_p_exp, x_spec.effective_p_frac, x_spec.zero_out_threshold,
        w_spec.effective_p_exp, w_spec.effective_p_frac, w_spec.zero_out_threshold,
        [*x_key, *w_key], conv1d,
        need_w and not keep_input,
        need_x and not recompute_input and not x_spec.is_identity,
        keep_input,
    )  # fmt: skip
    return out


# --- the fused LoRA layer (one adapter merged into the weight) ------------------------------


@torch.library.custom_op("peft_bitflip::flipped_lora_linear", mutates_args=())
def flipped_lora_linear_op(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    call: Tensor,
    x_p_exp: float,
    x_p_frac: float,
    x_t: float | None,
    w_p_exp: float,
    w_p_frac: float,
    w_t: float | None,
    keys: list[int],
    conv1d: bool,
    scale: float,
    keep_flipped_x: bool,
    keep_x_mask: bool,
    keep_input: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(flip(x) @ flip(W + scale B@A)^T + b, flip(x) if keep_flipped_x, x's packed zero mask
    if keep_x_mask and x has a threshold)`` (empty tensors for the parts not kept), as the eager
    fused LoRA layer computes it (:func:`~peft_bitflip.linear_ops.lora_forward`).  ``x`` is in the
    compute dtype; ``keep_input``: backward keeps the input x (x is not flipped)."""

    x_spec, w_spec = _spec(x_p_exp, x_p_frac, x_t), _spec(w_p_exp, w_p_frac, w_t)
    out, xf, x_mask = lora_forward(
        x, weight, lora_a, lora_b, bias, x_spec, w_spec, (keys[0], keys[1]), (keys[2], keys[3]),
        call, conv1d, scale, x.dtype, _has_x_mask(keep_x_mask, x_t), keep_flipped_x,
    )  # fmt: skip
    kept = xf if keep_flipped_x else x.new_empty(0)
    return out, kept, x_mask if x_mask is not None else x.new_empty(0, dtype=torch.uint8)


@flipped_lora_linear_op.register_fake
def _flipped_lora_linear_fake(
    x, weight, lora_a, lora_b, bias, call, x_p_exp, x_p_frac, x_t, w_p_exp, w_p_frac, w_t, keys,
    conv1d, scale, keep_flipped_x, keep_x_mask, keep_input,
):  # fmt: skip
    return _flipped_linear_fake(
        x, weight, bias, call, x_p_exp, x_p_frac, x_t, w_p_exp, w_p_frac, w_t, keys, conv1d,
        keep_flipped_x, keep_x_mask, keep_input,
    )  # fmt: skip


@torch.library.custom_op("peft_bitflip::flipped_lora_linear_backward", mutates_args=())
def flipped_lora_linear_backward_op(
    grad_out: Tensor,
    kept: Tensor | None,
    x_mask: Tensor | None,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    call: Tensor,
    x_p_exp: float,
    x_p_frac: float,
    x_t: float | None,
    w_p_exp: float,
    w_p_frac: float,
    w_t: float | None,
    keys: list[int],
    conv1d: bool,
    scale: float,
    need_x: bool,
    need_w: bool,
    need_a: bool,
    need_b: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dX, dW, dA, dB, db)`` of :func:`flipped_lora_linear_op` (empty where not wanted), as
    the eager layer's backward computes them (:func:`~peft_bitflip.linear_ops.lora_grads`)."""

    w_spec = _spec(w_p_exp, w_p_frac, w_t)
    g2 = grad_out.reshape(-1, grad_out.size(-1))
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    grads = lora_grads(
        g2, kept, x_mask, weight, lora_a, lora_b, call, (*grad_out.shape[:-1], in_features),
        grad_out.dtype, w_spec, (keys[2], keys[3]), conv1d, scale, grad_out.dtype, need_x,
        need_w, need_a, need_b,
    )  # fmt: skip
    grads = (*grads, g2.sum(0) if need_bias else None)
    return tuple(g if g is not None else grad_out.new_empty(0) for g in grads)


@flipped_lora_linear_backward_op.register_fake
def _flipped_lora_linear_backward_fake(
    grad_out, kept, x_mask, weight, lora_a, lora_b, call, x_p_exp, x_p_frac, x_t, w_p_exp,
    w_p_frac, w_t, keys, conv1d, scale, need_x, need_w, need_a, need_b, need_bias,
):  # fmt: skip
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    shapes = [
        ((*grad_out.shape[:-1], in_features), need_x),
        (weight.shape, need_w),
        (lora_a.shape, need_a),
        (lora_b.shape, need_b),
        ((grad_out.shape[-1],), need_bias),
    ]
    dtypes = [grad_out.dtype, weight.dtype, lora_a.dtype, lora_b.dtype, grad_out.dtype]
    return tuple(
        grad_out.new_empty(shape, dtype=dt) if need else grad_out.new_empty(0)
        for (shape, need), dt in zip(shapes, dtypes)
    )


_N_LORA_INPUTS = 18  # arguments of flipped_lora_linear_op


def _lora_setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, _bias, call = inputs[:6]
    keep_flipped_x, keep_x_mask, keep_input = inputs[15:18]
    _, kept, x_mask = output
    ctx.fault = inputs[6:15]  # probabilities, thresholds, keys, conv1d, scale
    saved_x = x if keep_input else (kept if keep_flipped_x else None)
    saved_mask = x_mask if _has_x_mask(keep_x_mask, inputs[8]) else None
    ctx.save_for_backward(saved_x, saved_mask, weight, lora_a, lora_b, call)
    ctx.mark_non_differentiable(kept, x_mask)


def _lora_backward(ctx, grad_out, _grad_kept, _grad_mask):
    kept, x_mask, weight, lora_a, lora_b, call = ctx.saved_tensors
    need = ctx.needs_input_grad[:5]  # x, weight, lora_a, lora_b, bias
    grads = flipped_lora_linear_backward_op(
        grad_out.contiguous(), kept, x_mask, weight, lora_a, lora_b, call, *ctx.fault, *need
    )
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * (_N_LORA_INPUTS - 5)


flipped_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup_context)


def compiled_flipped_lora_linear(
    x, weight, lora_a, lora_b, scale, bias, x_spec, w_spec, x_key, w_key, call, conv1d=False
):
    """The fused LoRA layer through :func:`flipped_lora_linear_op` (what a compiled graph holds;
    also callable in eager mode).  Keeps for backward what
    :class:`~peft_bitflip.flipped_linear._FlippedLoraLinear` keeps: flip(x) (x itself when x is not
    flipped), x's zero mask, W, A, B, not the merged weight.  ``x`` must already be in the
    compute dtype."""
    require_group_rates("compiled_flipped_lora_linear", x_spec, w_spec)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_factors = grad and any(t.requires_grad for t in (weight, lora_a, lora_b))
    keep_input = x_spec.is_identity and need_factors
    out, _, _ = flipped_lora_linear_op(
        x, weight, lora_a, lora_b, bias, call,
        x_spec.effective_p_exp, x_spec.effective_p_frac, x_spec.zero_out_threshold,
        w_spec.effective_p_exp, w_spec.effective_p_frac, w_spec.zero_out_threshold,
        [*x_key, *w_key], conv1d, float(scale),
        need_factors and not keep_input, need_x and not x_spec.is_identity, keep_input,
    )  # fmt: skip
    return out
