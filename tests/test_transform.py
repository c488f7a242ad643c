"""apply_bitflip / remove_bitflip on Llama, GPT-2 (Conv1D) and BERT; streams; counters; AC."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import peft_bitflip as pb
from peft_bitflip.layers import bitflip_layers

FLIPS = dict(
    x_p_exp=0.02, x_p_frac=0.02, w_p_exp=0.02, w_p_frac=0.02, x_zero_out_t=30.0, w_zero_out_t=1.25
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert])
def test_p_zero_is_bit_identical_and_remove_restores(make):
    ids = token_ids()
    clean = _logits(make(), ids)
    model = make()
    summary = pb.apply_bitflip(model, pb.BitflipConfig())
    assert len(summary.flipped) > 0
    assert torch.equal(_logits(model, ids), clean)
    noisy = make()
    pb.apply_bitflip(noisy, pb.BitflipConfig(**FLIPS))
    assert not torch.equal(_logits(noisy, ids), clean)
    assert pb.remove_bitflip(noisy) == len(summary.flipped)
    assert not bitflip_layers(noisy)
    assert torch.equal(_logits(noisy, ids), clean)
    assert all(type(m) is not pb.BitflipLinear for m in noisy.modules())


def test_summary_and_lm_head_skipped():
    model = tiny_llama()
    summary = pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    assert "lm_head" in summary.skipped and "lm_head" not in summary.flipped
    assert len(summary.flipped) == 2 * 7  # q k v o gate up down per layer
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, pb.BitflipLinear)
    assert "14 modules" in str(summary) and "lm_head" in str(summary)


def test_gpt2_conv1d_layers_compute_the_flipped_product():
    model = tiny_gpt2()
    pb.apply_bitflip(model, pb.BitflipConfig(w_zero_out_t=0.05))  # zero-out only: deterministic
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, pb.BitflipConv1D)
    x = torch.randn(3, 5, 32)
    w = torch.where(layer.weight.abs() < 0.05, layer.weight, torch.zeros(()))
    expected = (x.reshape(-1, 32) @ w + layer.bias).view(3, 5, -1)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert (layer.weight.abs() >= 0.05).any()


def test_rules_select_settings_per_module():
    cfg = pb.BitflipConfig(
        layer_name_to_config={
            r"model\.layers\.0\..*": {"w_p_exp": 0.5},
            r".*mlp.*": None,
            "default": {"x_p_frac": 0.1},
        }
    )
    model = tiny_llama()
    s = pb.apply_bitflip(model, cfg)
    assert s.flipped["model.layers.0.mlp.up_proj"][1].p_exp == 0.5  # first match wins
    assert "model.layers.1.mlp.up_proj" in s.skipped
    assert s.flipped["model.layers.1.self_attn.q_proj"][0].p_frac == 0.1


def test_rules_that_match_nothing_fail():
    cfg = pb.BitflipConfig(layer_name_to_config={r".*\.qkv_proj": {"w_p_exp": 0.1}, "default": {}})
    with pytest.raises(ValueError, match=r"qkv_proj"):
        pb.apply_bitflip(tiny_llama(), cfg)
    with pytest.raises(TypeError, match="BitflipConfig"):
        pb.apply_bitflip(tiny_llama(), {"x_p_exp": 0.1})


def test_disable_bitflips_gives_clean_output_and_pauses_counters():
    ids = token_ids()
    clean = _logits(tiny_llama(), ids)
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    with pb.disable_bitflips(model):
        assert torch.equal(_logits(model, ids), clean)
    assert int(model.model.layers[0].self_attn.q_proj.bitflip_calls) == 0
    assert not torch.equal(_logits(model, ids), clean)
    assert int(model.model.layers[0].self_attn.q_proj.bitflip_calls) == 1


def test_layers_and_tensors_draw_independent_streams():
    """Two layers with identical weights and input flip different positions."""
    a, b = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
    b.weight.data.copy_(a.weight.data)
    model = nn.ModuleDict({"a": a, "b": b})
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_exp=0.05, w_p_exp=0.05))
    x = torch.randn(8, 64)
    assert not torch.equal(model["a"](x), model["b"](x))
    keys = {k for _, m in bitflip_layers(model) for k in m.stream_keys()}
    assert len(keys) == 4  # (a, b) x (x, w)


def test_rank_enters_the_stream(monkeypatch):
    layer = nn.ModuleDict({"l": nn.Linear(8, 8)})
    pb.apply_bitflip(layer, pb.BitflipConfig(x_p_exp=0.1))
    k0 = layer["l"].stream_keys()
    layer["l"]._bitflip_keys = None
    monkeypatch.setenv("RANK", "1")
    assert layer["l"].stream_keys() != k0


def test_counters_in_state_dict_resume_the_flip_sequence():
    ids = token_ids()
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    first = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("bitflip_calls") for k in state)
    uninterrupted = [_logits(model, ids) for _ in range(2)]
    resumed = tiny_llama()
    pb.apply_bitflip(resumed, pb.BitflipConfig(**FLIPS))
    resumed.load_state_dict(state)
    again = [_logits(resumed, ids) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, again))
    assert not torch.equal(first, uninterrupted[0])  # each call draws new flips


def test_activation_checkpointing_reuses_the_same_flips():
    """Gradients with (non-reentrant) gradient checkpointing equal those without."""
    ids = token_ids()
    grads = []
    for ac in (False, True):
        model = tiny_llama()
        pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
        model.train()
        if ac:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        layer = model.model.layers[0].self_attn.q_proj
        assert int(layer.bitflip_calls) == 1 and not layer._pending_calls
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_under_autocast_the_flips_act_on_the_autocast_dtype():
    """Trainer(bf16=True) keeps fp32 weights and autocasts: the bits that flip must be those
    of the bf16 values the matmul consumes, and gradients still reach the fp32 weight."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    pb.apply_bitflip(
        lin, pb.BitflipConfig(x_p_exp=0.05, x_p_frac=0.05, x_zero_out_t=30.0, w_p_frac=0.05)
    )
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    x_key, w_key = lin.stream_keys()
    xf = pb.functional.apply_flip_spec(x.bfloat16(), lin.x_spec, x_key, 0)
    wf = pb.functional.apply_flip_spec(lin.weight.bfloat16(), lin.w_spec, w_key, 0)
    assert not torch.equal(xf, x.bfloat16()) and not torch.equal(wf, lin.weight.bfloat16())
    expected = torch.nn.functional.linear(xf, wf, lin.bias.bfloat16())
    assert torch.equal(y, expected)
    # flipping in fp32 and rounding afterwards is a different fault model: it must differ
    xf32 = pb.functional.apply_flip_spec(x, lin.x_spec, x_key, 0).bfloat16()
    assert not torch.equal(xf32, xf)
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert lin.weight.grad.abs().sum() > 0
