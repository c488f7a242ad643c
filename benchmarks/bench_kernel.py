"""Bandwidth of the bit-flip kernel vs a device copy and vs mase-triton's ``random_bitflip_fn``.

GB/s = 2 * bytes(x) / time (read x, write y), time = median of ``triton.testing.do_bench``.
Usage (on a CUDA machine)::

    python benchmarks/bench_kernel.py [--log2n 28] [--threshold 30] [--out results.md]

mase-triton only supports p = 0.5**n with n <= 24, so its cells are empty at 1e-9 and 1e-12.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys

import torch
import triton

import peft_bitflip as pb

P_VALUES = [
    ("0.5", 0.5),
    ("2^-10", 2**-10),
    ("2^-16", 2**-16),
    ("2^-24", 2**-24),
    ("1e-9", 1e-9),
    ("1e-12", 1e-12),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gbps(fn, nbytes: int) -> float:
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def mase_fn():
    try:
        from mase_triton.random_bitflip.core import random_bitflip_fn
    except Exception as e:  # pragma: no cover - optional comparison
        print(f"mase-triton not available: {e}", file=sys.stderr)
        return None
    return random_bitflip_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, default=28)
    ap.add_argument(
        "--threshold", type=float, default=None, help="zero-out threshold (default none)"
    )
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--no-mase", action="store_true")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    n = 1 << args.log2n
    mase = None if args.no_mase else mase_fn()
    t = args.threshold
    cli_args = argv if argv is not None else sys.argv[1:]
    lines = [
        f"### Kernel bandwidth, 2^{args.log2n} elements, zero-out threshold {t}",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}",
        f"- date: {datetime.date.today().isoformat()}; host: {platform.node()}",
        f"- command: `python benchmarks/bench_kernel.py {' '.join(cli_args)}`",
        "",
        "| dtype | p | copy GB/s | ours GB/s | ours / copy | mase-triton GB/s | mase / copy "
        "| ours / mase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        x = torch.randn(n, device="cuda", dtype=dtype)
        nbytes = x.numel() * x.element_size()
        out = torch.empty_like(x)
        copy = gbps(lambda: out.copy_(x), nbytes)
        call = torch.tensor(0, device="cuda")
        for pname, p in P_VALUES:
            ours = gbps(lambda: pb.bitflip(x, p, p, t, seed=1, call=call), nbytes)
            m = None
            if mase is not None and p >= 2**-24:
                halves = round(-math.log2(p))
                m = gbps(lambda: mase(x, halves, halves, 0, 0, t), nbytes)
            ms = f"{m:.0f}" if m else "n/a"
            mr = f"{m / copy:.1%}" if m else "n/a"
            om = f"{ours / m:.1f}x" if m else "n/a"
            lines.append(
                f"| {dname} | {pname} | {copy:.0f} | {ours:.0f} | {ours / copy:.1%} "
                f"| {ms} | {mr} | {om} |"
            )
            print(lines[-1], flush=True)
        x = out = None
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
