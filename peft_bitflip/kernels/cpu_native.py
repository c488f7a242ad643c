"""The native CPU pass of the flip reference: ``cpu_native.c`` built on first use, via ctypes.

One pass per tensor copies x to y, runs the dense fields' bit-sliced comparison (one Philox
draw per digit of P), draws the first Philox word of every group for the sparse fields
(vectorised, native 32x32->64 products), runs the gap-sampling loop only for fields that hold
a flip, XORs the flips into y and applies the zero-out with its packed mask.  Bit-identical
to the torch reference (:mod:`.reference` checks it once when built).  The shared library is
compiled with the system C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``; about a second)
into torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), named by a hash of the source and flags, so each machine builds
it once.  ``PEFT_BITFLIP_CPU_NATIVE=0`` or a failed build (one warning) leaves the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..spec import check_dtype
from .sampling import dense_words, field_sizes, group_size

SOURCE = Path(__file__).with_name("cpu_native.c")
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-fno-strict-aliasing")
_PARALLEL_FROM = 1 << 14  # groups from which a tensor is split over torch's intra-op threads
_U32 = 1 << 32


def enabled() -> bool:
    """False when ``PEFT_BITFLIP_CPU_NATIVE=0`` (the torch path runs)."""
    return os.environ.get("PEFT_BITFLIP_CPU_NATIVE", "1") != "0"


def _compilers() -> list[str]:
    names = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    out = []
    for name in names:
        path = shutil.which(name) if name else None
        if path and path not in out:
            out.append(path)
    return out


def _build_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / "peft_bitflip_cpu_native"


def _compile(cc: str, flags: tuple[str, ...], source: bytes) -> Path:
    """The shared library built from ``source`` by ``cc`` (cached by a hash)."""
    tag = hashlib.sha256(
        b"\0".join([source, cc.encode(), " ".join(flags).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    out_dir = _build_dir()
    lib = out_dir / f"cpu_native_{tag}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *flags, "-x", "c", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:300]}")
        os.replace(tmp, lib)  # atomic: concurrent builds leave one complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, u32, u64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32,
                             ctypes.c_uint64)  # fmt: skip
    lib.pbf_flip.argtypes = [p, p, i64, i32, i32, i32, p, i64, p, i64, u64, u64, i32,
                             i64, i64, u32, u32, u32, i32, u32, p, p]  # fmt: skip
    lib.pbf_flip.restype = i32
    lib.pbf_burst.argtypes = [p, p, i64, i32, p, p, i32, i32, i32, i32,
                              i64, i64, u32, u32, u32, i32, u32]  # fmt: skip
    lib.pbf_burst.restype = i32
    return lib


def build() -> ctypes.CDLL:
    """Compile (or load the cached) library; raises with every compiler's error if none works."""
    source = SOURCE.read_bytes()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    variants = [(*_FLAGS, "-DPBF_AVX2"), _FLAGS] if x86 else [_FLAGS]
    errors = []
    for cc in _compilers():
        for flags in variants:
            try:
                return _declare(ctypes.CDLL(str(_compile(cc, flags, source))))
            except Exception as e:  # noqa: BLE001 - try the next compiler / flags
                errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("; ".join(errors) or "no C compiler found (cc, gcc, clang or $CC)")


_LIB: list = []


def library() -> ctypes.CDLL | None:
    """The built library, or None when disabled or when building failed (warned once)."""
    if not enabled():
        return None
    if not _LIB:
        try:
            _LIB.append(build())
        except Exception as e:  # noqa: BLE001 - stay correct, only slower
            warnings.warn(
                f"peft_bitflip: the native CPU flip path could not be built ({str(e)[:300]}); "
                "flips on the CPU run through torch (bit-identical, slower). "
                "PEFT_BITFLIP_CPU_NATIVE=0 skips the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            _LIB.append(None)
    return _LIB[0]


@functools.lru_cache(maxsize=256)
def keep_below(threshold: float, dtype: torch.dtype) -> int:
    """The magnitude bit patterns (``bits & ~sign``) of ``dtype`` kept by the zero-out
    ``|y| < float32(threshold)`` are exactly those below this value (NaN and Inf never)."""
    t = torch.tensor(threshold, dtype=torch.float32).item()
    bits = check_dtype(dtype).n_bits
    if dtype == torch.float16:
        inf, value = 0x7C00, lambda m: struct.unpack("<e", struct.pack("<H", m))[0]
    elif bits == 16:  # bfloat16: the high half of a float32
        inf, value = 0x7F80, lambda m: struct.unpack("<f", struct.pack("<I", m << 16))[0]
    else:
        inf, value = 0x7F800000, lambda m: struct.unpack("<f", struct.pack("<I", m))[0]
    lo, hi = 0, inf + 1  # count the codes m <= inf with value(m) < t (increasing in m)
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


_POOL: list = []


def _pool(workers: int) -> ThreadPoolExecutor:
    if not _POOL or _POOL[0]._max_workers != workers:
        _POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="peft_bitflip-cpu")]
    return _POOL[0]


