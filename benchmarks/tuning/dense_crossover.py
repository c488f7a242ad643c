"""Where the flip kernel's time goes at high p: each field path forced, and the Philox floor.

Prints three tables (CUDA only):

1. ``sparse`` vs ``dense`` at each p, both fields forced to one path (``sampling.FORCE_DENSE``),
   as % of a device copy, with the path the cost model picks: the data behind
   ``sampling.field_is_dense``'s constants.
2. The Philox floor: a Triton kernel with our memory layout (128-bit groups, 64 per program)
   that reads x, makes ``k`` Philox4x32-10 draws per group, XORs them in and writes y; k = 0 is
   a Triton copy.  The dense path at p = 2^-n needs n draws per group, so its row k = n is the
   best it can do with this generator.
3. Registers and spills of the flip kernel's compiled variants.

Usage: ``python benchmarks/tuning/dense_crossover.py [--log2n 28] [--dtypes fp32,bf16]``
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

import peft_bitflip as pb
from peft_bitflip.kernels import sampling
from peft_bitflip.kernels.triton_bitflip import _philox4x32

P_VALUES = [2**-12, 2**-10, 2**-9, 2**-8, 2**-7, 2**-6, 2**-5, 2**-4, 0.3, 0.5]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@triton.jit
def _philox_floor_kernel(x_ptr, y_ptr, n_groups, k0, k1, K: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, 4)
    ok = rows < n_groups
    offs = rows[:, None] * 4 + cols[None, :]
    w = tl.load(x_ptr + offs, mask=ok[:, None], other=0)
    c0 = rows.to(tl.uint32)
    c1 = (rows >> 32).to(tl.uint32)
    zero = c0 * 0
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    for k in tl.static_range(K):
        r0, r1, r2, r3 = _philox4x32(c0, c1, zero + k, zero, zero + k0, zero + k1, 10)
        acc0 = acc0 ^ r0
        acc1 = acc1 ^ r1
        acc2 = acc2 ^ r2
        acc3 = acc3 ^ r3
    m = tl.where(cols[None, :] < 2, tl.where(cols[None, :] == 0, acc0[:, None], acc1[:, None]), 0)
    m = tl.where(cols[None, :] >= 2, tl.where(cols[None, :] == 2, acc2[:, None], acc3[:, None]), m)
    tl.store(y_ptr + offs, w ^ m.to(tl.uint32), mask=ok[:, None])


def pct_of_copy(fn, copy_ms: float) -> float:
    return copy_ms / triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, default=28)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--draws", default="0,1,2,3,4,6,8,10")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    n = 1 << args.log2n
    call = torch.tensor(0, device="cuda")
    print(f"device {torch.cuda.get_device_name()}, 2^{args.log2n} elements")
    print("| dtype | p | model picks | sparse / copy | dense / copy |\n|---|---|---|---:|---:|")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        x = torch.randn(n, device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        copy_ms = triton.testing.do_bench(lambda: out.copy_(x), warmup=25, rep=200)
        key = pb.stream_key(1, 0)
        for p in P_VALUES:
            res = {}
            for mode in (False, True):
                sampling.FORCE_DENSE = mode
                spec = pb.FlipSpec(p, p)  # timed as the layers call it: no host sync
                res[mode] = pct_of_copy(lambda: pb.apply_flip_spec(x, spec, key, call), copy_ms)
            sampling.FORCE_DENSE = None
            n_e, _ = sampling.field_sizes(dtype)
            pick = "dense" if sampling.field_is_dense(p, n_e) else "sparse"
            print(
                f"| {dname} | 2^{torch.tensor(p).log2().item():.2f} | {pick} "
                f"| {res[False]:.1%} | {res[True]:.1%} |",
                flush=True,
            )
    x = torch.randn(n, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    xi, yi = x.view(torch.int32), y.view(torch.int32)
    groups = n // 4
    print("\n| Philox draws per 128-bit group | % of copy |\n|---:|---:|")
    for k in [int(v) for v in args.draws.split(",")]:
        grid = (triton.cdiv(groups, 64),)
        pct = pct_of_copy(
            lambda: _philox_floor_kernel[grid](xi, yi, groups, 1234, 5678, K=k, R=64, num_warps=2),
            copy_ms,
        )
        print(f"| {k} | {pct:.1%} |", flush=True)
    print("\n| kernel | registers | spills |\n|---|---:|---:|")
    from peft_bitflip.kernels import triton_bitflip

    for name in dir(triton_bitflip):
        fn = getattr(triton_bitflip, name)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        for dev_cache in caches.values():
            for compiled in dev_cache[0].values():
                print(
                    f"| {name} | {getattr(compiled, 'n_regs', '?')} "
                    f"| {getattr(compiled, 'n_spills', '?')} |"
                )


if __name__ == "__main__":
    main()
