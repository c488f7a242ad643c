"""flipped_linear (flips recomputed in backward) against flipped_linear_unfused (autograd stores
the flipped copies): the same outputs for the same seed, the same gradients, and less saved
for backward -- no more than a clean linear layer saves; for LoRA layers the merged weight
W + s B@A is rebuilt in backward instead of being kept."""

from __future__ import annotations

import contextlib

import pytest
import torch

import peft_bitflip as pb
import peft_bitflip.flipped_linear
from peft_bitflip import layers
from peft_bitflip.flipped_linear import flipped_linear, flipped_linear_unfused
from peft_bitflip.spec import FlipSpec


@pytest.fixture(autouse=True)
def _cpu_reference(reference_backend):
    pass


X_SPEC = FlipSpec(0.02, 0.02, 3.0)  # many flips and many zeroed elements at this size
W_SPEC = FlipSpec(0.02, 0.01, 0.2)
KEYS = (pb.stream_key(0, "l", "x"), pb.stream_key(0, "l", "w"))


def run(fn, x, w, b, conv1d=False, autocast=False, call=3, grad_x=True, grad_w=True):
    x = x.detach().clone().requires_grad_(grad_x)
    w = w.detach().clone().requires_grad_(grad_w)
    b = None if b is None else b.detach().clone().requires_grad_()
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        y = fn(x, w, b, X_SPEC, W_SPEC, *KEYS, torch.tensor(call), conv1d)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def inputs(conv1d=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 24, generator=gen) * 2
    w = torch.randn(*((24, 16) if conv1d else (16, 24)), generator=gen) * 0.2
    b = torch.randn(16, generator=gen) if bias else None
    return x, w, b


def recomputing(*args):
    """flipped_linear that keeps x and recomputes flip(x) in backward."""
    return flipped_linear(*args, recompute_input=True)


FUSED_FORMS = [flipped_linear, recomputing]


@pytest.mark.parametrize("fused_form", FUSED_FORMS)
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_same_outputs_and_gradients_as_the_unfused_form(fused_form, conv1d, bias):
    x, w, b = inputs(conv1d, bias)
    fused = run(fused_form, x, w, b, conv1d)
    plain = run(flipped_linear_unfused, x, w, b, conv1d)
    assert torch.equal(fused[0], plain[0])  # the same flips
    for a, e in zip(fused[1:], plain[1:]):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    # the zero-out really happened: some gradient entries are masked to 0 in both
    assert (plain[1] == 0).any() and (plain[2] == 0).any()


@pytest.mark.parametrize("fused_form", FUSED_FORMS)
@pytest.mark.parametrize("grad_x,grad_w", [(True, True), (False, True), (True, False)])
def test_triton_kernels_in_the_layer_give_the_unfused_gradients(
    request, monkeypatch, fused_form, grad_x, grad_w
):
    """The layer's forward and backward through the Triton kernels (paired flip writing x's
    zero mask, W flip writing W's mask, dX and dW masked in one launch; interpreter on the CPU)
    against the unfused form on the reference backend."""
    request.getfixturevalue("needs_interpreter")
    x, w, b = inputs()
    plain = run(flipped_linear_unfused, x, w, b, grad_x=grad_x, grad_w=grad_w)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    fused = run(fused_form, x, w, b, grad_x=grad_x, grad_w=grad_w)
    assert torch.equal(fused[0], plain[0])
    for a, e, wanted in zip(fused[1:3], plain[1:3], (grad_x, grad_w)):
        assert (a is not None) == wanted
        if wanted:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
            assert (e == 0).any()


