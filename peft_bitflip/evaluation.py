"""Evaluation of models with and without flips: perplexity, lm-eval, generation, sweeps.

* :func:`load_model` -- a checkpoint with its own flips (config.json), other flips, or clean.
* :func:`perplexity` -- ``exp`` of the mean next-token loss over fixed-length blocks (every
  predicted token weighs the same), computed directly from the model's loss.
* :func:`lm_eval_results` -- lm-eval-harness ``simple_evaluate`` on a model object (the
  ``bitflip_text_ppl`` offline task is on the task path).
* :func:`generate_text` -- sampling under flips with the original's options.
* :func:`sweep` -- perplexity over a grid of error rates and seeds, resumable through its CSV.
* :func:`compare_table` -- the seed's clean / flipped / flipped + fine-tuned table.

Flips are on in train and eval mode alike; each evaluation starts the streams at call 0, so
the same seed gives the same numbers.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .config import BitflipConfig
from .layers import bitflip_layers

__all__ = [
    "KEEP",
    "SweepPoint",
    "compare_table",
    "flip_config_for",
    "generate_text",
    "lm_eval_results",
    "load_model",
    "perplexity",
    "reset_streams",
    "sweep",
]

KEEP = "checkpoint"
"""``load_model(..., bitflip=KEEP)``: use the flips recorded in the checkpoint's config.json."""


def load_model(
    name_or_path: str,
    bitflip: BitflipConfig | str | None = KEEP,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs,
):
    """``(model, tokenizer)`` of a causal LM checkpoint.

    ``bitflip``: :data:`KEEP` (the flips config.json records, if any), a :class:`BitflipConfig`
    (replaces them) or ``None`` (clean, even if config.json records flips).  Streams start at
    call 0.  ``kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf_quantizer import load_config_with

    if bitflip != KEEP:
        if bitflip is not None and not isinstance(bitflip, BitflipConfig):
            raise TypeError(
                f"bitflip must be {KEEP!r}, None or a BitflipConfig, got {type(bitflip).__name__}"
            )
        kwargs["config"] = load_config_with(name_or_path, bitflip)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    model.to(device).eval()
    reset_streams(model)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def reset_streams(model: torch.nn.Module) -> None:
    """Set every bit-flip layer's call counter to 0 (the next forward draws call 0)."""
    for _, layer in bitflip_layers(model):
        layer.bitflip_calls.zero_()
        layer._pending_calls.clear()


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    blocks,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of ``model`` on equal-length token ``blocks``.

    ``blocks``: rows with ``input_ids`` (a ``datasets.Dataset`` from
    :func:`~peft_bitflip.data.tokenize_and_group`, a list of lists or a 2-D tensor).  Returns
    ``{"loss": mean next-token cross-entropy (nats), "perplexity": exp(loss), "tokens": number
    of predicted tokens, "batches": ...}``; the first ``max_batches`` batches are used.
    A non-finite loss (flips can produce Inf/NaN logits) gives ``perplexity = inf``.
    """
    if isinstance(blocks, torch.Tensor):
        ids = blocks
    elif hasattr(blocks, "column_names"):  # a datasets.Dataset
        ids = torch.tensor(blocks["input_ids"][:])
    else:
        ids = torch.tensor(list(blocks))
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"blocks must be (n, length >= 2) token ids, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = math.ceil(ids.size(0) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    batches = range(n_batches)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", leave=False)
    for b in batches:
        batch = ids[b * batch_size : (b + 1) * batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss.float().item()
        n = batch.size(0) * (batch.size(1) - 1)
        total += loss * n
        tokens += n
    loss = total / tokens
    ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
    return {"loss": loss, "perplexity": ppl, "tokens": tokens, "batches": n_batches}


def lm_eval_results(
    model,
    tokenizer,
    tasks: Sequence[str] = ("wikitext",),
    *,
    batch_size: int = 8,
    limit: float | None = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    metadata: dict | None = None,
) -> dict:
    """lm-eval-harness ``simple_evaluate`` of a model object; returns its results dict.

    The ``bitflip_text_ppl`` task (offline perplexity on local text, see
    ``peft_bitflip/lm_eval_tasks``) is on the task path; ``metadata`` reaches task loaders
    (e.g. ``{"data_files": [...], "max_documents": 100}``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .lm_eval_tasks import TASK_DIR

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = TaskManager(include_path=TASK_DIR, metadata=metadata)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        metadata=metadata,
    )
    results.pop("samples", None)
    return results


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 0.9,
    seed: int = 0,
) -> str:
    """The model's continuation of ``prompt`` (the response only), sampled under flips.

    ``seed`` seeds torch's sampler; the flips follow the model's own streams.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if tokenizer.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


TARGETS = ("x", "w", "both")
FIELDS = ("exp", "frac", "both")


def flip_config_for(
    p: float,
    target: str = "both",
    field: str = "both",
    *,
    seed: int = 0,
    x_zero_out_t: float | None = 30.0,
    w_zero_out_t: float | None = 1.25,
    skip_modules: Sequence[str] = ("lm_head",),
) -> BitflipConfig:
    """A :class:`BitflipConfig` flipping with probability ``p`` the ``field`` bits
    (``exp`` = sign and exponent, ``frac`` = mantissa, or ``both``) of the ``target`` tensors
    (``x`` = layer inputs, ``w`` = weights, or ``both``); thresholds as the original's."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
    values = {}
    for t in ("x", "w"):
        on = target in (t, "both")
        values[f"{t}_p_exp"] = p if on and field in ("exp", "both") else 0.0
        values[f"{t}_p_frac"] = p if on and field in ("frac", "both") else 0.0
    return BitflipConfig(
        **values,
        x_zero_out_t=x_zero_out_t,
        w_zero_out_t=w_zero_out_t,
        seed=seed,
        skip_modules=list(skip_modules),
    )


