"""``peft-bitflip`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def demo(args) -> int:
    """Flip a random tensor at several error rates and compare the measured rates with p."""
    from . import bitflip
    from .kernels.op import backend_for
    from .stats import count_flips

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    print(
        f"peft-bitflip demo: {args.n} {args.dtype} elements on {device} "
        f"(backend: {backend_for(device)}), seed {args.seed}"
    )
    print(
        f"{'p':>10} {'exp flips':>10} {'expected':>10} {'z':>6} {'frac flips':>10} "
        f"{'expected':>10} {'z':>6} {'zeroed |y|>=t':>14}"
    )
    worst = 0.0
    for p in args.p:
        y = bitflip(x, p, p, None, seed=args.seed, stream="demo")
        c = count_flips(x, y)
        z_e, z_f = c.z_scores(p, p)
        zeroed = int(
            (bitflip(x, p, p, args.threshold, seed=args.seed, stream="demo") == 0).sum()
            - (x == 0).sum()
        )
        worst = max(worst, abs(z_e), abs(z_f))
        print(
            f"{p:>10.3g} {c.exp_bits:>10} {c.n_elements * c.n_exp * p:>10.1f} {z_e:>6.2f} "
            f"{c.frac_bits:>10} {c.n_elements * c.n_frac * p:>10.1f} {z_f:>6.2f} {zeroed:>14}"
        )
    ok = worst <= 5.0
    print(f"largest deviation {worst:.2f} standard deviations: {'OK' if ok else 'FAIL'} (limit 5)")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft-bitflip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="flip a random tensor and check the flip rates (offline)")
    d.add_argument("--n", type=int, default=1 << 20, help="number of elements")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--p", type=float, nargs="+", default=[0.5, 2**-6, 1e-3, 2**-16])
    d.add_argument("--threshold", type=float, default=30.0, help="zero-out threshold")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
