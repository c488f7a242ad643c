"""Fault campaigns: which layers and which bits matter, against a golden run, with intervals.

A *site* is a group of linear modules (one decoder block, attention or MLP across blocks, one
projection kind across blocks, or a user regex), one tensor (``x`` = layer input, ``w`` =
weight) and one bit set (``exp`` = sign and exponent bits, ``frac`` = mantissa bits, ``sign``,
or ``bit:N`` / ``bit:N-M``: bit positions, 0 = least significant; see :func:`site_bit_rates`).
:func:`campaign` flips, one site at a time, that tensor's bits of that set with probability
``p`` in the site's modules only (every other module computes clean), over several flip seeds,
and compares every predicted token with the golden (clean) run on the same tokens:

* ``delta_loss``: mean next-token loss minus the golden loss (nats per token), with a 95 %
  interval (:func:`stratified_t_interval`); ``ppl_ratio`` = ``exp(delta_loss)`` (perplexity
  ratio to the golden run) with the interval's bounds exponentiated;
* ``sdc_rate``: share of predicted tokens whose top-1 token differs from the golden top-1
  (teacher-forced: every position sees the true prefix), with the same kind of interval;
* ``due_rate``: share of (seed, batch) units whose logits or loss are not finite; those
  units are left out of ``delta_loss`` and ``sdc_rate`` (so these describe the runs that
  completed);
* ``flips`` / ``trials``: the bits that really flipped in the site's tensor (the counters of
  :class:`~peft_bitflip.stats.FlipStatsRecorder`, before zero-out) and the eligible bits, so
  ``flips / trials`` is the realised rate next to ``p``; ``zeroed``: elements zero-out set to 0.

The golden run is computed once (top-1 and loss per token kept); the model is wrapped once and
the sites are switched by setting its layers' specs (no rebuild).  Each site is also a plain
:class:`~peft_bitflip.config.BitflipConfig` (:func:`site_config`: one ``layer_name_to_config``
rule per module), so any cell can be replayed with ``apply_bitflip``.  With ``csv_path`` the
per-(site, seed, batch) units are written atomically after every (site, seed) and a rerun
continues where a killed one stopped (the sweep's CSV machinery).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import BitflipConfig
from .evaluation import (
    _block_tensor,
    batches_of,
    check_settings,
    model_fingerprint,
    read_csv_rows,
    reset_streams,
    tokens_fingerprint,
    write_csv_atomic,
)
from .spec import FlipSpec

__all__ = [
    "BITS",
    "GROUPINGS",
    "check_site_bits",
    "site_bit_rates",
    "TENSORS",
    "CampaignResult",
    "Site",
    "Unit",
    "campaign",
    "campaign_markdown",
    "golden_run",
    "module_groups",
    "plot_campaign_heatmap",
    "ranked",
    "site_config",
    "sites_for",
    "stratified_t_interval",
    "summarize_campaign",
    "t_quantile",
    "write_campaign_outputs",
]

TENSORS = ("x", "w")
BITS = ("exp", "frac")
"""The default bit sets of a campaign; ``"sign"`` and ``"bit:N"`` / ``"bit:N-M"`` are also
sites (per-bit-position rates, :func:`site_bit_rates`)."""
_BIT_SPAN = re.compile(r"bit:(\d+)(?:-(\d+))?")


def check_site_bits(bits) -> str:
    """``bits`` if it names a site's bit set: ``exp``, ``frac``, ``sign``, ``bit:N`` or
    ``bit:N-M`` (N <= M); else ``ValueError`` naming it."""
    if isinstance(bits, str) and (bits in BITS or bits == "sign"):
        return bits
    span = _BIT_SPAN.fullmatch(bits) if isinstance(bits, str) else None
    if span is None or (span[2] is not None and int(span[2]) < int(span[1])):
        raise ValueError(
            f"a site's bits must be exp, frac, sign, bit:N or bit:N-M (N <= M; bit positions, "
            f"0 = least significant), got {bits!r}"
        )
    return bits


def site_bit_rates(bits: str, p: float) -> dict[str, float] | None:
    """The per-bit-position rates (``FlipSpec.p_bits``) of a site's bit set at ``p``; None for
    the groups ``exp`` / ``frac`` (their rates are ``p_exp`` / ``p_frac``)."""
    if check_site_bits(bits) in BITS:
        return None
    if bits == "sign":
        return {"sign": p}
    span = _BIT_SPAN.fullmatch(bits)
    first, last = int(span[1]), int(span[2] or span[1])
    return {str(i): p for i in range(first, last + 1)}


GROUPINGS = ("blocks", "attn_mlp", "proj")
UNIT_COLUMNS = [
    "site", "seed", "batch", "tokens", "loss_sum", "golden_loss_sum", "mismatches", "finite",
    "flips", "trials", "zeroed",
]  # fmt: skip
SETTINGS_FILE = "campaign_settings.json"


# ---------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """Flips confined to ``modules`` (qualified names), tensor ``x`` or ``w``, bit set ``exp``
    (sign + exponent), ``frac`` (mantissa), ``sign`` or ``bit:N`` / ``bit:N-M`` (positions in
    the tensor's dtype).  ``group``: the modules' label (a heatmap row)."""

    group: str
    modules: tuple[str, ...]
    tensor: str
    bits: str

    def __post_init__(self):
        if self.tensor not in TENSORS:
            raise ValueError(f"a site's tensor must be one of {TENSORS}, got {self.tensor!r}")
        check_site_bits(self.bits)
        if not self.modules:
            raise ValueError(f"site {self.group!r} has no module")
        if "|" in self.group:
            raise ValueError(f"a site's group name may not contain '|': {self.group!r}")

    @property
    def name(self) -> str:
        """``"group|tensor|bits"``: the site's key in the CSV."""
        return f"{self.group}|{self.tensor}|{self.bits}"

    @property
    def column(self) -> str:
        """The heatmap column: ``"x exp"``, ``"w frac"``, ..."""
        return f"{self.tensor} {self.bits}"


def _flippable_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules a default BitflipConfig wraps (every linear but ``lm_head``)."""
    from .transform import candidate_modules

    base = BitflipConfig()
    return list(dict.fromkeys(n for n, _ in candidate_modules(model) if base.values_for(n)))


_BLOCK = re.compile(r"^(.*?)\.(\d+)(\.|$)")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.IGNORECASE)


def module_groups(
    model: torch.nn.Module, grouping: str = "blocks", regexes: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """``{group label: module names}`` of the model's flippable linear modules.

    ``grouping``: ``"blocks"`` (one group per decoder block: the first numbered component of
    the name, ``block 0``, ``block 1``, ...), ``"attn_mlp"`` (``attention`` and ``mlp`` across
    all blocks), ``"proj"`` (one group per module kind across blocks: ``q_proj``, ...,
    ``down_proj``), or ``"regex"``: ``regexes`` maps a label to a regex full-matched against
    the qualified module names (a regex matching nothing raises ``ValueError``).
    """
    names = _flippable_modules(model)
    if not names:
        raise ValueError("the model has no linear module to flip")
    groups: dict[str, list[str]] = {}
    if grouping == "regex":
        if not regexes:
            raise ValueError("grouping 'regex' needs regexes {label: regex}")
        for label, pattern in regexes.items():
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"site regex {pattern!r} ({label}) is invalid: {e}") from None
            matched = [n for n in names if rx.fullmatch(n)]
            if not matched:
                examples = ", ".join(names[:4])
                raise ValueError(
                    f"site regex {pattern!r} ({label}) matches no linear module; names look "
                    f"like {examples}"
                )
            groups[label] = matched
        return groups
    if grouping == "blocks":
        numbered = []
        for n in names:
            m = _BLOCK.match(n)
            if m:
                numbered.append((int(m.group(2)), n))
        for i, n in sorted(numbered, key=lambda t: t[0]):
            groups.setdefault(f"block {i}", []).append(n)
    elif grouping == "attn_mlp":
        for n in names:
            parts = n.split(".")[:-1]
            if any(_ATTENTION.search(p) for p in parts):
                groups.setdefault("attention", []).append(n)
            elif any(_MLP.search(p) for p in parts):
                groups.setdefault("mlp", []).append(n)
    elif grouping == "proj":
        for n in names:
            if _BLOCK.match(n):
                groups.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    else:
        raise ValueError(f"grouping must be one of {(*GROUPINGS, 'regex')}, got {grouping!r}")
    if not groups:
        raise ValueError(
            f"grouping {grouping!r} finds no group among the model's linear modules "
            f"(e.g. {names[0]}); give regexes instead"
        )
    return groups


def sites_for(
    groups: dict[str, list[str]],
    tensors: Sequence[str] = TENSORS,
    bits: Sequence[str] = BITS,
) -> list[Site]:
    """One :class:`Site` per (group, tensor, bit group), groups in order; duplicates of
    ``tensors`` / ``bits`` are dropped."""
    tensors, bits = list(dict.fromkeys(tensors)), list(dict.fromkeys(bits))
    if not tensors or not bits:
        raise ValueError("a campaign needs at least one tensor and one bit group")
    return [Site(g, tuple(mods), t, b) for g, mods in groups.items() for t in tensors for b in bits]


def _thresholds(zero_out: BitflipConfig | None, name: str) -> tuple:
    if zero_out is None:
        return None, None
    v = zero_out.values_for(name)
    if v is None:
        return None, None
    return v["x_zero_out_t"], v["w_zero_out_t"]


def site_config(
    site: Site, p: float, *, seed: int = 0, zero_out: BitflipConfig | None = None
) -> BitflipConfig:
    """The :class:`BitflipConfig` of one campaign cell: one rule per module of the site, its
    tensor's ``bits`` flipping with ``p`` and its zero-out threshold (from ``zero_out``, e.g.
    :func:`~peft_bitflip.calibration.calibrate_zero_out`; ``None``: no zero-out); every other
    module is left unwrapped (clean)."""
    rules = []
    for name in site.modules:
        x_t, w_t = _thresholds(zero_out, name)
        rule = {f"{t}_p_{b}": 0.0 for t in TENSORS for b in BITS}
        rates = site_bit_rates(site.bits, p)
        if rates is None:
            rule[f"{site.tensor}_p_{site.bits}"] = p
        else:
            rule[f"{site.tensor}_p_bits"] = rates
        rule[f"{site.tensor}_zero_out_t"] = x_t if site.tensor == "x" else w_t
        rules.append([re.escape(name), rule])
    return BitflipConfig(seed=seed, layer_name_to_config=rules)


# ---------------------------------------------------------------------- intervals


def _t_pdf(x: float, df: float) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_above_half(x: float, df: float, steps: int = 400) -> float:
    """P(T <= x) for x >= 0: 0.5 plus Simpson's rule of the density on [0, x]."""
    if x == 0:
        return 0.5
    h = x / steps
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + s * h / 3


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 <= q < 1) of Student's t with ``df`` > 0 degrees of freedom
    (``inf``: the normal), by Newton's method on its distribution function."""
    if not 0.5 <= q < 1:
        raise ValueError(f"q must be in [0.5, 1), got {q}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    z = statistics.NormalDist().inv_cdf(q)
    if math.isinf(df) or df > 1e6:
        return z
    x = z
    for _ in range(100):
        f = _t_cdf_above_half(x, df, steps=max(400, int(40 * x)))
        step = (f - q) / _t_pdf(x, df)
        x = max(x - step, x / 2)
        if abs(step) < 1e-10 * max(1.0, x):
            break
    return x


def _round_down(df: float) -> float:
    """``df`` rounded down to 2 significant digits (a slightly wider interval, cacheable)."""
    if math.isinf(df) or df <= 0:
        return df
    scale = 10 ** (math.floor(math.log10(df)) - 1)
    return max(math.floor(df / scale) * scale, min(df, 1.0))


@functools.lru_cache(maxsize=4096)
def _t_quantile_cached(q: float, df: float) -> float:
    return t_quantile(q, df)


def stratified_t_interval(
    strata: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
    confidence: float = 0.95,
) -> dict:
    """Mean and ``confidence`` interval of ``sum_b w_b mean(strata[b])``.

    Each stratum is one batch, its values the seeds' results on it (independent flip draws on
    fixed tokens).  With at least two values in every stratum: the stratified estimate, its
    variance ``sum_b w_b^2 s_b^2 / n_b`` (only the flips' variation: the tokens are fixed) and
    a t interval with Welch-Satterthwaite degrees of freedom (``method`` ``"stratified t"``).
    Otherwise (one seed) every value is taken as one draw weighted by its stratum's weight: the
    t interval (n - 1 degrees of freedom) of their weighted mean, which also counts the
    variation between batches and is wider (``"t over units"``).  Fewer than two values: the
    bounds are ``nan``.  ``weights`` (e.g. tokens per batch) default to equal.
    """
    strata = [list(map(float, s)) for s in strata if len(s)]
    if not strata:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "method": "none"}
    if weights is None:
        weights = [1.0] * len(strata)
    if len(weights) != len(strata):
        raise ValueError(f"{len(weights)} weights for {len(strata)} strata")
    total = float(sum(weights))
    w = [v / total for v in weights]
    n = sum(len(s) for s in strata)
    q = 0.5 + confidence / 2
    if all(len(s) >= 2 for s in strata):
        mean = sum(wb * statistics.fmean(s) for wb, s in zip(w, strata))
        parts = [wb * wb * statistics.variance(s) / len(s) for wb, s in zip(w, strata)]
        var = sum(parts)
        denom = sum(a * a / (len(s) - 1) for a, s in zip(parts, strata))
        df = var * var / denom if denom > 0 else math.inf
        method = "stratified t"
    else:
        # every unit one draw, weighted by its stratum's weight (its tokens): the mean is the
        # token-weighted mean over units (the campaign's point estimate); its variance the
        # linearised one of a weighted mean, n/(n-1) sum_i u_i^2 (v_i - mean)^2 with u the
        # normalised unit weights (s^2/n with equal weights)
        values = [v for s in strata for v in s]
        unit_w = [wb for wb, s in zip(w, strata) for _ in s]
        total_u = sum(unit_w)
        u = [x / total_u for x in unit_w]
        mean = sum(ui * v for ui, v in zip(u, values))
        if n < 2:
            return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "method": "none"}
        var = n / (n - 1) * sum(ui * ui * (v - mean) ** 2 for ui, v in zip(u, values))
        df = n - 1
        method = "t over units"
    half = 0.0 if var == 0 else _t_quantile_cached(q, _round_down(df)) * math.sqrt(var)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "method": method}


