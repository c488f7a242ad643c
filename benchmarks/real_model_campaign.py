"""The real-model campaign study (issue 32.5 / 32.6): which blocks and bits matter, how that
changes with the zero-out thresholds and after bit-flip-aware LoRA, and how long it takes.

One command, four phases, each recorded with its wall time in ``study.json``:

* ``calibrated``: the campaign (every site x tensor x bit set x seed, flips at ``--p`` in one
  site at a time, against the golden run = the clean model) with zero-out thresholds
  calibrated to the model (``calibrate_zero_out``, margin 2, on ``--calibration_blocks``
  blocks of the *training* text; or ``--thresholds FILE``, a BitflipConfig JSON);
* ``fixed``: the same campaign with the original's thresholds (30 / 1.25).  The golden run is
  still the clean model, so a site's Δ loss there is the thresholds cutting real values of
  the site's tensor plus what the flips add; ``fixed_p0`` measures the first part alone (the
  same sites at p = 0: deterministic, one seed, one bit set);
* ``lora``: a short bit-flip-aware LoRA (``BitflipLoraConfig``, every linear but ``lm_head``,
  r = alpha = ``--lora_r``, HF ``Trainer``, bf16 on a GPU) trained with x and W flips at
  ``--lora_p`` everywhere and the calibrated thresholds (``--lora_fault original``: the
  original's fault model, p = 2^-16, 30 / 1.25), at most ``--lora_steps`` steps and its
  share of the time budget, then merged;
* ``adapted``: the calibrated campaign on the merged model (thresholds calibrated again, on
  it, the same way; its golden run is the adapted model clean).

Campaign phases run seed-major (all sites with seed 0, then seed 1, ...), so a phase that runs
out of its share of ``--max_minutes`` has every site with fewer seeds rather than half the
sites (``campaign.md`` then says INCOMPLETE).  The campaigns resume from ``--out`` when run
again (the LoRA is trained again).  Writes into ``--out`` (well under 5 MB): per campaign a
folder with ``campaign.md``, ``campaign_summary.csv``, ``campaign.json``,
``campaign_units.csv`` and ``campaign_heatmap.png``; ``summary.md`` (tables to paste into
``docs/campaigns.md``) and ``study.json``.  Usage (docs/campaigns.md)::

    python benchmarks/real_model_campaign.py --model /tmp/real-model/smollm2-135m \\
        --data corpus/en/validation.jsonl --train_data corpus/en/train.jsonl \\
        --out campaign_study --tokens 16384 --max_minutes 7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import peft_bitflip.campaign as cp  # noqa: E402
from peft_bitflip import data  # noqa: E402
from peft_bitflip.calibration import calibrate_zero_out  # noqa: E402
from peft_bitflip.cli import parse_probability  # noqa: E402
from peft_bitflip.config import BitflipConfig  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BIT_SETS = ("sign", "exp", "frac")  # the campaign module's names; those it accepts are used
PHASES = ("calibrated", "fixed", "lora", "adapted")
WEIGHTS = {"calibrated": 4.0, "fixed": 3.3, "lora": 1.5, "adapted": 3.0}  # budget shares
LABELS = {
    "calibrated": "calibrated thresholds",
    "fixed": "original thresholds 30 / 1.25",
    "fixed_p0": "original thresholds, p = 0 (the cuts alone)",
    "adapted": "after bit-flip-aware LoRA, calibrated thresholds",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a pretrained causal LM folder (clean)")
    p.add_argument("--data", required=True, help="campaign text (.jsonl/.json/.txt/.csv)")
    p.add_argument(
        "--train_data", default=None,
        help="text for calibration and LoRA (default: train.jsonl beside --data)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--tokens", type=int, default=16384, help="campaign tokens of --data")
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--p", type=parse_probability, default=1e-3,
        help="flip probability per bit of a site (see docs/campaigns.md for the choice)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tensors", nargs="+", choices=["x", "w"], default=["x", "w"])
    p.add_argument(
        "--bits", nargs="+", default=list(BIT_SETS),
        help="bit sets (exp = sign + exponent, frac = mantissa, sign, bit:N, bit:N-M); one the "
        "campaign module does not know is left out with a note",
    )  # fmt: skip
    p.add_argument(
        "--site_regex", nargs="+", metavar="LABEL=REGEX", default=None,
        help="sites (default: every decoder block)",
    )  # fmt: skip
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calibration_blocks", type=int, default=32, help="training blocks")
    p.add_argument("--zero_out_margin", type=float, default=2.0)
    p.add_argument("--thresholds", default=None, help="BitflipConfig JSON with thresholds")
    p.add_argument("--x_zero_out_t", type=float, default=30.0, help="the fixed x threshold")
    p.add_argument("--w_zero_out_t", type=float, default=1.25, help="the fixed w threshold")
    p.add_argument("--lora_steps", type=int, default=300, help="at most (and the time share)")
    p.add_argument("--lora_r", type=int, default=32)
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--lora_batch_size", type=int, default=8)
    p.add_argument(
        "--lora_p", type=parse_probability, default=1e-4,
        help="the LoRA's flip rate on every layer at once (--p there wrecks the model)",
    )  # fmt: skip
    p.add_argument("--lora_fault", choices=["calibrated", "original"], default="calibrated")
    p.add_argument("--lora_seed", type=int, default=0, help="the LoRA run's flip seed")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument(
        "--max_minutes", "--max-minutes", type=float, default=7.0,
        help="wall-clock budget for everything after the imports (setup included)",
    )  # fmt: skip
    return p


# ---------------------------------------------------------------------- data and sites


def text_blocks(
    path: str, tokenizer, block_size: int, n_blocks: int | None, minimum: int | None = None
) -> torch.Tensor:
    """The first ``n_blocks`` blocks of ``block_size`` tokens of the documents in ``path``
    (as ``peft-bitflip campaign --text`` cuts them: documents + EOS, per 1000 documents; the
    first blocks do not depend on how many documents are read).  The documents are read until
    about ``n_blocks`` blocks, all of them if that gives fewer than ``minimum`` (default
    ``n_blocks``)."""
    minimum = n_blocks if minimum is None else minimum
    raw = data.load_text_datasets(train_file=path, validation_file=path)["validation"]
    subset = raw
    if n_blocks is not None:  # tokenize about as many documents as needed first
        chars = 0
        for i, text in enumerate(raw["text"]):
            chars += len(text)
            if chars > 5 * block_size * n_blocks:  # ~4.3 characters per token, with room
                subset = raw.select(range(i + 1))
                break
    ids = data.tokenize_and_group(subset, tokenizer, block_size)["input_ids"]
    if n_blocks is not None and len(ids) < minimum and subset is not raw:
        ids = data.tokenize_and_group(raw, tokenizer, block_size)["input_ids"]  # all of it
    ids = torch.tensor(ids[:n_blocks] if n_blocks else ids)
    if n_blocks and len(ids) < minimum:
        print(f"{path}: {len(ids)} blocks of {block_size} tokens, fewer than {minimum}")
    return ids


def usable_bits(requested) -> tuple[list[str], list[str]]:
    """(bit sets the campaign module accepts, those it does not)."""
    ok, missing = [], []
    for b in dict.fromkeys(requested):
        try:
            cp.Site("probe", ("m",), "x", b)
            ok.append(b)
        except ValueError:
            missing.append(b)
    if not ok:
        raise ValueError(f"no bit set of {requested} is known to the campaign module")
    return ok, missing


def site_groups(model, regexes: list[str] | None) -> dict[str, list[str]]:
    if not regexes:
        return cp.module_groups(model, "blocks")
    pairs = {}
    for item in regexes:
        label, sep, pattern = item.partition("=")
        if not sep or not label or not pattern:
            raise ValueError(f"--site_regex {item!r}: expected LABEL=REGEX")
        pairs[label] = pattern
    return cp.module_groups(model, "regex", pairs)


# ---------------------------------------------------------------------- the budget


class Budget:
    """Wall-clock budget of the study: each phase gets its weight's share of what is left."""

    def __init__(self, minutes: float, phases):
        self.end = time.monotonic() + 60 * minutes
        self.pending = list(phases)

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def share(self, phase: str) -> float:
        """Seconds for ``phase`` (and marks it started)."""
        weights = {p: WEIGHTS[p] for p in self.pending}
        seconds = self.left() * weights[phase] / sum(weights.values())
        self.pending.remove(phase)
        return seconds


