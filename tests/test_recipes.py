"""The fine-tuning recipes end to end on their offline tiny preset (in-process, CPU)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("datasets")
pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `recipes` is a directory of scripts, importable from the checkout
    sys.path.insert(0, ROOT)

import peft_bitflip  # noqa: E402
from peft_bitflip import data  # noqa: E402
from recipes import finetune_lora, sft_trl  # noqa: E402

FAST = ["--disable_tqdm", "--logging_steps", "1"]


@pytest.fixture(autouse=True)
def _cpu_reference(reference_backend):
    """Every test runs the flips through the fast PyTorch reference."""


def _results(out) -> dict:
    with open(os.path.join(out, "all_results.json")) as f:
        return json.load(f)


def _logged_losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _check_saved_model(out, results, flips: dict | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "all_results.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    for key in ("train_loss", "eval_loss", "perplexity", "clean_perplexity", "train_runtime"):
        assert math.isfinite(results[key]), (key, results[key])
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["train_tokens"] > 0 and results["train_steps"] > 0
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "bitflip"
    for key, value in (flips or {}).items():
        assert qc[key] == value, key
    # the merged model reloads with its flips, without LoRA modules
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    names = [n for n, _ in model.named_modules()]
    assert not any("lora_" in n or "modules_to_save" in n for n in names)
    layers = list(peft_bitflip.layers.bitflip_layers(model))
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head skipped
    ids = tok("The try statement specifies exception handlers", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    return model


def test_finetune_lora_tiny_end_to_end(tmp_path):
    out = str(tmp_path / "ft")
    toml = tmp_path / "transform_cfg.toml"
    toml.write_text(
        "use_lora = true\n[fc]\nx_p_exp = 1e-4\nx_p_frac = 1e-4\nx_zero_out_t = 30.0\n"
        "w_p_exp = 1e-4\nw_p_frac = 1e-4\nw_zero_out_t = 1.25\n[lora]\nr = 4\nlora_alpha = 8\n"
    )
    results = finetune_lora.main(
        [
            "--output_dir",
            out,
            "--max_steps",
            "3",
            "--eval_batches",
            "2",
            "--transform_cfg",
            str(toml),
            "--w_zero_out_t",
            "none",
            "--x_p_frac",
            "2^-12",
            *FAST,
        ]
    )
    assert results == _results(out)
    assert results["train_steps"] == 3
    assert results["train_tokens"] == 3 * 8 * 64
    assert results["budget_source"] == "max_steps"
    assert results["eval_samples"] == 2 * 8
    # r = 4 LoRA on 2 x 7 layers, r * (in + out) each, plus the embeddings and head of the
    # random model (trained in full by the tiny preset)
    with open(os.path.join(out, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    lora = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert results["trainable_parameters"] == lora + 2 * vocab * 64
    _check_saved_model(
        out,
        results,
        {"x_p_exp": 1e-4, "x_p_frac": 2.0**-12, "w_zero_out_t": None, "w_p_frac": 1e-4},
    )
    _check_cards_and_adapter(out, results, x_p_frac=2.0**-12, r=4)


def _check_cards_and_adapter(out, results, *, x_p_frac, r):
    """The adapter reloads onto the base model; both cards state the fault model, the
    command, seeds, versions and results."""
    from peft import PeftConfig

    adapter = os.path.join(out, "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert os.path.isfile(os.path.join(adapter, name)), name
    cfg = PeftConfig.from_pretrained(adapter)
    assert isinstance(cfg, peft_bitflip.BitflipLoraConfig) and cfg.r == r
    assert cfg.x_p_frac == x_p_frac
    for folder, library in ((out, "transformers"), (adapter, "peft")):
        with open(os.path.join(folder, "README.md")) as f:
            card = f.read()
        assert f"library_name: {library}" in card and "peft-bitflip" in card
        assert f'"x_p_frac": {x_p_frac!r}' in card and '"w_zero_out_t": null' in card
        assert "python recipes/finetune_lora.py --output_dir" in card
        assert "seed 42, bitflip_seed 0" in card and "transformers " in card
        assert f"| train_steps | {results['train_steps']} |" in card
        assert f"| perplexity | {results['perplexity']:.6g} |" in card


def test_finetune_lora_loss_decreases(tmp_path):
    out = str(tmp_path / "ft")
    results = finetune_lora.main(
        [
            "--output_dir",
            out,
            "--max_steps",
            "30",
            "--eval_batches",
            "4",
            "--eval_before_training",
            *FAST,
        ]
    )
    losses = _logged_losses(out)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert results["perplexity"] < results["initial_perplexity"]


def test_finetune_lora_token_budget(tmp_path):
    """Default budget: 1 % of the parameters in tokens, counting grad accumulation."""
    out = str(tmp_path / "ft")
    results = finetune_lora.main(
        [
            "--output_dir",
            out,
            "--train_tokens",
            "0",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--eval_batches",
            "1",
            *FAST,
        ]
    )
    budget = math.ceil(results["num_parameters"] / 100)
    assert results["budget_tokens"] == budget
    assert results["tokens_per_step"] == 2 * 2 * 64
    expected = math.ceil(budget / 256)
    assert (
        results["train_steps"]
        == expected
        == data.token_budget_steps(
            num_params=results["num_parameters"],
            per_device_batch_size=2,
            block_size=64,
            gradient_accumulation_steps=2,
        )
    )
    assert results["train_tokens"] == expected * 256 >= budget


def _git_status() -> str:
    import subprocess

    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_finetune_from_checkpoint_and_full_finetune(tmp_path, monkeypatch):
    """--model_name_or_path (a saved bit-flip checkpoint, loaded clean then re-flipped) and
    the original's use_lora = false (every parameter trains under flips).  The first run,
    started from the checkout without --output_dir, writes to the temporary directory and
    leaves the checkout as it was (no output/)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(ROOT)
    before = _git_status()
    finetune_lora.main(["--max_steps", "1", "--eval_batches", "1", *FAST])
    first = str(tmp_path / "peft-bitflip-recipes" / "bitflip-lora")
    assert os.path.isfile(os.path.join(first, "model.safetensors"))
    assert not os.path.exists(os.path.join(ROOT, "output"))
    assert _git_status() == before
    toml = tmp_path / "full.toml"
    toml.write_text("use_lora = false\n[fc]\nw_p_exp = 1e-3\nw_p_frac = 1e-3\nw_zero_out_t = 1.5\n")
    out = str(tmp_path / "second")
    results = finetune_lora.main(
        [
            "--model_name_or_path",
            first,
            "--output_dir",
            out,
            "--transform_cfg",
            str(toml),
            "--block_size",
            "32",
            "--max_steps",
            "2",
            "--eval_batches",
            "1",
            "--learning_rate",
            "1e-3",
            *FAST,
        ]
    )
    assert results["trainable_parameters"] == results["num_parameters"]
    assert results["block_size"] == 32 and results["tokens_per_step"] == 8 * 32
    _check_saved_model(
        out, results, {"w_p_exp": 1e-3, "w_zero_out_t": 1.5, "x_p_exp": 0.0, "x_zero_out_t": None}
    )


