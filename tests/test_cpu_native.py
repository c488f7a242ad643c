"""The native CPU pass (kernels/cpu_native.c) gives the torch reference's bits, and falls back."""

from __future__ import annotations

import ctypes

import pytest
import torch

import peft_bitflip as pb
from peft_bitflip.kernels import cpu_native, reference
from peft_bitflip.kernels.sampling import flip_table
from peft_bitflip.spec import BIT_LAYOUTS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTS = {16: torch.int16, 32: torch.int32}
KEYS = [pb.stream_key(1234, "layer.0", "x"), (0, 0xFFFFFFFF)]


@pytest.fixture
def native(monkeypatch):
    """The built library, used by the reference whatever its own check says (so a wrong
    native pass fails these tests instead of falling back)."""
    lib = cpu_native.library()
    if lib is None:
        pytest.skip("the native CPU pass could not be built here (the torch path runs)")
    monkeypatch.setattr(reference, "_NATIVE", [lib])
    return lib


def test_the_check_run_when_built_passes(native):
    assert reference._native_agrees(native)


def _bits(y):
    return y.view(INTS[BIT_LAYOUTS[y.dtype].n_bits])


def _all_paths(monkeypatch, x, table, call, key, t):
    """(forward, masked forward and mask, backward) of the reference with the current setting."""
    y = reference.bitflip_reference(x, table, call, *key, t)
    ym, mask = reference.bitflip_masked_reference(x, table, call, *key, 2.0 if t is None else t)
    g = torch.arange(x.numel(), dtype=x.dtype).view(x.shape)
    gb = reference.bitflip_backward_reference(g, x, table, call, *key, 2.0 if t is None else t)
    return _bits(y), _bits(ym), mask, _bits(gb)


def _native_and_torch(monkeypatch, x, table, call, key, t):
    native = _all_paths(monkeypatch, x, table, call, key, t)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_NATIVE", "0")
    torch_path = _all_paths(monkeypatch, x, table, call, key, t)
    monkeypatch.delenv("PEFT_BITFLIP_CPU_NATIVE")
    return native, torch_path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 1e-12, 2**-16, 2**-10, 2**-9, 2**-4, 0.3, 0.5])
def test_native_equals_the_torch_path(native, monkeypatch, dtype, p):
    """Bit for bit: the flips, the zero-out, its packed mask and the backward, for tensors
    with a tail group, two keys and calls, with and without the zero-out (from 2^-9 on both
    fields take the dense path: P's digits in the native pass, as torch's dense_masks)."""
    n = 3 * 2**14 + 5  # a ragged tail group for every dtype
    x = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 4).to(dtype).view(-1, 1)
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    table = flip_table(p, p, dtype, "cpu")
    flipped = 0
    for call, key, t in ((0, KEYS[0], None), (5, KEYS[1], 3.0), (2**32 + 3, KEYS[0], 1e-3)):
        got, want = _native_and_torch(monkeypatch, x, table, call, key, t)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (dtype, p, call, t)
        flipped += int((got[0] != _bits(x)).sum()) if t is None else 0
    if p >= 2**-16:
        assert flipped > 0  # the check saw flips


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_mixed_sparse_and_dense_fields(native, monkeypatch, dtype):
    """A dense exp field beside a sparse frac field and the reverse, and the gap loop at a
    large p (many iterations per group)."""
    x = (torch.randn(4 * 1031 + 3, generator=torch.Generator().manual_seed(2)) * 8).to(dtype)
    for p_exp, p_frac, dense in ((0.3, 2**-8, (True, False)), (2**-7, 0.2, (False, True)),
                                 (0.3, 0.05, (False, False)), (1.0, 0.0, None)):  # fmt: skip
        table = flip_table(p_exp, p_frac, dtype, "cpu", dense)
        got, want = _native_and_torch(monkeypatch, x, table, 9, KEYS[0], 4.0)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (dtype, p_exp, p_frac, dense)


