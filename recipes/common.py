"""Shared pieces of the bit-flip fine-tuning recipes (``finetune_lora.py``, ``sft_trl.py``).

Argument parsing (with the ``tiny`` offline preset), model / tokenizer loading, the bit-flip
LoRA configuration (the original's ``transform_cfg.toml`` and inline flags), the token budget,
validation perplexity on the first N batches (flips on, and clean for reference), saving the
merged model and ``all_results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os

import torch

import peft_bitflip
from peft_bitflip import data
from peft_bitflip.cli import parse_margin as _margin
from peft_bitflip.cli import parse_probability as _probability
from peft_bitflip.cli import parse_threshold as _threshold
from peft_bitflip.config import RULE_KEYS, BitflipConfig, read_original_toml

FLIP_KEYS = RULE_KEYS
# The original release's transform_cfg.toml: p = 2^-16 for x and w, zero-out |x|>=30, |w|>=1.25.
ORIGINAL_FLIPS = {k: getattr(BitflipConfig.original_default(), k) for k in FLIP_KEYS}
ORIGINAL_LORA = {"r": 32, "lora_alpha": 32}  # the original script's LORA_CFG

# Defaults of the original run_clm_no_trainer.py (the "none" preset).
BASE_DEFAULTS = {
    "block_size": None,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 5e-5,
    "weight_decay": 0.0,
    "num_train_epochs": 3.0,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear",
    "num_warmup_steps": 0,
    "train_tokens": None,
    "tokens_per_param": 0.01,
    "eval_batches": 64,
    "logging_steps": 50,
    "modules_to_save": "",
}

# The offline embedded default: a tiny Llama trained from random initialisation on the pydoc
# corpus, 128 optimizer steps of 8 x 64 tokens (64 of 8 x 128 for SFT); well under a minute
# on two CPU cores.
PRESETS = {
    "none": {},
    "tiny": {
        "block_size": 64,
        "learning_rate": 3e-3,
        "train_tokens": 128 * 8 * 64,
        "eval_batches": 16,
        "logging_steps": 16,
        "lora": {"r": 16, "lora_alpha": 32},  # used when no --transform_cfg gives [lora]
        "modules_to_save": "embed_tokens,lm_head",
    },
}
TINY_VOCAB_SIZE = 1024
TOKENIZER_TRAIN_DOCS = 20_000
SCHEDULERS = [
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


# ---------------------------------------------------------------------- arguments


def build_parser(description: str, *, default_output_dir: str) -> argparse.ArgumentParser:
    """The arguments common to both recipes (each adds its own on top)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="defaults for a setting: 'tiny' = offline tiny Llama (random init) + tokenizer "
        "trained locally; default: tiny without --model_name_or_path, else none",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None, help="HF model id or local path")
    g.add_argument("--tokenizer_name", default=None, help="default: the model's tokenizer")
    g.add_argument("--trust_remote_code", action="store_true")
    g.add_argument(
        "--torch_dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype the model is loaded in (the original loaded float32)",
    )
    g.add_argument(
        "--tokenizer_vocab_size",
        type=int,
        default=TINY_VOCAB_SIZE,
        help="vocabulary of the tokenizer trained locally (tiny model only)",
    )

    g = p.add_argument_group("data (default: the embedded offline pydoc corpus)")
    g.add_argument("--dataset_name", default=None, help="datasets.load_dataset name")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_file", default=None, help=".txt, .json, .jsonl or .csv file")
    g.add_argument("--validation_file", default=None)
    g.add_argument(
        "--validation_split_percentage",
        type=float,
        default=5,
        help="%% of train used as validation when there is no validation split",
    )
    g.add_argument("--text_column", default=None, help="default: 'text', else the first column")
    g.add_argument(
        "--txt_sample_by",
        choices=list(data.TXT_SAMPLE_BY),
        default="paragraph",
        help=".txt files: one document per blank-line paragraph, per file or per line",
    )
    g.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="tokens per training sequence; default min(1024, model / tokenizer maximum)",
    )
    g.add_argument("--preprocessing_num_workers", type=int, default=None)

    g = p.add_argument_group(
        "bit flips (default: the original's transform_cfg.toml, p=2^-16, t_x=30, t_w=1.25)"
    )
    g.add_argument(
        "--transform_cfg",
        default=None,
        help="the original's TOML (use_lora, [fc] flips, [lora] r / lora_alpha); inline flags "
        "override its values",
    )
    for key in FLIP_KEYS:
        kind = (
            "zero-out threshold (|v| >= t -> 0; 'none' = off)"
            if key.endswith("_t")
            else ("flip probability per bit (e.g. 1.5e-5 or 2^-16)")
        )
        g.add_argument(
            f"--{key}",
            type=_threshold if key.endswith("_t") else _probability,
            default=argparse.SUPPRESS,
            help=f"{'input' if key[0] == 'x' else 'weight'} {kind}",
        )
    g.add_argument("--bitflip_seed", type=int, default=0, help="seed of the flip streams")
    g.add_argument(
        "--compat_snap",
        action="store_true",
        help="round p down to a power of two like the original kernel",
    )
    g.add_argument(
        "--calibrate_zero_out",
        type=_margin,
        default=None,
        metavar="MARGIN",
        help="replace the zero-out thresholds by MARGIN x each layer's own maximum |x| (first "
        "--calibration_batches training batches, flips off) and |w| (peft_bitflip."
        "calibration.calibrate_zero_out; e.g. 2)",
    )
    g.add_argument(
        "--calibration_batches", type=int, default=8, help="batches for --calibrate_zero_out"
    )
    g.add_argument(
        "--bitflip_warmup_steps",
        type=int,
        default=0,
        help="ramp the flip probabilities up over this many optimizer steps (BitflipCallback)",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--lora_rank", type=int, default=None, help="r (default: TOML, else 32; tiny: 16)"
    )
    g.add_argument("--lora_alpha", type=float, default=None, help="default: TOML, else 32")
    g.add_argument(
        "--lora_target_modules",
        default="all-linear",
        help="comma-separated module names, or 'all-linear' (every linear layer except the "
        "output head, as the original)",
    )
    g.add_argument(
        "--modules_to_save",
        default=None,
        help="comma-separated modules trained in full besides LoRA (e.g. lm_head,embed_tokens); "
        "the tiny preset trains the random model's embeddings and head this way",
    )
    g.add_argument(
        "--full_finetune",
        action="store_true",
        help="no LoRA: train every parameter under flips (the TOML's use_lora = false)",
    )

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default=default_output_dir)
    g.add_argument("--learning_rate", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--num_train_epochs", type=float, help="used only with --tokens_per_param 0")
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--per_device_train_batch_size", type=int)
    g.add_argument("--per_device_eval_batch_size", type=int)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS)
    g.add_argument("--num_warmup_steps", type=int, help="learning-rate warm-up (optimizer steps)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0: no clipping (original)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="optimizer steps; overrides the token budget",
    )
    g.add_argument(
        "--train_tokens",
        type=int,
        help="token budget (tokens); 0 = use --tokens_per_param",
    )
    g.add_argument(
        "--tokens_per_param",
        type=float,
        help="token budget as a multiple of the model's parameter count (0.01 = 1%%, the "
        "original); 0 = no budget, train --num_train_epochs",
    )
    g.add_argument(
        "--eval_batches",
        type=int,
        help="validation batches per process (flips on); -1 = the whole split, 0 = no eval",
    )
    g.add_argument("--eval_steps", type=int, default=0, help="also evaluate every N steps")
    g.add_argument("--eval_before_training", action="store_true")
    g.add_argument("--logging_steps", type=int)
    g.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: no)")
    g.add_argument("--resume_from_checkpoint", default=None)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument(
        "--full_determinism",
        action="store_true",
        help="deterministic GPU kernels (torch.use_deterministic_algorithms): bit-identical "
        "reruns on the same machine; the flips are identical without it",
    )
    g.add_argument("--report_to", default="none", help="none, wandb, tensorboard, trackio, ...")
    g.add_argument("--run_name", default=None)
    g.add_argument("--disable_tqdm", action="store_true")
    g.add_argument("--push_to_hub", action="store_true", help="push the merged model")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    return p


