"""recipes/pretrain_clm.py: generate-cfg, training from scratch, exact resume, streaming input,
the saved checkpoint reloading with its flips, and bad input (in-process, CPU, tiny flavor)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

import pytest

pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `recipes` is a directory of scripts, importable from the checkout
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

import peft_bitflip  # noqa: E402
from peft_bitflip import flavors  # noqa: E402
from recipes import pretrain_clm  # noqa: E402

# a few optimizer steps of 4 x 32 tokens on the embedded corpus, tokenizer of 512 tokens
SMALL = [
    "--seq_len",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--tokenizer_vocab_size",
    "512",
    "--tokenizer_train_docs",
    "2000",
    "--eval_blocks",
    "8",
    "--logging_steps",
    "1",
    "--disable_tqdm",
]


@pytest.fixture(autouse=True)
def _cpu_reference(reference_backend):
    """The flips run through the fast PyTorch reference (bit-identical to the kernel)."""


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_generate_cfg_reproduces_the_original_60m_plan(tmp_path):
    """The original's aixsim-60M config: vocab 49152, 48 per device on 2 GPUs, seq 2048,
    22 x 63,226,752 tokens -> 7075 steps, 1415 warm-up."""
    cfg = tmp_path / "aixsim-60M.yaml"
    plan = pretrain_clm.main(
        [
            "generate-cfg",
            "--flavor",
            "60M",
            "--tokenizer_vocab_size",
            "49152",
            "--per_device_train_batch_size",
            "48",
            "--num_processes",
            "2",
            "--train_file",
            "corpus.jsonl",  # not read by generate-cfg
            "--save_path",
            str(cfg),
            "--lr_scheduler_type",
            "cosine",
        ]
    )
    assert plan["params"] == 63_226_752
    assert plan["tokens_per_step"] == 196_608 and plan["effective_batch"] == 96
    assert (plan["steps"], plan["warmup_steps"]) == (7075, 1415)
    written = yaml.safe_load(cfg.read_text())
    assert written["plan"]["steps"] == 7075
    assert written["flavor"] == "60M" and written["seq_len"] == 2048
    assert written["weight_decay"] == 0.1 and written["adam_beta2"] == 0.95
    # the same budget on 4 processes with 2 accumulation steps: a quarter... of a half
    args = pretrain_clm.parse_args(["train", "--config", str(cfg)])
    assert args.flavor == "60M" and args.train.per_device_train_batch_size == 48
    # a Trainer flag travels through the YAML; the command line still wins
    assert args.train.lr_scheduler_type == "cosine" and args.train.weight_decay == 0.1
    again = pretrain_clm.parse_args(
        ["train", "--config", str(cfg), "--lr_scheduler_type", "linear"]
    )
    assert again.train.lr_scheduler_type == "linear"
    plan4 = pretrain_clm.make_plan(
        pretrain_clm.parse_args(
            ["train", "--config", str(cfg), "--gradient_accumulation_steps", "2"]
        ),
        49152,
        world_size=4,
    )
    assert plan4["tokens_per_step"] == 48 * 2 * 4 * 2048
    assert plan4["steps"] == math.ceil(22 * 63_226_752 / plan4["tokens_per_step"])


def test_pretrain_tiny_loss_goes_down_and_checkpoint_reloads_with_flips(tmp_path):
    out = tmp_path / "run"
    results = pretrain_clm.main(
        SMALL
        + ["--max_steps", "30", "--learning_rate", "5e-3", "--output_dir", str(out)]
        + ["--eval_seeds", "0,1", "--save_steps", "0"]
    )
    assert results["train_steps"] == 30
    assert results["train_tokens"] == 30 * 4 * 32
    assert results["last_logged_loss"] < results["first_logged_loss"] - 0.5
    for key in ("clean_perplexity", "flipped_perplexity", "tokens_per_second"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert set(results["flipped_perplexity_per_seed"]) == {0, 1}
    assert results["bitflip"] == peft_bitflip.BitflipConfig.original_default().to_dict()

    # config.json carries the fault model; from_pretrained reloads the flipping layers
    from transformers import AutoModelForCausalLM

    with open(out / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "bitflip"
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, peft_bitflip.BitflipLinear)]
    assert len(layers) == 2 * 7  # tiny: 2 layers x (q, k, v, o, gate, up, down); lm_head clean
    assert not isinstance(model.lm_head, peft_bitflip.BitflipLinear)
    assert model.config.quantization_config.x_p_exp == 2.0**-16
    # the counters reloaded are those of the end of training (evaluation left them alone)
    calls = {int(m.bitflip_calls) for m in layers}
    assert calls == {30}
    # the model card (pushed with --push_to_hub) states the fault model, command and results
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and '"x_p_exp": 1.52587890625e-05' in card
    assert '"w_zero_out_t": 1.25' in card and "--max_steps 30" in card
    assert "| train_steps | 30 |" in card and "seed 42, bitflip_seed 0" in card


def test_resume_from_a_checkpoint_gives_the_same_model(tmp_path):
    """8 steps straight vs 4 steps, checkpoint, resume for 4 more: identical weights."""
    common = SMALL + ["--max_steps", "8", "--save_steps", "4", "--learning_rate", "5e-3"]
    # flips strong enough that a wrong stream position would change the weights
    common += ["--bitflip", str(_strong_flips(tmp_path))]
    straight = tmp_path / "straight"
    pretrain_clm.main(common + ["--output_dir", str(straight)])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    results = pretrain_clm.main(
        common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    )
    assert results["resumed_from"].endswith("checkpoint-4")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the flips mattered: a clean run ends elsewhere
    clean = tmp_path / "clean"
    pretrain_clm.main(
        SMALL
        + ["--max_steps", "8", "--save_steps", "0", "--learning_rate", "5e-3"]
        + ["--bitflip", "none", "--output_dir", str(clean)]
    )
    c = _weights(clean)
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[w], c[w])


def _strong_flips(tmp_path):
    cfg = peft_bitflip.BitflipConfig(
        x_p_exp=1e-3, x_p_frac=1e-2, x_zero_out_t=30.0, w_p_frac=1e-2, w_zero_out_t=1.25
    )
    path = tmp_path / "flips.json"
    cfg.to_json_file(str(path))
    return path


def test_clean_baseline_is_evaluated_under_the_original_flips(tmp_path):
    out = tmp_path / "clean"
    results = pretrain_clm.main(
        SMALL
        + ["--max_steps", "4", "--save_steps", "0", "--bitflip", "none"]
        + ["--output_dir", str(out)]
    )
    assert results["bitflip"] is None
    assert "none (clean baseline)" in (out / "README.md").read_text()
    assert results["eval_bitflip"] == peft_bitflip.BitflipConfig.original_default().to_dict()
    with open(out / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, peft_bitflip.BitflipLinear) for m in model.modules())


def test_streaming_local_files_and_original_meta_yaml(tmp_path):
    from peft_bitflip import data

    docs = data.local_corpus()["train"]["text"][:600]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    meta = tmp_path / "fc-only-w-a-exp-frac.yaml"
    p = 1.52587890625e-05
    rule = {f"{t}_p_{f}": p for t in "wx" for f in ("exp", "frac")}
    rule.update(w_zero_out_t=1.25, x_zero_out_t=30.0)
    meta.write_text(
        yaml.safe_dump(
            {"use_regex": True, "transform_flavor": "fc", "layer_name_to_config": {"default": rule}}
        )
    )
    out = tmp_path / "stream"
    results = pretrain_clm.main(
        SMALL
        + ["--train_file", str(train), "--streaming", "--validation_docs", "50"]
        + ["--flavor", "tiny", "--max_steps", "3", "--save_steps", "0"]
        + ["--bitflip", str(meta), "--output_dir", str(out)]
    )
    assert results["train_steps"] == 3 and results["validation_blocks"] == 8
    assert results["bitflip"] == peft_bitflip.BitflipConfig.original_default().to_dict()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bitflip", "bogus"], "bogus"),
        (["--token_num_scale", "-1"], "token_num_scale"),
        (["--seq_len", "0"], "seq_len"),
        (["--eval_seeds", "a,b"], "eval_seeds"),
        (["--flavor", "70B"], "70B"),
        (["--precision", "fp64"], "fp64"),
    ],
)
def test_bad_arguments_fail_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_clm.parse_args(argv)
    err = capsys.readouterr().err + str(e.value)
    assert message in err


def test_flavor_configs_match_the_digest_table():
    """Parameter counts of the built models equal the planned ones (vocab 49152)."""
    from transformers import LlamaForCausalLM

    cfg = flavors.aixsim_config("debug", vocab_size=1000, max_seq_len=64)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n - cfg.vocab_size * cfg.hidden_size == flavors.count_params(cfg)


def test_push_to_hub_reaches_training_arguments(tmp_path):
    """--push_to_hub / --hub_model_id are Trainer's (no network here: nothing is built)."""
    args = pretrain_clm.parse_args(
        SMALL + ["--push_to_hub", "--hub_model_id", "me/aixsim-tiny", "--output_dir", str(tmp_path)]
    )
    assert args.train.push_to_hub and args.train.hub_model_id == "me/aixsim-tiny"
    assert pretrain_clm.parse_args(SMALL).train.output_dir.startswith(tempfile.gettempdir())


