"""The commands and code in README.md and docs/ stay valid.

Every shell command of a ``bash`` block is checked against the parser of the program it runs
(recipes, ``peft-bitflip``, ``peft-bitflip-lm-eval``) -- the flags exist and the values parse --
without running the (GPU, Hub) job; shell scripts are syntax-checked. The README's two set-up
commands run in CI (``.ci/run``) and the notebook command in ``tests/test_notebooks.py``.
The Python snippets of README.md, docs/tuner.md, docs/checkpoints.md (but its push_to_hub
lines) and docs/recipes.md run on a tiny model.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
LAUNCHERS = {"python", "python3", "torchrun", "accelerate", "bash", "TRITON_INTERPRET=1"}
# commands that other tests or CI run as written
RUN_ELSEWHERE = ("python3 -m venv", "pip install")


def blocks(path: str, langs: tuple[str, ...]):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return [body for lang, body in FENCE.findall(text) if lang in langs]


def commands_of(path: str) -> list[list[str]]:
    """The shell commands of ``path``'s bash blocks, in order, as words."""
    out = []
    for body in blocks(path, ("bash", "sh", "shell")):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and not line.strip().startswith(RUN_ELSEWHERE):
                out.append(words)
    return out


def shell_commands():
    for path in DOCS:
        for words in commands_of(path):
            yield pytest.param(path, words, id=f"{path}: {' '.join(words)[:60]}")


def strip_launcher(words: list[str]) -> list[str]:
    """``accelerate launch --num_processes 2 x.py a b`` -> ``[x.py, a, b]``."""
    words = [w for w in words if w != "..."]
    while words and (words[0] in LAUNCHERS or words[0] == "launch" or words[0].startswith("-")):
        head = words.pop(0)
        if head.startswith("--") and "=" not in head and words and not words[0].startswith("-"):
            if not words[0].endswith((".py", ".sh")):
                words.pop(0)  # the launcher option's value
    return words


def recipe_parser(script: str):
    """The ``build_parser()`` of a script of ``recipes/`` (imported as a package module) or of
    another folder such as ``benchmarks/`` (loaded from its file)."""
    import importlib.util

    name = os.path.splitext(os.path.basename(script))[0]
    sys.path.insert(0, ROOT)
    try:
        if os.path.dirname(os.path.normpath(script)) == "recipes":
            module = __import__(f"recipes.{name}", fromlist=["x"])
        else:
            spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    assert hasattr(module, "build_parser"), f"{script} has no build_parser()"
    return module.build_parser()


@pytest.mark.parametrize("path,words", list(shell_commands()))
def test_documented_command_parses(path, words):
    words = strip_launcher(words)
    assert words, f"{path}: nothing to run"
    program, argv = words[0], words[1:]
    if program.endswith(".sh"):
        script = os.path.join(ROOT, program)
        assert os.path.exists(script), f"{path}: {program} does not exist"
        subprocess.run(["bash", "-n", script], check=True)
    elif program.endswith(".py"):
        assert os.path.exists(os.path.join(ROOT, program)), f"{path}: {program} does not exist"
        parser = recipe_parser(program)
        if argv and argv[0] in ("train", "generate-cfg"):  # pretrain_clm's subcommands
            argv = argv[1:]
        parser.parse_args(argv)
    elif program == "peft-bitflip":
        from peft_bitflip.cli import build_parser

        build_parser().parse_args(argv)
    elif program in ("peft-bitflip-lm-eval", "lm_eval"):  # the stock CLI works via the hook
        cli = pytest.importorskip("lm_eval._cli")
        with mock.patch.object(sys, "argv", ["lm_eval", *argv]):
            cli.HarnessCLI().parse_args()
    else:
        pytest.fail(f"{path}: no check for the command {' '.join(words)!r}")


# Hub organisations of the models the docs name (anything else is a local folder)
HUB_ORGS = {"HuggingFaceTB", "meta-llama", "unsloth", "path"}  # "path/to/model": a placeholder
REAL_MODEL = "/tmp/real-model/smollm2-135m"  # what ../shared/tools/real-model.sh makes (results.md)


@pytest.mark.parametrize("path", DOCS)
def test_documented_models_are_on_the_hub_or_made_by_an_earlier_step(path):
    """A local checkpoint a ``peft-bitflip`` command reads (``compare --clean_model base/``)
    is the ``--output_dir`` of a command documented before it in the same page."""
    from peft_bitflip.cli import build_parser

    made = {REAL_MODEL}
    for words in commands_of(path):
        words = strip_launcher(words)
        if words[0] == "peft-bitflip" and words[1] != "demo":
            args = build_parser().parse_args(words[1:])
            models = [getattr(args, "model", None), getattr(args, "clean_model", None)]
            for m in [*models, *getattr(args, "finetuned", [])]:
                if m is None or (m.split("/")[0] in HUB_ORGS and not m.endswith("/")):
                    continue
                assert m.rstrip("/") in made, f"{path}: {m!r} is made by no step above it"
        if "--output_dir" in words:
            made.add(words[words.index("--output_dir") + 1].rstrip("/"))


