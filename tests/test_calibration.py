"""Zero-out thresholds calibrated to the model, and the attribution report (issue 29)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama, token_ids
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
from peft_bitflip.attribution import attribute, attribution_markdown, without_thresholds
from peft_bitflip.calibration import (
    calibrate_zero_out,
    layer_input_stats,
    threshold_above,
    weight_stats,
)
from peft_bitflip.layers import bitflip_layers

ORIGINAL = pb.BitflipConfig.original_default()
P0 = dict(x_p_exp=0.0, x_p_frac=0.0, w_p_exp=0.0, w_p_frac=0.0)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def outlier_llama():
    """A tiny Llama with one planted weight of 5.0 (above 1.25) in layers.0.mlp.down_proj and
    an activation channel scaled by 400 (inputs of layer 1's q/k/v above 30)."""
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[3, 5] = 5.0
        m.model.layers[1].input_layernorm.weight[7] = 400.0
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_threshold_above_is_the_smallest_float32_that_keeps_the_maximum():
    assert threshold_above(3.0, 2.0) == 6.0
    t = threshold_above(3.0, 1.0)
    assert t > 3.0 and np.float32(t) == np.nextafter(np.float32(3.0), np.float32(np.inf))
    # a margin that rounds back onto the maximum in float32 still gives a value above it
    assert threshold_above(1.0, 1.0 + 1e-12) > 1.0


def test_planted_outliers_are_cut_by_30_and_1_25_and_kept_by_calibration():
    ids = token_ids(4, 16)
    model = outlier_llama()
    clean = logits(model, ids)
    pb.apply_bitflip(model, pb.BitflipConfig.from_dict({**ORIGINAL.to_dict(), **P0}))
    cut = logits(model, ids)
    assert not torch.equal(cut, clean)  # the original thresholds change a clean model
    pb.remove_bitflip(model)

    cal = calibrate_zero_out(model, ids, margin=1.0, base=ORIGINAL, batch_size=2)
    assert cal.x_p_exp == ORIGINAL.x_p_exp and cal.skip_modules == ["lm_head"]
    down = cal.values_for("model.layers.0.mlp.down_proj")
    assert down["w_zero_out_t"] > 5.0 and down["w_p_exp"] == ORIGINAL.w_p_exp
    q1 = cal.values_for("model.layers.1.self_attn.q_proj")
    assert q1["x_zero_out_t"] > 30.0  # the scaled channel
    assert cal.values_for("lm_head") is None
    # at p = 0 the calibrated model is bit-identical to the clean one
    pb.apply_bitflip(model, pb.BitflipConfig.from_dict({**cal.to_dict(), **P0}))
    assert torch.equal(logits(model, ids), clean)


def test_calibrated_thresholds_sit_just_above_the_models_own_maxima():
    ids = token_ids(4, 16)
    model = outlier_llama()
    stats = layer_input_stats(model, ids, batch_size=4)
    cal = calibrate_zero_out(model, ids, margin=2.0, base=ORIGINAL)
    for name, st in weight_stats(model).items():
        v = cal.values_for(name)
        if v is None:
            continue
        assert v["w_zero_out_t"] == threshold_above(st["max"], 2.0)
        assert v["x_zero_out_t"] == threshold_above(stats[name]["max"], 2.0)
    whole = calibrate_zero_out(model, ids, margin=2.0, base=ORIGINAL, per_layer=False)
    assert whole.layer_name_to_config is None
    assert whole.w_zero_out_t == threshold_above(5.0, 2.0)
    only_w = calibrate_zero_out(model, ids, base=ORIGINAL, x=False)
    assert only_w.values_for("model.layers.1.self_attn.q_proj")["x_zero_out_t"] == 30.0


def test_calibrated_config_round_trips_through_config_json_and_the_lora_config(tmp_path):
    ids = token_ids(2, 16)
    model = outlier_llama()
    cal = calibrate_zero_out(model, ids, base=ORIGINAL)
    pb.apply_bitflip(model, cal)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.config.quantization_config == cal
    layers = dict(bitflip_layers(back))
    t = cal.values_for("model.layers.0.mlp.down_proj")["w_zero_out_t"]
    assert layers["model.layers.0.mlp.down_proj"].w_spec.zero_out_threshold == t
    lora = pb.BitflipLoraConfig.from_bitflip_config(cal, r=4, target_modules=["q_proj"])
    assert lora.bitflip_config() == cal
    lora.save_pretrained(tmp_path / "adapter")
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(tmp_path / "adapter").bitflip_config() == cal


def test_calibration_keeps_per_module_rules_of_the_base():
    ids = token_ids(2, 16)
    model = tiny_llama()
    base = pb.BitflipConfig(
        x_p_exp=1e-3,
        x_zero_out_t=30.0,
        w_zero_out_t=1.25,
        layer_name_to_config={r".*mlp.*": {"w_p_frac": 0.5}, r".*q_proj": None, "default": {}},
    )
    cal = calibrate_zero_out(model, ids, base=base)
    assert cal.values_for("model.layers.0.self_attn.q_proj") is None
    up = cal.values_for("model.layers.0.mlp.up_proj")
    assert up["w_p_frac"] == 0.5 and up["x_p_exp"] == 1e-3 and up["w_zero_out_t"] < 1.25


def test_calibration_errors_name_the_bad_value():
    model = tiny_llama()
    ids = token_ids(2, 8)
    with pytest.raises(ValueError, match="0.5"):
        calibrate_zero_out(model, ids, margin=0.5)
    with pytest.raises(ValueError, match="nan"):
        calibrate_zero_out(model, ids, margin=float("nan"))
    with pytest.raises(ValueError, match="x=True or w=True"):
        calibrate_zero_out(model, ids, x=False, w=False)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="get_peft_model"):
        calibrate_zero_out(peft_model, ids)


