"""The dense path of the sampling scheme (bit-sliced comparison with P = floor(p 2^64)): its
semantics against a brute-force oracle, its choice per field, its statistics (reference,
5 sd), and the Triton kernel bit for bit against the reference (interpreter, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from bitstats import INT_VIEW, assert_binomial, flipped_bits, group_counts, per_bit_counts

import peft_bitflip as pb
from peft_bitflip.kernels import reference
from peft_bitflip.kernels.sampling import (
    DENSE_ITERATION,
    dense_word,
    dense_words,
    field_is_dense,
    field_sizes,
    flip_table,
    group_size,
    table_values,
)
from peft_bitflip.spec import BIT_LAYOUTS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY = pb.stream_key(77, "layer.3", "w")
BOTH = (True, True)


def _flip(x, p_exp, p_frac, dense=BOTH, t=None, call=0, key=KEY):
    table = flip_table(p_exp, p_frac, x.dtype, x.device, dense)
    return reference.bitflip_reference(x, table, call, *key, t)


def _same_bits(a, b):
    view = INT_VIEW[BIT_LAYOUTS[a.dtype].n_bits]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# --- the scheme ----------------------------------------------------------------------------


def test_dense_word_is_p_to_2_pow_64():
    assert dense_word(0.5) == -(1 << 63)  # 2^63 as int64 bits
    assert dense_word(2**-64) == 1 and dense_word(2**-65) == 0
    assert dense_word(0.3) % (1 << 64) == math.floor(0.3 * 2**64)  # exact (0.3 as a float)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=str(p)):
            dense_word(p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_field_takes_its_own_path(dtype):
    """The cost model: dense at large p, sparse at small p and at p = 0 or 1; exp and frac
    apart; a dense field's gap entries never flip and P ends the table."""
    n_e, n_f = field_sizes(dtype)
    for n in (n_e, n_f):
        assert all(field_is_dense(p, n) for p in (0.5, 0.3, 2**-4))
        assert not any(field_is_dense(p, n) for p in (0.0, 1.0, 2**-12, 2**-16, 1e-9))
    values = table_values(2**-16, 0.3, dtype)
    assert len(values) == n_e + n_f + 2
    assert values[n_e + n_f :] == (0, dense_word(0.3))  # exp sparse, frac dense
    assert values[n_e : n_e + n_f] == (-1,) * n_f and values[n_e - 1] > 0
    assert dense_words(flip_table(0.3, 2**-16, dtype, "cpu"), dtype) == (dense_word(0.3), 0)
    assert table_values(0.3, 0.3, dtype, (False, False))[n_e + n_f :] == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p_exp,p_frac", [(0.3, 0.7), (2**-3, 0.0), (0.0, 0.1 + 2**-60)])
def test_dense_masks_equal_a_brute_force_comparison(dtype, p_exp, p_frac):
    """Lane (word w, bit j) flips iff U < P, U's digit k being bit j of word w of the draw at
    DENSE_ITERATION + k, all 64 digits drawn (the reference stops early; same result)."""
    n_groups, first, call = 6, (1 << 32) - 3, 9
    words = dense_words(flip_table(p_exp, p_frac, dtype, "cpu", BOTH), dtype)
    got = reference.dense_masks(n_groups, dtype, words, call, *KEY, "cpu", first)
    groups = torch.arange(n_groups, dtype=torch.int64) + first
    draws = [reference._words(groups, DENSE_ITERATION + k, call, *KEY) for k in range(64)]
    e_lanes, _ = reference.field_word_masks(dtype)
    flips = torch.zeros(n_groups, 4, dtype=torch.int64)
    for g in range(n_groups):
        for w in range(4):
            for j in range(32):
                u = sum(((int(draws[k][w][g]) >> j) & 1) << (63 - k) for k in range(64))
                p = words[0] if (e_lanes >> j) & 1 else words[1]
                flips[g, w] |= int(u < p) << j
    if BIT_LAYOUTS[dtype].n_bits == 16:
        flips = torch.stack([flips & 0xFFFF, flips >> 16], 2)
    assert torch.equal(got, flips.reshape(-1))
    assert got.any()


def test_dense_is_a_pure_function_of_its_inputs():
    x = torch.randn(999, dtype=torch.bfloat16)
    a = _flip(x, 0.3, 0.2, t=2.0, call=4)
    assert _same_bits(a, _flip(x.clone(), 0.3, 0.2, t=2.0, call=4))
    assert not _same_bits(a, _flip(x, 0.3, 0.2, t=2.0, call=5))
    assert not _same_bits(a, _flip(x, 0.3, 0.2, t=2.0, call=4, key=pb.stream_key(77, "o")))


