"""Registers, stack and shared memory of our Triton kernels as launched by the layers, compiled
for a GPU architecture without a GPU (Triton's compiler and its bundled ptxas / cuobjdump).

Each row captures the arguments and launch config that a host function (the LoRA forward's
merge + flip + x launch, backward's merge with mask and scaled factors, the paired flip
kernel) passes to its launcher, on small CPU tensors, then compiles that specialisation for
``--arch`` (default sm_90, Hopper) and reads the cubin's resource usage.  A lead for tuning
(registers limit how many programs an SM holds; a stack frame means spills), not a timing:
the Triton here may not be the one on the GPU machine.

    python benchmarks/tuning/kernel_resources.py [--arch 90] [--merge-tiles 16x64,32x64,64x64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from peft_bitflip.kernels import triton_bitflip, triton_burst, triton_lora
from peft_bitflip.kernels.burst_sampling import burst_shape, burst_table
from peft_bitflip.kernels.op import new_flip_counts
from peft_bitflip.kernels.sampling import flip_table
from peft_bitflip.kernels.sparse_stuck import SparseStuck


def captured_launch(module, launcher_name: str, host_call):
    """(kernel, args, config) that ``host_call()`` passes to ``module.<launcher_name>``."""
    launcher = getattr(module, launcher_name)
    seen = []
    setattr(module, launcher_name, lambda grid, args, config: seen.append((args, config)))
    try:
        host_call()
    finally:
        setattr(module, launcher_name, launcher)
    (args, config), *_ = seen
    return launcher.fn, args, config


def specialisation(kernel, args, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT makes them: runtime
    arguments typed and specialised as ``kernel[grid](*args)`` would (an integer equal to 1
    becomes a constant; pointers, and integers divisible by 16 unless listed in
    ``do_not_specialize``, get the divisibility hint that lets loads and stores vectorise),
    the config's constexprs after them."""
    if hasattr(kernel, "params"):  # a JITFunction
        plain = {p.name for p in kernel.params if p.do_not_specialize}
        names = [p.name for p in kernel.params]
    else:  # under TRITON_INTERPRET=1: an InterpretedFunction
        plain = set(kernel.kwargs.get("do_not_specialize") or ())
        names = list(kernel.arg_names)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i >= len(args):
            signature[name] = "constexpr"
            if name in config:
                constexprs[(i,)] = config[name]
            continue
        ty, key = native_specialize_impl(CUDABackend, args[i], False, name not in plain, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def resources(kernel, args, config, arch: int) -> dict:
    """Compile ``kernel`` for these arguments and constexprs; its registers, stack frame and
    shared memory (bytes) as the cubin reports them, its SASS instructions (a static count of
    the whole program, every branch included) and its global-store instructions in the PTX (a
    static count, and how many of them store 16 bytes or more: ``.v4`` / ``.v8``)."""
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    signature, constexprs, attrs = specialisation(kernel, args, config)
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    tools = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report, sass = (
            subprocess.run(
                [os.path.join(tools, "cuobjdump"), what, f.name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for what in ("--dump-resource-usage", "-sass")
        )
    line = next(line for line in report.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    stores = re.findall(r"\bst\.global[.\w]*", compiled.asm["ptx"])
    return {
        "instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass)),
        "stores": len(stores),
        "wide_stores": sum(".v4" in st or ".v8" in st for st in stores),
        "registers": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "shared": compiled.metadata.shared,
        "warps": options.get("num_warps", 4),
    }


def launches():
    """name -> function returning (kernel, args, config) of one launch at the 1B Llama's
    shapes (5632 x 2048 bf16 weight, r = 32, the original fault model), on CPU tensors."""
    w = torch.zeros(5632, 2048, dtype=torch.bfloat16)
    a, b = torch.zeros(32, 2048), torch.zeros(5632, 32)
    x = torch.zeros(1024, 2048, dtype=torch.bfloat16)
    table = flip_table(2**-16, 2**-16, torch.bfloat16, "cpu")
    call = torch.zeros((), dtype=torch.int64)

    def merge(want_mask, with_x, factors):
        def host():
            triton_lora.merge_flip_with_x(
                w, b, a, 2.0, w.dtype, table, call, 1, 2, 1.25, True, want_mask,
                None if factors else call.clone(),
                **(dict(x=x, x_table=table, x_key=(3, 4), x_threshold=30.0, x_flips=True,
                        want_x_mask=True) if with_x else {}),
                factors=(torch.zeros(5632, 32, dtype=w.dtype), torch.zeros(32, 2048,
                         dtype=w.dtype)) if factors else None,
            )  # fmt: skip

        return lambda: captured_launch(triton_lora, "_launch_merge_flip", host)

    lanes = torch.zeros(2, x.size(-1), dtype=torch.int16)  # stuck input lanes (keep, ones)

    def pair(x_lanes=None, stuck=None):
        def host():
            triton_bitflip.launch_pair(
                x, w, table, table, call, (3, 4), (1, 2), 30.0, 1.25, True, True, True,
                call.clone(), x_lanes, stuck,
            )  # fmt: skip

        return lambda: captured_launch(triton_bitflip, "_launch_pair", host)

    def correction():
        def host():
            g = torch.zeros(1024, 5632, dtype=torch.bfloat16)
            da, db = torch.zeros(a.shape), torch.zeros(b.shape)
            mask = torch.zeros(5632, 2048, dtype=torch.uint8)
            x_mask = torch.zeros(x.numel() // 8, dtype=torch.uint8)
            triton_lora.subtract_zeroed_correction_(
                da, db, mask, g, x, a, b, torch.zeros_like(x), x_mask, 8
            )

        return captured_launch(triton_lora, "_launch_zeroed_correction", host)

    listed = torch.arange(0, w.numel(), 4099)  # stuck weight bits, one element in ~4k
    w_stuck = SparseStuck(
        listed, torch.full_like(listed, -2, dtype=torch.int16),
        torch.zeros_like(listed, dtype=torch.int16), w.numel(), w.dtype,
    )  # fmt: skip

    def single(p, x_lanes=None, stuck=None, counted=False, threshold=30.0):
        t_in = x if stuck is None else w

        def host():
            t = flip_table(p, p, torch.bfloat16, "cpu")
            triton_bitflip.launch(
                t_in, t, call, 1, 2, threshold, p > 0, next_call=call.clone(), lanes=x_lanes,
                stuck=stuck, counts=new_flip_counts("cpu") if counted else None,
                out=t_in if counted else None,
            )  # fmt: skip

        return lambda: captured_launch(triton_bitflip, "_launch_single", host)

    def burst():
        def host():
            lengths = ((2, 0.5), (4, 0.5))
            t = burst_table(1e-4, lengths, torch.bfloat16, "cpu")
            shape = burst_shape(lengths, "any", torch.bfloat16)
            triton_burst.launch_burst(x, t, shape, call, 1, 2, 30.0)

        return captured_launch(triton_burst, "_launch_burst", host)

    return {
        "flip x, p = 2^-16 (sparse fields only)": single(2**-16),
        "flip x, p = 2^-4 (dense fields)": single(2**-4),
        "burst faults on x (q = 1e-4, k = 2 or 4)": burst,
        "LoRA forward: merge + flip W, flip x (+ x mask)": merge(False, True, False),
        "LoRA backward: merge + flip W, mask, scaled factors": merge(True, False, True),
        "merge + flip W": merge(False, False, False),
        "merge + flip W, mask": merge(True, False, False),
        "paired flip of x (+ mask) and W": pair(),
        "flip x with stuck input lanes, p = 2^-16": single(2**-16, lanes),
        "paired flip of x (+ mask, stuck lanes) and W": pair(lanes),
        "flip W with listed stuck bits, p = 2^-16": single(2**-16, stuck=w_stuck),
        "paired flip of x (+ mask) and W (+ listed stuck bits)": pair(None, w_stuck),
        "counted flip in place (a training-fault site), p = 2^-16": single(2**-16, counted=True),
        "counted flip in place (a training-fault site), p = 2^-4": single(2**-4, counted=True),
        "counted flip in place, no zero-out, p = 2^-16": single(
            2**-16, counted=True, threshold=None
        ),
        "counted zero-out in place (no flips)": single(0.0, counted=True),
        "LoRA backward: zeroed-weight correction (+ dX mask)": correction,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    ap.add_argument(
        "--merge-tiles",
        default=None,
        help="comma-separated BMxBN tiles of the merge kernel to compare (default: as shipped)",
    )
    args = ap.parse_args()
    tiles = [(triton_lora.MERGE_BM, triton_lora.MERGE_BN)]
    if args.merge_tiles:
        tiles = [tuple(int(v) for v in t.split("x")) for t in args.merge_tiles.split(",")]
    print(f"Triton {triton.__version__}, sm_{args.arch}")
    print(
        "| launch | merge tile | warps | registers | stack bytes | shared bytes "
        "| SASS instructions | PTX global stores (16-byte) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    shipped = triton_lora.MERGE_BM, triton_lora.MERGE_BN
    try:
        for name, make in launches().items():
            for bm, bn in tiles if "merge" in name else [(None, None)]:
                if bm is not None:
                    triton_lora.MERGE_BM, triton_lora.MERGE_BN = bm, bn
                    triton_lora._merge_config.cache_clear()
                r = resources(*make(), args.arch)
                tile = "-" if bm is None else f"{bm}x{bn}"
                print(
                    f"| {name} | {tile} | {r['warps']} | {r['registers']} | {r['stack']} | "
                    f"{r['shared']} | {r['instructions']} | {r['stores']} ({r['wide_stores']}) |",
                    flush=True,
                )
    finally:
        triton_lora.MERGE_BM, triton_lora.MERGE_BN = shipped
        triton_lora._merge_config.cache_clear()


if __name__ == "__main__":
    main()