def test_recipe_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        finetune_lora.main(["--preset", "tiny", "--model_name_or_path", "x"])
    with pytest.raises(SystemExit):
        finetune_lora.main(["--x_p_exp", "often"])
    with pytest.raises(SystemExit):
        finetune_lora.main(["--calibrate_zero_out", "0.5"])
    with pytest.raises(SystemExit):
        sft_trl.main(["--gradient_accumulation_steps", "0"])


def test_sft_trl_tiny_end_to_end(tmp_path):
    """Also: an old flag spelling (--max_train_steps) warns, naming the new one, and works."""
    out = str(tmp_path / "sft")
    with pytest.warns(FutureWarning, match="--max_train_steps is deprecated.*use --max_steps"):
        results = sft_trl.main(
            ["--output_dir", out, "--max_train_steps", "3", "--eval_batches", "1", *FAST]
        )
    assert results == _results(out)
    assert results["dataset_format"] == "prompt-completion"
    assert results["train_steps"] == 3
    assert 0 < results["train_tokens"] <= 3 * 8 * 128  # non-padding tokens seen
    _check_saved_model(out, results)


def test_sft_trl_loss_decreases(tmp_path):
    out = str(tmp_path / "sft")
    sft_trl.main(
        [
            "--output_dir",
            out,
            "--max_steps",
            "24",
            "--eval_batches",
            "1",
            "--per_device_train_batch_size",
            "4",
            *FAST,
        ]
    )
    losses = _logged_losses(out)
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses


def test_sft_trl_messages_and_text_files(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
            ]
        }
        for i in range(40)
    ]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "chat")
    results = sft_trl.main(
        [
            "--output_dir",
            out,
            "--train_file",
            str(jl),
            "--max_steps",
            "2",
            "--eval_batches",
            "1",
            "--tokenizer_vocab_size",
            "300",
            *FAST,
        ]
    )
    assert results["dataset_format"] == "conversational"
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    assert "chat_template" in tok_cfg or os.path.isfile(os.path.join(out, "chat_template.jinja"))

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(f"Paragraph {i} talks about bits and flips." for i in range(60)))
    out = str(tmp_path / "text")
    results = sft_trl.main(
        [
            "--output_dir",
            out,
            "--train_file",
            str(txt),
            "--max_steps",
            "2",
            "--packing",
            "--block_size",
            "32",
            "--eval_batches",
            "1",
            "--tokenizer_vocab_size",
            "300",
            *FAST,
        ]
    )
    assert results["dataset_format"] == "language-modeling"
    assert math.isfinite(results["eval_loss"])


