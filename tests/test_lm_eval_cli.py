"""lm-eval from the shell on bit-flip checkpoints: the wrapper CLI and the offline task."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from tiny_models import save_trained_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_bitflip as pb
from peft_bitflip.data import local_corpus

pytest.importorskip("lm_eval")

ROOT = os.path.dirname(os.path.dirname(__file__))
P_LEVELS = {"p0": 0.0, "p_mid": 0.003, "p_high": 0.03}
N_DOCS = 6
# lm-eval's warning for a metric_list entry without aggregation / higher_is_better
METRIC_WARNING = re.compile(r"metric \w+ is defined, but (aggregation|higher_is_better) is not")


def _env():
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "PEFT_BITFLIP_CPU_BACKEND": "reference",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama trained briefly on local text, saved clean and at three error rates."""
    root = tmp_path_factory.mktemp("lm_eval")
    save_trained_tiny_lm(root / "clean")
    tokenizer = AutoTokenizer.from_pretrained(root / "clean")
    for name, p in P_LEVELS.items():
        cfg = pb.BitflipConfig(
            x_p_exp=p, x_p_frac=p, w_p_exp=p, w_p_frac=p, x_zero_out_t=30.0, w_zero_out_t=1.25
        )
        flipped = AutoModelForCausalLM.from_pretrained(root / "clean", quantization_config=cfg)
        flipped.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    text = root / "valid.txt"
    text.write_text("\n\n".join(local_corpus()["validation"]["text"][:N_DOCS]), encoding="utf-8")
    return root


def _lm_eval(command: list[str], ckpt, out, cwd, data_file, plugin=True):
    metadata = json.dumps({"data_files": [str(data_file)], "max_documents": N_DOCS})
    args = [
        *command,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={ckpt},dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        "bitflip_text_ppl",
        "--metadata",
        metadata,
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    # plugin=False: as if peft-bitflip were not installed (not on the path, autoload hook off)
    env = _env() if plugin else {**_env(), "PYTHONPATH": "", "PEFT_BITFLIP_AUTOLOAD": "0"}
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)


def _bits_per_byte(out_dir) -> float:
    files = list(out_dir.rglob("results*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["results"]["bitflip_text_ppl"]["bits_per_byte,none"]


def test_wrapper_cli_evaluates_with_flips_and_perplexity_rises_with_p(checkpoints, tmp_path):
    wrapper = [sys.executable, "-m", "peft_bitflip.lm_eval_cli"]
    bpb = {}
    for name in ["clean", *P_LEVELS]:
        r = _lm_eval(
            wrapper, checkpoints / name, tmp_path / name, tmp_path, checkpoints / "valid.txt"
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert not METRIC_WARNING.findall(r.stdout + r.stderr)  # 36.6: six before
        bpb[name] = _bits_per_byte(tmp_path / name)
    # p = 0 flips nothing: exactly the clean model's number
    assert bpb["p0"] == bpb["clean"]
    assert bpb["clean"] < bpb["p_mid"] < bpb["p_high"], bpb


def test_stock_lm_eval_refuses_a_bitflip_checkpoint_loudly(checkpoints, tmp_path):
    """Without the plugin (autoload off, not on the path), lm-eval fails naming the method."""
    from peft_bitflip.lm_eval_tasks import TASK_DIR

    stock = [sys.executable, "-c", "from lm_eval.__main__ import cli_evaluate as c; c()"]
    r = _lm_eval(
        [*stock, "--include_path", TASK_DIR],
        checkpoints / "p_mid",
        tmp_path / "out",
        tmp_path,
        checkpoints / "valid.txt",
        plugin=False,
    )
    assert r.returncode != 0
    assert "Unknown quantization type, got bitflip" in r.stdout + r.stderr
    assert not list(tmp_path.rglob("results*.json"))


def test_task_loader_reads_files_and_defaults_to_the_local_corpus(tmp_path):
    from peft_bitflip.lm_eval_tasks.text_ppl import load_documents, process_results

    f = tmp_path / "a.txt"
    f.write_text("first doc\nline two\n\n\nsecond doc\n\n", encoding="utf-8")
    assert load_documents(data_files=str(f))["test"]["text"] == [
        "first doc\nline two",
        "second doc",
    ]
    whole = load_documents(data_files=[str(f)], sample_by="document")["test"]["text"]
    assert whole == ["first doc\nline two\n\n\nsecond doc"]
    default = load_documents(max_documents=3, version=1.0)["test"]["text"]
    assert default == list(local_corpus()["validation"]["text"][:3])
    with pytest.raises(ValueError, match="sample_by"):
        load_documents(data_files=str(f), sample_by="line")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(data_files=str(empty))
    metrics = process_results({"text": "two words"}, (-3.0,))
    assert metrics["word_perplexity"] == (-3.0, 2) and metrics["bits_per_byte"] == (-3.0, 9)


def test_task_declares_lm_evals_own_aggregations(caplog):
    """The task states each metric's aggregation and direction (no lm-eval warning) and they
    are the ones lm-eval would pick for these metrics (the numbers do not change)."""
    import logging

    from lm_eval.api.registry import get_metric_aggregation, is_higher_better
    from lm_eval.tasks import TaskManager

    from peft_bitflip.lm_eval_tasks import TASK_DIR, TEXT_PPL_TASK

    with caplog.at_level(logging.WARNING):
        manager = TaskManager(include_path=TASK_DIR, metadata={"max_documents": 2})
        if hasattr(manager, "load"):  # lm-eval >= 0.4.10
            task = manager.load([TEXT_PPL_TASK])["tasks"][TEXT_PPL_TASK]
        else:
            task = manager.load_task_or_group([TEXT_PPL_TASK])[TEXT_PPL_TASK]
    assert not METRIC_WARNING.findall(caplog.text)
    names = ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    assert sorted(task.aggregation()) == sorted(names)
    for name in names:
        assert task.aggregation()[name] is get_metric_aggregation(name)
        assert task.higher_is_better()[name] is is_higher_better(name) is False
