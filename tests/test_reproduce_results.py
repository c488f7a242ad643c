"""recipes/reproduce_results.py end to end at toy size on the CPU: every stage runs, the
tables and the sweep plot are written, and a second run of the same command resumes (skips
every finished stage) with the same results."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from recipes import reproduce_results  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_reference(reference_backend):
    pass


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def test_study_runs_every_stage_and_resumes(tmp_path, capsys):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 500]
    write_jsonl(tmp_path / "train.jsonl", texts[:60])
    write_jsonl(tmp_path / "validation.jsonl", texts[60:])
    out = tmp_path / "study"
    argv = [
        "--train_file", str(tmp_path / "train.jsonl"),
        "--validation_file", str(tmp_path / "validation.jsonl"),
        "--output_dir", str(out), "--flavor", "tiny", "--seq_len", "64",
        "--tokenizer_vocab_size", "384", "--pretrain_tokens", "8192",
        "--pretrain_batch_size", "8", "--lora_seeds", "0,1", "--ranks", "", "--harsh_p", "0",
        "--lora_batch_size", "4", "--eval_blocks", "4", "--seeds", "0,1",
        "--sweep_batches", "1", "--sweep_seeds", "0", "--preprocessing_num_workers", "1",
    ]  # fmt: skip
    results = reproduce_results.main(argv)

    stages = {"pretrain_clean", "pretrain_bitflip", "lora_r32_s0", "lora_r32_s1", "sweep"}
    stages |= {f"eval_{m}" for m in ("clean", "bitflip", "lora_r32_s0", "lora_r32_s1")}
    assert stages <= set(results)
    assert results["pretrain_clean"]["train_tokens"] == results["pretrain_bitflip"]["train_tokens"]
    # LoRA: 1 % of the parameters in tokens, read from a strided subset of the documents
    lora = results["lora_r32_s0"]
    assert lora["train_tokens"] >= 0.01 * reproduce_results.saved_parameters(
        results["pretrain_clean"]["path"]
    )
    with open(out / "lora_train.jsonl") as f:
        assert 0 < len(f.readlines()) <= 60
    # flips cost perplexity on the clean model; evaluation seeds differ
    ev = results["eval_clean"]
    assert ev["flipped_mean"] != ev["clean"] and len(set(ev["flipped"].values())) == 2
    # the LoRA flip seeds give different models
    assert results["eval_lora_r32_s0"]["clean"] != results["eval_lora_r32_s1"]["clean"]
    md = (out / "results.md").read_text()
    assert "| clean model under flips |" in md and "| bit-flip-aware LoRA r=32" in md
    assert (out / "sweep.png").stat().st_size > 0
    rows = results["sweep"]["rows"]
    assert {r["model"] for r in rows} == {
        "clean-trained",
        "bitflip-pretrained",
        "LoRA-recovered (r=32, seed 0)",
    }
    assert len(rows) == 3 * len(reproduce_results.SWEEP_P)

    capsys.readouterr()
    again = reproduce_results.main(argv)  # resumes: nothing is trained or evaluated again
    printed = capsys.readouterr().out
    for name in ("pretrain_clean", "pretrain_bitflip", "eval_clean", "sweep"):
        assert f"[{name}] done earlier" in printed
    first = json.loads(json.dumps(results["eval_lora_r32_s1"]))  # as results.json stores it
    assert again["eval_lora_r32_s1"] == first