def test_native_threads_split_a_tensor_into_the_same_bits(native, monkeypatch):
    """The pass split over two threads at block boundaries gives the single-thread bits
    (sparse fields, and a dense exp field beside a sparse frac field)."""
    monkeypatch.setattr(cpu_native, "_PARALLEL_FROM", 64)
    x = torch.randn(4 * 5000 + 1, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    for dense in ((False, False), (True, False)):
        table = flip_table(2**-8, 2**-8, x.dtype, "cpu", dense)
        try:
            torch.set_num_threads(3)
            split = reference.bitflip_masked_reference(x, table, 1, *KEYS[0], 2.0)
            torch.set_num_threads(1)
            single = reference.bitflip_masked_reference(x, table, 1, *KEYS[0], 2.0)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(_bits(split[0]), _bits(single[0])), dense
        assert torch.equal(split[1], single[1]), dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "p_exp, p_frac, t",
    [(2**-12, 2**-12, None), (2**-10, 2**-10, 1.0), (0.3, 2**-12, 1.0), (2**-12, 0.2, None),
     (0.05, 0.05, 0.5)],
)  # fmt: skip
def test_native_counted_flip_equals_flip_then_count(native, monkeypatch, dtype, p_exp, p_frac, t):
    """Issue 33.4 on the CPU: a training site's counted flip runs in the native pass (flips,
    counts, zero-out, in place), bit for bit ``apply_flip_spec`` with the torch count of the
    flips before the zero-out and of the zeroed elements, split over threads or not, sparse,
    dense and mixed fields, NaN / Inf in x (the torch path: PEFT_BITFLIP_CPU_NATIVE=0)."""
    from peft_bitflip.functional import apply_flip_spec
    from peft_bitflip.kernels.op import new_flip_counts
    from peft_bitflip.stats import apply_flip_spec_counted, flip_count_tensor

    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    monkeypatch.setattr(cpu_native, "_PARALLEL_FROM", 64)
    spec, key = pb.FlipSpec(p_exp, p_frac, t), KEYS[0]
    x = (torch.randn(61, 257, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    x[0, :2] = torch.tensor([float("nan"), float("inf")])
    monkeypatch.setenv("PEFT_BITFLIP_CPU_NATIVE", "0")
    want = apply_flip_spec(x, spec, key, 6)
    want_counts = flip_count_tensor(x, apply_flip_spec(x, pb.FlipSpec(p_exp, p_frac), key, 6), t)
    torch_counts = new_flip_counts("cpu")
    torch_path = apply_flip_spec_counted(x, spec, key, 6, torch_counts)
    monkeypatch.delenv("PEFT_BITFLIP_CPU_NATIVE")
    counted_passes = []
    native_flip = cpu_native.flip
    monkeypatch.setattr(
        cpu_native,
        "flip",
        lambda *a, counts=None, **k: (
            counted_passes.append(counts is not None) or native_flip(*a, counts=counts, **k)
        ),
    )
    assert torch.equal(_bits(torch_path), _bits(want))
    assert torch.equal(torch_counts.sum(0), want_counts)
    assert want_counts[0] > 0 and want_counts[1] > 0 and (want_counts[2] > 0) == (t is not None)
    threads = torch.get_num_threads()
    for n_threads in (1, 3):
        counts, inplace = new_flip_counts("cpu"), x.clone()
        try:
            torch.set_num_threads(n_threads)
            got = apply_flip_spec_counted(x, spec, key, 6, counts)
            assert apply_flip_spec_counted(inplace, spec, key, 6, counts, out=inplace) is inplace
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(_bits(got), _bits(want)) and torch.equal(_bits(inplace), _bits(want))
        assert torch.equal(counts.sum(0), 2 * want_counts), n_threads  # added to, twice
    assert counted_passes == [True] * 4  # one native pass per call, nothing else
    for native_on in ("1", "0"):  # bad counts or out are refused on both CPU paths
        monkeypatch.setenv("PEFT_BITFLIP_CPU_NATIVE", native_on)
        bad_counts = torch.zeros(3, dtype=torch.int64)
        with pytest.raises(ValueError, match=r"counts must be .* shape \(64, 3\)"):
            apply_flip_spec_counted(x, spec, key, 6, bad_counts)
        with pytest.raises(ValueError, match=r"out must be a contiguous .* shape \(61, 257\)"):
            apply_flip_spec_counted(x, spec, key, 6, new_flip_counts("cpu"), out=x.t())
    assert counted_passes == [True] * 4  # refused before any pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [0.0, 1e-6, 1.25, 30.0, 65504.0, 1e30, float("inf"), float("nan")])
def test_keep_below_matches_the_float32_comparison_on_every_code(dtype, t):
    """The integer zero-out keeps exactly the codes with ``float32(|y|) < float32(t)``."""
    codes = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    keep = reference.keep_mask(codes, t)
    magnitude = codes.view(torch.int16).to(torch.int32) & 0x7FFF
    assert torch.equal(magnitude < cpu_native.keep_below(t, dtype), keep)


def test_keep_below_float32_around_the_threshold():
    t = 1.25
    k = cpu_native.keep_below(t, torch.float32)
    around = torch.tensor([k - 2, k - 1, k, k + 1, 0x7F800000, 0x7FC00000], dtype=torch.int32)
    want = torch.tensor([True, True, False, False, False, False])
    assert torch.equal(reference.keep_mask(around.view(torch.float32), t), want)


def test_disabled_or_failed_build_runs_the_torch_path(monkeypatch):
    """PEFT_BITFLIP_CPU_NATIVE=0 skips the native pass; a failed build warns once and the
    torch path gives the flips."""
    x = torch.randn(4 * 257 + 1, generator=torch.Generator().manual_seed(4))
    table = flip_table(2**-6, 2**-6, x.dtype, "cpu")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_NATIVE", "0")
    assert reference.native_library("cpu", 0, 0) is None
    want = reference.bitflip_reference(x, table, 0, *KEYS[0], 3.0)
    monkeypatch.delenv("PEFT_BITFLIP_CPU_NATIVE")
    monkeypatch.setattr(cpu_native, "_LIB", [])
    monkeypatch.setattr(reference, "_NATIVE", [])
    monkeypatch.setattr(cpu_native, "_compilers", lambda: [])
    with pytest.warns(RuntimeWarning, match="native CPU flip path could not be built"):
        assert reference.native_library("cpu", 0, 0) is None
    assert reference.native_library("cpu", 0, 0) is None  # no second attempt
    got = reference.bitflip_reference(x, table, 0, *KEYS[0], 3.0)
    assert torch.equal(_bits(got), _bits(want))
    assert not torch.equal(_bits(got), _bits(x))


def test_portable_build_without_avx2_agrees():
    """The library built without the AVX2 path (what non-x86 machines run) agrees too."""
    compilers = cpu_native._compilers()
    if not compilers:
        pytest.skip("no C compiler here")
    source = cpu_native.SOURCE.read_bytes()
    path = cpu_native._compile(compilers[0], cpu_native._FLAGS, source)
    lib = cpu_native._declare(ctypes.CDLL(str(path)))
    assert reference._native_agrees(lib)
