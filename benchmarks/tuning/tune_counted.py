"""Block shapes of the counted flip launch (a training-fault site: flip, count, zero-out, in
place) against the plain flip on a CUDA GPU, kernel time only.

    python benchmarks/tuning/tune_counted.py [--shape 4096x4096] [--p 1e-6,2^-16,2^-10]

Prints microseconds per launch (``triton.testing.do_bench``, median) of the flip (out of
place, the layers' shape), the same flip in place without counts (what the counting costs is
the counted launch minus this), the counted launch at the shipped shape and at each (rows,
warps) of ``--shapes`` (empty: none), per dtype, p and zero-out threshold (``--thresholds``,
default 1.0; ``none``: no zero-out).  In-place launches change x, which is redrawn per cell."""

from __future__ import annotations

import argparse

import torch
import triton

from peft_bitflip.kernels import triton_bitflip
from peft_bitflip.kernels.op import new_flip_counts
from peft_bitflip.kernels.sampling import flip_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_p(text: str) -> float:
    return 2.0 ** float(text[2:]) if text.startswith("2^") else float(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--p", default="1e-6,2^-16,2^-10")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--shapes", default="64x2,128x2,128x4,256x4,256x8")
    ap.add_argument("--thresholds", default="1.0", help="comma-separated; none: no zero-out")
    args = ap.parse_args(argv)
    thresholds = [None if v == "none" else float(v) for v in args.thresholds.split(",")]
    rows, cols = (int(v) for v in args.shape.split("x"))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    call = torch.ones((), dtype=torch.int64, device="cuda")
    print(
        "| dtype | p | zero-out | flip us | in place us | counted (shipped) us | "
        + " | ".join(f"{r}x{w}" for r, w in shapes)
        + " |"
    )
    for dname in args.dtypes.split(","):
        for ptext, t in ((pt, t) for pt in args.p.split(",") for t in thresholds):
            x = torch.randn(rows, cols, device="cuda", dtype=DTYPES[dname]) * 0.01
            p = parse_p(ptext)
            table = flip_table(p, p, x.dtype, x.device)
            counts = new_flip_counts(x.device)

            def bench(fn):
                return 1e3 * triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

            flip = bench(lambda: triton_bitflip.launch(x, table, call, 3, 4, t, True))
            in_place = bench(lambda: triton_bitflip.launch(x, table, call, 3, 4, t, True, out=x))
            shipped = bench(
                lambda: triton_bitflip.launch(x, table, call, 3, 4, t, True, counts=counts, out=x)
            )
            cells = []
            for r, w in shapes:
                try:
                    cells.append(bench(lambda: triton_bitflip.launch(
                        x, table, call, 3, 4, t, True, rows=r, num_warps=w, counts=counts, out=x
                    )))  # fmt: skip
                except Exception as err:  # e.g. out of resources
                    print(f"{dname} {ptext} {r}x{w}: {type(err).__name__}")
                    cells.append(float("nan"))
            zero = "-" if t is None else t
            print(f"| {dname} | {ptext} | {zero} | {flip:.1f} | {in_place:.1f} | {shipped:.1f} | "
                  + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
