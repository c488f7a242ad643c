"""Linear layers whose input and weight pass through the bit-flip fault model every forward.

``BitflipLinear`` (an ``nn.Linear``) and ``BitflipConv1D`` (transformers' GPT-2 ``Conv1D``) keep
the module's parameters and add:

* ``x_spec`` / ``w_spec``: :class:`~peft_bitflip.spec.FlipSpec` for the input and the weight;
* ``bitflip_name`` / ``bitflip_seed``: name the random streams; the Philox keys are
  ``stream_key(seed, name, "x" | "w", data-parallel rank)``, so layers, tensors and ranks draw
  independent flips;
* ``bitflip_calls``: an int64 buffer counting forward calls.  It is the call index of the
  streams, lives in ``state_dict`` (checkpoints restore it) and advances by one per forward
  (in eager mode by replacing the tensor, written by the flip kernel: see
  :meth:`BitflipLayerMixin.claim_call`; read the attribute, do not keep the tensor);
* ``bitflip_enabled``: switch flips off without removing the layer (see ``disable_bitflips``);
* ``bitflip_stats``: ``None`` (default: nothing is counted, no cost) or a
  :class:`~peft_bitflip.stats.FlipStatsAccumulator` that receives the true counts of flipped bits
  and zeroed elements of every forward, and of the NaN / +-Inf elements of its output (see
  :class:`~peft_bitflip.stats.FlipStatsRecorder`).  The recomputation of a checkpointed region
  is not counted again.

On the ``meta`` device (shape inference, ``accelerate.init_empty_weights``) a layer returns the
clean layer's meta result: no flips, its counter unchanged, nothing counted.

Activation checkpointing (non-reentrant, the transformers default): a forward that runs again
during backward to recompute activations reuses the call index of the original forward, so the
recomputed activations see the same flips.  Forwards inside a checkpointed region queue their
call index for that (read off torch.utils.checkpoint's saved-tensor hooks); the recompute takes
them back in order.

The forward itself is :func:`flipped_linear` — one place that a fused version can replace.
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (
    apply_flip_spec_masked,
    apply_flip_specs,
    flip_spec_grad_,
    flip_specs_masked,
    stream_key,
    zero_masked_,
)
from .kernels.lora import (
    merge_flip_lora,
    merge_flip_lora_and_x,
    merge_flip_lora_for_grads,
    merge_lora_weight,
    merged_lora_weight,
    mm_float32,
    subtract_zeroed_correction_,
)
from .kernels.op import call_snapshot
from .kernels.sampling import write_next_call
from .spec import FlipSpec

try:  # GPT-2 style layers; transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

__all__ = [
    "BitflipLinear",
    "BitflipConv1D",
    "BitflipLayerMixin",
    "disable_bitflips",
    "recompute_flipped_inputs",
    "flipped_linear",
    "flipped_linear_unfused",
    "flipped_lora_linear",
    "flipped_lora_linear_unfused",
]

_PENDING_MAX = 1024


def data_parallel_rank() -> int:
    """Rank of this process: torch.distributed's if initialised, else ``$RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _checkpoint_phase() -> str | None:
    """ "forward" inside a checkpointed forward, "recompute" inside its recomputation, else None.

    Read off the saved-tensor hooks that ``torch.utils.checkpoint`` (non-reentrant) installs.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is None:
        return None
    name = getattr(hooks[0], "__qualname__", "")
    if name.startswith("_checkpoint_hook"):
        return "forward"
    if name.startswith("_recomputation_hook"):
        return "recompute"
    return None


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
    """
    build = weight if callable(weight) else None
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
            next_call=next_call,
        )  # fmt: skip
    compute = _autocast_dtype(x)
    if compute is not None:  # flip the values the matmul consumes, not the fp32 masters
        x = x.to(compute)
        weight = weight if build is not None else weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    return _FlippedLinear.apply(
        x,
        None if build is not None else weight,
        bias,
        (x_spec, w_spec, x_key, w_key, conv1d, stats, build, compute, recompute_input),
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
):
    """:func:`flipped_linear` written as separate differentiable ops (the flip op on ``x``
    and on ``weight``, then a linear layer): autograd stores the flipped copies (and a built
    weight), whatever ``recompute_input`` says.  The reference that the recomputing path is
    tested against."""
    if callable(weight):
        weight = weight()
    compute = _autocast_dtype(x)
    if compute is not None:
        x, weight = x.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    xf, wf = apply_flip_specs(x, weight, x_spec, w_spec, x_key, w_key, call, next_call)
    out = linear(xf, wf, bias, conv1d)
    if stats is not None:
        stats.record("x", x, xf, x_spec, x_key, call)
        stats.record("w", weight, wf, w_spec, w_key, call)
        stats.record_output(out)
    return out


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
    recompute, need_x, need_w,
):  # fmt: skip
    """(dX, dW) of ``flip(x) @ flip(W)^T`` (None where not wanted) from what the forward kept.

    ``g2``: dY as (tokens, out); ``kept``: flip(x), or x itself when ``recompute`` (then
    flip(x) and x's zero-out are recomputed in one pass over x); ``x_mask``: x's packed zero
    mask (when not ``recompute``); ``weight``: W (detached), flipped again here with its zero
    mask.  Straight-through, zero where the forward zeroed x or W.  Shared by the eager
    autograd Function and the op that carries the layer through ``torch.compile``."""
    grad_x = grad_w = w_mask = None
    if need_x:  # flip(W) again; its zero mask too if dW will need it
        wf, w_mask = apply_flip_spec_masked(weight, w_spec, w_key, call, need_w)
        grad_x = (g2 @ (wf.t() if conv1d else wf)).view(x_shape)
        del wf
    xf = kept
    if recompute:  # one pass over x: zero grad_x where the forward zeroed, flip(x) if needed
        xf = flip_spec_grad_(grad_x, kept, x_spec, x_key, call, want_flipped=need_w)
    if need_w:
        xf = xf.reshape(-1, xf.size(-1))
        grad_w = xf.t() @ g2 if conv1d else g2.t() @ xf
        if not need_x:  # one read of W finds the zeroed weights
            flip_spec_grad_(grad_w, weight, w_spec, w_key, call)
    if need_x:  # zero dX and dW where the forward zeroed x and W: one launch
        more = (grad_w, w_mask, weight.dtype) if w_mask is not None else ()
        zero_masked_(grad_x, x_mask, x_dtype, *more)
    return grad_x, grad_w