def parse_args(
    parser: argparse.ArgumentParser, argv=None, *, extra_presets: dict | None = None
) -> argparse.Namespace:
    """Parse ``argv``; unset options take the preset's value, else the original's default.

    ``extra_presets`` (``{preset: {option: value}}``) adjusts a preset for one recipe.
    """
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "tiny" if args.model_name_or_path is None else "none"
    extra = (extra_presets or {}).get(args.preset, {})
    defaults = {**BASE_DEFAULTS, **PRESETS[args.preset], **extra}
    args.preset_lora = defaults.pop("lora", dict(ORIGINAL_LORA))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.train_tokens == 0:
        args.train_tokens = None
    if args.preset == "tiny" and args.model_name_or_path is not None:
        parser.error("--preset tiny builds its own model; leave out --model_name_or_path")
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    ):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    if args.block_size is not None and args.block_size < 2:
        parser.error("--block_size must be >= 2")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error("--max_train_steps must be >= 1")
    if args.tokens_per_param < 0 or (args.train_tokens is not None and args.train_tokens < 0):
        parser.error("--train_tokens and --tokens_per_param must be >= 0")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.calibration_batches < 1:
        parser.error("--calibration_batches must be >= 1")
    return args


# ---------------------------------------------------------------------- fault model, LoRA


