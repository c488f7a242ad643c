"""One flip of a tensor on the CPU, per p: the default CPU path (the native pass) against the
torch path (``PEFT_BITFLIP_CPU_NATIVE=0``), and a clone of the tensor as the floor.

    python benchmarks/bench_cpu_flip.py [--shape 4096x1024] [--dtype bf16] [--threads 2]

Both bit groups at p, zero-out at 30; median of ``--repeats`` calls after one warm-up (the
native pass is built or loaded, the torch path's loops compiled, during the warm-up).  Run it
at another checkout (``PYTHONPATH=...``) for an A/B in one session.  Prints a markdown table.
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

P_VALUES = "2^-16,2^-10,2^-9,2^-6,2^-4,0.3,0.5"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_p(text: str) -> float:
    return 2.0 ** float(text[2:]) if text.startswith("2^") else float(text)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(args) -> dict:
    """{p name: ms} in this process (``"clone"``: the floor)."""
    import peft_bitflip as pb

    torch.set_num_threads(args.threads)
    rows, cols = (int(v) for v in args.shape.split("x"))
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 4).to(
        DTYPES[args.dtype]
    )
    key = pb.stream_key(1, "bench")
    out = {"clone": median_ms(x.clone, args.repeats)}
    for name in args.p.split(","):
        spec = pb.FlipSpec(parse_p(name), parse_p(name), 30.0)
        out[name] = median_ms(lambda: pb.apply_flip_spec(x, spec, key, 0), args.repeats)
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x1024")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--p", default=P_VALUES, help="comma-separated p (2^-n or decimals)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paths", default="native,torch", help="native, torch or both")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(repr(measure(args)))
        return ""
    results = {}
    for label in args.paths.split(","):
        env = {**os.environ, "PEFT_BITFLIP_CPU_NATIVE": "1" if label == "native" else "0"}
        child = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--_child"]
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
        results[label] = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own repr
    labels = list(results)
    rows = ["| p | " + " | ".join(f"{label} ms" for label in labels) + " |"]
    rows.append("|---|" + "---:|" * len(labels))
    for name in ["clone", *args.p.split(",")]:
        rows.append(f"| {name} | " + " | ".join(f"{results[k][name]:.1f}" for k in labels) + " |")
    table = "\n".join(rows)
    print(
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"{args.dtype} {args.shape}, zero-out at 30, median of {args.repeats}\n\n{table}"
    )
    return table


if __name__ == "__main__":
    main()
