"""The CPU path on a real model: a flipped forward against the clean one (issue 30's target:
<= 2x at p <= 2^-10), with the native pass (default) and the torch path
(``PEFT_BITFLIP_CPU_NATIVE=0``: its loops compiled by torch.compile).

    python benchmarks/bench_cpu_model.py --model /tmp/real-model/smollm2-135m --batch 8 --seq 512

Every linear layer but lm_head flips x and W at p (both bit groups), thresholds 30 / 1.25;
float32 weights, no_grad forward, the median of ``--repeats`` forwards after one warm-up (the
native pass is built or loaded, and the torch loops compiled, during the warm-up).  Prints the
markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def forward_seconds(model, ids, repeats: int) -> float:
    with torch.no_grad():
        model(input_ids=ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args) -> dict:
    """{p: seconds} in this process (``p = 0``: clean)."""
    os.environ["PEFT_BITFLIP_CPU_BACKEND"] = "reference"
    import peft_bitflip as pb
    from peft_bitflip.evaluation import load_model, reset_streams

    model, _ = load_model(args.model, None)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = {0.0: forward_seconds(model, ids, args.repeats)}
    for p in args.p:
        cfg = pb.BitflipConfig.original_default(x_p_exp=p, x_p_frac=p, w_p_exp=p, w_p_frac=p)
        pb.apply_bitflip(model, cfg)
        reset_streams(model)
        out[p] = forward_seconds(model, ids, args.repeats)
        pb.remove_bitflip(model)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--p", type=float, nargs="+", default=[2.0**-16, 2.0**-10])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--paths", default="native,torch", help="which CPU paths to time (native, torch or both)"
    )
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(repr(measure(args)))
        return ""
    results = {}
    paths = args.paths.split(",")
    for label, native_flag in (("native", "1"), ("torch", "0")):
        if label not in paths:
            results[label] = None
            continue
        env = {**os.environ, "PEFT_BITFLIP_CPU_NATIVE": native_flag}
        child = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--_child"]
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
        results[label] = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own repr
    rows = [
        "| p | clean s | flipped s (native) | ratio | flipped s (torch) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    native, torch_path = results["native"], results["torch"]
    for q in args.p:
        clean = (native or torch_path)[0.0]
        cells = [f"{q:.3g}", f"{clean:.2f}"]
        for r in (native, torch_path):  # each ratio to the clean forward of its own process
            cells += [f"{r[q]:.2f}", f"{r[q] / r[0.0]:.2f}x"] if r else ["-", "-"]
        rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{args.model}, batch {args.batch} x {args.seq} tokens, median of {args.repeats}\n\n"
        f"{table}"
    )
    return table


if __name__ == "__main__":
    main()
