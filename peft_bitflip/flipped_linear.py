"""The forward of a bit-flip layer as functions: ``flip(x) @ flip(W)^T + b`` and its LoRA form
``flip(x) @ flip(W + s B A)^T + b``, each as a fused autograd Function (what the layers run)
and an unfused reference (plain autograd over the flip ops, for tests and the stats path).

The modules that call them are in :mod:`peft_bitflip.layers`; the tensor math the Functions
share with the ``torch.compile`` ops is in :mod:`peft_bitflip.linear_ops`.
"""

from __future__ import annotations

import torch

from .functional import apply_flip_specs, flip_specs_masked
from .kernels.lora import merge_lora_weight
from .linear_ops import (
    _autocast_dtype,
    _built_weight,
    linear,
    linear_grads,
    lora_forward,
    lora_grads,
)

__all__ = [
    "flipped_linear",
    "flipped_linear_unfused",
    "flipped_lora_linear",
    "flipped_lora_linear_unfused",
]


def flipped_linear(
    x,
    weight,
    bias,
    x_spec,
    w_spec,
    x_key,
    w_key,
    call,
    conv1d=False,
    stats=None,
    weight_params=(),
    recompute_input=False,
    next_call=None,
    x_lanes=None,
    w_stuck=None,
):
    """``flip(x) @ flip(weight)^T + bias`` (``flip(x) @ flip(weight) + bias`` for Conv1D layout).

    Under ``torch.autocast`` the flips act on ``x`` and ``weight`` cast to the autocast dtype
    (e.g. bf16 with ``Trainer(bf16=True)``): the bits that flip are those of the values the
    matmul consumes, as with a model stored in that dtype.

    Autograd keeps what a clean linear layer keeps, with ``flip(x)`` in place of ``x``:
    ``flip(x)`` (only when the weight needs a gradient), ``weight`` and the call index, plus
    x's packed zero mask (one bit per element; see
    :func:`~peft_bitflip.functional.apply_flip_spec_masked`) when x needs a gradient.
    ``flip(weight)`` is not stored: backward recomputes it from the counter-based stream (a
    weight-sized tensor less per layer), with its zero mask for the weight gradient.  Gradients
    are those of :func:`flipped_linear_unfused` (straight-through, zero where the forward
    zeroed).  Under ``torch.compile`` the same forward and backward enter the graph as two
    ops (:mod:`peft_bitflip.compiled_linear`); with ``stats`` or a built weight the unfused
    form is traced instead.

    ``recompute_input=True`` keeps ``x`` instead of ``flip(x)`` (what a clean layer keeps: no
    extra activation memory where several layers read the same ``x``, e.g. q/k/v) and
    recomputes ``flip(x)`` in backward: one more read and write of ``x`` per layer.

    ``weight`` may also be a function of no arguments that builds the weight from the tensors
    ``weight_params`` (LoRA: ``W + s B @ A`` from W, A, B).  The built weight is not kept
    either: backward builds it again (under the forward's autocast state) and passes the
    weight's gradient on to ``weight_params``.

    ``stats``: an optional :class:`~peft_bitflip.stats.FlipStatsAccumulator` that counts what
    the two flips did and the NaN / +-Inf elements of the output (outside autograd; the result
    is the same with or without it).

    ``next_call``: an optional 0-dim int64 tensor that receives ``call + 1`` (see
    :func:`~peft_bitflip.functional.apply_flip_specs`): the layers' counters.

    A spec with per-bit-position rates (``p_bits``) runs :func:`flipped_linear_unfused`
    (``recompute_input`` has no effect there).

    ``x_lanes``: stuck input lanes of x (keep / ones words per input feature, in x's dtype
    under the autocast, see :meth:`~peft_bitflip.stuck_at.StuckAt.lanes`), forced before x's
    flips: in the flip kernel's pass over x (and in backward's recompute), not a pass of
    their own; the gradient passes straight through them.  None under ``torch.compile``.

    ``w_stuck``: the weight's listed stuck bits (a
    :class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck` drawn for the weight's element
    count and dtype as the matmul reads it: the autocast dtype under autocast), forced before
    its flips in the flip kernel's pass over the weight (and in backward's recompute), with
    the gradient passed straight through: no stuck copy of the weight is built or kept.  None
    under ``torch.compile``.
    """
    build = weight if callable(weight) else None
    fused = dict(x_lanes=x_lanes, w_stuck=w_stuck)
    if (x_lanes is not None or w_stuck is not None) and (
        torch.compiler.is_compiling() or stats is not None
    ):
        raise ValueError(
            "x_lanes / w_stuck are for eager calls without stats: force the stuck bits before"
        )
    if x_spec.p_bits is not None or w_spec.p_bits is not None:
        # per-bit-position rates: no fused kernel, the flip ops one by one (in every mode)
        return flipped_linear_unfused(
            x, weight, bias, x_spec, w_spec, x_key, w_key, call, conv1d, stats,
            next_call=next_call, **fused,
        )  # fmt: skip
    if torch.compiler.is_compiling():
        if build is not None or stats is not None:  # (the layers send no stats here)
            return flipped_linear_unfused(
                x, weight, bias, x_spec, w_spec, x_key, w_key, call, conv1d, stats,
                next_call=next_call,
            )  # fmt: skip
        from .compiled_linear import compiled_flipped_linear

        compute = _autocast_dtype(x)
        if compute is not None:
            x, weight = x.to(compute), weight.to(compute)
            bias = None if bias is None else bias.to(compute)
        return compiled_flipped_linear(
            x, weight, bias, x_spec, w_spec, x_key, w_key, call, conv1d, recompute_input
        )
    if not torch.is_grad_enabled():
        return flipped_linear_unfused(
            x, weight, bias, x_spec, w_spec, x_key, w_key, call, conv1d, stats,
            next_call=next_call, **fused,
        )  # fmt: skip
    compute = _autocast_dtype(x)
    if compute is not None:  # flip the values the matmul consumes, not the fp32 masters
        x = x.to(compute)
        weight = weight if build is not None else weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    settings = (
        x_spec, w_spec, x_key, w_key, conv1d, stats, build, compute, recompute_input, x_lanes,
        w_stuck,
    )  # fmt: skip
    return _FlippedLinear.apply(
        x,
        None if build is not None else weight,
        bias,
        settings,
        call,
        next_call,
        *(weight_params if build is not None else ()),
    )


