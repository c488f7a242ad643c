"""Bit-flip-aware LoRA supervised fine-tuning with TRL's SFTTrainer.

The same fault model, budget, evaluation and merged save as ``finetune_lora.py``, on an
instruction data set: prompt / completion pairs (loss on the completion only), chat
``messages`` (the tokenizer's chat template) or plain ``text`` (language modelling; with
``--packing`` cut into blocks like ``finetune_lora.py``).  ``SFTTrainer(peft_config=
BitflipLoraConfig(...))`` builds the bit-flip LoRA model.

Every TRL ``SFTConfig`` flag works (``--packing``, ``--completion_only_loss``, ``--optim``,
...).  Offline default (no arguments, or ``--preset tiny``): a tiny randomly initialised Llama, a
tokenizer trained locally, and a small instruction set built from Python's documentation
("Explain the Python topic 'X'." -> the topic's first paragraph)::

    python recipes/sft_trl.py
    python recipes/sft_trl.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/Capybara --transform_cfg transform_cfg.toml --bf16 \\
        --per_device_train_batch_size 4 --block_size 1024 --output_dir out/qwen-bitflip-sft
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft_bitflip  # noqa: E402
from peft_bitflip import data  # noqa: E402
from recipes import arguments, common  # noqa: E402

# a minimal chat template for tokenizers that have none (the locally trained one)
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SFT_PRESETS = {"tiny": {"block_size": 128}}
SFT_LOCAL_VALIDATION_FRACTION = 0.2


def dataset_format(column_names) -> tuple[str, list[str]]:
    """``(kind, columns)``: ``"conversational"`` (``messages``), ``"prompt-completion"`` or
    ``"language-modeling"`` (``text``), and the columns SFTTrainer needs."""
    names = list(column_names)
    if "messages" in names:
        return "conversational", ["messages"]
    if "prompt" in names and "completion" in names:
        return "prompt-completion", ["prompt", "completion"]
    if "text" in names:
        return "language-modeling", ["text"]
    raise ValueError(
        f"cannot tell the data set's format from its columns {names}: expected 'messages', "
        "'prompt' + 'completion', or 'text' (use --text_column to name a text column)"
    )


def _texts_for_tokenizer(ds, kind: str, limit: int):
    ds = ds.select(range(min(len(ds), limit)))
    if kind == "conversational":
        return [m["content"] for msgs in ds["messages"] for m in msgs]
    if kind == "prompt-completion":
        return [p + c for p, c in zip(ds["prompt"], ds["completion"])]
    return ds["text"]


def load_sft_data(args: common.RecipeArgs):
    """``(DatasetDict, kind)`` with only the columns SFTTrainer uses."""
    from datasets import DatasetDict

    d = args.data
    if d.dataset_name is None and not d.train_file:
        raw = data.instruction_corpus(SFT_LOCAL_VALIDATION_FRACTION)
    else:
        raw = common.load_data(args, text_only=False)
    names = raw["train"].column_names
    if d.text_column is not None:
        if d.text_column not in names:
            raise ValueError(f"--text_column {d.text_column!r} not in the columns {names}")
        raw = DatasetDict(
            {
                k: ds.select_columns([d.text_column]).rename_column(d.text_column, "text")
                if d.text_column != "text"
                else ds.select_columns(["text"])
                for k, ds in raw.items()
            }
        )
        names = ["text"]
    kind, columns = dataset_format(names)
    return DatasetDict({k: ds.select_columns(columns) for k, ds in raw.items()}), kind


def build_parser():
    """``HfArgumentParser`` over the model, data, bit-flip and TRL ``SFTConfig`` flags."""
    from trl import SFTConfig

    parser = arguments.build_parser(SFTConfig, __doc__.split("\n\n")[0])
    # the recipe's own defaults for SFTConfig fields (flags still win)
    # bf16 only with --bf16, as finetune_lora.py (SFTConfig turns it on by default)
    parser.set_defaults(packing_strategy="wrapped", dataset_text_field="text", bf16=False)
    return parser


def main(argv=None) -> dict:
    args = common.parse_args(
        build_parser(), argv, script=__file__, output_name="bitflip-sft", extra_presets=SFT_PRESETS
    )

    from transformers import set_seed
    from trl import SFTTrainer

    sft_args = args.train
    set_seed(sft_args.seed)
    flips, lora, use_lora = common.bitflip_settings(args)
    if sft_args.include_num_input_tokens_seen in (False, "no"):
        sft_args.include_num_input_tokens_seen = "non_padding"  # train_tokens: real tokens
    if sft_args.dataset_num_proc is None:
        sft_args.dataset_num_proc = args.data.preprocessing_num_workers
    common.one_gpu_per_process(sft_args)
    world = sft_args.world_size  # processes under accelerate launch / torchrun

    m, d = args.model, args.data
    with common.main_process_first(sft_args):
        sft_data, kind = load_sft_data(args)
        if m.model_name_or_path is None and m.tokenizer_name is None:
            tok_texts = data.local_corpus(SFT_LOCAL_VALIDATION_FRACTION)["train"]["text"]
            if d.dataset_name is not None or d.train_file:
                tok_texts = _texts_for_tokenizer(
                    sft_data["train"], kind, common.TOKENIZER_TRAIN_DOCS
                )
        else:
            tok_texts = None
        tokenizer = common.load_tokenizer(args, tok_texts)
        if kind == "conversational" and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
        model = common.load_model(args, tokenizer)
    block_size = common.resolve_block_size(args, tokenizer, model)

    num_params = data.count_parameters(model)
    plan = common.plan_steps(args, num_params=num_params, block_size=block_size, world=world)
    sft_args.max_steps = plan["max_steps"]
    sft_args.max_length = block_size
    if args.bitflip.calibrate_zero_out:  # thresholds from the model's own maxima on text
        from datasets import Dataset

        n = args.bitflip.calibration_batches * sft_args.per_device_train_batch_size * 4
        head = sft_data["train"].select(range(min(n, len(sft_data["train"]))))
        texts = Dataset.from_dict({"text": _texts_for_tokenizer(head, kind, n)})
        blocks = data.tokenize_and_group(texts, tokenizer, block_size)
        flips = common.calibrate(args, model, flips, blocks)
    peft_config = common.lora_config(args, flips, lora) if use_lora else None
    if not use_lora:
        peft_bitflip.apply_bitflip(model, flips)

    eval_set = common.first_batches(sft_data["validation"], args, world)
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=sft_data["train"],
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    common.attach_bitflip_callback(trainer, args)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    data_info = (
        f"{d.dataset_name or d.train_file or 'embedded pydoc instructions'} ({kind}): "
        f"{len(sft_data['train'])} train / {len(sft_data['validation'])} validation examples, "
        f"max_length {block_size}" + (" (packed)" if sft_args.packing else "")
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
        "dataset_format": kind,
    }
    common.train_and_evaluate(trainer, args, plan, results)
    return common.finish(
        trainer, tokenizer, args, results, flips=flips, use_lora=use_lora, data_info=data_info
    )


if __name__ == "__main__":
    main()