# ---------------------------------------------------------------------- golden run and units


@dataclass(frozen=True)
class Unit:
    """One (site, seed, batch): ``loss_sum`` / ``golden_loss_sum`` over its ``tokens``
    predicted tokens (nats), top-1 ``mismatches`` against the golden run, whether logits and
    loss were ``finite``, realised ``flips`` of the ``trials`` eligible bits of the site's
    tensor, elements ``zeroed``."""

    site: str
    seed: int
    batch: int
    tokens: int
    loss_sum: float
    golden_loss_sum: float
    mismatches: int
    finite: bool
    flips: int
    trials: int
    zeroed: int

    @property
    def key(self) -> tuple:
        return (self.site, self.seed, self.batch)

    def row(self) -> list:
        return [getattr(self, c) if c != "finite" else int(self.finite) for c in UNIT_COLUMNS]

    @classmethod
    def parse(cls, r: list[str]) -> Unit:
        return cls(
            r[0], int(r[1]), int(r[2]), int(r[3]), float(r[4]), float(r[5]), int(r[6]),
            bool(int(r[7])), int(r[8]), int(r[9]), int(r[10]),
        )  # fmt: skip


def _token_results(model, batch: torch.Tensor):
    """(loss per predicted token (float32), top-1 per predicted token, all logits finite)."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    targets = batch[:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.size(-1))
    loss = F.cross_entropy(flat, targets, reduction="none")
    finite = bool(torch.isfinite(flat).all()) and bool(torch.isfinite(loss).all())
    return loss, flat.argmax(-1), finite


@torch.no_grad()
def golden_run(model, batches: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch (loss per predicted token, top-1 per predicted token) of ``model`` as it is
    (clean); raises ``ValueError`` if the clean model's logits are not finite."""
    device = next(model.parameters()).device
    out = []
    for i, batch in enumerate(batches):
        loss, top1, finite = _token_results(model, batch.to(device))
        if not finite:
            raise ValueError(f"the clean model's logits or loss are not finite (batch {i})")
        out.append((loss, top1))
    return out


