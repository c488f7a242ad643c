"""Burst faults: a fault event inverts ``k`` adjacent bits of one element.

Per tensor (a layer's input ``x`` and weight ``w``) each element holds an event with
probability ``rate`` (the event rate per element, at most one event per element and call),
independently of the other elements.  An event's length ``k`` (2 <= k <= 32) is fixed or drawn
from a distribution ``{k: probability}``; its lowest bit is uniform over the positions where
``k`` adjacent bits fit inside the element's *field*: ``"any"`` (all bits), ``"exp"`` (the
sign and exponent bits) or ``"frac"`` (the mantissa bits).  A burst never crosses an element
boundary: the element is the memory word the fault strikes, and keeping it inside makes every
event change exactly one value.  Restricting it to a field models faults that hit one part of
the format (e.g. mantissa-only storage faults), as the flip settings' exp/frac split does.

Bursts are transient, like the flips: drawn afresh at every call as a pure function of (values,
settings, seed, stream, call) on streams of their own, ``stream_key(seed, layer, "x_burst" |
"w_burst", rank)`` (independent of the flip streams ``"x"`` / ``"w"``).  In a layer they act
after the stuck bits and before the transient flips and the zero-out, whose threshold and
straight-through gradient they share (the zero-out sees the burst values).  The sampling scheme,
exact to 2^-63 for the event rate and 2^-32 for the length and start probabilities, is in
:mod:`peft_bitflip.kernels.burst_sampling`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import _call_tensor, _checked_call, stream_key
from .kernels.burst_op import burst as burst_dispatch
from .kernels.burst_sampling import BURST_FIELDS, burst_shape, burst_table
from .spec import check_dtype, validate_probability

__all__ = [
    "BURST_FIELDS",
    "BURST_RATE_KEYS",
    "BurstSpec",
    "Bursts",
    "apply_burst_spec",
    "burst",
    "bursts_for",
    "validate_burst_field",
    "validate_burst_length",
]

BURST_RATE_KEYS = ("x_burst_rate", "w_burst_rate")
"""The burst settings a per-module rule may set (``BitflipConfig`` fields too)."""
MIN_LENGTH, MAX_LENGTH = 2, 32
_SUM_TOLERANCE = 1e-6


def _length(where: str, k) -> int:
    if isinstance(k, str) and k.strip().isdigit():  # JSON object keys are strings
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{where} must be an int in [{MIN_LENGTH}, {MAX_LENGTH}], got {k!r}")
    if not MIN_LENGTH <= int(k) <= MAX_LENGTH:
        raise ValueError(f"{where} must be an int in [{MIN_LENGTH}, {MAX_LENGTH}], got {k!r}")
    return int(k)


def validate_burst_length(name: str, value) -> int | dict[int, float]:
    """``value`` as a burst length: an int k in [2, 32], or a dict ``{k: probability}``
    (probabilities in [0, 1] summing to 1 within 1e-6; string keys from JSON are read as
    ints), returned with int keys in increasing order.  Errors name ``name`` and the value."""
    if not isinstance(value, Mapping):
        return _length(name, value)
    if not value:
        raise ValueError(f"{name} must name at least one length, got {value!r}")
    out = {}
    for k, p in value.items():
        k = _length(f"{name} key {k!r}", k)
        if k in out:
            raise ValueError(f"{name} names length {k} twice")
        out[k] = validate_probability(f"{name}[{k}]", p)
    total = math.fsum(out.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{name} probabilities must sum to 1, got {total!r} for {value!r}")
    return dict(sorted(out.items()))


def validate_burst_field(name: str, value) -> str:
    """``value`` if it is one of :data:`BURST_FIELDS`, else ``ValueError`` naming it."""
    if value not in BURST_FIELDS:
        raise ValueError(f"{name} must be one of {list(BURST_FIELDS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class BurstSpec:
    """Burst settings of one tensor: ``rate`` (events per element, a probability),
    ``length`` (int k, or ``{k: probability}``) and ``field`` (``"any"``, ``"exp"``,
    ``"frac"``).  Derived: ``lengths`` (``(k, probability)`` pairs with probability > 0,
    normalised), ``mean_length`` (bits per event) and ``is_identity`` (rate 0)."""

    rate: float = 0.0
    length: int | dict = 2
    field: str = "any"

    def __post_init__(self):
        object.__setattr__(self, "rate", validate_probability("burst rate", self.rate))
        length = validate_burst_length("burst_length", self.length)
        object.__setattr__(self, "field", validate_burst_field("burst_field", self.field))
        pairs = {length: 1.0} if isinstance(length, int) else length
        total = math.fsum(pairs.values())
        lengths = tuple((k, p / total) for k, p in pairs.items() if p > 0)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "mean_length", math.fsum(k * p for k, p in lengths))
        object.__setattr__(self, "is_identity", self.rate == 0.0)

    def __hash__(self):
        return hash((self.rate, self.lengths, self.field))

    def __eq__(self, other):
        if not isinstance(other, BurstSpec):
            return NotImplemented
        return (self.rate, self.lengths, self.field) == (other.rate, other.lengths, other.field)


def apply_burst_spec(
    x: Tensor,
    spec: BurstSpec,
    key: tuple[int, int],
    call: int | Tensor = 0,
    zero_out_threshold: float | None = None,
) -> Tensor:
    """Apply the burst events of ``spec`` to ``x`` with the stream ``key`` at ``call``, then
    zero-out (``|y| >= t``, NaN, Inf -> 0; None: none).  Differentiable (straight-through,
    zero where zeroed).  Returns ``x`` itself when nothing can change."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dtype(x.dtype)
    call = _call_tensor(call, x.device)
    if spec.is_identity and zero_out_threshold is None:
        return x
    shape = burst_shape(spec.lengths, spec.field, x.dtype)
    table = burst_table(spec.rate, spec.lengths, x.dtype, x.device)
    return burst_dispatch(x, table, call, key[0], key[1], zero_out_threshold, shape)


