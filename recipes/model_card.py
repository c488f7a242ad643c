"""Model cards (``README.md``) of the models the recipes save: the full resolved fault model
(``BitflipConfig``), the command, data, seeds, package versions and final results, written with
``huggingface_hub.ModelCard`` so the Hub shows them; and pushing a saved folder with its card.
"""

from __future__ import annotations

import json
import os

KINDS = {
    "merged": "the merged model (LoRA folded into the weights; the bit-flip layers and their "
    "fault model stay: `AutoModelForCausalLM.from_pretrained` loads it with flips on)",
    "adapter": "the bit-flip LoRA adapter (`PeftModel.from_pretrained(base, path)` after "
    "`import peft_bitflip`; the fault model is in `adapter_config.json` too)",
    "pretrained": "a model pretrained from scratch under flips (`AutoModelForCausalLM."
    "from_pretrained` loads it with flips on)",
}


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (those installed)."""
    import importlib.metadata as md

    out = {}
    for name in ("peft-bitflip", "torch", "transformers", "peft", "trl", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    import peft_bitflip

    out["peft-bitflip"] = getattr(peft_bitflip, "__version__", out.get("peft-bitflip", "?"))
    return out


def _fault_model(flips) -> dict | None:
    if flips is None:
        return None
    return flips.to_dict() if hasattr(flips, "to_dict") else dict(flips)


def render(*, kind: str, flips, base_model, command: str, data_info: str, seeds: dict,
           results: dict) -> str:  # fmt: skip
    """The card's text (YAML metadata + Markdown)."""
    from huggingface_hub import ModelCardData

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    fault = _fault_model(flips)
    meta = ModelCardData(
        library_name="peft" if kind == "adapter" else "transformers",
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        tags=["peft-bitflip", "bit-flip", "fault-injection"]
        + (["lora"] if kind != "pretrained" else []),
    )
    fault_text = (
        "none (clean baseline)" if fault is None else json.dumps(fault, indent=2, sort_keys=True)
    )
    result_rows = "\n".join(
        f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in sorted(results.items())
        if isinstance(v, (int, float, str)) or v is None
    )
    body = f"""
# Bit-flip-aware model ({kind})

This folder holds {KINDS[kind]}.  It was trained with `peft_bitflip` under simulated random
bit flips in the inputs and weights of its linear layers.

## Fault model

Each sign/exponent bit flips with `p_exp`, each mantissa bit with `p_frac`; then every element
with `|v| >= zero_out_t` (or NaN/Inf) becomes 0 (`x_`: layer inputs, `w_`: weights).

```json
{fault_text}
```

## How it was made

```bash
{command}
```

- base model: {base_model or "tiny Llama initialised at random (offline preset)"}
- data: {data_info}
- seeds: {", ".join(f"{k} {v}" for k, v in seeds.items())}
- versions: {", ".join(f"{k} {v}" for k, v in versions().items())}

## Results

| metric | value |
|---|---|
{result_rows}
"""
    return f"---\n{meta.to_yaml()}\n---\n{body}"


def write(path: str, **kwargs) -> str:
    """Write ``README.md`` in ``path`` (see :func:`render`); returns its path."""
    from huggingface_hub import ModelCard

    readme = os.path.join(path, "README.md")
    ModelCard(render(**kwargs)).save(readme)
    return readme


def push_folder(path: str, trainer) -> None:
    """Upload ``path`` (model, tokenizer, adapter, cards, results; not the checkpoints) to the
    trainer's Hub repository (``--hub_model_id``, else Trainer's default from
    ``--output_dir``)."""
    from huggingface_hub import upload_folder

    args = trainer.args
    repo = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    if repo is None:
        trainer.init_hf_repo(token=args.hub_token)
        repo = trainer.hub_model_id
    upload_folder(
        repo_id=repo,
        folder_path=path,
        token=args.hub_token,
        ignore_patterns=["checkpoint-*", "runs/*", "*.bin"],
        commit_message="peft_bitflip recipe: model, adapter and model card",
    )
