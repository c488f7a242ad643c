"""Zero-out thresholds calibrated to a model: its own per-layer maxima, times a margin.

The original's thresholds (``|x| >= 30``, ``|w| >= 1.25`` become 0) were chosen for models
whose values stay below them.  A real pretrained model does not: SmolLM2-135M has linear
inputs up to ~3,100 and ~10,000 weights above 1.25, so those thresholds cut real values with
no flip at all.  :func:`calibrate_zero_out` sets a threshold per layer just above what the
model itself produces:

* ``x``: ``margin * max |x|`` of the layer's input over calibration batches (flips off);
* ``w``: ``margin * max |w|`` of the layer's weight;

each rounded to float32 (the dtype the kernels compare in) and raised, if needed, to the
next float32 above the maximum, so a calibrated model at p = 0 is bit-identical to the clean
model on the calibration batches (on other text, an input above its layer's threshold is
still cut: see ``docs/statistics.md``).  The result is a :class:`BitflipConfig` with one
``layer_name_to_config`` rule per layer, so it round-trips through ``config.json`` and
:class:`~peft_bitflip.BitflipLoraConfig.from_bitflip_config`.

:func:`layer_input_stats` is the scan underneath (max |x|, elements, and how many
elements each layer's own threshold cuts), also used by the attribution report.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .config import BURST_KEYS, P_BITS_KEYS, RULE_KEYS, STUCK_KEYS, BitflipConfig
from .layers import BitflipLayerMixin, disable_bitflips

__all__ = [
    "calibrate_zero_out",
    "layer_input_stats",
    "threshold_above",
    "weight_stats",
]


def threshold_above(maximum: float, margin: float) -> float:
    """``margin * maximum`` as a float32 value, at least the next float32 above ``maximum``:
    the smallest threshold that keeps every value ``<= maximum`` (``|v| >= t`` is cut)."""
    top = np.float32(maximum)
    t = np.float32(float(top) * margin)
    if not t > top:
        t = np.nextafter(top, np.float32(np.inf))
    return float(t)


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating)):
        raise TypeError(f"margin must be a number >= 1, got {margin!r}")
    margin = float(margin)
    if math.isnan(margin) or margin < 1.0 or math.isinf(margin):
        raise ValueError(f"margin must be a finite number >= 1, got {margin!r}")
    return margin


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module a BitflipConfig can wrap (or has wrapped); refuses MoE
    experts modules, whose matmul inputs are not module inputs (see ``experts.py``)."""
    from .experts import is_experts
    from .transform import candidate_modules

    modules = candidate_modules(model)
    experts = [n for n, m in modules if is_experts(m)]
    if experts:
        raise NotImplementedError(
            f"MoE experts module {experts[0]!r} ({len(experts)} in the model): the calibration "
            "and zero-out scans read each linear layer's input and weight, and the inputs of "
            "an expert's matmuls are computed inside the experts forward, so they are not "
            "measured yet. Give the experts thresholds by hand (a layer_name_to_config rule "
            "such as '.*experts') or skip them (skip_modules)"
        )
    return modules


class _InputScan:
    """Forward pre-hooks that accumulate, per module and on its device (no host sync), the
    number of input elements, the largest finite ``|x|``, the non-finite elements and, where
    a threshold is given, the elements with ``|x| >= t``."""

    def __init__(self, modules: dict[str, nn.Module], thresholds: dict[str, float | None]):
        self.modules = modules
        self.thresholds = thresholds
        self.stats: dict[str, dict] = {}
        self.handles = []

    def _hook(self, name):
        t = self.thresholds.get(name)

        def hook(module, args, kwargs=None):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            if x.is_meta or x.numel() == 0:
                return
            with torch.no_grad():
                a = x.detach().abs().float()
                finite = torch.isfinite(a)
                st = self.stats.get(name)
                if st is None:
                    z = torch.zeros((), dtype=torch.int64, device=x.device)
                    st = self.stats[name] = {
                        "elements": 0,
                        "max": torch.zeros((), dtype=torch.float32, device=x.device),
                        "nonfinite": z.clone(),
                        "cut": z.clone(),
                    }
                st["elements"] += x.numel()
                st["max"] = torch.maximum(st["max"], torch.where(finite, a, 0).amax())
                st["nonfinite"] += (~finite).sum()
                if t is not None:
                    st["cut"] += ((a >= np.float32(t)) | ~finite).sum()

        return hook

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def read(self) -> dict[str, dict]:
        out = {}
        for name, st in self.stats.items():
            out[name] = {
                "elements": st["elements"],
                "max": float(st["max"]),
                "nonfinite": int(st["nonfinite"]),
                "cut": int(st["cut"]) if self.thresholds.get(name) is not None else None,
            }
        return out


@contextlib.contextmanager
def scan_inputs(model: nn.Module, thresholds: dict[str, float | None] | None = None):
    """Context manager: scan the inputs of every linear layer of ``model`` while it runs;
    ``.read()`` on the yielded object gives ``{name: {elements, max, nonfinite, cut}}``
    (``cut``: elements with ``|x| >= thresholds[name]`` or non-finite; None without one)."""
    mods = dict(_linear_modules(model))
    scan = _InputScan(mods, thresholds or {})
    with scan:
        yield scan