def bitflip_settings(args) -> tuple[BitflipConfig, dict, bool]:
    """``(BitflipConfig, {"r", "lora_alpha"}, use_lora)`` from ``--transform_cfg`` and flags.

    Precedence: command-line flags, then the TOML, then the preset / the original's defaults.
    Without a TOML the flips are the original release's (p = 2^-16, zero-out 30 / 1.25) and
    LoRA is r = 32, alpha = 32 (the tiny preset: r = 16).
    """
    if args.transform_cfg:
        cfg, lora, use_lora = read_original_toml(args.transform_cfg)
        values = {k: getattr(cfg, k) for k in FLIP_KEYS}
    else:
        lora, use_lora = dict(getattr(args, "preset_lora", ORIGINAL_LORA)), True
        values = dict(ORIGINAL_FLIPS)
    for key in FLIP_KEYS:
        if hasattr(args, key):  # given on the command line (default is SUPPRESS)
            values[key] = getattr(args, key)
    if args.lora_rank is not None:
        lora["r"] = args.lora_rank
    if args.lora_alpha is not None:
        lora["lora_alpha"] = args.lora_alpha
    if args.full_finetune:
        use_lora = False
    config = BitflipConfig(**values, seed=args.bitflip_seed, compat_snap=args.compat_snap)
    return config, lora, use_lora


def calibrate(args, model, flips: BitflipConfig, train_blocks) -> BitflipConfig:
    """``flips`` with thresholds calibrated on ``model`` (``--calibrate_zero_out``), else
    ``flips``.  Calibrates on the first ``--calibration_batches`` training batches with flips
    off, before any adapter is added; every process computes the same thresholds."""
    if not args.calibrate_zero_out:
        return flips
    from peft_bitflip.calibration import calibrate_zero_out

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    n = min(len(train_blocks), args.calibration_batches * args.per_device_train_batch_size)
    cfg = calibrate_zero_out(
        model,
        torch.tensor(train_blocks.select(range(n))["input_ids"]),
        margin=args.calibrate_zero_out,
        base=flips,
        batch_size=args.per_device_train_batch_size,
    )
    ts = [r for r in (cfg.layer_name_to_config or {}).values() if r]
    x_t = [r["x_zero_out_t"] for r in ts]
    w_t = [r["w_zero_out_t"] for r in ts]
    print(
        f"calibrated zero-out (margin {args.calibrate_zero_out:g}, {n} blocks): x thresholds "
        f"{min(x_t):.4g}..{max(x_t):.4g}, W thresholds {min(w_t):.4g}..{max(w_t):.4g}"
    )
    return cfg


def target_modules(args):
    spec = args.lora_target_modules.strip()
    if spec in ("all-linear", "all_linear"):
        return "all-linear"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--lora_target_modules is empty")
    return names


