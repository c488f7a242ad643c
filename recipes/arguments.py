"""Command line of the fine-tuning recipes: ``HfArgumentParser`` over ``ModelArguments``,
``DataArguments``, ``BitflipArguments`` and ``TrainingArguments`` (``SFTConfig`` for TRL), as
transformers' ``run_clm.py`` and TRL's ``sft.py``: every Trainer flag works (``--optim``,
``--lr_scheduler_kwargs``, ``--eval_strategy``, ``--torch_compile``, ``--deepspeed``, ...).

Presets (``--preset tiny``, the offline default) change defaults only: a flag on the command
line wins.  Old spellings of renamed flags still parse for one release, with a warning naming
the new flag (:data:`DEPRECATED_FLAGS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass, field

from peft_bitflip import data
from peft_bitflip.config import RULE_KEYS

TINY_VOCAB_SIZE = 1024
# The original script's LORA_CFG; the tiny preset's adapter is r = 16, alpha = 32.
ORIGINAL_LORA = {"r": 32, "lora_alpha": 32}

# Old flag -> the Trainer's (or TRL's) name; parsed into the new field with a warning.
DEPRECATED_FLAGS = {
    "--max_train_steps": "--max_steps",
    "--num_warmup_steps": "--warmup_steps",
    "--lora_rank": "--lora_r",
    "--modules_to_save": "--lora_modules_to_save",
}

# Defaults of the original run_clm_no_trainer.py that differ from TrainingArguments' own: no
# checkpoints unless asked for (--save_strategy steps --save_steps N).
BASE_DEFAULTS = {"logging_steps": 50, "logging_first_step": True, "save_strategy": "no"}
# The offline embedded default: a tiny Llama trained from random initialisation on the pydoc
# corpus, 128 optimizer steps of 8 x 64 tokens (64 of 8 x 128 for SFT).
PRESETS = {
    "none": {},
    "tiny": {
        "block_size": 64,
        "learning_rate": 3e-3,
        "train_tokens": 128 * 8 * 64,
        "eval_batches": 16,
        "logging_steps": 16,
        "lora": {"r": 16, "lora_alpha": 32},  # used when no --transform_cfg gives [lora]
        "lora_modules_to_save": "embed_tokens,lm_head",
    },
}


def default_output_dir(name: str) -> str:
    """Where a run writes when ``--output_dir`` is not given: a folder of the system's
    temporary directory (never the current directory, so runs leave no ``output/`` in a
    checkout)."""
    return os.path.join(tempfile.gettempdir(), "peft-bitflip-recipes", name)


@dataclass
class ModelArguments:
    """The model and tokenizer."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "defaults for a setting: 'tiny' = offline tiny Llama (random init) + "
            "tokenizer trained locally; default: tiny without --model_name_or_path, else none",
            "choices": sorted(PRESETS),
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "HF model id or local path"}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "default: the model's tokenizer"}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the model is loaded in (the original loaded float32)",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    tokenizer_vocab_size: int = field(
        default=TINY_VOCAB_SIZE,
        metadata={"help": "vocabulary of the tokenizer trained locally (tiny model only)"},
    )


@dataclass
class ModelArgumentsWithRemoteCode(ModelArguments):
    """``ModelArguments`` plus ``--trust_remote_code`` (for training classes without it; TRL's
    ``SFTConfig`` has its own)."""

    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's code"})


def trust_remote_code(model_args, training_args) -> bool:
    """``--trust_remote_code``, wherever the parser put it."""
    return bool(
        getattr(model_args, "trust_remote_code", False)
        or getattr(training_args, "trust_remote_code", False)
    )