def flip(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    y: torch.Tensor,
    table: torch.Tensor,
    call: int,
    k0: int,
    k1: int,
    flips: bool,
    threshold: float | None,
    mask: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> None:
    """``y = zero_out(x with its flips)`` for flat contiguous CPU tensors ``x``, ``y`` (the
    same tensor is fine), the int64 flip ``table`` (gap tables, then P of each field: 0 for a
    sparse field, else the field is dense), stream key ``k0``, ``k1`` (uint32) and ``call``;
    ``mask``: a uint8 tensor of one byte per group that receives the packed zero mask
    (``threshold`` not None); ``counts``: a contiguous int64 CPU tensor whose first three
    words receive += [sign/exponent bits flipped, mantissa bits flipped (before the zero-out),
    elements zeroed].  Threads: ``torch.get_num_threads()``."""
    layout = check_dtype(x.dtype)
    n_e, n_f = field_sizes(x.dtype)
    n = x.numel()
    n_groups = -(-n // group_size(x.dtype))
    table = table.to(device="cpu", dtype=torch.int64).contiguous()
    zero = threshold is not None
    below = keep_below(float(threshold), x.dtype) if zero else 0
    t_e = table.data_ptr()
    p_e, p_f = dense_words(table, x.dtype)
    args = (x.data_ptr(), y.data_ptr(), n, layout.n_bits, layout.n_exp, layout.n_frac,
            t_e, n_e, t_e + 8 * n_e, n_f, p_e, p_f, int(flips))  # fmt: skip
    tail = (call % _U32, k0, k1, int(zero), below, mask.data_ptr() if mask is not None else None,
            counts.data_ptr() if counts is not None else None)  # fmt: skip
    _split(lib.pbf_flip, args, tail, n_groups)


def _split(fn, args: tuple, tail: tuple, n_groups: int) -> None:
    """``fn(*args, g_begin, g_end, *tail)`` over the groups, in whole blocks of 64 groups per
    thread of ``torch.get_num_threads()`` (one call for small tensors)."""
    workers = min(torch.get_num_threads(), max(1, n_groups // _PARALLEL_FROM))
    if workers <= 1:
        fn(*args, 0, n_groups, *tail)
        return
    step = -(-n_groups // workers)
    step += -step % 64  # whole blocks per thread
    jobs = [
        _pool(workers).submit(fn, *args, a, min(a + step, n_groups), *tail)
        for a in range(0, n_groups, step)
    ]
    for job in jobs:
        job.result()  # ctypes releases the GIL during each call


def burst(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    y: torch.Tensor,
    table: torch.Tensor,
    shape,
    call: int,
    k0: int,
    k1: int,
    threshold: float | None,
) -> None:
    """``y = zero_out(x with its burst events)`` (:mod:`.burst_sampling`) for flat contiguous
    CPU tensors ``x``, ``y`` (the same tensor is fine), the int64 burst ``table``, its
    :class:`~.burst_sampling.BurstShape` ``shape``, stream key ``k0``, ``k1`` and ``call``."""
    layout = check_dtype(x.dtype)
    g = group_size(x.dtype)
    n = x.numel()
    table = table.to(device="cpu", dtype=torch.int64).contiguous()
    zero = threshold is not None
    below = keep_below(float(threshold), x.dtype) if zero else 0
    gaps = table.data_ptr()
    args = (x.data_ptr(), y.data_ptr(), n, layout.n_bits, gaps, gaps + 8 * g, shape.k_min,
            shape.n_len, shape.shift, shape.width)  # fmt: skip
    _split(lib.pbf_burst, args, (call % _U32, k0, k1, int(zero), below), -(-n // g))