def lora_config(args, flips: BitflipConfig, lora: dict):
    """The ``BitflipLoraConfig`` of a run (``lora_dropout`` is 0: the formulation has none)."""
    alpha = lora["lora_alpha"]
    return peft_bitflip.BitflipLoraConfig.from_bitflip_config(
        flips,
        r=int(lora["r"]),
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=0.0,
        target_modules=target_modules(args),
        modules_to_save=[m.strip() for m in args.modules_to_save.split(",") if m.strip()] or None,
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------- data, model, tokenizer


def load_data(args, *, text_only: bool):
    """``train`` / ``validation`` splits from ``--dataset_name``, ``--train_file`` or the
    embedded corpus; ``text_only`` reduces them to one ``text`` column."""
    kwargs = dict(
        train_file=args.train_file,
        validation_file=args.validation_file,
        validation_split_percentage=args.validation_split_percentage,
        txt_sample_by=args.txt_sample_by,
    )
    if text_only:
        kwargs["text_column"] = args.text_column
    load = data.load_text_datasets if text_only else data.load_raw_datasets
    return load(args.dataset_name, args.dataset_config_name, **kwargs)


def load_tokenizer(args, tokenizer_texts=None):
    """The model's tokenizer, or (no model) a BPE tokenizer trained on ``tokenizer_texts``."""
    from transformers import AutoTokenizer

    name = args.tokenizer_name or args.model_name_or_path
    if name is not None:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok
    if tokenizer_texts is None:
        raise ValueError("a locally trained tokenizer needs texts")
    return data.train_tokenizer(
        tokenizer_texts, vocab_size=args.tokenizer_vocab_size, model_max_length=1024
    )


def load_model(args, tokenizer):
    """``AutoModelForCausalLM.from_pretrained`` or a randomly initialised tiny Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if args.model_name_or_path is None:
        cfg = data.tiny_llama_config(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(cfg)
    dtype = args.torch_dtype if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    config = AutoConfig.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    saved = getattr(config, "quantization_config", None)
    if isinstance(saved, dict) and saved.get("quant_method") == "bitflip":
        # a bit-flip checkpoint (e.g. a merged model of an earlier run): load it clean; this
        # run's fault model (--transform_cfg / flags) is applied afterwards
        print(f"{args.model_name_or_path} carries bit-flip settings; this run's replace them")
        kwargs["config"] = peft_bitflip.load_config_with(
            args.model_name_or_path, None, trust_remote_code=args.trust_remote_code
        )
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def resolve_block_size(args, tokenizer, model) -> int:
    """``--block_size`` (default 1024) capped by the tokenizer's and model's maxima."""
    limits = [1024 if args.block_size is None else args.block_size]
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 10**9:
        limits.append(mml)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        limits.append(mpe)
    block = min(limits)
    if args.block_size is not None and block < args.block_size:
        print(f"block_size {args.block_size} exceeds the model's maximum; using {block}")
    return block


# ---------------------------------------------------------------------- trainer pieces


def one_gpu_per_process(training_args) -> None:
    """Keep one process on one GPU: no ``torch.nn.DataParallel``.

    With several GPUs visible and a single process, Trainer would replicate the model with
    ``nn.DataParallel``; the bit-flip layers keep their call counters and activation-
    checkpointing state on the module, which replicas do not share correctly.  Use
    ``accelerate launch`` / ``torchrun`` (DDP) for several GPUs.
    """
    n_gpu = training_args.n_gpu  # resolves the devices
    if n_gpu > 1 and training_args.world_size == 1:
        print(
            f"{n_gpu} GPUs visible to one process: training on one (nn.DataParallel is not "
            "supported); run `accelerate launch --num_processes N ...` to use all of them"
        )
        training_args._n_gpu = 1


def main_process_first(training_args):
    """Context: the main process prepares (and caches) data first, the others follow."""
    return training_args.main_process_first(desc="data preparation")


def plan_steps(args, *, num_params: int, block_size: int, world: int) -> dict:
    """Optimizer steps of the run and the budget they come from (see token_budget_steps)."""
    tps = data.tokens_per_step(
        args.per_device_train_batch_size, block_size, args.gradient_accumulation_steps, world
    )
    if args.max_train_steps is None and args.train_tokens is None and args.tokens_per_param == 0:
        return {"max_steps": -1, "tokens_per_step": tps, "budget_tokens": None, "source": "epochs"}
    steps = data.token_budget_steps(
        per_device_batch_size=args.per_device_train_batch_size,
        block_size=block_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=world,
        num_params=num_params,
        tokens_per_param=args.tokens_per_param,
        train_tokens=args.train_tokens,
        max_train_steps=args.max_train_steps,
    )
    if args.max_train_steps is not None:
        source, budget = "max_train_steps", None
    elif args.train_tokens is not None:
        source, budget = "train_tokens", args.train_tokens
    else:
        source = f"{args.tokens_per_param:g} x {num_params} parameters"
        budget = data.budget_tokens(num_params, args.tokens_per_param)
    return {"max_steps": steps, "tokens_per_step": tps, "budget_tokens": budget, "source": source}


def training_kwargs(args, max_steps: int = -1) -> dict:
    """Keyword arguments shared by ``TrainingArguments`` and TRL's ``SFTConfig``.

    The recipes build the arguments first (they know the number of processes,
    ``.world_size``), then set ``.max_steps`` from the token budget.
    """
    eval_steps = args.eval_steps if args.eval_steps and args.eval_batches != 0 else None
    return dict(
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        num_train_epochs=args.num_train_epochs,
        max_steps=max_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.num_warmup_steps,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        bf16=args.bf16,
        full_determinism=args.full_determinism,
        **run_kwargs(args, eval_steps=eval_steps),
    )


def run_kwargs(args, *, eval_steps: int | None) -> dict:
    """The ``TrainingArguments`` every recipe sets alike: output, logging, evaluation and
    checkpoint cadence, activation checkpointing, reporting and the device.  Reads
    ``output_dir``, ``logging_steps``, ``save_steps``, ``gradient_checkpointing``,
    ``report_to``, ``disable_tqdm`` and (if present) ``run_name`` from ``args``."""
    use_cpu = not torch.cuda.is_available()
    run_name = getattr(args, "run_name", None)
    return dict(
        output_dir=args.output_dir,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        **checkpointing_kwargs(args.gradient_checkpointing),
        use_cpu=use_cpu,
        report_to=[r.strip() for r in args.report_to.split(",") if r.strip()] or "none",
        run_name=run_name or os.path.basename(os.path.normpath(args.output_dir)),
        disable_tqdm=args.disable_tqdm or None,
        dataloader_pin_memory=not use_cpu,
    )


def checkpointing_kwargs(enabled: bool) -> dict:
    """Activation checkpointing on/off, non-reentrant (the only variant the flip layers replay
    exactly), under transformers' current name (``gradient_checkpointing`` before 5.x)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {
        f"{prefix}_checkpointing": bool(enabled),
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False},
    }


