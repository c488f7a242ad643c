"""Flip-kernel bandwidth at small p for whichever peft_bitflip is importable: an A/B of two
checkouts in one session on one GPU (% of a device copy, 2^28 elements, with and without
zero-out).  Run it once per checkout, alternating::

    PYTHONPATH=/path/to/old python benchmarks/tuning/ab_small_p.py old
    PYTHONPATH=.            python benchmarks/tuning/ab_small_p.py new

(Used on 2026-12-06 for the sparse-only launches against the code before the dense path.)
"""

from __future__ import annotations

import sys

import torch
import triton

import peft_bitflip as pb

P_VALUES = (2**-16, 2**-24, 1e-9)


def main(argv=None):
    label = (argv if argv is not None else sys.argv[1:] or ["?"])[0]
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"{label}: {pb.__file__}")
    n = 1 << 28
    call = torch.tensor(0, device="cuda")
    key = pb.stream_key(1, 0)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(n, device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        copy = triton.testing.do_bench(lambda: out.copy_(x), warmup=25, rep=200)
        for p in P_VALUES:
            for t in (None, 30.0):
                spec = pb.FlipSpec(p, p, t)  # as the layers call it: no host sync per call
                ms = triton.testing.do_bench(
                    lambda: pb.apply_flip_spec(x, spec, key, call), warmup=25, rep=200
                )
                print(f"{label} {name} p={p:.3g} t={t} {copy / ms:.1%}", flush=True)


if __name__ == "__main__":
    main()