def flipped_linear_unfused(
    x,
    weight,
    bias,
    x_spec,
    w_spec,
    x_key,
    w_key,
    call,
    conv1d=False,
    stats=None,
    weight_params=(),
    recompute_input=False,
    next_call=None,
    x_lanes=None,
    w_stuck=None,
):
    """:func:`flipped_linear` written as separate differentiable ops (the flip op on ``x``
    and on ``weight``, then a linear layer): autograd stores the flipped copies (and a built
    weight), whatever ``recompute_input`` says.  The reference that the recomputing path is
    tested against.  ``x_lanes``, ``w_stuck``: as in :func:`flipped_linear` (not with
    ``stats``: they would count the stuck bits as flips)."""
    if callable(weight):
        weight = weight()
    compute = _autocast_dtype(x)
    if compute is not None:
        x, weight = x.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    if (x_lanes is not None or w_stuck is not None) and stats is not None:
        raise ValueError("x_lanes / w_stuck with stats: force the stuck bits before the layer")
    xf, wf = apply_flip_specs(
        x, weight, x_spec, w_spec, x_key, w_key, call, next_call, x_lanes, w_stuck
    )
    out = linear(xf, wf, bias, conv1d)
    if stats is not None:
        stats.record("x", x, xf, x_spec, x_key, call)
        stats.record("w", weight, wf, w_spec, w_key, call)
        stats.record_output(out)
    return out