@torch.no_grad()
def layer_input_stats(
    model: nn.Module,
    blocks,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    flips: bool = False,
) -> dict[str, dict]:
    """``{layer: {"elements", "max", "nonfinite", "cut"}}`` of every linear layer's input over
    the batches of ``blocks`` (token ids; see :func:`~peft_bitflip.evaluation.perplexity`).

    With ``flips=False`` (default) the bit-flip layers run clean (no flips, no zero-out), so
    ``max`` is the model's own maximum; with ``flips=True`` they run as configured and ``cut``
    counts the inputs each layer's own ``x`` threshold removes (at p = 0: real values cut).
    """
    from .evaluation import batches_of

    _check_not_peft(model)
    thresholds = {}
    if flips:
        for name, m in _linear_modules(model):
            if isinstance(m, BitflipLayerMixin) and m.bitflip_enabled:
                thresholds[name] = m.x_spec.zero_out_threshold
    ctx = contextlib.nullcontext() if flips else disable_bitflips(model)
    device = next(model.parameters()).device
    with ctx, scan_inputs(model, thresholds) as scan:
        for batch in batches_of(blocks, batch_size, max_batches):
            model(input_ids=batch.to(device))
    return scan.read()


@torch.no_grad()
def weight_stats(model: nn.Module, thresholds: dict[str, float | None] | None = None) -> dict:
    """``{layer: {"elements", "max", "nonfinite", "cut"}}`` of every linear layer's weight
    (``cut``: elements with ``|w| >= thresholds[layer]`` or non-finite; None without one)."""
    thresholds = thresholds or {}
    out = {}
    for name, m in _linear_modules(model):
        w = m.weight.detach()
        if w.is_meta:
            continue
        a = w.abs().float()
        finite = torch.isfinite(a)
        t = thresholds.get(name)
        out[name] = {
            "elements": w.numel(),
            "max": float(torch.where(finite, a, 0).amax()) if w.numel() else 0.0,
            "nonfinite": int((~finite).sum()),
            "cut": None if t is None else int(((a >= np.float32(t)) | ~finite).sum()),
        }
    return out


def _check_not_peft(model) -> None:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise TypeError(
            "calibrate the model before get_peft_model (module names then match the "
            "BitflipConfig rules), or merge_and_unload() the adapters first"
        )


def calibrate_zero_out(
    model: nn.Module,
    blocks,
    *,
    margin: float = 2.0,
    base: BitflipConfig | None = None,
    x: bool = True,
    w: bool = True,
    per_layer: bool = True,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> BitflipConfig:
    """``base`` (default: the model's own BitflipConfig, else the original's fault model) with
    zero-out thresholds set from the model's own maxima.

    Args:
        blocks: calibration token blocks (rows of ``input_ids``; use text the evaluation does
            not use); the model runs on the first ``max_batches`` batches with flips off.
        margin: factor >= 1 over the maximum (default 2: no mantissa flip is ever cut, since
            a mantissa flip changes a magnitude by less than a factor 2; see
            ``docs/statistics.md``).
        x, w: calibrate the input / weight thresholds (the other keeps ``base``'s).
        per_layer: one threshold per layer (rules); ``False``: one model-wide threshold per
            tensor kind (``margin`` times the largest maximum), as top-level values.

    Returns a new :class:`BitflipConfig` (``base`` is not changed); its probabilities, seed,
    skip list and wrapped modules are ``base``'s.  At p = 0 the calibrated model computes
    exactly what the clean model computes on the calibration batches.
    """
    _check_not_peft(model)
    margin = _check_margin(margin)
    if not (x or w):
        raise ValueError("calibrate_zero_out needs x=True or w=True")
    if base is None:
        own = getattr(getattr(model, "config", None), "quantization_config", None)
        if isinstance(own, dict) and own.get("quant_method") == "bitflip":
            own = BitflipConfig.from_dict(own)
        base = own if isinstance(own, BitflipConfig) else BitflipConfig.original_default()
    if not isinstance(base, BitflipConfig):
        raise TypeError(f"base must be a BitflipConfig or None, got {type(base).__name__}")
    names = [n for n, _ in _linear_modules(model) if base.values_for(n) is not None]
    if not names:
        raise ValueError("the base config wraps none of the model's linear layers")
    x_max = {}
    if x:
        stats = layer_input_stats(model, blocks, batch_size=batch_size, max_batches=max_batches)
        missing = [n for n in names if n not in stats]
        if missing:
            raise ValueError(
                f"{len(missing)} layer(s) saw no input in the calibration batches "
                f"(e.g. {missing[0]}); calibrate with x=False or other batches"
            )
        x_max = {n: stats[n]["max"] for n in names}
    w_max = {n: s["max"] for n, s in weight_stats(model).items() if n in names} if w else {}

    d = base.to_dict()
    if not per_layer:
        if x:
            d["x_zero_out_t"] = threshold_above(max(x_max.values()), margin)
        if w:
            d["w_zero_out_t"] = threshold_above(max(w_max.values()), margin)
        return BitflipConfig.from_dict(d)
    plain = base.layer_name_to_config is None
    rules = []
    for name in names:
        values = base.values_for(name)
        rule = {} if plain else {k: values[k] for k in RULE_KEYS}
        if not plain:  # the p_bits, stuck-at and burst settings the module's rule sets stay
            own = base.layer_name_to_config[base.match_rule(name)]
            kept = STUCK_KEYS + BURST_KEYS + P_BITS_KEYS
            rule.update({k: v for k, v in own.items() if k in kept})
        if x:
            rule["x_zero_out_t"] = threshold_above(x_max[name], margin)
        if w:
            rule["w_zero_out_t"] = threshold_above(w_max[name], margin)
        rules.append([re.escape(name), rule])
    d["layer_name_to_config"] = rules
    return BitflipConfig.from_dict(d)


def thresholds_of(config: BitflipConfig, names: Iterable[str]) -> dict[str, tuple]:
    """``{name: (x_zero_out_t, w_zero_out_t)}`` for the modules ``config`` wraps."""
    out = {}
    for n in names:
        v = config.values_for(n)
        if v is not None:
            out[n] = (v["x_zero_out_t"], v["w_zero_out_t"])
    return out
