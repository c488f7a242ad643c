"""The dense flip path next to the Philox floor with as many draws, once each, for Nsight Compute.

For each p = 2^-n in ``--n``: the flip kernel with both fields forced dense (n draws per group)
and ``dense_crossover``'s floor kernel with K = n draws, each launched once untimed (compile)
and once between ``cudaProfilerStart``/``Stop``, so that

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section InstructionStats python benchmarks/tuning/ncu_dense.py

profiles exactly two launches per n, in the order printed (bf16, ``--log2n`` elements)."""

from __future__ import annotations

import argparse

import torch
import triton
from dense_crossover import _philox_floor_kernel

from peft_bitflip.kernels import triton_bitflip
from peft_bitflip.kernels.sampling import flip_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,4,8", help="comma-separated n of p = 2^-n")
    ap.add_argument("--log2n", type=int, default=26)
    args = ap.parse_args(argv)
    x = torch.randn(1 << args.log2n, device="cuda", dtype=torch.bfloat16)
    xi = x.view(torch.int32)
    yi = torch.empty_like(xi)
    groups = xi.numel() // 4
    call = torch.zeros((), dtype=torch.int64, device="cuda")
    runs = []
    for n in (int(v) for v in args.n.split(",")):
        table = flip_table(2.0**-n, 2.0**-n, torch.bfloat16, "cuda", dense=(True, True))
        runs.append((f"flip, dense, p = 2^-{n}", lambda t=table: triton_bitflip.launch(
            x, t, call, 1, 2, None, True)))  # fmt: skip
        grid = (triton.cdiv(groups, 64),)
        runs.append((f"floor, {n} draws", lambda k=n: _philox_floor_kernel[grid](
            xi, yi, groups, 1234, 5678, K=k, R=64, num_warps=2)))  # fmt: skip
    for _, fn in runs:
        fn()
    torch.cuda.synchronize()
    for name, fn in runs:
        print(name, flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
