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
The command line is ``HfArgumentParser`` over ``DataSourceArguments``, ``PretrainArguments``
and ``TrainingArguments``, as transformers' ``run_clm.py``: every Trainer flag works
(``--optim``, ``--lr_scheduler_type``, ``--eval_strategy``, ``--torch_compile``,
``--push_to_hub``, ...); the presets and ``--config`` change defaults only.

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
import warnings

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import peft_bitflip  # noqa: E402
from peft_bitflip import data, evaluation, flavors  # noqa: E402
from peft_bitflip.cli import DeprecatedAlias  # noqa: E402
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
# Old spellings -> the Trainer's flag (parsed into it with a warning).
DEPRECATED_FLAGS = {"--max_train_steps": "--max_steps", "--warmup_fraction": "--warmup_steps"}
# The original's torchtitan optimisation (AdamW 0.9 / 0.95, weight decay 0.1, linear warm-up
# over 20 % of the steps then linear decay to 0, clipping at 1.0) and the recipe's run defaults,
# where they differ from TrainingArguments' own.
TRAINER_DEFAULTS = {
    "output_dir": None,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "warmup_steps": 0.2,
    "optim": "adamw_torch",
    "save_total_limit": 3,
    "logging_first_step": True,
    "include_num_input_tokens_seen": True,
    "ddp_find_unused_parameters": False,
}
# TrainingArguments fields generate-cfg always writes (the plan's optimisation, for the reader).
OPTIMISATION_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "seed",
)
# TrainingArguments fields that describe the machine generate-cfg ran on, not the run.
MACHINE_FIELDS = {"use_cpu", "dataloader_pin_memory"}


def _precision(value: str) -> dict:
    if value not in ("auto", "bf16", "fp32"):
        raise ValueError(f"{value!r} is none of auto, bf16, fp32")
    return {} if value == "auto" else {"bf16": value == "bf16", "fp16": False}


