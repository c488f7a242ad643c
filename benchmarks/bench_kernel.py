"""Bandwidth of the bit-flip kernel vs a device copy and vs mase-triton's ``random_bitflip_fn``.

GB/s = 2 * bytes(x) / time (read x, write y), time = median of ``triton.testing.do_bench``.
Ours is timed as the layers call it (``apply_flip_spec`` with the call index in a device tensor,
so no call waits for the device; ``pb.bitflip`` with a tensor ``call`` checks its value, a host
sync per call that would be timed too).
Usage (on a CUDA machine)::

    python benchmarks/bench_kernel.py [--log2n 28] [--thresholds none,30] [--out results.md]

The ``path`` column says which path each field (exp/frac) takes at that p (sparse gap
sampling or dense bit-sliced comparison, see docs/kernel.md).  mase-triton only supports
p = 0.5**n with n <= 24, so its cells are empty at 0.3, 1e-9 and 1e-12.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import sys

import torch
import triton

import peft_bitflip as pb
from peft_bitflip.kernels.sampling import dense_words, flip_table

P_VALUES = [
    ("0.5", 0.5),
    ("0.3", 0.3),
    ("2^-4", 2**-4),
    ("2^-6", 2**-6),
    ("2^-8", 2**-8),
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


def path_name(p: float, dtype) -> str:
    """``exp path/frac path`` at p (both fields flipped at p), as the flip table chooses."""
    e, f = dense_words(flip_table(p, p, dtype, "cpu"), dtype)
    return f"{'dense' if e else 'sparse'}/{'dense' if f else 'sparse'}"


def mase_halves(p: float) -> int | None:
    """n with p = 0.5**n (n <= 24), mase-triton's parameter; None where it has none."""
    n = -math.log2(p) if p > 0 else math.inf
    return int(n) if n == int(n) and n <= 24 else None


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
        "--thresholds",
        default="none",
        help="comma-separated zero-out thresholds, 'none' for no zero-out (default none)",
    )
    ap.add_argument("--p", default=None, help="comma-separated subset of the p names")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--no-mase", action="store_true")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    n = 1 << args.log2n
    mase = None if args.no_mase else mase_fn()
    thresholds = [None if v == "none" else float(v) for v in args.thresholds.split(",")]
    p_values = P_VALUES
    if args.p:
        p_values = [(n, p) for n, p in P_VALUES if n in args.p.split(",")]
    cli_args = argv if argv is not None else sys.argv[1:]
    lines = [
        f"### Kernel bandwidth, 2^{args.log2n} elements, zero-out thresholds {args.thresholds}",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}",
        f"- date: {datetime.date.today().isoformat()}; host: {platform.node()}",
        f"- command: `python benchmarks/bench_kernel.py {' '.join(cli_args)}`",
        "",
        "| dtype | zero-out | p | path | copy GB/s | ours GB/s | ours / copy | mase-triton GB/s "
        "| mase / copy | ours / mase |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        x = torch.randn(n, device="cuda", dtype=dtype)
        nbytes = x.numel() * x.element_size()
        out = torch.empty_like(x)
        copy = gbps(lambda: out.copy_(x), nbytes)
        call = torch.tensor(0, device="cuda")
        key = pb.stream_key(1, 0)
        for t, (pname, p) in itertools.product(thresholds, p_values):
            spec = pb.FlipSpec(p, p, t)
            ours = gbps(lambda: pb.apply_flip_spec(x, spec, key, call), nbytes)
            m = None
            halves = mase_halves(p)
            if mase is not None and halves is not None:
                m = gbps(lambda: mase(x, halves, halves, 0, 0, t), nbytes)
            ms = f"{m:.0f}" if m else "n/a"
            mr = f"{m / copy:.1%}" if m else "n/a"
            om = f"{ours / m:.2f}x" if m else "n/a"
            lines.append(
                f"| {dname} | {t if t is not None else 'none'} | {pname} | {path_name(p, dtype)} "
                f"| {copy:.0f} | {ours:.0f} | {ours / copy:.1%} | {ms} | {mr} | {om} |"
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
