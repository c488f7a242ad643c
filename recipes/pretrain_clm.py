"""From-scratch bit-flip-aware pretraining of small causal LMs with the HF Trainer.

Re-creates the original's torchtitan pretraining (NewComputeBench ``llm-bitflip/pretrain``) on
the Hugging Face stack: an "aixsim" Llama flavor (``peft_bitflip.flavors``) initialised at
random, documents tokenized with BOS + EOS and packed into blocks of ``--seq_len`` tokens,
AdamW (0.9, 0.95), weight decay 0.1, linear warm-up over 20 % of the steps then linear decay
to 0, gradient clipping at 1.0, bf16 autocast on GPUs, and a token budget of
``--token_num_scale`` (22) x the non-embedding parameters, turned into optimizer steps for the
actual number of processes and gradient accumulation.  Every linear layer flips bits as the
``--bitflip`` setting says (default: the original's ``fc-only-w-a-exp-frac.yaml``, p = 2^-16
for x and w, zero-out |x| >= 30, |w| >= 1.25); ``--bitflip none`` trains the clean baseline.

Two subcommands, as the original's ``run.py``:

* ``generate-cfg``: prints parameters, tokens, effective batch, steps and warm-up, and writes
  a YAML file of every option that ``train --config`` consumes;
* ``train`` (the default): trains, checkpoints every ``--save_steps`` (flip counters and the
  flip-stream state included, so ``--resume_from_checkpoint latest`` continues exactly),
  measures validation perplexity clean and under flips, and saves the final model as a HF
  checkpoint whose ``config.json`` carries the BitflipConfig.

Offline default (no arguments): the ``tiny`` flavor on Python's own documentation with a
tokenizer trained locally; a couple of minutes on two CPU cores::

    python recipes/pretrain_clm.py
    python recipes/pretrain_clm.py generate-cfg --flavor 60M --num_processes 2 \\
        --per_device_train_batch_size 48 --tokenizer_name HuggingFaceTB/cosmo2-tokenizer \\
        --dataset_name HuggingFaceFW/fineweb-edu --dataset_config_name sample-100BT \\
        --save_path configs/aixsim-60M.yaml
    accelerate launch --num_processes 2 recipes/pretrain_clm.py train \\
        --config configs/aixsim-60M.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import peft_bitflip  # noqa: E402
from peft_bitflip import data, evaluation, flavors  # noqa: E402
from peft_bitflip.config import BitflipConfig  # noqa: E402
from recipes import arguments, common, model_card  # noqa: E402

# The offline embedded default: tiny flavor, pydoc corpus, tokenizer of 1024 tokens.
TINY = {
    "flavor": "tiny",
    "seq_len": 128,
    "tokenizer_vocab_size": 1024,
    "per_device_train_batch_size": 16,
    "token_num_scale": 4.0,
    "learning_rate": 3e-3,
    "eval_blocks": 32,
    "logging_steps": 20,
}
# The original's generate-cfg defaults (run.py generate_pretrain_cfg) and torchtitan settings.
DEFAULTS = {
    "flavor": "60M",
    "seq_len": 2048,
    "tokenizer_vocab_size": 16384,
    "per_device_train_batch_size": 8,
    "token_num_scale": 22.0,
    "learning_rate": 1e-4,
    "eval_blocks": 64,
    "logging_steps": 10,
}
# Options that only describe the run plan (not passed on to train).
PLAN_ONLY = {"save_path", "command", "config"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["train", "generate-cfg"],
        default="train",
        help="train (default) or write the run's config file",
    )
    p.add_argument("--config", default=None, help="YAML / JSON from generate-cfg; flags override")
    p.add_argument("--save_path", default=None, help="generate-cfg: where to write the config")

    g = p.add_argument_group("model")
    g.add_argument(
        "--flavor",
        choices=list(flavors.FLAVORS),
        default=None,
        help="aixsim flavor (tiny: ours, for CPU); default tiny offline, else 60M",
    )
    g.add_argument("--seq_len", type=int, default=None, help="tokens per block (2048; tiny 128)")

    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer_name",
        default=None,
        help="HF tokenizer (e.g. HuggingFaceTB/cosmo2-tokenizer); default: a byte-level BPE "
        "trained on the first training documents",
    )
    g.add_argument("--tokenizer_vocab_size", type=int, default=None)
    g.add_argument("--tokenizer_train_docs", type=int, default=20_000)

    g = p.add_argument_group("data (default: the embedded offline pydoc corpus)")
    g.add_argument("--dataset_name", default=None, help="e.g. HuggingFaceFW/fineweb-edu")
    g.add_argument("--dataset_config_name", default=None, help="e.g. sample-100BT")
    g.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream the data set (default: on with --dataset_name, off for local files)",
    )
    g.add_argument("--train_file", default=None, help=".txt, .json, .jsonl or .csv")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--text_column", default=None)
    g.add_argument(
        "--validation_docs",
        type=int,
        default=2000,
        help="streaming without a validation split: the first N documents are held out",
    )
    g.add_argument("--validation_split_percentage", type=float, default=1.0)
    g.add_argument("--preprocessing_num_workers", type=int, default=None)

    g = p.add_argument_group("bit flips")
    g.add_argument(
        "--bitflip",
        default="original",
        help="'original' (p = 2^-16 for x and w, zero-out 30 / 1.25), 'none' (clean "
        "baseline), a BitflipConfig JSON (or a model's config.json) or an original meta YAML",
    )
    g.add_argument("--bitflip_seed", type=int, default=0)
    g.add_argument(
        "--flip_lm_head",
        action="store_true",
        help="flip the output head too, as the original pretraining did (default: every "
        "linear layer except lm_head, as the LoRA fine-tune and the evaluation)",
    )
    g.add_argument(
        "--eval_bitflip",
        default=None,
        help="fault model of the flipped evaluation (default: the run's; for a clean run "
        "'original')",
    )
    g.add_argument(
        "--eval_seeds",
        default="0",
        help="comma-separated flip seeds of the flipped evaluation (mean and spread)",
    )

    g = p.add_argument_group("budget and batch")
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument(
        "--num_processes",
        type=int,
        default=1,
        help="generate-cfg: processes the run will use (train uses the actual number)",
    )
    g.add_argument("--token_num_scale", type=float, default=None, help="tokens per parameter")
    g.add_argument("--train_tokens", type=int, default=None, help="token budget (overrides)")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=None, help="1e-4 (tiny: 3e-3)")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.95)
    g.add_argument("--warmup_fraction", type=float, default=0.2)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast where the GPU supports it, else fp32",
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--output_dir",
        default=None,
        help="where the model, results and model card go (default: a folder of the "
        "temporary directory named after the flavor)",
    )
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--logging_steps", type=int, default=None)
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint interval; 0: none")
    g.add_argument("--save_total_limit", type=int, default=3, help="checkpoints kept")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint directory, or 'latest' (the newest in --output_dir)",
    )
    g.add_argument("--eval_blocks", type=int, default=None, help="validation blocks evaluated")
    g.add_argument("--eval_steps", type=int, default=0, help="also evaluate every N steps")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--torch_compile", action="store_true")
    g.add_argument("--fsdp", default="", help="Trainer's fsdp option, e.g. 'full_shard auto_wrap'")
    g.add_argument("--report_to", default="none", help="none, wandb, tensorboard, ...")
    g.add_argument("--disable_tqdm", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--full_determinism", action="store_true", help="deterministic kernels")
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the saved folder (model, tokenizer, results, model card) to the Hub",
    )
    g.add_argument("--hub_model_id", default=None, help="default: the output folder's name")
    g.add_argument("--hub_token", default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Command line over ``--config`` over the preset (tiny offline, else the original's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config:
        values = load_run_config(first.config)
        unknown = set(values) - {a.dest for a in parser._actions}
        if unknown:
            parser.error(f"unknown option(s) {sorted(unknown)} in {first.config}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    offline = not (args.dataset_name or args.train_file)
    flavor = args.flavor or ("tiny" if offline else DEFAULTS["flavor"])
    preset = TINY if flavor == "tiny" else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.flavor = flavor
    args.argv = argv
    if args.output_dir is None:
        args.output_dir = arguments.default_output_dir(f"pretrain-{flavor}")
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    if args.streaming is None:
        args.streaming = bool(args.dataset_name)
    for key in (
        "seq_len",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_processes",
        "tokenizer_vocab_size",
    ):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if not (args.token_num_scale > 0 and math.isfinite(args.token_num_scale)):
        parser.error(f"--token_num_scale must be a positive number, got {args.token_num_scale}")
    if not 0 <= args.warmup_fraction < 1:
        parser.error(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.train_tokens is not None and args.train_tokens < 1:
        parser.error(f"--train_tokens must be >= 1, got {args.train_tokens}")
    try:
        args.eval_seed_list = [int(s) for s in str(args.eval_seeds).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--eval_seeds must be comma-separated integers, got {args.eval_seeds!r}")
    if not args.eval_seed_list:
        parser.error("--eval_seeds is empty")
    if args.command == "generate-cfg" and not args.save_path:
        args.save_path = f"configs/aixsim-{args.flavor}.yaml"
    # fail on a bad fault model before any work
    args.flips = bitflip_config(args.bitflip, args)
    eval_spec = args.eval_bitflip or (args.bitflip if args.flips is not None else "original")
    args.eval_flips = bitflip_config(eval_spec, args)
    if args.eval_flips is None:
        parser.error("--eval_bitflip none leaves nothing to evaluate under flips")
    return args


def load_run_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of options, got {type(values).__name__}")
    values.pop("plan", None)  # written by generate-cfg for the reader
    return {k: v for k, v in values.items() if k not in PLAN_ONLY}


def bitflip_config(spec: str, args) -> BitflipConfig | None:
    """``--bitflip`` / ``--eval_bitflip``: 'none', 'original', a JSON or an original YAML."""
    skip = [] if args.flip_lm_head else ["lm_head"]
    spec = str(spec)
    if spec == "none":
        return None
    if spec == "original":
        return BitflipConfig.original_default(seed=args.bitflip_seed, skip_modules=skip)
    if not os.path.isfile(spec):
        raise SystemExit(f"--bitflip {spec!r}: expected 'none', 'original' or a .json / .yaml file")
    if spec.endswith((".yaml", ".yml")):
        return BitflipConfig.from_original_yaml(spec, skip_modules=skip, seed=args.bitflip_seed)
    return BitflipConfig.from_json_file(spec)


# ---------------------------------------------------------------------- plan


def model_config(args, vocab_size: int, tokenizer=None):
    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return flavors.aixsim_config(
        args.flavor, vocab_size=vocab_size, max_seq_len=args.seq_len, **ids
    )


def make_plan(args, vocab_size: int, world_size: int) -> dict:
    """The token budget in optimizer steps for ``world_size`` processes."""
    params = flavors.count_params(model_config(args, vocab_size), exclude_embedding=True)
    plan = flavors.PretrainPlan(
        params=params,
        token_num_scale=args.token_num_scale,
        per_device_batch=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        world_size=world_size,
        seq_len=args.seq_len,
        warmup_fraction=args.warmup_fraction,
    ).to_dict()
    plan["source"] = f"{args.token_num_scale:g} x {params:,} non-embedding parameters"
    if args.train_tokens is not None:
        plan["tokens"] = args.train_tokens
        plan["steps"] = math.ceil(args.train_tokens / plan["tokens_per_step"])
        plan["source"] = "--train_tokens"
    if args.max_steps is not None:
        plan["steps"] = args.max_steps
        plan["tokens"] = args.max_steps * plan["tokens_per_step"]
        plan["source"] = "--max_steps"
    plan["warmup_steps"] = int(args.warmup_fraction * plan["steps"])
    plan["effective_batch"] = plan["tokens_per_step"] // args.seq_len
    plan["vocab_size"] = vocab_size
    return plan


def describe_plan(args, plan: dict) -> str:
    return (
        f"flavor {args.flavor}: {plan['params']:,} non-embedding parameters (output head "
        f"included), vocab {plan['vocab_size']}\n"
        f"tokens: {plan['tokens']:,} ({plan['source']})\n"
        f"effective batch: {plan['effective_batch']} sequences of {args.seq_len} tokens = "
        f"{plan['tokens_per_step']:,} tokens per step ({args.per_device_train_batch_size} "
        f"per device x {args.gradient_accumulation_steps} accumulation x "
        f"{plan['world_size']} processes)\n"
        f"steps: {plan['steps']:,}, warm-up {plan['warmup_steps']:,}\n"
        f"flips: {args.flips if args.flips is not None else 'none (clean baseline)'}"
    )


def tokenizer_vocab(args) -> int:
    """Vocabulary size without building the tokenizer when it is known up front."""
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(args.tokenizer_name))
    return args.tokenizer_vocab_size


def generate_cfg(args) -> dict:
    """Print the plan and write every option (plus the plan, for reading) to ``--save_path``."""
    import yaml

    plan = make_plan(args, tokenizer_vocab(args), args.num_processes)
    print(describe_plan(args, plan))
    skip = PLAN_ONLY | {"flips", "eval_flips", "eval_seed_list", "argv", "hub_token"}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    values["plan"] = plan
    os.makedirs(os.path.dirname(os.path.abspath(args.save_path)), exist_ok=True)
    with open(args.save_path, "w", encoding="utf-8") as f:
        f.write(
            f"# {os.path.basename(__file__)} generate-cfg; run: train --config {args.save_path}\n"
        )
        yaml.safe_dump(values, f, sort_keys=False)
    print(f"wrote {args.save_path}")
    return plan


# ---------------------------------------------------------------------- data


def load_documents(args):
    """``{"train", "validation"}`` text splits: streamed, local files or the embedded corpus."""
    if args.streaming:
        from datasets import load_dataset

        if args.train_file:
            builder = data._builder_for(args.train_file)
            files = {"train": args.train_file}
            if args.validation_file:
                files["validation"] = args.validation_file
            raw = load_dataset(builder, data_files=files, streaming=True)
        else:
            raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=True)
        train = raw["train"]
        column = data.pick_text_column(train.column_names or ["text"], args.text_column)
        if "validation" in raw:
            validation = raw["validation"]
        else:  # hold out the first documents
            validation = train.take(args.validation_docs)
            train = train.skip(args.validation_docs)
        return {"train": train, "validation": validation}, column
    texts = data.load_text_datasets(
        args.dataset_name,
        args.dataset_config_name,
        train_file=args.train_file,
        validation_file=args.validation_file,
        validation_split_percentage=args.validation_split_percentage,
        txt_sample_by="paragraph",
        text_column=args.text_column,
    )
    return texts, "text"


def tokenizer_texts(train, column: str, n: int) -> list[str]:
    if hasattr(train, "select"):
        return train.select(range(min(n, len(train))))[column]
    return [row[column] for row in train.take(n)]


def make_tokenizer(args, docs, column):
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer_name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    texts = tokenizer_texts(docs["train"], column, args.tokenizer_train_docs)
    return data.train_tokenizer(
        texts, vocab_size=args.tokenizer_vocab_size, model_max_length=args.seq_len
    )


def make_blocks(args, docs, column, tokenizer):
    blocks = {}
    for split, ds in docs.items():
        kwargs = {} if args.streaming else {"num_proc": args.preprocessing_num_workers}
        blocks[split] = data.tokenize_and_group(
            ds,
            tokenizer,
            args.seq_len,
            text_column=column,
            prepend_bos=True,
            append_eos=True,
            add_special_tokens=False,
            **kwargs,
        )
    if args.streaming:  # evaluation needs a fixed, countable set of blocks
        from datasets import Dataset

        rows = list(blocks["validation"].take(args.eval_blocks))
        if not rows:
            raise ValueError("the validation stream gives no full block; use more documents")
        blocks["validation"] = Dataset.from_list(rows)
        blocks["train"] = blocks["train"].with_format("torch")
    else:
        n = min(len(blocks["validation"]), args.eval_blocks)
        blocks["validation"] = blocks["validation"].select(range(n))
    return blocks


# ---------------------------------------------------------------------- training


def training_arguments(args, plan_steps: int = 1):
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and not use_cpu and torch.cuda.is_bf16_supported()
    )
    kwargs = dict(
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=plan_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=args.max_grad_norm,
        bf16=bf16,
        seed=args.seed,
        data_seed=args.seed,
        full_determinism=args.full_determinism,
        save_total_limit=args.save_total_limit,
        torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
        include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_token=args.hub_token,
        **run_kwargs(args, eval_steps=args.eval_steps or None),
    )
    if args.fsdp:
        kwargs.update(fsdp_kwargs(args.fsdp, TrainingArguments))
    return TrainingArguments(**kwargs)


def run_kwargs(args, *, eval_steps: int | None) -> dict:
    """Output, logging, evaluation and checkpoint cadence, activation checkpointing (non-
    reentrant: the only variant the flip layers replay exactly), reporting and the device."""
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation" if "activation_checkpointing" in names else "gradient"
    return {
        "output_dir": args.output_dir,
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if eval_steps else "no",
        "eval_steps": eval_steps,
        "save_strategy": "steps" if args.save_steps else "no",
        "save_steps": args.save_steps or 500,
        f"{ckpt}_checkpointing": bool(args.gradient_checkpointing),
        f"{ckpt}_checkpointing_kwargs": {"use_reentrant": False},
        "use_cpu": use_cpu,
        "report_to": [r.strip() for r in args.report_to.split(",") if r.strip()] or "none",
        "run_name": os.path.basename(os.path.normpath(args.output_dir)),
        "disable_tqdm": args.disable_tqdm or None,
        "dataloader_pin_memory": not use_cpu,
    }


def fsdp_kwargs(option: str, training_arguments_cls) -> dict:
    """``fsdp`` / ``fsdp_config`` for ``TrainingArguments`` from the Trainer's classic option
    string (``"full_shard auto_wrap"``, ``"shard_grad_op"``, ``"... offload"``).

    transformers that configure FSDP through ``fsdp_config`` alone (``fsdp=True``; the string
    form is deprecated there) get the string translated; older ones get it as it is.  Decoder
    layers are the wrapping unit either way.
    """
    items = option.split()
    known = {"full_shard", "shard_grad_op", "auto_wrap", "offload"}
    unknown = sorted(set(items) - known)
    if unknown or not items:
        raise ValueError(f"--fsdp {option!r}: unknown option(s) {unknown}; use {sorted(known)}")
    config: dict = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    if not hasattr(training_arguments_cls, "_apply_legacy_fsdp_to_config"):
        return {"fsdp": option, "fsdp_config": config}
    if "shard_grad_op" in items:
        config["reshard_after_forward"] = False
    elif "full_shard" in items:
        config["reshard_after_forward"] = True
    if "offload" in items:
        config["cpu_offload"] = True
    return {"fsdp": True, "fsdp_config": config}


def flipped_perplexity(model, blocks, flips: BitflipConfig, seeds, batch_size: int, restore):
    """Perplexity under ``flips`` for each flip seed (streams from call 0).

    Afterwards the model gets ``restore`` (its own BitflipConfig, or None: clean) back, with
    the flip counters it had before.
    """
    counters = {n: b.clone() for n, b in model.named_buffers() if n.endswith("bitflip_calls")}
    values = []
    for s in seeds:
        peft_bitflip.apply_bitflip(model, dataclasses.replace(flips, seed=s))
        evaluation.reset_streams(model)
        values.append(evaluation.perplexity(model, blocks, batch_size=batch_size)["perplexity"])
    if restore is None:
        peft_bitflip.remove_bitflip(model)
    else:
        peft_bitflip.apply_bitflip(model, restore)
        buffers = dict(model.named_buffers())
        for name, value in counters.items():
            buffers[name].copy_(value)
    finite = all(math.isfinite(v) for v in values)
    mean = sum(values) / len(values) if finite else math.inf
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1 and finite
        else 0.0
    )
    return {"perplexity": mean, "perplexity_std": std, "per_seed": dict(zip(seeds, values))}


def clean_perplexity(model, blocks, batch_size: int) -> float:
    with peft_bitflip.disable_bitflips(model):
        return evaluation.perplexity(model, blocks, batch_size=batch_size)["perplexity"]


def trainer_class():
    """``Trainer`` whose checkpoints keep the state dict it gathered (FSDP: full tensors) also
    for a model with flips (see :func:`peft_bitflip.hf_quantizer.quantizer_detached`)."""
    from transformers import Trainer

    from peft_bitflip.hf_quantizer import quantizer_detached

    class BitflipTrainer(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            model = self.accelerator.unwrap_model(self.model)
            with quantizer_detached(model) if state_dict is not None else contextlib.nullcontext():
                return super()._save(output_dir, state_dict=state_dict)

    return BitflipTrainer


def train(args) -> dict:
    from transformers import LlamaForCausalLM, default_data_collator, set_seed

    set_seed(args.seed)
    training_args = training_arguments(args)
    common.one_gpu_per_process(training_args)
    world = training_args.world_size
    is_main = training_args.process_index == 0

    with training_args.main_process_first(desc="data preparation"):
        docs, column = load_documents(args)
        tokenizer = make_tokenizer(args, docs, column)
        blocks = make_blocks(args, docs, column, tokenizer)

    plan = make_plan(args, len(tokenizer), world)
    training_args.max_steps = plan["steps"]
    training_args.warmup_steps = plan["warmup_steps"]
    if args.config:
        written = load_run_config(args.config)
        if written.get("num_processes", world) != world and is_main:
            print(
                f"{args.config} planned {written['num_processes']} processes, running on "
                f"{world}: steps recomputed for the same token budget ({plan['steps']})"
            )

    config = model_config(args, len(tokenizer), tokenizer)
    model = LlamaForCausalLM(config)
    summary = peft_bitflip.apply_bitflip(model, args.flips) if args.flips is not None else None
    if is_main:
        print(describe_plan(args, plan))
        if summary is not None:
            print(summary)
        if hasattr(blocks["train"], "__len__"):
            passes = plan["steps"] * plan["tokens_per_step"] / (len(blocks["train"]) * args.seq_len)
            print(
                f"data: {len(blocks['train']):,} training blocks; the budget reads them "
                f"{passes:.2f} times"
            )

    trainer = trainer_class()(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    if args.flips is not None:
        peft_bitflip.add_bitflip_callback(trainer)

    resume = args.resume_from_checkpoint
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
        if resume is None and is_main:
            print(f"no checkpoint in {args.output_dir}: starting from scratch")
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    steps_run = trainer.state.global_step
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    results = {
        "flavor": args.flavor,
        "bitflip": args.flips.to_dict() if args.flips is not None else None,
        "plan": plan,
        "world_size": world,
        "train_loss": out.training_loss,
        "train_steps": steps_run,
        "train_tokens": tokens or steps_run * plan["tokens_per_step"],
        "train_runtime_s": out.metrics.get("train_runtime", wall),
        "resumed_from": resume,
    }
    results["tokens_per_second"] = results["train_tokens"] / max(results["train_runtime_s"], 1e-9)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    results["first_logged_loss"] = losses[0] if losses else None
    results["last_logged_loss"] = losses[-1] if losses else None

    trainer.save_model(args.output_dir)  # every rank: FSDP gathers the shards for rank 0
    trainer.accelerator.wait_for_everyone()
    if is_main:  # evaluation on one process: the numbers do not depend on the world size
        if args.fsdp:  # the wrapped model needs every rank; evaluate the saved one instead
            model, _ = evaluation.load_model(
                args.output_dir, args.flips, device=trainer.args.device
            )
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
        model.eval()
        eval_set = blocks["validation"]
        bs = args.per_device_eval_batch_size
        results["validation_blocks"] = len(eval_set)
        results["clean_perplexity"] = clean_perplexity(model, eval_set, bs)
        flipped = flipped_perplexity(
            model, eval_set, args.eval_flips, args.eval_seed_list, bs, restore=args.flips
        )
        results["flipped_perplexity"] = flipped["perplexity"]
        results["flipped_perplexity_std"] = flipped["perplexity_std"]
        results["flipped_perplexity_per_seed"] = flipped["per_seed"]
        results["eval_bitflip"] = args.eval_flips.to_dict()
        tokenizer.save_pretrained(args.output_dir)
        if args.flips is not None:
            common.check_saved_config(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True, default=str)
        model_card.write(
            args.output_dir,
            kind="pretrained",
            flips=args.flips,
            base_model=None,
            command=shlex.join(["python", "recipes/pretrain_clm.py", *args.argv]),
            data_info=f"{args.dataset_name or args.train_file or 'embedded pydoc corpus'}: "
            f"{results['train_tokens']:,} training tokens in blocks of {args.seq_len}, "
            f"{len(eval_set)} validation blocks",
            seeds={
                "seed": args.seed,
                "bitflip_seed": args.bitflip_seed,
                "eval_seeds": args.eval_seeds,
            },  # fmt: skip
            results={k: v for k, v in results.items() if not isinstance(v, dict)},
        )
        if args.push_to_hub:
            model_card.push_folder(args.output_dir, trainer)
        print_summary(results, args.output_dir)
    return results


def print_summary(results: dict, output_dir: str) -> None:
    print("\n=== pretraining summary ===")
    for key in (
        "train_steps",
        "train_tokens",
        "tokens_per_second",
        "first_logged_loss",
        "last_logged_loss",
        "clean_perplexity",
        "flipped_perplexity",
        "flipped_perplexity_std",
    ):
        v = results.get(key)
        if v is not None:
            print(f"  {key:<24} {v:.4g}" if isinstance(v, float) else f"  {key:<24} {v}")
    print(f"  saved to                 {output_dir}")


def main(argv=None):
    args = parse_args(argv)
    if args.command == "generate-cfg":
        return generate_cfg(args)
    return train(args)


if __name__ == "__main__":
    main()