@dataclass
class DataArguments:
    """The data (default: the embedded offline pydoc corpus) and the token budget."""

    dataset_name: str | None = field(default=None, metadata={"help": "datasets.load_dataset name"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "its config"})
    train_file: str | None = field(
        default=None, metadata={"help": ".txt, .json, .jsonl or .csv file"}
    )
    validation_file: str | None = field(default=None, metadata={"help": "same formats"})
    validation_split_percentage: float = field(
        default=5, metadata={"help": "%% of train used as validation without a validation split"}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "default: 'text', else the first column"}
    )
    txt_sample_by: str = field(
        default="paragraph",
        metadata={
            "help": ".txt files: one document per blank-line paragraph, per file or per line",
            "choices": list(data.TXT_SAMPLE_BY),
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "tokens per training sequence; default min(1024, model / tokenizer maximum)"
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes for tokenization"}
    )
    train_tokens: int | None = field(
        default=None,
        metadata={"help": "token budget (tokens); 0 = use --tokens_per_param; --max_steps wins"},
    )
    tokens_per_param: float = field(
        default=0.01,
        metadata={
            "help": "token budget as a multiple of the model's parameter count (0.01 = 1%%, the "
            "original); 0 = no budget, train --num_train_epochs"
        },
    )
    eval_batches: int = field(
        default=64,
        metadata={
            "help": "validation batches per process (flips on); -1 = the whole split, 0 = no eval"
        },
    )
    eval_before_training: bool = field(
        default=False, metadata={"help": "also measure the perplexity before training"}
    )


@dataclass
class BitflipArguments:
    """The fault model (default: the original's transform_cfg.toml, p = 2^-16, zero-out
    |x| >= 30, |w| >= 1.25) and the LoRA adapter."""

    transform_cfg: str | None = field(
        default=None,
        metadata={
            "help": "the original's transform_cfg.toml (use_lora, [fc] flips, [lora] r / "
            "lora_alpha) or its pretraining meta YAML (flips only); inline flags override it"
        },
    )
    x_p_exp: str | None = field(
        default=None, metadata={"help": "input flip probability per sign/exponent bit (2^-16)"}
    )
    x_p_frac: str | None = field(
        default=None, metadata={"help": "input flip probability per mantissa bit"}
    )
    x_zero_out_t: str | None = field(
        default=None, metadata={"help": "input zero-out threshold (|x| >= t -> 0; 'none' = off)"}
    )
    w_p_exp: str | None = field(
        default=None, metadata={"help": "weight flip probability per sign/exponent bit"}
    )
    w_p_frac: str | None = field(
        default=None, metadata={"help": "weight flip probability per mantissa bit"}
    )
    w_zero_out_t: str | None = field(
        default=None, metadata={"help": "weight zero-out threshold ('none' = off)"}
    )
    bitflip_seed: int = field(default=0, metadata={"help": "seed of the flip streams"})
    compat_snap: bool = field(
        default=False, metadata={"help": "round p down to a power of two like the original kernel"}
    )
    calibrate_zero_out: float | None = field(
        default=None,
        metadata={
            "help": "replace the zero-out thresholds by MARGIN x each layer's own maximum |x| "
            "(first --calibration_batches training batches, flips off) and |w| (e.g. 2)",
            "metavar": "MARGIN",
        },
    )
    calibration_batches: int = field(
        default=8, metadata={"help": "batches for --calibrate_zero_out"}
    )
    train_faults: str | None = field(
        default=None,
        metadata={
            "help": "faults in the training step: site=p[,site.exp=p,site.frac=p,site.t=x] with "
            "site in grad_x, grad_w, exp_avg, exp_avg_sq, param (docs/fault-model.md), e.g. "
            "'exp_avg_sq=1e-6'; seeded by --bitflip_seed",
            "metavar": "SITES",
        },
    )
    train_faults_modules: str | None = field(
        default=None,
        metadata={"help": "regex on module names the training faults are confined to"},
    )
    bitflip_warmup_steps: int = field(
        default=0,
        metadata={"help": "ramp the flip probabilities up over this many optimizer steps"},
    )
    lora_r: int | None = field(
        default=None, metadata={"help": "LoRA rank (default: TOML, else 32; tiny: 16)"}
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default: TOML, else 32)"}
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "comma-separated module names, or 'all-linear' (every linear layer except "
            "the output head, as the original)"
        },
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated modules trained in full besides LoRA (e.g. lm_head,"
            "embed_tokens); the tiny preset trains the random model's embeddings and head"
        },
    )
    full_finetune: bool = field(
        default=False,
        metadata={"help": "no LoRA: train every parameter under flips (TOML use_lora = false)"},
    )

    def training_faults(self):
        """``--train_faults`` as :class:`peft_bitflip.training_faults.TrainingFaults`, or None."""
        if not self.train_faults:
            return None
        from peft_bitflip.training_faults import parse_training_faults

        try:
            return parse_training_faults(
                self.train_faults, seed=self.bitflip_seed, modules=self.train_faults_modules
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"--train_faults {self.train_faults!r}: {e}") from None

    def flip_values(self) -> dict:
        """The inline fault-model flags given, parsed: ``{key: float | None}``."""
        from peft_bitflip.cli import parse_probability, parse_threshold

        out = {}
        for key in RULE_KEYS:
            text = getattr(self, key)
            if text is None:
                continue
            parse = parse_threshold if key.endswith("_t") else parse_probability
            try:
                out[key] = parse(str(text))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--{key} {text!r}: {e}") from None
        return out


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: stores into the new field and warns, naming the new flag."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated and will be removed in the next release; "
            f"use {self.new_flag}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


