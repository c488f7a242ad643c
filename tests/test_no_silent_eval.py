"""No silent wrong results in evaluation: non-finite losses, sweep resume, bad inputs (issues
29.3 and 35: items 1, 3, 5, 6, 8, 10)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama, token_ids
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import peft_bitflip as pb
from peft_bitflip import data
from peft_bitflip.cli import main
from peft_bitflip.evaluation import (
    SweepPoint,
    flip_config_for,
    format_perplexity,
    load_model,
    perplexity,
    summarize_sweep,
    sweep,
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama and a tokenizer trained on the embedded corpus, saved clean."""
    root = tmp_path_factory.mktemp("nosilent")
    tok = data.train_tokenizer(data.local_corpus()["train"]["text"][:40], vocab_size=300)
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    model.config.max_position_embeddings = 64
    model.save_pretrained(root / "clean")
    tok.save_pretrained(root / "clean")
    bert = tiny_bert()
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root


def test_perplexity_of_a_nan_model_says_diverged_and_why():
    model = tiny_llama()
    ids = token_ids(4, 16)
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_exp=0.3, w_p_exp=0.3))  # no zero-out
    r = perplexity(model, ids, batch_size=2)
    assert r["diverged"] and r["nonfinite_batches"] == 2 and r["batches"] == 2
    assert r["perplexity"] == math.inf and "without zero-out" in r["reason"]
    assert format_perplexity(r) == "diverged (2/2 batches non-finite)"
    # the same flips with zero-out stay finite and give no reason
    pb.apply_bitflip(
        model, pb.BitflipConfig(x_p_exp=0.3, w_p_exp=0.3, x_zero_out_t=8.0, w_zero_out_t=1.0)
    )
    ok = perplexity(model, ids, batch_size=2)
    assert not ok["diverged"] and ok["reason"] is None and math.isfinite(ok["perplexity"])


def test_perplexity_of_a_model_nan_without_flips_blames_the_model():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    r = perplexity(model, token_ids(2, 8))
    assert r["diverged"] and "without any bit-flip layer" in r["reason"]