def attach_bitflip_callback(trainer, args) -> bool:
    """Add ``peft_bitflip.callback``'s ``BitflipCallback`` (flip-probability warm-up over
    ``--bitflip_warmup_steps`` optimizer steps, flip statistics in the logs, flip counters in
    checkpoints) to ``trainer``.  Returns False when the module is not installed (then
    ``--bitflip_warmup_steps`` is an error).
    """
    try:
        from peft_bitflip import callback as cb
    except ImportError:
        if args.bitflip_warmup_steps:
            raise RuntimeError(
                "--bitflip_warmup_steps needs peft_bitflip.callback.BitflipCallback"
            ) from None
        return False
    kwargs = {}
    if args.bitflip_warmup_steps:
        kwargs["warmup_steps"] = args.bitflip_warmup_steps
    if hasattr(cb, "add_bitflip_callback"):  # also routes the statistics into trainer.log
        cb.add_bitflip_callback(trainer, **kwargs)
    else:
        trainer.add_callback(cb.BitflipCallback(**kwargs))
    return True


def print_setup(args, *, num_params, trainable, flips, lora, use_lora, plan, world, data_info):
    """One block of text describing the run (main process only)."""
    print(
        f"model: {args.model_name_or_path or 'tiny Llama (random init)'}, {num_params:,} "
        f"parameters, {trainable:,} trainable ({100 * trainable / num_params:.2f} %)\n"
        f"flips: {flips}\nLoRA: {lora if use_lora else 'off (full fine-tune under flips)'}\n"
        f"data: {data_info}; {plan['tokens_per_step']} tokens per optimizer step "
        f"({world} process(es)); steps: {plan['max_steps']} ({plan['source']})"
    )