def build_parser(training_cls=None, description: str | None = None):
    """``HfArgumentParser`` over the recipe's four dataclasses (``training_cls``:
    ``TrainingArguments`` or TRL's ``SFTConfig``), with the deprecated aliases."""
    from transformers import HfArgumentParser, TrainingArguments

    training_cls = training_cls or TrainingArguments
    has_code_flag = "trust_remote_code" in {f.name for f in dataclasses.fields(training_cls)}
    model_cls = ModelArguments if has_code_flag else ModelArgumentsWithRemoteCode
    parser = HfArgumentParser(
        (model_cls, DataArguments, BitflipArguments, training_cls),
        description=description,
    )
    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:  # `bool | None` fields (--disable_tqdm, ...) as bare flags
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    by_dest = {a.dest: a for a in parser._actions}
    for old, new in DEPRECATED_FLAGS.items():
        target = by_dest[new.lstrip("-")]
        parser.add_argument(
            old,
            dest=target.dest,
            type=target.type,
            new_flag=new,
            action=_DeprecatedFlag,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    parser.set_defaults(output_dir=None, **BASE_DEFAULTS)
    return parser


def parse(parser, argv=None, *, output_name: str, extra_presets: dict | None = None):
    """``(model_args, data_args, bitflip_args, training_args, preset_lora)``.

    Unset options take the preset's value (``tiny`` without ``--model_name_or_path``), else
    the original's defaults.  ``extra_presets`` (``{preset: {option: value}}``) adjusts a
    preset for one recipe.  Bad values end with ``parser.error`` naming the flag.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    preset = first.preset or ("tiny" if first.model_name_or_path is None else "none")
    if preset == "tiny" and first.model_name_or_path is not None:
        parser.error("--preset tiny builds its own model; leave out --model_name_or_path")
    values = {**PRESETS[preset], **(extra_presets or {}).get(preset, {})}
    preset_lora = values.pop("lora", dict(ORIGINAL_LORA))
    values["output_dir"] = default_output_dir(output_name)
    known = {a.dest for a in parser._actions}
    import torch

    if not torch.cuda.is_available():  # CPU: bf16 autocast allowed, nothing to pin memory to
        values.update(use_cpu=True, dataloader_pin_memory=False)
    parser.set_defaults(**{k: v for k, v in values.items() if k in known})
    try:
        model_args, data_args, flip_args, training_args = parser.parse_args_into_dataclasses(
            argv, look_for_args_file=False
        )
    except ValueError as e:  # TrainingArguments' own checks
        parser.error(str(e))
    model_args.preset = preset
    _check(parser, model_args, data_args, flip_args, training_args, argv)
    return model_args, data_args, flip_args, training_args, preset_lora


def _check(parser, model_args, data_args, flip_args, training_args, argv) -> None:
    if data_args.train_tokens == 0:
        data_args.train_tokens = None
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(training_args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(training_args, key)}")
    if training_args.gradient_accumulation_steps < 1:
        parser.error(
            "--gradient_accumulation_steps must be >= 1, got "
            f"{training_args.gradient_accumulation_steps}"
        )
    if data_args.block_size is not None and data_args.block_size < 2:
        parser.error(f"--block_size must be >= 2, got {data_args.block_size}")
    if data_args.tokens_per_param < 0 or (data_args.train_tokens or 0) < 0:
        parser.error("--train_tokens and --tokens_per_param must be >= 0")
    if flip_args.calibration_batches < 1:
        parser.error(f"--calibration_batches must be >= 1, got {flip_args.calibration_batches}")
    if flip_args.calibrate_zero_out is not None:
        from peft_bitflip.cli import parse_margin

        try:
            parse_margin(str(flip_args.calibrate_zero_out))
        except argparse.ArgumentTypeError as e:
            parser.error(f"--calibrate_zero_out: {e}")
    try:
        flip_args.flip_values()
        flip_args.training_faults()
    except ValueError as e:
        parser.error(str(e))
    for kind in ("eval", "save"):  # the recipes' old --{eval,save}_steps N alone: every N steps
        given = {a.split("=")[0] for a in argv}
        if f"--{kind}_steps" in given and f"--{kind}_strategy" not in given:
            steps = getattr(training_args, f"{kind}_steps")
            if kind == "save" and steps == 0:
                continue  # the old "--save_steps 0": no checkpoints (the default)
            setattr(training_args, f"{kind}_strategy", _strategy("steps", kind))
    if training_args.eval_strategy != _strategy("no") and data_args.eval_batches == 0:
        parser.error("--eval_strategy needs validation batches; --eval_batches is 0")


def _strategy(name: str, kind: str = "eval"):
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    return (SaveStrategy if kind == "save" else IntervalStrategy)(name)


def non_reentrant_checkpointing(training_args) -> None:
    """Activation checkpointing, when on, non-reentrant: the only variant the flip layers
    replay exactly (a user's own ``--gradient_checkpointing_kwargs`` is kept)."""
    names = {f.name for f in dataclasses.fields(training_args)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    if getattr(training_args, f"{prefix}_checkpointing", False):
        kwargs = getattr(training_args, f"{prefix}_checkpointing_kwargs", None) or {}
        kwargs.setdefault("use_reentrant", False)
        setattr(training_args, f"{prefix}_checkpointing_kwargs", kwargs)
