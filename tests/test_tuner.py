"""The BITFLIP_LORA PEFT tuner: get_peft_model, training, save/load, merge, disable_adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama, token_ids

import peft_bitflip as pb
from peft_bitflip.config import read_original_toml
from peft_bitflip.layers import bitflip_layers

FLIPS = dict(
    x_p_exp=0.02, x_p_frac=0.02, w_p_exp=0.02, w_p_frac=0.02, x_zero_out_t=30.0, w_zero_out_t=1.25
)
TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _config(**kw):
    base = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return pb.BitflipLoraConfig(**{**base, **FLIPS, **kw})


def _reset_counters(model):
    for _, m in bitflip_layers(model):
        m.bitflip_calls.zero_()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_get_peft_model_wraps_and_flips(capsys):
    model = get_peft_model(tiny_llama(), _config())
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "BitflipLoraLinear"
    assert isinstance(q.get_base_layer(), pb.BitflipLinear)
    # untargeted linears are flipped too; lm_head is skipped
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj, pb.BitflipLinear)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert model.peft_config["default"].peft_type == "BITFLIP_LORA"


def test_layer_formulation_is_flip_of_merged_weight():
    """y = flip(x) @ flip(W + s B A)^T + b, with the layer's own streams and call index."""
    model = get_peft_model(tiny_llama(), _config())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    base = q.get_base_layer()
    x = torch.randn(2, 5, 32)
    y = q(x)
    xk, wk = base.stream_keys()
    w = (base.weight + q.get_delta_weight("default")).to(base.weight.dtype)
    xf = pb.apply_flip_spec(x, base.x_spec, xk, 0)
    wf = pb.apply_flip_spec(w, base.w_spec, wk, 0)
    assert torch.equal(y, torch.nn.functional.linear(xf, wf))


def test_p_zero_lora_matches_plain_lora():
    from peft import LoraConfig

    ids = token_ids()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    plain = get_peft_model(tiny_llama(), LoraConfig(**kw))
    torch.manual_seed(3)
    ours = get_peft_model(tiny_llama(), pb.BitflipLoraConfig(**kw))
    assert torch.allclose(_logits(plain, ids), _logits(ours, ids), atol=1e-5)


def test_gradients_reach_only_lora_parameters():
    model = get_peft_model(tiny_llama(), _config())
    model.train()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    with_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_merge_and_unload_keeps_flips_and_output():
    ids = token_ids()
    model = get_peft_model(tiny_llama(), _config())
    _reset_counters(model)
    adapted = _logits(model, ids)
    _reset_counters(model)
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, pb.BitflipLinear)
    assert torch.equal(_logits(merged, ids), adapted)
    with pb.disable_bitflips(merged):
        assert not torch.equal(_logits(merged, ids), adapted)


def test_disable_adapter_keeps_flips_drops_lora():
    ids = token_ids()
    model = get_peft_model(tiny_llama(), _config())
    reference = tiny_llama()
    pb.apply_bitflip(reference, model.peft_config["default"].bitflip_config())
    _reset_counters(model)
    with model.disable_adapter():
        no_lora = _logits(model, ids)
    assert torch.equal(no_lora, _logits(reference, ids))


def test_save_and_reload_in_a_fresh_process(tmp_path):
    ids = token_ids()
    model = get_peft_model(tiny_llama(), _config())
    _reset_counters(model)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BITFLIP_LORA"
    assert saved["x_p_exp"] == 0.02 and saved["w_zero_out_t"] == 1.25
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {TESTS!r})
        import peft_bitflip
        from peft import PeftModel
        from tiny_models import tiny_llama
        model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r})
        cfg = model.peft_config["default"]
        assert type(cfg).__name__ == "BitflipLoraConfig" and cfg.x_zero_out_t == 30.0, cfg
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "PEFT_BITFLIP_CPU_BACKEND": "reference"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_loading_without_the_plugin_fails_loudly(tmp_path):
    get_peft_model(tiny_llama(), _config()).save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from peft import PeftModel
        from tiny_models import tiny_llama
        PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "BITFLIP_LORA" in r.stderr


def test_peft_model_from_pretrained_in_process(tmp_path):
    ids = token_ids()
    model = get_peft_model(tiny_llama(), _config())
    _reset_counters(model)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded, ids), expected)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(x_p_exp=1.5), ValueError, r"x_p_exp.*1\.5"),
        (dict(w_zero_out_t=-1.0), ValueError, r"w_zero_out_t.*-1\.0"),
        (dict(lora_dropout=0.1), ValueError, r"lora_dropout.*0\.1"),
        (dict(layer_name_to_config={"default": {"x_p_epx": 0.1}}), ValueError, r"x_p_epx"),
    ],
)
def test_bad_configs(kw, exc, match):
    with pytest.raises(exc, match=match):
        _config(**kw)


