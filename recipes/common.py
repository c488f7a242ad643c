"""Shared pieces of the bit-flip fine-tuning recipes (``finetune_lora.py``, ``sft_trl.py``).

The parsed command line (:class:`RecipeArgs`, from :mod:`recipes.arguments`), model /
tokenizer loading, the bit-flip LoRA configuration (the original's ``transform_cfg.toml`` and
inline flags), the token budget, validation perplexity on the first N batches (flips on, and
clean for reference), saving the merged model, the adapter, their model cards and
``all_results.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys

import torch

import peft_bitflip
from peft_bitflip import data
from peft_bitflip.config import RULE_KEYS, BitflipConfig, read_original_toml
from recipes import arguments, model_card

FLIP_KEYS = RULE_KEYS
# The original release's transform_cfg.toml: p = 2^-16 for x and w, zero-out |x|>=30, |w|>=1.25.
ORIGINAL_FLIPS = {k: getattr(BitflipConfig.original_default(), k) for k in FLIP_KEYS}
TOKENIZER_TRAIN_DOCS = 20_000


@dataclasses.dataclass
class RecipeArgs:
    """One run's parsed command line: the four argument dataclasses, the preset's LoRA shape
    and the command as a shell line (for the model card)."""

    model: arguments.ModelArguments
    data: arguments.DataArguments
    bitflip: arguments.BitflipArguments
    train: object  # TrainingArguments or SFTConfig
    preset_lora: dict
    command: str


def parse_args(parser, argv=None, *, script: str, output_name: str, extra_presets=None):
    """:class:`RecipeArgs` of ``argv`` (default ``sys.argv[1:]``) for ``script``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    m, d, b, t, lora = arguments.parse(
        parser, argv, output_name=output_name, extra_presets=extra_presets
    )
    arguments.non_reentrant_checkpointing(t)
    command = shlex.join(["python", f"recipes/{os.path.basename(script)}", *argv])
    return RecipeArgs(m, d, b, t, lora, command)


# ---------------------------------------------------------------------- fault model, LoRA


def bitflip_settings(args: RecipeArgs) -> tuple[BitflipConfig, dict, bool]:
    """``(BitflipConfig, {"r", "lora_alpha"}, use_lora)`` from ``--transform_cfg`` and flags.

    Precedence: command-line flags, then the TOML (or the original's pretraining YAML: flips
    only), then the preset / the original's defaults.  Without a file the flips are the
    original release's (p = 2^-16, zero-out 30 / 1.25) and LoRA is r = 32, alpha = 32 (the
    tiny preset: r = 16).
    """
    b = args.bitflip
    lora, use_lora = dict(args.preset_lora), True
    values = dict(ORIGINAL_FLIPS)
    path = b.transform_cfg
    if path and path.endswith((".yaml", ".yml")):
        cfg = BitflipConfig.from_original_yaml(path, skip_modules=["lm_head"])
        values = {k: getattr(cfg, k) for k in FLIP_KEYS}
    elif path:
        cfg, lora, use_lora = read_original_toml(path)
        values = {k: getattr(cfg, k) for k in FLIP_KEYS}
    values.update(b.flip_values())
    if b.lora_r is not None:
        lora["r"] = b.lora_r
    if b.lora_alpha is not None:
        lora["lora_alpha"] = b.lora_alpha
    if b.full_finetune:
        use_lora = False
    config = BitflipConfig(**values, seed=b.bitflip_seed, compat_snap=b.compat_snap)
    return config, lora, use_lora


def calibrate(args: RecipeArgs, model, flips: BitflipConfig, train_blocks) -> BitflipConfig:
    """``flips`` with thresholds calibrated on ``model`` (``--calibrate_zero_out``), else
    ``flips``.  Calibrates on the first ``--calibration_batches`` training batches with flips
    off, before any adapter is added; every process computes the same thresholds."""
    b = args.bitflip
    if not b.calibrate_zero_out:
        return flips
    from peft_bitflip.calibration import calibrate_zero_out

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    bs = args.train.per_device_train_batch_size
    n = min(len(train_blocks), b.calibration_batches * bs)
    cfg = calibrate_zero_out(
        model,
        torch.tensor(train_blocks.select(range(n))["input_ids"]),
        margin=b.calibrate_zero_out,
        base=flips,
        batch_size=bs,
    )
    ts = [r for r in (cfg.layer_name_to_config or {}).values() if r]
    x_t = [r["x_zero_out_t"] for r in ts]
    w_t = [r["w_zero_out_t"] for r in ts]
    print(
        f"calibrated zero-out (margin {b.calibrate_zero_out:g}, {n} blocks): x thresholds "
        f"{min(x_t):.4g}..{max(x_t):.4g}, W thresholds {min(w_t):.4g}..{max(w_t):.4g}"
    )
    return cfg


