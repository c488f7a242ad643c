"""benchmarks/real_model_campaign.py end to end on a tiny saved Llama (CPU, seconds): every
phase runs, records its wall time, writes small outputs, and obeys the time budget."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study_script():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import real_model_campaign
    finally:
        sys.path.pop(0)
    return real_model_campaign


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_bitflip import data

    root = tmp_path_factory.mktemp("study")
    corpus = data.local_corpus()
    tok = data.train_tokenizer(corpus["train"]["text"][:40], vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    for split, n in (("validation", 20), ("train", 60)):
        with open(root / f"{split}.jsonl", "w") as f:
            for text in corpus[split if split == "train" else "validation"]["text"][:n]:
                f.write(json.dumps({"text": text}) + "\n")
    return root


def test_every_phase_runs_and_writes_small_outputs(study_script, tiny_setup, tmp_path,
                                                   reference_backend):  # fmt: skip
    root, out = tiny_setup, tmp_path / "out"
    argv = ["--model", str(root / "m"), "--data", str(root / "validation.jsonl"), "--out",
            str(out), "--tokens", "64", "--block_size", "32", "--batch_size", "2", "--seeds",
            "0", "1", "--p", "0.01", "--dtype", "float32", "--device", "cpu",
            "--calibration_blocks", "4", "--lora_steps", "3", "--lora_batch_size", "2",
            "--bits", "sign", "exp", "frac", "--max_minutes", "30"]  # fmt: skip
    study = study_script.main(argv)
    assert study["train_data"] == str(root / "train.jsonl")  # found beside --data
    camps = study["campaigns"]
    assert set(camps) == {"calibrated", "fixed_p0", "fixed", "adapted"}
    bits = study["bits"]
    assert bits == ["sign", "exp", "frac"] and not study["bits_missing"]
    for key in ("calibrated", "fixed", "adapted"):
        c = camps[key]
        assert c["complete"] and c["seeds_done"] == [0, 1]
        assert c["runs"] == c["runs_planned"] == 2 * 2 * len(bits) * 2  # blocks x {x, w} x seeds
        for name in ("campaign.md", "campaign_heatmap.png", "campaign_units.csv"):
            assert (out / key / name).exists()
    # p = 0 under the original thresholds: one seed, one bit set, deterministic
    assert camps["fixed_p0"]["runs"] == 2 * 2 and camps["fixed_p0"]["p"] == 0.0
    assert all(r["flips"] == 0 for r in camps["fixed_p0"]["rows"])
    lora = study["lora"]
    assert lora["steps"] == 3 and lora["seconds"] > 0 and lora["p"] == 1e-4
    # the adapted model is another model: its golden run differs from the clean model's
    assert camps["adapted"]["golden_loss"] != camps["calibrated"]["golden_loss"]
    assert set(study["phase_seconds"]) == {"setup", "calibrated", "fixed_p0", "fixed", "lora",
                                           "adapted"}  # fmt: skip
    summary = (out / "summary.md").read_text()
    for text in ("Which bits matter", "Which blocks matter", "Top sites", "block 1",
                 "original thresholds 30 / 1.25", "after bit-flip-aware LoRA"):  # fmt: skip
        assert text in summary, text
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 5e6
    assert json.loads((out / "study.json").read_text())["total_seconds"] > 0


def test_a_tiny_budget_stops_cleanly(study_script, tiny_setup, tmp_path, reference_backend):
    root, out = tiny_setup, tmp_path / "out"
    argv = ["--model", str(root / "m"), "--data", str(root / "validation.jsonl"), "--out",
            str(out), "--tokens", "64", "--block_size", "32", "--batch_size", "2", "--seeds",
            "0", "1", "2", "--dtype", "float32", "--device", "cpu", "--calibration_blocks", "4",
            "--phases", "calibrated", "--max_minutes", "1e-4"]  # fmt: skip
    study = study_script.main(argv)
    c = study["campaigns"]["calibrated"]
    assert not c["complete"] and c["runs"] < c["runs_planned"]
    assert "INCOMPLETE" in (out / "summary.md").read_text()
    with pytest.raises(ValueError, match="--max_minutes"):
        study_script.main([*argv[:-1], "0"])


def test_given_thresholds_are_used(study_script, tiny_setup, tmp_path, reference_backend):
    from peft_bitflip.config import BitflipConfig

    root, out = tiny_setup, tmp_path / "out"
    given = BitflipConfig(x_zero_out_t=123.0, w_zero_out_t=4.5)
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(given.to_dict()))
    argv = ["--model", str(root / "m"), "--data", str(root / "validation.jsonl"), "--out",
            str(out), "--tokens", "64", "--block_size", "32", "--batch_size", "2", "--seeds",
            "0", "--bits", "exp", "--dtype", "float32", "--device", "cpu", "--calibration_blocks",
            "4", "--phases", "calibrated", "--thresholds", str(path)]  # fmt: skip
    study_script.main(argv)
    report = json.loads((out / "calibrated" / "campaign.json").read_text())
    zero_out = report["settings"]["zero_out"]
    assert zero_out["x_zero_out_t"] == 123.0 and zero_out["w_zero_out_t"] == 4.5
    assert not zero_out.get("layer_name_to_config")  # not calibrated per layer
