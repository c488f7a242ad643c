"""Cost of stuck-at faults against transient flips at the same rate (issue 33: within 1.1x).

Per rate p, the median time of:

* op level, on one weight: ``flip`` (the transient-flip op, every bit at p), ``stuck`` (forcing
  the stuck bits drawn at p; the draw is cached, as in a layer) and ``stuck+flip``;
  ``x lanes`` forces stuck input lanes of a (tokens, in) activation;
* layer level, a ``BitflipLinear`` forward without gradients and a forward + backward, with
  faults on the weight only: transient flips at p, stuck bits at p, both; ``clean`` is
  the layer with nothing to do.

Ratios are ``stuck / flip``.  Usage (CPU or a CUDA machine)::

    python benchmarks/bench_stuck_at.py [--device cuda] [--out 4096 --in 4096 --tokens 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import peft_bitflip as pb
from peft_bitflip.spec import FlipSpec
from peft_bitflip.stuck_at import StuckAt, StuckSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms (the device synchronised around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def layer(n_out, n_in, dtype, device, **faults) -> nn.Module:
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(n_in, n_out, bias=False)}).to(device, dtype)
    pb.apply_bitflip(holder, pb.BitflipConfig(**faults))
    return holder["l"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--out", dest="n_out", type=int, default=4096)
    ap.add_argument("--in", dest="n_in", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--p", default="1e-6,2^-16,2^-10", help="comma-separated rates")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rates = [
        (s, 2.0 ** float(s[2:]) if s.startswith("2^") else float(s)) for s in args.p.split(",")
    ]
    w = torch.randn(args.n_out, args.n_in, dtype=dtype, device=device)
    x = torch.randn(args.tokens, args.n_in, dtype=dtype, device=device)
    key = pb.stream_key(0, "bench", "w")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = f"W {args.n_out}x{args.n_in}, x {args.tokens}x{args.n_in}"
    print(f"device {device} ({name}), {args.dtype}, {shapes}, median of {args.reps}")
    print(
        "| p | op: flip | stuck | stuck+flip | x lanes | stuck/flip | layer fwd: clean | flip "
        "| stuck | both | stuck/flip | fwd+bwd: flip | stuck | stuck/flip |"
    )
    print("|---" * 14 + "|")
    for label, p in rates:
        spec = FlipSpec(p, p)
        stuck = StuckAt("bench", 0, StuckSpec(p, p), StuckSpec(p, p))
        stuck.bits("w", w.numel(), dtype, device)  # drawn once, as a layer does
        stuck.bits("x", args.n_in, dtype, device)
        op = {
            "flip": lambda: pb.apply_flip_spec(w, spec, key, 1),
            "stuck": lambda: stuck.stuck("w", w),
            "both": lambda: pb.apply_flip_spec(stuck.stuck("w", w), spec, key, 1),
            "x": lambda: stuck.stuck("x", x),
        }
        op_ms = {k: median_ms(f, device, args.reps) for k, f in op.items()}
        layers = {
            "clean": layer(args.n_out, args.n_in, dtype, device),
            "flip": layer(args.n_out, args.n_in, dtype, device, w_p_exp=p, w_p_frac=p),
            "stuck": layer(args.n_out, args.n_in, dtype, device, w_stuck_p_exp=p, w_stuck_p_frac=p),
            "both": layer(
                args.n_out,
                args.n_in,
                dtype,
                device,
                w_p_exp=p,
                w_p_frac=p,
                w_stuck_p_exp=p,
                w_stuck_p_frac=p,
            ),  # fmt: skip
        }
        fwd = {}
        with torch.no_grad():
            for k, m in layers.items():
                fwd[k] = median_ms(lambda m=m: m(x), device, args.reps)
        train = {}
        xg = x.clone().requires_grad_()
        for k in ("flip", "stuck"):
            m = layers[k]
            train[k] = median_ms(lambda m=m: m(xg).sum().backward(), device, args.reps)
        print(
            f"| {label} | {op_ms['flip']:.3f} | {op_ms['stuck']:.3f} | {op_ms['both']:.3f} "
            f"| {op_ms['x']:.3f} | {op_ms['stuck'] / op_ms['flip']:.2f}x | {fwd['clean']:.2f} "
            f"| {fwd['flip']:.2f} | {fwd['stuck']:.2f} | {fwd['both']:.2f} "
            f"| {fwd['stuck'] / fwd['flip']:.2f}x | {train['flip']:.2f} | {train['stuck']:.2f} "
            f"| {train['stuck'] / train['flip']:.2f}x |"
        )


if __name__ == "__main__":
    main()