# ---------------------------------------------------------------------- campaigns


def run_campaign(model, ids, sites, *, p, seeds, zero_out, folder, seconds, args, mode) -> dict:
    """A campaign seed-major within ``seconds``; writes its outputs into ``folder`` and
    returns its summary for ``summary.md``."""
    from peft_bitflip.run_record import fault_model_record, file_record, run_record

    t0 = time.monotonic()
    os.makedirs(folder, exist_ok=True)
    settings = {"model": args.model, "text": os.path.abspath(args.data), "zero_out_mode": mode}
    result = None
    for k in range(1, len(seeds) + 1):
        left = seconds - (time.monotonic() - t0)
        if left <= 0 and result is not None:
            break
        result = cp.campaign(
            model, ids, sites, p=p, seeds=seeds[:k], zero_out=zero_out,
            batch_size=args.batch_size, csv_path=os.path.join(folder, "campaign_units.csv"),
            settings=settings, max_minutes=max(left, 1e-3) / 60, progress=False,
        )  # fmt: skip
        print(
            f"  {os.path.basename(folder)}: seeds {seeds[:k]}: {len(result.units)} units, "
            f"{'complete' if result.complete else 'stopped by the budget'}, "
            f"{time.monotonic() - t0:.1f} s",
            flush=True,
        )
        if not result.complete:
            break
    if not result.rows:  # the budget left no time for a single run
        print(f"  {os.path.basename(folder)}: no run fitted in {seconds:.0f} s")
    name = os.path.basename(os.path.normpath(args.model))
    title = f"{name}: p = {p:g}, {LABELS.get(os.path.basename(folder), mode)}"
    record = run_record(
        command=[sys.executable, *sys.argv],
        fault_model={
            "sites": {s.name: list(s.modules) for s in sites},
            "p": p,
            "zero_out": fault_model_record(zero_out, seeds),
        },
        seeds=list(seeds),
        data={
            "source": os.path.abspath(args.data), "file": file_record(args.data),
            "sequence_length": args.block_size, "blocks": len(ids), "tokens": int(ids.numel()),
        },
        batch={"batch_size": args.batch_size},
        settings={"dtype": args.dtype, "device": args.device, "zero_out_mode": mode},
    )  # fmt: skip
    if result.rows:
        cp.write_campaign_outputs(result, folder, title, run=record)
    seconds_used = time.monotonic() - t0
    seeds_done = sorted({u.seed for u in result.units})
    return {
        "folder": os.path.basename(folder),
        "p": p,
        "mode": mode,
        "golden_loss": result.golden_loss,
        "tokens": result.tokens,
        "complete": result.complete,
        "seconds": seconds_used,
        "runs": len({(u.site, u.seed) for u in result.units}),
        "runs_planned": len(sites) * len(seeds),
        "seeds_done": seeds_done,
        "rows": result.rows,
    }


