"""Try block shapes of the bit-flip kernel (rows of groups per program, warps) on a CUDA GPU.

    python benchmarks/tuning/tune_kernel.py [--p 2^-10,2^-16,1e-9] [--dtypes bf16,fp32] [--log2n 28]

Prints GB/s (read + write) of a device copy and of each (rows, warps) per dtype and p (both
fields at p, no zero-out; the layers ship 64 rows x 2 warps)."""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from peft_bitflip.kernels import triton_bitflip
from peft_bitflip.kernels.sampling import flip_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_p(text: str) -> float:
    return 2.0 ** float(text[2:]) if text.startswith("2^") else float(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", default="2^-10,2^-16,1e-9", help="comma-separated flip rates")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--log2n", type=int, default=28)
    ap.add_argument("--rows", default="32,64,128,256,512")
    ap.add_argument("--warps", default="2,4,8")
    args = ap.parse_args(argv)
    n = 1 << args.log2n
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        x = torch.randn(n, device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        ms = triton.testing.do_bench(lambda: out.copy_(x), return_mode="median")
        copy = nbytes / ms / 1e6
        print(dname, "copy", f"{copy:.0f} GB/s")
        call = torch.tensor(0, device="cuda")
        for text in args.p.split(","):
            table = flip_table(parse_p(text), parse_p(text), dtype, "cuda")
            shapes = itertools.product(
                (int(v) for v in args.rows.split(",")), (int(v) for v in args.warps.split(","))
            )
            for rows, warps in shapes:
                if rows < 32 * warps // 4:
                    continue
                f = lambda: triton_bitflip.launch(  # noqa: E731
                    x, table, call, 1, 2, None, True, rows=rows, num_warps=warps
                )
                ms = triton.testing.do_bench(f, return_mode="median")
                gbs = nbytes / ms / 1e6
                print(
                    f"{dname} p={text} rows={rows} warps={warps} {gbs:.0f} GB/s "
                    f"({gbs / copy:.1%} of copy)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