def test_sweep_without_zero_out_marks_every_flipped_point_diverged(tmp_path):
    model = tiny_llama()
    ids = token_ids(4, 16)
    points = sweep(
        model,
        ids,
        [0.0, 0.2],
        seeds=[0],
        x_zero_out_t=None,
        w_zero_out_t=None,
        batch_size=2,
        progress=False,
    )
    assert [pt.diverged for pt in points] == [False, True]
    rows = summarize_sweep(points)
    assert rows[1]["diverged"] == 1 and rows[1]["nonfinite_share"] == 1.0
    assert rows[1]["ppl_mean"] == math.inf
    from peft_bitflip.evaluation import plot_sweep

    plot_sweep(rows, str(tmp_path / "s.png"), note="diverged")  # a plot with no finite p > 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_sweep_resume_refuses_rows_measured_under_other_thresholds(ckpt, tmp_path):
    """Regression (35.1): re-running into the same --out with zero-out off printed the old
    rows instead of measuring."""
    out = tmp_path / "sw"
    args = ["sweep", str(ckpt / "clean"), "--p", "1e-3", "--seeds", "0", "--block_size", "32",
            "--max_batches", "1", "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    with pytest.raises(ValueError, match=r"x_zero_out_t: 30.0 in the folder, None now"):
        main([*args, "--x_zero_out_t", "none"])
    with pytest.raises(ValueError, match="block_size"):
        main([*args[:-2], "--block_size", "16", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="max_batches"):
        main([*args[:-2], "--max_batches", "2", "--output_dir", str(out)])
    other = tmp_path / "other.txt"
    other.write_text("Some other text for the sweep. " * 200)
    with pytest.raises(ValueError, match="data"):
        main([*args, "--validation_file", str(other)])
    # the same settings resume: nothing measured again
    assert main(args) == 0
    assert len(list(csv.DictReader(open(out / "sweep.csv")))) == 1


def test_sweep_resume_refuses_another_model(tmp_path):
    ids = token_ids(2, 16)
    path = str(tmp_path / "s.csv")
    sweep(tiny_llama(0), ids, [1e-3], seeds=[0], csv_path=path, progress=False)
    with pytest.raises(ValueError, match="model_fingerprint"):
        sweep(tiny_llama(1), ids, [1e-3], seeds=[0], csv_path=path, progress=False)
    with pytest.raises(ValueError, match="tokens_fingerprint"):
        sweep(
            tiny_llama(0),
            token_ids(2, 16, seed=5),
            [1e-3],
            seeds=[0],
            csv_path=path,
            progress=False,
        )


def test_sweep_grid_duplicates_are_measured_once(tmp_path):
    """Regression (35.5): --p 1e-3 0.001 and --seeds 0 0 were measured twice and counted as
    extra seeds with sd 0."""
    points = sweep(
        tiny_llama(),
        token_ids(2, 16),
        [1e-3, 0.001],
        seeds=[0, 0],
        csv_path=str(tmp_path / "s.csv"),
        progress=False,
    )
    assert len(points) == 1
    assert summarize_sweep(points)[0]["seeds"] == 1
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 1


@pytest.mark.parametrize("damage", ["cut_last_column", "cut_earlier", "empty_file"])
def test_torn_sweep_csv_is_measured_again(tmp_path, damage):
    """Regression (35.8): a row cut inside its last column was accepted with the truncated
    value, one cut earlier made every later resume crash, an empty file duplicated a row."""
    model, ids = tiny_llama(), token_ids(2, 16)
    path = tmp_path / "s.csv"
    good = sweep(model, ids, [1e-3, 1e-2], seeds=[0], csv_path=str(path), progress=False)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if damage == "cut_last_column":
        path.write_text("".join(lines[:-1]) + lines[-1].rstrip("\n")[:-3])
    elif damage == "cut_earlier":
        path.write_text("".join(lines[:-1]) + lines[-1][:8])
    else:
        path.write_text("")
    with pytest.warns(UserWarning, match="incomplete") if damage != "empty_file" else _nothing():
        again = sweep(model, ids, [1e-3, 1e-2], seeds=[0], csv_path=str(path), progress=False)
    assert again == good
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and float(rows[1]["perplexity"]) == good[1].perplexity


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sweep_csv_write_is_atomic(tmp_path, monkeypatch):
    """A process killed while writing leaves the previous complete file."""
    model, ids = tiny_llama(), token_ids(2, 16)
    path = tmp_path / "s.csv"
    sweep(model, ids, [1e-3], seeds=[0], csv_path=str(path), progress=False)
    before = path.read_text()
    import peft_bitflip.evaluation as ev

    real = ev.os.replace

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, ids, [1e-3, 1e-2], seeds=[0], csv_path=str(path), progress=False)
    monkeypatch.setattr(ev.os, "replace", real)
    assert path.read_text() == before


def test_sweep_point_csv_round_trip_keeps_divergence(tmp_path):
    model, ids = tiny_llama(), token_ids(2, 16)
    path = str(tmp_path / "s.csv")
    pts = sweep(
        model,
        ids,
        [0.3],
        seeds=[0],
        x_zero_out_t=None,
        w_zero_out_t=None,
        csv_path=path,
        progress=False,
    )
    again = sweep(
        model,
        ids,
        [0.3],
        seeds=[0],
        x_zero_out_t=None,
        w_zero_out_t=None,
        csv_path=path,
        progress=False,
    )
    assert isinstance(again[0], SweepPoint) and again[0].diverged  # read back, not measured
    assert [(p.key, p.perplexity, p.nonfinite_batches) for p in again] == [
        (p.key, p.perplexity, p.nonfinite_batches) for p in pts
    ]


def test_sweep_command_without_zero_out_explains_the_divergence(ckpt, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", str(ckpt / "clean"), "--p", "0", "0.1", "--seeds", "0",
                 "--x_zero_out_t", "none", "--w_zero_out_t", "none", "--block_size", "32",
                 "--max_batches", "2", "--output_dir", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "diverged (1/1 seeds, 100% of batches)" in text and "without zero-out" in text
    summary = json.loads((out / "summary.json").read_text())
    assert "without zero-out" in summary["note"] and summary["rows"][1]["diverged"] == 1
    assert (out / "sweep.png").stat().st_size > 1000


def test_encoders_are_refused_by_the_causal_lm_tools(ckpt, capsys):
    """Regression (35.3): generate on a BERT encoder exited 0 printing random words."""
    with pytest.raises(ValueError, match="not a causal language model"):
        main(["generate", str(ckpt / "bert"), "--max_new_tokens", "2"])
    with pytest.raises(ValueError, match="encoder"):
        load_model(str(ckpt / "bert"))
    with pytest.raises(ValueError, match="not a causal language model"):
        main(["sweep", str(ckpt / "bert"), "--p", "0", "--output_dir", "unused"])
    # the model-agnostic parts still work on the encoder
    bert = tiny_bert()
    summary = pb.apply_bitflip(bert, pb.BitflipConfig(x_p_frac=0.1, x_zero_out_t=10.0))
    assert len(summary.flipped) > 0


def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        main(["generate", missing])


def test_adapter_folder_is_named_before_anything_is_measured(ckpt, tmp_path, capsys):
    from peft import get_peft_model

    model = tiny_llama()
    peft_model = get_peft_model(model, pb.BitflipLoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="PEFT adapter folder"):
        main(["generate", str(tmp_path / "adapter")])
    with pytest.raises(ValueError, match="PEFT adapter folder"):
        main(["compare", "--clean_model", str(ckpt / "clean"), "--finetuned",
              str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "cmp")])  # fmt: skip
    assert "| clean |" not in capsys.readouterr().out  # nothing was measured first


@pytest.mark.parametrize(
    "content,match",
    [(b"", "is empty"), (b"\x00\x01\x02binary\xff\xfe" * 50, "not UTF-8|binary")],
)
def test_bad_data_files_are_named(ckpt, tmp_path, content, match):
    bad = tmp_path / "val.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        main(["sweep", str(ckpt / "clean"), "--p", "0", "--validation_file", str(bad),
              "--output_dir", str(tmp_path / "o")])  # fmt: skip