class _FlippedLinear(torch.autograd.Function):
    """flip(x) @ flip(W)^T + b that saves flip(x) (only if W needs a gradient), x's packed zero
    mask (1/16 of a bf16 x), W (or what W is built from) and the call index; not flip(W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, settings, call, next_call, *weight_params):
        x_spec, w_spec, x_key, w_key, conv1d, stats, build, compute, recompute = settings
        call = call if isinstance(call, torch.Tensor) else torch.tensor(call, device=x.device)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or any(ctx.needs_input_grad[6:])
        if build is not None:
            weight = _built_weight(build, compute, x.device.type)
        xf, wf, x_mask = flip_specs_masked(
            x, weight, x_spec, w_spec, x_key, w_key, call, need_x and not recompute, next_call
        )
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
        x_spec, w_spec, x_key, w_key, conv1d, _, build, compute, recompute = ctx.settings
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_params = ctx.needs_input_grad[6:]
        if build is not None:  # rebuild W (+ s B@A); with a graph only if A, B need gradients
            need_w = any(need_params)
            with torch.set_grad_enabled(need_w):
                weight = _built_weight(build, compute, call.device.type)
        g2 = grad_out.reshape(-1, grad_out.size(-1))
        grad_x, grad_w = linear_grads(
            g2, kept, x_mask, weight.detach(), call, x_shape, x_dtype, x_spec, w_spec,
            x_key, w_key, conv1d, recompute, need_x, need_w,
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
    unchanged).
    """
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


def _on_meta(*tensors) -> bool:
    """Whether any of ``tensors`` (tensors or other objects, which are ignored) is on meta."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def _meta_linear(x, weight, bias, conv1d):
    """The clean :func:`linear` on the meta device: its result's shape and dtype, no data."""
    x, weight = x.to("meta"), weight.to("meta")
    return linear(x, weight, None if bias is None else bias.to("meta"), conv1d)


