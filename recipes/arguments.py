"""Command line of the recipes: ``HfArgumentParser`` over ``ModelArguments``,
``DataArguments``, ``BitflipArguments`` and ``TrainingArguments`` (``SFTConfig`` for TRL), as
transformers' ``run_clm.py`` and TRL's ``sft.py``: every Trainer flag works (``--optim``,
``--lr_scheduler_kwargs``, ``--eval_strategy``, ``--torch_compile``, ``--deepspeed``, ...).
``pretrain_clm.py`` parses ``DataSourceArguments``, ``PretrainArguments`` and
``TrainingArguments`` with the same helpers.

Presets (``--preset tiny``, the offline default) change defaults only: a flag on the command
line wins.  Old spellings of renamed flags still parse for one release, with a warning naming
the new flag (:data:`DEPRECATED_FLAGS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

from peft_bitflip import data, flavors
from peft_bitflip.bursts import BURST_FIELDS
from peft_bitflip.cli import DeprecatedAlias
from peft_bitflip.config import P_BITS_KEYS, RULE_KEYS

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
class DataSourceArguments:
    """Where the text comes from (default: the embedded offline pydoc corpus)."""

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
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes for tokenization"}
    )


@dataclass
class DataArguments(DataSourceArguments):
    """The data (default: the embedded offline pydoc corpus) and the token budget."""

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
    x_p_bits: str | None = field(
        default=None,
        metadata={
            "help": "input flip probability per bit position, overriding its group's "
            "(0 = least significant bit, 'sign'; e.g. 15=1e-3,sign=1e-4)"
        },
    )
    w_p_bits: str | None = field(
        default=None,
        metadata={"help": "weight flip probability per bit position (as --x_p_bits)"},
    )
    x_burst_rate: str | None = field(
        default=None, metadata={"help": "burst fault events per input element and call"}
    )
    w_burst_rate: str | None = field(
        default=None, metadata={"help": "burst fault events per weight element and call"}
    )
    burst_length: str | None = field(
        default=None, metadata={"help": "bits per burst: k (2..32) or k:p,k:p,... (default 2)"}
    )
    burst_field: str | None = field(
        default=None,
        metadata={"help": "where a burst may lie: any, exp or frac bits", "choices": BURST_FIELDS},
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
            "help": "faults in the training step: site=p[,site.exp=p,site.frac=p,site.sign=p,"
            "site.bit:N=p,site.bit:N-M=p,site.t=x] with site in grad_x, grad_w, exp_avg, "
            "exp_avg_sq, param (docs/fault-model.md), e.g. 'exp_avg_sq=1e-6' or "
            "'exp_avg_sq.bit:30=1e-6'; seeded by --bitflip_seed",
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
        """The inline fault-model flags given, parsed: ``{key: float | dict | None}``."""
        from peft_bitflip.cli import (
            BURST_FLAGS,
            parse_burst_length,
            parse_p_bits,
            parse_probability,
            parse_threshold,
        )

        out = {}
        for key in RULE_KEYS + BURST_FLAGS + P_BITS_KEYS:
            text = getattr(self, key)
            if text is None:
                continue
            parse = parse_threshold if key.endswith("_t") else parse_probability
            parse = {"burst_length": parse_burst_length, "burst_field": str}.get(key, parse)
            if key in P_BITS_KEYS:
                parse = parse_p_bits
            try:
                out[key] = parse(str(text))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--{key} {text!r}: {e}") from None
        return out


@dataclass
class PretrainArguments:
    """From-scratch pretraining (``pretrain_clm.py``): the aixsim flavor, tokenizer, streaming,
    token budget, fault model and the evaluation at the end; presets: tiny offline, else the
    original's 60M settings."""

    flavor: str | None = field(
        default=None,
        metadata={
            "help": "aixsim flavor (tiny: ours, for CPU); default tiny offline, else 60M",
            "choices": list(flavors.FLAVORS),
        },
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per block (2048; tiny 128)"}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "HF tokenizer (e.g. HuggingFaceTB/cosmo2-tokenizer); default: a byte-level "
            "BPE trained on the first training documents"
        },
    )
    tokenizer_vocab_size: int | None = field(
        default=None, metadata={"help": "vocabulary of the BPE trained locally (16384; tiny 1024)"}
    )
    tokenizer_train_docs: int = field(
        default=20_000, metadata={"help": "documents the local BPE is trained on"}
    )
    streaming: bool | None = field(
        default=None,
        metadata={"help": "stream the data set (default: on with --dataset_name, else off)"},
    )
    validation_docs: int = field(
        default=2000,
        metadata={"help": "streaming without a validation split: the first N documents held out"},
    )
    token_num_scale: float | None = field(
        default=None, metadata={"help": "token budget in tokens per non-embedding parameter (22)"}
    )
    train_tokens: int | None = field(
        default=None, metadata={"help": "token budget in tokens (overrides); --max_steps wins"}
    )
    num_processes: int = field(
        default=1,
        metadata={"help": "generate-cfg: processes the run will use (train uses the actual ones)"},
    )
    eval_blocks: int | None = field(
        default=None, metadata={"help": "validation blocks evaluated (64; tiny 32)"}
    )
    bitflip: str = field(
        default="original",
        metadata={
            "help": "'original' (p = 2^-16 for x and w, zero-out 30 / 1.25), 'none' (clean "
            "baseline), a BitflipConfig JSON (or a model's config.json) or an original meta YAML"
        },
    )
    bitflip_seed: int = field(default=0, metadata={"help": "seed of the flip streams"})
    flip_lm_head: bool = field(
        default=False,
        metadata={"help": "flip the output head too, as the original pretraining did"},
    )
    eval_bitflip: str | None = field(
        default=None,
        metadata={
            "help": "fault model of the flipped evaluation (default: the run's, else original)"
        },
    )
    eval_seeds: str = field(
        default="0", metadata={"help": "comma-separated flip seeds of the flipped evaluation"}
    )
    config: str | None = field(
        default=None, metadata={"help": "YAML / JSON written by generate-cfg; flags override it"}
    )
    save_path: str | None = field(
        default=None, metadata={"help": "generate-cfg: where to write the config"}
    )


