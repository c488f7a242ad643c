"""Whole-model speed and peak memory: clean vs bit-flipped Llama, side by side in one run.

For each batch size (``--batches``, sequences of ``--seq`` tokens) and each of three jobs:

* ``forward``: ``model(ids)`` under ``torch.no_grad`` in eval mode;
* ``train``: a full training step (forward with labels, backward, ``AdamW.step``, ``zero_grad``);
* ``lora``: a LoRA r=32 step (all linear layers of the decoder, lm_head excluded) — clean is
  PEFT's ``LoraConfig``, ours is ``BitflipLoraConfig`` with the same LoRA settings;

variants (``--variants``): ``clean``, ``floor`` (clean, but every linear but lm_head launches
one empty Triton kernel before its matmul: the host cost of a single launch per layer, a lower
bound for any eager bit-flip layer that launches a kernel; forward and train jobs only),
``ours`` (peft_bitflip with the original's fault model: x and W,
every p = 2^-16 or each p of ``--p``, zero-out thresholds 30 / 1.25) and ``mase`` (the original
formulation: every linear but lm_head flips x and W with mase-triton's ``random_bitflip_fn``;
LoRA layers merge ``W + s B@A`` and flip it, as NewComputeBench's ``BitFlipLinearLora``; only
at p = 2^-n, n <= 24).  Clean and floor run once per batch and job, ours and mase once per p.
With ``--compile`` the forward, the training step and the LoRA step of clean and ours also run
under ``torch.compile``.

Each cell is the median of ``--steps`` timed steps (device events) after ``--warmup`` steps;
peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (model, optimizer state
and activations included).  Prints a markdown table (ratios to clean in the same run) and
writes it with the run's metadata to ``--out``; ``--doc FILE`` also writes the ours-vs-mase-vs-
clean table per p into FILE (docs/benchmarks.md) between the markers of :data:`DOC_MARKERS`
(appended with them where FILE has none).

    python benchmarks/bench_model.py                      # H100: ~1B Llama, batches 8 and 1
    python benchmarks/bench_model.py --batches 8 --p 2^-16,2^-10,0.5 --doc docs/benchmarks.md
    python benchmarks/bench_model.py --tiny --device cpu  # smoke run of the script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_bitflip as pb

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
P_ORIGINAL = 2**-16
X_T, W_T = 30.0, 1.25
DOC_MARKERS = (
    "<!-- bench_model.py --doc: per-p table (start) -->",
    "<!-- bench_model.py --doc: per-p table (end) -->",
)


def parse_p(text: str) -> list[tuple[str, float]]:
    """``"2^-16,2^-10,0.3"`` -> [(name, p)]: ``2^-n`` or a float in (0, 1]."""
    out = []
    for name in text.split(","):
        name = name.strip()
        p = 2.0 ** float(name[2:]) if name.startswith("2^") else float(name)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"--p: each p must be in (0, 1], got {name!r}")
        out.append((name, p))
    return out


def mase_halves(p: float) -> int | None:
    """n with p = 0.5**n (n <= 24), mase-triton's parameter; None where it has none."""
    n = -math.log2(p)
    return int(n) if n == int(n) and n <= 24 else None


def model_config(tiny: bool) -> LlamaConfig:
    """~953M-parameter Llama (hidden 2048, 16 layers, MLP 5632, vocab 32000) or a tiny one."""
    if tiny:
        return LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    )


def build_model(cfg, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


# --- the original formulation through mase-triton -------------------------------------------


class MaseFlipLinear(nn.Module):
    """NewComputeBench's ``RandomBitFlipLinear`` (and ``BitFlipLinearLora`` with ``rank``)."""

    def __init__(
        self, linear: nn.Linear, flip_fn, rank: int = 0, alpha: float = 32.0, halves: int = 16
    ):
        super().__init__()
        self.linear = linear
        self.flip = flip_fn
        self.halves = halves  # p = 0.5 ** halves
        self.seeds = [0, 0, 0, 0]  # x exp/frac, w exp/frac; advanced by every call as upstream
        self.rank = rank
        if rank:
            w = linear.weight
            self.lora_A = nn.Parameter(
                torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device)
            )
            self.lora_B = nn.Parameter(
                torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device)
            )
            nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
            self.scaling = alpha / rank

    def forward(self, x):
        s, h = self.seeds, self.halves
        xf, s[0], s[1] = self.flip(x, h, h, s[0], s[1], X_T)
        w = self.linear.weight
        if self.rank:
            w = w + (self.lora_B @ self.lora_A) * self.scaling
        wf, s[2], s[3] = self.flip(w, h, h, s[2], s[3], W_T)
        return F.linear(xf, wf, self.linear.bias)


