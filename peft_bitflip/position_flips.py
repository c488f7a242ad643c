"""Per-bit-position flip rates (``FlipSpec.p_bits``) on top of the two-group flip kernel.

The kernels sample two fields per element (sign + exponent, mantissa) at one rate each.  A spec
with ``p_bits`` gives every bit position of the dtype a rate (:meth:`FlipSpec.bit_rates`); the
positions with equal nonzero rate form a *class*, and each class is one pass of the unchanged
kernel (its CPU reference on the CPU) at that rate, zero-out off, of which only the class's
positions are kept::

    y = x ^ OR_c((flip_c(x) ^ x) & mask_c)

Class ``c`` draws from its own Philox key: the first 8 bytes of BLAKE2b over the tensor's
stream key ``(k0, k1)`` and the class's sorted positions (:func:`class_key`), so classes are
independent of each other and of the tensor's group stream, and a flip at one position is a
pure function of (values, config, seed, stream, call).  The zero-out runs once, on ``y``, by the
kernel with no flips (:func:`zero_out_spec`); the gradient is straight-through, zero where that
zero-out removed an element of ``y``.
"""

from __future__ import annotations

import functools
import hashlib
from typing import NamedTuple

import torch
from torch import Tensor

from .kernels.op import bitflip as bitflip_dispatch
from .kernels.sampling import flip_table
from .spec import FlipSpec, check_dtype

__all__ = ["FlipClass", "class_key", "flip_classes", "flip_positions", "zero_out_spec"]

_INT_VIEW = {16: torch.int16, 32: torch.int32}


class FlipClass(NamedTuple):
    """Bit positions of one dtype that share a nonzero rate ``p``: ``mask`` (the positions'
    bits as the signed int of the dtype's width), the kernel's ``(p_exp, p_frac)`` for the
    pass (``p`` for a field the class has positions in, else 0)."""

    positions: tuple[int, ...]
    p: float
    mask: int
    p_exp: float
    p_frac: float


@functools.lru_cache(maxsize=1024)
def flip_classes(spec: FlipSpec, dtype: torch.dtype) -> tuple[FlipClass, ...]:
    """The classes of ``spec`` on ``dtype``, lowest position first."""
    layout = check_dtype(dtype)
    by_rate: dict[float, list[int]] = {}
    for position, p in enumerate(spec.bit_rates(dtype)):
        if p > 0:
            by_rate.setdefault(p, []).append(position)
    classes = []
    for p, positions in by_rate.items():
        mask = sum(1 << i for i in positions)
        if mask >= 1 << (layout.n_bits - 1):  # the sign bit: the signed int of that width
            mask -= 1 << layout.n_bits
        in_exp = positions[-1] >= layout.n_frac
        in_frac = positions[0] < layout.n_frac
        classes.append(
            FlipClass(tuple(positions), p, mask, p if in_exp else 0.0, p if in_frac else 0.0)
        )
    return tuple(classes)


@torch.compiler.assume_constant_result
def class_key(key: tuple[int, int], positions: tuple[int, ...]) -> tuple[int, int]:
    """Philox key (two uint32 words) of a class: BLAKE2b over ``"p_bits"``, the tensor's key
    and the class's positions."""
    text = "\x1f".join(["p_bits", str(int(key[0])), str(int(key[1]))] + [str(i) for i in positions])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def flip_positions(x: Tensor, spec: FlipSpec, key: tuple[int, int], call: Tensor) -> Tensor:
    """``x`` with the bit flips of ``spec`` (``p_bits`` and the groups, no zero-out): a new
    contiguous tensor, not differentiable.  ``call``: a 0-dim integer tensor."""
    layout = check_dtype(x.dtype)
    view = _INT_VIEW[layout.n_bits]
    xc = x.detach().contiguous()
    xi = xc.view(view)
    change = None
    for c in flip_classes(spec, x.dtype):
        table = flip_table(c.p_exp, c.p_frac, x.dtype, x.device)
        k0, k1 = class_key(key, c.positions)
        flipped = bitflip_dispatch(xc, table, call, k0, k1, None, True).view(view)
        kept = (flipped ^ xi) & c.mask
        change = kept if change is None else change | kept
    if change is None:
        return xc.clone()
    return (xi ^ change).view(x.dtype)


@functools.lru_cache(maxsize=256)
def zero_out_spec(threshold: float | None) -> FlipSpec:
    """The spec of the final zero-out alone (no flips)."""
    return FlipSpec(zero_out_threshold=threshold)
