"""The real pretrained model (SmolLM2-135M, ``../shared/tools/real-model.sh``), on the CPU.

Skipped unless ``PEFT_BITFLIP_REAL_MODEL`` names the model folder (CI stays offline and tiny)::

    ../shared/tools/real-model.sh hf /tmp/real-model .venv/bin/python
    PEFT_BITFLIP_REAL_MODEL=/tmp/real-model/smollm2-135m python -m pytest tests/test_real_model.py

What a tiny model cannot show: the original's thresholds cut real values of a real model with
nothing flipped, exponent flips without zero-out end in NaN, calibrated thresholds keep the
model exact, and a merged bit-flip LoRA reloads in a fresh process and runs in lm-eval.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import peft_bitflip as pb

REAL = os.environ.get("PEFT_BITFLIP_REAL_MODEL")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `recipes` is a directory of scripts, importable from the checkout
    sys.path.insert(0, ROOT)
pytestmark = pytest.mark.skipif(
    not REAL, reason="set PEFT_BITFLIP_REAL_MODEL to the real model folder (tools/real-model.sh)"
)
TEXT = (
    "The committee met on Tuesday to discuss the budget for the coming year. Several members "
    "argued that the city should spend more on schools and roads, while others wanted to lower "
    "taxes. After a long debate, they agreed to publish a draft and invite comments."
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


@pytest.fixture(scope="module")
def real():
    from peft_bitflip.evaluation import load_model

    model, tok = load_model(REAL, None)
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :48]
    return model, tok, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_original_thresholds_cut_real_values_and_calibration_keeps_them(real):
    from peft_bitflip.attribution import attribute
    from peft_bitflip.calibration import calibrate_zero_out

    model, _, ids = real
    original = pb.BitflipConfig.original_default()
    cal = calibrate_zero_out(model, ids, margin=2.0, base=original)
    report = attribute(model, ids, original.__class__.from_dict(
        {**original.to_dict(), "x_p_exp": 0.0, "x_p_frac": 0.0, "w_p_exp": 0.0, "w_p_frac": 0.0}
    ), seeds=[0], calibrated=cal)  # fmt: skip
    rows = {r["setting"]: r for r in report["rows"]}
    clean = rows["clean"]["ppl_mean"]
    assert rows["zero-out W (p = 0)"]["ppl_mean"] > 100 * clean  # cutting real weights
    assert rows["zero-out x (p = 0)"]["ppl_mean"] > clean
    assert rows["calibrated zero-out (p = 0)"]["perplexities"] == rows["clean"]["perplexities"]
    w_cut = sum(v.get("w_cut", 0) for v in report["layers"])
    assert w_cut > 10_000  # SmolLM2-135M: ~10,300 weights with |w| >= 1.25
    x_max = max(v["x_max"] for v in report["layers"])
    assert x_max > 1000  # real outlier activations
    pb.apply_bitflip(model, cal.__class__.from_dict(
        {**cal.to_dict(), "x_p_exp": 0.0, "x_p_frac": 0.0, "w_p_exp": 0.0, "w_p_frac": 0.0}
    ))  # fmt: skip
    try:
        calibrated = _logits(model, ids)
    finally:
        pb.remove_bitflip(model)
    assert torch.equal(calibrated, _logits(model, ids))


def test_exponent_flips_without_zero_out_diverge_and_say_why(real):
    from peft_bitflip.calibration import calibrate_zero_out
    from peft_bitflip.evaluation import perplexity

    model, _, ids = real
    p = {"x_p_exp": 2.0**-10, "w_p_exp": 2.0**-10}
    pb.apply_bitflip(model, pb.BitflipConfig(**p))  # no zero-out
    try:
        r = perplexity(model, ids)
    finally:
        pb.remove_bitflip(model)
    assert r["diverged"] and r["perplexity"] == math.inf
    assert "without zero-out" in r["reason"]
    # the same flips with thresholds calibrated to the model stay finite
    cal = calibrate_zero_out(model, ids, base=pb.BitflipConfig(**p))
    pb.apply_bitflip(model, cal)
    try:
        ok = perplexity(model, ids)
    finally:
        pb.remove_bitflip(model)
    assert not ok["diverged"] and math.isfinite(ok["perplexity"])


def test_merged_bitflip_lora_reloads_in_a_fresh_process_and_runs_in_lm_eval(real, tmp_path):
    from recipes import finetune_lora

    text = tmp_path / "train.txt"
    text.write_text("\n\n".join([TEXT] * 40))
    out = tmp_path / "merged"
    finetune_lora.main([
        "--model_name_or_path", REAL, "--train_file", str(text), "--validation_file", str(text),
        "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--lora_r", "8", "--learning_rate", "1e-4", "--eval_batches", "0",
        "--calibrate_zero_out", "2", "--calibration_batches", "1",
        "--output_dir", str(out), "--disable_tqdm",
    ])  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitflip" and len(cfg["layer_name_to_config"]) == 210
    model, _, ids = real
    blocks = ids[:, :32]
    torch.save(blocks, tmp_path / "blocks.pt")
    snippet = (
        "import json, sys, torch, peft_bitflip\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft_bitflip.evaluation import perplexity, reset_streams\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); reset_streams(m)\n"
        "print(json.dumps(perplexity(m, torch.load(sys.argv[2]))['perplexity']))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "PEFT_BITFLIP_CPU_BACKEND": "reference"}
    fresh = subprocess.run(
        [sys.executable, "-c", snippet, str(out), str(tmp_path / "blocks.pt")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    from peft_bitflip.evaluation import load_model, perplexity

    again, _ = load_model(str(out))  # the same flips in this process, from call 0
    assert (
        json.loads(fresh.stdout.strip().splitlines()[-1]) == perplexity(again, blocks)["perplexity"]
    )
    lm = subprocess.run(
        [sys.executable, "-m", "peft_bitflip.lm_eval_cli", "--model", "hf", "--model_args",
         f"pretrained={out}", "--tasks", "bitflip_text_ppl", "--limit", "2", "--metadata",
         json.dumps({"data_files": [str(text)], "max_documents": 2}), "--batch_size", "1"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert lm.returncode == 0, lm.stderr[-2000:]
    assert "bitflip_text_ppl" in lm.stdout and "word_perplexity" in lm.stdout