def test_help_lists_the_trainer_flags(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_clm.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--lr_scheduler_type", "--optim", "--eval_strategy", "--seq_len", "--bitflip"):
        assert flag in text, flag


def test_deprecated_spellings_warn_naming_the_new_flag_and_work():
    with pytest.warns(FutureWarning, match="use --warmup_steps"):
        args = pretrain_clm.parse_args(SMALL + ["--warmup_fraction", "0.1"])
    assert args.train.warmup_steps == 0.1
    with pytest.warns(FutureWarning, match="use --max_steps"):
        args = pretrain_clm.parse_args(SMALL + ["--max_train_steps", "7"])
    assert args.train.max_steps == 7
    with pytest.warns(FutureWarning, match="use --bf16"):
        args = pretrain_clm.parse_args(SMALL + ["--precision", "bf16"])
    assert args.train.bf16 and not args.train.fp16
    with pytest.warns(FutureWarning, match="use --streaming false"):
        args = pretrain_clm.parse_args(SMALL + ["--dataset_name", "x/y", "--no-streaming"])
    assert args.streaming is False
    # the original's optimisation stays the default
    args = pretrain_clm.parse_args(SMALL)
    t = args.train
    assert (t.weight_decay, t.adam_beta2, t.warmup_steps, t.lr_scheduler_type) == (
        0.1,
        0.95,
        0.2,
        "linear",
    )
    assert t.per_device_eval_batch_size == 4 and t.save_steps == 500 and not t.bf16


def test_trainer_flags_reach_the_pretraining_trainer(tmp_path):
    """--lr_scheduler_type cosine and --optim adafactor: cosine learning rates in the log
    history (warm-up over 2 of 8 steps), adafactor in training_args.json."""
    out = tmp_path / "cosine"
    pretrain_clm.main(
        SMALL
        + ["--max_steps", "8", "--save_steps", "0", "--eval_blocks", "2", "--bitflip", "none"]
        + ["--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--learning_rate", "1e-3"]
        + ["--optim", "adafactor", "--output_dir", str(out)]
    )
    with open(out / "trainer_state.json") as f:
        logged = [h["learning_rate"] for h in json.load(f)["log_history"] if "learning_rate" in h]
    # logged at steps 3..8: the rate step s used, 0.5 (1 + cos(pi (s - 3) / 6)) x the peak
    # (a linear decay would log 1, 0.833, 0.667, ...)
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert logged[-6:] == pytest.approx(cosine, rel=1e-6)
    with open(out / "training_args.json") as f:
        assert json.load(f)["optim"] == "adafactor"
