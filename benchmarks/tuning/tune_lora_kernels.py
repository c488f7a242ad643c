"""Sweep the launch settings of the bit-flip LoRA kernels on a CUDA GPU (1B-Llama shapes, bf16 W,
float32 A/B, r = 32, the original's weight fault model p = 2^-16, threshold 1.25).

* merge + flip (``triton_lora.merge_flip``): tile shape, warps and the precision of the rank-r
  product; GB/s = (read W + write the flipped weight [+ the uint8 mask]) / median time, next to
  ``W.clone()`` in the same run.
* zeroed correction (``triton_lora.subtract_zeroed_correction_``): tile shape and rows per loop
  step, on the mask the merge kernel produces, at T = 8192 and 1024 rows.

* ``parts``: the merge launch with parts switched off, next to the flip kernel and a copy.
* ``precision``: the merge launch per precision of the rank-r product and tile shape.

    python benchmarks/tuning/tune_lora_kernels.py [accuracy] [merge] [parts] [precision] \
        [correction]
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

import peft_bitflip as pb
from peft_bitflip.kernels import triton_lora
from peft_bitflip.kernels.sampling import flip_table

P, T_W = 2**-16, 1.25
SHAPES = [(5632, 2048), (2048, 2048), (2048, 5632)]  # (out, in): gate/up, q/k/v/o, down


def factors(out_f, in_f, rank=32):
    torch.manual_seed(0)
    w = (torch.randn(out_f, in_f, device="cuda") * 0.02).to(torch.bfloat16)
    a = torch.randn(rank, in_f, device="cuda") * 0.02
    b = torch.randn(out_f, rank, device="cuda") * 0.02
    return w, a, b


def merge(w, a, b, want_mask):
    table = flip_table(P, P, w.dtype, w.device)
    call = torch.zeros((), dtype=torch.int64, device="cuda")
    k0, k1 = pb.stream_key(0, "tune", "w")
    return triton_lora.merge_flip(w, b, a, 2.0, w.dtype, table, call, k0, k1, T_W, True, want_mask)


# the module's settings as shipped (the sweeps reset them to these when done)
TUNED = dict(
    singles=triton_lora.MERGE_SINGLES,
    bm=triton_lora.MERGE_BM,
    bn=triton_lora.MERGE_BN,
    warps=triton_lora.MERGE_WARPS,
)
SHIPPED_PRECISION = triton_lora.MERGE_PRECISION


def sweep_merge(shapes=SHAPES[:1]):
    """The merge + flip launch per setting: tile shape, warps, ``singles`` (how many groups
    holding a flip a tile takes singly through the gap sampling), mask or not; then the
    precision of the rank-r product."""
    print("| shape | singles | BM x BN | warps | mask | precision | us | GB/s | clone GB/s |")
    print("|---|---:|---|---:|---|---|---:|---:|---:|")
    tiles = [(16, 32), (16, 64), (32, 32), (32, 64), (64, 64)]
    settings = list(itertools.product([1, 4], tiles, [2, 4]))
    for out_f, in_f in shapes:
        w, a, b = factors(out_f, in_f)
        clone_us = do_bench(lambda: w.clone()) * 1e3
        clone_gbs = 2 * w.numel() * 2 / clone_us / 1e3
        for (singles, (bm, bn), warps), want_mask in itertools.product(settings, [False, True]):
            row = dict(singles=singles, bm=bm, bn=bn, warps=warps)
            timed_merge(w, a, b, want_mask, SHIPPED_PRECISION, row, clone_gbs)
    w, a, b = factors(*shapes[0])
    for prec in ["tf32x3", "tf32"]:
        timed_merge(w, a, b, True, prec, TUNED, clone_gbs)
    set_merge(TUNED, SHIPPED_PRECISION)


def set_merge(row, prec):
    """Set the merge kernel's module constants and drop the launch configs cached for others."""
    triton_lora.MERGE_PRECISION = prec
    triton_lora.MERGE_SINGLES = row["singles"]
    triton_lora.MERGE_BM, triton_lora.MERGE_BN = row["bm"], row["bn"]
    triton_lora.MERGE_WARPS = row["warps"]
    triton_lora._merge_config.cache_clear()  # the configs are cached per setting