def _specs_for(site: Site, p: float, zero_out: BitflipConfig | None, name: str):
    """(x_spec, w_spec) of module ``name`` in ``site``."""
    x_t, w_t = _thresholds(zero_out, name)
    p_exp = p if site.bits == "exp" else 0.0
    p_frac = p if site.bits == "frac" else 0.0
    rates = site_bit_rates(site.bits, p)
    if site.tensor == "x":
        return FlipSpec(p_exp, p_frac, x_t, p_bits=rates), FlipSpec()
    return FlipSpec(), FlipSpec(p_exp, p_frac, w_t, p_bits=rates)


def _site_counts(site: Site, st) -> tuple[int, int]:
    """(realised flips, eligible bits) of ``site`` in one layer's counters ``st``: the group's
    counts, or for a bit-position site every counted flip (no other bit has a rate) over the
    site's positions."""
    if site.bits == "exp":
        return st.exp_flips, st.exp_bits
    if site.bits == "frac":
        return st.frac_flips, st.frac_bits
    return st.exp_flips + st.frac_flips, st.elements * len(site_bit_rates(site.bits, 1.0))


# ---------------------------------------------------------------------- the campaign


class _BlockPrefix:
    """The golden run's output of the decoder blocks that sites start after, per batch, so that
    a site run skips the blocks before the site's first one (they compute exactly the golden
    values: nothing flips there).  ``stack`` is ``None`` when the sites' modules do not sit in
    one numbered ``ModuleList`` of blocks; then nothing is skipped.

    Only the outputs some run needs are recorded (block ``k - 1`` for a site whose first block
    is ``k``), and :meth:`finished` drops each once the last run that reads it is done, so the
    memory held is at most one hidden state per (needed block, batch) and shrinks as a
    per-block campaign moves down the stack."""

    def __init__(self, model: torch.nn.Module, runs: Sequence[Site]):
        """``runs``: the site of every run still to do, in the order they run."""
        self.stack = None
        self.outputs: dict[int, list] = {}
        self._last_use: dict[int, int] = {}  # block -> index of the last run starting after it
        prefixes = {m.group(1) for s in runs for n in s.modules if (m := _BLOCK.match(n))}
        if len(prefixes) == 1:
            stack = model.get_submodule(prefixes.pop())
            if isinstance(stack, torch.nn.ModuleList) and len(stack):
                self.stack = stack
                firsts = {s: self.first_block(s) for s in set(runs)}
                for i, s in enumerate(runs):
                    if firsts[s] > 0:
                        self._last_use[firsts[s] - 1] = i
                self.outputs = {j: [] for j in sorted(self._last_use)}

    def first_block(self, site: Site) -> int:
        """The index of the site's first block (0: nothing to skip)."""
        if self.stack is None:
            return 0
        found = [m for n in site.modules if (m := _BLOCK.match(n))]
        if len(found) < len(site.modules):
            return 0
        return min(int(m.group(2)) for m in found)

    @contextlib.contextmanager
    def recording(self):
        """Keep the needed blocks' outputs while the golden run runs."""
        if self.stack is None:
            yield
            return

        def keeper(j):
            return lambda module, args, output: self.outputs[j].append(output)

        handles = [self.stack[j].register_forward_hook(keeper(j)) for j in self.outputs]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def finished(self, run: int) -> None:
        """Run number ``run`` is done: drop the outputs no later run starts after."""
        for j in [j for j, last in self._last_use.items() if last == run]:
            self.outputs.pop(j, None)

    @contextlib.contextmanager
    def skipping(self, first: int, batch: int):
        """Blocks ``0 .. first - 1`` return the golden output of block ``first - 1`` on
        ``batch`` without computing (``first`` = 0: nothing is skipped)."""
        if first <= 0 or self.stack is None:
            yield
            return
        cached = self.outputs[first - 1][batch]
        skipped = list(self.stack)[:first]
        for blk in skipped:
            blk.forward = lambda *args, **kwargs: cached
        try:
            yield
        finally:
            for blk in skipped:
                del blk.forward


