"""Clean against bit-flipped steps of the same job in one process, in interleaved rounds.

At batch 1 a step is bound by the host (Python and kernel launches), and ``bench_model.py``,
which times clean and ours one after the other on freshly built models, gave the same cell
ratios 0.95x to 1.36x in separate processes on one machine (docs/benchmarks.md).  Here both
models of a job stay built and warm, and each round times ``--steps`` steps of each (the order
alternating round by round), so both see the same host load.  Prints per job the median ms of
each variant over the rounds, the ratio of those medians and the range of the per-round ratios;
writes them with the run's metadata to ``--out``.  Peak memory: ``bench_model.py`` (here both
models are resident).

    python benchmarks/bench_interleaved.py --batch 1 --jobs lora,train,forward --rounds 8
    python benchmarks/bench_interleaved.py --tiny --device cpu   # smoke run of the script
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_model import cleanup, make_variant, model_config, report, step_fn, time_steps

VARIANTS = ("clean", "ours")


def run_job(job: str, args, cfg, device, dtype) -> dict:
    """{variant: [median ms of each round]} for ``job``; warm-up steps before the rounds."""
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    steps = {}
    for variant in VARIANTS:
        model = make_variant(job, variant, cfg, device, dtype)
        steps[variant] = step_fn(job, model, ids, False)
        time_steps(steps[variant], device, args.warmup, 1)
    rounds = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            ms, _ = time_steps(steps[variant], device, 0, args.steps)
            rounds[variant].append(ms)
    del steps
    cleanup()
    return rounds


def summary(job: str, batch: int, rounds: dict) -> dict:
    clean, ours = rounds["clean"], rounds["ours"]
    ratios = [o / c for o, c in zip(ours, clean)]
    return dict(
        batch=batch,
        job=job,
        clean_ms=statistics.median(clean),
        ours_ms=statistics.median(ours),
        ratio=statistics.median(ours) / statistics.median(clean),
        round_ratio_min=min(ratios),
        round_ratio_median=statistics.median(ratios),
        round_ratio_max=max(ratios),
        rounds=len(ratios),
    )


def markdown(rows) -> str:
    lines = [
        "| batch | job | clean ms | ours ms | ours / clean | round ratios min / median / max |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['job']} | {r['clean_ms']:.1f} | {r['ours_ms']:.1f} | "
            f"{r['ratio']:.3f} | {r['round_ratio_min']:.3f} / {r['round_ratio_median']:.3f} / "
            f"{r['round_ratio_max']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--jobs", default="lora,train,forward")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny model (smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the rows and metadata as JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds and --steps must be >= 1, got {args.rounds}, {args.steps}")
    device = torch.device(args.device)
    cfg = model_config(args.tiny)
    rows = []
    for job in args.jobs.split(","):
        rows.append(summary(job, args.batch, run_job(job, args, cfg, device, torch.bfloat16)))
        print(rows[-1], flush=True)
    meta = dict(seq=args.seq, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    report(rows, device, markdown(rows), args.out, **meta)
    return rows


if __name__ == "__main__":
    main()