def _names(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def lora_config(args: RecipeArgs, flips: BitflipConfig, lora: dict):
    """The ``BitflipLoraConfig`` of a run (``lora_dropout`` is 0: the formulation has none)."""
    spec = args.bitflip.lora_target_modules.strip()
    if spec in ("all-linear", "all_linear"):
        targets = "all-linear"
    else:
        targets = _names(spec)
        if not targets:
            raise ValueError("--lora_target_modules is empty")
    alpha = lora["lora_alpha"]
    return peft_bitflip.BitflipLoraConfig.from_bitflip_config(
        flips,
        r=int(lora["r"]),
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=_names(args.bitflip.lora_modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------- data, model, tokenizer


def load_data(args: RecipeArgs, *, text_only: bool):
    """``train`` / ``validation`` splits from ``--dataset_name``, ``--train_file`` or the
    embedded corpus; ``text_only`` reduces them to one ``text`` column."""
    d = args.data
    kwargs = dict(
        train_file=d.train_file,
        validation_file=d.validation_file,
        validation_split_percentage=d.validation_split_percentage,
        txt_sample_by=d.txt_sample_by,
    )
    if text_only:
        kwargs["text_column"] = d.text_column
    load = data.load_text_datasets if text_only else data.load_raw_datasets
    return load(d.dataset_name, d.dataset_config_name, **kwargs)


def load_tokenizer(args: RecipeArgs, tokenizer_texts=None):
    """The model's tokenizer, or (no model) a BPE tokenizer trained on ``tokenizer_texts``."""
    from transformers import AutoTokenizer

    m = args.model
    trust = arguments.trust_remote_code(m, args.train)
    name = m.tokenizer_name or m.model_name_or_path
    if name is not None:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok
    if tokenizer_texts is None:
        raise ValueError("a locally trained tokenizer needs texts")
    return data.train_tokenizer(
        tokenizer_texts, vocab_size=m.tokenizer_vocab_size, model_max_length=1024
    )


def load_model(args: RecipeArgs, tokenizer):
    """``AutoModelForCausalLM.from_pretrained`` or a randomly initialised tiny Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    m = args.model
    trust = arguments.trust_remote_code(m, args.train)
    if m.model_name_or_path is None:
        cfg = data.tiny_llama_config(
            len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(cfg)
    dtype = m.torch_dtype if m.torch_dtype == "auto" else getattr(torch, m.torch_dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust}
    config = AutoConfig.from_pretrained(m.model_name_or_path, trust_remote_code=trust)
    saved = getattr(config, "quantization_config", None)
    if isinstance(saved, dict) and saved.get("quant_method") == "bitflip":
        # a bit-flip checkpoint (e.g. a merged model of an earlier run): load it clean; this
        # run's fault model (--transform_cfg / flags) is applied afterwards
        print(f"{m.model_name_or_path} carries bit-flip settings; this run's replace them")
        kwargs["config"] = peft_bitflip.load_config_with(
            m.model_name_or_path, None, trust_remote_code=trust
        )
    model = AutoModelForCausalLM.from_pretrained(m.model_name_or_path, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def resolve_block_size(args: RecipeArgs, tokenizer, model) -> int:
    """``--block_size`` (default 1024) capped by the tokenizer's and model's maxima."""
    asked = args.data.block_size
    limits = [1024 if asked is None else asked]
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 10**9:
        limits.append(mml)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        limits.append(mpe)
    block = min(limits)
    if asked is not None and block < asked:
        print(f"block_size {asked} exceeds the model's maximum; using {block}")
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


def plan_steps(args: RecipeArgs, *, num_params: int, block_size: int, world: int) -> dict:
    """Optimizer steps of the run and the budget they come from: ``--max_steps`` >
    ``--train_tokens`` > ``--tokens_per_param`` (see ``data.token_budget_steps``); with
    ``--tokens_per_param 0`` the run lasts ``--num_train_epochs``."""
    t, d = args.train, args.data
    tps = data.tokens_per_step(
        t.per_device_train_batch_size, block_size, t.gradient_accumulation_steps, world
    )
    max_steps = t.max_steps if t.max_steps > 0 else None
    if max_steps is None and d.train_tokens is None and d.tokens_per_param == 0:
        return {"max_steps": -1, "tokens_per_step": tps, "budget_tokens": None, "source": "epochs"}
    steps = data.token_budget_steps(
        per_device_batch_size=t.per_device_train_batch_size,
        block_size=block_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        world_size=world,
        num_params=num_params,
        tokens_per_param=d.tokens_per_param,
        train_tokens=d.train_tokens,
        max_train_steps=max_steps,
    )
    if max_steps is not None:
        source, budget = "max_steps", None
    elif d.train_tokens is not None:
        source, budget = "train_tokens", d.train_tokens
    else:
        source = f"{d.tokens_per_param:g} x {num_params} parameters"
        budget = data.budget_tokens(num_params, d.tokens_per_param)
    return {"max_steps": steps, "tokens_per_step": tps, "budget_tokens": budget, "source": source}


def attach_bitflip_callback(trainer, args: RecipeArgs) -> None:
    """Add :class:`peft_bitflip.callback.BitflipCallback` (flip-probability warm-up over
    ``--bitflip_warmup_steps`` optimizer steps, flip rates in the logs and counters to the
    trackers, flip counters in checkpoints) to ``trainer``, and a
    :class:`~peft_bitflip.training_faults.TrainingFaultCallback` for ``--train_faults``."""
    from peft_bitflip.callback import add_bitflip_callback

    add_bitflip_callback(trainer, warmup_steps=args.bitflip.bitflip_warmup_steps)
    faults = args.bitflip.training_faults()
    if faults is not None:  # --train_faults: flips in gradients / optimizer state
        from peft_bitflip.training_faults import add_training_fault_callback

        add_training_fault_callback(trainer, faults)


def print_setup(args: RecipeArgs, *, num_params, trainable, flips, lora, use_lora, plan, world,
                data_info):  # fmt: skip
    """One block of text describing the run (main process only)."""
    print(
        f"model: {args.model.model_name_or_path or 'tiny Llama (random init)'}, {num_params:,} "
        f"parameters, {trainable:,} trainable ({100 * trainable / num_params:.2f} %)\n"
        f"flips: {flips}\nLoRA: {lora if use_lora else 'off (full fine-tune under flips)'}\n"
        f"data: {data_info}; {plan['tokens_per_step']} tokens per optimizer step "
        f"({world} process(es)); steps: {plan['max_steps']} ({plan['source']})\n"
        f"output: {args.train.output_dir}"
    )


def first_batches(dataset, args: RecipeArgs, world: int):
    """The first ``--eval_batches`` batches per process of ``dataset`` (all if negative,
    ``None`` if 0: no evaluation)."""
    n_batches = args.data.eval_batches
    if n_batches == 0:
        return None
    if n_batches < 0:
        return dataset
    n = min(len(dataset), n_batches * args.train.per_device_eval_batch_size * world)
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


def train_and_evaluate(trainer, args: RecipeArgs, plan: dict, results: dict) -> dict:
    """Optional evaluation before training, training, evaluation flipped and clean."""
    evaluating = args.data.eval_batches != 0
    if args.data.eval_before_training and evaluating:
        results["initial_perplexity"] = evaluate(trainer, prefix="initial")["initial_perplexity"]
    train_out = trainer.train(resume_from_checkpoint=args.train.resume_from_checkpoint)
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
    if evaluating:
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


def finish(trainer, tokenizer, args: RecipeArgs, results: dict, *, flips, use_lora: bool,
           data_info: str) -> dict:  # fmt: skip
    """Save the merged model (+ tokenizer, ``all_results.json``, ``training_args.json``) in
    ``--output_dir`` and, for LoRA, the adapter in ``--output_dir/adapter``; both with a model
    card (README.md) stating the fault model, the command, data, seeds, versions and results;
    push the folder with ``--push_to_hub``; print a summary.

    The merged model keeps its bit-flip layers and its ``BitflipConfig`` in ``config.json``
    (``quantization_config.quant_method == "bitflip"``), so ``AutoModelForCausalLM``
    reloads it with flips on.  The adapter reloads with ``PeftModel.from_pretrained(base,
    path)`` (``import peft_bitflip`` registers its tuner).
    """
    out = args.train.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_dir = os.path.join(out, "adapter") if use_lora else None
    if use_lora and trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)  # before merging: the adapter alone
    merged = model.merge_and_unload() if use_lora else model
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        check_saved_config(out)
        with open(os.path.join(out, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        with open(os.path.join(out, "training_args.json"), "w") as f:
            f.write(args.train.to_json_string())
        trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
        card = dict(
            flips=flips,
            base_model=args.model.model_name_or_path,
            command=args.command,
            data_info=data_info,
            seeds={"seed": args.train.seed, "bitflip_seed": args.bitflip.bitflip_seed},
            results=results,
        )
        model_card.write(out, kind="merged", **card)
        if adapter_dir is not None:
            tokenizer.save_pretrained(adapter_dir)
            model_card.write(adapter_dir, kind="adapter", **card)
        if args.train.push_to_hub:
            model_card.push_folder(out, trainer)
        print_summary(results, out)
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
