"""Launching our Triton kernels with less host time than ``kernel[grid](...)``.

Triton's JIT call binds and specialises every argument, builds and looks up a cache key, checks
globals and calls the launch hooks on every launch: 23-25 us of host time for a flip kernel
alone on an H200 host, and several times that inside a model, where a batch-1 forward is bound
by the host (``docs/benchmarks.md``).  :class:`KernelLauncher` does that work once per
*specialisation* and afterwards calls the compiled kernel's own launcher directly.

A specialisation is what Triton compiles a separate kernel for, given the same constexpr
arguments: the kind of each argument, each tensor's dtype and 16-byte alignment, and for each
integer its 32/64-bit range, divisibility by 16 and equality to 1.  The first launch of a new
specialisation goes through Triton's JIT (compiling if needed) and keeps the compiled kernel
it returns; the next launches with the same specialisation reuse it.

The direct call uses Triton's internal launcher signature, so it is used only with the
Triton releases it was checked against (:data:`CHECKED_TRITON`), on CUDA, outside the
interpreter and while no launch hooks are installed (profilers such as Proton add them); in
every other case, and when ``PEFT_BITFLIP_DIRECT_LAUNCH=0``, each launch goes through the JIT.
``tests/test_kernel_cuda.py`` checks direct launches against the CPU reference bit for bit
(the speed gain: docs/benchmarks.md, "Design decisions").
"""

from __future__ import annotations

import os

import torch

__all__ = ["KernelLauncher", "direct_launch_enabled", "CHECKED_TRITON"]

CHECKED_TRITON = ((3, 6),)  # (major, minor) releases whose launcher signature this follows

_ENABLED = None


def direct_launch_enabled() -> bool:
    """Whether launches may skip Triton's JIT call (see the module docstring)."""
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = _direct_launch_possible()
    return _ENABLED


def _direct_launch_possible() -> bool:
    if os.environ.get("PEFT_BITFLIP_DIRECT_LAUNCH", "1") in ("0", ""):
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    try:
        import triton
    except ImportError:  # pragma: no cover - CPU-only torch without triton
        return False
    major_minor = tuple(int(p) for p in triton.__version__.split(".")[:2])
    return major_minor in CHECKED_TRITON


_RUNTIME = None


def _runtime():
    """(Triton's runtime knobs, current-device function, current-stream function), looked up
    once: imports and Triton's lazy driver proxy cost host time on every launch."""
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        _RUNTIME = (knobs.runtime, active.get_current_device, active.get_current_stream)
    return _RUNTIME


def _hooks_installed(knobs) -> bool:
    """True when Triton launch hooks are installed (then the JIT call must run them)."""
    hooks = (knobs.launch_enter_hook, knobs.launch_exit_hook)
    return any(getattr(h, "calls", h) for h in hooks)


def _int_kind(v: int) -> tuple:
    """What Triton specialises an integer argument on: range (i32 / i64 / u64), v % 16 == 0,
    v == 1."""
    return (-(1 << 31) <= v < (1 << 31), v < (1 << 63), v & 15 == 0, v == 1)


def _int_range(v: int) -> tuple:
    """What Triton specialises an integer argument marked ``do_not_specialize`` on: its type
    by range (i32 / i64 / u64)."""
    return (-(1 << 31) <= v < (1 << 31), v < (1 << 63))


class KernelLauncher:
    """Launches one ``@triton.jit`` kernel whose runtime arguments come first in its signature
    and constexpr arguments after them (all of ours).

    ``launcher(grid, args, config)``: ``args`` the runtime arguments in signature order,
    ``config`` a dict of the constexpr arguments and launch options (``num_warps``...).  The
    same ``config`` object must be passed for the same settings (the layers' configs come from
    ``functools.cache`` functions): it is part of the cache key by identity and is kept alive
    by the cache.  Returns nothing."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = {}  # (id(config), device, specialisation) -> (kernel, tail, config)
        # (id(config), kinds of args) -> (positions of tensors, of specialised ints, of other
        # ints, config)
        self._layouts = {}

    def __call__(self, grid, args: tuple, config: dict) -> None:
        if not direct_launch_enabled():
            self.fn[grid](*args, **config)
            return
        knobs, current_device, current_stream = _runtime()
        if _hooks_installed(knobs):
            self.fn[grid](*args, **config)
            return
        device = current_device()
        kinds = tuple(map(type, args))
        layout = self._layouts.get((id(config), kinds))
        if layout is None:
            tensors = tuple(i for i, k in enumerate(kinds) if issubclass(k, torch.Tensor))
            ints = [i for i, k in enumerate(kinds) if k is int]
            plain = tuple(i for i in ints if self.fn.params[i].do_not_specialize)
            ints = tuple(i for i in ints if i not in plain)
            layout = self._layouts[(id(config), kinds)] = (tensors, ints, plain, config)
        tensors, ints, plain, _ = layout
        spec = (
            id(config),
            device,
            kinds,
            tuple([(args[i].dtype, args[i].data_ptr() & 15 == 0) for i in tensors]),
            tuple([_int_kind(args[i]) for i in ints]),
            tuple([_int_range(args[i]) for i in plain]),
        )
        entry = self._compiled.get(spec)
        if entry is None:
            kernel = self.fn[grid](*args, **config)  # compiles if needed, and launches
            rest = self.fn.params[len(args) :]
            if not all(p.is_constexpr for p in rest):
                raise TypeError(f"{self.fn.__name__}: runtime arguments must come first")
            tail = tuple(config[p.name] if p.name in config else p.default for p in rest)
            self._compiled[spec] = (kernel, tail, config)
            return
        kernel, tail, _ = entry
        stream = current_stream(device)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(
            g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None,
            *args, *tail,
        )  # fmt: skip
