"""The ``torch.library`` ops ``peft_bitflip::bitflip`` / ``peft_bitflip::bitflip_backward``.

They take the flip table (see :mod:`.sampling`) and the call index as tensors, so a changing
call index or probability never recompiles a ``torch.compile`` graph, and they dispatch to:

* CUDA: the Triton kernel;
* CPU: the same Triton kernel when ``TRITON_INTERPRET=1`` was set before import, else the
  vectorised PyTorch reference (bit-exact with the kernel).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference
from .sampling import COUNT_SLOTS, group_size, write_next_call

_TRITON = None


def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
            _TRITON = False
    return _TRITON


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs on ``device``.

    CUDA runs the Triton kernel.  On the CPU the environment variable
    ``PEFT_BITFLIP_CPU_BACKEND`` chooses: ``reference`` (the vectorised PyTorch reference),
    ``triton`` (the kernel through Triton's interpreter, slow: needs ``TRITON_INTERPRET=1`` at
    import) or ``auto`` (default: ``triton`` when ``TRITON_INTERPRET=1``, else ``reference``).
    Both give bit-identical results.
    """
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        choice = os.environ.get("PEFT_BITFLIP_CPU_BACKEND", "auto")
        if choice not in ("auto", "reference", "triton"):
            raise ValueError(
                f"PEFT_BITFLIP_CPU_BACKEND must be auto, reference or triton, got {choice!r}"
            )
        if choice == "triton" or (choice == "auto" and interpreter_enabled()):
            if not (triton_available() and interpreter_enabled()):
                raise RuntimeError("the Triton CPU backend needs triton and TRITON_INTERPRET=1")
            return "triton"
    return "reference"


_KERNELS = None