def test_unknown_field_is_an_error():
    with pytest.raises(TypeError, match="x_p_epx"):
        pb.BitflipLoraConfig(r=4, x_p_epx=0.1)


def test_rules_matching_nothing_fail_in_get_peft_model():
    cfg = _config(layer_name_to_config={r".*\.nonexistent": {"w_p_exp": 0.1}, "default": {}})
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(tiny_llama(), cfg)


def test_original_toml_drives_the_tuner(tmp_path):
    toml = tmp_path / "transform_cfg.toml"
    toml.write_text(
        "use_lora = true\n[fc]\nw_p_exp = 1.52587890625e-05\nw_p_frac = 1.52587890625e-05\n"
        "w_zero_out_t = 1.25\nx_p_exp = 1.52587890625e-05\nx_p_frac = 1.52587890625e-05\n"
        "x_zero_out_t = 30.0\n[lora]\nr = 32\nlora_alpha = 32\n"
    )
    bitflip, lora_kwargs, use_lora = read_original_toml(toml)
    cfg = pb.BitflipLoraConfig.from_bitflip_config(
        bitflip, target_modules=["q_proj"], **lora_kwargs
    )
    assert use_lora and (cfg.r, cfg.lora_alpha) == (32, 32)
    assert cfg.bitflip_config() == pb.BitflipConfig.original_default()
    model = get_peft_model(tiny_llama(), cfg)
    assert model.peft_config["default"].w_zero_out_t == 1.25


def test_gpt2_conv1d_lora_merges_bit_identically():
    """Conv1D targets (weight (in, out), fan_in_fan_out) follow the same formulation."""
    from tiny_models import tiny_gpt2

    ids = token_ids()
    cfg = _config(target_modules=["c_attn", "c_fc"])
    model = get_peft_model(tiny_gpt2(), cfg)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "BitflipLoraLinear"
    assert isinstance(layer.get_base_layer(), pb.BitflipConv1D)
    _reset_counters(model)
    adapted = _logits(model, ids)
    _reset_counters(model)
    merged = model.merge_and_unload()
    assert torch.equal(_logits(merged, ids), adapted)
    with pb.disable_bitflips(merged):
        assert not torch.equal(_logits(merged, ids), adapted)


def test_second_adapter_must_share_the_fault_model():
    from peft import LoraConfig

    model = get_peft_model(tiny_llama(), _config())
    model.add_adapter("same", _config())  # same fault model: fine
    with pytest.raises(ValueError, match="fault model differ"):
        model.add_adapter("other", _config(w_p_exp=0.5))
    with pytest.raises(ValueError, match="different peft types"):  # PEFT's own check
        model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))


def test_seed_is_the_name_and_bitflip_seed_a_deprecated_alias(tmp_path):
    """36.3: BitflipLoraConfig.seed as BitflipConfig.seed; bitflip_seed warns and still works,
    and adapter_config.json files of either name load (both names are written)."""
    import warnings

    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn
        cfg = _config(seed=7)
    assert cfg.seed == 7 and cfg.bitflip_config().seed == 7
    assert _config().seed == 0
    with pytest.warns(FutureWarning, match="bitflip_seed is the deprecated name of seed"):
        old = _config(bitflip_seed=5)
    assert old.seed == 5 and old.bitflip_config().seed == 5
    with pytest.raises(ValueError, match="seed=7 and bitflip_seed=5"):
        _config(seed=7, bitflip_seed=5)
    assert pb.BitflipLoraConfig.from_bitflip_config(pb.BitflipConfig(seed=9), r=2).seed == 9

    # a new file: both names, equal; reloads without a warning
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["seed"] == saved["bitflip_seed"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert PeftConfig.from_pretrained(tmp_path / "new").seed == 7
    # the previous release knows only bitflip_seed (PEFT drops the unknown "seed"): same seed
    previous = {k: v for k, v in saved.items() if k not in ("seed", "peft_type")}
    with pytest.warns(FutureWarning):
        assert pb.BitflipLoraConfig(**previous).bitflip_config().seed == 7
    # an old file (bitflip_seed only) loads with its seed, into the same flips
    (tmp_path / "old").mkdir()
    old_json = {k: v for k, v in saved.items() if k != "seed"}
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(old_json))
    with pytest.warns(FutureWarning):
        assert PeftConfig.from_pretrained(tmp_path / "old").seed == 7
