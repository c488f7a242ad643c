"""Kernel time of the burst kernel against the flip kernel at the same expected flipped bits
per element (``p = q k / bits``), on a CUDA GPU: the launches alone, no host overhead.

    python benchmarks/tuning/burst_kernel_time.py [--shape 4096x4096] [--q 1e-6,2^-16,2^-10]

Prints microseconds per launch (``triton.testing.do_bench``, median) of the flip launch at p
and the burst launch at (q, k), without and with a zero-out threshold (1.25), in bf16."""

from __future__ import annotations

import argparse

import torch
import triton

from peft_bitflip.bursts import BurstSpec
from peft_bitflip.kernels import triton_bitflip, triton_burst
from peft_bitflip.kernels.burst_sampling import burst_shape, burst_table
from peft_bitflip.kernels.sampling import flip_table


def parse_rate(text: str) -> float:
    return 2.0 ** float(text[2:]) if text.startswith("2^") else float(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--q", default="1e-6,2^-16,2^-10", help="comma-separated event rates")
    ap.add_argument("--k", default="2,4", help="comma-separated burst lengths")
    args = ap.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.split("x"))
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.01
    call = torch.ones((), dtype=torch.int64, device="cuda")

    def bench(fn):
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    print("| q | k | zero-out | flip us | burst us | burst / flip |")
    print("|---|---|---|---:|---:|---:|")
    for q_text in args.q.split(","):
        q = parse_rate(q_text)
        for k in (int(v) for v in args.k.split(",")):
            spec = BurstSpec(q, k)
            shape = burst_shape(spec.lengths, spec.field, x.dtype)
            b_table = burst_table(spec.rate, spec.lengths, x.dtype, x.device)
            p = q * k / 16
            f_table = flip_table(p, p, x.dtype, x.device)
            for t in (None, 1.25):
                flip = bench(lambda: triton_bitflip.launch(x, f_table, call, 3, 4, t, True))
                burst = bench(
                    lambda: triton_burst.launch_burst(x, b_table, shape, call, 3, 4, t)
                )  # fmt: skip
                print(f"| {q_text} | {k} | {t or '-'} | {flip:.1f} | {burst:.1f} "
                      f"| {burst / flip:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
