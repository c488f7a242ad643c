"""Functional bit-flip API: ``bitflip(x, p_exp, p_frac, zero_out_threshold, seed=, ...)``."""

from __future__ import annotations

import hashlib
import numbers

import torch
from torch import Tensor

from .kernels.op import bitflip as bitflip_dispatch
from .kernels.op import (
    bitflip_backward,
    bitflip_impl,
    bitflip_masked_impl,
    bitflip_pair_impl,
    bitflip_zero_grad_impl,
    zero_by_masks_impl,
)
from .kernels.reference import stick_lanes
from .kernels.sampling import flip_table, group_size, write_next_call, zero_mask_size
from .position_flips import flip_positions, zero_out_spec
from .spec import FlipSpec, check_dtype, validate_seed

__all__ = [
    "bitflip",
    "apply_flip_spec",
    "apply_flip_spec_masked",
    "apply_flip_specs",
    "flip_specs_masked",
    "flip_spec_grad",
    "flip_spec_grad_",
    "stream_key",
    "zero_masked_",
]

_MAX_CALL = (1 << 32) - 1


@torch.compiler.assume_constant_result
def stream_key(seed: int, *parts: int | str) -> tuple[int, int]:
    """Philox key (two uint32 words) of the stream named by ``seed`` and ``parts``.

    Parts are e.g. a module name, ``"x"``/``"w"`` and a data-parallel rank.  The key is a
    BLAKE2b hash of their text, stable across processes and machines, so different names give
    independent streams and equal names give equal streams.  ``seed``: an int in [0, 2**63), as
    :class:`~peft_bitflip.config.BitflipConfig` takes it; integer parts of any integer type
    (numpy's too) name the same stream as the equal ``int``.
    """
    seed = validate_seed("seed", seed)
    parts = [_plain(p) for p in parts]
    text = "\x1f".join([str(seed)] + [f"{type(p).__name__}:{p}" for p in parts])
    try:
        data = text.encode()
    except UnicodeEncodeError:
        bad = next(p for p in parts if isinstance(p, str) and not _is_utf8(p))
        raise ValueError(
            f"stream name {bad!r} is not valid text (it holds a lone surrogate, which UTF-8 "
            "cannot encode); name the stream with a valid str or an int"
        ) from None
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _plain(part):
    """A stream-name part as the plain int / str it equals (numpy ints, str subclasses)."""
    if isinstance(part, numbers.Integral) and not isinstance(part, bool):
        return int(part)
    return str(part) if isinstance(part, str) else part


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _call_tensor(call, device: torch.device) -> Tensor:
    if isinstance(call, Tensor):
        if call.dtype is torch.int64 and call.dim() == 0:  # the layers' counters
            return call
        if call.numel() != 1 or call.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"call must be an int or a one-element integer tensor, got {call!r}")
        return call.reshape(())
    if (
        isinstance(call, bool)
        or not isinstance(call, numbers.Integral)
        or not 0 <= int(call) <= _MAX_CALL
    ):
        raise ValueError(f"call must be an int in [0, 2**32), got {call!r}")
    return torch.tensor(int(call), dtype=torch.int64, device=device)


def _checked_call(call):
    """``call`` with a tensor's value range-checked (a host sync; the layers' counters skip this
    check): an index outside [0, 2**32) would alias another call's flips."""
    if isinstance(call, Tensor) and not torch.compiler.is_compiling():
        _call_tensor(call, call.device)  # type and shape
        value = int(call.reshape(()).item())
        if not 0 <= value <= _MAX_CALL:
            raise ValueError(
                f"call must be an int in [0, 2**32), got a tensor holding {value} (an index "
                "outside that range would reuse the flips of another call)"
            )
    return call


class _StraightThrough(torch.autograd.Function):
    """``y`` in the forward; the gradient goes to ``x`` unchanged (the flips' rule)."""

    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _stuck_lanes(x: Tensor, lanes: Tensor | None) -> Tensor:
    """``x`` with its stuck input lanes forced (a separate pass, straight-through
    differentiable), for the paths that do not hand them to a flip kernel; ``x`` if None."""
    if lanes is None:
        return x
    stuck = stick_lanes(x.detach(), lanes)
    return _StraightThrough.apply(x, stuck) if x.requires_grad else stuck


def _stuck_listed(x: Tensor, stuck) -> Tensor:
    """``x`` with its listed stuck bits (a :class:`~.kernels.sparse_stuck.SparseStuck`)
    forced (a separate pass, straight-through differentiable), for the paths that do not hand
    them to a flip kernel; ``x`` if None."""
    if stuck is None:
        return x
    forced = stuck.apply(x.detach())
    return _StraightThrough.apply(x, forced) if x.requires_grad else forced