@torch.no_grad()
def count_cuts(model, ids, zero_out: BitflipConfig, batch_size: int) -> dict:
    """Real values ``zero_out``'s thresholds cut with nothing flipped: layer inputs of the
    campaign tokens (``x``; calibrated on other text, a threshold can sit below a campaign
    value) and weights (``w``)."""
    from peft_bitflip.calibration import scan_inputs, weight_stats
    from peft_bitflip.evaluation import batches_of

    values = {n: zero_out.values_for(n) for n, _ in model.named_modules()}
    x_t = {n: v["x_zero_out_t"] for n, v in values.items() if v is not None}
    w_t = {n: v["w_zero_out_t"] for n, v in values.items() if v is not None}
    device = next(model.parameters()).device
    with scan_inputs(model, x_t) as scan:
        for batch in batches_of(ids, batch_size):
            model(input_ids=batch.to(device))
    out = {}
    for key, stats in (("x", scan.read()), ("w", weight_stats(model, w_t))):
        mine = {n: s for n, s in stats.items() if s.get("cut") is not None}
        out[key] = {
            "cut": sum(s["cut"] for s in mine.values()),
            "elements": sum(s["elements"] for s in mine.values()),
            "layers": sum(1 for s in mine.values() if s["cut"]),
        }
    return out


