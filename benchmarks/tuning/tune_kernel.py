"""Try block shapes of the bit-flip kernel (rows of groups per program, warps) on a CUDA GPU."""

from __future__ import annotations

import itertools

import torch
import triton

from peft_bitflip.kernels import triton_bitflip
from peft_bitflip.kernels.sampling import flip_table

n = 1 << 28
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    ms = triton.testing.do_bench(lambda: out.copy_(x), return_mode="median")
    print(dtype, "copy", f"{nbytes / ms / 1e6:.0f} GB/s")
    call = torch.tensor(0, device="cuda")
    for p in (2**-10, 2**-16, 1e-9):
        table = flip_table(p, p, dtype, "cuda")
        for rows, warps in itertools.product((32, 64, 128, 256, 512), (2, 4, 8)):
            if rows < 32 * warps // 4:
                continue
            f = lambda: triton_bitflip.launch(
                x, table, call, 1, 2, None, True, rows=rows, num_warps=warps
            )  # noqa: E731
            ms = triton.testing.do_bench(f, return_mode="median")
            print(
                dtype,
                f"p={p:.3g}",
                f"rows={rows} warps={warps}",
                f"{nbytes / ms / 1e6:.0f} GB/s",
                flush=True,
            )