def _flipped_positions(x: Tensor, spec: FlipSpec, key, call: Tensor) -> Tensor:
    """The flips of a spec with ``p_bits`` (no zero-out), straight-through differentiable."""
    if not spec.flips:
        return x
    y = flip_positions(x, spec, key, call)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _StraightThrough.apply(x, y)
    return y


@torch.compiler.disable
def _apply_p_bits(x: Tensor, spec: FlipSpec, key, call: Tensor) -> Tensor:
    """:func:`apply_flip_spec` of a spec with ``p_bits``: the class passes, then zero-out.
    Eager also under ``torch.compile`` (a graph break): its passes read several cached flip
    tables, and a graph holds one such constant at most."""
    y = _flipped_positions(x, spec, key, call)
    return apply_flip_spec(y, zero_out_spec(spec.zero_out_threshold), key, call)


def apply_flip_spec(
    x: Tensor, spec: FlipSpec, key: tuple[int, int], call: int | Tensor = 0
) -> Tensor:
    """Apply ``spec`` to ``x`` with the stream ``key`` (see :func:`stream_key`) at ``call``.

    Differentiable (straight-through, zero where zeroed).  Returns ``x`` itself when the spec
    changes nothing (no flips, no threshold).  A spec with ``p_bits`` flips in one pass per
    class of equal rate (:mod:`~peft_bitflip.position_flips`), then zeroes out.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dtype(x.dtype)
    call = _call_tensor(call, x.device)
    if spec.is_identity:
        return x
    if spec.p_bits is not None:
        return _apply_p_bits(x, spec, key, call)
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
    return bitflip_dispatch(x, table, call, key[0], key[1], spec.zero_out_threshold, spec.flips)


def _check_tensors(x, w):
    for t in (x, w):
        if not isinstance(t, Tensor):
            raise TypeError(f"x and w must be torch.Tensors, got {type(t).__name__}")


def apply_flip_specs(
    x: Tensor,
    w: Tensor,
    x_spec: FlipSpec,
    w_spec: FlipSpec,
    x_key: tuple[int, int],
    w_key: tuple[int, int],
    call: int | Tensor = 0,
    next_call: Tensor | None = None,
    x_lanes: Tensor | None = None,
    w_stuck=None,
) -> tuple[Tensor, Tensor]:
    """``(apply_flip_spec(x, x_spec, x_key, call), apply_flip_spec(w, w_spec, w_key, call))``
    (the same values), with one kernel launch for both where it can: a layer's forward.
    Differentiable like two :func:`apply_flip_spec` calls (which it makes when a gradient is
    needed or under ``torch.compile``).

    ``next_call``: an optional 0-dim int64 tensor (not ``call`` itself) that receives
    ``call + 1``, written by the flip kernel where one runs (how the layers advance their call
    counters without a launch of their own), else by a torch op.

    ``x_lanes``: stuck input lanes of x (a (2, in_features) tensor of keep / ones words in
    the signed integer view of x's dtype, see :meth:`~peft_bitflip.stuck_at.StuckAt.lanes`),
    forced before x's flips: by the flip kernel itself where it can (no extra pass over x),
    else by a separate pass; straight-through.  ``w_stuck``: w's listed stuck bits (a
    :class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck` drawn for w's element count and
    dtype, see :meth:`~peft_bitflip.stuck_at.StuckAt.sparse`), forced before w's flips in the
    same way."""
    _check_tensors(x, w)
    differentiable = torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    )
    if differentiable:
        x, w = _stuck_lanes(x, x_lanes), _stuck_listed(w, w_stuck)
        out = apply_flip_spec(x, x_spec, x_key, call), apply_flip_spec(w, w_spec, w_key, call)
        if next_call is not None:
            write_next_call(_call_tensor(call, next_call.device), next_call)
        return out
    return flip_specs_masked(
        x, w, x_spec, w_spec, x_key, w_key, call, next_call=next_call, x_lanes=x_lanes,
        w_stuck=w_stuck,
    )[:2]  # fmt: skip


def flip_specs_masked(
    x: Tensor,
    w: Tensor,
    x_spec: FlipSpec,
    w_spec: FlipSpec,
    x_key: tuple[int, int],
    w_key: tuple[int, int],
    call: int | Tensor = 0,
    want_x_mask: bool = False,
    next_call: Tensor | None = None,
    x_lanes: Tensor | None = None,
    w_stuck=None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(flip of x, flip of w, x's packed zero mask or None) as :func:`apply_flip_spec_masked`
    gives them, with one kernel launch for both where it can.  Not differentiable: for the
    forward of layers that write their own backward.  ``next_call``, ``x_lanes``,
    ``w_stuck``: as in :func:`apply_flip_specs`."""
    _check_tensors(x, w)
    lanes, stuck = dict(x_lanes=x_lanes), dict(stuck=w_stuck)
    if x_spec.p_bits is not None or w_spec.p_bits is not None:  # no pair kernel: one by one
        xf, x_mask = apply_flip_spec_masked(x, x_spec, x_key, call, want_x_mask, next_call, **lanes)
        return xf, apply_flip_spec_masked(w, w_spec, w_key, call, False, **stuck)[0], x_mask
    if x_spec.is_identity or w_spec.is_identity:
        if not x_spec.is_identity:  # the x flip writes next_call
            xf, x_mask = apply_flip_spec_masked(
                x, x_spec, x_key, call, want_x_mask, next_call, **lanes
            )
            return xf, apply_flip_spec(_stuck_listed(w, w_stuck), w_spec, w_key, call), x_mask
        wf, _ = apply_flip_spec_masked(w, w_spec, w_key, call, False, next_call, **stuck)
        return apply_flip_spec(_stuck_lanes(x, x_lanes), x_spec, x_key, call), wf, None
    check_dtype(x.dtype, "x")
    check_dtype(w.dtype, "w")
    call = _call_tensor(call, x.device)
    x_table = flip_table(x_spec.effective_p_exp, x_spec.effective_p_frac, x.dtype, x.device)
    w_table = flip_table(w_spec.effective_p_exp, w_spec.effective_p_frac, w.dtype, w.device)
    return bitflip_pair_impl(
        x,
        w,
        x_table,
        w_table,
        call,
        x_key,
        w_key,
        x_spec.zero_out_threshold,
        w_spec.zero_out_threshold,
        x_spec.flips,
        w_spec.flips,
        want_x_mask,
        next_call,
        x_lanes,
        w_stuck,
    )


def apply_flip_spec_masked(
    x: Tensor,
    spec: FlipSpec,
    key: tuple[int, int],
    call: int | Tensor = 0,
    want_mask: bool = True,
    next_call: Tensor | None = None,
    x_lanes: Tensor | None = None,
    stuck=None,
) -> tuple[Tensor, Tensor | None]:
    """(``apply_flip_spec(x, spec, key, call)``, the packed zero mask of x or None), from one
    pass over ``x``.  Not differentiable.

    The packed zero mask records which elements the zero-out removed, in ``x``'s logical
    (row-major) element order: one uint8 per group of ``group_size(x.dtype)`` elements (8 for
    16-bit dtypes, 4 for float32), bit j set when element j of the group was zeroed.  It is
    1/16 of the size of a bf16 tensor, so a backward pass can keep it instead of ``x`` and mask
    the gradient with :func:`zero_masked_`.  None when not ``want_mask`` or the spec has no
    threshold (nothing is ever zeroed).  ``next_call``, ``x_lanes`` (stuck input lanes of
    ``x``): as in :func:`apply_flip_specs`; ``stuck``: x's listed stuck bits (``w_stuck`` of
    :func:`apply_flip_specs`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dtype(x.dtype)
    call = _call_tensor(call, x.device)
    if spec.is_identity:
        write_next_call(call, next_call)
        return _stuck_listed(_stuck_lanes(x, x_lanes), stuck), None
    if spec.p_bits is not None:
        write_next_call(call, next_call)
        x = _stuck_listed(_stuck_lanes(x, x_lanes), stuck)
        y = flip_positions(x, spec, key, call) if spec.flips else x
        return apply_flip_spec_masked(
            y, zero_out_spec(spec.zero_out_threshold), key, call, want_mask
        )
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
    t, flips = spec.zero_out_threshold, spec.flips
    args = (x, table, call, key[0], key[1], t, flips, next_call, x_lanes, stuck)
    if not want_mask or t is None:
        return bitflip_impl(*args), None
    return bitflip_masked_impl(*args)


def zero_masked_(grad: Tensor, mask: Tensor | None, dtype: torch.dtype, *more) -> Tensor:
    """Set ``grad`` (contiguous, in the element order of the tensor the mask came from) to 0 in
    place where the packed zero mask of :func:`apply_flip_spec_masked` has a bit set; ``dtype``
    is that tensor's dtype (it sets the group size).  ``mask=None``: nothing to zero.  Returns
    ``grad``.

    ``more``: a second ``(grad, mask, dtype)`` to mask in the same kernel launch (a layer's
    input and weight gradients)."""
    jobs = [(grad, mask, dtype)]
    if more:
        if len(more) != 3:
            raise TypeError("zero_masked_ takes one more (grad, mask, dtype) triple at most")
        jobs.append(tuple(more))
    jobs = [(g, m, d) for g, m, d in jobs if m is not None]
    for g, m, d in jobs:
        expected = zero_mask_size(g.numel(), d)
        if m.dtype != torch.uint8 or m.numel() != expected:
            raise ValueError(
                f"mask must be a uint8 tensor of {expected} groups for {g.numel()} elements of "
                f"{d}, got {m.dtype} with {m.numel()} elements"
            )
    if jobs:
        grads, masks, dtypes = zip(*jobs)
        zero_by_masks_impl(grads, masks, [group_size(d) for d in dtypes])
    return grad


def flip_spec_grad(
    grad: Tensor, x: Tensor, spec: FlipSpec, key: tuple[int, int], call: int | Tensor = 0
) -> Tensor:
    """The gradient of :func:`apply_flip_spec` at ``x``: ``grad`` where the forward kept the
    element, 0 where it zeroed it (recomputed from ``x``, nothing stored)."""
    if spec.is_identity or spec.zero_out_threshold is None:
        return grad
    call = _call_tensor(call, x.device)
    if spec.p_bits is not None:  # the zero-out of the flipped x decides
        y = flip_positions(x, spec, key, call) if spec.flips else x
        return flip_spec_grad(grad, y, zero_out_spec(spec.zero_out_threshold), key, call)
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
    return bitflip_backward(
        grad, x, table, call, key[0], key[1], spec.zero_out_threshold, spec.flips
    )


def flip_spec_grad_(
    grad: Tensor | None,
    x: Tensor,
    spec: FlipSpec,
    key: tuple[int, int],
    call: int | Tensor = 0,
    want_flipped: bool = False,
    x_lanes: Tensor | None = None,
    stuck=None,
) -> Tensor | None:
    """:func:`flip_spec_grad` in place: sets ``grad`` (contiguous, ``x``'s shape) to 0 where the
    forward zeroed ``x``.  With ``want_flipped`` also returns ``apply_flip_spec(x, ...)``, from
    the same pass over ``x``.  For backward passes that own ``grad`` (not differentiable);
    on the GPU only the zeroed elements of ``grad`` are written.  ``grad=None`` (no input
    gradient wanted) only flips.  ``x_lanes``, ``stuck``: the stuck input lanes and listed
    stuck bits the forward forced before flipping ``x`` (see :func:`apply_flip_specs`)."""
    masks = not spec.is_identity and spec.zero_out_threshold is not None
    if grad is None or not masks:
        if not want_flipped:
            return None
        if x_lanes is not None or stuck is not None:
            return apply_flip_spec_masked(x, spec, key, call, False, None, x_lanes, stuck)[0]
        return apply_flip_spec(x, spec, key, call)
    call = _call_tensor(call, x.device)
    if spec.p_bits is not None:  # the zero-out of the flipped x decides
        x = _stuck_listed(_stuck_lanes(x, x_lanes), stuck)
        y = flip_positions(x, spec, key, call) if spec.flips else x
        zero = zero_out_spec(spec.zero_out_threshold)
        return flip_spec_grad_(grad, y, zero, key, call, want_flipped)
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
    return bitflip_zero_grad_impl(
        x, grad, table, call, key[0], key[1], spec.zero_out_threshold, spec.flips,
        want_flipped, x_lanes, stuck,
    )  # fmt: skip


def bitflip(
    x: Tensor,
    p_exp: float = 0.0,
    p_frac: float = 0.0,
    zero_out_threshold: float | None = None,
    *,
    seed: int = 0,
    stream: int | str = 0,
    call: int | Tensor = 0,
    compat_snap: bool = False,
    p_bits: dict | None = None,
) -> Tensor:
    """Randomly flip bits of a float tensor and zero out large values.

    Each sign/exponent bit flips with probability ``p_exp`` and each mantissa bit with
    ``p_frac``, independently (exact for any p in [0, 1]).  Then every element with
    ``|y| >= zero_out_threshold`` (inclusive), NaN or +-Inf becomes 0 (``None``: no zero-out).
    The result is a pure function of (x's values, settings, ``seed``, ``stream``, ``call``) and
    does not depend on x's strides or device.  The gradient is straight-through, and zero where
    the forward zeroed.

    Args:
        x: float32, bfloat16 or float16 tensor of any shape.
        seed, stream: name the random stream (see :func:`stream_key`).
        call: call index within the stream: an int in [0, 2**32) or a one-element integer
            tensor holding one (its value is checked, which waits for the device).
        compat_snap: snap p to the original's ``0.5**ceil(log2(1/p))``, n in [1, 24].
        p_bits: per-bit-position rates ``{position: p}`` overriding the groups' (position 0 =
            least significant bit, ``"sign"`` = the top bit; see :class:`FlipSpec`).
    """
    spec = FlipSpec(p_exp, p_frac, zero_out_threshold, compat_snap, p_bits)
    return apply_flip_spec(x, spec, stream_key(seed, stream), _checked_call(call))
