"""The Triton LoRA kernels (merge + flip + zero-out of the weight, and the gradient correction at
zeroed weights) against the PyTorch references, through Triton's CPU interpreter; and the fast
LoRA layer path against the unfused one on both backends."""

from __future__ import annotations

import pytest
import torch

import peft_bitflip as pb
from peft_bitflip import layers
from peft_bitflip.kernels import lora
from peft_bitflip.spec import FlipSpec

W_SPEC = FlipSpec(0.02, 0.02, 0.75)
X_SPEC = FlipSpec(0.01, 0.01, 3.0)
KEYS = (pb.stream_key(0, "k", "x"), pb.stream_key(0, "k", "w"))


def coarse(shape, gen, steps):
    """Random multiples of 1/steps in [-1, 1]: W + 0.5 * B @ A (rank 2) is then exact in float32
    and in bfloat16, so no summation order or rounding mode can change the merged weight."""
    return torch.randint(-steps, steps + 1, shape, generator=gen).float() / steps


@pytest.fixture
def triton_cpu(needs_interpreter, monkeypatch):
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_flip_kernel_equals_reference(triton_cpu, monkeypatch, conv1d, out_dtype):
    gen = torch.Generator().manual_seed(0)
    w = coarse((40, 72) if conv1d else (72, 40), gen, 8)  # 2nd dim: a multiple of 8, not 64
    a, b = coarse((2, 40), gen, 4), coarse((72, 2), gen, 4)  # A (r, in), B (out, r)
    call = torch.tensor(7)
    got, got_mask = lora.merge_flip_lora(
        w, a, b, 0.5, conv1d, out_dtype, W_SPEC, KEYS[1], call, True
    )
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    ref, ref_mask = lora.merge_flip_lora(
        w, a, b, 0.5, conv1d, out_dtype, W_SPEC, KEYS[1], call, True
    )
    as_int = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(as_int), ref.view(as_int))  # bit for bit
    assert torch.equal(got_mask, ref_mask)
    assert 0 < ref_mask.sum() < ref_mask.numel()  # zero-out and flips both happened
    assert not torch.equal(ref, lora.merge_lora_weight(w, a, b, 0.5, conv1d).to(out_dtype))


def test_zeroed_correction_kernel_equals_dense_reference(triton_cpu, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    t, n_out, n_in, r = 50, 70, 90, 6
    g, x = torch.randn(t, n_out, generator=gen), torch.randn(t, n_in, generator=gen)
    a, b = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
    zeroed = (torch.rand(n_in, n_out, generator=gen) < 0.01).to(torch.uint8).t()  # strided
    da, db = lora.zeroed_correction(zeroed, g, x, a, b)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    da_ref, db_ref = lora.zeroed_correction(zeroed, g, x, a, b)
    assert da_ref.abs().max() > 0
    torch.testing.assert_close(da, da_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=1e-4)


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
    fast = run(layers.flipped_lora_linear, x, w, a, b, bias, conv1d, train_w)
    plain = run(layers.flipped_lora_linear_unfused, x, w, a, b, bias, conv1d, train_w)
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
        return layers.flipped_lora_linear(x, w, a, b, scale, bias, x_spec, *rest)

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
