"""Where a whole-model step spends its time: GPU kernel time by kind, clean vs flipped.

Builds the models of ``bench_model.py`` (same config, variants and jobs), times ``--steps``
steps with CUDA events (wall), times as many until each step's call returns (host), and
profiles ``--profile-steps`` more with ``torch.profiler``.
Per step it reports the wall time, the summed kernel time (the GPU's busy time; wall minus
that is time the GPU waited for the host), the kernel time of each kind (GEMM, attention, our
flip kernels, the LoRA merge and correction kernels, the rest) and the number of kernels
launched.  The extra time of a flipped step splits into kernel time (bytes and arithmetic)
and host time (launches), which need different fixes.

    python benchmarks/profile_model.py --batches 8,1 --jobs forward,train,lora
    python benchmarks/profile_model.py --tiny --device cpu   # smoke run (no CUDA kernels)
    python benchmarks/profile_model.py --batches 1 --jobs forward --trace traces/
        # also writes each cell's profile as a gzipped Chrome trace (chrome://tracing, Perfetto)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import statistics
import time

import torch
from bench_model import cleanup, make_variant, model_config, report, step_fn, time_steps
from torch.profiler import ProfilerActivity, profile

KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("flip", ("_bitflip_kernel", "_bitflip_pair_kernel")),
    ("lora merge+flip", ("_merge_flip_kernel",)),
    ("lora correction", ("_zeroed_correction_kernel",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, parts in KINDS:
        if any(p.lower() in low for p in parts):
            return kind
    return "other"


def kernel_times(prof, steps: int):
    """({kind: ms per step}, kernels per step, top kernels [(name, ms per step)])."""
    by_kind = collections.Counter()
    by_name = collections.Counter()
    count = 0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if getattr(evt, "is_user_annotation", False) or "#" in evt.name:
            continue  # ranges such as "Optimizer.step#AdamW.step" span kernels, are not one
        ms = evt.time_range.elapsed_us() / 1e3
        by_kind[kind_of(evt.name)] += ms / steps
        by_name[evt.name[:80]] += ms / steps
        count += 1
    return dict(by_kind), count / steps, by_name.most_common(8)


def host_ms(step, device, steps: int) -> float:
    """Median ms until ``step()`` returns (work queued, not finished): near the wall time, the
    step is bound by the host; well under it, by the GPU."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


def profile_cell(job, variant, batch, args, cfg, device, dtype):
    model = make_variant(job, variant, cfg, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.seq), device=device)
    step = step_fn(job, model, ids, False)
    try:
        wall, peak = time_steps(step, device, args.warmup, args.steps)
        host = host_ms(step, device, args.steps)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(args.profile_steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        kinds, launches, top = kernel_times(prof, args.profile_steps)
        if args.trace:
            save_trace(prof, os.path.join(args.trace, f"{job}_{variant}_b{batch}.json"))
    finally:
        del model, step
        cleanup()
    return dict(
        batch=batch,
        job=job,
        variant=variant,
        wall_ms=wall,
        host_ms=host,
        kernel_ms=sum(kinds.values()),
        kinds=kinds,
        kernels_per_step=launches,
        top=top,
    )


def save_trace(prof, path: str) -> None:
    """Write the profile as a gzipped Chrome trace ``path + ".gz"`` (CPU ops, CUDA runtime
    calls and kernels on one time line: where the host and the GPU wait for each other)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(path)


def markdown(cells) -> str:
    kinds = [k for k, _ in KINDS] + ["other"]
    head = "| batch | job | variant | wall ms | host ms | kernel ms | "
    head += " | ".join(kinds) + " | kernels |"
    lines = [head, "|" + "---:|" * 3 + "---:|" * (4 + len(kinds))]
    for c in cells:
        parts = " | ".join(f"{c['kinds'].get(k, 0.0):.1f}" for k in kinds)
        lines.append(
            f"| {c['batch']} | {c['job']} | {c['variant']} | {c['wall_ms']:.1f} | "
            f"{c['host_ms']:.1f} | "
            f"{c['kernel_ms']:.1f} | {parts} | {c['kernels_per_step']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--jobs", default="forward,train")
    ap.add_argument("--variants", default="clean,ours")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the cells and metadata as JSON here")
    ap.add_argument("--trace", default=None, help="directory for gzipped Chrome traces")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = model_config(args.tiny)
    cells = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for job in args.jobs.split(","):
            for variant in args.variants.split(","):
                cell = profile_cell(job, variant, batch, args, cfg, device, torch.bfloat16)
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    report(cells, device, markdown(cells), args.out, seq=args.seq, steps=args.steps)
    return cells


if __name__ == "__main__":
    main()
