"""The bit-flip op: statistics, exactness of the kernel against the reference, semantics."""

from __future__ import annotations

import math

import pytest
import torch
from bitstats import (
    INT_VIEW,
    assert_binomial,
    flipped_bits,
    group_counts,
    per_bit_counts,
)

import peft_bitflip as pb
from peft_bitflip.kernels import reference
from peft_bitflip.kernels.op import bitflip_op
from peft_bitflip.kernels.sampling import U63, field_sizes, flip_table, gap_table, group_size
from peft_bitflip.spec import BIT_LAYOUTS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY = pb.stream_key(1234, "layer.0", "x")


def _ref(x, p_exp, p_frac, t=None, call=0, key=KEY):
    return reference.bitflip_reference(
        x, flip_table(p_exp, p_frac, x.dtype, x.device), call, *key, t
    )


def _kernel(x, p_exp, p_frac, t=None, call=0, key=KEY, grad=None):
    from peft_bitflip.kernels import triton_bitflip

    table = flip_table(p_exp, p_frac, x.dtype, x.device)
    return triton_bitflip.launch(x, table, torch.tensor(call), *key, t, True, grad)


def _same_bits(a, b):
    n_bits = BIT_LAYOUTS[a.dtype].n_bits
    return torch.equal(a.contiguous().view(INT_VIEW[n_bits]), b.contiguous().view(INT_VIEW[n_bits]))


# --- the Triton kernel (through the interpreter) agrees bit for bit with the reference -------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_exp,p_frac", [(0.5, 0.25), (2**-6, 1e-3), (1e-3, 0.0), (0.0, 0.01)])
def test_kernel_matches_reference(needs_interpreter, dtype, p_exp, p_frac):
    torch.manual_seed(0)
    n = 2 * 128 * group_size(dtype) + 37  # several programs and a ragged tail
    x = torch.randn(n, dtype=dtype) * 4
    for t, call in [(None, 0), (3.0, 5)]:
        y_k = _kernel(x, p_exp, p_frac, t, call)
        y_r = _ref(x, p_exp, p_frac, t, call)
        assert _same_bits(y_k, y_r), (dtype, p_exp, p_frac, t)
    assert not _same_bits(y_k, x)


