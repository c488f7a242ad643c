"""The ``torch.library`` op ``peft_bitflip::burst``: burst faults, then optional zero-out.

It takes the burst table (:mod:`.burst_sampling`) and the call index as tensors (a changing
call index never recompiles a ``torch.compile`` graph) and dispatches as the flip op does
(:func:`.op.backend_for`): the Triton kernel on CUDA and under ``TRITON_INTERPRET=1``, else the
bit-exact PyTorch reference.  Gradient: straight-through, zero where the zero-out removed the
element (recomputed from x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import burst_reference
from .burst_sampling import BurstShape
from .op import backend_for


def burst_impl(x, table, call, key0, key1, threshold, shape: BurstShape) -> Tensor:
    """Burst events on ``x`` (any shape/strides), then zero-out; a new contiguous tensor."""
    xc = x.contiguous()
    if backend_for(x.device) == "triton":
        from .triton_burst import launch_burst

        return launch_burst(xc, table, shape, call.to(x.device), key0, key1, threshold)
    return burst_reference.burst_reference(xc, table, shape, int(call), key0, key1, threshold)


def _keep(x, table, call, key0, key1, threshold, shape) -> Tensor:
    """True where the forward kept the element (``|y| < threshold`` in float32)."""
    y = burst_impl(x, table, call, key0, key1, None, shape)
    return y.to(torch.float32).abs() < threshold


@torch.library.custom_op("peft_bitflip::burst", mutates_args=())
def burst_op(
    x: Tensor,
    table: Tensor,
    call: Tensor,
    key0: int,
    key1: int,
    threshold: float | None,
    k_min: int,
    n_len: int,
    shift: int,
    width: int,
) -> Tensor:
    """Burst events on ``x``, then zero-out; see :func:`burst_impl`."""
    shape = BurstShape(k_min, n_len, shift, width)
    return burst_impl(x, table, call, key0, key1, threshold, shape)


@burst_op.register_fake
def _burst_fake(x, table, call, key0, key1, threshold, k_min, n_len, shift, width):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, table, call, key0, key1, threshold, *shape = inputs
    ctx.args = (key0, key1, threshold, BurstShape(*shape))
    if threshold is not None:
        ctx.save_for_backward(x, table, call)


def _backward(ctx, grad):
    key0, key1, threshold, shape = ctx.args
    if threshold is not None:
        x, table, call = ctx.saved_tensors
        keep = _keep(x, table, call, key0, key1, threshold, shape).view(grad.shape)
        grad = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return (grad,) + (None,) * 9


burst_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBurst(torch.autograd.Function):
    """The op's autograd outside ``torch.compile``, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, table, call, key0, key1, threshold, shape):
        _setup_context(ctx, (x, table, call, key0, key1, threshold, *shape), None)
        return burst_impl(x, table, call, key0, key1, threshold, shape)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)[:7]


def burst(x, table, call, key0, key1, threshold, shape: BurstShape) -> Tensor:
    """``peft_bitflip::burst`` (differentiable); the custom op under ``torch.compile``, else
    the same implementation called directly."""
    if torch.compiler.is_compiling():
        return burst_op(x, table, call, key0, key1, threshold, *shape)
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerBurst.apply(x, table, call, key0, key1, threshold, shape)
    return burst_impl(x, table, call, key0, key1, threshold, shape)