# --- Python snippets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tiny_models import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(path)
    return str(path)


def run_snippet(code: str, namespace: dict) -> None:
    """Run a snippet as written (on a CPU machine a hard-coded CUDA device fails)."""
    exec(compile(code, "<snippet>", "exec"), namespace)


@pytest.mark.parametrize("index", range(len(blocks("README.md", ("python",)))))
def test_readme_python_snippets_run(index, tiny_checkpoint, reference_backend):
    code = blocks("README.md", ("python",))[index].replace("path/to/model", tiny_checkpoint)
    namespace: dict = {}
    with contextlib.redirect_stdout(None):
        run_snippet(code, namespace)
    if "get_peft_model" in code:  # the quick start: a LoRA model whose linears flip
        from peft_bitflip.layers import bitflip_layers

        assert len(bitflip_layers(namespace["model"])) > 0
    else:  # the functional op: a gradient came back
        assert namespace["x"].grad is not None


def test_tuner_guide_snippet_runs(reference_backend):
    from tiny_models import tiny_llama

    code, recompute = blocks("docs/tuner.md", ("python",))
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    namespace = {"model": model, "ids": ids}
    with contextlib.redirect_stdout(None):
        run_snippet(code, namespace)
    assert namespace["clean_logits"].shape[:2] == (2, 8)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # removed again
    # "what is kept for backward": switch a flipped model's layers to recomputing flip(x)
    import peft_bitflip as pb
    from peft_bitflip.layers import bitflip_layers

    pb.apply_bitflip(model, pb.BitflipConfig(x_p_exp=0.01))
    run_snippet(recompute, {"model": model, "pb": pb})
    assert all(m.bitflip_recompute_input for _, m in bitflip_layers(model))


def test_checkpoint_guide_snippets_run(tiny_checkpoint, tmp_path, monkeypatch, reference_backend):
    """docs/checkpoints.md: load with flips, save, reload, dequantize; other settings via
    load_config_with; LoRA merge + save (the push_to_hub lines need the Hub and are skipped)."""
    from tiny_models import tiny_llama

    from peft_bitflip import data
    from peft_bitflip.layers import bitflip_layers

    monkeypatch.chdir(tmp_path)
    snippets = [textwrap.dedent(b) for b in blocks("docs/checkpoints.md", ("python",))]
    snippets = [b for b in snippets if "push_to_hub" not in b]
    assert len(snippets) == 4
    stock, snippets = snippets[0], snippets[1:]
    tokenizer = data.train_tokenizer(["a small text to train a tokenizer on"] * 8, vocab_size=300)
    namespace = {"base": tiny_llama(), "tokenizer": tokenizer}
    run_snippet(snippets[0].replace("path/or/hub-id", tiny_checkpoint), namespace)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "flipped")
    assert bitflip_layers(saved) and saved.config.quantization_config.seed == 0
    clean = namespace["clean"]  # dequantize() works in place, as transformers' does
    assert not bitflip_layers(clean) and "quantization_config" not in clean.config.to_dict()
    run_snippet(snippets[1], namespace)
    assert namespace["model"].config.quantization_config.w_p_exp == 1e-6
    assert not bitflip_layers(namespace["clean"])
    run_snippet(snippets[2], namespace)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.config.quantization_config.x_p_exp == 2**-16
    run_snippet(stock, namespace)  # the stock calls on the merged checkpoint
    assert bitflip_layers(namespace["model"]) and bitflip_layers(namespace["generate"].model)


def test_callback_snippet_runs(tmp_path, reference_backend):
    """docs/recipes.md: add_bitflip_callback on a Trainer of a bit-flip LoRA model."""
    from peft import get_peft_model
    from tiny_models import VOCAB, tiny_llama
    from transformers import Trainer, TrainingArguments

    import peft_bitflip as pb

    (code,) = blocks("docs/recipes.md", ("python",))
    peft_model = get_peft_model(
        tiny_llama(), pb.BitflipLoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    ds = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    namespace = {"Trainer": Trainer, "peft_model": peft_model, "args": args, "ds": ds}
    run_snippet(code, namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 3
    scales = [h["bitflip/p_scale"] for h in trainer.state.log_history if "bitflip/p_scale" in h]
    assert scales and scales[0] < 1  # the linear warm-up of p is running
