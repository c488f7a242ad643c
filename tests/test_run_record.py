"""Every result file of eval / compare / sweep / attribute carries its run record (issue 36.4):
the full resolved fault model, the flip seeds used, the data (path + sha256 or name, tokens,
sequence length), the batch settings, the versions and the command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex

import peft
import pytest
import torch
import transformers
from tiny_models import save_tiny_lm

import peft_bitflip as pb
from peft_bitflip import data
from peft_bitflip.cli import main
from peft_bitflip.run_record import fault_model_record, run_record

# every field of a BitflipConfig, as to_dict writes it
FIELDS = {f.name for f in dataclasses.fields(pb.BitflipConfig)}
RULES = [["model\\.layers\\.0\\..*", {"x_zero_out_t": 4.0}], ["default", {}]]
pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama with a tokenizer, saved clean; a text file; a fault model with rules."""
    root = tmp_path_factory.mktemp("record")
    save_tiny_lm(root / "clean")
    text = "\n\n".join(data.local_corpus()["validation"]["text"][:20])
    (root / "valid.txt").write_text(text, encoding="utf-8")
    cfg = pb.BitflipConfig(
        x_p_exp=1e-3, w_p_frac=2e-3, x_zero_out_t=30.0, w_zero_out_t=1.25,
        layer_name_to_config=RULES,
    )  # fmt: skip
    cfg.to_json_file(str(root / "flips.json"))
    return root


def _check_run(run, argv, *, seeds, batch_size):
    """The fields every run record must have, with the values of this run."""
    assert run["command"] == shlex.join(["peft-bitflip", *argv])
    assert run["seeds"] == seeds
    assert run["batch"]["batch_size"] == batch_size
    v = run["versions"]
    assert v["torch"] == torch.__version__ and v["transformers"] == transformers.__version__
    assert v["peft"] == peft.__version__ and v["peft_bitflip"] == pb.__version__
    assert "triton" in v and "lm_eval" in v


def _check_fault_model(record, seeds):
    """Every BitflipConfig field, the per-module rules, every seed (never one for several)."""
    assert FIELDS - {"quant_method"} <= set(record) and record["seeds"] == seeds
    assert record["seed"] == (seeds[0] if len(seeds) == 1 else None)
    assert record["layer_name_to_config"] == RULES
    assert record["x_p_exp"] == 1e-3 and record["w_zero_out_t"] == 1.25


def _check_text_data(d, path, block_size):
    assert d["file"]["path"] == str(path)
    assert d["file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["sequence_length"] == block_size and d["tokens"] == d["blocks"] * block_size > 0


def test_sweep_summary_records_its_run(ckpt, tmp_path):
    argv = ["sweep", str(ckpt / "clean"), "--p", "0", "1e-2", "--seeds", "1", "0",
            "--block_size", "32", "--batch_size", "2", "--max_batches", "1", "--validation_file",
            str(ckpt / "valid.txt"), "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = summary["run"]
    _check_run(run, argv, seeds=[0, 1], batch_size=2)
    _check_text_data(run["data"], ckpt / "valid.txt", 32)
    assert run["data"]["blocks"] == 2 and run["batch"]["batches"] == 1
    assert run["fault_model"]["grid"]["p"] == [0.0, 1e-2]
    for row in summary["rows"]:  # each row: its whole fault model and both seeds
        cfg = row["bitflip_config"]
        assert FIELDS - {"quant_method"} <= set(cfg) and cfg["seeds"] == [0, 1]
        assert cfg["seed"] is None and row["flip_seeds"] == [0, 1]
        assert cfg["x_p_exp"] == cfg["w_p_frac"] == row["p"] and cfg["w_zero_out_t"] == 1.25


def test_compare_json_records_its_run(ckpt, tmp_path):
    argv = ["compare", "--clean_model", str(ckpt / "clean"), "--bitflip_config",
            str(ckpt / "flips.json"), "--seeds", "0", "1", "--block_size", "32",
            "--batch_size", "2", "--max_batches", "1", "--validation_file",
            str(ckpt / "valid.txt"), "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = json.loads((tmp_path / "compare.json").read_text())
    _check_run(out["run"], argv, seeds=[0, 1], batch_size=2)
    _check_fault_model(out["run"]["fault_model"], [0, 1])
    _check_text_data(out["run"]["data"], ckpt / "valid.txt", 32)
    clean, flipped = out["rows"]
    assert clean["bitflip_config"] is None and clean["flip_seeds"] == []
    _check_fault_model(flipped["bitflip_config"], [0, 1])


def test_attribution_json_records_its_run(ckpt, tmp_path):
    argv = ["attribute", str(ckpt / "clean"), "--bitflip_config", str(ckpt / "flips.json"),
            "--seeds", "2", "--block_size", "32", "--batch_size", "3", "--max_batches", "1",
            "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "attribution.json").read_text())
    _check_run(report["run"], argv, seeds=[2], batch_size=3)
    _check_fault_model(report["run"]["fault_model"], [2])
    d = report["run"]["data"]
    assert d["source"] == "embedded corpus" and d["file"] is None
    assert d["tokens"] == 3 * 32 and len(d["tokens_fingerprint"]) == 16
    flips_row = next(r for r in report["rows"] if r["setting"] == "flips + zero-out")
    _check_fault_model(flips_row["bitflip_config"], [2])


def test_eval_results_record_their_run(ckpt, tmp_path):
    pytest.importorskip("lm_eval")
    metadata = json.dumps({"data_files": [str(ckpt / "valid.txt")], "max_documents": 2})
    argv = ["eval", str(ckpt / "clean"), "--bitflip_config", str(ckpt / "flips.json"),
            "--seed", "5", "--tasks", "bitflip_text_ppl", "--metadata", metadata,
            "--batch_size", "2", "--max_length", "64", "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    run = out["run"]
    _check_run(run, argv, seeds=[5], batch_size=2)
    _check_fault_model(run["fault_model"], [5])
    assert out["config"]["batch_size"] == 2  # lm-eval's own record: no longer null
    d = run["data"]
    assert d["tasks"] == ["bitflip_text_ppl"] and d["sequence_length"] == 64
    assert d["files"][0]["sha256"] == hashlib.sha256((ckpt / "valid.txt").read_bytes()).hexdigest()
    assert d["documents"]["bitflip_text_ppl"]["effective"] == 2


def test_run_record_refuses_an_unresolved_batch_size():
    with pytest.raises(ValueError, match="batch size.*None"):
        run_record(command=["x"], fault_model=None, seeds=[], data={}, batch={"batch_size": None})
    with pytest.raises(ValueError, match="at least one flip seed"):
        fault_model_record(pb.BitflipConfig(), [])
    assert fault_model_record(None) is None
