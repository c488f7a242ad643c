"""``peft-bitflip eval | generate | sweep | compare`` and the evaluation functions, offline."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from tiny_models import save_trained_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_bitflip as pb
from peft_bitflip import data
from peft_bitflip.cli import main
from peft_bitflip.evaluation import (
    KEEP,
    flip_config_for,
    load_model,
    perplexity,
    summarize_sweep,
    sweep,
)
from peft_bitflip.layers import bitflip_layers

FLIPS = dict(x_zero_out_t=30.0, w_zero_out_t=1.25)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_trained_tiny_lm(root / "clean")
    return root


def _blocks(path, block=64):
    tok = AutoTokenizer.from_pretrained(path)
    return data.tokenize_and_group(data.local_corpus()["validation"], tok, block)


def test_perplexity_equals_exp_of_the_model_loss(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt / "clean")
    blocks = _blocks(ckpt / "clean")
    ids = torch.tensor(blocks["input_ids"][:6])
    r = perplexity(model, ids, batch_size=4)  # batches of 4 and 2 rows
    with torch.no_grad():
        direct = model(input_ids=ids, labels=ids).loss.item()  # one batch: plain mean
    assert r["tokens"] == 6 * 63 and r["batches"] == 2
    assert r["loss"] == pytest.approx(direct, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert r["perplexity"] < 512  # trained: better than uniform over the vocabulary
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, ids[:, :1])


def test_flipped_perplexity_rises_with_p(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt / "clean")
    blocks = _blocks(ckpt / "clean")
    points = sweep(model, blocks, [0.0, 1e-3, 1e-2], seeds=[0, 1], max_batches=2, progress=False)
    rows = summarize_sweep(points)
    means = [r["ppl_mean"] for r in rows]
    assert [r["p"] for r in rows] == [0.0, 1e-3, 1e-2]
    assert means[0] < means[1] < means[2], rows
    clean = perplexity(model, blocks, max_batches=2)["perplexity"]
    assert means[0] == clean and rows[0]["ppl_std"] == 0.0  # p = 0 is the clean model
    assert not bitflip_layers(model)  # the sweep leaves the model clean


def test_flip_config_for_targets_and_fields():
    c = flip_config_for(0.1, "x", "exp")
    assert (c.x_p_exp, c.x_p_frac, c.w_p_exp, c.w_p_frac) == (0.1, 0.0, 0.0, 0.0)
    c = flip_config_for(0.1, "w", "both")
    assert (c.x_p_exp, c.x_p_frac, c.w_p_exp, c.w_p_frac) == (0.0, 0.0, 0.1, 0.1)
    assert c.x_zero_out_t == 30.0 and c.w_zero_out_t == 1.25
    with pytest.raises(ValueError, match="'z'"):
        flip_config_for(0.1, "z")
    with pytest.raises(ValueError, match="1.5"):
        flip_config_for(1.5)


def test_load_model_keeps_replaces_or_drops_the_checkpoint_flips(ckpt, tmp_path):
    cfg = pb.BitflipConfig(x_p_exp=0.01, seed=3, **FLIPS)
    m = AutoModelForCausalLM.from_pretrained(ckpt / "clean", quantization_config=cfg)
    m(torch.ones(1, 4, dtype=torch.long))  # counters move; load_model resets them
    m.save_pretrained(tmp_path / "f")
    AutoTokenizer.from_pretrained(ckpt / "clean").save_pretrained(tmp_path / "f")
    kept, _ = load_model(str(tmp_path / "f"), KEEP)
    assert kept.config.quantization_config == cfg
    assert {int(x.bitflip_calls) for _, x in bitflip_layers(kept)} == {0}
    other, _ = load_model(str(tmp_path / "f"), pb.BitflipConfig(w_p_exp=0.5))
    assert other.model.layers[0].mlp.up_proj.w_spec.p_exp == 0.5
    clean, _ = load_model(str(tmp_path / "f"), None)
    assert not bitflip_layers(clean)


def test_eval_command_offline_task(ckpt, tmp_path, capsys):
    out = tmp_path / "res"
    args = [
        "eval",
        str(ckpt / "clean"),
        "--tasks",
        "bitflip_text_ppl",
        "--metadata",
        json.dumps({"max_documents": 4}),
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
    ]
    assert main(args) == 0
    clean = json.loads((out / "results.json").read_text())
    inline = [
        "--x_p_exp",
        "0.01",
        "--w_p_exp",
        "2^-7",
        "--x_zero_out_t",
        "30",
        "--w_zero_out_t",
        "1.25",
    ]
    assert main([*args[:2], *inline, *args[2:]]) == 0
    flipped = json.loads((out / "results.json").read_text())
    key = "bits_per_byte,none"
    assert flipped["results"]["bitflip_text_ppl"][key] > clean["results"]["bitflip_text_ppl"][key]
    assert "w: p_exp=0.0078125" in flipped["flips"] and clean["flips"] == "none (clean)"
    assert "bitflip_text_ppl" in capsys.readouterr().out


def test_generate_command_writes_the_response(ckpt, tmp_path, capsys):
    args = [
        "generate",
        str(ckpt / "clean"),
        "--prompt",
        "The for statement",
        "--seed",
        "1",
        "--max_new_tokens",
        "12",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    text = (tmp_path / "prompt-response.txt").read_text()
    assert text.startswith("The for statement\n---\n") and len(text) > 30
    assert main(args) == 0  # same seeds: same response
    assert (tmp_path / "prompt-response.txt").read_text() == text
    assert main([*args, "--x_p_exp", "0.05", "--x_p_frac", "0.05", "--no-do_sample"]) == 0
    assert "x: p_exp=0.05" in capsys.readouterr().out


def test_sweep_command_csv_plot_and_resume(ckpt, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        str(ckpt / "clean"),
        "--p",
        "0",
        "1e-3",
        "--seeds",
        "0",
        "1",
        "--block_size",
        "64",
        "--max_batches",
        "1",
        "--output_dir",
        str(out),
    ]
    assert main(args) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and (out / "sweep.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["seeds"] for r in summary] == [2, 2]
    # resume: a grid with one more p measures only the new points
    assert main([*args[:4], "1e-3", "2^-7", *args[5:]]) == 0
    with open(out / "sweep.csv") as f:
        resumed = list(csv.DictReader(f))
    assert resumed[:4] == rows and len(resumed) == 6
    assert {r["p"] for r in resumed[4:]} == {str(2**-7)}


def test_compare_command_three_rows(ckpt, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--clean_model",
        str(ckpt / "clean"),
        "--finetuned",
        str(ckpt / "clean"),
        "--x_p_exp",
        "0.01",
        "--w_p_exp",
        "0.01",
        "--seeds",
        "0",
        "1",
        "--max_batches",
        "1",
        "--block_size",
        "64",
        "--output_dir",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["clean", "flipped", "flipped + fine-tuned"]
    assert rows[0]["seeds"] == 1 and rows[1]["seeds"] == 2
    assert rows[1]["ppl_mean"] > rows[0]["ppl_mean"]
    # the same model and flips in rows 2 and 3: identical numbers for identical seeds
    assert rows[1]["perplexities"] == rows[2]["perplexities"]
    assert "| flipped |" in (out / "compare.md").read_text()


def test_bad_flip_file_is_an_error(ckpt, tmp_path):
    bad = tmp_path / "flips.ini"
    bad.write_text("x")
    with pytest.raises(ValueError, match="flips.ini"):
        main(["eval", str(ckpt / "clean"), "--bitflip_config", str(bad)])
    with pytest.raises(SystemExit):
        main(["eval", str(ckpt / "clean"), "--x_p_exp", "lots"])
