"""The Triton LoRA kernels (merge + flip + zero-out of the weight, and the gradient correction at
zeroed weights) against the PyTorch references, through Triton's CPU interpreter; and the fast
LoRA layer path against the unfused one on both backends."""

from __future__ import annotations

import collections
import functools

import pytest
import torch

import peft_bitflip as pb
from peft_bitflip import flipped_linear
from peft_bitflip.kernels import lora
from peft_bitflip.spec import FlipSpec

W_SPEC = FlipSpec(0.02, 0.02, 0.75)
X_SPEC = FlipSpec(0.01, 0.01, 3.0)
KEYS = (pb.stream_key(0, "k", "x"), pb.stream_key(0, "k", "w"))
# high p: W's fields both dense, x's exp field sparse and frac field dense (sampling.py)
X_SPEC_HIGH = FlipSpec(1e-3, 0.3, 3.0)
W_SPEC_HIGH = FlipSpec(0.3, 2**-4, 0.75)


def coarse(shape, gen, steps):
    """Random multiples of 1/steps in [-1, 1]: W + 0.5 * B @ A (rank 2) is then exact in float32
    and in bfloat16, so no summation order or rounding mode can change the merged weight."""
    return torch.randint(-steps, steps + 1, shape, generator=gen).float() / steps


@pytest.fixture
def triton_cpu(needs_interpreter, monkeypatch):
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")


@pytest.mark.parametrize("w_spec", [W_SPEC, W_SPEC_HIGH], ids=["low-p", "high-p"])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_flip_kernel_equals_reference(triton_cpu, monkeypatch, conv1d, out_dtype, w_spec):
    gen = torch.Generator().manual_seed(0)
    w = coarse((40, 72) if conv1d else (72, 40), gen, 8)  # 2nd dim: a multiple of 8, not 64
    a, b = coarse((2, 40), gen, 4), coarse((72, 2), gen, 4)  # A (r, in), B (out, r)
    call = torch.tensor(7)
    got, got_mask = lora.merge_flip_lora(
        w, a, b, 0.5, conv1d, out_dtype, w_spec, KEYS[1], call, True
    )
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    ref, ref_mask = lora.merge_flip_lora(
        w, a, b, 0.5, conv1d, out_dtype, w_spec, KEYS[1], call, True
    )
    as_int = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(as_int), ref.view(as_int))  # bit for bit
    assert torch.equal(got_mask, ref_mask)
    # the backward's launch also writes s*A and s*B in the compute dtype (bit for bit: exact
    # here; the rounding of random values is checked on the GPU, whose float32 -> bfloat16
    # conversion rounds to nearest where the interpreter's truncates)
    args = (w, a, b, 0.5, conv1d, out_dtype, w_spec, KEYS[1], call)
    want = lora.merge_flip_lora_for_grads(*args)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    got4 = lora.merge_flip_lora_for_grads(*args)
    for i in (0, 2, 3):
        assert torch.equal(got4[i].contiguous().view(as_int), want[i].contiguous().view(as_int))
    assert torch.equal(got4[1], ref_mask)
    assert torch.equal(got4[2], (a * 0.5).to(out_dtype))
    assert torch.equal(got4[3], (b * 0.5).to(out_dtype))
    assert 0 < ref_mask.sum() < ref_mask.numel()  # zero-out and flips both happened
    assert not torch.equal(ref, lora.merge_lora_weight(w, a, b, 0.5, conv1d).to(out_dtype))