@pytest.mark.parametrize("fused_form", FUSED_FORMS)
def test_triton_training_step_at_high_p_equals_the_unfused_form(request, monkeypatch, fused_form):
    """At high p (x: exp sparse, frac dense; W: both fields dense) the layer's forward, the
    backward's recompute of flip(x) and the gradient masks through the Triton kernels equal the
    unfused form on the reference."""
    request.getfixturevalue("needs_interpreter")
    from peft_bitflip.kernels.sampling import dense_words, flip_table

    monkeypatch.setitem(globals(), "X_SPEC", FlipSpec(1e-3, 0.3, 3.0))
    monkeypatch.setitem(globals(), "W_SPEC", FlipSpec(0.3, 2**-4, 0.2))
    assert dense_words(flip_table(1e-3, 0.3, torch.float32, "cpu"), torch.float32)[0] == 0
    x, w, b = inputs()
    plain = run(flipped_linear_unfused, x, w, b)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    fused = run(fused_form, x, w, b)
    assert torch.equal(fused[0], plain[0])
    for a, e in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    assert (plain[1] == 0).any() and (plain[2] == 0).any() and (plain[2] != 0).any()


@pytest.mark.parametrize("fused_form", FUSED_FORMS)
@pytest.mark.parametrize("grad_x,grad_w", [(False, True), (True, False)])
def test_gradients_when_only_x_or_only_w_needs_one(fused_form, grad_x, grad_w):
    """Backward takes other branches when x (a frozen embedding's output) or W (a frozen
    weight) needs no gradient; what it does compute equals the unfused form."""
    x, w, b = inputs()
    fused = run(fused_form, x, w, b, grad_x=grad_x, grad_w=grad_w)
    plain = run(flipped_linear_unfused, x, w, b, grad_x=grad_x, grad_w=grad_w)
    assert torch.equal(fused[0], plain[0])
    for a, e, wanted in zip(fused[1:3], plain[1:3], (grad_x, grad_w)):
        assert (a is not None) == wanted and (e is not None) == wanted
        if wanted:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
            assert (e == 0).any()


def test_same_under_bf16_autocast():
    x, w, b = inputs()
    fused = run(flipped_linear, x, w, b, autocast=True)
    plain = run(flipped_linear_unfused, x, w, b, autocast=True)
    assert fused[0].dtype == torch.bfloat16 and torch.equal(fused[0], plain[0])
    for a, e in zip(fused[1:], plain[1:]):
        assert a.dtype == torch.float32  # gradients reach the fp32 masters
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)


def test_another_call_draws_other_flips():
    x, w, b = inputs()
    assert not torch.equal(
        run(flipped_linear, x, w, b, call=3)[0], run(flipped_linear, x, w, b, call=4)[0]
    )


def saved_bytes(fn, held=()) -> int:
    """Bytes of the tensors autograd saves during ``fn()`` that are not leaves the caller holds
    (inputs and parameters -- also the frozen ones in ``held`` -- are not extra memory)."""
    total = 0
    held_ptrs = {t.data_ptr() for t in held}

    def pack(t):
        nonlocal total
        if not (t.is_leaf and t.requires_grad) and t.data_ptr() not in held_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saves_flip_x_and_its_zero_mask_or_only_x():
    """By default a layer keeps flip(x) instead of x plus x's packed zero mask (one byte per 4
    float32 elements), never a weight-sized tensor; with recompute_input it keeps x itself,
    as a clean layer does.  The unfused form keeps the flipped weight too."""
    x, w, b = inputs()
    h = torch.randn(2, 7, 24, requires_grad=True)
    x_in = h * 2  # a non-leaf activation, as inside a model
    w = w.requires_grad_()
    call = torch.tensor(0)
    x_bytes = x_in.numel() * x_in.element_size()
    mask_bytes = -(-x_in.numel() // 4)
    fused = saved_bytes(lambda: flipped_linear(x_in, w, b, X_SPEC, W_SPEC, *KEYS, call))
    assert x_bytes + mask_bytes <= fused <= x_bytes + mask_bytes + 64  # + the call index
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recomputing(x_in, w, b, X_SPEC, W_SPEC, *KEYS, call)
    assert any(t is x_in for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved if t is not x_in and t is not w) <= 64
    plain = saved_bytes(lambda: flipped_linear_unfused(x_in, w, b, X_SPEC, W_SPEC, *KEYS, call))
    assert plain >= x_bytes + w.numel() * w.element_size()  # the flipped weight copy at least


def test_recompute_flipped_inputs_sets_every_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_exp=0.01))
    assert pb.recompute_flipped_inputs(model) == 2
    assert all(m.bitflip_recompute_input for _, m in layers.bitflip_layers(model))
    pb.recompute_flipped_inputs(model, False)
    assert not any(m.bitflip_recompute_input for _, m in layers.bitflip_layers(model))
    with pytest.raises(TypeError, match="'yes'"):
        pb.recompute_flipped_inputs(model, "yes")
    pb.recompute_flipped_inputs(model)
    pb.remove_bitflip(model)  # plain nn.Linear again, without the setting
    assert not any(hasattr(m, "bitflip_recompute_input") for m in model)