def test_too_little_text_for_one_block_is_named(ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(ValueError, match="block of 256 tokens"):
        main(["compare", "--clean_model", str(ckpt / "clean"), "--validation_file", str(short)])


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "M", "--max_batches", "-1"],
        ["sweep", "M", "--seeds", "0", "-1"],
        ["compare", "--clean_model", "M", "--seeds", "0", "-1"],
        ["sweep", "M", "--batch_size", "0"],
        ["demo", "--seed", "-3"],
    ],
)
def test_bad_counts_and_seeds_fail_at_parse_time(argv, capsys):
    """Regression (35.10): --max_batches -1 raised ZeroDivisionError; --seeds 0 -1 failed
    after seed 0 ran."""
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be" in capsys.readouterr().err or "seed" in capsys.readouterr().err


def test_empty_prompt_is_named(ckpt):
    with pytest.raises(ValueError, match="prompt is empty"):
        main(["generate", str(ckpt / "clean"), "--prompt", "  "])
    model, tok = load_model(str(ckpt / "clean"))
    from peft_bitflip.evaluation import generate_text

    assert isinstance(tok, PreTrainedTokenizerFast)
    with pytest.raises(ValueError, match="no tokens"):
        generate_text(model, tok, "")


def test_flags_override_field_by_field_on_top_of_the_checkpoint(ckpt, tmp_path, capsys):
    """One rule for eval / generate / compare: a flag sets its value, the rest comes from the
    checkpoint's config (here x_zero_out_t stays 5 and w flips stay)."""
    cfg = pb.BitflipConfig(w_p_exp=1e-3, w_zero_out_t=2.0, x_zero_out_t=5.0)
    model, tok = load_model(str(ckpt / "clean"), cfg)
    model.save_pretrained(tmp_path / "f")
    tok.save_pretrained(tmp_path / "f")
    assert main(["generate", str(tmp_path / "f"), "--x_p_exp", "0.01",
                 "--max_new_tokens", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "x: p_exp=0.01, p_frac=0, zero-out 5" in out
    assert "w: p_exp=0.001, p_frac=0, zero-out 2" in out


def test_compare_records_every_seed_of_a_row(ckpt, tmp_path):
    """Regression (36.4 in part): compare wrote seed=0 for rows averaged over seeds 0 and 1."""
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--clean_model",
                str(ckpt / "clean"),
                "--seeds",
                "0",
                "1",
                "--block_size",
                "32",
                "--max_batches",
                "1",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert "seeds=0,1" in rows[1]["flips"] and rows[1]["flip_seeds"] == [0, 1]
    assert rows[1]["bitflip_config"]["seed"] is None


def test_flip_config_for_takes_calibrated_thresholds():
    cal = pb.BitflipConfig(
        x_p_exp=0.5, layer_name_to_config={"a": {"x_zero_out_t": 3.0, "x_p_frac": 0.2}}
    )
    cfg = flip_config_for(1e-3, "w", "exp", seed=4, zero_out=cal)
    assert cfg.seed == 4 and cfg.w_p_exp == 1e-3 and cfg.x_p_exp == 0.0
    assert cfg.values_for("a") == {
        **{k: 0.0 for k in ("x_p_exp", "x_p_frac", "w_p_frac")},
        "w_p_exp": 1e-3,
        "x_zero_out_t": 3.0,
        "w_zero_out_t": None,
    }


def test_auto_tokenizer_of_the_fixture(ckpt):
    assert AutoTokenizer.from_pretrained(ckpt / "clean")


def test_sweep_configs_keep_the_other_fault_models_of_per_module_rules():
    """with_probabilities (every sweep point) sets the group probabilities and keeps what a
    module's rule sets besides them: stuck-at and burst rates were dropped from rules (kept at
    the top level), so a sweep measured a different fault model than the config's; per-bit-
    position rates stay too, with a warning that they are not swept."""
    from peft_bitflip.evaluation import with_probabilities

    rule = {"w_zero_out_t": 2.0, "w_stuck_p_frac": 1e-3, "w_burst_rate": 1e-4, "w_p_frac": 0.5}
    cfg = pb.BitflipConfig(layer_name_to_config={"a": rule})
    swept = with_probabilities(cfg, {"w_p_frac": 1e-2})
    got = dict(swept.layer_name_to_config)["a"]
    assert got["w_stuck_p_frac"] == 1e-3 and got["w_burst_rate"] == 1e-4
    assert got["w_zero_out_t"] == 2.0 and "w_p_frac" not in got
    assert swept.values_for("a")["w_p_frac"] == 1e-2
    with pytest.warns(UserWarning, match="per-bit-position rates"):
        with_probabilities(pb.BitflipConfig(w_p_bits={"sign": 1e-3}), {"w_p_frac": 1e-2})