@pytest.mark.parametrize(
    "with_zeroed, with_gx, singles",
    [(True, True, 0), (True, True, 64), (True, False, 0), (True, False, 64), (False, True, 0)],
)
def test_zeroed_correction_kernel_equals_dense_reference(
    triton_cpu, monkeypatch, with_zeroed, with_gx, singles
):
    """The backward's one launch (correction subtracted from dA, dB in place; dX zeroed where
    x's packed mask says) against the dense reference, with either part or both; the zeroed
    weights of a mask tile through the dense tile product (singles=0) or one by one."""
    from peft_bitflip.kernels import triton_lora

    monkeypatch.setattr(triton_lora, "CORRECTION_SINGLES", singles)
    monkeypatch.setattr(triton_lora, "CORRECTION_BTS", 16)  # several steps over the 50 rows
    # a config cache of this test's own (restored with the constants, also if it fails)
    fresh = functools.cache(triton_lora._correction_config.__wrapped__)
    monkeypatch.setattr(triton_lora, "_correction_config", fresh)
    gen = torch.Generator().manual_seed(1)
    t, n_out, n_in, r = 50, 70, 90, 6
    g, x = torch.randn(t, n_out, generator=gen), torch.randn(t, n_in, generator=gen)
    a, b = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
    zeroed = (torch.rand(n_in, n_out, generator=gen) < 0.01).to(torch.uint8).t()  # strided
    gx = torch.randn(3, 7, 11, generator=gen) + 0.5  # 231 elements: 58 groups of 4, one short
    x_mask = torch.randint(0, 16, (58,), dtype=torch.uint8, generator=gen)
    x_mask[-1] &= 0b0111  # no bit past the end
    da0, db0 = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)

    def run():
        da, db, grad = da0.clone(), db0.clone(), gx.clone()
        lora.subtract_zeroed_correction_(
            da, db, zeroed if with_zeroed else None, g, x, a, b,
            grad if with_gx else None, x_mask, torch.float32,
        )  # fmt: skip
        return da, db, grad

    got = run()
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    want = run()
    dense = zeroed.float() * (g.t() @ x)
    torch.testing.assert_close(want[0], da0 - (b.t() @ dense if with_zeroed else 0))
    torch.testing.assert_close(want[1], db0 - (dense @ a.t() if with_zeroed else 0))
    bits = (x_mask[:, None].int() >> torch.arange(4)) & 1
    zeroed_x = bits.flatten()[: gx.numel()].bool().view(gx.shape)
    assert zeroed_x.any() and (~zeroed_x).any()
    assert torch.equal(want[2], gx.masked_fill(zeroed_x, 0) if with_gx else gx)
    assert not with_zeroed or (dense != 0).any()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(got[2], want[2])


def run(fn, x, w, a, b, bias, conv1d, train_w=False):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_(train_w)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    y = fn(x, w, a, b, 0.5, bias, X_SPEC, W_SPEC, *KEYS, torch.tensor(2), conv1d)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return y.detach(), x.grad, w.grad, a.grad, b.grad, bias.grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("train_w", [False, True])
def test_fast_lora_layer_equals_unfused(request, monkeypatch, backend, conv1d, train_w):
    if backend == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=gen)
    w = coarse((32, 24) if conv1d else (24, 32), gen, 8) * 0.5  # the merge is exact (see coarse)
    a, b = coarse((2, 32), gen, 4), coarse((24, 2), gen, 4)
    bias = torch.randn(24, generator=gen)
    fast = run(flipped_linear.flipped_lora_linear, x, w, a, b, bias, conv1d, train_w)
    plain = run(flipped_linear.flipped_lora_linear_unfused, x, w, a, b, bias, conv1d, train_w)
    assert torch.equal(fast[0], plain[0])  # the same flips and zero-outs
    for got, want in zip(fast[1:], plain[1:]):
        assert (got is None) == (want is None)
        if want is not None:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    # some weights were zeroed, so the correction term was exercised
    _, zeroed = lora.merge_flip_lora(w, a, b, 0.5, conv1d, torch.float32, W_SPEC, KEYS[1],
                                     torch.tensor(2), True)  # fmt: skip
    assert zeroed.sum() > 0


