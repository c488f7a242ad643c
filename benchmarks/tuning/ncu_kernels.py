"""Launch each bit-flip kernel once, as the 1B-Llama layers launch it, for Nsight Compute.

Every launch is run once untimed (compile, tables), then once more between
``cudaProfilerStart``/``Stop``, so that ``ncu --profile-from-start off`` sees exactly one
launch per row, in the order printed (bf16 weight 5632 x 2048, r = 32, the original's fault
model: p = 2^-16, thresholds 1.25 for W and 30 for x; x has ``--tokens`` rows):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python benchmarks/tuning/ncu_kernels.py

Without ncu it prints the rows and each launch's median time (``triton.testing.do_bench``).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import peft_bitflip as pb
from peft_bitflip.kernels import triton_bitflip, triton_lora
from peft_bitflip.kernels.sampling import flip_table

P, T_W, T_X = 2**-16, 1.25, 30.0


def launches(out_f: int, in_f: int, tokens: int, rank: int = 32, dev: str = "cuda") -> dict:
    """name -> a function making one launch (arguments built once, outside)."""
    torch.manual_seed(0)
    w = (torch.randn(out_f, in_f, device=dev) * 0.02).to(torch.bfloat16)
    a = torch.randn(rank, in_f, device=dev) * 0.02
    b = torch.randn(out_f, rank, device=dev) * 0.02
    x = torch.randn(tokens, in_f, device=dev).to(torch.bfloat16)
    g = torch.randn(tokens, out_f, device=dev).to(torch.bfloat16)
    table = flip_table(P, P, torch.bfloat16, torch.device(dev))
    call = torch.zeros((), dtype=torch.int64, device=dev)
    kw, kx = pb.stream_key(0, "ncu", "w"), pb.stream_key(0, "ncu", "x")
    factors = (
        torch.empty(out_f, rank, dtype=torch.bfloat16, device=dev),
        torch.empty(rank, in_f, dtype=torch.bfloat16, device=dev),
    )
    _, mask, _, _ = triton_lora.merge_flip_with_x(
        w, b, a, 2.0, w.dtype, table, call, *kw, T_W, True, True, factors=factors
    )
    da = torch.zeros(a.shape, device=dev)
    db = torch.zeros(b.shape, device=dev)
    return {
        "clone W": lambda: w.clone(),
        "merge only (no flips, no zero-out)": lambda: triton_lora.merge_flip(
            w, b, a, 2.0, w.dtype, table, call, *kw, None, False, False
        ),
        "flip kernel alone on W (zero-out)": lambda: triton_bitflip.launch(
            w, table, call, *kw, T_W, True
        ),
        "merge + flip + zero (W only)": lambda: triton_lora.merge_flip(
            w, b, a, 2.0, w.dtype, table, call, *kw, T_W, True, False
        ),
        "forward launch: merge + flip W and x": lambda: triton_lora.merge_flip_with_x(
            w,
            b,
            a,
            2.0,
            w.dtype,
            table,
            call,
            *kw,
            T_W,
            True,
            False,
            x=x,
            x_table=table,
            x_key=kx,
            x_threshold=T_X,
            x_flips=True,
            want_x_mask=True,
        ),  # fmt: skip
        "backward launch: merge + flip + mask + factors": lambda: triton_lora.merge_flip_with_x(
            w, b, a, 2.0, w.dtype, table, call, *kw, T_W, True, True, factors=factors
        ),
        "pair kernel: flip x and W": lambda: triton_bitflip.launch_pair(
            x, w, table, table, call, kx, kw, T_X, T_W, True, True, True
        ),
        "correction": lambda: triton_lora.subtract_zeroed_correction_(da, db, mask, g, x, a, b),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="5632x2048", help="out x in of the weight")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--only", default="", help="comma-separated row numbers (default: all)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    rows = list(launches(out_f, in_f, args.tokens, dev=args.device).items())
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        rows = [r for i, r in enumerate(rows) if i in keep]
    for _, fn in rows:
        fn()
    if args.device == "cpu":
        print("ran:", ", ".join(name for name, _ in rows))
        return [name for name, _ in rows]
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, fn in rows:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(torch.cuda.get_device_name(), f"W {out_f}x{in_f} bf16, {args.tokens} tokens")
    for i, (name, fn) in enumerate(rows):
        print(f"{i}: {name}: {do_bench(fn) * 1e3:.1f} us", flush=True)
    return [name for name, _ in rows]


if __name__ == "__main__":
    main()