# ---------------------------------------------------------------------- LoRA


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_lora(model, train_ids, flips: BitflipConfig, args, seconds: float):
    """Bit-flip-aware LoRA on ``model`` (changed in place: returned merged, clean, in the
    campaign dtype) for at most ``--lora_steps`` steps and ``seconds``; returns (model, info)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import peft_bitflip

    deadline = time.monotonic() + seconds
    t0 = time.monotonic()

    class StopAtDeadline(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if time.monotonic() > deadline:
                control.should_training_stop = True

    dtype = DTYPES[args.dtype]
    model = model.float()  # the LoRA trains in fp32 weights (bf16 autocast on a GPU)
    lora = peft_bitflip.BitflipLoraConfig.from_bitflip_config(
        flips, r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0,
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    cuda = str(args.device).startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.lora_steps,
            per_device_train_batch_size=args.lora_batch_size, learning_rate=args.lora_lr,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            logging_steps=max(1, args.lora_steps // 10), save_strategy="no", report_to=[],
            bf16=cuda, seed=42, disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=not cuda,
        )  # fmt: skip
        trainer = Trainer(
            model=peft_model, args=targs, train_dataset=_Blocks(train_ids),
            callbacks=[StopAtDeadline()],
        )  # fmt: skip
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        steps = trainer.state.global_step
    merged = peft_model.merge_and_unload()
    peft_bitflip.remove_bitflip(merged)
    merged = merged.to(dtype).eval()
    info = {
        "steps": steps,
        "max_steps": args.lora_steps,
        "stopped_by_budget": steps < args.lora_steps,
        "train_loss": out.training_loss,
        "logged_losses": losses,
        "tokens": steps * args.lora_batch_size * args.block_size,
        "seconds": time.monotonic() - t0,
        "r": args.lora_r,
        "lr": args.lora_lr,
        "fault": args.lora_fault,
        "p": flips.x_p_exp,
        "seed": flips.seed,
    }
    return merged, info


# ---------------------------------------------------------------------- summary


def _f(v, spec=".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _by_cell(summary: dict) -> dict:
    return {(r["group"], r["tensor"], r["bits"]): r for r in summary["rows"]}


def summary_markdown(study: dict) -> str:
    """Tables for docs/campaigns.md: the settings side by side, the bit sets, the blocks, the
    top sites, with the command and the time of every phase."""
    camps = {k: v for k, v in study["campaigns"].items() if v}
    lines = [
        "## Real-model campaign: " + study["model_name"],
        "",
        f"{study['date']}, {study['device_name']} (torch {study['torch']}), {study['dtype']}, "
        f"{study['tokens']:,} tokens of `{os.path.basename(study['data'])}` in blocks of "
        f"{study['block_size']} (batches of {study['batch_size']}), p = {study['p']:g} per bit "
        f"of the site, flip seeds {study['seeds']}, bit sets {study['bits']}"
        + (f" (not available: {study['bits_missing']})" if study["bits_missing"] else "")
        + f", {study['n_sites']} sites x {len(study['tensors'])} tensors.",
        "",
        "```bash",
        shlex.join(study["command"]),
        "```",
        "",
        "| phase | what | golden ppl | runs done / planned | seeds | wall s |",
        "|---|---|---:|---|---|---:|",
    ]
    for key in study["phase_seconds"]:  # in the order they ran
        if key == "setup":
            lines.append(f"| setup | load, tokenize, calibrate, count cuts | - | - | - | "
                         f"{study['phase_seconds'][key]:.1f} |")  # fmt: skip
        elif key == "lora" and study.get("lora"):
            lo = study["lora"]
            lines.append(
                f"| lora | r = {lo['r']}, lr {lo['lr']:g}, {lo['fault']} fault model at p = "
                f"{lo['p']:g}, {lo['steps']} steps ({lo['tokens']:,} tokens), train loss "
                f"{_f(lo['train_loss'])} | - | - | flip seed {lo['seed']} | {lo['seconds']:.1f} |"
            )
        elif key in camps:
            c = camps[key]
            lines.append(
                f"| {key} | {LABELS.get(key, key)} | {_f(math.exp(c['golden_loss']), '.2f')} | "
                f"{c['runs']} / {c['runs_planned']}{'' if c['complete'] else ' INCOMPLETE'} | "
                f"{c['seeds_done']} | {c['seconds']:.1f} |"
            )
    lines += ["", f"Total wall time: {study['total_seconds']:.1f} s.", ""]
    for key, what in (("calibrated", f"calibrated (margin {study['margin']:g}, on training "
                       "text)"), ("fixed", "original (30 / 1.25)")):  # fmt: skip
        c = study.get("cuts", {}).get(key)
        if c:
            lines += [
                f"With nothing flipped the {what} thresholds cut {c['x']['cut']:,} of "
                f"{c['x']['elements']:,} layer inputs of the campaign tokens ({c['x']['layers']} "
                f"layers) and {c['w']['cut']:,} of {c['w']['elements']:,} weights "
                f"({c['w']['layers']} layers).",
                "",
            ]

    # bit sets: mean Δ loss over sites per (tensor, bits) and setting
    order = [k for k in ("calibrated", "fixed", "fixed_p0", "adapted") if k in camps]

    def cell_order(tb):
        return tb[0], BIT_SETS.index(tb[1]) if tb[1] in BIT_SETS else len(BIT_SETS)

    cells = sorted({(r["tensor"], r["bits"]) for c in camps.values() for r in c["rows"]},
                   key=cell_order)  # fmt: skip
    lines += [
        "**Which bits matter**: Δ loss (nats/token vs the setting's golden run) averaged over "
        "the sites, the largest site in brackets; DUE = share of units with non-finite "
        "logits/loss.",
        "",
        "| tensor | bits | " + " | ".join(LABELS.get(k, k) for k in order) + " |",
        "|---|---|" + "---:|" * len(order),
    ]
    for t, b in cells:
        vals = []
        for k in order:
            rows = [r for r in camps[k]["rows"] if (r["tensor"], r["bits"]) == (t, b)]
            if k == "fixed_p0":  # one bit set stands for all at p = 0
                rows = [r for r in camps[k]["rows"] if r["tensor"] == t]
            if not rows:
                vals.append("-")
                continue
            d = [r["delta_loss"] for r in rows if not math.isnan(r["delta_loss"])]
            due = statistics.fmean(r["due_rate"] for r in rows)
            text = f"{statistics.fmean(d):.4f} [{max(d):.4f}]" if d else "-"
            vals.append(text + (f", DUE {due:.0%}" if due else ""))
        lines.append(f"| {t} | {b} | " + " | ".join(vals) + " |")

    # blocks: each site's worst cell per setting
    groups = list(dict.fromkeys(r["group"] for c in camps.values() for r in c["rows"]))
    main_order = [k for k in order if k != "fixed_p0"]
    lines += [
        "",
        "**Which blocks matter**: per site, its most harmful (tensor, bits) cell and its Δ "
        "loss [95 % CI]; "
        + (
            "under the original thresholds the cuts alone (p = 0) in parentheses."
            if "fixed_p0" in camps
            else ""
        ),  # fmt: skip
        "",
        "| site | " + " | ".join(LABELS.get(k, k) for k in main_order) + " |",
        "|---|" + "---|" * len(main_order),
    ]
    for g in groups:
        vals = []
        for k in main_order:
            rows = [r for r in camps[k]["rows"] if r["group"] == g]
            if not rows:
                vals.append("-")
                continue
            worst = cp.ranked(rows)[0]
            text = (f"{worst['tensor']} {worst['bits']}: {_f(worst['delta_loss'])} "
                    f"[{_f(worst['delta_loss_low'])}, {_f(worst['delta_loss_high'])}]")  # fmt: skip
            if worst["due_rate"]:
                text += f", DUE {worst['due_rate']:.0%}"
            if k == "fixed" and "fixed_p0" in camps:
                base = [r for r in camps["fixed_p0"]["rows"]
                        if r["group"] == g and r["tensor"] == worst["tensor"]]  # fmt: skip
                if base:
                    text += f" ({_f(base[0]['delta_loss'])})"
            vals.append(text)
        lines.append(f"| {g} | " + " | ".join(vals) + " |")

    # top sites per setting and how the rankings agree
    lines += ["", "**Top sites** (rank: site, tensor, bits, Δ loss, SDC rate):", ""]
    for k in main_order:
        top = cp.ranked(camps[k]["rows"])[:5]
        items = "; ".join(
            f"{i}. {r['group']} {r['tensor']} {r['bits']} {_f(r['delta_loss'])}, SDC "
            f"{_f(r['sdc_rate'], '.2%')}" + (f", DUE {r['due_rate']:.0%}" if r["due_rate"] else "")
            for i, r in enumerate(top, 1)
        )
        lines.append(f"- {LABELS.get(k, k)}: {items}")
    if "calibrated" in camps:
        base = _by_cell(camps["calibrated"])
        for k in ("fixed", "adapted"):
            if k not in camps:
                continue
            other = _by_cell(camps[k])
            rho = _spearman(base, other)
            lines.append(
                f"- Rank correlation (Spearman, over the sites both measured) of Δ loss, "
                f"calibrated vs {LABELS[k]}: {_f(rho, '.2f')}"
            )
    lines += [
        "",
        "Reading it: each setting's Δ loss is against its own golden run (the clean model; for "
        "the adapted setting the merged LoRA model, clean). Under the original thresholds a "
        "site's Δ includes the thresholds cutting the site's real values (the p = 0 row) plus "
        "what the flips add. Heatmaps: `"
        + "`, `".join(f"{c['folder']}/campaign_heatmap.png" for c in camps.values() if c["rows"])
        + "`.",  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def _spearman(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b and not math.isnan(a[k]["delta_loss"])
            and not math.isnan(b[k]["delta_loss"])]  # fmt: skip
    if len(keys) < 3:
        return math.nan

    def ranks(values):  # ties share their mean rank
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        pos = 0
        while pos < len(order):
            end = pos
            while end + 1 < len(order) and values[order[end + 1]] == values[order[pos]]:
                end += 1
            for k in range(pos, end + 1):
                r[order[k]] = (pos + end) / 2
            pos = end + 1
        return r

    ra = ranks([a[k]["delta_loss"] for k in keys])
    rb = ranks([b[k]["delta_loss"] for k in keys])
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else math.nan


# ---------------------------------------------------------------------- main


def default_train_data(path: str) -> str:
    folder, name = os.path.split(path)
    guess = os.path.join(folder, re.sub(r"^validation", "train", name))
    if guess == path or not os.path.exists(guess):
        raise ValueError(f"give --train_data (no training file beside {path!r})")
    return guess


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from peft_bitflip.evaluation import load_model
    from peft_bitflip.extras import require

    require("benchmarks/real_model_campaign.py", "datasets", "matplotlib")
    start = time.monotonic()
    if not 0 <= args.p <= 1:
        raise ValueError(f"--p must be a probability in [0, 1], got {args.p}")
    if args.max_minutes <= 0:
        raise ValueError(f"--max_minutes must be > 0, got {args.max_minutes}")
    args.train_data = args.train_data or default_train_data(args.data)
    if "adapted" in args.phases and "lora" not in args.phases:
        raise ValueError("phase 'adapted' needs phase 'lora' (the adapted model is not saved)")
    budget = Budget(args.max_minutes, [p for p in PHASES if p in args.phases])
    bits, missing = usable_bits(args.bits)
    if missing:
        print(f"bit sets {missing} are not known to this campaign module: left out")
    os.makedirs(args.out, exist_ok=True)
    dtype = DTYPES[args.dtype]
    model, tok = load_model(args.model, None, dtype=dtype, device=args.device)
    n_blocks = math.ceil(args.tokens / args.block_size)
    ids = text_blocks(args.data, tok, args.block_size, n_blocks)
    lora_blocks = args.lora_steps * args.lora_batch_size if "lora" in args.phases else 0
    train_ids = text_blocks(  # the LoRA repeats its blocks if there are fewer than its steps
        args.train_data, tok, args.block_size, max(args.calibration_blocks, lora_blocks),
        minimum=args.calibration_blocks,
    )  # fmt: skip
    calib_ids = train_ids[: args.calibration_blocks]
    sites = cp.sites_for(site_groups(model, args.site_regex), args.tensors, bits)
    n_groups = len({s.group for s in sites})

    def calibrated_for(m, *, given: bool = False):
        """Thresholds calibrated on ``m``; ``given``: those of ``--thresholds`` if set."""
        if given and args.thresholds:
            with open(args.thresholds) as f:
                return BitflipConfig.from_dict(json.load(f))
        return calibrate_zero_out(m, calib_ids, margin=args.zero_out_margin,
                                  base=BitflipConfig(), batch_size=args.batch_size)  # fmt: skip

    zero_cal = calibrated_for(model, given=True)
    fixed = BitflipConfig(x_zero_out_t=args.x_zero_out_t, w_zero_out_t=args.w_zero_out_t)
    cuts = {k: count_cuts(model, ids, z, args.batch_size)
            for k, z in (("calibrated", zero_cal), ("fixed", fixed))}  # fmt: skip
    setup_s = time.monotonic() - start
    print(f"setup: {setup_s:.1f} s; {len(sites)} sites, {len(ids)} blocks", flush=True)

    study = {
        "model": os.path.abspath(args.model),
        "model_name": os.path.basename(os.path.normpath(args.model)),
        "data": os.path.abspath(args.data),
        "train_data": os.path.abspath(args.train_data),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()})",  # fmt: skip
        "torch": torch.__version__,
        "dtype": args.dtype,
        "tokens": int(ids.numel()),
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "p": args.p,
        "seeds": args.seeds,
        "bits": bits,
        "bits_missing": missing,
        "tensors": args.tensors,
        "n_sites": n_groups,
        "margin": args.zero_out_margin,
        "cuts": cuts,
        "command": ["python", *sys.argv]
        if argv is None
        else ["python", "benchmarks/real_model_campaign.py", *argv],  # fmt: skip
        "phase_seconds": {"setup": setup_s},
        "campaigns": {},
        "lora": None,
    }

    def save():
        study["total_seconds"] = time.monotonic() - start
        slim = {**study, "campaigns": {k: {n: v for n, v in c.items() if n != "rows"}
                                       for k, c in study["campaigns"].items()}}  # fmt: skip
        with open(os.path.join(args.out, "study.json"), "w") as f:  # rows: campaign.json
            json.dump(slim, f, indent=2, default=str)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(summary_markdown(study))

    def campaign_phase(key, m, zero_out, seconds, *, p=args.p, seeds=args.seeds, phase_sites=sites,
                       mode="calibrated"):  # fmt: skip
        c = run_campaign(m, ids, phase_sites, p=p, seeds=seeds, zero_out=zero_out,
                         folder=os.path.join(args.out, key), seconds=seconds, args=args,
                         mode=mode)  # fmt: skip
        study["campaigns"][key] = c
        study["phase_seconds"][key] = c["seconds"]
        save()

    if "calibrated" in args.phases:
        print("phase calibrated", flush=True)
        campaign_phase("calibrated", model, zero_cal, budget.share("calibrated"))
    if "fixed" in args.phases:
        share = budget.share("fixed")
        print("phase fixed (p = 0 first: the cuts alone)", flush=True)
        p0_bits = "exp" if "exp" in bits else bits[0]  # at p = 0 every bit set is the same
        p0_sites = [s for s in sites if s.bits == p0_bits]
        t0 = time.monotonic()
        p0_share = share * len(p0_sites) / (len(p0_sites) + len(sites) * len(args.seeds))
        campaign_phase("fixed_p0", model, fixed, p0_share, p=0.0, seeds=args.seeds[:1],
                       phase_sites=p0_sites, mode="fixed")  # fmt: skip
        campaign_phase("fixed", model, fixed, share - (time.monotonic() - t0), mode="fixed")
    if "lora" in args.phases:
        share = budget.share("lora")
        lora_p = args.lora_p
        if args.lora_fault == "original":
            flips = BitflipConfig.original_default(seed=args.lora_seed)
        else:
            flips = calibrate_zero_out(
                model, calib_ids, margin=args.zero_out_margin, batch_size=args.batch_size,
                base=BitflipConfig(x_p_exp=lora_p, x_p_frac=lora_p, w_p_exp=lora_p,
                                   w_p_frac=lora_p, seed=args.lora_seed),
            )  # fmt: skip
        print(f"phase lora: at most {args.lora_steps} steps, {share:.0f} s", flush=True)
        model, study["lora"] = train_lora(model, train_ids, flips, args, share)
        study["phase_seconds"]["lora"] = study["lora"]["seconds"]
        adapted_dir = os.path.join(args.out, "adapted")
        if os.path.isdir(adapted_dir):  # a new LoRA: the old units are of another model
            shutil.rmtree(adapted_dir)
        save()
        if "adapted" in args.phases:
            print("phase adapted", flush=True)
            zero_adapted = calibrated_for(model)
            campaign_phase("adapted", model, zero_adapted, budget.share("adapted"))
    save()
    print(f"wrote {args.out}/summary.md and study.json; {study['total_seconds']:.1f} s in all")
    return study


if __name__ == "__main__":
    main()
