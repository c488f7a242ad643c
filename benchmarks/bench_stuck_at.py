"""Cost of stuck-at faults against transient flips at the same rate (issue 33.4: within 1.1x).

One ``BitflipLinear`` (no bias) per variant, faults on the weight (``w``) or on the weight and
the input lanes (``x+w``), every bit at rate p:

* ``flip``: transient flips at p; ``stuck``: stuck bits at p; ``both``: the two together,
  each with zero-out on the tensors with faults (x at 30, W at 1.25); ``clean``: the layer
  with nothing to do (the floor);
* jobs: ``forward`` (no gradients), ``train, frozen W`` (forward + backward to x only: a LoRA
  base weight), ``train, W steps`` (forward + backward to x and W, then an in-place update of
  W, as an optimizer step: the stuck weight is built again at every step).

Times are medians in ms (CUDA events on the GPU); ratios are to ``flip`` of the same job,
tensors and p in the same run.  The op table times one stuck-weight build (what a layer pays
once per weight change) and one stuck-lane pass over x (what a layer pays where the flip
kernel cannot take them, e.g. on the CPU) against the flip op on the same tensor, and the flips
of W and of x with the stuck bits / lanes forced in their own pass (what a layer runs on the
GPU; the weight's bits while at most ``StuckAt.kernel_density`` of its elements have one).  Usage::

    python benchmarks/bench_stuck_at.py [--shape 4096x4096 --tokens 8192] [--doc docs/benchmarks.md]
    python benchmarks/bench_stuck_at.py --small  # CPU smoke run of the script
"""

from __future__ import annotations

import argparse

import torch
from bench_model import W_T, X_T, meta_lines, parse_p, report, time_steps, write_doc_table
from torch import nn

import peft_bitflip as pb
from peft_bitflip.functional import apply_flip_spec_masked
from peft_bitflip.spec import FlipSpec
from peft_bitflip.stuck_at import StuckAt, StuckSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DOC_MARKERS = (
    "<!-- bench_stuck_at.py --doc: stuck-at vs flips (start) -->",
    "<!-- bench_stuck_at.py --doc: stuck-at vs flips (end) -->",
)
VARIANTS = ("clean", "flip", "stuck", "both")
JOBS = ("forward", "train, frozen W", "train, W steps")