def test_bitflip_callback_wiring(tmp_path):
    """--bitflip_warmup_steps goes to peft_bitflip.callback (an error while it is missing)."""
    import importlib.util

    argv = ["--output_dir", str(tmp_path / "cb"), "--max_steps", "3", "--eval_batches", "1"]
    argv += ["--bitflip_warmup_steps", "2", *FAST]
    if importlib.util.find_spec("peft_bitflip.callback") is None:
        with pytest.raises(RuntimeError, match="BitflipCallback"):
            finetune_lora.main(argv)
        return
    results = finetune_lora.main(argv)
    assert results["train_steps"] == 3 and math.isfinite(results["eval_loss"])


def test_trainer_flags_reach_the_trainer(tmp_path):
    """Any TrainingArguments flag passes through: Adafactor and a cosine schedule (the logged
    learning rates follow the cosine), recorded in training_args.json."""
    out = str(tmp_path / "flags")
    lr = 1e-3
    results = finetune_lora.main(
        ["--output_dir", out, "--max_steps", "4", "--eval_batches", "1", "--optim", "adafactor",
         "--lr_scheduler_type", "cosine", "--learning_rate", str(lr), "--lora_rank", "2", *FAST]
    )  # fmt: skip
    assert results["train_steps"] == 4
    with open(os.path.join(out, "training_args.json")) as f:
        saved = json.load(f)
    assert saved["optim"] == "adafactor" and saved["lr_scheduler_type"] == "cosine"
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    logged = [h["learning_rate"] for h in history if "loss" in h]
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert logged == pytest.approx(cosine, rel=1e-6)  # linear would be lr * (1 - s / 4)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 2  # the deprecated --lora_rank still sets the rank


def test_fault_model_from_toml_yaml_and_flags(tmp_path):
    """--transform_cfg takes the original's LoRA TOML or its pretraining meta YAML; inline
    flags override single fields; the preset's LoRA shape applies without a TOML."""
    import yaml

    from recipes import common

    def settings(*argv):
        parser = finetune_lora.build_parser()
        args = common.parse_args(parser, list(argv), script="finetune_lora.py", output_name="t")
        return common.bitflip_settings(args)

    rule = {"x_p_exp": 1e-3, "x_p_frac": 0.0, "w_p_exp": 0.0, "w_p_frac": 2e-3}
    rule.update(x_zero_out_t=20.0, w_zero_out_t=None)
    meta = tmp_path / "meta.yaml"
    meta.write_text(
        yaml.safe_dump({"transform_flavor": "fc", "layer_name_to_config": {"default": rule}})
    )
    flips, lora, use_lora = settings("--transform_cfg", str(meta), "--w_zero_out_t", "3")
    assert (flips.x_p_exp, flips.w_p_frac, flips.x_zero_out_t) == (1e-3, 2e-3, 20.0)
    assert flips.w_zero_out_t == 3.0 and lora == {"r": 16, "lora_alpha": 32} and use_lora
    toml = tmp_path / "cfg.toml"
    toml.write_text("use_lora = true\n[fc]\nx_p_exp = 1e-4\n[lora]\nr = 8\nlora_alpha = 4\n")
    flips, lora, _ = settings(
        "--transform_cfg", str(toml), "--lora_alpha", "2", "--bitflip_seed", "7"
    )
    assert flips.x_p_exp == 1e-4 and flips.w_p_exp == 0.0 and flips.seed == 7
    assert lora == {"r": 8, "lora_alpha": 2.0}


def test_train_faults_flag_flips_optimizer_state(tmp_path):
    """--train_faults reaches TrainingFaultCallback: the logs count flips in AdamW's first
    moment at the given rate; a bad site is a parse error naming it."""
    out = str(tmp_path / "faults")
    argv = ["--output_dir", out, "--max_steps", "2", "--eval_batches", "1", "--logging_steps", "1"]
    results = finetune_lora.main([*argv, "--train_faults", "exp_avg.frac=0.01", *FAST])
    assert results["train_steps"] == 2
    with open(os.path.join(out, "trainer_state.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["train_faults/exp_avg_frac_flips"] > 0
        assert entry["train_faults/exp_avg_exp_flips"] == 0
        assert entry["train_faults/exp_avg_frac_rate"] == pytest.approx(0.01, rel=0.5)
    with pytest.raises(SystemExit):
        finetune_lora.main([*argv, "--train_faults", "momentum=0.1", *FAST])
