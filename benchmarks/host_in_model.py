"""Host time of the ~1B Llama's forward (batch 1 by default), clean vs flipped, with Python's
garbage collector on and off, and a cProfile of the flipped forward (where the host time goes).

``profile_model.py`` found the flipped forward's host time per layer, inside the model, well
above what ``launch_paths.py`` measures for one layer alone; this script looks for the
difference inside the model.  (Written 2026-12-03 and run only at toy size on the CPU so far:
the device time ran out.)

    python benchmarks/host_in_model.py [--batch 1] [--steps 15]
    python benchmarks/host_in_model.py --tiny --device cpu   # smoke run
    python benchmarks/host_in_model.py --device cpu --stub-kernels --width 64 --seq 8 --steps 200
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time

import torch
from bench_model import make_variant, model_config


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_and_wall(model, ids, steps: int) -> tuple[float, float]:
    """(median ms until the forward returns, median ms until the device is done)."""
    host, wall = [], []
    with torch.no_grad():
        for _ in range(3):
            model(ids)
        for _ in range(steps):
            _sync(ids.device)
            t0 = time.perf_counter()
            model(ids)
            host.append(time.perf_counter() - t0)
            _sync(ids.device)
            wall.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e3, statistics.median(wall) * 1e3


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of gc on / off")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--stub-kernels",
        action="store_true",
        help="CPU: replace the Triton launchers by allocations (profile_host.py's stubs), so the "
        "flipped rows are the layers' Python cost inside the model",
    )
    ap.add_argument("--width", type=int, default=None, help="hidden size (MLP 2x), e.g. 64")
    ap.add_argument(
        "--variants", default="clean,ours", help="bench_model.py variants (floor: CUDA only)"
    )
    args = ap.parse_args(argv)
    if args.stub_kernels:
        import profile_host

        profile_host.stub_kernels()
    device = torch.device(args.device)
    cfg = model_config(args.tiny)
    if args.width:  # keep the 16 layers (112 flipped linears), shrink the arithmetic
        cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = args.width, 2 * args.width, 256
        cfg.num_attention_heads = cfg.num_key_value_heads = 4
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    models = {
        v: make_variant("forward", v, cfg, device, torch.bfloat16).eval()
        for v in args.variants.split(",")
    }
    rows = []
    print("| gc | variant | host ms | wall ms |\n|---|---|---:|---:|")
    try:
        for _round in range(args.rounds):
            for gc_on in (True, False):
                (gc.enable if gc_on else gc.disable)()
                for name, model in models.items():
                    host, wall = host_and_wall(model, ids, args.steps)
                    rows.append(dict(gc=gc_on, variant=name, host_ms=host, wall_ms=wall))
                    state = "on" if gc_on else "off"
                    print(f"| {state} | {name} | {host:.1f} | {wall:.1f} |", flush=True)
    finally:
        gc.enable()
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(5):
            models["ours"](ids)
        prof.disable()
    _sync(device)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue())
    return rows


if __name__ == "__main__":
    main()
