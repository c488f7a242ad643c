"""A layer's call counter (``bitflip_calls``) advances by exactly one per forward, in every
forward path, without launches of its own: the current counter tensor becomes the forward's
call index and the flip kernel writes ``call + 1`` into the tensor that replaces it.  Each
forward flips as the unfused form does with the explicit call index; a saved call index is
never written again; a failing forward leaves a valid counter."""

from __future__ import annotations

import pytest
import torch

import peft_bitflip as pb
from peft_bitflip import functional as F
from peft_bitflip.flipped_linear import flipped_linear_unfused, flipped_lora_linear_unfused
from peft_bitflip.spec import FlipSpec

X_SPEC = FlipSpec(0.02, 0.02, 3.0)
W_SPEC = FlipSpec(0.02, 0.01, 0.2)
NONE = FlipSpec()  # the identity: no flips, no zero-out

BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", request.param)
    return request.param


def make_layer(x_spec=X_SPEC, w_spec=W_SPEC, start=5):
    torch.manual_seed(0)
    layer = pb.BitflipLinear(24, 16)
    with torch.no_grad():
        layer.weight.mul_(0.5)
    layer.init_bitflip("layer", x_spec, w_spec, seed=3)
    layer.bitflip_calls.fill_(start)
    return layer


def expected(layer, x, call):
    """The unfused form at an explicit call index (the reference backend)."""
    with torch.no_grad():
        return flipped_linear_unfused(
            x, layer.weight, layer.bias, layer.x_spec, layer.w_spec, *layer.stream_keys(),
            torch.tensor(call),
        )  # fmt: skip


def x_input(seed=1, rows=6):
    return torch.randn(rows, 24, generator=torch.Generator().manual_seed(seed)) * 2


SPECS = {
    "x and w": (X_SPEC, W_SPEC),
    "only x": (X_SPEC, NONE),
    "only w": (NONE, W_SPEC),
    "x without zero-out": (FlipSpec(0.02, 0.02), W_SPEC),
    "neither": (NONE, NONE),
}


@pytest.mark.parametrize("specs", SPECS, ids=list(SPECS))
@pytest.mark.parametrize("mode", ["no_grad", "grad", "grad, recompute"])
def test_each_forward_advances_the_counter_by_one(backend, monkeypatch, specs, mode):
    layer = make_layer(*SPECS[specs])
    layer.bitflip_recompute_input = mode.endswith("recompute")
    outs = []
    for i in range(3):
        x = x_input(i).requires_grad_(mode != "no_grad")
        with torch.set_grad_enabled(mode != "no_grad"):
            y = layer(x)
        if mode != "no_grad":
            y.sum().backward()
        outs.append(y.detach())
        assert int(layer.bitflip_calls) == 5 + i + 1
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    for i, y in enumerate(outs):  # bit for bit (without zero-out a flip can give inf / NaN)
        torch.testing.assert_close(
            y, expected(layer, x_input(i), 5 + i), rtol=0, atol=0, equal_nan=True
        )
    if specs != "neither":
        other = expected(layer, x_input(0), 6)
        assert not torch.equal(outs[0].nan_to_num(), other.nan_to_num())  # the index matters


def test_lora_fast_path_advances_the_counter_by_one(backend, monkeypatch):
    layer = make_layer()
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(4, 24, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(16, 4, generator=gen) * 0.1).requires_grad_()
    ys = []
    for i in range(2):
        y = layer.flipped_lora_forward(x_input(i).requires_grad_(), a, b, 2.0)
        y.sum().backward()
        ys.append(y.detach())
        assert int(layer.bitflip_calls) == 6 + i
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    for i, y in enumerate(ys):
        with torch.no_grad():
            want = flipped_lora_linear_unfused(
                x_input(i), layer.weight, a, b, 2.0, layer.bias, X_SPEC, W_SPEC,
                *layer.stream_keys(), torch.tensor(5 + i),
            )  # fmt: skip
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_empty_input_still_advances_the_counter(backend):
    layer = make_layer()
    with torch.no_grad():
        assert layer(torch.empty(0, 24)).shape == (0, 16)
    assert int(layer.bitflip_calls) == 6


def test_a_failing_forward_leaves_a_valid_counter(backend):
    """Errors before the flips (bad dtype) and after them (bad shape) both leave the counter at
    call + 1, and the next forward runs at that index."""
    layer = make_layer()
    with pytest.raises(TypeError, match="int64"):
        layer(torch.ones(3, 24, dtype=torch.int64))
    assert int(layer.bitflip_calls) == 6
    with pytest.raises(RuntimeError):
        layer(torch.ones(3, 23))  # 23 != in_features: fails in the matmul, after the flips
    assert int(layer.bitflip_calls) == 7
    with torch.no_grad():
        y = layer(x_input())
    assert int(layer.bitflip_calls) == 8
    assert torch.equal(y, expected(layer, x_input(), 7))