@dataclass
class CampaignResult:
    """``rows``: one summary per site (see :func:`summarize_campaign`), in site order;
    ``units``: every measured (site, seed, batch); ``golden_loss`` (nats per token) and
    ``tokens`` of the golden run; ``complete``: every site and seed measured (false when the
    time budget stopped it); ``seconds``: wall time of this call."""

    rows: list[dict]
    units: list[Unit]
    golden_loss: float
    tokens: int
    complete: bool
    seconds: float
    settings: dict = field(default_factory=dict)


@torch.no_grad()
def campaign(
    model: torch.nn.Module,
    blocks,
    sites: Sequence[Site],
    *,
    p: float,
    seeds: Sequence[int] = (0, 1, 2),
    zero_out: BitflipConfig | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    csv_path: str | None = None,
    settings: dict | None = None,
    max_minutes: float | None = None,
    count_flips: bool = True,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> CampaignResult:
    """Flip one site at a time and compare with the golden run; see the module doc.

    ``model``: a clean model (it is wrapped with bit-flip layers for the campaign and unwrapped
    at the end); ``blocks``: equal-length token blocks (as :func:`~peft_bitflip.evaluation.
    perplexity`), evaluated in batches of ``batch_size`` (the first ``max_batches``);
    ``zero_out``: the zero-out thresholds of the site's tensor (per module; ``None``: none).
    ``csv_path``: resumable unit CSV (settings in ``campaign_settings.json`` beside it;
    resuming under other settings raises ``ValueError`` naming them).  ``max_minutes``: stop
    before a (site, seed) that would end past the budget (from the mean time of those done
    so far); the result then has ``complete=False`` and summarises what was measured.
    ``reuse_prefix``: a site confined to blocks k.. starts from the golden run's output of
    block k - 1 instead of computing the clean blocks before it again; the results are the
    same bit for bit.  Kept: one hidden state per batch for each block some site still to run
    starts after, each dropped after its last use.
    """
    from .layers import bitflip_layers
    from .stats import FlipStatsRecorder
    from .transform import apply_bitflip, remove_bitflip

    start = time.monotonic()
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    seeds = [int(s) for s in dict.fromkeys(seeds)]
    if not seeds:
        raise ValueError("a campaign needs at least one flip seed")
    sites = list(sites)
    if not sites:
        raise ValueError("a campaign needs at least one site")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"sites repeat: {sorted({n for n in names if names.count(n) > 1})}")
    known = set(_flippable_modules(model))
    for s in sites:
        bad = [m for m in s.modules if m not in known]
        if bad:
            raise ValueError(f"site {s.name!r} names modules the model cannot flip: {bad[:3]}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
    ids = _block_tensor(blocks)
    batches = batches_of(ids, batch_size, max_batches)
    n_batches = len(batches)

    remove_bitflip(model)
    record = {
        **(settings or {}),
        "p": p,
        "model_fingerprint": model_fingerprint(model),
        "tokens_fingerprint": tokens_fingerprint(ids),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "batches": n_batches,
        "zero_out": None if zero_out is None else zero_out.to_dict(),
        "sites": {s.name: list(s.modules) for s in sites},  # a label's modules may change
        "count_flips": count_flips,
    }
    done: dict[tuple, Unit] = {}
    if csv_path:
        existing = read_csv_rows(csv_path, UNIT_COLUMNS, Unit.parse)
        check_settings(csv_path, record, bool(existing), SETTINGS_FILE)
        # a (site, seed) counts only when all its batches are there
        by_run: dict[tuple, list[Unit]] = {}
        for u in existing:
            by_run.setdefault((u.site, u.seed), []).append(u)
        for units in by_run.values():
            if {u.batch for u in units} == set(range(n_batches)):
                done.update((u.key, u) for u in units)
        write_csv_atomic(csv_path, UNIT_COLUMNS, (u.row() for u in done.values()))

    grid = [(s, seed) for s in sites for seed in seeds]
    todo = [(s, seed) for s, seed in grid if (s.name, seed, 0) not in done]
    prefix = _BlockPrefix(model, [s for s, _ in todo]) if reuse_prefix else None
    with prefix.recording() if prefix is not None else contextlib.nullcontext():
        golden = golden_run(model, batches)
    golden_sums = [float(loss.sum(dtype=torch.float64)) for loss, _ in golden]
    tokens = sum(loss.numel() for loss, _ in golden)
    golden_loss = sum(golden_sums) / tokens

    iterator = enumerate(todo)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            iterator, desc="campaign", unit="run", initial=len(grid) - len(todo), total=len(grid)
        )
    device = next(model.parameters()).device
    stopped = False
    durations: list[float] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="exponent flips without")
        apply_bitflip(model, BitflipConfig())  # every module wrapped, flipping nothing
    layers = dict(bitflip_layers(model))
    identity = (FlipSpec(), FlipSpec())
    recorder = FlipStatsRecorder(model) if count_flips else None
    try:
        if recorder is not None:
            recorder.start()
        for i, (site, seed) in iterator:
            if max_minutes is not None:
                elapsed = time.monotonic() - start
                expected = statistics.fmean(durations) if durations else 0.0
                if elapsed + expected > 60 * max_minutes:
                    stopped = True
                    break
            t0 = time.monotonic()
            members = set(site.modules)
            for name, layer in layers.items():
                specs = _specs_for(site, p, zero_out, name) if name in members else identity
                layer.set_bitflip(*specs)
                if layer.bitflip_seed != seed:
                    layer.bitflip_seed, layer._bitflip_keys = seed, None
            reset_streams(model)
            if recorder is not None:
                recorder.reset()
            first = prefix.first_block(site) if prefix is not None else 0
            for b, batch in enumerate(batches):
                with prefix.skipping(first, b) if first else contextlib.nullcontext():
                    loss, top1, finite = _token_results(model, batch.to(device))
                flips = trials = zeroed = 0
                if recorder is not None:
                    per_layer = recorder.read_per_layer(reset=True)
                    for m in site.modules:
                        st = per_layer[m][site.tensor]
                        site_flips, site_trials = _site_counts(site, st)
                        flips, trials = flips + site_flips, trials + site_trials
                        zeroed += st.zeroed
                unit = Unit(
                    site.name, seed, b, loss.numel(),
                    float(loss.sum(dtype=torch.float64)) if finite else math.nan,
                    golden_sums[b], int((top1 != golden[b][1]).sum()), finite,
                    flips, trials, zeroed,
                )  # fmt: skip
                done[unit.key] = unit
            if csv_path:
                write_csv_atomic(csv_path, UNIT_COLUMNS, (u.row() for u in done.values()))
            if prefix is not None:
                prefix.finished(i)
            durations.append(time.monotonic() - t0)
    finally:
        if recorder is not None:
            recorder.stop()
        remove_bitflip(model)
    units = [done[(s.name, seed, b)] for s, seed in grid for b in range(n_batches)
             if (s.name, seed, b) in done]  # fmt: skip
    rows = summarize_campaign(units, sites, p)
    complete = not stopped and all((s.name, seed, 0) in done for s, seed in grid)
    return CampaignResult(
        rows, units, golden_loss, tokens, complete, time.monotonic() - start, record
    )


