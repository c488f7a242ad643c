"""Bit-flip-aware LoRA fine-tuning of a causal LM with the HF Trainer.

Re-creates the original ``run_clm_no_trainer.py`` fine-tune (NewComputeBench
``lora_finetune``): every linear layer except ``lm_head`` computes
``flip(x) @ flip(W + s·B@A)^T + b`` and only the LoRA adapters train; the data are cut into
blocks of ``block_size`` tokens; the run lasts a token budget of 1 % of the model's parameter
count (gradient accumulation and the number of processes counted); validation perplexity is
measured with flips on, on the first ``--eval_batches`` batches per process; the merged model is
saved with its bit-flip settings in ``config.json``, the adapter in ``adapter/``, each with a
model card, plus ``all_results.json``.  Every ``TrainingArguments`` flag works (``--optim``,
``--lr_scheduler_type``, ``--eval_strategy``, ``--torch_compile``, ``--deepspeed``, ...).

Offline default (no arguments, or ``--preset tiny``): a tiny randomly initialised Llama and a
tokenizer trained locally on Python's own documentation; about a minute on two CPU cores,
written to a folder of the temporary directory unless ``--output_dir`` says where::

    python recipes/finetune_lora.py
    python recipes/finetune_lora.py --model_name_or_path unsloth/Llama-3.1-8B \\
        --dataset_name Cheng98/fineweb-edu-1.25B --transform_cfg transform_cfg.toml \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 2 --block_size 2048 \\
        --learning_rate 1e-5 --weight_decay 0.01 --bf16 --output_dir out/llama-bitflip-lora
    accelerate launch --num_processes 8 recipes/finetune_lora.py ...   # DDP
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_bitflip  # noqa: E402
from peft_bitflip import data  # noqa: E402
from recipes import arguments, common  # noqa: E402


def build_parser():
    """``HfArgumentParser`` over the model, data, bit-flip and ``TrainingArguments`` flags."""
    from transformers import TrainingArguments

    return arguments.build_parser(TrainingArguments, __doc__.split("\n\n")[0])


def main(argv=None) -> dict:
    args = common.parse_args(build_parser(), argv, script=__file__, output_name="bitflip-lora")

    from peft import get_peft_model
    from transformers import Trainer, default_data_collator, set_seed

    training_args = args.train
    set_seed(training_args.seed)
    flips, lora, use_lora = common.bitflip_settings(args)
    common.one_gpu_per_process(training_args)
    world = training_args.world_size  # processes under accelerate launch / torchrun

    # data: documents -> tokenizer -> blocks of block_size tokens (labels = input_ids)
    # (a tokenizer trained locally is deterministic, so every process builds the same one)
    with common.main_process_first(training_args):
        texts = common.load_data(args, text_only=True)
        n_tok = min(len(texts["train"]), common.TOKENIZER_TRAIN_DOCS)
        tokenizer = common.load_tokenizer(args, texts["train"].select(range(n_tok))["text"])
        model = common.load_model(args, tokenizer)
        block_size = common.resolve_block_size(args, tokenizer, model)
        blocks = data.tokenize_and_group(
            texts, tokenizer, block_size, num_proc=args.data.preprocessing_num_workers
        )

    # budget: 1 % of the base model's parameters in tokens, unless steps/tokens are given
    num_params = data.count_parameters(model)
    plan = common.plan_steps(args, num_params=num_params, block_size=block_size, world=world)
    training_args.max_steps = plan["max_steps"]

    # the fault model + LoRA (flips on every linear layer except lm_head)
    flips = common.calibrate(args, model, flips, blocks["train"])
    if use_lora:
        model = get_peft_model(model, common.lora_config(args, flips, lora))
    else:
        peft_bitflip.apply_bitflip(model, flips)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    eval_set = common.first_batches(blocks["validation"], args, world)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    common.attach_bitflip_callback(trainer, args)
    data_info = (
        f"{args.data.dataset_name or args.data.train_file or 'embedded pydoc corpus'}: "
        f"{len(blocks['train'])} train / {len(blocks['validation'])} validation blocks of "
        f"{block_size} tokens"
    )
    if trainer.is_world_process_zero():
        common.print_setup(
            args,
            num_params=num_params,
            trainable=trainable,
            flips=flips,
            lora=lora,
            use_lora=use_lora,
            plan=plan,
            world=world,
            data_info=data_info,
        )

    results = {
        "num_parameters": num_params,
        "trainable_parameters": trainable,
        "block_size": block_size,
        "world_size": world,
    }
    common.train_and_evaluate(trainer, args, plan, results)
    return common.finish(
        trainer, tokenizer, args, results, flips=flips, use_lora=use_lora, data_info=data_info
    )


if __name__ == "__main__":
    main()
