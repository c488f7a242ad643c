"""Issue 35.2: ``BitflipLoraConfig(lora_bias=True)``: the LoRA bias reaches the output (unflipped,
``b + s * lora_B.bias``), gets its gradient and is merged."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, token_ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_bitflip as pb
from peft_bitflip.layers import bitflip_layers

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
FLIPS = dict(
    x_p_exp=0.02, x_p_frac=0.02, w_p_exp=0.02, w_p_frac=0.02, x_zero_out_t=30.0, w_zero_out_t=1.25
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _llama(bias: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose projections have (non-zero) biases when ``bias``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def _twins(bias: bool = True):
    """PEFT's LoRA and ours with lora_bias=True, the same base and adapter weights."""
    plain = get_peft_model(_llama(bias), LoraConfig(lora_bias=True, **LORA))
    ours = get_peft_model(_llama(bias), pb.BitflipLoraConfig(lora_bias=True, **LORA))
    lora = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(lora.pop(n))
    assert not lora
    bias = plain.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    assert bias is not None and bias.abs().min() > 0  # the bias must matter
    return plain, ours


def _folded_bias(layer, adapters):
    """The base bias with ``s * lora_B.bias`` of each adapter added (float32, rounded)."""
    bias = layer.get_base_layer().bias.detach().clone()
    for a in adapters:
        extra = layer.lora_B[a].bias.detach().float() * layer.scaling[a]
        assert extra.abs().min() > 0
        bias = (bias.float() + extra).to(bias.dtype)
    return bias


def _reset_counters(model):
    for _, m in bitflip_layers(model):
        m.bitflip_calls.zero_()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_reaches_the_output_like_peft(base_bias):
    plain, ours = _twins(base_bias)
    ids = token_ids()
    assert torch.allclose(_logits(ours, ids), _logits(plain, ids), atol=1e-5)


def test_lora_bias_gets_peft_gradient():
    plain, ours = _twins()
    ids = token_ids()
    grads = []
    for model in (plain, ours):
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_B" in n})
    names = [n for n in grads[0] if n.endswith(".bias")]
    assert names
    for n in names:
        assert grads[1][n] is not None, n
        assert grads[0][n].abs().sum() > 0
        assert torch.allclose(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6), n


def test_lora_bias_merges_bit_identically_under_flips():
    ids = token_ids()
    model = get_peft_model(_llama(), pb.BitflipLoraConfig(lora_bias=True, **LORA, **FLIPS))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    folded = _folded_bias(q, ["default"])
    _reset_counters(model)
    adapted = _logits(model, ids)
    _reset_counters(model)
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, pb.BitflipLinear)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.bias, folded)
    assert torch.equal(_logits(merged, ids), adapted)


def test_lora_bias_of_two_active_adapters_merges_bit_identically():
    ids = token_ids()
    model = get_peft_model(_llama(), pb.BitflipLoraConfig(lora_bias=True, **LORA, **FLIPS))
    model.add_adapter("second", pb.BitflipLoraConfig(lora_bias=True, **LORA, **FLIPS))
    model.base_model.set_adapter(["default", "second"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    folded = _folded_bias(q, ["default", "second"])
    _reset_counters(model)
    adapted = _logits(model, ids)
    _reset_counters(model)
    merged = model.merge_and_unload(adapter_names=["default", "second"])
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.bias, folded)
    assert torch.equal(_logits(merged, ids), adapted)


def test_lora_bias_merge_without_a_base_bias_is_refused():
    model = get_peft_model(_llama(bias=False), pb.BitflipLoraConfig(lora_bias=True, **LORA))
    with pytest.raises(ValueError, match=r"lora_bias=True.*no bias"):
        model.merge_and_unload()


def test_lora_bias_unmerge_restores_the_base_bias():
    model = get_peft_model(_llama(), pb.BitflipLoraConfig(lora_bias=True, **LORA))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q.get_base_layer().bias.detach().clone()
    q.merge()
    assert torch.equal(q.get_base_layer().bias, _folded_bias_after_merge(before, q))
    q.unmerge()
    assert torch.allclose(q.get_base_layer().bias, before, atol=1e-6)


def _folded_bias_after_merge(before, layer):
    extra = layer.lora_B["default"].bias.detach().float() * layer.scaling["default"]
    return (before.float() + extra).to(before.dtype)