# ---------------------------------------------------------------------- summaries


def summarize_campaign(units: Iterable[Unit], sites: Sequence[Site], p: float) -> list[dict]:
    """One row per site with units (in site order): ``group``, ``tensor``, ``bits``, ``p``,
    ``seeds``, ``units``; ``delta_loss`` with ``delta_loss_low`` / ``_high`` and
    ``interval`` (the method of :func:`stratified_t_interval`, strata = batches);
    ``ppl_ratio`` and its bounds (``exp`` of those); ``sdc_rate`` (mismatched top-1 per
    predicted token) with bounds; ``due_rate`` (non-finite units per unit); ``flips``,
    ``trials``, ``realised_rate`` (flips / trials), ``zeroed``.  Δ loss and SDC are over the
    finite units (``nan`` when none)."""
    by_site: dict[str, list[Unit]] = {}
    for u in units:
        by_site.setdefault(u.site, []).append(u)
    rows = []
    for site in sites:
        us = by_site.get(site.name)
        if not us:
            continue
        finite = [u for u in us if u.finite]
        strata_d: dict[int, list[float]] = {}
        strata_s: dict[int, list[float]] = {}
        weights: dict[int, int] = {}
        for u in finite:
            strata_d.setdefault(u.batch, []).append((u.loss_sum - u.golden_loss_sum) / u.tokens)
            strata_s.setdefault(u.batch, []).append(u.mismatches / u.tokens)
            weights[u.batch] = u.tokens
        order = sorted(strata_d)
        w = [weights[b] for b in order]
        d = stratified_t_interval([strata_d[b] for b in order], w) if order else None
        s = stratified_t_interval([strata_s[b] for b in order], w) if order else None
        tok = sum(u.tokens for u in finite)
        flips, trials = sum(u.flips for u in us), sum(u.trials for u in us)
        nan = math.nan
        delta = sum(u.loss_sum - u.golden_loss_sum for u in finite) / tok if tok else nan
        rows.append(
            {
                "site": site.name,
                "group": site.group,
                "tensor": site.tensor,
                "bits": site.bits,
                "p": p,
                "seeds": len({u.seed for u in us}),
                "units": len(us),
                "tokens": sum(u.tokens for u in us),
                "delta_loss": delta,
                "delta_loss_low": d["low"] if d else nan,
                "delta_loss_high": d["high"] if d else nan,
                "interval": d["method"] if d else "none",
                "ppl_ratio": _exp(delta),
                "ppl_ratio_low": _exp(d["low"]) if d else nan,
                "ppl_ratio_high": _exp(d["high"]) if d else nan,
                "sdc_rate": sum(u.mismatches for u in finite) / tok if tok else nan,
                "sdc_rate_low": max(0.0, s["low"]) if s and not math.isnan(s["low"]) else nan,
                "sdc_rate_high": s["high"] if s else nan,
                "due_rate": (len(us) - len(finite)) / len(us),
                "flips": flips,
                "trials": trials,
                "realised_rate": flips / trials if trials else math.nan,  # not counted
                "zeroed": sum(u.zeroed for u in us),
            }
        )
    return rows


