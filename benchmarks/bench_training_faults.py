"""Cost of a training-step fault site against the transient-flip kernel at the same rate
(issue 33.4: within 1.1x).

A site of :class:`~peft_bitflip.training_faults.TrainingFaults` (dW, AdamW's moments, the
parameters) flips a tensor in place and counts its flips and zeroed elements for the logs.
Per tensor and rate p (every bit):

* ``flip``: the transient-flip op ``apply_flip_spec`` (out of place), the baseline;
* ``site``: what a site runs, ``apply_flip_spec_counted(..., out=t)``: on the GPU one kernel
  pass that flips, zeroes, counts and writes in place;
* ``separate``: the same result the way the hooks ran it before (flip, a count kernel over
  the tensor and its flip, a copy back), for comparison.

Times are medians in ms (CUDA events on the GPU); ratios are to ``flip`` of the same tensor
and p in the same run.  Usage::

    python benchmarks/bench_training_faults.py [--shape 4096x4096] [--doc docs/benchmarks.md]
    python benchmarks/bench_training_faults.py --small  # CPU smoke run of the script
"""

from __future__ import annotations

import argparse

import torch
from bench_model import meta_lines, parse_p, report, time_steps, write_doc_table

from peft_bitflip.functional import apply_flip_spec
from peft_bitflip.kernels.op import new_flip_counts
from peft_bitflip.spec import FlipSpec
from peft_bitflip.stats import _add_counts, apply_flip_spec_counted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DOC_MARKERS = (
    "<!-- bench_training_faults.py --doc: sites vs flips (start) -->",
    "<!-- bench_training_faults.py --doc: sites vs flips (end) -->",
)
VARIANTS = ("flip", "site", "separate")


def variant_fns(t: torch.Tensor, spec: FlipSpec) -> dict:
    """{variant: a call} on tensor ``t`` (the site variants write into it: its values drift
    between calls, which the flips' cost does not depend on)."""
    key, counts = (3, 4), new_flip_counts(t.device)
    flips_only = FlipSpec(spec.p_exp, spec.p_frac)

    def separate():
        flipped = apply_flip_spec(t, flips_only, key, 1)
        _add_counts(counts[0], t, flipped, spec.zero_out_threshold)
        if spec.zero_out_threshold is not None:
            flipped = apply_flip_spec(
                flipped, FlipSpec(zero_out_threshold=spec.zero_out_threshold), key
            )
        t.copy_(flipped)

    return {
        "flip": lambda: apply_flip_spec(t, spec, key, 1),
        "site": lambda: apply_flip_spec_counted(t, spec, key, 1, counts, out=t),
        "separate": separate,
    }


def markdown(rows, meta: dict) -> str:
    run = f"W {meta['shape']}; median of {meta['reps']} after {meta['warmup']}"
    lines = [
        *meta_lines(meta, run),
        "| dtype | p | zero-out | flip ms | site ms | site / flip | separate ms "
        "| separate / flip |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['dtype']} | {r['p']} | {r['threshold']} | {ms['flip']:.3f} | {ms['site']:.3f} "
            f"| {ms['site'] / ms['flip']:.2f}x | {ms['separate']:.3f} "
            f"| {ms['separate'] / ms['flip']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--shape", default="4096x4096", help="the tensor, ROWSxCOLS")
    ap.add_argument("--p", default="1e-6,2^-16,2^-10", help="comma-separated rates")
    ap.add_argument("--thresholds", default="none,1.0", help="zero-out thresholds (none: off)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--count_shape",
        default=None,
        help="ROWSxWARPS of the counted launch on sparse tables (tuning; default: the library's)",
    )
    ap.add_argument("--small", action="store_true", help="toy sizes, 2 reps (CPU smoke run)")
    ap.add_argument("--out", default=None, help="write the rows and metadata as JSON here")
    ap.add_argument("--doc", default=None, help="write the table into this markdown file")
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.reps, args.warmup = "48x64", 2, 1
    shape = tuple(int(v) for v in args.shape.lower().split("x") if v.isdigit())
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"--shape must be ROWSxCOLS (positive ints), got {args.shape!r}")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: {bad} are not among {sorted(DTYPES)}")
    thresholds = [None if v == "none" else float(v) for v in args.thresholds.split(",")]
    if args.count_shape:
        from peft_bitflip.kernels import triton_bitflip

        triton_bitflip.COUNT_SHAPE = tuple(int(v) for v in args.count_shape.lower().split("x"))
        triton_bitflip._launch_config.cache_clear()
    device = torch.device(args.device)
    rows = []
    for dtype in args.dtypes.split(","):
        for name, p in parse_p(args.p):
            for threshold in thresholds:
                t = torch.randn(shape, dtype=DTYPES[dtype], device=device) * 0.01
                fns = variant_fns(t, FlipSpec(p, p, threshold))
                ms = {v: time_steps(f, device, args.warmup, args.reps)[0] for v, f in fns.items()}
                rows.append(dict(dtype=dtype, p=name, threshold=threshold or "-", ms=ms))
                print(rows[-1], flush=True)
    meta = report(rows, device, "", args.out, warmup=args.warmup, shape=args.shape, reps=args.reps)
    table = markdown(rows, meta)
    print(table)
    if args.doc:
        write_doc_table(args.doc, table, DOC_MARKERS)
    return rows


if __name__ == "__main__":
    main()