# --- statistics (reference; 5 sd) ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2**-12, 2**-8, 2**-4, 0.3, 0.5])
def test_dense_flip_rate_per_bit(dtype, p):
    """Every bit of both fields flips at its field's rate, within 5 sd (both fields dense)."""
    layout = BIT_LAYOUTS[dtype]
    n = 1 << 17 if p < 2**-6 else 1 << 13
    x = torch.randn(n, dtype=dtype)
    p_exp, p_frac = p, p * 0.75  # different rates so that a field mix-up is caught
    y = _flip(x, p_exp, p_frac, call=int(-math.log2(p) * 10))
    n_exp, n_frac = group_counts(x, y)
    assert_binomial(n_exp, n * layout.n_exp, p_exp, what=f"{dtype} exp")
    assert_binomial(n_frac, n * layout.n_frac, p_frac, what=f"{dtype} frac")
    counts = per_bit_counts(flipped_bits(x, y), layout.n_bits)
    for b in range(layout.n_bits):
        pb_ = p_exp if b >= layout.n_frac else p_frac
        assert_binomial(int(counts[b]), n, pb_, what=f"{dtype} bit {b}")


@pytest.mark.parametrize("dense", [(True, False), (False, True)])
def test_mixed_fields_flip_at_their_rates(dense):
    """One field dense, the other sparse (gap sampling) in the same tensor."""
    x = torch.randn(1 << 14, dtype=torch.bfloat16)
    y = _flip(x, 0.1, 0.05, dense)
    n_exp, n_frac = group_counts(x, y)
    assert_binomial(n_exp, x.numel() * 9, 0.1, what="exp")
    assert_binomial(n_frac, x.numel() * 7, 0.05, what="frac")


@pytest.mark.parametrize("p", [2**-4, 0.3])
def test_dense_streams_are_independent(p):
    """Different streams, calls and seeds share flips only by chance (N p^2, 5 sd)."""
    x = torch.zeros(1 << 13, dtype=torch.bfloat16)

    def bits(seed, stream, call=0):
        return flipped_bits(x, _flip(x, p, p, call=call, key=pb.stream_key(seed, stream)))

    base = bits(1, "a")
    trials = x.numel() * 16
    for other in (bits(1, "b"), bits(1, "a", call=1), bits(2, "a")):
        overlap = sum(int(((base & other) >> b & 1).sum()) for b in range(16))
        assert_binomial(overlap, trials, p * p, what=f"overlap at p={p}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [2**-4, 0.3])
def test_neighbouring_bits_of_an_element_are_independent(dtype, p):
    """Each pair of adjacent bits of an element flips together at p^2 (5 sd), and the number
    of flips per element is binomial (the lanes of one random word are independent)."""
    n_bits = BIT_LAYOUTS[dtype].n_bits
    n = 1 << 14
    x = torch.zeros(n, dtype=dtype)
    diff = flipped_bits(x, _flip(x, p, p))
    ones = torch.stack([(diff >> b) & 1 for b in range(n_bits)])
    for b in range(n_bits - 1):
        assert_binomial(int((ones[b] & ones[b + 1]).sum()), n, p * p, what=f"bits {b},{b + 1}")
    per_elem = ones.sum(0)
    for k in range(4):
        expected = math.comb(n_bits, k) * p**k * (1 - p) ** (n_bits - k)
        assert_binomial(int((per_elem == k).sum()), n, expected, what=f"{k} flips per element")


# --- the Triton kernel (interpreter) against the reference, bit for bit ---------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "p_exp,p_frac,dense",
    [(0.3, 2**-4, (True, True)), (0.3, 2**-8, (True, False)), (2**-8, 0.5, (False, True))],
)
def test_kernel_dense_fields_match_reference(needs_interpreter, dtype, p_exp, p_frac, dense):
    from peft_bitflip.kernels import triton_bitflip

    torch.manual_seed(0)
    g = group_size(dtype)
    x = torch.randn(130 * g + 3, dtype=dtype) * 4  # two programs of 128 groups, a ragged tail
    table = flip_table(p_exp, p_frac, dtype, "cpu", dense)
    for t, call in [(None, 0), (3.0, 5)]:
        got = triton_bitflip.launch(x, table, torch.tensor(call), *KEY, t, True)
        want = reference.bitflip_reference(x, table, call, *KEY, t)
        assert _same_bits(got, want), (dtype, p_exp, p_frac, dense, t)
        grad = torch.randn(x.shape)
        got_g = triton_bitflip.launch(x, table, torch.tensor(call), *KEY, 2.0, True, grad)
        want_g = reference.bitflip_backward_reference(grad, x, table, call, *KEY, 2.0)
        assert torch.equal(got_g, want_g)
    assert not _same_bits(got, x)


