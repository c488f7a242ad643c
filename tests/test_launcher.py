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
