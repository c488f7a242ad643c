"""When the kernels' launcher may skip Triton's JIT call, and what its cache key separates.
(The direct launches themselves need a GPU: tests/test_kernel_cuda.py.)"""

from __future__ import annotations

import pytest

from peft_bitflip.kernels import launcher

triton = pytest.importorskip("triton")


@pytest.mark.parametrize(
    "version,interpret,env,expected",
    [
        ("3.6.0", "0", None, True),
        ("3.6.2", "", "1", True),
        ("3.6.0", "1", None, False),  # the interpreter has no compiled kernels
        ("3.6.0", "0", "0", False),  # switched off by the user
        ("3.5.1", "0", None, False),  # a release whose launcher signature was not checked
        ("3.9.0", "0", None, False),
    ],
)
def test_direct_launch_only_where_checked(monkeypatch, version, interpret, env, expected):
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if env is None:
        monkeypatch.delenv("PEFT_BITFLIP_DIRECT_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("PEFT_BITFLIP_DIRECT_LAUNCH", env)
    assert launcher._direct_launch_possible() is expected


def test_integer_kinds_separate_what_triton_specialises_on():
    """Values that Triton compiles different kernels for never share a cache key: 32- vs
    64-bit range, divisibility by 16, equality to 1."""
    groups = {
        "one": [1],
        "32-bit, 16 | v": [16, 32, 4096, -16, -(1 << 31)],
        "32-bit, other": [2, 17, 4097, -1, -7],
        "64-bit, 16 | v": [1 << 31, (1 << 40) + 16, -(1 << 31) - 16],
        "64-bit, other": [(1 << 31) + 1],
        "unsigned 64-bit": [1 << 63],
    }
    kinds = {name: {launcher._int_kind(v) for v in values} for name, values in groups.items()}
    for name, ks in kinds.items():
        assert len(ks) == 1, name  # one kind within a group
    assert len({next(iter(ks)) for ks in kinds.values()}) == len(groups)  # distinct across


class _FakeJit:
    """Stands in for a ``@triton.jit`` function: counts JIT calls, returns a fake compiled
    kernel whose ``run`` records the direct launches."""

    def __init__(self, names, constexprs, plain=()):
        from types import SimpleNamespace

        def param(name, constexpr=False):
            return SimpleNamespace(
                name=name, is_constexpr=constexpr, do_not_specialize=name in plain, default=None
            )

        self.__name__ = "fake"
        self.params = [param(n) for n in names] + [param(c, True) for c in constexprs]
        self.jit_calls, self.direct = 0, []

    def __getitem__(self, grid):
        from types import SimpleNamespace

        def call(*args, **config):
            self.jit_calls += 1
            return SimpleNamespace(
                function=None, packed_metadata=None, run=lambda *a: self.direct.append(a)
            )

        return call


def test_repeated_specialisations_launch_directly(monkeypatch):
    """Integers that Triton compiles apart (1, multiples of 16, 32/64-bit range), a 64-bit
    unspecialised integer, another dtype or 16-byte alignment each go through the JIT once; a
    repeated specialisation is launched directly, with the constexpr tail appended."""
    import torch

    monkeypatch.setattr(launcher, "_ENABLED", True)
    hooks = type("Knobs", (), {"launch_enter_hook": None, "launch_exit_hook": None})
    monkeypatch.setattr(launcher, "_RUNTIME", (hooks, lambda: 0, lambda device: "stream"))
    fn = _FakeJit(["x", "n", "key"], ["BLOCK"], plain=("key",))
    launch = launcher.KernelLauncher(fn)
    config = {"BLOCK": 64}
    x = torch.zeros(64)
    launch((1,), (x, 16, 5), config)
    launch((1,), (x, 16, 7), config)  # another key word in the same range: reused
    assert fn.jit_calls == 1 and len(fn.direct) == 1
    assert fn.direct[0][-4:] == (x, 16, 7, 64)  # the arguments, then the constexpr tail
    for n in (1, 17, 1 << 31):  # equality to 1, divisibility, range: each its own kernel
        launch((1,), (x, n, 5), config)
    launch((1,), (x, 16, 1 << 40), config)  # a key word in the 64-bit range
    launch((1,), (x.double(), 16, 5), config)  # dtype
    launch((1,), (x[1:], 16, 5), config)  # 16-byte alignment
    assert fn.jit_calls == 7
    launch((1,), (x, 32, 9), config)  # as 16 (32-bit, 16 | n)
    launch((1,), (x, 33, 9), config)  # as 17
    assert fn.jit_calls == 7 and len(fn.direct) == 3


def test_launch_hooks_send_launches_through_the_jit():
    """A profiler's launch hook (Triton's HookChain with a callable in it, or a plain callable in
    older releases) must see every launch: the direct path stands back while one is set."""
    from types import SimpleNamespace

    from triton.knobs import HookChain

    empty, used = HookChain(), HookChain()
    used.add(print)
    for enter, leave, expected in [
        (empty, HookChain(reversed=True), False),
        (None, None, False),
        (used, HookChain(reversed=True), True),
        (empty, print, True),
    ]:
        knobs = SimpleNamespace(launch_enter_hook=enter, launch_exit_hook=leave)
        assert launcher._hooks_installed(knobs) is expected
