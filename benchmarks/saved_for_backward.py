"""What a LoRA (or full) training step keeps for backward: clean PEFT vs bit-flip, eager vs
``torch.compile`` (inductor), on any device.

One forward with labels runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor
saved for backward (also by inductor's compiled autograd functions) is recorded once per
storage.  Printed per variant: the total bytes, and the bytes by dtype and by shape, the
largest first: the activation memory a step holds at the start of its backward.  The model is
``bench_model.py``'s Llama (narrower and shallower with ``--hidden`` / ``--layers``), bf16.

    python benchmarks/saved_for_backward.py --job lora --hidden 256 --layers 2 --seq 128
"""

from __future__ import annotations

import argparse
import collections

import torch
from bench_model import make_variant, model_config


def saved_bytes(model, ids, compiled: bool) -> tuple[int, collections.Counter, collections.Counter]:
    """(total bytes, bytes by dtype, bytes by (shape, dtype)) of the distinct storages saved
    for backward by one forward of ``model`` on ``ids``."""
    fwd = torch.compile(model) if compiled else model
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen and storage.nbytes() > 0:
            seen[key] = (tuple(t.shape), t.dtype, storage.nbytes())
        return t

    fwd(ids, labels=ids)  # compiles (and warms up) outside the hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fwd(ids, labels=ids).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    by_dtype, by_shape = collections.Counter(), collections.Counter()
    for (ptr, _), (shape, dtype, nbytes) in seen.items():
        if ptr in params:  # parameters and buffers are held anyway
            continue
        by_dtype[str(dtype).replace("torch.", "")] += nbytes
        by_shape[(shape, str(dtype).replace("torch.", ""))] += nbytes
    del loss
    return sum(by_dtype.values()), by_dtype, by_shape


def main(argv=None) -> dict:
    """Prints the rows; returns {(mode, variant): bytes saved}."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--job", default="lora", choices=["train", "lora"])
    ap.add_argument("--variants", default="clean,ours")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (MLP 2.75x, 64/head)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--top", type=int, default=8, help="shapes printed per row")
    args = ap.parse_args(argv)
    cfg = model_config(False)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size = args.hidden, args.layers, args.vocab
    cfg.intermediate_size = args.hidden * 11 // 4
    cfg.num_attention_heads = cfg.num_key_value_heads = max(1, args.hidden // 64)
    device = torch.device(args.device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device=device)
    mib = 2**20
    totals = {}
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            model = make_variant(args.job, variant, cfg, device, torch.bfloat16)
            model.train()
            torch._dynamo.reset()
            total, by_dtype, by_shape = saved_bytes(model, ids, mode == "compiled")
            totals[(mode, variant)] = total
            dtypes = ", ".join(f"{d} {b / mib:.1f}" for d, b in by_dtype.most_common())
            print(f"## {variant}, {mode}: {total / mib:.1f} MiB saved ({dtypes})")
            for (shape, dtype), b in by_shape.most_common(args.top):
                print(f"  {b / mib:8.2f} MiB  {list(shape)} {dtype}")
    for mode in args.modes.split(","):
        clean = totals.get((mode, "clean"))
        for variant in args.variants.split(","):
            ratio = f" = {totals[(mode, variant)] / clean:.3f}x clean" if clean else ""
            print(f"{mode:8s} {variant:6s} {totals[(mode, variant)] / mib:9.1f} MiB{ratio}")
    return totals


if __name__ == "__main__":
    main()