def mase_transform(model, rank: int = 0, p: float = P_ORIGINAL):
    from mase_triton.random_bitflip.core import random_bitflip_fn

    halves = mase_halves(p)
    if halves is None:
        raise ValueError(f"mase-triton has no p = {p} (only 0.5**n, n <= 24)")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and "lm_head" not in f"{name}.{child_name}":
                flip = MaseFlipLinear(child, random_bitflip_fn, rank, halves=halves)
                setattr(module, child_name, flip)
    if rank:
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    return model


# --- the launch floor -----------------------------------------------------------------------


class LaunchFloorLinear(nn.Linear):
    """``nn.Linear`` that first launches one empty Triton kernel (one program, no memory
    access): what a single kernel launch per layer costs the host, nothing else."""

    def forward(self, x):
        _empty_kernel[(1,)](x)
        return F.linear(x, self.weight, self.bias)


def _make_empty_kernel():
    try:
        import triton
    except ImportError:  # CPU-only torch without triton: the floor variant is unavailable
        return None

    @triton.jit
    def empty(x_ptr):
        pass

    return empty


_empty_kernel = _make_empty_kernel()


def floor_transform(model):
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            module.__class__ = LaunchFloorLinear
    return model


# --- variants -------------------------------------------------------------------------------


def ours_config(p: float = P_ORIGINAL) -> pb.BitflipConfig:
    """The original's fault model (zero-out 30 / 1.25) with every p = ``p``."""
    return pb.BitflipConfig.original_default(x_p_exp=p, x_p_frac=p, w_p_exp=p, w_p_frac=p)


def make_variant(job: str, variant: str, cfg, device, dtype, p: float = P_ORIGINAL):
    model = build_model(cfg, device, dtype)
    if job == "lora":
        from peft import LoraConfig, get_peft_model

        lora = dict(r=32, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0)
        if variant == "clean":
            model = get_peft_model(model, LoraConfig(**lora))
        elif variant == "ours":
            bl = pb.BitflipLoraConfig.from_bitflip_config(ours_config(p), **lora)
            model = get_peft_model(model, bl)
        else:
            model = mase_transform(model, rank=32, p=p)
    elif variant == "floor":
        floor_transform(model)
    elif variant == "ours":
        pb.apply_bitflip(model, ours_config(p))
    elif variant == "mase":
        mase_transform(model, p=p)
    return model


def step_fn(job: str, model, ids, compiled: bool, compile_mode: str | None = None):
    if job == "forward":
        model.eval()
        fwd = torch.compile(model, mode=compile_mode) if compiled else model

        def step():
            with torch.no_grad():
                return fwd(ids).logits

        return step
    model.train()
    fwd = torch.compile(model, mode=compile_mode) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def step():
        loss = fwd(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, steps: int):
    """(median ms, peak bytes or None) over ``steps`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def time_back_to_back(step, device, warmup: int, steps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean ms per call of ``steps`` calls made back to back
    (device events around the round on CUDA: the host queues calls ahead of the GPU, as in a
    model's forward, so a call's host time is hidden while the GPU is busy)."""
    for _ in range(warmup):
        step()
    sync(device)
    means = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            means.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            means.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(means)