def build_parser():
    """``HfArgumentParser`` over ``DataSourceArguments``, ``PretrainArguments`` and
    ``TrainingArguments`` (every Trainer flag), the subcommand and the deprecated aliases."""
    from transformers import TrainingArguments

    parser = arguments.hf_parser(
        (arguments.DataSourceArguments, arguments.PretrainArguments, TrainingArguments),
        __doc__.split("\n\n")[0],
        DEPRECATED_FLAGS,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["train", "generate-cfg"],
        default="train",
        help="train (default) or write the run's config file (generate-cfg)",
    )
    parser.add_argument(
        "--precision",
        dest="bf16",
        new_flag="--bf16 / --fp16",
        settings=_precision,
        action=DeprecatedAlias,
    )
    parser.add_argument(  # the old BooleanOptionalAction spelling
        "--no-streaming",
        dest="streaming",
        nargs=0,
        new_flag="--streaming false",
        settings=lambda _: {"streaming": False},
        action=DeprecatedAlias,
    )
    parser.set_defaults(validation_split_percentage=1.0, **TRAINER_DEFAULTS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The run's options: command line over ``--config`` over the preset (tiny offline, else
    the original's 60M settings) over the dataclasses' defaults.

    A namespace of the data and pretraining options, with ``.train`` (``TrainingArguments``),
    ``.command``, ``.argv``, ``.flips`` / ``.eval_flips`` (``BitflipConfig`` or None) and
    ``.eval_seed_list``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = _peek(parser, argv)
    config = load_run_config(first.config) if first.config else {}
    unknown = set(config) - {a.dest for a in parser._actions}
    if unknown:
        parser.error(f"unknown option(s) {sorted(unknown)} in {first.config}")
    parser.set_defaults(**config)
    first = _peek(parser, argv)
    offline = not (first.dataset_name or first.train_file)
    flavor = first.flavor or ("tiny" if offline else DEFAULTS["flavor"])
    preset = TINY if flavor == "tiny" else DEFAULTS
    values = {k: v for k, v in preset.items() if k not in config}
    values["flavor"] = flavor
    if "output_dir" not in config:
        values["output_dir"] = arguments.default_output_dir(f"pretrain-{flavor}")
    if not torch.cuda.is_available():  # CPU: nothing to pin memory to
        values.update(use_cpu=True, dataloader_pin_memory=False)
    elif torch.cuda.is_bf16_supported() and not ({"bf16", "fp16"} & set(config)):
        values["bf16"] = True  # bf16 autocast where the GPU supports it
    parser.set_defaults(**values)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--per_device_eval_batch_size" not in given and "per_device_eval_batch_size" not in config:
        resolved = _peek(parser, argv)
        parser.set_defaults(per_device_eval_batch_size=resolved.per_device_train_batch_size)
    try:
        data_args, pre, train_args, rest = parser.parse_args_into_dataclasses(
            argv, look_for_args_file=False
        )
    except ValueError as e:  # TrainingArguments' own checks
        parser.error(str(e))
    arguments.step_cadence(train_args, argv)
    arguments.non_reentrant_checkpointing(train_args)
    if train_args.data_seed is None:
        train_args.data_seed = train_args.seed
    args = argparse.Namespace(**dataclasses.asdict(data_args), **dataclasses.asdict(pre))
    args.train, args.command, args.argv = train_args, rest.command, argv
    _check(parser, args)
    return args


def _peek(parser, argv) -> argparse.Namespace:
    """The options as parsed so far (deprecation warnings come from the final parse only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return parser.parse_known_args(argv)[0]


def _check(parser, args) -> None:
    t = args.train
    if args.streaming is None:
        args.streaming = bool(args.dataset_name)
    for key in ("seq_len", "num_processes", "tokenizer_vocab_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(t, key)}")
    if not (args.token_num_scale > 0 and math.isfinite(args.token_num_scale)):
        parser.error(f"--token_num_scale must be a positive number, got {args.token_num_scale}")
    if t.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0 (< 1: a fraction), got {t.warmup_steps}")
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
    warmup = args.train.warmup_steps  # < 1: a fraction of the steps
    plan = flavors.PretrainPlan(
        params=params,
        token_num_scale=args.token_num_scale,
        per_device_batch=args.train.per_device_train_batch_size,
        grad_accum=args.train.gradient_accumulation_steps,
        world_size=world_size,
        seq_len=args.seq_len,
        warmup_fraction=warmup if warmup < 1 else 0.0,
    ).to_dict()
    plan["source"] = f"{args.token_num_scale:g} x {params:,} non-embedding parameters"
    if args.train_tokens is not None:
        plan["tokens"] = args.train_tokens
        plan["steps"] = math.ceil(args.train_tokens / plan["tokens_per_step"])
        plan["source"] = "--train_tokens"
    if args.train.max_steps > 0:
        plan["steps"] = args.train.max_steps
        plan["tokens"] = args.train.max_steps * plan["tokens_per_step"]
        plan["source"] = "--max_steps"
    plan["warmup_steps"] = int(warmup * plan["steps"]) if warmup < 1 else int(warmup)
    plan["effective_batch"] = plan["tokens_per_step"] // args.seq_len
    plan["vocab_size"] = vocab_size
    return plan


def describe_plan(args, plan: dict) -> str:
    return (
        f"flavor {args.flavor}: {plan['params']:,} non-embedding parameters (output head "
        f"included), vocab {plan['vocab_size']}\n"
        f"tokens: {plan['tokens']:,} ({plan['source']})\n"
        f"effective batch: {plan['effective_batch']} sequences of {args.seq_len} tokens = "
        f"{plan['tokens_per_step']:,} tokens per step ({args.train.per_device_train_batch_size} "
        f"per device x {args.train.gradient_accumulation_steps} accumulation x "
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
    """Print the plan and write the run's options (plus the plan, for reading) to
    ``--save_path``: every data and pretraining option, the optimisation, and the other
    Trainer options that differ from the recipe's defaults (not those of the machine it runs
    on, nor tokens)."""
    import yaml
    from transformers import TrainingArguments

    plan = make_plan(args, tokenizer_vocab(args), args.num_processes)
    print(describe_plan(args, plan))
    skip = PLAN_ONLY | {"flips", "eval_flips", "eval_seed_list", "argv", "train"}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    ours = args.train.to_dict()
    recipe_defaults = {k: v for k, v in TRAINER_DEFAULTS.items() if k != "output_dir"}
    reference = TrainingArguments(
        output_dir=args.train.output_dir, use_cpu=args.train.use_cpu, **recipe_defaults
    ).to_dict()
    values.update(
        (k, v)
        for k, v in ours.items()
        if k in OPTIMISATION_FIELDS
        or (v != reference.get(k) and k not in MACHINE_FIELDS and not k.endswith("_token"))
    )
    values["output_dir"] = args.train.output_dir
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

    training_args = args.train
    set_seed(training_args.seed)
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

    resume = training_args.resume_from_checkpoint  # or "latest": the newest in --output_dir
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None and is_main:
            print(f"no checkpoint in {training_args.output_dir}: starting from scratch")
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

    trainer.save_model(training_args.output_dir)  # every rank: FSDP gathers the shards for rank 0
    trainer.accelerator.wait_for_everyone()
    if is_main:  # evaluation on one process: the numbers do not depend on the world size
        if training_args.fsdp:  # the wrapped model needs every rank; evaluate the saved one instead
            model, _ = evaluation.load_model(
                training_args.output_dir, args.flips, device=trainer.args.device
            )
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
        model.eval()
        eval_set = blocks["validation"]
        bs = training_args.per_device_eval_batch_size
        results["validation_blocks"] = len(eval_set)
        results["clean_perplexity"] = clean_perplexity(model, eval_set, bs)
        flipped = flipped_perplexity(
            model, eval_set, args.eval_flips, args.eval_seed_list, bs, restore=args.flips
        )
        results["flipped_perplexity"] = flipped["perplexity"]
        results["flipped_perplexity_std"] = flipped["perplexity_std"]
        results["flipped_perplexity_per_seed"] = flipped["per_seed"]
        results["eval_bitflip"] = args.eval_flips.to_dict()
        tokenizer.save_pretrained(training_args.output_dir)
        if args.flips is not None:
            common.check_saved_config(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True, default=str)
        with open(os.path.join(training_args.output_dir, "training_args.json"), "w") as f:
            f.write(training_args.to_json_string())
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
        model_card.write(
            training_args.output_dir,
            kind="pretrained",
            flips=args.flips,
            base_model=None,
            command=shlex.join(["python", "recipes/pretrain_clm.py", *args.argv]),
            data_info=f"{args.dataset_name or args.train_file or 'embedded pydoc corpus'}: "
            f"{results['train_tokens']:,} training tokens in blocks of {args.seq_len}, "
            f"{len(eval_set)} validation blocks",
            seeds={
                "seed": training_args.seed,
                "bitflip_seed": args.bitflip_seed,
                "eval_seeds": args.eval_seeds,
            },  # fmt: skip
            results={k: v for k, v in results.items() if not isinstance(v, dict)},
        )
        if training_args.push_to_hub:
            model_card.push_folder(training_args.output_dir, trainer)
        print_summary(results, training_args.output_dir)
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
