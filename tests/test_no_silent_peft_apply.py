"""Issue 35.4: ``apply_bitflip`` on a ``PeftModel`` keeps the saved config in sync and never turns
LoRA factors into bit-flip layers."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tiny_models import tiny_llama, token_ids
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
from peft_bitflip.layers import BitflipLayerMixin, bitflip_layers

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
OLD = dict(x_p_exp=0.01, x_zero_out_t=30.0, w_p_exp=0.01, w_zero_out_t=1.25)
NEW = pb.BitflipConfig(
    x_p_exp=0.05, x_p_frac=0.05, x_zero_out_t=20.0, w_p_frac=0.05, w_zero_out_t=1.0, seed=5
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _peft_model(kind):
    if kind == "bitflip_lora":
        return get_peft_model(tiny_llama(), pb.BitflipLoraConfig(**LORA, **OLD))
    return get_peft_model(tiny_llama(), LoraConfig(**LORA))


def _logits(model, ids):
    for _, m in bitflip_layers(model):
        m.bitflip_calls.zero_()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["bitflip_lora", "plain_lora"])
def test_apply_bitflip_on_peft_model_never_wraps_lora_factors(kind):
    model = _peft_model(kind)
    pb.apply_bitflip(model, NEW)
    factors = [(n, m) for n, m in model.named_modules() if ".lora_" in n]
    assert factors
    assert not [n for n, m in factors if isinstance(m, BitflipLayerMixin)]
    state = get_peft_model_state_dict(model)
    assert not [k for k in state if "bitflip_calls" in k]
    q = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(q, pb.BitflipLinear)
    # named as in the unwrapped model, so merged and reloaded models draw the same streams
    assert q.bitflip_name == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("kind", ["bitflip_lora", "plain_lora"])
def test_apply_bitflip_on_peft_model_is_what_the_merged_checkpoint_runs(tmp_path, kind):
    ids = token_ids()
    model = _peft_model(kind)
    pb.apply_bitflip(model, NEW)
    if kind == "bitflip_lora":
        model.save_pretrained(tmp_path / "adapter")
        saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert saved["x_p_exp"] == 0.05 and saved["w_p_exp"] == 0.0 and saved["bitflip_seed"] == 5
        assert model.peft_config["default"].bitflip_config() == NEW
    merged = model.merge_and_unload()
    expected = _logits(merged, ids)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.config.quantization_config == NEW
    q = reloaded.model.layers[0].self_attn.q_proj
    assert (q.x_spec, q.w_spec) == NEW.resolve("model.layers.0.self_attn.q_proj")
    assert q.bitflip_seed == 5
    assert torch.equal(_logits(reloaded, ids), expected)


def test_apply_bitflip_inside_a_bitflip_lora_model_is_refused():
    """The adapter's BitflipLoraConfig would not follow: point the user at the PeftModel."""
    model = _peft_model("bitflip_lora")
    with pytest.raises(ValueError, match="PeftModel"):
        pb.apply_bitflip(model.base_model.model, NEW)


def test_modules_to_save_copy_flips_as_the_layer_it_replaces(tmp_path):
    """The trained copy is what runs and what merge_and_unload keeps: same name, same streams."""
    ids = token_ids()
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA, modules_to_save=["lm_head"]))
    cfg = pb.BitflipConfig(x_p_exp=0.05, x_zero_out_t=20.0, w_p_frac=0.05, skip_modules=[])
    pb.apply_bitflip(model, cfg)
    copy = model.base_model.model.lm_head.modules_to_save["default"]
    assert isinstance(copy, pb.BitflipLinear) and copy.bitflip_name == "lm_head"
    merged = model.merge_and_unload()
    assert merged.lm_head is copy
    expected = _logits(merged, ids)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert isinstance(reloaded.lm_head, pb.BitflipLinear)
    assert torch.equal(_logits(reloaded, ids), expected)
