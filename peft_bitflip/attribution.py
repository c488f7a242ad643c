"""What the damage of a fault model is made of: zero-out alone, flips alone, both.

:func:`attribute` evaluates one model on the same token blocks under

=====================================  ===========================================
row                                    settings
=====================================  ===========================================
clean                                  no bit-flip layer
zero-out x (p = 0)                     x thresholds only, nothing flips
zero-out W (p = 0)                     W thresholds only, nothing flips
zero-out x + W (p = 0)                 both thresholds, nothing flips
flips, no zero-out                     the fault model's p, thresholds off
flips + zero-out                       the fault model as given
calibrated zero-out (p = 0)            optional: thresholds from ``calibrate_zero_out``
flips + calibrated zero-out            optional: the fault model's p with them
=====================================  ===========================================

Rows with flips run once per flip seed; rows without flips are deterministic and run once.
Per layer it counts the real elements the thresholds cut with nothing flipped (x: over the
evaluation batches of the "zero-out x + W" row, W: once), next to the layer's maximum
``|x|`` (clean run) and ``|w|``, so the table shows *where* zero-out bites.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

import torch

from .config import BitflipConfig
from .evaluation import _block_tensor, perplexity, reset_streams, with_probabilities
from .run_record import fault_model_record

__all__ = ["attribute", "attribution_markdown", "without_thresholds"]

NO_FLIPS = {"x_p_exp": 0.0, "x_p_frac": 0.0, "w_p_exp": 0.0, "w_p_frac": 0.0}


def without_thresholds(config: BitflipConfig, *, x: bool = False, w: bool = False):
    """A copy of ``config`` with the ``x`` and/or ``w`` zero-out switched off everywhere
    (top-level value and every per-module rule)."""
    d = config.to_dict()
    drop = [k for k, on in (("x_zero_out_t", x), ("w_zero_out_t", w)) if on]
    for k in drop:
        d[k] = None
    if d["layer_name_to_config"] is not None:
        d["layer_name_to_config"] = [
            [pat, rule and {k: (None if k in drop else v) for k, v in rule.items()}]
            for pat, rule in d["layer_name_to_config"]
        ]
    return BitflipConfig.from_dict(d)


def _has_threshold(config: BitflipConfig, key: str) -> bool:
    if getattr(config, key) is not None:
        return True
    rules = config.layer_name_to_config or {}
    return any(rule and rule.get(key) is not None for rule in rules.values())


def _has_flips(config: BitflipConfig) -> bool:
    keys = NO_FLIPS
    if any(getattr(config, k) > 0 for k in keys):
        return True
    rules = config.layer_name_to_config or {}
    return any(rule and any(rule.get(k, 0) > 0 for k in keys) for rule in rules.values())


def _settings(flips: BitflipConfig, calibrated: BitflipConfig | None) -> list[tuple]:
    """(row name, config or None, random) for every row of the report."""
    zero = with_probabilities(flips, NO_FLIPS)
    rows = [("clean", None, False)]
    has_x, has_w = _has_threshold(flips, "x_zero_out_t"), _has_threshold(flips, "w_zero_out_t")
    if has_x:
        rows.append(("zero-out x (p = 0)", without_thresholds(zero, w=True), False))
    if has_w:
        rows.append(("zero-out W (p = 0)", without_thresholds(zero, x=True), False))
    if has_x and has_w:
        rows.append(("zero-out x + W (p = 0)", zero, False))
    if _has_flips(flips):
        if has_x or has_w:
            rows.append(("flips, no zero-out", without_thresholds(flips, x=True, w=True), True))
        rows.append(("flips + zero-out" if has_x or has_w else "flips", flips, True))
    if calibrated is not None:
        rows.append(
            ("calibrated zero-out (p = 0)", with_probabilities(calibrated, NO_FLIPS), False)
        )
        if _has_flips(flips):
            p = {k: getattr(flips, k) for k in NO_FLIPS}
            rows.append(("flips + calibrated zero-out", with_probabilities(calibrated, p), True))
    return rows


def _describe_thresholds(config: BitflipConfig | None, key: str) -> str:
    if config is None:
        return "-"
    rules = config.layer_name_to_config or {}
    per_layer = {rule.get(key) for rule in rules.values() if rule and key in rule}
    if per_layer:
        vals = [v for v in per_layer if v is not None]
        if not vals:
            return "off"
        return f"per layer ({min(vals):.3g}..{max(vals):.3g})"
    t = getattr(config, key)
    return "off" if t is None else f"{t:g}"


@torch.no_grad()
def attribute(
    model: torch.nn.Module,
    blocks,
    flips: BitflipConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    calibrated: BitflipConfig | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` under the rows of the module doc and count the cuts per layer.

    ``model`` is a clean model (bit-flip layers are replaced per row and removed at the end);
    ``flips``: the fault model to take apart; ``calibrated``: optional thresholds (e.g.
    :func:`~peft_bitflip.calibration.calibrate_zero_out`) for two more rows.  Returns a
    JSON-ready dict: ``fault_model`` (with the ``seeds`` used), ``rows`` (per row: its complete
    ``bitflip_config``, ``perplexities`` / ``losses`` per seed, ``ppl_mean``, ``ppl_std``,
    ``diverged`` seeds, ``nonfinite_share`` of batches,
    ``reason``), ``layers`` (per layer: ``x_max``, ``x_cut``, ``x_elements``, ``w_max``,
    ``w_cut``, ``w_elements`` and the thresholds), ``tokens``, ``zero_out_share``: the share
    of the fault model's loss increase over clean that the zero-out alone already causes.
    """
    from .calibration import scan_inputs, weight_stats
    from .transform import apply_bitflip, remove_bitflip

    if not isinstance(flips, BitflipConfig):
        raise TypeError(f"flips must be a BitflipConfig, got {type(flips).__name__}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("attribute needs at least one flip seed")
    ids = _block_tensor(blocks)
    settings = _settings(flips, calibrated)
    iterator = settings
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(settings, desc="attribution", unit="row")
    rows, layers = [], {}
    remove_bitflip(model)
    try:
        for name, cfg, random in iterator:
            results = []
            for seed in seeds if random else [seeds[0]]:
                if cfg is None:
                    remove_bitflip(model)
                    with scan_inputs(model) as scan:
                        r = perplexity(model, ids, batch_size=batch_size, max_batches=max_batches)
                    for lname, st in scan.read().items():
                        layers.setdefault(lname, {}).update(x_max=st["max"])
                else:
                    run_cfg = BitflipConfig.from_dict({**cfg.to_dict(), "seed": seed})
                    with warnings.catch_warnings():  # the row without zero-out is on purpose
                        warnings.filterwarnings("ignore", message="exponent flips without")
                        apply_bitflip(model, run_cfg)
                    reset_streams(model)
                    if name == "zero-out x + W (p = 0)":
                        r = _perplexity_counting_cuts(model, ids, batch_size, max_batches, layers)
                    else:
                        r = perplexity(model, ids, batch_size=batch_size, max_batches=max_batches)
                results.append(r)
            rows.append(_row(name, cfg, random, seeds, results))
        for lname, st in weight_stats(model).items():
            layers.setdefault(lname, {}).update(w_max=st["max"], w_elements=st["elements"])
        if not any(r["setting"] == "zero-out x + W (p = 0)" for r in rows):
            _count_weight_cuts(model, flips, layers)
    finally:
        remove_bitflip(model)
    layer_rows = [{"layer": n, **v} for n, v in layers.items() if "x_t" in v or "w_t" in v]
    return {
        "fault_model": fault_model_record(flips, seeds),
        "seeds": seeds,
        "calibrated": None if calibrated is None else calibrated.to_dict(),
        "tokens": rows[0]["tokens"],
        "rows": rows,
        "layers": layer_rows,
        "zero_out_share": _zero_out_share(rows),
    }


def _perplexity_counting_cuts(model, ids, batch_size, max_batches, layers) -> dict:
    """:func:`perplexity` of a p = 0 zero-out model, counting per layer the inputs and weights
    its thresholds cut (real values: nothing flips)."""
    from .calibration import scan_inputs, weight_stats
    from .layers import bitflip_layers

    x_t = {n: m.x_spec.zero_out_threshold for n, m in bitflip_layers(model)}
    w_t = {n: m.w_spec.zero_out_threshold for n, m in bitflip_layers(model)}
    with scan_inputs(model, x_t) as scan:
        r = perplexity(model, ids, batch_size=batch_size, max_batches=max_batches)
    for n, st in scan.read().items():
        if n in x_t:
            layers.setdefault(n, {}).update(
                x_t=x_t[n], x_cut=st["cut"] or 0, x_elements=st["elements"]
            )
    for n, st in weight_stats(model, w_t).items():
        if n in w_t:
            layers.setdefault(n, {}).update(w_t=w_t[n], w_cut=st["cut"] or 0)
    return r


def _count_weight_cuts(model, flips, layers) -> None:
    """W cuts for a fault model with no x thresholds (no 'x + W' row ran)."""
    from .calibration import weight_stats
    from .transform import candidate_modules

    w_t = {}
    for n, _ in candidate_modules(model):
        v = flips.values_for(n)
        if v is not None:
            w_t[n] = v["w_zero_out_t"]
    for n, st in weight_stats(model, w_t).items():
        if n in w_t:
            layers.setdefault(n, {}).update(w_t=w_t[n], w_cut=st["cut"] or 0)


def _row(name, cfg, random, seeds, results) -> dict:
    ppl = [r["perplexity"] for r in results]
    diverged = sum(r["diverged"] for r in results)
    batches = sum(r["batches"] for r in results)
    finite = not diverged
    reasons = [r["reason"] for r in results if r["reason"]]
    return {
        "setting": name,
        "x_zero_out": _describe_thresholds(cfg, "x_zero_out_t"),
        "w_zero_out": _describe_thresholds(cfg, "w_zero_out_t"),
        "flips": random,
        "seeds": seeds if random else [],
        "bitflip_config": fault_model_record(cfg, seeds if random else [seeds[0]]),
        "perplexities": ppl,
        "losses": [r["loss"] for r in results],
        "ppl_mean": statistics.fmean(ppl) if finite else math.inf,
        "ppl_std": statistics.stdev(ppl) if finite and len(ppl) > 1 else 0.0,
        "loss_mean": statistics.fmean(r["loss"] for r in results) if finite else math.inf,
        "diverged": diverged,
        "runs": len(results),
        "nonfinite_share": sum(r["nonfinite_batches"] for r in results) / batches,
        "reason": reasons[0] if reasons else None,
        "tokens": results[0]["tokens"],
    }


def _zero_out_share(rows) -> float | None:
    """(loss under zero-out x + W at p = 0 - clean) / (loss under the fault model - clean)."""
    by = {r["setting"]: r for r in rows}
    clean, full = by.get("clean"), by.get("flips + zero-out")
    zero = (
        by.get("zero-out x + W (p = 0)")
        or by.get("zero-out x (p = 0)")
        or by.get("zero-out W (p = 0)")
    )
    if not (clean and full and zero) or full["diverged"] or zero["diverged"]:
        return None
    total = full["loss_mean"] - clean["loss_mean"]
    if total <= 0:
        return None
    return (zero["loss_mean"] - clean["loss_mean"]) / total


def _fmt_ppl(row: dict) -> str:
    if row["diverged"]:
        share = f"{row['nonfinite_share']:.0%} of batches"
        return f"diverged ({row['diverged']}/{row['runs']} runs, {share})"
    if row["runs"] > 1:
        return f"{row['ppl_mean']:.2f} ± {row['ppl_std']:.2f}"
    return f"{row['ppl_mean']:.2f}"


def attribution_markdown(report: dict, top: int = 10) -> str:
    """The report as markdown: the rows, the finding, and the ``top`` layers by cuts."""
    lines = [
        f"Perplexity on {report['tokens']:,} predicted tokens.",
        "",
        "| setting | x zero-out | W zero-out | perplexity | flip seeds |",
        "|---|---|---|---:|---|",
    ]
    for r in report["rows"]:
        seeds = ", ".join(map(str, r["seeds"])) if r["seeds"] else "-"
        lines.append(
            f"| {r['setting']} | {r['x_zero_out']} | {r['w_zero_out']} | {_fmt_ppl(r)} | {seeds} |"
        )
    reasons = {r["reason"] for r in report["rows"] if r["reason"]}
    for reason in sorted(reasons):
        lines += ["", f"Diverged: {reason}."]
    share = report.get("zero_out_share")
    if share is not None:
        lines += [
            "",
            f"The zero-out alone (nothing flipped) causes {share:.0%} of the fault model's loss "
            "increase over clean.",
        ]
    layers = report["layers"]
    if layers:
        x_total = sum(v.get("x_cut", 0) for v in layers)
        w_total = sum(v.get("w_cut", 0) for v in layers)
        x_elems = sum(v.get("x_elements", 0) for v in layers)
        w_elems = sum(v.get("w_elements", 0) for v in layers)
        x_layers = sum(1 for v in layers if v.get("x_cut"))
        w_layers = sum(1 for v in layers if v.get("w_cut"))
        lines += [
            "",
            f"Real values the thresholds cut with nothing flipped: {x_total:,} of {x_elems:,} "
            f"layer inputs ({x_total / max(x_elems, 1):.2e}) in {x_layers} layers; "
            f"{w_total:,} of {w_elems:,} weights ({w_total / max(w_elems, 1):.2e}) in "
            f"{w_layers} layers.",
        ]
        ranked = sorted(layers, key=lambda v: v.get("x_cut", 0) + v.get("w_cut", 0), reverse=True)
        ranked = [v for v in ranked if v.get("x_cut", 0) + v.get("w_cut", 0) > 0][:top]
        if ranked:
            lines += [
                "",
                "| layer | x cut | max \\|x\\| | x threshold | W cut | max \\|w\\| | W threshold |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for v in ranked:
                lines.append(
                    f"| {v['layer']} | {v.get('x_cut', 0):,} | {_g(v.get('x_max'))} | "
                    f"{_g(v.get('x_t'))} | {v.get('w_cut', 0):,} | {_g(v.get('w_max'))} | "
                    f"{_g(v.get('w_t'))} |"
                )
    return "\n".join(lines)


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"