@pytest.mark.parametrize("singles", [0, 1, 10**6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_ways_through_the_gap_loop_match_reference(
    needs_interpreter, monkeypatch, dtype, singles
):
    """A block whose groups with a flip are at most SINGLE_GROUPS takes them one at a time,
    else runs the loop on the whole block: every setting gives the reference's bits.  At
    p = 2^-12 a block of 64 groups expects 2 groups with a flip; the input is checked to hold
    blocks with exactly one such group and blocks with several, so the default (1) takes both
    ways, 0 only the whole-block loop and 10^6 only single groups."""
    from peft_bitflip.kernels import triton_bitflip

    g = group_size(dtype)
    block = triton_bitflip.ROWS_PER_PROGRAM * g
    torch.manual_seed(2)
    x = torch.randn(12 * block + 11, dtype=dtype) * 4
    p = 2**-12
    flipped = _ref(x, p, p, None, 7)  # no threshold: a changed group is one with a flip
    changed = torch.zeros(12 * block + block, dtype=torch.bool)
    changed[: x.numel()] = x.view(INT_VIEW[BIT_LAYOUTS[dtype].n_bits]) != flipped.view(
        INT_VIEW[BIT_LAYOUTS[dtype].n_bits]
    )
    per_block = changed.view(-1, block // g, g).any(-1).sum(-1)
    assert (per_block == 1).any() and (per_block >= 2).any(), per_block
    monkeypatch.setattr(triton_bitflip, "SINGLE_GROUPS", singles)
    triton_bitflip._launch_config.cache_clear()
    try:
        assert _same_bits(_kernel(x, p, p, None, 7), flipped)
        assert _same_bits(_kernel(x, p, p, 3.0, 7), _ref(x, p, p, 3.0, 7))
    finally:
        triton_bitflip._launch_config.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_backward_matches_reference(needs_interpreter, dtype):
    torch.manual_seed(1)
    x = torch.randn(3001, dtype=dtype) * 3
    g = torch.randn(3001, dtype=dtype)
    table = flip_table(0.05, 0.05, dtype, "cpu")
    g_k = _kernel(x, 0.05, 0.05, 2.0, 3, grad=g)
    g_r = reference.bitflip_backward_reference(g, x, table, 3, *KEY, 2.0)
    assert _same_bits(g_k, g_r)
    assert 0 < (g_k == 0).sum() < x.numel()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_gradient_mask_equals_the_masked_copy(request, monkeypatch, backend, dtype):
    """flip_spec_grad_ (used by the layers' backward) zeroes the same elements as the masked copy,
    in place, and returns the same flipped x as apply_flip_spec; x may be strided."""
    if backend == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
    spec = pb.FlipSpec(0.05, 0.05, 2.0)
    torch.manual_seed(2)
    x = (torch.randn(37, 90, dtype=dtype) * 3).t()  # (90, 37), not contiguous
    g = torch.randn(90, 37, dtype=torch.float32)  # another dtype than x is fine
    expected = pb.functional.flip_spec_grad(g, x, spec, KEY, 4)
    for want in (False, True):
        got = g.clone()
        xf = pb.functional.flip_spec_grad_(got, x, spec, KEY, 4, want_flipped=want)
        assert torch.equal(got, expected)
        if want:
            assert _same_bits(xf, pb.functional.apply_flip_spec(x, spec, KEY, 4))
        else:
            assert xf is None
    assert 0 < (expected == 0).sum() < expected.numel()
    with pytest.raises(ValueError, match="contiguous"):
        pb.functional.flip_spec_grad_(g.t().contiguous().t(), x, spec, KEY, 4)
    # no input gradient wanted (grad=None): only the flip
    only_flip = pb.functional.flip_spec_grad_(None, x, spec, KEY, 4, want_flipped=True)
    assert _same_bits(only_flip, pb.functional.apply_flip_spec(x, spec, KEY, 4))
    assert pb.functional.flip_spec_grad_(None, x, spec, KEY, 4) is None
    # no threshold: nothing is zeroed; the flipped x is still returned on request
    no_t = pb.FlipSpec(0.05, 0.05, None)
    got = g.clone()
    xf = pb.functional.flip_spec_grad_(got, x, no_t, KEY, 4, want_flipped=True)
    assert torch.equal(got, g)
    assert _same_bits(xf, pb.functional.apply_flip_spec(x, no_t, KEY, 4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "x_spec,w_spec",
    [
        (pb.FlipSpec(0.05, 0.02, 2.0), pb.FlipSpec(0.01, 0.03, 1.5)),
        (pb.FlipSpec(0.0, 0.0, 2.0), pb.FlipSpec(0.05, 0.05, None)),  # zero-only / flip-only
    ],
)
def test_one_launch_for_x_and_w_equals_two(request, monkeypatch, backend, x_spec, w_spec):
    """apply_flip_specs (a layer's forward: one kernel for x and W) gives the bits of two
    apply_flip_spec calls, for tensors of different sizes and specs."""
    if backend == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
    torch.manual_seed(3)
    x = torch.randn(3, 70, 24, dtype=torch.bfloat16) * 2
    w = torch.randn(40, 24, dtype=torch.bfloat16).t()  # strided
    wkey = pb.stream_key(1234, "layer.0", "w")
    xf, wf = pb.functional.apply_flip_specs(x, w, x_spec, w_spec, KEY, wkey, 6)
    assert _same_bits(xf, pb.functional.apply_flip_spec(x, x_spec, KEY, 6))
    assert _same_bits(wf, pb.functional.apply_flip_spec(w, w_spec, wkey, 6))
    assert xf.shape == x.shape and wf.shape == w.shape
    assert not _same_bits(xf, x) and not _same_bits(wf, w)
    with pytest.raises(TypeError, match="list"):
        pb.functional.apply_flip_specs(x, [1.0], x_spec, w_spec, KEY, wkey, 6)
    with pytest.raises(TypeError, match="w has dtype torch.int32"):
        pb.functional.apply_flip_specs(x, w.int(), x_spec, w_spec, KEY, wkey, 6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_zero_mask_marks_the_zeroed_elements(request, monkeypatch, backend, dtype):
    """apply_flip_spec_masked returns apply_flip_spec's bits and a packed mask whose bits are
    exactly the elements the zero-out removed (checked against the masked gradient of ones);
    zero_masked_ zeroes those elements of a gradient of another dtype in place."""
    if backend == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
    torch.manual_seed(4)
    g_size = group_size(dtype)
    x = (torch.randn(13, 29, dtype=dtype) * 3).t()  # strided; numel not a multiple of G
    for spec in (pb.FlipSpec(0.05, 0.05, 2.0), pb.FlipSpec(0.0, 0.0, 2.0)):
        y, mask = pb.functional.apply_flip_spec_masked(x, spec, KEY, 7)
        assert _same_bits(y, pb.functional.apply_flip_spec(x, spec, KEY, 7))
        assert mask.dtype == torch.uint8 and mask.numel() == -(-x.numel() // g_size)
        kept = pb.functional.flip_spec_grad(torch.ones(x.shape), x, spec, KEY, 7)
        zeroed = reference.unpack_zero_mask(mask, x.numel(), g_size)
        assert torch.equal(zeroed, kept.reshape(-1) == 0)
        assert 0 < zeroed.sum() < x.numel()
        g = torch.randn(x.shape, dtype=torch.float32)
        got = pb.functional.zero_masked_(g.clone(), mask, dtype)
        assert torch.equal(got, pb.functional.flip_spec_grad(g, x, spec, KEY, 7))
    # threshold 0 zeroes everything: the bits past the last element stay 0 (as the reference)
    y, mask = pb.functional.apply_flip_spec_masked(x, pb.FlipSpec(0.0, 0.0, 0.0), KEY, 7)
    assert torch.equal(
        mask, reference.pack_zero_mask(torch.ones(x.numel(), dtype=torch.bool), g_size)
    )
    assert not y.any()
    # no threshold (nothing is ever zeroed) or no mask wanted: no mask
    for spec, want in (
        (pb.FlipSpec(0.05, 0.05, None), True),
        (pb.FlipSpec(0.05, 0.05, 2.0), False),
    ):
        y, mask = pb.functional.apply_flip_spec_masked(x, spec, KEY, 7, want_mask=want)
        assert mask is None and _same_bits(y, pb.functional.apply_flip_spec(x, spec, KEY, 7))
    g = torch.randn(x.shape)
    assert pb.functional.zero_masked_(g, None, dtype) is g
    with pytest.raises(ValueError, match="groups"):
        pb.functional.zero_masked_(g, torch.zeros(3, dtype=torch.uint8), dtype)
    with pytest.raises(ValueError, match="contiguous"):
        pb.functional.zero_masked_(g.t().contiguous().t(), _zero_only_mask(x), dtype)


def _zero_only_mask(x):
    return pb.functional.apply_flip_spec_masked(x, pb.FlipSpec(0.0, 0.0, 2.0), KEY, 0)[1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "x_spec,w_spec",
    [
        (pb.FlipSpec(0.05, 0.02, 2.0), pb.FlipSpec(0.01, 0.03, 1.5)),
        (pb.FlipSpec(0.0, 0.0, 2.0), pb.FlipSpec()),  # W untouched: two separate paths
    ],
)
def test_one_launch_with_the_x_mask_equals_separate_flips(
    request, monkeypatch, backend, x_spec, w_spec
):
    """flip_specs_masked (the layers' forward) gives the bits and x mask of separate calls."""
    if backend == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
    torch.manual_seed(5)
    x = torch.randn(2, 50, 24, dtype=torch.bfloat16) * 2
    w = torch.randn(24, 33, dtype=torch.bfloat16).t()  # strided
    wkey = pb.stream_key(1234, "layer.0", "w")
    xf, wf, x_mask = pb.functional.flip_specs_masked(x, w, x_spec, w_spec, KEY, wkey, 8, True)
    xf1, mask1 = pb.functional.apply_flip_spec_masked(x, x_spec, KEY, 8)
    assert _same_bits(xf, xf1) and torch.equal(x_mask, mask1) and x_mask.any()
    assert _same_bits(wf, pb.functional.apply_flip_spec(w, w_spec, wkey, 8))
    # dX and dW masked in one launch == one at a time (also with only one mask)
    w_mask = pb.functional.apply_flip_spec_masked(w, w_spec, wkey, 8)[1]
    gx, gw = torch.randn(x.shape), torch.randn(w.shape, dtype=torch.bfloat16)
    bf16 = torch.bfloat16
    for wm in (w_mask, None):
        got_x, got_w = gx.clone(), gw.clone()
        pb.functional.zero_masked_(got_x, x_mask, bf16, got_w, wm, bf16)
        assert torch.equal(got_x, pb.functional.zero_masked_(gx.clone(), x_mask, bf16))
        assert torch.equal(got_w, pb.functional.zero_masked_(gw.clone(), wm, bf16))
    assert (got_x == 0).any()
    with pytest.raises(TypeError, match="triple"):
        pb.functional.zero_masked_(gx, x_mask, bf16, gw, w_mask)
    xf, wf, x_mask = pb.functional.flip_specs_masked(x, w, x_spec, w_spec, KEY, wkey, 8)
    assert x_mask is None and _same_bits(xf, xf1)
    with pytest.raises(TypeError, match="float"):
        pb.functional.flip_specs_masked(x, 1.0, x_spec, w_spec, KEY, wkey, 8)


def test_op_uses_the_kernel_under_the_interpreter(needs_interpreter, monkeypatch):
    """The public op dispatches to the Triton kernel on the CPU when TRITON_INTERPRET=1."""
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    x = torch.randn(1000, dtype=torch.bfloat16)
    y_kernel = pb.bitflip(x, 0.01, 0.01, 4.0, seed=3, stream="s")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    y_ref = pb.bitflip(x, 0.01, 0.01, 4.0, seed=3, stream="s")
    assert _same_bits(y_kernel, y_ref)


# --- flip statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 2**-6, 1e-3])
def test_flip_rate_per_bit_group(reference_backend, dtype, p):
    """Exp (incl. sign) and mantissa bits flip at their own rates, within 5 sd, bit by bit too."""
    layout = BIT_LAYOUTS[dtype]
    n = 1 << 18 if p < 0.01 else 1 << 14
    x = torch.randn(n, dtype=dtype)
    p_exp, p_frac = p, p / 2  # different rates so that a group mix-up is caught
    y = pb.bitflip(x, p_exp, p_frac, seed=7, stream=str(p))
    n_exp, n_frac = group_counts(x, y)
    assert_binomial(n_exp, n * layout.n_exp, p_exp, what=f"{dtype} exp")
    assert_binomial(n_frac, n * layout.n_frac, p_frac, what=f"{dtype} frac")
    counts = per_bit_counts(flipped_bits(x, y), layout.n_bits)
    for b in range(layout.n_bits):
        pb_ = p_exp if b >= layout.n_frac else p_frac
        assert_binomial(int(counts[b]), n, pb_, what=f"{dtype} bit {b}")


def test_small_p_on_large_tensor(reference_backend):
    """p = 1e-6 on 2^24 bf16 elements: ~151 exp and ~117 mantissa flips, within 5 sd."""
    n = 1 << 24
    x = torch.ones(n, dtype=torch.bfloat16)
    y = pb.bitflip(x, 1e-6, 1e-6, seed=11)
    n_exp, n_frac = group_counts(x, y)
    assert_binomial(n_exp, n * 9, 1e-6, what="exp")
    assert_binomial(n_frac, n * 7, 1e-6, what="frac")


def test_flips_per_element_are_independent(reference_backend):
    """Two flips in one element occur at the rate of independent bits (no clustering)."""
    n, p = 1 << 16, 0.02
    x = torch.zeros(n, dtype=torch.float32)
    diff = flipped_bits(x, pb.bitflip(x, p, p, seed=5))
    ones = torch.stack([((diff >> b) & 1) for b in range(32)]).sum(0)
    for k in range(3):
        expected = math.comb(32, k) * p**k * (1 - p) ** (32 - k)
        assert_binomial(int((ones == k).sum()), n, expected, what=f"{k} flips per element")


@pytest.mark.parametrize("p", [1e-9, 1e-12, 2**-24])
def test_tiny_probabilities_are_exact_in_the_table(p):
    """The realised per-bit probability is p to within 2^-63 absolute, down to 1e-12."""
    t = gap_table(p, 64)
    realised = (t[0] + 1) / U63
    assert abs(realised - p) <= 2 / U63
    # P(no flip in 64 bits) = (1-p)^64, the fast path's threshold
    assert abs((t[-1] + 1) / U63 - (-math.expm1(64 * math.log1p(-p)))) <= 2 / U63


@pytest.mark.parametrize("p,expected", [(0.0, (-1, -1)), (1.0, (U63 - 1, U63 - 1))])
def test_table_edges(p, expected):
    assert gap_table(p, 2) == expected


def test_p_one_flips_every_bit_and_p_zero_none(reference_backend):
    x = torch.randn(999, dtype=torch.float16)
    y = pb.bitflip(x, 1.0, 1.0)
    assert torch.all(flipped_bits(x, y) == 0xFFFF)
    y = pb.bitflip(x, 1.0, 0.0)
    assert torch.all(flipped_bits(x, y) == 0xFC00)
    assert pb.bitflip(x, 0.0, 0.0) is x  # identity spec: no copy, no change


# --- streams, determinism ------------------------------------------------------------------


def test_streams_are_independent(reference_backend):
    """Different streams / calls / seeds overlap only by chance (N p^2), equal ones fully."""
    n, p = 1 << 16, 0.05
    x = torch.zeros(n, dtype=torch.bfloat16)
    trials = n * 16

    def flip_bits(**kw):  # 0/1 per (element, bit)
        diff = flipped_bits(x, pb.bitflip(x, p, p, **kw))
        return torch.stack([(diff >> b) & 1 for b in range(16)])

    base = flip_bits(seed=1, stream="layers.0.q_proj/x")
    others = {
        "other layer": dict(seed=1, stream="layers.1.q_proj/x"),
        "x vs w": dict(seed=1, stream="layers.0.q_proj/w"),
        "next call": dict(seed=1, stream="layers.0.q_proj/x", call=1),
        "other seed": dict(seed=2, stream="layers.0.q_proj/x"),
    }
    for what, kw in others.items():
        overlap = int((base & flip_bits(**kw)).sum())
        assert_binomial(overlap, trials, p * p, what=what)
    same = flip_bits(seed=1, stream="layers.0.q_proj/x")
    assert int((base & same).sum()) == int(base.sum()) > 0


def test_stream_keys_are_stable():
    assert pb.stream_key(0, "a") == pb.stream_key(0, "a")
    assert pb.stream_key(0, "a") != pb.stream_key(0, "b")
    assert pb.stream_key(0, 1) != pb.stream_key(0, "1")  # typed: int 1 is not the string "1"
    assert pb.stream_key(0, "a", "x") != pb.stream_key(0, "a", "w")
    assert all(0 <= k < 2**32 for k in pb.stream_key(2**62, "z"))


def test_deterministic_and_pure(reference_backend):
    torch.manual_seed(0)
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    a = pb.bitflip(x, 0.01, 0.01, 2.0, seed=3, stream="s", call=4)
    b = pb.bitflip(x.clone(), 0.01, 0.01, 2.0, seed=3, stream="s", call=torch.tensor(4))
    assert _same_bits(a, b)
    torch.manual_seed(99)  # the global torch RNG plays no part
    c = pb.bitflip(x, 0.01, 0.01, 2.0, seed=3, stream="s", call=4)
    assert _same_bits(a, c)
    d = pb.bitflip(x, 0.01, 0.01, 2.0, seed=3, stream="s", call=5)
    assert not _same_bits(a, d)


def test_non_contiguous_input_and_shapes(reference_backend):
    torch.manual_seed(0)
    base = torch.randn(48, 80, dtype=torch.float32)
    xt = base.t()  # non-contiguous view
    y = pb.bitflip(xt, 0.05, 0.05, seed=2)
    assert y.shape == xt.shape
    assert _same_bits(y, pb.bitflip(xt.contiguous(), 0.05, 0.05, seed=2))
    x3 = torch.randn(3, 5, 7, dtype=torch.float16)
    assert pb.bitflip(x3, 0.1, 0.1, 1.0).shape == (3, 5, 7)
    empty = torch.empty(0, 4, dtype=torch.bfloat16)
    assert pb.bitflip(empty, 0.5, 0.5, 1.0).shape == (0, 4)
    scalar = torch.tensor(1.5)
    assert pb.bitflip(scalar, 0.0, 0.0, 1.0).item() == 0.0  # 1.5 >= 1.0 is zeroed


def test_tensor_tail_from_a_start_offset():
    """The reference computes any aligned slice of a stream (used for the >2^31 GPU test)."""
    x = torch.randn(4096, dtype=torch.bfloat16)
    table = flip_table(0.05, 0.05, x.dtype, "cpu")
    full = reference.flip_masks(4096, x.dtype, table, 0, *KEY)
    tail = reference.flip_masks(1024, x.dtype, table, 0, *KEY, start=3072)
    assert torch.equal(full[3072:], tail)
    with pytest.raises(ValueError, match="multiple of the group size"):
        reference.flip_masks(8, x.dtype, table, 0, *KEY, start=3)


# --- zero-out and gradients --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_out_is_inclusive_and_catches_nan_inf(reference_backend, dtype):
    t = 1.25
    below = torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
    vals = [t, -t, below, -below, 0.0, 100.0, float("nan"), float("inf"), float("-inf"), 0.5]
    x = torch.tensor(vals, dtype=dtype)
    y = pb.bitflip(x, 0.0, 0.0, t)
    expected = torch.tensor([0, 0, below, -below, 0, 0, 0, 0, 0, 0.5], dtype=dtype)
    assert torch.equal(y, expected)
    # inf threshold: only NaN/Inf are zeroed
    y = pb.bitflip(x, 0.0, 0.0, float("inf"))
    assert torch.equal(y[~torch.isfinite(x)], torch.zeros(3, dtype=dtype))
    assert torch.all(y[torch.isfinite(x)] == x[torch.isfinite(x)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_out_applies_after_flips(reference_backend, dtype):
    torch.manual_seed(0)
    x = torch.randn(1 << 14, dtype=dtype)
    flipped = pb.bitflip(x, 2**-6, 2**-6, None, seed=4)
    y = pb.bitflip(x, 2**-6, 2**-6, 2.0, seed=4)
    kept = flipped.float().abs() < 2.0
    assert torch.equal(y[kept], flipped[kept])
    assert torch.all(y[~kept] == 0)
    assert (~kept & (x.float().abs() < 2.0)).any()  # some elements were zeroed because of a flip


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_straight_through_and_masked(reference_backend, dtype):
    torch.manual_seed(0)
    x = (torch.randn(4096, dtype=dtype) * 2).requires_grad_()
    w = torch.randn(4096, dtype=dtype)
    y = pb.bitflip(x, 0.02, 0.02, 2.5, seed=9, stream="g")
    (y * w).sum().backward()
    flipped = pb.bitflip(x.detach(), 0.02, 0.02, None, seed=9, stream="g")
    zeroed = ~(flipped.float().abs() < 2.5)
    assert zeroed.any() and (~zeroed).any()
    assert torch.equal(x.grad[~zeroed], w[~zeroed])
    assert torch.all(x.grad[zeroed] == 0)
    # no threshold: the gradient passes unchanged even where bits flipped
    x.grad = None
    (pb.bitflip(x, 0.02, 0.02, None, seed=9) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_opcheck(reference_backend):
    """Schema, fake (meta) kernel, autograd registration of the torch.library op."""
    x = torch.randn(33, 17, requires_grad=True)
    table = flip_table(
        0.0, 0.02, x.dtype, "cpu"
    )  # mantissa flips only: no NaN (opcheck's == fails on NaN)
    call = torch.tensor(3)
    for t in (None, 1.0):
        torch.library.opcheck(bitflip_op, (x, table, call, 1, 2, t, True))


def test_meta_tensors():
    x = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    table = flip_table(0.01, 0.01, x.dtype, "meta")
    y = bitflip_op(x, table, torch.tensor(0, device="meta"), 1, 2, 1.0, True)
    assert y.shape == (4, 8) and y.dtype == torch.bfloat16 and y.device.type == "meta"


def test_torch_compile_full_graph_without_recompiles(reference_backend, monkeypatch):
    monkeypatch.setenv("PEFT_BITFLIP_CPU_COMPILE", "0")  # the CPU path's own compiled loops
    torch._dynamo.reset()  # are graphs of their own; count only f's
    from torch._dynamo.utils import counters

    counters.clear()

    def f(x, call):
        return pb.bitflip(x, 0.01, 0.01, 2.0, seed=1, stream="c", call=call) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(256, 64)
    for c in range(3):
        call = torch.tensor(c)
        assert torch.equal(cf(x, call), f(x, call))
    assert counters["stats"]["unique_graphs"] == 1  # the call index is data, not a constant
    xg = x.clone().requires_grad_()
    cf(xg, torch.tensor(0)).sum().backward()
    flipped = pb.bitflip(x, 0.01, 0.01, None, seed=1, stream="c", call=0)
    assert torch.equal(xg.grad, 2 * (flipped.abs() < 2.0).float())


# --- compatibility with the original's probabilities --------------------------------------


@pytest.mark.parametrize(
    "p,snapped",
    [(2**-16, 2**-16), (1e-4, 2**-14), (0.3, 0.25), (1.0, 0.5), (1e-9, 2**-24), (0.0, 0.0)],
)
def test_snap_probability(p, snapped):
    assert pb.snap_probability(p) == snapped


def test_compat_mode_flips_at_the_snapped_rate(reference_backend):
    n = 1 << 15
    x = torch.randn(n, dtype=torch.float32)
    y = pb.bitflip(x, 0.3, 0.1, compat_snap=True, seed=1)  # -> 0.25 and 0.0625
    n_exp, n_frac = group_counts(x, y)
    assert_binomial(n_exp, n * 9, 0.25, what="exp")
    assert_binomial(n_frac, n * 23, 0.0625, what="frac")
    spec = pb.FlipSpec(0.3, 0.1, compat_snap=True)
    assert (spec.effective_p_exp, spec.effective_p_frac) == (0.25, 0.0625)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(p_exp=-0.1), ValueError, r"p_exp .*-0\.1"),
        (dict(p_frac=1.5), ValueError, r"p_frac .*1\.5"),
        (dict(p_exp=float("nan")), ValueError, r"p_exp .*nan"),
        (dict(p_exp="0.1"), TypeError, r"p_exp .*'0\.1'"),
        (dict(p_exp=True), TypeError, r"p_exp .*True"),
        (dict(zero_out_threshold=-1.0), ValueError, r"zero_out_threshold .*-1\.0"),
        (dict(zero_out_threshold=float("nan")), ValueError, r"zero_out_threshold .*nan"),
        (dict(seed=-3), ValueError, r"seed .*-3"),
        (dict(call=2**32), ValueError, r"call .*4294967296"),
        (dict(compat_snap=1), TypeError, r"compat_snap .*1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pb.bitflip(torch.ones(4), **kwargs)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.float64, torch.float8_e4m3fn]
)
def test_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        pb.bitflip(torch.zeros(4, dtype=dtype), 0.1, 0.1)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="list"):
        pb.bitflip([1.0, 2.0], 0.1)


def test_group_layout_constants():
    """Each group covers 128 data bits; the fields add up to the element layout."""
    for dtype, layout in BIT_LAYOUTS.items():
        g = group_size(dtype)
        assert g * layout.n_bits == 128
        assert field_sizes(dtype) == (g * layout.n_exp, g * layout.n_frac)
        assert layout.n_exp + layout.n_frac == layout.n_bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_path_equals_the_eager_reference(reference_backend, monkeypatch, dtype):
    """Tensors of >= 2^20 elements take the torch.compile'd CPU loops (Philox from one int64
    product per multiply, the fused zero-out); they must give the eager reference's bits, at a
    small p (first draw only), a large one (dense fields, eager, beside compiled sparse ones)
    and a large one forced sparse (many gap-loop iterations of compiled draws)."""
    if not reference.cpu_path("cpu").compiled:
        pytest.skip("torch.compile is not available here (the eager path runs)")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_NATIVE", "0")  # the torch path (cpu_native: its test)
    n = reference._COMPILE_FROM + 13
    x = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 8).to(dtype)
    for p_exp, p_frac, t in ((2**-16, 2**-10, 30.0), (0.3, 2**-12, 4.0), (1e-3, 0.0, None)):
        compiled = pb.bitflip(x, p_exp, p_frac, t, seed=7, stream="big", call=2)
        monkeypatch.setenv("PEFT_BITFLIP_CPU_COMPILE", "0")
        eager = pb.bitflip(x, p_exp, p_frac, t, seed=7, stream="big", call=2)
        monkeypatch.delenv("PEFT_BITFLIP_CPU_COMPILE")
        ints = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(compiled.view(ints), eager.view(ints))  # bit for bit, NaNs too
        assert not torch.equal(compiled, x)  # something flipped
    table = flip_table(0.3, 0.05, dtype, "cpu", (False, False))  # the gap loop at a large p
    compiled = reference.bitflip_reference(x, table, 2, *KEY, 4.0)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_COMPILE", "0")
    eager = reference.bitflip_reference(x, table, 2, *KEY, 4.0)
    assert torch.equal(compiled.view(ints), eager.view(ints))
