"""Per-layer cost of the forward flips at the ~1B Llama's shapes, against the layer's matmul.

For each linear shape of ``bench_model.py``'s model (q/k/v/o, gate/up, down) at batch x 1024
tokens, bf16: the matmul ``F.linear(x, W)``, a copy of x and W (the memory floor of writing
flipped copies), a read of x and W (the floor of any scheme that does not write copies), and
the paired flip kernel (x and W, p = 2^-16, thresholds 30 / 1.25) for several block shapes
(groups per program x warps x the most groups with a flip that a block takes one at a time),
with and without flips (the difference is the sampling's cost).
Inputs rotate over several buffer sets, so the numbers are not L2 hits. CUDA only.

    python benchmarks/layer_flip_cost.py [--batch 8] [--sweep] [--dense]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F
import triton

from peft_bitflip.kernels import triton_bitflip
from peft_bitflip.kernels.sampling import flip_table

P = 2.0**-16
X_THRESHOLD, W_THRESHOLD = 30.0, 1.25
HIDDEN, MLP = 2048, 5632
SHAPES = {  # name: (in_features, out_features, layers of this shape per transformer block)
    "q/k/v/o": (HIDDEN, HIDDEN, 4),
    "gate/up": (HIDDEN, MLP, 2),
    "down": (MLP, HIDDEN, 1),
}
SETS = 4  # buffer sets rotated through, to keep the inputs out of L2


def bench(fn_of_set) -> float:
    """Median ms of ``fn_of_set(i)`` over rotating buffer sets."""
    state = {"i": 0}

    def step():
        fn_of_set(state["i"] % SETS)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def pair(xs, ws, call, flips: bool, p: float):
    x_table = flip_table(p, p, torch.bfloat16, "cuda")
    w_table = x_table

    def run(i):
        triton_bitflip.launch_pair(
            xs[i], ws[i], x_table, w_table, call, (1, 2), (3, 4), X_THRESHOLD, W_THRESHOLD,
            flips, flips,
        )  # fmt: skip

    return run


def set_block(rows: int, warps: int, singles: int) -> None:
    triton_bitflip.ROWS_PER_PROGRAM = rows
    triton_bitflip.NUM_WARPS = warps
    triton_bitflip.SINGLE_GROUPS = singles
    triton_bitflip._pair_config.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="try block shapes")
    ap.add_argument("--dense", action="store_true", help="also p = 2^-12 and 2^-8 (q/k/v/o)")
    args = ap.parse_args()
    tokens = args.batch * 1024
    torch.manual_seed(0)
    call = torch.tensor(0, device="cuda")
    default = (
        triton_bitflip.ROWS_PER_PROGRAM, triton_bitflip.NUM_WARPS, triton_bitflip.SINGLE_GROUPS
    )  # fmt: skip
    blocks = [default]
    if args.sweep:
        shapes = ((64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8))
        blocks += [
            (r, w, k) for (r, w), k in itertools.product(shapes, (0, 1, 2, 4))
            if (r, w, k) != default
        ]  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    big = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda").normal_()
    big_out = torch.empty_like(big)
    ms = triton.testing.do_bench(lambda: big_out.copy_(big), return_mode="median")
    print(f"copy of 2^28 bf16: {4 * big.numel() / ms / 1e6:.0f} GB/s (read + write)")
    totals: dict = {}
    for name, (fan_in, fan_out, count) in SHAPES.items():
        xs = [torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
        ws = [
            0.02 * torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
            for _ in range(SETS)
        ]
        nbytes = 2 * (xs[0].numel() + ws[0].numel())
        rows = {
            "linear": bench(lambda i: F.linear(xs[i], ws[i])),
            "copy x, W": bench(lambda i: (xs[i].clone(), ws[i].clone())),
            "read x, W": bench(lambda i: (xs[i].amax(), ws[i].amax())),
        }
        for block in blocks:
            set_block(*block)
            tag = f"rows={block[0]} warps={block[1]}"
            rows[f"pair, flips, {tag} singles={block[2]}"] = bench(pair(xs, ws, call, True, P))
            if block[2] == default[2]:
                rows[f"pair, zero only, {tag}"] = bench(pair(xs, ws, call, False, P))
            if args.dense and name == "q/k/v/o":
                for p in (2.0**-12, 2.0**-8):
                    what = f"pair, flips at p=2^{math.log2(p):.0f}, {tag} singles={block[2]}"
                    rows[what] = bench(pair(xs, ws, call, True, p))
        set_block(*default)
        print(f"\n{name}: x [{tokens}, {fan_in}], W [{fan_out}, {fan_in}], x{count} per block")
        print("| what | ms | GB/s (2 x bytes of x and W) | x linear |")
        print("|---|---:|---:|---:|")
        for what, t in rows.items():
            gbs = 2 * nbytes / t / 1e6
            print(f"| {what} | {t:.4f} | {gbs:.0f} | {t / rows['linear']:.3f} |")
            totals[what] = totals.get(what, 0.0) + count * t
    print("\nper transformer block (sum over its 7 linears), ms:")
    for what, t in totals.items():
        print(f"  {what}: {t:.3f}")


if __name__ == "__main__":
    main()