def timed_merge(w, a, b, want_mask, prec, row, clone_gbs):
    set_merge(row, prec)
    out_f, in_f = w.shape
    head = (
        f"| {out_f}x{in_f} | {row['singles']} | {row['bm']}x{row['bn']} | "
        f"{row['warps']} | {want_mask} | {prec} |"
    )
    try:
        us = do_bench(lambda: merge(w, a, b, want_mask)) * 1e3
    except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
        print(f"{head} failed: {type(e).__name__} | | |", flush=True)
        return
    moved = w.numel() * (4 + (1 if want_mask else 0))
    print(f"{head} {us:.1f} | {moved / us / 1e3:.0f} | {clone_gbs:.0f} |", flush=True)


def merge_accuracy():
    """Elements of the merged weight (no flips) that differ from W + s B@A computed in float64
    and rounded once, per precision."""
    w, a, b = factors(*SHAPES[0])
    truth = (w.double() + 2.0 * (b.double() @ a.double())).to(torch.bfloat16)
    table = flip_table(0.0, 0.0, w.dtype, w.device)
    call = torch.zeros((), dtype=torch.int64, device="cuda")
    for prec in ACCURACY_PRECISIONS:
        triton_lora.MERGE_PRECISION = prec
        triton_lora._merge_config.cache_clear()
        m, _ = triton_lora.merge_flip(w, b, a, 2.0, w.dtype, table, call, 0, 0, None, False, False)
        print(f"merge precision {prec}: {int((m != truth).sum())} of {m.numel()} elements differ "
              "from the once-rounded float64 result")  # fmt: skip
    set_merge(TUNED, SHIPPED_PRECISION)


def merge_parts():
    """Where the merge kernel's time goes, per shape: the full launch (flips, zero-out, mask),
    without the mask, without flips and zero-out (merge only), with a rank-1 product, next to
    the flip kernel alone on W (with zero-out) and ``W.clone()``; GB/s as in the sweep."""
    from peft_bitflip.kernels import triton_bitflip

    print("\n| shape | launch | us | GB/s |")
    print("|---|---|---:|---:|")
    table = flip_table(P, P, torch.bfloat16, torch.device("cuda"))
    call = torch.zeros((), dtype=torch.int64, device="cuda")
    k0, k1 = pb.stream_key(0, "tune", "w")
    for out_f, in_f in SHAPES:
        w, a, b = factors(out_f, in_f)
        a1, b1 = a[:1].contiguous(), b[:, :1].contiguous()
        rows = {
            "merge + flip + zero + mask": (lambda: merge(w, a, b, True), 5),
            "merge + flip + zero": (lambda: merge(w, a, b, False), 4),
            "merge only (no flips, no zero-out)": (
                lambda: triton_lora.merge_flip(
                    w, b, a, 2.0, w.dtype, table, call, k0, k1, None, False, False
                ),
                4,
            ),
            "merge + flip + zero, rank 1": (lambda: merge(w, a1, b1, False), 4),
            "flip kernel alone (zero-out)": (
                lambda: triton_bitflip.launch(w, table, call, k0, k1, T_W, True),
                4,
            ),
            "W.clone()": (lambda: w.clone(), 4),
        }
        for name, (fn, bytes_per_elem) in rows.items():
            us = do_bench(fn) * 1e3
            gbs = w.numel() * bytes_per_elem / us / 1e3
            print(f"| {out_f}x{in_f} | {name} | {us:.1f} | {gbs:.0f} |", flush=True)


# tl.dot's float32 precisions: ieee (FMAs), tf32x3 / bf16x6 (tensor-core products of 3 TF32 /
# 6 bfloat16 parts, float32 accumulation), bf16x3 and tf32 (fewer parts: less accurate)
PRECISIONS = ["ieee", "tf32x3", "bf16x6"]
ACCURACY_PRECISIONS = ["ieee", "tf32x3", "bf16x6", "bf16x3", "tf32"]
PRECISION_TILES = [(16, 64), (32, 64), (64, 64)]
PRECISION_WARPS = [2, 4]