def assert_close_to_scale(actual, expected, rel):
    """Equal within ``rel`` of each element and of the tensor's largest magnitude (sums taken
    in another order, e.g. rank-r LoRA gradients, differ by rounding relative to that scale)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


FAST_FORMS = {name: getattr(layers, name) for name in ("flipped_linear", "flipped_lora_linear")}


def use_unfused_forms(monkeypatch, unfused: bool):
    """Route the layers through the unfused reference forms (or the fast paths)."""
    for name, fast in FAST_FORMS.items():
        unfused_form = getattr(peft_bitflip.flipped_linear, name + "_unfused")
        monkeypatch.setattr(layers, name, unfused_form if unfused else fast)


def test_lora_layer_gradients_match_the_unfused_form(monkeypatch):
    """A BitflipLoraConfig model: LoRA gradients through the recomputing path equal those of
    the unfused path."""
    from peft import get_peft_model
    from tiny_models import VOCAB, tiny_llama

    def grads(use_unfused):
        use_unfused_forms(monkeypatch, use_unfused)
        cfg = pb.BitflipLoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
            x_p_exp=0.01, x_p_frac=0.01, x_zero_out_t=2.0,
            w_p_exp=0.01, w_p_frac=0.01, w_zero_out_t=0.05,
        )  # fmt: skip
        model = get_peft_model(tiny_llama(), cfg)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
        }

    loss_f, grads_f = grads(False)
    loss_u, grads_u = grads(True)
    assert torch.equal(loss_f, loss_u)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) == 12
    for name in grads_f:
        assert_close_to_scale(grads_f[name], grads_u[name], 1e-5)


def lora_model(in_features=64, out_features=48):
    from peft import get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    cfg = pb.BitflipLoraConfig(
        r=4, target_modules=["0"], init_lora_weights=False,
        x_p_exp=0.02, x_p_frac=0.02, x_zero_out_t=3.0,
        w_p_exp=0.02, w_p_frac=0.02, w_zero_out_t=0.1,
    )  # fmt: skip
    return get_peft_model(net, cfg)


def test_lora_layer_keeps_no_weight_sized_tensor():
    model = lora_model()
    x = torch.randn(4, 64, requires_grad=True) * 1.0  # a non-leaf activation
    weight = model.base_model.model[0].base_layer.weight
    saved = saved_bytes(lambda: model(x), held=list(model.parameters()))
    # x, the call index and LoRA's small tensors; not the merged or flipped 48 x 64 weight
    assert saved < weight.numel() * weight.element_size()


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_gradients_match_the_unfused_form_per_layer(monkeypatch, autocast):
    results = []
    for unfused in (False, True):
        use_unfused_forms(monkeypatch, unfused)
        model = lora_model()
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 2
        ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            y = model(x)
        y.float().square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), grads))
    (y_f, g_f), (y_u, g_u) = results
    assert torch.equal(y_f, y_u)
    assert len(g_f) == 2 and g_f.keys() == g_u.keys()
    for name in g_f:
        assert g_f[name].abs().sum() > 0
        # bf16 autocast with a quarter of the weights zeroed: both forms round in bf16 and the
        # zeroed part cancels; the float32 case checks the arithmetic to 1e-5
        assert_close_to_scale(g_f[name], g_u[name], 0.3 if autocast else 1e-5)