@dataclass(frozen=True)
class SweepPoint:
    """One sweep measurement: error rate, what was flipped, seed and the perplexity."""

    p: float
    target: str
    field: str
    seed: int
    loss: float
    perplexity: float

    @property
    def key(self) -> tuple:
        return (float(self.p), self.target, self.field, int(self.seed))


SWEEP_COLUMNS = ["p", "target", "field", "seed", "loss", "perplexity"]


def _read_sweep_csv(path: str) -> list[SweepPoint]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != SWEEP_COLUMNS:
        raise ValueError(f"{path} is not a sweep CSV (columns {list(rows[0])})")
    return [
        SweepPoint(
            float(r["p"]),
            r["target"],
            r["field"],
            int(r["seed"]),
            float(r["loss"]),
            float(r["perplexity"]),
        )
        for r in rows
    ]


def sweep(
    model,
    blocks,
    p_values: Iterable[float],
    *,
    targets: Sequence[str] = ("both",),
    fields: Sequence[str] = ("both",),
    seeds: Sequence[int] = (0, 1, 2),
    x_zero_out_t: float | None = 30.0,
    w_zero_out_t: float | None = 1.25,
    batch_size: int = 8,
    max_batches: int | None = None,
    csv_path: str | None = None,
    progress: bool = True,
) -> list[SweepPoint]:
    """Perplexity of ``model`` for every (p, target, field, seed) of the grid.

    The model's bit-flip settings are replaced for each point (``apply_bitflip``, streams
    reset to call 0) and removed at the end.  With ``csv_path`` every point is appended to the
    CSV as soon as it is measured and points already in it are skipped, so an interrupted
    sweep resumes where it stopped.  p = 0 is measured once per seed, like any other p.
    """
    from .transform import apply_bitflip, remove_bitflip

    grid = [
        (float(p), t, f, int(s)) for p in p_values for t in targets for f in fields for s in seeds
    ]
    for p, t, f, _ in grid:  # validate the whole grid before the first measurement
        flip_config_for(p, t, f)
    done = {pt.key: pt for pt in _read_sweep_csv(csv_path)} if csv_path else {}
    todo = [g for g in grid if g not in done]
    if csv_path and not os.path.exists(csv_path):
        with open(csv_path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(SWEEP_COLUMNS)
    iterator = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            todo, desc="sweep", unit="point", initial=len(grid) - len(todo), total=len(grid)
        )
    try:
        for p, t, f, s in iterator:
            cfg = flip_config_for(
                p, t, f, seed=s, x_zero_out_t=x_zero_out_t, w_zero_out_t=w_zero_out_t
            )
            apply_bitflip(model, cfg)
            reset_streams(model)
            r = perplexity(model, blocks, batch_size=batch_size, max_batches=max_batches)
            point = SweepPoint(p, t, f, s, r["loss"], r["perplexity"])
            done[point.key] = point
            if csv_path:
                with open(csv_path, "a", newline="", encoding="utf-8") as fh:
                    csv.writer(fh).writerow([p, t, f, s, r["loss"], r["perplexity"]])
    finally:
        remove_bitflip(model)
    return [done[g] for g in grid]