class _FlippedLinear(torch.autograd.Function):
    """flip(x) @ flip(W)^T + b that saves flip(x) (only if W needs a gradient), x's packed zero
    mask (1/16 of a bf16 x), W (or what W is built from) and the call index; not flip(W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, settings, call, next_call, *weight_params):
        x_spec, w_spec, x_key, w_key, conv1d, stats, build, compute, recompute = settings[:9]
        lanes, w_stuck = settings[9:]
        call = call if isinstance(call, torch.Tensor) else torch.tensor(call, device=x.device)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or any(ctx.needs_input_grad[6:])
        if build is not None:
            weight = _built_weight(build, compute, x.device.type)
        xf, wf, x_mask = flip_specs_masked(
            x, weight, x_spec, w_spec, x_key, w_key, call, need_x and not recompute, next_call,
            lanes, w_stuck,
        )  # fmt: skip
        out = linear(xf, wf, bias, conv1d)
        if stats is not None:
            stats.record("x", x, xf, x_spec, x_key, call)
            stats.record("w", weight, wf, w_spec, w_key, call)
            stats.record_output(out)
        kept = (x if need_x or need_w else None) if recompute else (xf if need_w else None)
        ctx.save_for_backward(kept, x_mask, None if build is not None else weight, call)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.settings = settings
        ctx.weight_params = weight_params  # leaves the caller holds (parameters)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        kept, x_mask, weight, call = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        x_spec, w_spec, x_key, w_key, conv1d, _, build, compute, recompute = ctx.settings[:9]
        lanes, w_stuck = ctx.settings[9:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_params = ctx.needs_input_grad[6:]
        if build is not None:  # rebuild W (+ s B@A); with a graph only if A, B need gradients
            need_w = any(need_params)
            with torch.set_grad_enabled(need_w):
                weight = _built_weight(build, compute, call.device.type)
        g2 = grad_out.reshape(-1, grad_out.size(-1))
        grad_x, grad_w = linear_grads(
            g2, kept, x_mask, weight.detach(), call, x_shape, x_dtype, x_spec, w_spec,
            x_key, w_key, conv1d, recompute, need_x, need_w, lanes, w_stuck,
        )  # fmt: skip
        grad_b = g2.sum(0) if need_b else None
        grad_params = [None] * len(need_params)
        if build is not None:
            wanted = [i for i, n in enumerate(need_params) if n]
            if wanted:
                inputs = [ctx.weight_params[i] for i in wanted]
                for i, g in zip(wanted, torch.autograd.grad(weight, inputs, grad_w)):
                    grad_params[i] = g
            grad_w = None
        return grad_x, grad_w, grad_b, None, None, None, *grad_params


def flipped_lora_linear(
    x,
    weight,
    lora_a,
    lora_b,
    scale,
    bias,
    x_spec,
    w_spec,
    x_key,
    w_key,
    call,
    conv1d=False,
    stats=None,
    next_call=None,
):
    """``flip(x) @ flip(W + scale * B @ A)^T + bias`` for one LoRA adapter (A: (r, in),
    B: (out, r)), the merged weight formed as :func:`~peft_bitflip.kernels.lora.merge_lora_weight`.

    The fast path of bit-flip LoRA: on the GPU the merge, flip and zero-out of the weight are one
    kernel pass; only flip(x) (if a factor needs a gradient), x's packed zero mask (if x needs
    one), W, A, B and the call index are kept for backward; and the gradients of
    A and B come from rank-r products (``(dY B)^T flip(x)`` and ``dY^T (flip(x) A^T)``) plus a
    correction at the few weights the zero-out removed, instead of the full ``dY^T flip(x)``.
    Gradients equal those of :func:`flipped_lora_linear_unfused` within float rounding.  Under
    ``torch.compile`` the same forward and backward enter the graph as two ops
    (:func:`~peft_bitflip.compiled_linear.compiled_flipped_lora_linear`).
    ``stats``, ``next_call``: as in :func:`flipped_linear` (counted outside autograd; results
    unchanged).  A spec with ``p_bits`` runs :func:`flipped_lora_linear_unfused`.
    """
    if x_spec.p_bits is not None or w_spec.p_bits is not None:  # no fused kernel for them
        return flipped_lora_linear_unfused(
            x, weight, lora_a, lora_b, scale, bias, x_spec, w_spec, x_key, w_key, call,
            conv1d, stats, next_call,
        )  # fmt: skip
    if torch.compiler.is_compiling():
        if stats is not None:  # (the layers send no stats here)
            return flipped_lora_linear_unfused(
                x, weight, lora_a, lora_b, scale, bias, x_spec, w_spec, x_key, w_key, call,
                conv1d, stats, next_call,
            )  # fmt: skip
        from .compiled_linear import compiled_flipped_lora_linear

        compute = _autocast_dtype(x)
        if compute is not None:
            x = x.to(compute)
            bias = None if bias is None else bias.to(compute)
        return compiled_flipped_lora_linear(
            x, weight, lora_a, lora_b, scale, bias, x_spec, w_spec, x_key, w_key, call, conv1d
        )
    compute = _autocast_dtype(x)
    if compute is not None:
        x = x.to(compute)
        bias = None if bias is None else bias.to(compute)
    out_dtype = compute if compute is not None else x.dtype
    if not torch.is_grad_enabled():  # evaluation: no autograd Function around the forward
        call = call if isinstance(call, torch.Tensor) else torch.tensor(call, device=x.device)
        return lora_forward(
            x, weight, lora_a, lora_b, bias, x_spec, w_spec, x_key, w_key, call, conv1d,
            float(scale), out_dtype, False, False, stats, next_call,
        )[0]  # fmt: skip
    settings = (x_spec, w_spec, x_key, w_key, conv1d, float(scale), out_dtype, stats)
    return _FlippedLoraLinear.apply(x, weight, lora_a, lora_b, bias, settings, call, next_call)


def flipped_lora_linear_unfused(
    x,
    weight,
    lora_a,
    lora_b,
    scale,
    bias,
    x_spec,
    w_spec,
    x_key,
    w_key,
    call,
    conv1d=False,
    stats=None,
    next_call=None,
):
    """:func:`flipped_lora_linear` as separate differentiable ops (the reference)."""
    merged = merge_lora_weight(weight, lora_a, lora_b, scale, conv1d)
    return flipped_linear_unfused(
        x, merged, bias, x_spec, w_spec, x_key, w_key, call, conv1d, stats, next_call=next_call
    )


class _FlippedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, settings, call, next_call):
        x_spec, w_spec, x_key, w_key, conv1d, scale, out_dtype, stats = settings
        call = call if isinstance(call, torch.Tensor) else torch.tensor(call, device=x.device)
        need_x = ctx.needs_input_grad[0]
        need_factors = any(ctx.needs_input_grad[1:4])
        out, xf, x_mask = lora_forward(
            x, weight, lora_a, lora_b, bias, x_spec, w_spec, x_key, w_key, call, conv1d, scale,
            out_dtype, need_x, need_factors, stats, next_call,
        )  # fmt: skip
        ctx.save_for_backward(xf, x_mask, weight, lora_a, lora_b, call)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.settings = settings
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xf, x_mask, weight, lora_a, lora_b, call = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        _, w_spec, _, w_key, conv1d, scale, out_dtype, _ = ctx.settings
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        g2 = grad_out.reshape(-1, grad_out.size(-1))
        grad_x, grad_w, grad_a, grad_b = lora_grads(
            g2, xf, x_mask, weight, lora_a, lora_b, call, x_shape, x_dtype, w_spec, w_key,
            conv1d, scale, out_dtype, need_x, need_w, need_a, need_b,
        )  # fmt: skip
        grad_bias = g2.sum(0) if need_bias else None
        return grad_x, grad_w, grad_a, grad_b, grad_bias, None, None, None