def _exp(v: float) -> float:
    if math.isnan(v):
        return math.nan
    return math.exp(v) if v < 700 else math.inf


def ranked(rows: Sequence[dict]) -> list[dict]:
    """Rows most harmful first: by DUE rate, then Δ loss (``nan`` last)."""

    def key(r):
        d = r["delta_loss"]
        return (-r["due_rate"], math.isnan(d), -d if not math.isnan(d) else 0.0)

    return sorted(rows, key=key)


def _fmt(v: float, spec: str = ".4f") -> str:
    return "-" if v is None or math.isnan(v) else format(v, spec)


def campaign_markdown(result: CampaignResult, title: str = "") -> str:
    """The ranking table (most harmful site first) as markdown, with the golden run's loss and
    what the interval is."""
    rows = ranked(result.rows)
    lines = [f"## {title}", ""] if title else []
    methods = sorted({r["interval"] for r in rows} - {"none"})
    lines += [
        f"Golden run: loss {result.golden_loss:.4f} nats/token (perplexity "
        f"{_exp(result.golden_loss):.2f}) on {result.tokens:,} predicted tokens. Intervals: "
        f"95 %, {', '.join(methods) or 'none'} over (seed, batch) units."
        + ("" if result.complete else " INCOMPLETE: stopped by the time budget."),
        "",
        "| rank | site | tensor | bits | Δ loss [95 % CI] | ppl ratio [95 % CI] | SDC rate "
        "[95 % CI] | DUE rate | flips / eligible bits | units |",
        "|---:|---|---|---|---|---|---|---:|---|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['group']} | {r['tensor']} | {r['bits']} | "
            f"{_fmt(r['delta_loss'])} [{_fmt(r['delta_loss_low'])}, "
            f"{_fmt(r['delta_loss_high'])}] | {_fmt(r['ppl_ratio'])} "
            f"[{_fmt(r['ppl_ratio_low'])}, {_fmt(r['ppl_ratio_high'])}] | "
            f"{_fmt(r['sdc_rate'], '.2e')} [{_fmt(r['sdc_rate_low'], '.2e')}, "
            f"{_fmt(r['sdc_rate_high'], '.2e')}] | {r['due_rate']:.2f} | "
            f"{r['flips']:,} / {r['trials']:.3g} ({_fmt(r['realised_rate'], '.3g')}) | "
            f"{r['units']} |"
        )
    return "\n".join(lines)