def kernels():
    """The Triton kernel module :mod:`.triton_bitflip`, imported on first use (Triton may be
    missing on a CPU-only install) and then kept: a function-level import costs host time on
    every call."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_bitflip

        _KERNELS = triton_bitflip
    return _KERNELS


def _launch(x, table, call, key0, key1, threshold, has_flips, grad=None):
    return kernels().launch(x, table, call, key0, key1, threshold, has_flips, grad)


def kernel_next_call(call, next_call, device):
    """``next_call`` if the kernel on ``device`` can write it (same device as its call index),
    else None after writing it here."""
    if next_call is not None and not (next_call.device == device == call.device):
        write_next_call(call, next_call)
        return None
    return next_call


def _lanes_for(x, lanes, backend: str):
    """(x, lanes for the kernel): x's stuck input lanes (a (2, in_features) tensor, see
    :func:`.reference.stick_lanes`) go to the Triton kernel where it can take them (fused,
    no extra pass); elsewhere they are forced here first (the same bits by construction)."""
    if lanes is None:
        return x, None
    if backend == "triton" and x.size(-1) % group_size(x.dtype) == 0:
        return x, lanes
    return reference.stick_lanes(x, lanes), None


def _stuck_for(x, stuck, backend: str):
    """(x, stuck bits for the kernel): x's listed stuck bits (a
    :class:`~.sparse_stuck.SparseStuck`) go to the Triton kernel (forced in its pass over x);
    elsewhere they are forced here first, out of place (the same bits)."""
    if stuck is None:
        return x, None
    stuck.check_fits(x)
    if backend == "triton":
        return x, stuck
    return stuck.apply(x), None


def bitflip_impl(
    x, table, call, key0, key1, threshold, has_flips, next_call=None, lanes=None, stuck=None
):
    """Flip bits of ``x`` (any shape/strides) and zero out; returns a new contiguous tensor.
    ``next_call``: an optional 0-dim int64 tensor that receives ``call + 1`` (a layer's counter:
    written by the kernel itself on the GPU, no extra launch).  ``lanes``: x's stuck input
    lanes, ``stuck``: x's listed stuck bits, forced before the flips (:func:`_lanes_for`,
    :func:`_stuck_for`)."""
    backend = backend_for(x.device)
    x, lanes = _lanes_for(x, lanes, backend)
    x, stuck = _stuck_for(x, stuck, backend)
    xc = x.contiguous()
    if backend == "triton":
        call = call.to(x.device)
        next_call = kernel_next_call(call, next_call, x.device)
        return kernels().launch(
            xc, table, call, key0, key1, threshold, has_flips, next_call=next_call, lanes=lanes,
            stuck=stuck,
        )  # fmt: skip
    write_next_call(call, next_call)
    return reference.bitflip_reference(xc, table, int(call), key0, key1, threshold, has_flips)


def new_flip_counts(device) -> Tensor:
    """Zeroed counts for :func:`bitflip_counted_impl`: int64 (COUNT_SLOTS, 3) on ``device``;
    ``counts.sum(0)`` is [sign/exponent flips, mantissa flips, zeroed elements]."""
    return torch.zeros(COUNT_SLOTS, 3, dtype=torch.int64, device=device)


def bitflip_counted_impl(x, table, call, key0, key1, threshold, has_flips, counts, out=None):
    """:func:`bitflip_impl` on the Triton backend (contiguous ``x``) with the flips and the
    zeroed elements added to ``counts`` (int64 (COUNT_SLOTS, 3) on x's device, see
    :func:`new_flip_counts`: the sum of its rows is [sign/exponent flips, mantissa flips,
    zeroed]) by the flip kernel itself; ``out``: where the result goes (``x``: in place),
    default a new tensor (``counts`` and ``out`` as :func:`~.sampling.check_flip_counts`
    accepts them: its caller, ``stats.apply_flip_spec_counted``, checks them).  Returns the
    result."""
    if backend_for(x.device) != "triton" or not x.is_contiguous():
        raise ValueError("the counted flip runs the Triton kernel on a contiguous tensor")
    return kernels().launch(
        x, table, call.to(x.device), key0, key1, threshold, has_flips, counts=counts, out=out
    )


def bitflip_backward_impl(grad, x, table, call, key0, key1, threshold, has_flips):
    """``grad`` where the forward kept the element, 0 where it zeroed it (recomputed from x)."""
    xc, gc = x.contiguous(), grad.contiguous()
    if backend_for(x.device) == "triton":
        return _launch(xc, table, call.to(x.device), key0, key1, threshold, has_flips, gc)
    return reference.bitflip_backward_reference(
        gc, xc, table, int(call), key0, key1, threshold, has_flips
    )


def bitflip_masked_impl(
    x, table, call, key0, key1, threshold, has_flips, next_call=None, lanes=None, stuck=None
):
    """(flip of ``x`` as :func:`bitflip_impl` gives it, its packed zero mask: one uint8 per
    group of ``group_size(x.dtype)`` elements, bit j set when element j was zeroed), from one
    pass over ``x``.  ``threshold`` must not be None.  Not differentiable.  ``next_call``,
    ``lanes``, ``stuck``: as in :func:`bitflip_impl`."""
    backend = backend_for(x.device)
    x, lanes = _lanes_for(x, lanes, backend)
    x, stuck = _stuck_for(x, stuck, backend)
    xc = x.contiguous()
    if backend == "triton":
        call = call.to(x.device)
        next_call = kernel_next_call(call, next_call, x.device)
        return kernels().launch_with_mask(
            xc, table, call, key0, key1, threshold, has_flips, next_call, lanes, stuck
        )
    write_next_call(call, next_call)
    return reference.bitflip_masked_reference(
        xc, table, int(call), key0, key1, threshold, has_flips
    )


def zero_by_masks_impl(grads, masks, groups):
    """Set each contiguous ``grads[i]`` to 0 in place where the packed zero mask ``masks[i]``
    (groups of ``groups[i]`` elements) has a bit set; one launch on the GPU for up to two
    tensors on the same device."""
    for g in grads:
        if not g.is_contiguous():
            raise ValueError("grad must be contiguous to be masked in place")
    if (
        len(grads) <= 2
        and backend_for(grads[0].device) == "triton"
        and all(g.device == grads[0].device for g in grads)
    ):
        kernels().zero_by_masks_(list(grads), list(masks), list(groups))
        return
    for g, m, gs in zip(grads, masks, groups):
        reference.zero_by_mask_reference_(g, m, gs)


def bitflip_pair_impl(
    x,
    w,
    x_table,
    w_table,
    call,
    x_key,
    w_key,
    x_t,
    w_t,
    x_flips,
    w_flips,
    want_x_mask=False,
    next_call=None,
    x_lanes=None,
    w_stuck=None,
):
    """(flip of x, flip of w, x's packed zero mask or None) as :func:`bitflip_impl` /
    :func:`bitflip_masked_impl` would give them; one kernel launch on the GPU when x and w
    share a dtype (a layer's forward: half the launches).  The mask is returned when
    ``want_x_mask`` and ``x_t`` is not None.  ``next_call``: as in :func:`bitflip_impl`;
    ``x_lanes``: x's stuck input lanes (``lanes`` of :func:`bitflip_impl`); ``w_stuck``: w's
    listed stuck bits (``stuck`` of :func:`bitflip_impl`)."""
    want_x_mask = want_x_mask and x_t is not None
    backend = backend_for(x.device)
    x, x_lanes = _lanes_for(x, x_lanes, backend)
    w, w_stuck = _stuck_for(w, w_stuck, backend_for(w.device))
    if backend == "triton" and x.dtype == w.dtype and x.device == w.device:
        xc, wc = x.contiguous(), w.contiguous()
        call = call.to(x.device)
        return kernels().launch_pair(
            xc, wc, x_table, w_table, call, x_key, w_key, x_t, w_t, x_flips, w_flips,
            want_x_mask, kernel_next_call(call, next_call, x.device), x_lanes, w_stuck,
        )  # fmt: skip
    x_args = (x, x_table, call, *x_key, x_t, x_flips, next_call, x_lanes)  # lanes in x's launch
    if want_x_mask:
        xf, x_mask = bitflip_masked_impl(*x_args)
    else:
        xf, x_mask = bitflip_impl(*x_args), None
    wf = bitflip_impl(w, w_table, call, *w_key, w_t, w_flips, stuck=w_stuck)
    return xf, wf, x_mask


def bitflip_zero_grad_impl(
    x, grad, table, call, key0, key1, threshold, has_flips, want_y, lanes=None, stuck=None
):
    """Zero ``grad`` (contiguous, x's shape) in place where the forward zeroed ``x``, reading
    ``x`` once; returns the flipped ``x`` too when ``want_y`` (else None).  Not differentiable:
    for the backward passes of the layers, which own ``grad``.  ``lanes``, ``stuck``: x's stuck
    input lanes and listed stuck bits, as the forward forced them (:func:`bitflip_impl`)."""
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous to be masked in place")
    backend = backend_for(x.device)
    x, lanes = _lanes_for(x, lanes, backend)
    x, stuck = _stuck_for(x, stuck, backend)
    xc = x.contiguous()
    if backend == "triton":
        call = call.to(x.device)
        return kernels().launch_zero_grad_(
            xc, grad, table, call, key0, key1, threshold, has_flips, want_y, lanes, stuck
        )
    masked = reference.bitflip_backward_reference(
        grad, xc, table, int(call), key0, key1, threshold, has_flips
    )
    grad.copy_(masked)
    if not want_y:
        return None
    return reference.bitflip_reference(xc, table, int(call), key0, key1, threshold, has_flips)


@torch.library.custom_op("peft_bitflip::bitflip", mutates_args=())
def bitflip_op(
    x: Tensor,
    table: Tensor,
    call: Tensor,
    key0: int,
    key1: int,
    threshold: float | None,
    has_flips: bool,
) -> Tensor:
    """Flip bits of ``x`` (any shape/strides) and zero out; returns a new contiguous tensor."""
    return bitflip_impl(x, table, call, key0, key1, threshold, has_flips)


@bitflip_op.register_fake
def _bitflip_fake(x, table, call, key0, key1, threshold, has_flips):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("peft_bitflip::bitflip_backward", mutates_args=())
def bitflip_backward_op(
    grad: Tensor,
    x: Tensor,
    table: Tensor,
    call: Tensor,
    key0: int,
    key1: int,
    threshold: float,
    has_flips: bool,
) -> Tensor:
    """``grad`` where the forward kept the element, 0 where it zeroed it (recomputed from x)."""
    return bitflip_backward_impl(grad, x, table, call, key0, key1, threshold, has_flips)


@bitflip_backward_op.register_fake
def _bitflip_backward_fake(grad, x, table, call, key0, key1, threshold, has_flips):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    x, table, call, key0, key1, threshold, has_flips = inputs
    ctx.args = (key0, key1, threshold, has_flips)
    if threshold is not None:
        ctx.save_for_backward(x, table, call)


def _backward(ctx, grad, backward_fn=None):
    key0, key1, threshold, has_flips = ctx.args
    if threshold is None:
        grad_x = grad  # straight through: no element was zeroed
    else:
        x, table, call = ctx.saved_tensors
        fn = backward_fn or bitflip_backward_op
        grad_x = fn(grad, x, table, call, key0, key1, threshold, has_flips)
    return grad_x, None, None, None, None, None, None


bitflip_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBitflip(torch.autograd.Function):
    """The op's autograd outside ``torch.compile``, without the custom-op dispatch (whose
    Python overhead, ~75 us per call on an H100 host, exceeded the kernel time of a 1B model's
    layers at batch 1)."""

    @staticmethod
    def forward(ctx, x, table, call, key0, key1, threshold, has_flips):
        _setup_context(ctx, (x, table, call, key0, key1, threshold, has_flips), None)
        return bitflip_impl(x, table, call, key0, key1, threshold, has_flips)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, bitflip_backward_impl)


def bitflip(x, table, call, key0, key1, threshold, has_flips) -> Tensor:
    """``peft_bitflip::bitflip`` (differentiable); under ``torch.compile`` the custom op, in
    eager mode the same implementation called directly."""
    if torch.compiler.is_compiling():
        return bitflip_op(x, table, call, key0, key1, threshold, has_flips)
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerBitflip.apply(x, table, call, key0, key1, threshold, has_flips)
    return bitflip_impl(x, table, call, key0, key1, threshold, has_flips)


def bitflip_backward(grad, x, table, call, key0, key1, threshold, has_flips) -> Tensor:
    """``peft_bitflip::bitflip_backward`` (custom op under ``torch.compile``, else direct)."""
    if torch.compiler.is_compiling():
        return bitflip_backward_op(grad, x, table, call, key0, key1, threshold, has_flips)
    return bitflip_backward_impl(grad, x, table, call, key0, key1, threshold, has_flips)


@torch.library.custom_op("peft_bitflip::call_snapshot", mutates_args=())
def call_snapshot(counter: Tensor) -> Tensor:
    """A copy of a layer's call counter, as an opaque op: under ``torch.compile`` the call
    index of a forward, which the counter's in-place increment must not reach.  (A plain
    ``clone`` may be recomputed from the counter in the backward graph, after the increment:
    backward would then draw the next call's flips.)"""
    return counter.clone()


@call_snapshot.register_fake
def _call_snapshot_fake(counter):
    return torch.empty_like(counter)