def test_flips_mode_compiles_only_the_paths_a_table_needs():
    """A table known to hold no dense field compiles without the dense path, one known to hold
    two without the gap sampling; a mixed or unknown table keeps both (read from its P words)."""
    from peft_bitflip.kernels.sampling import FLIPS_DENSE_ONLY, FLIPS_SPARSE_ONLY, flips_mode

    dtype = torch.bfloat16
    sparse = flip_table(2**-16, 2**-16, dtype, "cpu")
    dense = flip_table(2**-4, 0.3, dtype, "cpu")
    mixed = flip_table(0.3, 2**-8, dtype, "cpu", (True, False))
    assert flips_mode(sparse, True) == FLIPS_SPARSE_ONLY
    assert flips_mode(dense, True) == FLIPS_DENSE_ONLY
    assert flips_mode(mixed, True) is True
    assert flips_mode(dense.clone(), True) is True  # not made by flip_table: nothing known
    assert flips_mode(dense, False) is False
    assert all(dense[-2:] != 0) and (mixed[-2] != 0) and (mixed[-1] == 0)


@pytest.mark.parametrize("p_exp,p_frac", [(2**-4, 0.3), (0.3, 2**-12)])
def test_in_place_dense_launch_equals_the_flip(needs_interpreter, p_exp, p_frac):
    """In place (``out=x``) a launch with a dense-only table stores every group, a mixed one
    only the groups that changed: both leave x equal to the out-of-place flip, bit for bit."""
    from peft_bitflip.kernels import triton_bitflip
    from peft_bitflip.kernels.sampling import FLIPS_DENSE_ONLY, flips_mode

    dtype = torch.bfloat16
    x = torch.randn(130 * group_size(dtype) + 3, dtype=dtype) * 4
    table = flip_table(p_exp, p_frac, dtype, "cpu")
    assert (flips_mode(table, True) == FLIPS_DENSE_ONLY) == (min(p_exp, p_frac) > 0.01)
    call = torch.tensor(2)
    for t in (None, 3.0):
        want = triton_bitflip.launch(x, table, call, *KEY, t, True)
        inplace = x.clone()
        assert triton_bitflip.launch(inplace, table, call, *KEY, t, True, out=inplace) is inplace
        assert _same_bits(inplace, want) and not _same_bits(inplace, x)


def test_dense_launches_take_their_block_shape_with_the_same_bits(needs_interpreter, monkeypatch):
    """A table with a dense field launches 128 groups x 1 warp per program (the sparse shape
    otherwise, also in the paired x + W launch); the flips do not depend on the shape."""
    from peft_bitflip.kernels import triton_bitflip as tb

    shapes = []
    for name in ("_launch_single", "_launch_pair"):
        launcher = getattr(tb, name)

        def recording(grid, args, config, launcher=launcher):
            shapes.append((config["ROWS"], config["num_warps"]))
            return launcher(grid, args, config)

        monkeypatch.setattr(tb, name, recording)
    dtype = torch.bfloat16
    x = torch.randn(200 * group_size(dtype) + 5, dtype=dtype) * 4
    w = torch.randn(70 * group_size(dtype) + 1, dtype=dtype)
    dense, sparse = flip_table(2**-4, 0.3, dtype, "cpu"), flip_table(2**-16, 2**-16, dtype, "cpu")
    call = torch.tensor(3)
    got = tb.launch(x, dense, call, *KEY, 3.0, True)
    assert shapes.pop() == (tb.DENSE_ROWS_PER_PROGRAM, tb.DENSE_NUM_WARPS)
    shipped = tb.launch(x, dense, call, *KEY, 3.0, True, rows=64, num_warps=2)
    assert shapes.pop() == (64, 2)
    assert _same_bits(got, shipped) and _same_bits(got, _flip_x(x, dense, 3, 3.0))
    tb.launch(x, sparse, call, *KEY, 3.0, True)
    assert shapes.pop() == (tb.ROWS_PER_PROGRAM, tb.NUM_WARPS)
    xf, wf, _ = tb.launch_pair(x, w, dense, sparse, call, KEY, (5, 6), 3.0, None, True, True)
    assert shapes.pop() == (tb.DENSE_ROWS_PER_PROGRAM, tb.DENSE_NUM_WARPS)
    assert _same_bits(xf, got)
    assert _same_bits(wf, reference.bitflip_reference(w, sparse, 3, 5, 6, None))


def _flip_x(x, table, call, t):
    return reference.bitflip_reference(x, table, call, *KEY, t)