def layer(shape, dtype, device, variant: str, tensors: str, p: float) -> nn.Module:
    """A bit-flip layer of ``shape`` (out, in) with ``variant``'s faults on ``tensors``, each
    with its zero-out threshold (that of bench_model.py) where it has faults."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(shape[1], shape[0], bias=False)}).to(device, dtype)
    faults = {}
    for t in ("w", "x") if tensors == "x+w" else ("w",):
        if variant in ("flip", "both"):
            faults.update({f"{t}_p_exp": p, f"{t}_p_frac": p})
        if variant in ("stuck", "both"):
            faults.update({f"{t}_stuck_p_exp": p, f"{t}_stuck_p_frac": p})
        if variant != "clean":
            faults[f"{t}_zero_out_t"] = X_T if t == "x" else W_T
    pb.apply_bitflip(holder, pb.BitflipConfig(**faults))
    return holder["l"]


def step_fn(m: nn.Module, x: torch.Tensor, job: str):
    """One call of ``job`` on layer ``m``."""
    if job == "forward":

        def step():
            with torch.no_grad():
                m(x)

        return step
    m.weight.requires_grad_(job == "train, W steps")
    xg = x.detach().requires_grad_()

    def train():
        m(xg).sum().backward()
        if m.weight.grad is not None:
            with torch.no_grad():
                m.weight.sub_(m.weight.grad, alpha=1e-6)  # an optimizer step: W changes
            m.weight.grad = None
        xg.grad = None

    return train


def op_times(w, x, p, device, warmup, reps) -> dict:
    """ms of: the flip op on W and on x, one stuck-weight build, the flip of W with its stuck
    bits forced in the same pass, one stuck-lane pass on x, the flip of x with its lanes."""
    spec = FlipSpec(p, p)
    stuck = StuckAt("bench", 0, StuckSpec(p, p), StuckSpec(p, p))
    sparse = stuck.sparse(w.numel(), w.dtype, device)  # drawn once, as a layer does
    lanes = stuck.lanes(x.size(-1), x.dtype, device)
    key = pb.stream_key(0, "bench", "w")
    ops = {
        "flip W": lambda: pb.apply_flip_spec(w, spec, key, 1),
        "stuck W (build)": lambda: stuck.stuck("w", w),
        "flip W + stuck bits": lambda: apply_flip_spec_masked(w, spec, key, 1, False, stuck=sparse),
        "flip x": lambda: pb.apply_flip_spec(x, spec, key, 1),
        "stuck x lanes": lambda: stuck.stuck("x", x),
        "flip x + stuck lanes": lambda: apply_flip_spec_masked(x, spec, key, 1, False, None, lanes),
    }
    return {k: time_steps(f, device, warmup, reps)[0] for k, f in ops.items()}


def markdown(rows, ops, meta: dict) -> str:
    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    run = (
        f"{meta['dtype']}, W {meta['shape']}, x {meta['tokens']} tokens; "
        f"median of {meta['reps']} after {meta['warmup']}; W's stuck bits forced in its flip "
        f"kernel up to {meta['kernel_density']:.4g} of its elements"
    )
    lines = [
        *meta_lines(meta, run),
        "| p | faults on | job | clean ms | flip ms | stuck ms | stuck / flip | both ms "
        "| both / flip |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['p']} | {r['tensors']} | {r['job']} | {f(ms['clean'])} | {f(ms['flip'])} "
            f"| {f(ms['stuck'])} | {f(r['stuck_ratio'], '.2f')}x | {f(ms['both'])} "
            f"| {f(r['both_ratio'], '.2f')}x |"
        )
    lines += ["", "| p | " + " | ".join(f"{k} ms" for k in next(iter(ops.values()))) + " |"]
    lines.append("|---" + "|---:" * len(next(iter(ops.values()))) + "|")
    for p, times in ops.items():
        lines.append(f"| {p} | " + " | ".join(f(v) for v in times.values()) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shape", default="4096x4096", help="the weight, OUTxIN")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--p", default="1e-6,2^-16,2^-10", help="comma-separated rates")
    ap.add_argument("--tensors", default="w,x+w", help="faults on w, or on x+w (comma-separated)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--kernel_density",
        type=float,
        default=StuckAt.kernel_density,
        help="most stuck elements (share of W) that W's flip kernel forces; above, the stuck "
        "copy is built (0: always build it, to compare)",
    )
    ap.add_argument("--small", action="store_true", help="toy sizes, 2 reps (CPU smoke run)")
    ap.add_argument("--out", default=None, help="write the rows and metadata as JSON here")
    ap.add_argument("--doc", default=None, help="write the tables into this markdown file")
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.tokens, args.reps, args.warmup = "48x64", 16, 2, 1
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = tuple(int(v) for v in args.shape.lower().split("x") if v.isdigit())
    if len(shape) != 2 or args.shape.lower().count("x") != 1 or min(shape) < 1:
        raise ValueError(f"--shape must be OUTxIN (positive ints), got {args.shape!r}")
    bad = [t for t in args.tensors.split(",") if t not in ("w", "x+w")]
    if bad:
        raise ValueError(f"--tensors: {bad} are not 'w' or 'x+w'")
    StuckAt.kernel_density = args.kernel_density
    w = torch.randn(shape, dtype=dtype, device=device)
    x = torch.randn(args.tokens, shape[1], dtype=dtype, device=device)
    rows, ops = [], {}
    for name, p in parse_p(args.p):
        ops[name] = op_times(w, x, p, device, args.warmup, args.reps)
        for tensors in args.tensors.split(","):
            layers = {v: layer(shape, dtype, device, v, tensors, p) for v in VARIANTS}
            for job in JOBS:
                ms = {
                    v: time_steps(step_fn(m, x, job), device, args.warmup, args.reps)[0]
                    for v, m in layers.items()
                }
                ratios = dict(
                    stuck_ratio=ms["stuck"] / ms["flip"], both_ratio=ms["both"] / ms["flip"]
                )
                rows.append(dict(p=name, tensors=tensors, job=job, ms=ms, **ratios))
                print(rows[-1], flush=True)
    extra = dict(dtype=args.dtype, shape=args.shape, tokens=args.tokens, reps=args.reps)
    extra["kernel_density"] = args.kernel_density
    meta = report(rows, device, "", args.out, warmup=args.warmup, ops=ops, **extra)
    table = markdown(rows, ops, meta)
    print(table)
    if args.doc:
        write_doc_table(args.doc, table, DOC_MARKERS)
    return rows, ops


if __name__ == "__main__":
    main()