class BitflipLayerMixin:
    """Fault-model state and bookkeeping shared by the bit-flip layers."""

    _is_conv1d = False
    bitflip_stats = None  # a FlipStatsAccumulator while statistics are recorded (instance attr)
    # keep x (not flip(x)) for backward and recompute the flip there: less activation memory,
    # one more pass over x; see recompute_flipped_inputs()
    bitflip_recompute_input = False

    def init_bitflip(self, name: str, x_spec: FlipSpec, w_spec: FlipSpec, seed: int = 0) -> None:
        self.bitflip_name = name
        self.bitflip_seed = seed
        self.x_spec = x_spec
        self.w_spec = w_spec
        self.bitflip_enabled = True
        self._bitflip_keys = None
        self._pending_calls = collections.deque(maxlen=_PENDING_MAX)
        device = self.weight.device if self.weight.device.type != "meta" else "cpu"
        self.register_buffer("bitflip_calls", torch.zeros((), dtype=torch.int64, device=device))

    def set_bitflip(self, x_spec: FlipSpec | None = None, w_spec: FlipSpec | None = None) -> None:
        """Change the fault settings in place (e.g. a probability schedule); streams continue."""
        if x_spec is not None:
            self.x_spec = x_spec
        if w_spec is not None:
            self.w_spec = w_spec

    def stream_keys(self):
        """((x key), (w key)) for this layer on this rank (computed once; under
        ``torch.compile`` computed as constants without being stored, so the first compiled
        call does not change the module and force a recompile on the second)."""
        keys = self._bitflip_keys
        if keys is None:
            rank = data_parallel_rank()
            keys = (
                stream_key(self.bitflip_seed, self.bitflip_name, "x", rank),
                stream_key(self.bitflip_seed, self.bitflip_name, "w", rank),
            )
            if not torch.compiler.is_compiling():
                self._bitflip_keys = keys
        return keys

    def claim_call(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the call index of this forward, the tensor that must receive it + 1, or None).

        In eager mode the counter is not copied and incremented (two launches per forward):
        the current ``bitflip_calls`` tensor itself becomes this forward's call index (nothing
        writes it any more) and a new, still empty tensor takes its place as the buffer; the
        forward's flip kernel writes ``call + 1`` into it (see ``next_call`` of
        :func:`~peft_bitflip.functional.apply_flip_specs`).  The caller must see that it is
        written, also when the forward fails (:meth:`flipped_forward` does).  Under
        ``torch.compile`` the counter is copied and incremented in the graph, and while a CUDA
        graph is being captured it is copied and incremented in place, so that each replay
        advances it (second item None).  Under ``torch.inference_mode`` the new tensor is still
        a normal one (training can follow).

        Inside the original forward of a (non-reentrant) checkpointed region the index is
        queued; the recomputation of that region during backward takes it back (second item
        None), so both see the same flips.
        """
        if torch.compiler.is_compiling():
            counter = self.bitflip_calls
            # with gradients the index must reach backward from before the increment (an
            # opaque snapshot: see call_snapshot); without, a plain clone, which inductor
            # folds away (the op reads the counter before the graph's increment)
            call = call_snapshot(counter) if torch.is_grad_enabled() else counter.clone()
            counter.add_(1)
            return call, None
        phase = _checkpoint_phase()
        if phase == "recompute" and self._pending_calls:
            return self._pending_calls.popleft(), None
        buffers = self._buffers
        call = buffers["bitflip_calls"]
        if call.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph replays what it captures: it must advance the counter in place
            following = None
            call, counter = call.clone(), call
            counter.add_(1)
        elif torch.is_inference_mode_enabled():  # keep the buffer a normal tensor (writable
            with torch.inference_mode(False):  # and savable for backward outside)
                buffers["bitflip_calls"] = following = torch.empty_like(call)
        else:
            buffers["bitflip_calls"] = following = torch.empty_like(call)
        if phase == "forward":
            self._pending_calls.append(call)
        return call, following

    def next_call(self) -> torch.Tensor:
        """The call index for this forward (a tensor), advancing the counter (with a torch op;
        the layers' forwards use :meth:`claim_call`, whose flip kernel advances it)."""
        call, following = self.claim_call()
        write_next_call(call, following)
        return call

    def flipped_forward(self, x: torch.Tensor, weight, bias, weight_params=()) -> torch.Tensor:
        """The layer's computation with ``weight`` (a tensor, or a function building it from
        ``weight_params``, see :func:`flipped_linear`)."""
        if not self.bitflip_enabled:
            return linear(x, weight() if callable(weight) else weight, bias, self._is_conv1d)
        if _on_meta(x, self.weight, weight):
            return _meta_linear(x, weight() if callable(weight) else weight, bias, self._is_conv1d)
        stats = self.bitflip_stats
        if stats is not None and torch.compiler.is_compiling():
            # counting is host-side work: a layer that records statistics runs eagerly (a
            # graph break), with the same flips
            return _eager_flipped_forward(self, x, weight, bias, weight_params)
        x_key, w_key = self.stream_keys()
        call, following = self.claim_call()
        if stats is not None and _checkpoint_phase() == "recompute":
            stats = None  # the recomputation repeats flips that were counted in the forward
        try:
            return flipped_linear(
                x, weight, bias, self.x_spec, self.w_spec, x_key, w_key, call,
                self._is_conv1d, stats, weight_params, self.bitflip_recompute_input, following,
            )  # fmt: skip
        except BaseException:
            write_next_call(call, following)  # the counter stays valid (writing it twice is ok)
            raise

    def flipped_lora_forward(self, x: torch.Tensor, lora_a, lora_b, scale) -> torch.Tensor:
        """The layer's computation with one LoRA adapter merged into its weight (the fast path,
        see :func:`flipped_lora_linear`)."""
        if not self.bitflip_enabled:
            return self.flipped_forward(
                x,
                lambda: merge_lora_weight(self.weight, lora_a, lora_b, scale, self._is_conv1d),
                self.bias,
                weight_params=[self.weight, lora_a, lora_b],
            )
        if _on_meta(x, self.weight, lora_a, lora_b):
            merged = merge_lora_weight(
                *(t.to("meta") for t in (self.weight, lora_a, lora_b)), scale, self._is_conv1d
            )
            return _meta_linear(x, merged, self.bias, self._is_conv1d)
        stats = self.bitflip_stats
        if stats is not None and torch.compiler.is_compiling():  # as in flipped_forward
            return _eager_flipped_lora_forward(self, x, lora_a, lora_b, scale)
        x_key, w_key = self.stream_keys()
        if stats is not None and _checkpoint_phase() == "recompute":
            stats = None  # counted in the forward already
        call, following = self.claim_call()
        try:
            return flipped_lora_linear(
                x, self.weight, lora_a, lora_b, scale, self.bias, self.x_spec, self.w_spec,
                x_key, w_key, call, self._is_conv1d, stats, following,
            )  # fmt: skip
        except BaseException:
            write_next_call(call, following)
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flipped_forward(x, self.weight, self.bias)

    def bitflip_repr(self) -> str:
        def fmt(s: FlipSpec):
            return f"p_exp={s.p_exp:g}, p_frac={s.p_frac:g}, t={s.zero_out_threshold}"

        return f"x: {fmt(self.x_spec)}; w: {fmt(self.w_spec)}; seed={self.bitflip_seed}"

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bitflip(" + self.bitflip_repr() + ")"


# the layers' computations outside torch.compile (dynamo breaks the graph around them)
_eager_flipped_forward = torch.compiler.disable(BitflipLayerMixin.flipped_forward)
_eager_flipped_lora_forward = torch.compiler.disable(BitflipLayerMixin.flipped_lora_forward)


class BitflipLinear(BitflipLayerMixin, nn.Linear):
    """``nn.Linear`` computing ``flip(x) @ flip(W)^T + b``."""


if Conv1D is not None:

    class BitflipConv1D(BitflipLayerMixin, Conv1D):
        """transformers ``Conv1D`` (weight ``(in, out)``) computing ``flip(x) @ flip(W) + b``."""

        _is_conv1d = True

else:  # pragma: no cover
    BitflipConv1D = None


def bitflip_layers(model: nn.Module):
    """(name, layer) for every bit-flip layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitflipLayerMixin)]


def recompute_flipped_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Trade speed for activation memory in the bit-flip layers of ``model`` (not the LoRA fast
    path); returns the number of layers set.

    By default a layer keeps ``flip(x)`` for backward.  Where several layers read the same
    ``x`` (q/k/v, gate/up) that is one activation-sized tensor per layer instead of one shared
    ``x``: +11% peak memory in a full bf16 training step of a 1B Llama at batch 8x1024
    (``docs/benchmarks.md``).  ``enabled=True`` keeps ``x`` as a clean layer does and
    recomputes ``flip(x)`` in backward (one more read and write of ``x`` per layer; the same
    gradients).  Under an autocast the layers keep a cast copy of ``x`` per layer anyway, and
    with activation checkpointing the kept tensors are not stored, so there it changes little.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    layers = [m for _, m in bitflip_layers(model)]
    for m in layers:
        m.bitflip_recompute_input = enabled
    return len(layers)


@contextlib.contextmanager
def disable_bitflips(model: nn.Module):
    """Context manager: run ``model`` without flips (layers stay in place; counters pause)."""
    layers = [m for _, m in bitflip_layers(model)]
    before = [m.bitflip_enabled for m in layers]
    for m in layers:
        m.bitflip_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.bitflip_enabled = b
