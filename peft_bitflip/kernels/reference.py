"""Vectorised PyTorch reference of the bit-flip kernel, bit-exact with the Triton kernel.

Runs on any device with plain integer tensor ops (uint32 arithmetic emulated in int64).  It
is the CPU path when the Triton interpreter is not enabled, and the oracle in the tests.
Only groups that hold a flip enter the gap-sampling loop, so its cost at small p is one
Philox draw per group: that first draw runs as one compiled loop on the CPU (``torch.compile``;
eager where compiling is off or fails), and flips are applied only to the elements they hit.
"""

from __future__ import annotations

import torch

from ..spec import check_dtype
from . import cpu_native
from .sampling import (
    DENSE_DIGITS,
    DENSE_ITERATION,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    dense_words,
    field_sizes,
    group_size,
    table_values,
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


def _mulhilo_wrapping(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mulhilo` from one int64 product: ``a * m < 2^64`` wraps to the same 64-bit
    pattern in two's complement, so masking recovers both words (the compiled CPU path; checked
    against :func:`_mulhilo` when it is compiled)."""
    prod = a * m
    return (prod >> 32) & _M32, prod & _M32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS, mulhilo=_mulhilo):
    """Philox4x32 on int64 tensors that hold uint32 values; same round function as the kernel."""
    for _ in range(rounds):
        hi0, lo0 = mulhilo(PHILOX_M0, c0)
        hi1, lo1 = mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _M32
        k1 = (k1 + PHILOX_W1) & _M32
    return c0, c1, c2, c3


def _uniforms(groups: torch.Tensor, iteration, call, k0, k1, mulhilo=_mulhilo):
    """The 63-bit uniforms (exp field, frac field) of ``groups`` at ``iteration`` (``iteration``,
    ``call``, ``k0``, ``k1``: ints or 0-dim int64 tensors)."""
    c0 = groups & _M32
    c1 = groups >> 32
    c2 = torch.zeros_like(groups) + iteration
    c3 = torch.zeros_like(groups) + (call & _M32)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1, mulhilo=mulhilo)
    return ((w0 >> 1) << 32) | w1, ((w2 >> 1) << 32) | w3


def _words(groups: torch.Tensor, iteration, call, k0, k1, mulhilo=_mulhilo):
    """The four uint32 words (int64 tensors) of the Philox draws of ``groups`` at ``iteration``
    (``iteration``, ``call``, ``k0``, ``k1``: ints or 0-dim int64 tensors)."""
    c0 = groups & _M32
    c1 = groups >> 32
    c2 = torch.zeros_like(groups) + iteration
    c3 = torch.zeros_like(groups) + (call & _M32)
    return philox4x32(c0, c1, c2, c3, k0, k1, mulhilo=mulhilo)


def _dense_digit(groups, iteration, call, k0, k1, undecided, digit, mulhilo=_mulhilo):
    """One digit of the dense comparison for ``groups``: (lanes still undecided, lanes found
    below P) from ``undecided`` [n, 4] and P's digit word ``digit`` (0-dim tensors)."""
    words = torch.stack(_words(groups, iteration, call, k0, k1, mulhilo), 1)
    return undecided & ~(words ^ digit), undecided & ~words & digit


def _dense_digit_wrapping(groups, iteration, call, k0, k1, undecided, digit):
    """:func:`_dense_digit` with :func:`_mulhilo_wrapping` (what the CPU path compiles)."""
    return _dense_digit(groups, iteration, call, k0, k1, undecided, digit, _mulhilo_wrapping)


def field_word_masks(dtype: torch.dtype) -> tuple[int, int]:
    """(exp lanes, frac lanes) of a group's uint32 word: the bits of the sign and exponent,
    and of the mantissa, of the one (float32) or two (16-bit) elements it holds."""
    layout = check_dtype(dtype)
    frac = (1 << layout.n_frac) - 1
    if layout.n_bits == 16:
        frac |= frac << 16
    return _M32 ^ frac, frac


_DENSE_CHUNK = 1 << 20  # groups per pass of the dense comparison


@torch.no_grad()
def dense_masks(
    n_groups: int,
    dtype: torch.dtype,
    p_words: tuple[int, int],
    call: int,
    k0: int,
    k1: int,
    device,
    first: int = 0,
    fns: _CpuPath | None = None,
) -> torch.Tensor:
    """XOR masks (int64 holding the unsigned pattern, ``n_groups * G`` elements) of the dense
    fields of groups ``first .. first + n_groups - 1``: lane (word w, bit j) flips iff its
    uniform, digit k = bit j of word w of the draw at iteration ``DENSE_ITERATION + k``, is
    below ``P / 2^64`` of its field (``p_words``: unsigned P of the exp and frac field, 0 for a
    sparse field); see :mod:`.sampling`.  ``fns``: the CPU path whose compiled digit step runs
    (eager when None)."""
    e_lanes, f_lanes = field_word_masks(dtype)
    z = torch.zeros((), dtype=torch.int64, device=device)
    keys = (z + (call & _M32), z + k0, z + k1)
    lanes = [(e_lanes, p_words[0]), (f_lanes, p_words[1])]
    start = sum(m for m, w in lanes if w)
    m64 = (1 << 64) - 1
    out = []
    for c in range(0, n_groups, _DENSE_CHUNK):
        n = min(_DENSE_CHUNK, n_groups - c)
        groups = torch.arange(n, dtype=torch.int64, device=device) + (first + c)
        undecided = torch.full((n, 4), start, dtype=torch.int64, device=device)
        less = torch.zeros_like(undecided)
        idx = torch.arange(n, dtype=torch.int64, device=device)
        rest = [w for _, w in lanes]  # P's digits not yet compared, MSB first
        for k in range(DENSE_DIGITS):
            live = sum(m for (m, _), r in zip(lanes, rest) if r)  # lanes that can still flip
            if not live or not idx.numel():
                break
            idx = idx[((undecided[idx] & live) != 0).any(1)]
            if not idx.numel():
                break
            digit = z + sum(m for (m, _), r in zip(lanes, rest) if r >> 63)
            step = fns.dense_digit if fns is not None and idx.numel() >= _MIN_COMPILED else None
            args = (groups[idx], z + (DENSE_ITERATION + k), *keys, undecided[idx], digit)
            u, below = (step or _dense_digit)(*args)
            less[idx] |= below
            undecided[idx] = u
            rest = [(r << 1) & m64 for r in rest]
        if check_dtype(dtype).n_bits == 16:
            less = torch.stack([less & 0xFFFF, less >> 16], 2)
        out.append(less.reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=device)


def _first_draw(first, n: int, call, k0, k1, last_e, last_f, mulhilo=_mulhilo):
    """(exp field holds a flip, frac field holds a flip) for groups ``first .. first + n - 1``:
    the first draw of every group compared with the tables' last entries (P(no flip in the
    field)).  All arguments but ``n`` are 0-dim int64 tensors.  The cost of the reference at
    small p."""
    groups = torch.arange(n, dtype=torch.int64, device=first.device) + first
    u_e, u_f = _uniforms(groups, 0, call, k0, k1, mulhilo)
    return u_e <= last_e, u_f <= last_f


def _first_draw_wrapping(first, n: int, call, k0, k1, last_e, last_f):
    """:func:`_first_draw` with :func:`_mulhilo_wrapping` (what the CPU path compiles)."""
    return _first_draw(first, n, call, k0, k1, last_e, last_f, _mulhilo_wrapping)


def _uniforms_wrapping(groups, iteration, call, k0, k1):
    """:func:`_uniforms` with :func:`_mulhilo_wrapping` (what the CPU path compiles)."""
    return _uniforms(groups, iteration, call, k0, k1, _mulhilo_wrapping)


def _keep_values(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``y`` where ``|y| < t`` in float32, else 0 (NaN and Inf too)."""
    return torch.where(y.to(torch.float32).abs() < t, y, torch.zeros_like(y))


class _CpuPath:
    """The three hot functions of the CPU reference, each compiled by ``torch.compile`` into one
    loop (Philox with one int64 product per multiply) unless ``PEFT_BITFLIP_CPU_COMPILE=0``;
    eager where compiling is off or fails (with a warning, once).  Integer ops only: the
    compiled draws are checked bit for bit against the eager ones when they are compiled."""

    def __init__(self):
        self.first_draw = _first_draw
        self.draw = _uniforms
        self.keep_values = _keep_values
        self.dense_digit = _dense_digit
        self.compiled = False

    @classmethod
    @torch.no_grad()
    def build(cls) -> _CpuPath:
        import warnings

        path = cls()
        try:
            first = torch.compile(_first_draw_wrapping, dynamic=True)
            draw = torch.compile(_uniforms_wrapping, dynamic=True)
            keep = torch.compile(_keep_values, dynamic=True)
            digit = torch.compile(_dense_digit_wrapping, dynamic=True)
            z = torch.zeros((), dtype=torch.int64)
            keys = (z + 3, z + 0x9E3779B9, z + 0xFFFFFFF1)
            for n in (257, 1031):  # compile now (two sizes: the dynamic graph), and check it
                lasts = (z + (1 << 61), z + (1 << 62))
                want = _first_draw(z + (1 << 33) - 7, n, *keys, *lasts)
                got = first(z + (1 << 33) - 7, n, *keys, *lasts)
                idx = torch.arange(n, dtype=torch.int64) * 7919 + (1 << 40)
                want += _uniforms(idx, z + 2, *keys)
                got += draw(idx, z + 2, *keys)
                lanes = (idx[:, None] * 2654435761 + torch.arange(4)) & _M32
                want += _dense_digit(idx, z + (1 << 31) + 5, *keys, lanes, z + 0xFF80FF80)
                got += digit(idx, z + (1 << 31) + 5, *keys, lanes, z + 0xFF80FF80)
                if not all(torch.equal(a, b) for a, b in zip(want, got)):
                    raise RuntimeError("the compiled draws differ from the eager ones")
                y = torch.randn(n) * 4
                y[0] = float("nan")
                if not torch.equal(keep(y, z.float() + 2.5), _keep_values(y, z.float() + 2.5)):
                    raise RuntimeError("the compiled zero-out differs from the eager one")
            path.first_draw, path.draw, path.keep_values = first, draw, keep
            path.dense_digit = digit
            path.compiled = True
        except Exception as e:  # noqa: BLE001 - any compiler problem: stay correct, only slower
            warnings.warn(
                f"peft_bitflip: torch.compile of the CPU flip path failed ({type(e).__name__}: "
                f"{str(e)[:200]}); flips on the CPU run eagerly (bit-identical, several times "
                "slower). PEFT_BITFLIP_CPU_COMPILE=0 skips the attempt.",
                RuntimeWarning,
                stacklevel=4,
            )
        return path


_EAGER = _CpuPath()
_MIN_COMPILED = 64  # smaller inputs run eagerly: dynamo would specialise sizes 0 and 1
_COMPILE_FROM = 1 << 20  # elements of a tensor from which the compiled path is used (and built:
# compiling takes seconds, which only large tensors repay)
_CPU_PATH: list = []
_CHUNK_GROUPS = 1 << 22  # groups per first-draw pass (two bool outputs of 4 MiB)


def cpu_path(device) -> _CpuPath:
    """The functions the reference runs on ``device`` for tensors of at least
    ``_COMPILE_FROM`` elements: compiled on the CPU (built on first use), eager elsewhere or
    with ``PEFT_BITFLIP_CPU_COMPILE=0``."""
    import os

    device = torch.device(device)
    if device.type != "cpu" or os.environ.get("PEFT_BITFLIP_CPU_COMPILE", "1") == "0":
        return _EAGER
    if not _CPU_PATH:
        _CPU_PATH.append(_CpuPath.build())
    return _CPU_PATH[0]


def _draw(fns: _CpuPath, idx, iteration, keys, word: int):
    """Field ``word``'s uniforms of groups ``idx`` at ``iteration`` (compiled when worth it)."""
    if idx.numel() == 0:
        return idx
    draw = fns.draw if idx.numel() >= _MIN_COMPILED else _uniforms
    return draw(idx, iteration, *keys)[word]


@torch.no_grad()
def sparse_flips(
    n_elements: int,
    dtype: torch.dtype,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    device=None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(element indices relative to ``start``, int64 XOR masks holding the unsigned pattern) of
    the elements of ``[start, start + n_elements)`` with at least one flipped bit, in
    increasing order.  ``start`` must be a multiple of the group size."""
    layout = check_dtype(dtype)
    g = group_size(dtype)
    if start % g:
        raise ValueError(f"start must be a multiple of the group size {g}, got {start}")
    n_e, n_f = field_sizes(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    table = table.to(device=device, dtype=torch.int64)
    n_groups = (n_elements + g - 1) // g
    first = start // g
    tables = (table[:n_e], table[n_e : n_e + n_f])
    if int(tables[0][-1]) < 0 and int(tables[1][-1]) < 0:  # no field flips in the gap sampling
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    # the first draw of every group: which fields hold a flip (most don't at small p)
    fns = cpu_path(device) if n_elements >= _COMPILE_FROM else _EAGER
    scalars = [torch.tensor(v, dtype=torch.int64, device=device) for v in (call, k0, k1)] + [
        tables[0][-1],
        tables[1][-1],
    ]
    idx_e, idx_f = [], []
    for c in range(0, n_groups, _CHUNK_GROUPS):
        n = min(_CHUNK_GROUPS, n_groups - c)
        first_t = torch.tensor(first + c, dtype=torch.int64, device=device)
        draw = fns.first_draw if n >= _MIN_COMPILED else _first_draw
        a_e, a_f = draw(first_t, n, *scalars)
        idx_e.append(a_e.nonzero().view(-1) + (first + c))
        idx_f.append(a_f.nonzero().view(-1) + (first + c))
    elems, bits = [], []
    fields = (
        (0, torch.cat(idx_e), tables[0], layout.n_exp, layout.n_bits - layout.n_exp),
        (1, torch.cat(idx_f), tables[1], layout.n_frac, 0),
    )
    keys = scalars[:3]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for word, idx, t, per_elem, shift in fields:
        n_field = t.numel()
        u = _draw(fns, idx, zero, keys, word)
        pos = torch.zeros_like(idx)
        it = 0
        while idx.numel():
            gap = torch.searchsorted(t, u, side="left")  # number of j with t[j] < u
            q = pos + gap
            take = q < n_field
            idx, q = idx[take], q[take]
            elems.append((idx - first) * g + q // per_elem)
            bits.append(torch.ones_like(q) << (q % per_elem + shift))
            pos = q + 1
            more = pos < n_field
            idx, pos = idx[more], pos[more]
            it += 1
            u = _draw(fns, idx, zero + it, keys, word)
    if not elems:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    elem, bit = torch.cat(elems), torch.cat(bits)
    keep = elem < n_elements  # the padding of the last group
    elem, bit = elem[keep], bit[keep]
    unique, inverse = torch.unique(elem, sorted=True, return_inverse=True)
    # each (element, bit) is drawn at most once, so the sum of an element's bits is their XOR
    masks = torch.zeros_like(unique).index_add_(0, inverse, bit)
    return unique, masks


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
    elem, masks = sparse_flips(n_elements, dtype, table, call, k0, k1, device, start)
    out = _dense_part(n_elements, dtype, table, call, k0, k1, masks.device, start)
    if out is None:
        out = torch.zeros(n_elements, dtype=torch.int64, device=masks.device)
    out[elem] ^= masks
    return out


def _dense_part(n_elements, dtype, table, call, k0, k1, device, start=0):
    """The dense fields' XOR masks of elements ``[start, start + n_elements)``, or None when
    both fields are sparse."""
    words = dense_words(table, dtype)
    if not any(words):
        return None
    g = group_size(dtype)
    n_groups = (n_elements + g - 1) // g
    fns = cpu_path(device) if n_elements >= _COMPILE_FROM else None
    masks = dense_masks(n_groups, dtype, words, call, k0, k1, device, start // g, fns)
    return masks[:n_elements]


_NATIVE: list = []


def native_library(device, k0: int, k1: int):
    """The native CPU pass (:mod:`.cpu_native`) for tensors on ``device``, or None: off the
    CPU, with ``PEFT_BITFLIP_CPU_NATIVE=0``, keys outside uint32, or where building it failed
    or it disagrees with the torch path on a check run once when built (a warning)."""
    if torch.device(device).type != "cpu" or not cpu_native.enabled():
        return None
    if not (0 <= k0 < 1 << 32 and 0 <= k1 < 1 << 32):
        return None
    if not _NATIVE:
        lib = cpu_native.library()
        if lib is not None and not _native_agrees(lib):
            import warnings

            warnings.warn(
                "peft_bitflip: the native CPU flip path differs from the torch reference on "
                "this machine; flips on the CPU run through torch (bit-identical, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            lib = None
        _NATIVE.append(lib)
    return _NATIVE[0]


@torch.no_grad()
def _native_flip(lib, flat, table, call, k0, k1, threshold, has_flips, want_mask=False):
    """(y, packed zero mask or None) of flat contiguous ``flat`` through the native pass
    (sparse and dense fields, zero-out)."""
    y = torch.empty_like(flat)
    mask = None
    if want_mask and threshold is not None:
        mask = torch.empty(-(-flat.numel() // group_size(flat.dtype)), dtype=torch.uint8)
    if flat.numel():
        cpu_native.flip(lib, flat, y, table, call, k0, k1, has_flips, threshold, mask)
    return y, mask


@torch.no_grad()
def bitflip_counted_native(x, table, call, k0, k1, threshold, has_flips, counts, out=None):
    """:func:`bitflip_reference` of a contiguous CPU ``x`` through the native pass, adding
    [sign/exponent bits flipped, mantissa bits flipped (before the zero-out), elements zeroed]
    to row 0 of ``counts`` in the same pass; ``out``: where the result goes (``x`` itself: in
    place), default a new tensor (``counts`` and ``out`` as
    :func:`~.sampling.check_flip_counts` accepts them).  Returns the result, or None where the
    native pass does not run (:func:`native_library`) and nothing was done."""
    lib = native_library(x.device, k0, k1)
    if lib is None or not x.is_contiguous():
        return None
    check_dtype(x.dtype)
    y = torch.empty_like(x) if out is None else out
    if x.numel():
        cpu_native.flip(
            lib, x.view(-1), y.view(-1), table, int(call), k0, k1, has_flips, threshold,
            counts=counts,
        )  # fmt: skip
    return y


def _native_agrees(lib) -> bool:
    """Whether the native pass gives the torch path's bits on a small check (every dtype, a
    tail group, sparse and dense fields, the zero-out and its mask)."""
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(4099, generator=gen) * 8).to(dtype)
        ints = _INT_VIEW[check_dtype(dtype).n_bits]
        for p_e, p_f, t in ((2**-6, 1e-2, 4.0), (0.3, 2**-8, None), (1.0, 0.0, 2.0)):
            table = torch.tensor(table_values(p_e, p_f, dtype), dtype=torch.int64)
            y, mask = _native_flip(lib, x, table, 7, 0x9E3779B9, 0xFFFFFFF1, t, True, True)
            want = _torch_reference(x, table, 7, 0x9E3779B9, 0xFFFFFFF1, None, True)
            if t is not None:
                keep = keep_mask(want, t)
                if not torch.equal(mask, pack_zero_mask(~keep, group_size(dtype))):
                    return False
                want = torch.where(keep, want, torch.zeros((), dtype=dtype))
            if not torch.equal(y.view(ints), want.view(ints)):
                return False
    return True


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
    check_dtype(x.dtype)
    flat = x.contiguous().view(-1)
    lib = native_library(x.device, k0, k1)
    if lib is not None:
        return _native_flip(lib, flat, table, call, k0, k1, threshold, has_flips)[0].view(x.shape)
    return _torch_reference(x, table, call, k0, k1, threshold, has_flips)


def _torch_reference(x, table, call, k0, k1, threshold, has_flips=True):
    """:func:`bitflip_reference` with torch ops only (the path without the native pass)."""
    layout = check_dtype(x.dtype)
    flat = x.contiguous().view(-1)
    y = flat
    if has_flips and flat.numel():
        half = 1 << (layout.n_bits - 1)
        dense = _dense_part(flat.numel(), x.dtype, table, call, k0, k1, x.device)
        if dense is not None:
            dense = torch.where(dense >= half, dense - 2 * half, dense)  # unsigned -> signed
            y = flat.clone()
            ints = y.view(_INT_VIEW[layout.n_bits])
            ints ^= dense.to(ints.dtype)
        elem, m = sparse_flips(flat.numel(), x.dtype, table, call, k0, k1, device=x.device)
        if elem.numel():
            m = torch.where(m >= half, m - 2 * half, m)  # unsigned -> signed view
            if y is flat:
                y = flat.clone()
            ints = y.view(_INT_VIEW[layout.n_bits])
            ints[elem] = ints[elem] ^ m.to(ints.dtype)
    y = zero_out(y, threshold)
    return y.view(x.shape) if y is not flat else flat.clone().view(x.shape)


def keep_mask(y: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where ``|y| < threshold`` in float32 (NaN, Inf and ``|y| >= t`` are False)."""
    t = torch.tensor(threshold, dtype=torch.float32, device=y.device)
    return y.to(torch.float32).abs() < t


@torch.no_grad()
def zero_out(y: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return y
    t = torch.tensor(threshold, dtype=torch.float32, device=y.device)
    keep = cpu_path(y.device).keep_values if y.numel() >= _COMPILE_FROM else _keep_values
    return keep(y, t)


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
    lib = native_library(x.device, k0, k1)
    if lib is not None:
        flat = x.contiguous().view(-1)
        _, mask = _native_flip(lib, flat, table, call, k0, k1, threshold, has_flips, True)
        zeroed = unpack_zero_mask(mask, flat.numel(), group_size(x.dtype)).view(grad.shape)
        return grad.masked_fill(zeroed, 0)
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
    lib = native_library(x.device, k0, k1)
    if lib is not None:
        flat = x.contiguous().view(-1)
        y, mask = _native_flip(lib, flat, table, call, k0, k1, threshold, has_flips, True)
        return y.view(x.shape), mask
    y = bitflip_reference(x, table, call, k0, k1, None, has_flips)
    keep = keep_mask(y, threshold)
    y = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y, pack_zero_mask(~keep, group_size(x.dtype))


def zero_by_mask_reference_(grad: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """Set contiguous ``grad`` to 0 in place where the packed zero mask has a bit set."""
    flat = grad.view(-1)
    flat.masked_fill_(unpack_zero_mask(mask, flat.numel(), group), 0)
    return grad


def stick_lanes(x: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """``x`` (any shape, last dimension the input features) with its stuck input lanes forced,
    out of place: ``bits = (bits & lanes[0]) | lanes[1]`` per feature, ``lanes`` a
    (2, in_features) tensor in the signed integer view of x's dtype (keep = -1, ones = 0 at
    features without a stuck bit).  What the flip kernel does before its flips when given the
    lanes (see :func:`~peft_bitflip.kernels.triton_bitflip.stick_lanes`)."""
    ints = x.contiguous().view(lanes.dtype)
    return ((ints & lanes[0]) | lanes[1]).view(x.dtype)