def test_forwards_before_backwards_keep_their_own_call_index(backend):
    """Two forwards, then both backwards (gradient accumulation): each backward recomputes the
    flips of its own forward, as when each forward is followed by its backward."""
    layer = make_layer()

    def grads(order):
        layer.bitflip_calls.fill_(5)
        layer.zero_grad()
        xs = [x_input(i).requires_grad_() for i in range(2)]
        if order == "interleaved":
            for x in xs:
                layer(x).square().sum().backward()
        else:
            ys = [layer(x) for x in xs]
            for y in ys:
                y.square().sum().backward()
        return [x.grad for x in xs] + [layer.weight.grad.clone()]

    for got, want in zip(grads("forwards first"), grads("interleaved")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_counter_lives_in_the_state_dict_and_reloads(backend):
    layer = make_layer()
    with torch.no_grad():
        layer(x_input())
        layer(x_input())
    state = layer.state_dict()
    assert int(state["bitflip_calls"]) == 7
    other = make_layer(start=0)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x_input(4)), layer(x_input(4)))
    assert int(other.bitflip_calls) == int(layer.bitflip_calls) == 8


@pytest.mark.parametrize("want_mask", [False, True])
def test_functional_next_call_receives_call_plus_one(backend, want_mask):
    """The functional entry points write ``next_call`` (kernel or torch op) and leave the call
    index itself unchanged; the flips are those without ``next_call``."""
    x, w = x_input(), torch.randn(16, 24) * 0.5
    kx, kw = pb.stream_key(0, "x"), pb.stream_key(0, "w")
    call = torch.tensor(9)
    cases = {
        "apply_flip_spec_masked": lambda n: F.apply_flip_spec_masked(
            x, X_SPEC, kx, call, want_mask, next_call=n
        ),
        "flip_specs_masked": lambda n: F.flip_specs_masked(
            x, w, X_SPEC, W_SPEC, kx, kw, call, want_mask, next_call=n
        ),
        "apply_flip_specs": lambda n: F.apply_flip_specs(x, w, X_SPEC, W_SPEC, kx, kw, call, n),
    }
    for name, fn in cases.items():
        following = torch.full((), -1, dtype=torch.int64)
        got, plain = fn(following), fn(None)
        assert int(following) == 10 and int(call) == 9, name
        for a, e in zip(got, plain):
            assert (a is None) == (e is None), name
            if a is not None:
                assert torch.equal(a, e), name


@pytest.mark.parametrize("specs", ["x and w", "only x", "only w"])
def test_the_flip_kernel_writes_the_counter(request, monkeypatch, specs):
    """On the Triton backend no torch op advances the counter (the fallback is disabled here):
    the forward's flip kernel writes it, in the paired, x-only and w-only launches, and in the
    LoRA layer's x flip or (W only) its merge kernel."""
    request.getfixturevalue("needs_interpreter")
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    from peft_bitflip import layers
    from peft_bitflip.kernels import op, triton_bitflip

    def no_fallback(call, following):
        assert following is None, "the counter was advanced by a torch op"

    for module in (F, op, layers, triton_bitflip):
        monkeypatch.setattr(module, "write_next_call", no_fallback)
    layer = make_layer(*SPECS[specs])
    with torch.no_grad():
        layer(x_input())
    layer(x_input().requires_grad_()).sum().backward()
    assert int(layer.bitflip_calls) == 7
    a, b = torch.randn(4, 24) * 0.1, torch.randn(16, 4) * 0.1
    layer.flipped_lora_forward(x_input().requires_grad_(), a.requires_grad_(), b, 2.0)
    assert int(layer.bitflip_calls) == 8


def test_inference_mode_then_training(backend):
    """A forward under torch.inference_mode leaves a normal counter tensor: a later training
    step can save its call index for backward, and the counter can be written in place."""
    layer = make_layer()
    with torch.inference_mode():
        layer(x_input())
    assert not layer.bitflip_calls.is_inference()
    layer(x_input().requires_grad_()).sum().backward()
    assert int(layer.bitflip_calls) == 7
    layer.bitflip_calls.fill_(3)
    with torch.no_grad():
        assert torch.equal(layer(x_input()), expected(layer, x_input(), 3))


def test_functional_call_uses_the_passed_counter_without_advancing_it(backend):
    """torch.func.functional_call with a counter passed in: that tensor is the call index, it
    stays as it was (documented in docs/tuner.md), and the module's own counter is untouched."""
    from torch.func import functional_call

    layer = make_layer(start=2)
    counter = torch.tensor(5)
    with torch.no_grad():
        ys = [functional_call(layer, {"bitflip_calls": counter}, (x_input(),)) for _ in range(2)]
    assert int(counter) == 5 and int(layer.bitflip_calls) == 2
    assert torch.equal(ys[0], ys[1])
    assert torch.equal(ys[0], expected(layer, x_input(), 5))