def burst(
    x: Tensor,
    rate: float,
    length: int | dict = 2,
    field: str = "any",
    zero_out_threshold: float | None = None,
    *,
    seed: int = 0,
    stream: int | str = 0,
    call: int | Tensor = 0,
) -> Tensor:
    """Burst faults on a float tensor: each element holds, with probability ``rate``, an
    event inverting ``k`` adjacent bits (``length``: k, or ``{k: probability}``) inside
    ``field``; then zero-out.  A pure function of (x's values, settings, ``seed``, ``stream``,
    ``call``); see the module doc."""
    spec = BurstSpec(rate, length, field)
    key = stream_key(seed, stream)
    return apply_burst_spec(x, spec, key, _checked_call(call), zero_out_threshold)


class Bursts:
    """The burst faults of one layer: settings, stream keys and their application."""

    def __init__(self, name: str, seed: int, x: BurstSpec, w: BurstSpec):
        self.name, self.seed, self.x, self.w = name, seed, x, w
        self._keys: dict = {}
        self._matmuls: dict = {}

    def __repr__(self) -> str:
        return f"Bursts({self.name!r}, seed={self.seed}, x={self.x}, w={self.w})"

    def scaled(self, f: float) -> Bursts:
        """These bursts with both event rates multiplied by ``f`` in [0, 1] (a probability
        schedule); ``self`` when ``f`` is 1."""
        if f == 1.0:
            return self
        x, w = (dataclasses.replace(s, rate=s.rate * f) for s in (self.x, self.w))
        return Bursts(self.name, self.seed, x, w)

    def matmul(self, proj: str, expert: int) -> Bursts:
        """These settings for expert ``expert``'s matmul with parameter ``proj`` of a fused MoE
        experts module named ``name``: streams of its own, named ``f"{name}.{proj}.{expert}"``
        (kept)."""
        found = self._matmuls.get((proj, expert))
        if found is None:
            found = Bursts(f"{self.name}.{proj}.{expert}", self.seed, self.x, self.w)
            if not torch.compiler.is_compiling():
                self._matmuls[(proj, expert)] = found
        return found

    def key(self, tensor: str) -> tuple[int, int]:
        """The stream of ``tensor``'s bursts ("x" / "w") on this data-parallel rank (the rank
        read at the first call and kept, as the layers keep their flip streams' keys)."""
        found = self._keys.get(tensor)
        if found is None:
            from .layers import data_parallel_rank

            found = stream_key(self.seed, self.name, f"{tensor}_burst", data_parallel_rank())
            if not torch.compiler.is_compiling():
                self._keys[tensor] = found
        return found

    def burst(
        self, tensor: str, t: Tensor, call: Tensor, stats=None, zero_out_threshold=None
    ) -> Tensor:
        """``t`` with ``tensor``'s burst events at ``call`` (``t`` itself at rate 0), then
        the zero-out at ``zero_out_threshold`` (None: none) in the same pass; ``stats``: a
        FlipStatsAccumulator that counts the events (only without a zero-out here: it counts
        the bits that changed)."""
        spec = self.x if tensor == "x" else self.w
        if spec.is_identity:
            return t
        if stats is not None and zero_out_threshold is not None:
            raise ValueError("bursts counted by stats take no zero-out of their own")
        out = apply_burst_spec(t, spec, self.key(tensor), call, zero_out_threshold)
        if stats is not None:
            stats.record_bursts(tensor, t, out)
        return out

    def apply(
        self, x: Tensor, weight, weight_params, compute, call: Tensor, stats=None,
        x_zero_out=None, w_zero_out=None,
    ):  # fmt: skip
        """(x, weight, weight_params) of a layer forward with the bursts of ``call`` applied,
        as :meth:`peft_bitflip.stuck_at.StuckAt.apply` does for stuck bits: x at once, the
        weight as a function that builds it (backward builds it again: the same bursts).
        ``x_zero_out`` / ``w_zero_out``: a zero-out threshold run in the burst pass (the
        layer passes its own when that tensor has no transient flips: one pass, not two)."""
        if not self.x.is_identity:
            x = self.burst("x", x if compute is None else x.to(compute), call, stats, x_zero_out)
        if self.w.is_identity:
            return x, weight, weight_params
        build = weight if callable(weight) else None
        params = tuple(weight_params) if build is not None else (weight,)
        counted = [stats]

        def burst_weight():
            w = build() if build is not None else weight
            w = w if compute is None else w.to(compute)
            out = self.burst("w", w, call, counted[0], w_zero_out)
            counted[0] = None  # a rebuild in backward is not counted again
            return out

        return x, burst_weight, params


def bursts_for(config, name: str) -> Bursts | None:
    """The :class:`Bursts` of module ``name`` under ``config`` (a ``BitflipConfig``), or None
    when it has no burst events."""
    values = config.burst_values_for(name)
    if values is None:
        return None
    specs = {
        t: BurstSpec(values[f"{t}_burst_rate"], config.burst_length, config.burst_field)
        for t in ("x", "w")
    }
    if all(s.is_identity for s in specs.values()):
        return None
    return Bursts(name, config.seed, specs["x"], specs["w"])


def burst_settings(bursts: Bursts | None) -> tuple | None:
    """What decides the bursts of a :class:`Bursts` (for comparing two), or None."""
    return None if bursts is None else (bursts.name, bursts.seed, bursts.x, bursts.w)