def cleanup():
    """Free what a cell held before the next one: compiled code and CUDA-graph trees too (global
    state that can keep the previous cell's graph pools and inputs alive), then cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cell(job, variant, compiled, batch, args, cfg, device, dtype, p=P_ORIGINAL):
    model = make_variant(job, variant, cfg, device, dtype, p)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.seq), device=device)
    step = step_fn(job, model, ids, compiled, args.compile_mode)
    try:
        ms, peak = time_steps(step, device, args.warmup, args.steps)
    finally:
        del model, step
        cleanup()
    return ms, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--jobs", default="forward,train,lora")
    ap.add_argument("--variants", default="clean,ours,mase")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd clean/ours")
    ap.add_argument(
        "--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead)"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny model (smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--p", default="2^-16", help="comma-separated p of ours and mase (2^-n or a float)"
    )
    ap.add_argument("--out", default=None, help="write the table and metadata as JSON here")
    ap.add_argument("--doc", default=None, help="write the per-p table into this markdown file")
    args = ap.parse_args(argv)
    p_list = parse_p(args.p)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = model_config(args.tiny)
    variants = args.variants.split(",")
    for cuda_only in ("mase", "floor"):  # mase-triton and the empty launch need CUDA
        if device.type != "cuda" and cuda_only in variants:
            variants.remove(cuda_only)
    n_params = sum(p.numel() for p in build_model(cfg, "meta", dtype).parameters())
    cells = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for job in args.jobs.split(","):
            once = [v for v in variants if v in ("clean", "floor")]
            per_p = [v for v in variants if v not in once]
            modes = [(v, False, None) for v in once if not (v == "floor" and job == "lora")]
            modes += [(v, False, p) for p in p_list for v in per_p]
            if args.compile:
                modes += [("clean", True, None)] + [("ours", True, p) for p in p_list]
            base = {}
            for variant, compiled, p_named in modes:
                if variant == "mase" and mase_halves(p_named[1]) is None:
                    continue  # mase-triton cannot express this p
                p = P_ORIGINAL if p_named is None else p_named[1]
                try:
                    ms, peak = run_cell(job, variant, compiled, batch, args, cfg, device, dtype, p)
                    err = None
                except Exception as e:  # a failing variant is reported, not fatal
                    ms = peak = None
                    err = f"{type(e).__name__}: {e}"[:300]
                    print(f"{job}/{variant} failed: {err}", file=sys.stderr)
                    cleanup()
                if variant == "clean" and ms is not None:
                    base[compiled] = (ms, peak)
                b_ms, b_peak = base.get(compiled, (None, None))
                cell = dict(
                    batch=batch,
                    job=job,
                    variant=variant + (" (compiled)" if compiled else ""),
                    p=None if p_named is None else p_named[0],
                    ms=ms,
                    peak_gib=None if peak is None else peak / 2**30,
                    time_ratio=None if ms is None or not b_ms else ms / b_ms,
                    mem_ratio=None if peak is None or not b_peak else peak / b_peak,
                    error=err,
                )
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    meta = dict(params=n_params, seq=args.seq, steps=args.steps, warmup=args.warmup)
    meta = report(cells, device, markdown(cells), args.out, **meta)
    if args.doc:
        write_doc_table(args.doc, per_p_markdown(cells, meta))
    return cells


def report(cells, device, table: str, out: str | None, **extra) -> None:
    """Print the run's metadata (date, device, versions, command, ``extra``) and ``table``;
    write both with ``cells`` as JSON to ``out`` if given."""
    meta = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        torch=torch.__version__,
        command="python " + " ".join(sys.argv),
        **extra,
    )
    with contextlib.suppress(ImportError):
        import triton

        meta["triton"] = triton.__version__
    print(f"\n{meta}\n")
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump(dict(meta=meta, cells=cells), f, indent=1)
    return meta


def meta_lines(meta: dict, run: str) -> list[str]:
    """The lines above a doc table: device and versions, date and ``run`` (what was timed),
    the command, then a blank line."""
    return [
        f"- device: {meta['device']}; torch {meta['torch']}; triton {meta.get('triton', 'n/a')}",
        f"- date: {meta['date']}; {run}",
        f"- command: `{meta['command']}`",
        "",
    ]


def per_p_markdown(cells, meta: dict) -> str:
    """The ours-vs-mase-vs-clean table: one row per batch, job and p (eager cells), times in
    ms and ratios to clean of the same batch and job in the same run."""

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    run = (
        f"params: {meta.get('params')}; seq: {meta.get('seq')}; "
        f"median of {meta.get('steps')} steps after {meta.get('warmup')}"
    )
    lines = [
        *meta_lines(meta, run),
        "| batch | job | p | clean ms | ours ms | ours x clean | mase ms | mase x clean |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    eager = [c for c in cells if "compiled" not in c["variant"]]
    keys = []
    for c in eager:
        if c["p"] is not None and (c["batch"], c["job"], c["p"]) not in keys:
            keys.append((c["batch"], c["job"], c["p"]))
    for batch, job, p in keys:
        row = {
            c["variant"]: c
            for c in eager
            if c["batch"] == batch and c["job"] == job and c["p"] in (p, None)
        }
        clean, ours, mase = (row.get(v, {}) for v in ("clean", "ours", "mase"))
        lines.append(
            f"| {batch} | {job} | {p} | {f(clean.get('ms'), '.1f')} | {f(ours.get('ms'), '.1f')} "
            f"| {f(ours.get('time_ratio'), '.3f')} | {f(mase.get('ms'), '.1f')} "
            f"| {f(mase.get('time_ratio'), '.3f')} |"
        )
    return "\n".join(lines)


def write_doc_table(path: str, table: str, markers: tuple[str, str] = DOC_MARKERS) -> None:
    """Replace the text between ``markers`` (start, end; default :data:`DOC_MARKERS`) in the
    markdown file ``path`` by ``table`` (appends the markers and the table where the file has
    none)."""
    start, end = markers
    with open(path) as f:
        text = f.read()
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def markdown(cells) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "| batch | job | variant | p | ms / step | x clean | peak GiB | x clean mem |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(
            f"| {c['batch']} | {c['job']} | {c['variant']} | {c['p'] or '-'} | "
            f"{f(c['ms'], '.1f')} | "
            f"{f(c['time_ratio'], '.3f')} | {f(c['peak_gib'], '.2f')} | "
            f"{f(c['mem_ratio'], '.3f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
