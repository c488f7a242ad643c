"""PyTorch reference of the burst kernel, bit-exact with it (:mod:`.burst_sampling`).

The CPU path when the Triton interpreter is not enabled, and the oracle in the tests.  On the
CPU it runs through the native pass (``pbf_burst`` in ``cpu_native.c``: the first draw
vectorised, the gap loop only for groups with an event, the zero-out, in one pass), checked
once per process against the torch path below; ``PEFT_BITFLIP_CPU_NATIVE=0``, a failed build
or a failed check leave the torch path.  There the first draw of every group (does it hold an
event?) is the flip reference's compiled first draw; only groups with an event enter the gap
loop, so the cost tracks the event count.
"""

from __future__ import annotations

import torch

from ..spec import check_dtype
from . import cpu_native
from .burst_sampling import BurstShape, burst_shape, burst_table
from .reference import (
    _COMPILE_FROM,
    _EAGER,
    _M32,
    _MIN_COMPILED,
    _words,
    cpu_path,
    native_library,
    zero_out,
)
from .sampling import group_size

_INT_VIEW = {16: torch.int16, 32: torch.int32}
_CHUNK_GROUPS = 1 << 22


@torch.no_grad()
def burst_events(
    n_elements: int,
    dtype: torch.dtype,
    table: torch.Tensor,
    shape: BurstShape,
    call: int,
    k0: int,
    k1: int,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(element indices, int64 XOR masks holding the unsigned pattern) of the elements of
    ``[0, n_elements)`` that hold a burst event, in increasing order."""
    check_dtype(dtype)
    g = group_size(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    table = table.to(device=device, dtype=torch.int64)
    gaps, thresholds = table[:g], table[g : g + shape.n_len]
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if int(gaps[-1]) < 0 or n_elements == 0:  # rate 0: no event anywhere
        return empty, empty
    n_groups = (n_elements + g - 1) // g
    fns = cpu_path(device) if n_elements >= _COMPILE_FROM else _EAGER
    z = torch.zeros((), dtype=torch.int64, device=device)
    keys = (z + (call & _M32), z + k0, z + k1)
    hits = []
    for c in range(0, n_groups, _CHUNK_GROUPS):
        n = min(_CHUNK_GROUPS, n_groups - c)
        draw = fns.first_draw if n >= _MIN_COMPILED else _EAGER.first_draw
        hit, _ = draw(z + c, n, *keys, gaps[-1], z - 1)  # words 0-1: the gap uniform
        hits.append(hit.nonzero().view(-1) + c)
    idx = torch.cat(hits)
    pos = torch.zeros_like(idx)
    elems, masks = [], []
    it = 0
    while idx.numel():
        w0, w1, w2, w3 = _words(idx, z + it, *keys)
        u = ((w0 >> 1) << 32) | w1
        q = pos + torch.searchsorted(gaps, u, side="left")  # number of entries below u
        take = q < g
        idx, q, w2, w3 = idx[take], q[take], w2[take], w3[take]
        k = shape.k_min + (thresholds[None, :] <= w3[:, None]).sum(1)
        start = shift_start(w2, shape.width + 1 - k) + shape.shift
        elems.append(idx * g + q)
        masks.append(((torch.ones_like(k) << k) - 1) << start)
        pos = q + 1
        more = pos < g
        idx, pos = idx[more], pos[more]
        it += 1
    if not elems:
        return empty, empty
    elem, mask = torch.cat(elems), torch.cat(masks)
    keep = elem < n_elements  # the padding of the last group
    elem, mask = elem[keep], mask[keep]
    order = torch.argsort(elem)
    return elem[order], mask[order]


def shift_start(w2: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``floor(w2 * n / 2^32)`` (uint32 ``w2``, ``n`` <= 32 in int64): the start offset."""
    return (w2 * n) >> 32


def burst_reference(
    x: torch.Tensor,
    table: torch.Tensor,
    shape: BurstShape,
    call: int,
    k0: int,
    k1: int,
    threshold: float | None = None,
) -> torch.Tensor:
    """``x`` with the burst events of (table, shape, call, key) applied, then zero-out
    (``|y| >= threshold``, NaN, Inf -> 0; None: none); a new contiguous tensor."""
    check_dtype(x.dtype)
    lib = _native_burst_library(x.device, k0, k1)
    if lib is not None:
        flat = x.contiguous().view(-1)
        y = torch.empty_like(flat)
        if flat.numel():
            cpu_native.burst(lib, flat, y, table, shape, call, k0, k1, threshold)
        return y.view(x.shape)
    return _torch_burst(x, table, shape, call, k0, k1, threshold)


def _torch_burst(x, table, shape, call, k0, k1, threshold):
    """:func:`burst_reference` with torch ops only (the path without the native pass)."""
    layout = check_dtype(x.dtype)
    y = x.contiguous().view(-1).clone()
    elem, mask = burst_events(y.numel(), x.dtype, table, shape, call, k0, k1, x.device)
    if elem.numel():
        half = 1 << (layout.n_bits - 1)
        mask = torch.where(mask >= half, mask - 2 * half, mask)  # unsigned -> signed view
        ints = y.view(_INT_VIEW[layout.n_bits])
        ints[elem] = ints[elem] ^ mask.to(ints.dtype)
    return zero_out(y, threshold).view(x.shape)


_NATIVE_BURST: list = []


def _native_burst_library(device, k0: int, k1: int):
    """The native pass for bursts on ``device`` (see :func:`.reference.native_library`), or
    None; its burst path is checked once per process against :func:`_torch_burst`."""
    lib = native_library(device, k0, k1)
    if lib is None:
        return None
    if not _NATIVE_BURST:
        ok = _native_burst_agrees(lib)
        if not ok:
            import warnings

            warnings.warn(
                "peft_bitflip: the native CPU burst path differs from the torch reference on "
                "this machine; bursts on the CPU run through torch (bit-identical, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        _NATIVE_BURST.append(lib if ok else None)
    return _NATIVE_BURST[0]


def _native_burst_agrees(lib) -> bool:
    """Whether the native burst pass gives the torch path's bits on a small check (every dtype,
    a tail group, a length distribution, every field, with and without the zero-out)."""
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(4099, generator=gen) * 8).to(dtype)
        for rate, lengths, field, t in (
            (0.05, ((2, 0.25), (3, 0.5), (5, 0.25)), "any", 4.0),
            (0.3, ((2, 1.0),), "exp", None),
            (0.01, ((3, 1.0),), "frac", 1.0),
        ):
            table = burst_table(rate, lengths, dtype, "cpu")
            shape = burst_shape(lengths, field, dtype)
            y = torch.empty_like(x)
            cpu_native.burst(lib, x, y, table, shape, 7, 0x9E3779B9, 0xFFFFFFF1, t)
            want = _torch_burst(x, table, shape, 7, 0x9E3779B9, 0xFFFFFFF1, t)
            ints = _INT_VIEW[check_dtype(dtype).n_bits]
            if not torch.equal(y.view(ints), want.view(ints)):
                return False
    return True