def sweep_precision(shape=SHAPES[0]):
    """The merge launch per precision of the rank-r product (tl.dot with float32 FMAs, or
    TF32x3 / BF16x6 tensor-core products), tile shape and warps: merge only, merge + flip +
    zero-out, and with the mask."""
    from peft_bitflip.kernels import triton_bitflip

    print("\n| shape | precision | BM x BN | warps | launch | us | GB/s |")
    print("|---|---|---|---:|---|---:|---:|")
    w, a, b = factors(*shape)
    table = flip_table(P, P, w.dtype, w.device)
    call = torch.zeros((), dtype=torch.int64, device="cuda")
    k0, k1 = pb.stream_key(0, "tune", "w")
    clone_us = do_bench(lambda: w.clone()) * 1e3
    print(f"| {shape[0]}x{shape[1]} | | | | W.clone() | {clone_us:.1f} | |")
    flip_us = do_bench(lambda: triton_bitflip.launch(w, table, call, k0, k1, T_W, True)) * 1e3
    print(f"| {shape[0]}x{shape[1]} | | | | flip kernel alone | {flip_us:.1f} | |")
    launches = {
        "merge only": (
            lambda: triton_lora.merge_flip(
                w, b, a, 2.0, w.dtype, table, call, k0, k1, None, False, False
            ),
            4,
        ),
        "merge + flip + zero": (lambda: merge(w, a, b, False), 4),
        "merge + flip + zero + mask": (lambda: merge(w, a, b, True), 5),
    }
    for prec, (bm, bn), warps in itertools.product(PRECISIONS, PRECISION_TILES, PRECISION_WARPS):
        set_merge(dict(TUNED, bm=bm, bn=bn, warps=warps), prec)
        for name, (fn, per_elem) in launches.items():
            try:
                us = do_bench(fn) * 1e3
            except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
                print(f"| | {prec} | {bm}x{bn} | {warps} | {name} | failed: {type(e).__name__} | |")
                continue
            print(f"| {shape[0]}x{shape[1]} | {prec} | {bm}x{bn} | {warps} | {name} | {us:.1f} | "
                  f"{w.numel() * per_elem / us / 1e3:.0f} |", flush=True)  # fmt: skip
    set_merge(TUNED, SHIPPED_PRECISION)


def sweep_correction(shapes=SHAPES, tokens=(8192, 1024)):
    """The correction launch per mask tile (BO x BK), how many zeroed weights a tile takes
    singly (0: every tile that holds one forms the dense product, the kernel before the
    single path), rows per step of that path (BTS) and warps, on the mask the merge kernel
    produces; ``zeroed`` = zeroed weights in the mask."""
    print("\n| shape | T | BO x BK | singles | BTS | warps | us | zeroed |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    set_merge(TUNED, SHIPPED_PRECISION)
    shipped = (
        triton_lora.CORRECTION_BO, triton_lora.CORRECTION_BK, triton_lora.CORRECTION_SINGLES,
        triton_lora.CORRECTION_BTS, triton_lora.CORRECTION_WARPS,
    )  # fmt: skip
    settings = [(64, 64, 0, 1024, 4)] + list(
        itertools.product([64], [64, 256], [4], [256, 1024], [4, 8])
    )  # the first: singly never, the kernel before the single path
    for (out_f, in_f), t in itertools.product(shapes, tokens):
        w, a, b = factors(out_f, in_f)
        _, mask = merge(w, a, b, True)
        g = torch.randn(t, out_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(t, in_f, device="cuda", dtype=torch.bfloat16)
        for bo, bk, singles, bts, warps in settings:
            set_correction(bo, bk, singles, bts, warps)
            da = torch.zeros(a.shape, device="cuda")
            db = torch.zeros(b.shape, device="cuda")
            us = (
                do_bench(lambda: triton_lora.subtract_zeroed_correction_(da, db, mask, g, x, a, b))
                * 1e3
            )
            print(f"| {out_f}x{in_f} | {t} | {bo}x{bk} | {singles} | {bts} | {warps} | "
                  f"{us:.1f} | {int(mask.sum())} |", flush=True)  # fmt: skip
    set_correction(*shipped)


def set_correction(bo, bk, singles, bts, warps):
    triton_lora.CORRECTION_BO, triton_lora.CORRECTION_BK = bo, bk
    triton_lora.CORRECTION_SINGLES, triton_lora.CORRECTION_BTS = singles, bts
    triton_lora.CORRECTION_WARPS = warps
    triton_lora._correction_config.cache_clear()


if __name__ == "__main__":
    import sys

    parts = sys.argv[1:] or ["accuracy", "merge", "correction"]
    print(torch.cuda.get_device_name())
    if "accuracy" in parts:
        merge_accuracy()
    if "merge" in parts:
        sweep_merge()
    if "parts" in parts:
        merge_parts()
    if "precision" in parts:
        sweep_precision()
    if "correction" in parts:
        sweep_correction()