def hf_parser(dataclass_types, description: str | None, deprecated: dict):
    """``HfArgumentParser`` over ``dataclass_types`` with bare ``bool | None`` flags and the
    ``deprecated`` aliases (``{old: new}``, those whose new flag exists)."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    parser = HfArgumentParser(dataclass_types, description=description)
    for action in parser._actions:  # `bool | None` fields (--disable_tqdm, ...) as bare flags
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    by_dest = {a.dest: a for a in parser._actions}
    for old, new in deprecated.items():
        target = by_dest.get(new.lstrip("-"))
        if target is None:
            continue
        parser.add_argument(
            old,
            dest=target.dest,
            type=target.type,
            new_flag=new,
            action=DeprecatedAlias,
        )
    return parser


def build_parser(training_cls=None, description: str | None = None):
    """``HfArgumentParser`` over the recipe's four dataclasses (``training_cls``:
    ``TrainingArguments`` or TRL's ``SFTConfig``), with the deprecated aliases."""
    from transformers import TrainingArguments

    training_cls = training_cls or TrainingArguments
    has_code_flag = "trust_remote_code" in {f.name for f in dataclasses.fields(training_cls)}
    model_cls = ModelArguments if has_code_flag else ModelArgumentsWithRemoteCode
    parser = hf_parser(
        (model_cls, DataArguments, BitflipArguments, training_cls), description, DEPRECATED_FLAGS
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
    step_cadence(training_args, argv)
    if training_args.eval_strategy != _strategy("no") and data_args.eval_batches == 0:
        parser.error("--eval_strategy needs validation batches; --eval_batches is 0")


def step_cadence(training_args, argv) -> None:
    """The recipes' old ``--eval_steps N`` / ``--save_steps N`` without a strategy: every N
    steps (``--save_steps 0``: no checkpoints)."""
    given = {a.split("=")[0] for a in argv}
    for kind in ("eval", "save"):
        if f"--{kind}_steps" in given and f"--{kind}_strategy" not in given:
            steps = getattr(training_args, f"{kind}_steps")
            if steps == 0:
                setattr(training_args, f"{kind}_strategy", _strategy("no", kind))
            else:
                setattr(training_args, f"{kind}_strategy", _strategy("steps", kind))


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