def summarize_sweep(points: Iterable[SweepPoint]) -> list[dict]:
    """Mean and spread over seeds: one row per (p, target, field), sorted by p.

    ``ppl_mean`` / ``ppl_std`` (sample standard deviation, 0 for one seed) are over the
    seeds' perplexities, ``ppl_min`` / ``ppl_max`` their range; infinite values count as such.
    """
    groups: dict[tuple, list[SweepPoint]] = {}
    for pt in points:
        groups.setdefault((pt.p, pt.target, pt.field), []).append(pt)
    rows = []
    for (p, t, f), pts in sorted(groups.items()):
        ppl = [pt.perplexity for pt in pts]
        finite = all(math.isfinite(v) for v in ppl)
        rows.append(
            {
                "p": p,
                "target": t,
                "field": f,
                "seeds": len(pts),
                "ppl_mean": statistics.fmean(ppl) if finite else math.inf,
                "ppl_std": statistics.stdev(ppl) if finite and len(ppl) > 1 else 0.0,
                "ppl_min": min(ppl),
                "ppl_max": max(ppl),
            }
        )
    return rows


def plot_sweep(rows: list[dict], path: str, title: str = "perplexity vs bit-error rate") -> None:
    """A PNG of mean perplexity (error bars: min..max over seeds) against p (log axes).

    One line per (``model``, target, field); rows without a ``"model"`` key are one model.

    p = 0 cannot sit on a log axis: it is drawn as a dashed horizontal line per series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r.get("model"), r["target"], r["field"]), []).append(r)
    for (model, t, f), rs in series.items():
        label = "x+w" if t == "both" else t
        label += "" if f == "both" else f" ({f})"
        if model is not None:
            label = f"{model}: {label}"
        pos = [r for r in rs if r["p"] > 0 and math.isfinite(r["ppl_mean"])]
        if pos:
            xs = [r["p"] for r in pos]
            ys = [r["ppl_mean"] for r in pos]
            err = [
                [y - r["ppl_min"] for y, r in zip(ys, pos)],
                [r["ppl_max"] - y for y, r in zip(ys, pos)],
            ]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            color = line[0].get_color()
        else:
            color = None
        for r in rs:
            if r["p"] == 0 and math.isfinite(r["ppl_mean"]):
                ax.axhline(r["ppl_mean"], linestyle="--", color=color, label=f"{label}, p = 0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bit flip probability p")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``rows`` (``{"setting", "model", "flips", "ppl_mean", "ppl_std",
    "seeds"}``), the layout of the original's clean / flipped / fine-tuned table."""
    lines = [
        "| setting | model | flips | perplexity (mean ± sd) | seeds |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        ppl = (
            f"{r['ppl_mean']:.2f} ± {r['ppl_std']:.2f}"
            if r["seeds"] > 1
            else (f"{r['ppl_mean']:.2f}")
        )
        lines.append(f"| {r['setting']} | {r['model']} | {r['flips']} | {ppl} | {r['seeds']} |")
    return "\n".join(lines)
