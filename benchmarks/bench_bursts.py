"""Cost of burst faults against transient flips at the same expected flipped-bit rate (issue 33:
within 1.1x).

For each event rate q and burst length k, the transient flips run at ``p = q k / bits`` per bit
(every bit, both groups), so both flip ``q k`` bits per element on average.  Median time of:

* op level, on one weight: ``flip`` (the flip op at p), ``burst`` (the burst op at q, k), each
  without and with a zero-out threshold (``+t``);
* layer level, a ``BitflipLinear`` forward without gradients with faults on the weight only:
  flips at p, bursts at q (with the same zero-out threshold; the burst layer runs the burst op,
  then the zero-out); ``clean`` is the layer with nothing to do.

Ratios are ``burst / flip``.  Usage (CUDA: the Triton kernels; CPU: the PyTorch reference)::

    python benchmarks/bench_bursts.py [--device cuda] [--out 4096 --in 4096 --tokens 8192]
        [--doc docs/benchmarks.md]                     # writes its table there
    python benchmarks/bench_bursts.py --small          # a CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse

import torch
from bench_model import meta_lines, report, time_back_to_back, time_steps, write_doc_table
from torch import nn

import peft_bitflip as pb
from peft_bitflip.bursts import BurstSpec, apply_burst_spec
from peft_bitflip.spec import FlipSpec, check_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
THRESHOLD = 1.25  # the original's weight threshold
DOC_MARKERS = (
    "<!-- bench_bursts.py --doc: bursts vs flips (start) -->",
    "<!-- bench_bursts.py --doc: bursts vs flips (end) -->",
)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median time of ``fn()`` in ms over ``reps`` calls after two (device events on CUDA)."""
    return time_steps(fn, device, 2, reps)[0]


def layer(n_out, n_in, dtype, device, **faults) -> nn.Module:
    """A bias-free ``nn.Linear`` (seeded weights) with the faults of ``BitflipConfig(**faults)``."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(n_in, n_out, bias=False)}).to(device, dtype)
    pb.apply_bitflip(holder, pb.BitflipConfig(**faults))
    return holder["l"]


def parse_rate(text: str) -> float:
    return 2.0 ** float(text[2:]) if text.startswith("2^") else float(text)


def markdown(rows, meta: dict) -> str:
    """The doc table: one row per (q, k), times in ms, ratios burst / flip of the same run;
    the layer forward per call (synchronised: its host time counts) and back to back (mean
    per call of ``reps`` queued calls, median of 5 rounds: as in a model)."""
    run = f"{meta['dtype']}, {meta['shapes']}, median of {meta['reps']}, t = {THRESHOLD}; ms"
    lines = [
        *meta_lines(meta, run),
        "| q | k | p = qk/bits | op: flip | burst | burst/flip | flip+t | burst+t | burst/flip "
        "| layer fwd per call: burst/flip | back to back: clean | flip | burst | burst/flip |",
        "|---" * 14 + "|",
    ]
    for r in rows:
        ms, fwd, queued = r["op"], r["fwd"], r["queued"]
        lines.append(
            f"| {r['q']} | {r['k']} | {r['p']:.3g} | {ms['flip']:.3f} | {ms['burst']:.3f} "
            f"| {ms['burst'] / ms['flip']:.2f}x | {ms['flip_t']:.3f} | {ms['burst_t']:.3f} "
            f"| {ms['burst_t'] / ms['flip_t']:.2f}x | {fwd['burst'] / fwd['flip']:.2f}x "
            f"| {queued['clean']:.3f} | {queued['flip']:.3f} | {queued['burst']:.3f} "
            f"| {queued['burst'] / queued['flip']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--out", dest="n_out", type=int, default=4096)
    ap.add_argument("--in", dest="n_in", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--q", default="1e-6,2^-16,2^-10", help="comma-separated event rates")
    ap.add_argument("--k", default="2,4", help="comma-separated burst lengths")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="256x256 weight, 64 tokens, 3 reps")
    ap.add_argument("--doc", default=None, help="write the table into this markdown file")
    args = ap.parse_args(argv)
    if args.small:
        args.n_out = args.n_in = 256
        args.tokens, args.reps = 64, 3
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n_bits = check_dtype(dtype).n_bits
    w = torch.randn(args.n_out, args.n_in, dtype=dtype, device=device)
    x = torch.randn(args.tokens, args.n_in, dtype=dtype, device=device)
    key = pb.stream_key(0, "bench", "w")
    shapes = f"W {args.n_out}x{args.n_in}, x {args.tokens}x{args.n_in}"
    rows = []
    for q_text in args.q.split(","):
        q = parse_rate(q_text)
        for k in (int(s) for s in args.k.split(",")):
            p = q * k / n_bits
            flip, burst = FlipSpec(p, p), BurstSpec(q, k)
            flip_t = FlipSpec(p, p, THRESHOLD)
            op = {
                "flip": lambda: pb.apply_flip_spec(w, flip, key, 1),
                "burst": lambda: apply_burst_spec(w, burst, key, 1),
                "flip_t": lambda: pb.apply_flip_spec(w, flip_t, key, 1),
                "burst_t": lambda: apply_burst_spec(w, burst, key, 1, THRESHOLD),
            }
            ms = {name: median_ms(fn, device, args.reps) for name, fn in op.items()}
            layers = {
                "clean": layer(args.n_out, args.n_in, dtype, device),
                "flip": layer(
                    args.n_out,
                    args.n_in,
                    dtype,
                    device,
                    w_p_exp=p,
                    w_p_frac=p,
                    w_zero_out_t=THRESHOLD,
                ),  # fmt: skip
                "burst": layer(
                    args.n_out,
                    args.n_in,
                    dtype,
                    device,
                    w_burst_rate=q,
                    burst_length=k,
                    w_zero_out_t=THRESHOLD,
                ),  # fmt: skip
            }
            fwd, queued = {}, {}
            with torch.no_grad():
                for name, m in layers.items():
                    fwd[name] = median_ms(lambda m=m: m(x), device, args.reps)
                    queued[name] = time_back_to_back(lambda m=m: m(x), device, 2, args.reps)
            rows.append(dict(q=q_text, k=k, p=p, op=ms, fwd=fwd, queued=queued))
            print(rows[-1], flush=True)
    meta = report(rows, device, "", None, dtype=args.dtype, shapes=shapes, reps=args.reps)
    table = markdown(rows, meta)
    print(table)
    if args.doc:
        write_doc_table(args.doc, table, DOC_MARKERS)
    return rows


if __name__ == "__main__":
    main()
