"""config.json round trip: the transformers quantizer hook, merged PEFT checkpoints, Hub payload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from tiny_models import tiny_gpt2, tiny_llama, token_ids
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import peft_bitflip as pb
from peft_bitflip.layers import bitflip_layers

TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)
FLIPS = dict(
    x_p_exp=0.02, x_p_frac=0.02, w_p_exp=0.02, w_p_frac=0.02, x_zero_out_t=30.0, w_zero_out_t=1.25
)
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _counters(model):
    return {m.bitflip_name: int(m.bitflip_calls) for _, m in bitflip_layers(model)}


def _run_python(script: str, cwd, plugin_on_path: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (peft_bitflip importable only if plugin_on_path)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS, ROOT] if plugin_on_path else [TESTS]),
        # without the plugin = as if peft-bitflip were not installed: its autoload hook is off too
        **({} if plugin_on_path else {"PEFT_BITFLIP_AUTOLOAD": "0"}),
        "PEFT_BITFLIP_CPU_BACKEND": "reference",
        "HF_HUB_OFFLINE": "1",
    }
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 and plugin_on_path:
        raise AssertionError(f"subprocess failed:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantization_config_kwarg_flips_a_clean_checkpoint(tmp_path, arch):
    clean = MODELS[arch]()
    clean.save_pretrained(tmp_path / "clean")
    cfg = pb.BitflipConfig(**FLIPS, seed=5)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "clean", quantization_config=cfg)

    expected = MODELS[arch]()
    summary = pb.apply_bitflip(expected, cfg)
    layers = dict(bitflip_layers(loaded))
    assert sorted(layers) == sorted(summary.flipped) and len(layers) > 0
    assert "lm_head" not in layers and not isinstance(loaded.lm_head, pb.BitflipLinear)
    # counters absent from a clean checkpoint start at 0, on the weights' device
    assert set(_counters(loaded).values()) == {0}
    assert all(m.bitflip_calls.device == m.weight.device for m in layers.values())

    ids = token_ids()
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))
    with pb.disable_bitflips(loaded):
        assert not torch.equal(_logits(loaded, ids), _logits(expected, ids))
        assert torch.equal(_logits(loaded, ids), _logits(clean, ids))
    # flipped weights stay float: casts and .half() work as on a clean model
    assert loaded.is_quantized is False
    assert loaded.half().dtype == torch.float16


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_flipped_checkpoint_reloads_with_flips_in_a_fresh_process(tmp_path, arch):
    model = MODELS[arch]()
    cfg = pb.BitflipConfig(**FLIPS, seed=11, layer_name_to_config={"default": {}})
    pb.apply_bitflip(model, cfg)
    ids = token_ids()
    _logits(model, ids)  # advance the counters: the checkpoint carries them
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert pb.BitflipConfig.from_dict(saved) == cfg
    expected = _logits(model, ids)  # call index 1 in every layer
    torch.save(ids, tmp_path / "ids.pt")

    _run_python(
        """
        import torch, peft_bitflip
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("ckpt")
        assert m.config.quantization_config.seed == 11
        with torch.no_grad():
            torch.save(m(torch.load("ids.pt")).logits, "out.pt")
        """,
        cwd=tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_without_the_plugin_transformers_warns_and_loads_clean(tmp_path):
    model = tiny_llama()
    clean_logits = _logits(model, token_ids())
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(token_ids(), tmp_path / "ids.pt")
    r = _run_python(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("ckpt")
        assert "peft_bitflip" not in sys.modules
        print("layer type:", type(m.model.layers[0].self_attn.q_proj).__name__)
        with torch.no_grad():
            torch.save(m(torch.load("ids.pt")).logits, "out.pt")
        """,
        cwd=tmp_path,
        plugin_on_path=False,
    )
    assert r.returncode == 0, r.stderr
    # documented behaviour of plain transformers: a warning, then a clean model
    assert "Unknown quantization type, got bitflip" in r.stdout + r.stderr
    assert "layer type: Linear" in r.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), clean_logits)


def test_config_json_wins_over_the_kwarg_and_load_config_with_changes_it(tmp_path):
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS, seed=1))
    model.save_pretrained(tmp_path / "ckpt")
    other = pb.BitflipConfig(x_p_exp=0.5, seed=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=other)
    assert any("quantization_config" in str(w.message) for w in caught)
    assert kept.config.quantization_config.seed == 1

    changed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", config=pb.load_config_with(tmp_path / "ckpt", other)
    )
    q = changed.model.layers[0].self_attn.q_proj
    assert q.x_spec.p_exp == 0.5 and q.w_spec.p_exp == 0.0 and q.bitflip_seed == 2

    clean = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", config=pb.load_config_with(tmp_path / "ckpt", None)
    )
    assert not bitflip_layers(clean)
    with pytest.raises(TypeError, match="BitflipConfig or None"):
        pb.load_config_with(tmp_path / "ckpt", {"x_p_exp": 0.1})


