"""Where a step's GPU memory goes: clean vs bit-flipped, eager or compiled, one process.

For each variant (``--variants``) of a job (``--job``, as in ``bench_model.py``) the step runs
``--warmup`` times with the CUDA allocator recording Python stacks, then once more; printed:
peak allocated bytes of that step, memory reserved, the bytes of the live blocks grouped by
the innermost frame in our code, PEFT, transformers or inductor that allocated them (the
largest groups), and inductor's cudagraph counters (skips, copied inputs).

    python benchmarks/tuning/memory_breakdown.py --job lora --batch 1 --compile-mode reduce-overhead
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench_model
from bench_model import make_variant, model_config, step_fn  # noqa: E402

SITES = ("peft_bitflip/", "/peft/", "/transformers/", "torch/_inductor/", "torch/optim/")


def where(frames) -> str:
    """The innermost frame of a block's allocation stack in one of SITES (our code, PEFT,
    transformers, inductor, torch.optim; else the first Python frame), as file:line function."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in SITES):
            short = name.split("site-packages/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "other" if not frames else f"{frames[0].get('filename')}:{frames[0].get('line')}"


def live_blocks(snapshot) -> tuple[collections.Counter, collections.Counter]:
    """(bytes of active blocks by allocation site, bytes reserved by segment pool)."""
    by_site, by_pool = collections.Counter(), collections.Counter()
    for seg in snapshot["segments"]:
        by_pool[str(seg.get("segment_pool_id"))] += seg["total_size"]
        for block in seg["blocks"]:
            if block["state"].startswith("active"):
                by_site[where(block.get("frames", []))] += block["size"]
    return by_site, by_pool


def run(variant, args, cfg):
    torch._dynamo.reset()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    model = make_variant(args.job, variant, cfg, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    compiled = args.compile_mode is not None
    mode = None if args.compile_mode == "default" else args.compile_mode
    step = step_fn(args.job, model, ids, compiled, mode)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    by_site, by_pool = live_blocks(torch.cuda.memory._snapshot())
    torch.cuda.memory._record_memory_history(enabled=None)
    gib = 2**30
    print(
        f"\n## {variant}: peak {peak / gib:.3f} GiB, reserved "
        f"{torch.cuda.memory_reserved() / gib:.3f} GiB, live after the step "
        f"{sum(by_site.values()) / gib:.3f} GiB"
    )
    for pool, size in by_pool.most_common():
        print(f"  pool {pool}: {size / gib:.3f} GiB reserved")
    for site, size in by_site.most_common(args.top):
        print(f"  {size / gib:8.3f} GiB  {site}")
    from torch._dynamo.utils import counters

    cg = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    print(f"  inductor cudagraph counters: {cg}")
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--job", default="lora", choices=["forward", "train", "lora"])
    ap.add_argument("--variants", default="clean,ours")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers of the ~1B Llama")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="allocation sites printed")
    ap.add_argument(
        "--compile-mode", default=None, help="eager when omitted; default, reduce-overhead..."
    )
    args = ap.parse_args()
    cfg = model_config(False)
    cfg.num_hidden_layers = args.layers
    peaks = {v: run(v, args, cfg) for v in args.variants.split(",")}
    base = peaks.get("clean")
    if base:
        for v, p in peaks.items():
            print(f"{v}: peak {p / 2**30:.3f} GiB = {p / base:.3f}x clean")


if __name__ == "__main__":
    main()