SUMMARY_COLUMNS = [
    "site", "group", "tensor", "bits", "p", "seeds", "units", "tokens", "delta_loss",
    "delta_loss_low", "delta_loss_high", "interval", "ppl_ratio", "ppl_ratio_low",
    "ppl_ratio_high", "sdc_rate", "sdc_rate_low", "sdc_rate_high", "due_rate", "flips",
    "trials", "realised_rate", "zeroed",
]  # fmt: skip


def write_campaign_outputs(
    result: CampaignResult, out_dir: str, title: str = "", run: dict | None = None
) -> list[str]:
    """``campaign.md`` (ranking), ``campaign_summary.csv`` and ``campaign.json`` (ranked rows,
    golden run, settings, and ``run``: the run record, see :mod:`peft_bitflip.run_record`) and
    ``campaign_heatmap.png`` in ``out_dir``; returns the paths."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    rows = ranked(result.rows)
    names = ("campaign.md", "campaign_summary.csv", "campaign.json", "campaign_heatmap.png")
    paths = [os.path.join(out_dir, f) for f in names]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(campaign_markdown(result, title) + "\n")
    write_csv_atomic(paths[1], SUMMARY_COLUMNS, ([r[c] for c in SUMMARY_COLUMNS] for r in rows))
    with open(paths[2], "w", encoding="utf-8") as f:
        json.dump(
            {
                "golden_loss": result.golden_loss,
                "tokens": result.tokens,
                "complete": result.complete,
                "seconds": result.seconds,
                "settings": result.settings,
                "rows": rows,
                "run": run,
            },
            f,
            indent=2,
            default=str,
        )
        f.write("\n")
    plot_campaign_heatmap(result.rows, paths[3], title=title)
    return paths


def plot_campaign_heatmap(rows: Sequence[dict], path: str, title: str = "") -> None:
    """A PNG: one row per site group (in order), one column per tensor and bit group, colour
    = Δ loss (symmetric log scale), cells with a non-finite unit marked ``x`` with their DUE
    rate, cells not measured left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import SymLogNorm

    groups = list(dict.fromkeys(r["group"] for r in rows))
    present = list(dict.fromkeys(f"{r['tensor']} {r['bits']}" for r in rows))
    columns = [f"{t} {b}" for t in TENSORS for b in BITS]
    columns = [c for c in columns if c in present] + [c for c in present if c not in columns]
    grid = np.full((len(groups), len(columns)), np.nan)
    due = np.zeros_like(grid)
    for r in rows:
        i, j = groups.index(r["group"]), columns.index(f"{r['tensor']} {r['bits']}")
        grid[i, j] = r["delta_loss"]
        due[i, j] = r["due_rate"]
    finite = grid[np.isfinite(grid)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    linthresh = max(vmax * 1e-3, 1e-6)
    height = max(2.5, 0.28 * len(groups) + 1.5)
    cmap = matplotlib.colormaps["RdBu_r"].copy()
    cmap.set_bad("lightgrey")  # no finite unit (every unit diverged) or not measured
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.8, height))
    im = ax.imshow(
        np.ma.masked_invalid(grid), aspect="auto", cmap=cmap,
        norm=SymLogNorm(linthresh=linthresh, vmin=-vmax, vmax=vmax), interpolation="nearest",
    )  # fmt: skip
    for i in range(len(groups)):
        for j in range(len(columns)):
            if due[i, j] > 0:
                ax.text(j, i, f"x {due[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="black", fontweight="bold",
                        bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})  # fmt: skip
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(groups)), groups, fontsize=7 if len(groups) > 12 else None)
    ax.set_xlabel("tensor and bit group")
    ax.set_ylabel("site")
    fig.colorbar(im, ax=ax, label="Δ loss vs golden (nats/token)")
    note = "x k%: share of units with non-finite logits or loss (DUE); grey: no finite unit"
    ax.set_title((title + "\n" if title else "") + note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