def test_attribution_counts_the_real_values_each_threshold_cuts():
    ids = token_ids(4, 16)
    model = outlier_llama()
    flips = pb.BitflipConfig.original_default(x_p_exp=1e-3, w_p_exp=1e-3)
    cal = calibrate_zero_out(model, ids, base=flips)
    report = attribute(model, ids, flips, seeds=[0, 1], calibrated=cal, batch_size=2)
    assert not bitflip_layers(model)  # the model is left clean
    rows = {r["setting"]: r for r in report["rows"]}
    assert list(rows) == [
        "clean",
        "zero-out x (p = 0)",
        "zero-out W (p = 0)",
        "zero-out x + W (p = 0)",
        "flips, no zero-out",
        "flips + zero-out",
        "calibrated zero-out (p = 0)",
        "flips + calibrated zero-out",
    ]
    # deterministic rows run once, random rows once per seed
    assert rows["clean"]["runs"] == 1 and rows["flips + zero-out"]["runs"] == 2
    assert rows["calibrated zero-out (p = 0)"]["perplexities"] == rows["clean"]["perplexities"]
    assert rows["zero-out x + W (p = 0)"]["ppl_mean"] != rows["clean"]["ppl_mean"]
    layers = {v["layer"]: v for v in report["layers"]}
    assert "lm_head" not in layers
    assert layers["model.layers.0.mlp.down_proj"]["w_cut"] == 1
    assert sum(v["w_cut"] for v in layers.values()) == 1
    # x cuts equal a direct count of |x| >= 30 in the clean inputs of layer 1's q_proj
    seen = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.append(int((a[0].abs() >= 30).sum()))
    )
    logits(model, ids[:2]), logits(model, ids[2:])
    h.remove()
    assert layers["model.layers.1.self_attn.q_proj"]["x_cut"] == sum(seen) > 0
    assert layers["model.layers.1.self_attn.q_proj"]["x_elements"] == 4 * 16 * 32
    assert layers["model.layers.1.self_attn.q_proj"]["x_max"] > 30
    text = attribution_markdown(report)
    assert "| zero-out x + W (p = 0) | 30 | 1.25 |" in text
    assert "model.layers.0.mlp.down_proj" in text
    json.dumps(report)  # JSON-ready


def test_attribution_reports_divergence_with_its_reason():
    ids = token_ids(2, 16)
    model = tiny_llama()
    flips = pb.BitflipConfig(x_p_exp=0.3, w_p_exp=0.3, x_zero_out_t=30.0, w_zero_out_t=1.25)
    report = attribute(model, ids, flips, seeds=[0])
    rows = {r["setting"]: r for r in report["rows"]}
    unguarded = rows["flips, no zero-out"]
    assert unguarded["diverged"] == 1 and unguarded["ppl_mean"] == float("inf")
    assert "without zero-out" in unguarded["reason"]
    assert not rows["flips + zero-out"]["diverged"]
    assert "diverged (1/1 runs" in attribution_markdown(report)


def test_without_thresholds_clears_rules_too():
    cfg = pb.BitflipConfig(
        x_zero_out_t=3.0, layer_name_to_config={"a": {"x_zero_out_t": 1.0, "w_zero_out_t": 2.0}}
    )
    out = without_thresholds(cfg, x=True)
    assert out.x_zero_out_t is None and out.layer_name_to_config["a"]["x_zero_out_t"] is None
    assert out.layer_name_to_config["a"]["w_zero_out_t"] == 2.0