def first_batches(dataset, args, world: int):
    """The first ``--eval_batches`` batches per process of ``dataset`` (all if negative,
    ``None`` if 0: no evaluation)."""
    if args.eval_batches == 0:
        return None
    if args.eval_batches < 0:
        return dataset
    n = min(len(dataset), args.eval_batches * args.per_device_eval_batch_size * world)
    return dataset.select(range(n))


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def evaluate(trainer, *, clean: bool = False, prefix: str = "eval") -> dict:
    """Mean loss on the trainer's eval set (flips on, or off with ``clean``) and perplexity.

    As in the original, the loss is the mean over batches of each batch's mean token loss
    (Trainer weights each batch by its number of sequences).
    """
    ctx = peft_bitflip.disable_bitflips(trainer.model) if clean else contextlib.nullcontext()
    with ctx:
        metrics = trainer.evaluate(metric_key_prefix=prefix)
    loss = metrics[f"{prefix}_loss"]
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": perplexity(loss)}


def train_and_evaluate(trainer, args, plan: dict, results: dict) -> dict:
    """Optional evaluation before training, training, evaluation flipped and clean."""
    if args.eval_before_training and args.eval_batches != 0:
        results["initial_perplexity"] = evaluate(trainer, prefix="initial")["initial_perplexity"]
    train_out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    steps = trainer.state.global_step
    seen = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    results.update(
        train_loss=train_out.training_loss,
        train_steps=steps,
        # tokens actually seen (non-padding) when the trainer counts them, else the capacity
        train_tokens=int(seen) if seen else steps * plan["tokens_per_step"],
        train_runtime=train_out.metrics.get("train_runtime"),
        tokens_per_step=plan["tokens_per_step"],
        budget_tokens=plan["budget_tokens"],
        budget_source=plan["source"],
    )
    if args.eval_batches != 0:
        flipped = evaluate(trainer)
        clean = evaluate(trainer, clean=True, prefix="clean")
        results.update(
            eval_loss=flipped["eval_loss"],
            perplexity=flipped["eval_perplexity"],
            clean_eval_loss=clean["clean_loss"],
            clean_perplexity=clean["clean_perplexity"],
            eval_samples=len(trainer.eval_dataset),
        )
    return results


def finish(trainer, tokenizer, args, results: dict, *, use_lora: bool) -> dict:
    """Merge the adapter, save model + tokenizer + ``all_results.json``, push, print a summary.

    The merged model keeps its bit-flip layers and its ``BitflipConfig`` in ``config.json``
    (``quantization_config.quant_method == "bitflip"``), so ``AutoModelForCausalLM``
    reloads it with flips on (after ``import peft_bitflip``).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = model.merge_and_unload() if use_lora else model
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        merged.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        check_saved_config(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
        if args.push_to_hub:
            merged.push_to_hub(args.hub_model_id, token=args.hub_token)
            tokenizer.push_to_hub(args.hub_model_id, token=args.hub_token)
        print_summary(results, args.output_dir)
    trainer.accelerator.wait_for_everyone()
    return results


def check_saved_config(path: str) -> None:
    """Fail loudly if a saved merged model would reload without its flips."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "bitflip":
        raise RuntimeError(
            f"{path}/config.json carries no bit-flip quantization_config; the merged model "
            "would reload without flips"
        )


def print_summary(results: dict, output_dir: str) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = [
        "train_steps",
        "train_tokens",
        "train_loss",
        "eval_loss",
        "perplexity",
        "clean_perplexity",
        "initial_perplexity",
        "train_runtime",
    ]
    print("\n=== bit-flip fine-tune summary ===")
    for k in keys:
        if k in results:
            print(f"  {k:<20} {fmt(results[k])}")
    print(f"  saved to            {output_dir}")
