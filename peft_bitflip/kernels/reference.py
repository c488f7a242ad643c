"""Vectorised PyTorch reference of the bit-flip kernel, bit-exact with the Triton kernel.

Runs on any device with plain integer tensor ops (uint32 arithmetic emulated in int64).  It
is the CPU path when the Triton interpreter is not enabled, and the oracle in the tests.
Only groups that hold a flip enter the gap-sampling loop, so its cost at small p is one
Philox draw per group.
"""

from __future__ import annotations

import torch

from ..spec import check_dtype
from .sampling import (
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    field_sizes,
    group_size,
)

_M32 = 0xFFFFFFFF
_INT_VIEW = {16: torch.int16, 32: torch.int32}


def _mulhilo(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant ``m`` and uint32 ``a``."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    t_hi = a * m_hi  # < 2^48
    t_lo = a * m_lo  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (t_lo + ((t_hi & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors that hold uint32 values; same round function as the kernel."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _M32
        k1 = (k1 + PHILOX_W1) & _M32
    return c0, c1, c2, c3


def _uniforms(groups: torch.Tensor, iteration: int, call: int, k0: int, k1: int):
    """The 63-bit uniforms (exp field, frac field) of ``groups`` at ``iteration``."""
    c0 = groups & _M32
    c1 = groups >> 32
    c2 = torch.full_like(groups, iteration)
    c3 = torch.full_like(groups, call & _M32)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1)
    return ((w0 >> 1) << 32) | w1, ((w2 >> 1) << 32) | w3


def flip_masks(
    n_elements: int,
    dtype: torch.dtype,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    device=None,
    start: int = 0,
) -> torch.Tensor:
    """XOR masks (int64 holding the unsigned pattern) for elements ``[start, start + n_elements)``.

    ``start`` must be a multiple of the group size; it lets tests check the tail of tensors
    with more than 2^31 elements without materialising the whole mask.
    """
    layout = check_dtype(dtype)
    g = group_size(dtype)
    if start % g:
        raise ValueError(f"start must be a multiple of the group size {g}, got {start}")
    n_e, n_f = field_sizes(dtype)
    table = table.to(device=device, dtype=torch.int64)
    n_groups = (n_elements + g - 1) // g
    groups = torch.arange(n_groups, dtype=torch.int64, device=device) + start // g
    masks = torch.zeros(n_groups * g, dtype=torch.int64, device=device)
    first = start // g
    u_e, u_f = _uniforms(groups, 0, call, k0, k1)
    fields = (
        (0, u_e, table[:n_e], layout.n_exp, layout.n_bits - layout.n_exp),
        (1, u_f, table[n_e:], layout.n_frac, 0),
    )
    for word, u, t, per_elem, shift in fields:
        n_field = t.numel()
        active = u <= t[-1]
        idx = groups[active]
        u = u[active]
        pos = torch.zeros_like(idx)
        it = 0
        while idx.numel():
            gap = torch.searchsorted(t, u, side="left")  # number of j with t[j] < u
            q = pos + gap
            take = q < n_field
            idx, q = idx[take], q[take]
            elem = (idx - first) * g + q // per_elem
            masks[elem] ^= 1 << (q % per_elem + shift)
            pos = q + 1
            more = pos < n_field
            idx, pos = idx[more], pos[more]
            it += 1
            u = _uniforms(idx, it, call, k0, k1)[word]
    return masks[:n_elements]


def bitflip_reference(
    x: torch.Tensor,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    threshold: float | None,
    has_flips: bool = True,
) -> torch.Tensor:
    """Flip bits of ``x`` as the kernel does, then zero ``|y| >= threshold``, NaN and Inf."""
    layout = check_dtype(x.dtype)
    flat = x.contiguous().view(-1)
    y = flat
    if has_flips and flat.numel():
        ints = flat.view(_INT_VIEW[layout.n_bits])
        m = flip_masks(flat.numel(), x.dtype, table, call, k0, k1, device=x.device)
        half = 1 << (layout.n_bits - 1)
        m = torch.where(m >= half, m - 2 * half, m).to(ints.dtype)  # unsigned -> signed view
        y = (ints ^ m).view(x.dtype)
    y = zero_out(y, threshold)
    return y.view(x.shape) if y is not flat else flat.clone().view(x.shape)


def keep_mask(y: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where ``|y| < threshold`` in float32 (NaN, Inf and ``|y| >= t`` are False)."""
    t = torch.tensor(threshold, dtype=torch.float32, device=y.device)
    return y.to(torch.float32).abs() < t


def zero_out(y: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return y
    return torch.where(keep_mask(y, threshold), y, torch.zeros((), dtype=y.dtype, device=y.device))


def bitflip_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    threshold: float,
    has_flips: bool = True,
) -> torch.Tensor:
    """Straight-through gradient: ``grad`` where the forward kept the element, 0 where it zeroed."""
    y = bitflip_reference(x, table, call, k0, k1, None, has_flips)
    keep = keep_mask(y, threshold).view(grad.shape)
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def pack_zero_mask(zeroed: torch.Tensor, group: int) -> torch.Tensor:
    """The packed zero mask of a bool tensor (True = zeroed), in its element order: one uint8
    per group of ``group`` elements, bit j set when element j of the group is True."""
    flat = zeroed.reshape(-1)
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = 1 << torch.arange(group, device=flat.device, dtype=torch.int32)
    return (flat.view(-1, group).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_zero_mask(mask: torch.Tensor, n_elements: int, group: int) -> torch.Tensor:
    """The bool tensor (``n_elements``, True = zeroed) of a packed zero mask."""
    shifts = torch.arange(group, device=mask.device, dtype=torch.int32)
    bits = (mask.to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n_elements].bool()


def bitflip_masked_reference(
    x: torch.Tensor,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    threshold: float,
    has_flips: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`bitflip_reference`, its packed zero mask; see :func:`pack_zero_mask`)."""
    y = bitflip_reference(x, table, call, k0, k1, None, has_flips)
    keep = keep_mask(y, threshold)
    y = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y, pack_zero_mask(~keep, group_size(x.dtype))


def zero_by_mask_reference_(grad: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """Set contiguous ``grad`` to 0 in place where the packed zero mask has a bit set."""
    flat = grad.view(-1)
    flat.masked_fill_(unpack_zero_mask(mask, flat.numel(), group), 0)
    return grad
