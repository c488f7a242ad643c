"""Issue 29 (last paragraph): models built from one config object do not share a fault model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peft_bitflip as pb
from peft_bitflip.layers import bitflip_layers

FLIPS = dict(x_p_exp=0.01, x_zero_out_t=30.0, w_p_exp=0.01, w_zero_out_t=1.25, seed=3)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _shared_config():
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip


def test_get_peft_model_on_a_fresh_twin_of_a_flipped_model(tmp_path):
    cfg = _shared_config()
    first, second = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    pb.apply_bitflip(first, pb.BitflipConfig(**FLIPS))
    assert first.config.quantization_config == pb.BitflipConfig(**FLIPS)
    # the second model never was flipped: it saves clean and takes any adapter fault model
    second.save_pretrained(tmp_path / "second")
    assert not bitflip_layers(AutoModelForCausalLM.from_pretrained(tmp_path / "second"))
    lora = pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], w_p_frac=0.1)
    peft_model = get_peft_model(second, lora)
    assert peft_model.base_model.model.config.quantization_config == lora.bitflip_config()
    # and the first keeps its own
    assert first.config.quantization_config == pb.BitflipConfig(**FLIPS)
    assert first.model.config is first.config  # submodules follow the model's own config


def test_check_reads_the_layers_not_a_stale_config_entry():
    """A model whose config carries a BitflipConfig but that has no bit-flip layers carries no
    fault model (e.g. a config object another model wrote to)."""
    model = LlamaForCausalLM(_shared_config())
    model.config.quantization_config = pb.BitflipConfig(**FLIPS)
    lora = pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], w_p_frac=0.1)
    peft_model = get_peft_model(model, lora)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert q.w_spec.p_frac == 0.1 and q.x_spec.p_exp == 0.0


def test_layers_that_differ_from_the_adapter_are_still_refused():
    model = LlamaForCausalLM(_shared_config())
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    with pytest.raises(ValueError, match="already carries a BitflipConfig"):
        get_peft_model(model, pb.BitflipLoraConfig(r=4, target_modules=["q_proj"]))
    same = pb.BitflipLoraConfig.from_bitflip_config(
        pb.BitflipConfig(**FLIPS), r=4, target_modules=["q_proj"]
    )
    get_peft_model(model, same)
    assert torch.is_tensor(model.model.layers[0].self_attn.q_proj.get_base_layer().bitflip_calls)