def test_dequantize_gives_the_clean_model_back(tmp_path):
    model = tiny_llama()
    ids = token_ids()
    clean_logits = _logits(model, ids)
    model.save_pretrained(tmp_path / "clean")
    flipped = AutoModelForCausalLM.from_pretrained(
        tmp_path / "clean", quantization_config=pb.BitflipConfig(**FLIPS)
    )
    assert not torch.equal(_logits(flipped, ids), clean_logits)
    restored = flipped.dequantize()
    assert not bitflip_layers(restored)
    assert torch.equal(_logits(restored, ids), clean_logits)
    restored.save_pretrained(tmp_path / "restored")
    assert "quantization_config" not in json.loads((tmp_path / "restored/config.json").read_text())
    assert "bitflip_calls" not in str(restored.state_dict().keys())


def test_remove_bitflip_drops_the_config_entry():
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS))
    assert isinstance(model.config.quantization_config, pb.BitflipConfig)
    pb.remove_bitflip(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None


def _train_lora(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(batch=4, length=16, seed=7)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_peft_train_merge_save_reload_gives_the_adapter_logits(tmp_path):
    lora = pb.BitflipLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bitflip_seed=9, **FLIPS
    )
    model = get_peft_model(tiny_llama(), lora)
    _train_lora(model)
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged/config.json").read_text())["quantization_config"]
    assert pb.BitflipConfig.from_dict(saved) == lora.bitflip_config()
    counters = _counters(merged)
    assert min(counters.values()) > 0  # training advanced them; the checkpoint keeps them
    # the adapter model, re-created from the same adapter weights, at the same counters
    expected = _logits(model, ids)  # merged layers: same arithmetic as the unmerged adapter

    _run_python(
        """
        import torch, peft_bitflip
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("merged")
        with torch.no_grad():
            torch.save(m(torch.load("ids.pt")).logits, "out.pt")
        """,
        cwd=tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_unmerged_adapter_and_reloaded_merged_checkpoint_agree(tmp_path):
    lora = pb.BitflipLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], **FLIPS)
    model = get_peft_model(tiny_llama(), lora)
    _train_lora(model)
    ids = token_ids()
    before = _counters(model)
    adapter_logits = _logits(model, ids)  # unmerged forward at the current counters
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # the checkpoint holds the counters after that forward: rewind by one call and compare
    for _, m in bitflip_layers(reloaded):
        m.bitflip_calls.fill_(before[m.bitflip_name])
    assert torch.equal(_logits(reloaded, ids), adapter_logits)


def test_auto_peft_model_keeps_the_flips_of_a_clean_base(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")  # no BitflipConfig in this config.json
    lora = pb.BitflipLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **FLIPS)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora)
    _train_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    for _, m in bitflip_layers(model):
        m.bitflip_calls.zero_()  # adapter checkpoints do not hold counters: reload starts at 0
    ids = token_ids()
    expected = _logits(model, ids)

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert bitflip_layers(reloaded)
    assert torch.equal(_logits(reloaded, ids), expected)


def test_lora_config_that_contradicts_the_checkpoint_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "clean")
    cfg = pb.BitflipConfig(**FLIPS, seed=4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "clean", quantization_config=cfg)
    with pytest.raises(ValueError, match="already carries a BitflipConfig"):
        get_peft_model(model, pb.BitflipLoraConfig(r=4, target_modules=["q_proj"]))
    same = pb.BitflipLoraConfig.from_bitflip_config(cfg, r=4, target_modules=["q_proj"])
    peft_model = get_peft_model(model, same)
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == (
        "BitflipLoraLinear"
    )


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.ids = token_ids(batch=n, length=16, seed=3)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_TokenDataset())


def test_trainer_lora_on_a_model_loaded_through_the_quantizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "clean")
    cfg = pb.BitflipConfig(**FLIPS)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "clean", quantization_config=cfg)
    peft_model = get_peft_model(
        model, pb.BitflipLoraConfig.from_bitflip_config(cfg, r=4, target_modules=["q_proj"])
    )
    b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    before = b.detach().clone()
    _trainer(peft_model, tmp_path).train()
    assert not torch.equal(b.detach(), before)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" in json.loads((tmp_path / "merged/config.json").read_text())


def test_trainer_full_training_of_a_flipped_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "clean")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "clean", quantization_config=pb.BitflipConfig(**FLIPS)
    )
    w = model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    _trainer(model, tmp_path).train()
    assert not torch.equal(w.detach(), before)
    assert min(_counters(model).values()) >= 3


def test_push_to_hub_uploads_the_config_and_counters(tmp_path, monkeypatch):
    """What ``push_to_hub`` sends, captured offline by a stand-in for the Hub client."""
    import huggingface_hub
    import transformers.utils.hub as hub

    sent = {}

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    sent[op.path_in_repo] = f.read()
            sent["_repo"] = repo_id

    monkeypatch.setattr(hub, "hf_api", lambda: FakeHub())
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda *a, **k: huggingface_hub.ModelCard("---\n---\n")
    )
    model = tiny_llama()
    cfg = pb.BitflipConfig(**FLIPS, seed=21)
    pb.apply_bitflip(model, cfg)
    _logits(model, token_ids())
    model.push_to_hub("someone/tiny-bitflip")

    assert sent["_repo"] == "someone/tiny-bitflip"
    config = json.loads(sent["config.json"])
    assert pb.BitflipConfig.from_dict(config["quantization_config"]) == cfg
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(sent["model.safetensors"])
    from safetensors.torch import load_file

    weights = load_file(str(weights_file))
    counters = {k: int(v) for k, v in weights.items() if k.endswith("bitflip_calls")}
    assert counters and set(counters.values()) == {1}