def test_lora_step_at_high_p_equals_unfused_reference(triton_cpu, monkeypatch):
    """The bit-flip LoRA step at high p (dense fields in the merge + flip launch of the forward
    and of the backward's recompute): the Triton launches give the unfused reference's output
    bit for bit and its gradients."""
    from peft_bitflip.kernels.sampling import dense_words, flip_table

    assert all(dense_words(flip_table(0.3, 2**-4, torch.float32, "cpu"), torch.float32))
    monkeypatch.setitem(globals(), "X_SPEC", X_SPEC_HIGH)
    monkeypatch.setitem(globals(), "W_SPEC", W_SPEC_HIGH)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, generator=gen)
    w = coarse((24, 32), gen, 8) * 0.5
    a, b = coarse((2, 32), gen, 4), coarse((24, 2), gen, 4)
    bias = torch.randn(24, generator=gen)
    fast = run(flipped_linear.flipped_lora_linear, x, w, a, b, bias, False, True)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    plain = run(flipped_linear.flipped_lora_linear_unfused, x, w, a, b, bias, False, True)
    assert torch.equal(fast[0], plain[0])
    for got, want in zip(fast[1:], plain[1:]):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    _, zeroed = lora.merge_flip_lora(w, a, b, 0.5, False, torch.float32, W_SPEC_HIGH, KEYS[1],
                                     torch.tensor(2), True)  # fmt: skip
    assert 0 < zeroed.sum() < zeroed.numel()


def test_lora_layer_step_takes_three_launches(triton_cpu, monkeypatch):
    """On the Triton backend a LoRA layer's forward flips x and merges + flips W in one launch;
    its backward merges + flips W again and then masks dX and corrects dA, dB in one more
    launch (the values: test_fast_lora_layer_equals_unfused)."""
    from peft_bitflip.kernels import triton_bitflip, triton_lora

    counts = collections.Counter()
    for module, name in (
        (triton_bitflip, "_launch_single"),
        (triton_bitflip, "_launch_pair"),
        (triton_bitflip, "_launch_zero_by_masks"),
        (triton_lora, "_launch_merge_flip"),
        (triton_lora, "_launch_zeroed_correction"),
    ):
        real = getattr(module, name)

        def counted(grid, args, config, real=real, name=name):
            counts[name] += 1
            real(grid, args, config)

        monkeypatch.setattr(module, name, counted)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=gen).requires_grad_()
    w = coarse((24, 32), gen, 8) * 0.5
    a, b = coarse((2, 32), gen, 4).requires_grad_(), coarse((24, 2), gen, 4).requires_grad_()
    y = flipped_linear.flipped_lora_linear(
        x, w, a, b, 0.5, None, X_SPEC, W_SPEC, *KEYS, torch.tensor(2)
    )
    assert counts == {"_launch_merge_flip": 1}
    y.backward(torch.randn(y.shape, generator=gen))  # contiguous (sum()'s is expanded)
    assert counts == {"_launch_merge_flip": 2, "_launch_zeroed_correction": 1}
    assert x.grad is not None and a.grad is not None


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("x_spec", [X_SPEC, FlipSpec()])
def test_the_compile_op_gives_the_fast_layer(reference_backend, conv1d, train_w, x_spec):
    """peft_bitflip::flipped_lora_linear (what torch.compile's graph holds) computes what the
    eager fast layer computes: the same output bits, the same gradients (x unflipped too,
    when backward keeps the input x itself)."""
    from peft_bitflip.compiled_linear import compiled_flipped_lora_linear

    def op(x, w, a, b, scale, bias, _xs, *rest):
        return compiled_flipped_lora_linear(x, w, a, b, scale, bias, x_spec, *rest)

    def fast(x, w, a, b, scale, bias, _xs, *rest):
        return flipped_linear.flipped_lora_linear(x, w, a, b, scale, bias, x_spec, *rest)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 32, generator=gen) * 2
    w = coarse((32, 24) if conv1d else (24, 32), gen, 8) * 0.5
    a, b = coarse((2, 32), gen, 4), coarse((24, 2), gen, 4)
    bias = torch.randn(24, generator=gen)
    got = run(op, x, w, a, b, bias, conv1d, train_w)
    want = run(fast, x, w, a, b, bias, conv1d, train_w)
    assert torch.equal(got[0], want[0])
    for g, e in zip(got[1:], want[1:]):
        assert (g is None) == (e is None)
        if e is not None:
            assert e.abs().max() > 0
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
