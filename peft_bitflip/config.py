"""The fault model of a whole model: which linear layers get bit flips, and with which settings.

``BitflipConfig`` holds six values for the layer input ``x`` and the weight ``w`` of every
wrapped linear layer:

* ``{x,w}_p_exp``: probability that each sign/exponent bit flips (the sign bit belongs to
  the "exp" group, as in the original kernel);
* ``{x,w}_p_frac``: probability that each mantissa bit flips;
* ``{x,w}_zero_out_t``: after flipping, every element with ``|y| >= t`` (inclusive), NaN or
  +-Inf becomes 0; ``None`` disables zero-out.

and, optionally, ``{x,w}_p_bits``: per-bit-position rates ``{position: p}`` that override the
group rates at the listed positions (see :class:`~peft_bitflip.spec.FlipSpec`).

Per-module rules (``layer_name_to_config``) override these values for some modules, as in
the original system: keys are regular expressions matched with ``re.fullmatch`` against the
module's qualified name and tried in dict order (the first match wins); the key
``"default"`` is the fallback; a value ``None`` leaves the matched modules unwrapped.

``from_original_yaml`` / ``from_original_toml`` / ``read_original_toml`` load the original
system's pretraining meta YAML and LoRA ``transform_cfg.toml`` files.

The config is stored by transformers as ``config.json["quantization_config"]``
(``quant_method == "bitflip"``, see ``hf_quantizer.py``), which transformers writes with
``sort_keys=True``; ``to_dict`` therefore stores the rules as an ordered list of
``[pattern, rule]`` pairs so that their order survives the round trip.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from transformers.utils.quantization_config import QuantizationConfigMixin

from .bursts import BURST_RATE_KEYS, validate_burst_field, validate_burst_length
from .spec import (
    FlipSpec,
    p_bits_dict,
    validate_p_bits,
    validate_probability,
    validate_seed,
    validate_threshold,
)
from .stuck_at import STUCK_RATE_KEYS, validate_stuck_positions

__all__ = [
    "DEFAULT_RULE_KEY",
    "ORIGINAL_SEED_KEYS",
    "RULE_KEYS",
    "P_BITS_KEYS",
    "STUCK_KEYS",
    "BitflipConfig",
    "read_original_toml",
]

X_KEYS = ("x_p_exp", "x_p_frac", "x_zero_out_t")
W_KEYS = ("w_p_exp", "w_p_frac", "w_zero_out_t")
RULE_KEYS = X_KEYS + W_KEYS
"""The transient-flip keys a per-module rule may set."""
P_BITS_KEYS = ("x_p_bits", "w_p_bits")
"""The per-bit-position rate keys (``{position: p}`` or None) a per-module rule may set."""
STUCK_KEYS = STUCK_RATE_KEYS
"""The stuck-at keys a per-module rule may set (x_/w_stuck_p_exp/frac, stuck_one_share)."""
BURST_KEYS = BURST_RATE_KEYS
"""The burst keys a per-module rule may set (x_/w_burst_rate)."""
ALL_RULE_KEYS = RULE_KEYS + P_BITS_KEYS + STUCK_KEYS + BURST_KEYS
BURST_DEFAULTS = {**dict.fromkeys(BURST_KEYS, 0.0), "burst_length": 2, "burst_field": "any"}
STUCK_DEFAULTS = {
    **dict.fromkeys(STUCK_KEYS, 0.0),
    "stuck_one_share": 0.5,
    "stuck_at_positions": None,
}
ORIGINAL_SEED_KEYS = ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac")
"""Per-layer seed keys of the original system; accepted by the loaders and ignored."""
DEFAULT_RULE_KEY = "default"
"""The special ``layer_name_to_config`` key used for modules that match no other rule."""

QUANT_METHOD = "bitflip"
ORIGINAL_P = 2.0**-16  # the original's released probability, 1.52587890625e-05
ORIGINAL_LORA_DEFAULTS = {"r": 32, "lora_alpha": 32}
_SEED_WARNING = (
    "ignoring the original's per-layer seeds ({keys}): peft_bitflip derives an independent "
    "random stream per module and per tensor (x / w) from BitflipConfig.seed (the original "
    "reused seed 0 everywhere, so all layers flipped identical positions)"
)


def _is_threshold_key(key: str) -> bool:
    return key.endswith("_zero_out_t")


def _validate_value(name: str, key: str, value):
    if key in P_BITS_KEYS:  # kept as config.json stores it: {"15": p, "sign": p}
        return p_bits_dict(validate_p_bits(name, value))
    if _is_threshold_key(key):
        return validate_threshold(name, value)
    return validate_probability(name, value)


def _check_regex(what: str, pattern) -> str:
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a str regular expression, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


def _rule_items(rules) -> list[tuple]:
    """``layer_name_to_config`` as (key, value) pairs: a mapping or a list of pairs."""
    if isinstance(rules, Mapping):
        return list(rules.items())
    if isinstance(rules, (list, tuple)):
        items = []
        for i, item in enumerate(rules):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TypeError(
                    f"layer_name_to_config[{i}] must be a [pattern, rule] pair, got {item!r}"
                )
            items.append(tuple(item))
        return items
    raise TypeError(
        "layer_name_to_config must be None, a dict {pattern: rule} or a list of "
        f"[pattern, rule] pairs, got {rules!r} ({type(rules).__name__})"
    )


@dataclass(eq=False)
class BitflipConfig(QuantizationConfigMixin):
    """Random bit-flip fault model for the linear layers of a model.

    Args:
        x_p_exp, x_p_frac, x_zero_out_t: settings for the layer input (see the module doc):
            probabilities in [0, 1]; threshold ``None`` (no zero-out) or ``>= 0``, inclusive
            (``|y| >= t`` is zeroed, as are NaN and +-Inf).
        w_p_exp, w_p_frac, w_zero_out_t: the same for the weight.
        x_p_bits, w_p_bits: per-bit-position rates ``{position: p}`` (0 = least significant
            bit of the tensor's dtype, ``"sign"`` = the top bit) that replace the group rate
            at the listed positions; ``None`` (default): the groups alone.  Rules may set them
            per module.  Saved in config.json only when set.
        seed: base seed in [0, 2**63); every module, tensor (x / w), rank and forward call
            derives its own independent stream from it.
        compat_snap: flip with the original's snapped probabilities (p rounded down to a
            power of two in [2**-24, 0.5], see ``spec.snap_probability``) to reproduce its
            numbers.
        layer_name_to_config: per-module rules, or ``None`` to give every non-skipped module
            the top-level values.  Keys are regexes matched with ``re.fullmatch`` against the
            module's qualified name and tried in dict order, the first match wins; the key
            ``"default"`` is the fallback for modules that match no other key.  A value
            ``None`` leaves the matched modules unwrapped; a dict holds any subset of the six
            x_/w_ keys and overrides the top-level values for those modules (keys it omits
            keep the top-level values).  With rules and no ``"default"``, modules that match
            no rule are not wrapped (the original raised an error instead); use
            ``check_rules_match`` to catch rules that match nothing.  A list of
            ``[pattern, rule]`` pairs (the ``to_dict`` form) is accepted too.
        x_stuck_p_exp, x_stuck_p_frac, w_stuck_p_exp, w_stuck_p_frac: stuck-at faults
            (``peft_bitflip.stuck_at``): probability in [0, 1] that each sign/exponent /
            mantissa bit of the weight, or of an input feature lane, is stuck, drawn once from
            (seed, module name, tensor); rules may set them per module.
        stuck_one_share: probability in [0, 1] that a drawn stuck bit is stuck at 1 (default
            0.5); rules may set it per module.
        stuck_at_positions: explicit stuck bits, ``{module name: {"x" | "w": [[element
            index, bit, value], ...]}}`` (a replayable fault list; see
            ``stuck_at.export_stuck_positions``), added to the drawn ones; ``None``: none.
            The matmuls of an MoE experts module are named ``<module>.<parameter>.<expert>``.
        x_burst_rate, w_burst_rate: burst faults (``peft_bitflip.bursts``): probability in
            [0, 1] that an element of the layer input / weight holds a fault event that
            inverts ``burst_length`` adjacent bits, drawn afresh at every call; rules may set
            them per module.
        burst_length: the bits per event: an int k in [2, 32] or ``{k: probability}``.
        burst_field: where a burst may lie in an element: ``"any"`` (default), ``"exp"``
            (sign and exponent bits) or ``"frac"`` (mantissa bits).
        skip_modules: regexes of modules that are never wrapped, checked before the rules.
            A module is skipped when a pattern full-matches its qualified name or its last
            name component, so ``"lm_head"`` skips ``lm_head`` and ``model.lm_head``.  The
            original pretraining transform flipped every Linear, the output head included;
            pass ``skip_modules=[]`` to reproduce that.

    ``quant_method`` is always ``"bitflip"``: transformers stores the config as
    ``config.json["quantization_config"]``.
    """

    x_p_exp: float = 0.0
    x_p_frac: float = 0.0
    x_zero_out_t: float | None = None
    w_p_exp: float = 0.0
    w_p_frac: float = 0.0
    w_zero_out_t: float | None = None
    seed: int = 0
    compat_snap: bool = False
    layer_name_to_config: dict[str, dict | None] | None = None
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    x_stuck_p_exp: float = 0.0
    x_stuck_p_frac: float = 0.0
    w_stuck_p_exp: float = 0.0
    w_stuck_p_frac: float = 0.0
    stuck_one_share: float = 0.5
    stuck_at_positions: dict | None = None
    x_p_bits: dict | None = None
    w_p_bits: dict | None = None
    x_burst_rate: float = 0.0
    w_burst_rate: float = 0.0
    burst_length: int | dict = 2
    burst_field: str = "any"
    quant_method: str = field(default=QUANT_METHOD, init=False, repr=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every field (and normalise it: floats, a plain dict of rules, a list).

        Raises ``TypeError`` for values of the wrong type and ``ValueError`` for values out
        of range, unknown rule keys and invalid regexes; messages name the field and value.
        """
        for key in ALL_RULE_KEYS:
            setattr(self, key, _validate_value(key, key, getattr(self, key)))
        self.stuck_at_positions = validate_stuck_positions(
            "stuck_at_positions", self.stuck_at_positions
        )
        self.burst_length = validate_burst_length("burst_length", self.burst_length)
        self.burst_field = validate_burst_field("burst_field", self.burst_field)
        self.seed = validate_seed("seed", self.seed)
        if not isinstance(self.compat_snap, bool):
            raise TypeError(f"compat_snap must be a bool, got {self.compat_snap!r}")
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        self.skip_modules = self._validated_skip_modules(self.skip_modules)
        if self.layer_name_to_config is not None:
            self.layer_name_to_config = self._validated_rules(self.layer_name_to_config)

    @staticmethod
    def _validated_skip_modules(skip) -> list[str]:
        if skip is None:
            return []
        if isinstance(skip, str) or not isinstance(skip, Iterable):
            raise TypeError(f"skip_modules must be a list of regex strings, got {skip!r}")
        return [_check_regex("skip_modules entry", p) for p in skip]

    @staticmethod
    def _validated_rules(rules) -> dict[str, dict | None]:
        out: dict[str, dict | None] = {}
        for pattern, rule in _rule_items(rules):
            if not isinstance(pattern, str):
                raise TypeError(f"layer_name_to_config key must be a str, got {pattern!r}")
            if pattern in out:
                raise ValueError(f"layer_name_to_config has the pattern {pattern!r} twice")
            if pattern != DEFAULT_RULE_KEY:
                _check_regex("layer_name_to_config key", pattern)
            if rule is None:
                out[pattern] = None
                continue
            if not isinstance(rule, Mapping):
                raise TypeError(
                    f"layer_name_to_config[{pattern!r}] must be None or a dict with keys from "
                    f"{list(ALL_RULE_KEYS)}, got {rule!r}"
                )
            unknown = [k for k in rule if k not in ALL_RULE_KEYS]
            if unknown:
                raise ValueError(
                    f"layer_name_to_config[{pattern!r}] has unknown key(s) {unknown}; "
                    f"allowed keys: {list(ALL_RULE_KEYS)}"
                )
            out[pattern] = {
                k: _validate_value(f"layer_name_to_config[{pattern!r}].{k}", k, rule[k])
                for k in ALL_RULE_KEYS
                if k in rule
            }
        if not out:
            raise ValueError(
                "layer_name_to_config is empty; use None to give every module the top-level values"
            )
        return out

    # ------------------------------------------------------------------ lookup

    def is_skipped(self, module_name: str) -> bool:
        """True if a ``skip_modules`` pattern full-matches the name or its last component."""
        last = module_name.rsplit(".", 1)[-1]
        return any(re.fullmatch(p, module_name) or re.fullmatch(p, last) for p in self.skip_modules)

    def match_rule(self, module_name: str) -> str | None:
        """The ``layer_name_to_config`` key that governs ``module_name``.

        The first key (dict order, ``"default"`` excluded) that full-matches the name, else
        ``"default"`` if present, else ``None`` (also when there are no rules).
        ``skip_modules`` is not consulted.
        """
        rules = self.layer_name_to_config
        if rules is None:
            return None
        for pattern in rules:
            if pattern != DEFAULT_RULE_KEY and re.fullmatch(pattern, module_name):
                return pattern
        return DEFAULT_RULE_KEY if DEFAULT_RULE_KEY in rules else None

    def values_for(self, module_name: str) -> dict | None:
        """The six x_/w_ values for a module, or ``None`` if it is not wrapped."""
        values = self._all_values_for(module_name)
        return None if values is None else {k: values[k] for k in RULE_KEYS}

    def stuck_values_for(self, module_name: str) -> dict | None:
        """The stuck-at values (``STUCK_KEYS``) for a module, or ``None`` if it is not wrapped."""
        values = self._all_values_for(module_name)
        return None if values is None else {k: values[k] for k in STUCK_KEYS}

    def burst_values_for(self, module_name: str) -> dict | None:
        """The burst rates (``BURST_KEYS``) for a module, or ``None`` if it is not wrapped."""
        values = self._all_values_for(module_name)
        return None if values is None else {k: values[k] for k in BURST_KEYS}

    def _all_values_for(self, module_name: str) -> dict | None:
        if self.is_skipped(module_name):
            return None
        values = {k: getattr(self, k) for k in ALL_RULE_KEYS}
        if self.layer_name_to_config is not None:
            pattern = self.match_rule(module_name)
            if pattern is None:
                return None
            rule = self.layer_name_to_config[pattern]
            if rule is None:
                return None
            values.update(rule)
        return values

    def resolve(self, module_name: str) -> tuple[FlipSpec, FlipSpec] | None:
        """The ``(x_spec, w_spec)`` for a module, or ``None`` if it must not be wrapped.

        ``None`` when the module is in ``skip_modules``, when its rule is ``None``, or when
        rules are given and it matches none of them and there is no ``"default"``.  The
        specs are returned even when they flip nothing (the caller decides whether to wrap).
        """
        v = self._all_values_for(module_name)
        if v is None:
            return None
        x = FlipSpec(
            v["x_p_exp"], v["x_p_frac"], v["x_zero_out_t"], self.compat_snap, v["x_p_bits"]
        )
        w = FlipSpec(
            v["w_p_exp"], v["w_p_frac"], v["w_zero_out_t"], self.compat_snap, v["w_p_bits"]
        )
        return x, w

    def check_rules_match(self, module_names: Iterable[str]) -> None:
        """Raise ``ValueError`` naming every rule pattern that is of no use for these modules.

        A pattern (``"default"`` excepted) is reported when it full-matches none of
        ``module_names``, or when its value is a dict and every module it matches is
        excluded by ``skip_modules`` (the rule would silently do nothing).  A ``None`` rule
        that matches only skipped modules is fine (e.g. the original's ``lm_head: None``).
        Does nothing when ``layer_name_to_config`` is None.
        """
        if self.layer_name_to_config is None:
            return
        names = list(module_names)
        problems = []
        for pattern, rule in self.layer_name_to_config.items():
            if pattern == DEFAULT_RULE_KEY:
                continue
            matched = [n for n in names if re.fullmatch(pattern, n)]
            if not matched:
                problems.append(f"pattern {pattern!r} matched no module")
            elif rule is not None and all(self.is_skipped(n) for n in matched):
                problems.append(
                    f"pattern {pattern!r} matches only modules excluded by skip_modules="
                    f"{self.skip_modules} ({', '.join(matched[:3])}); remove them from "
                    "skip_modules to flip them"
                )
        if problems:
            examples = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                "layer_name_to_config: "
                + "; ".join(problems)
                + f". Patterns must full-match qualified module names such as: {examples}"
            )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        """A JSON-safe dict of every field, ``quant_method`` included.

        The stuck-at and burst fields are included only when one is set (not at its default).
        ``layer_name_to_config`` becomes an ordered list of ``[pattern, rule]`` pairs (or
        ``None``) so that rule order survives ``json.dumps(..., sort_keys=True)``.
        An infinite threshold is kept as ``float("inf")`` (JSON ``Infinity``).
        """
        rules = self.layer_name_to_config
        return {
            "quant_method": self.quant_method,
            **{k: getattr(self, k) for k in RULE_KEYS},
            "seed": self.seed,
            "compat_snap": self.compat_snap,
            "layer_name_to_config": (
                None if rules is None else [[k, copy.deepcopy(v)] for k, v in rules.items()]
            ),
            "skip_modules": list(self.skip_modules),
            **{k: copy.deepcopy(getattr(self, k)) for k in P_BITS_KEYS if getattr(self, k)},
            **self._stuck_dict(),
            **self._burst_dict(),
        }

    def _stuck_dict(self) -> dict:
        """The stuck-at fields where one differs from its default, else nothing (a config
        without stuck-at faults reads as before, also by earlier versions)."""
        values = {k: getattr(self, k) for k in STUCK_KEYS}
        values["stuck_at_positions"] = copy.deepcopy(self.stuck_at_positions)
        return values if values != STUCK_DEFAULTS else {}

    def _burst_dict(self) -> dict:
        """The burst fields where one differs from its default, else nothing (JSON-safe: a
        length distribution's keys as strings)."""
        values = {k: getattr(self, k) for k in BURST_DEFAULTS}
        if values == BURST_DEFAULTS:
            return {}
        length = values["burst_length"]
        if isinstance(length, dict):
            values["burst_length"] = {str(k): p for k, p in length.items()}
        return values

    def get(self, key: str, default=None):
        """``to_dict().get(key, default)``: transformers reads model configs' quantization
        configs as dicts."""
        return self.to_dict().get(key, default)

    def to_diff_dict(self) -> dict:
        """Same as ``to_dict`` (for transformers' ``QuantizationConfigMixin`` interface)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: Mapping, return_unused_kwargs: bool = False, **kwargs):
        """Build a config from a ``to_dict``-style dict; ``kwargs`` override its entries.

        ``quant_method`` may be present and must be ``"bitflip"``.  Unknown keys raise
        ``ValueError`` naming them, unless ``return_unused_kwargs`` is true: then they are
        returned as ``(config, unused: dict)``.  Mirrors transformers'
        ``QuantizationConfigMixin.from_dict``.
        """
        if not isinstance(config_dict, Mapping):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        merged = {**config_dict, **kwargs}
        quant_method = merged.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        names = [f.name for f in fields(cls) if f.init]
        unused = {k: v for k, v in merged.items() if k not in names}
        if unused and not return_unused_kwargs:
            raise ValueError(
                f"unknown BitflipConfig key(s) {sorted(unused)}; known keys: "
                f"{['quant_method', *names]}"
            )
        config = cls(**{k: v for k, v in merged.items() if k in names})
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs) -> dict:
        """Set the given fields, re-validate, and return the kwargs that are not fields."""
        names = {f.name for f in fields(self) if f.init}
        for key, value in kwargs.items():
            if key in names:
                setattr(self, key, value)
        self.validate()
        return {k: v for k, v in kwargs.items() if k not in names}

    def to_json_string(self, use_diff: bool = False) -> str:
        """``to_dict`` as indented JSON (``use_diff`` is accepted for transformers)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> BitflipConfig:
        """Load a file written by ``to_json_file``, or a model's ``config.json`` (its
        ``quantization_config`` entry)."""
        with open(json_file_path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, Mapping) and "quantization_config" in data:
            data = data["quantization_config"]
        return cls.from_dict(data)

    def __eq__(self, other):
        # rule order matters (first match wins), so compare the ordered to_dict form
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    # ------------------------------------------------------------------ presets and loaders

    @classmethod
    def original_default(cls, **overrides) -> BitflipConfig:
        """The original's released setting: every p = 2**-16, ``w_zero_out_t=1.25``,
        ``x_zero_out_t=30.0`` (``configs/meta/fc-only-w-a-exp-frac.yaml``).  ``overrides``
        set other fields, e.g. ``seed`` or ``skip_modules``."""
        values = {
            "x_p_exp": ORIGINAL_P,
            "x_p_frac": ORIGINAL_P,
            "x_zero_out_t": 30.0,
            "w_p_exp": ORIGINAL_P,
            "w_p_frac": ORIGINAL_P,
            "w_zero_out_t": 1.25,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_original_yaml(
        cls,
        path_or_dict,
        *,
        skip_modules: list[str] | None = None,
        seed: int = 0,
        compat_snap: bool = False,
    ) -> BitflipConfig:
        """Load the original pretraining meta YAML (e.g. ``fc-only-w-a-exp-frac.yaml``).

        Accepts ``{use_regex, transform_flavor, layer_name_to_config: {...}}`` or the rules
        alone at the top level (``default: {...}``), as a path or an already parsed dict.
        ``transform_flavor`` must be ``"fc"``; ``use_regex: false`` matches names exactly.
        In a rule, a missing or null probability means 0 and a missing or null threshold
        means ``None`` (the original's defaults); ``{x,w}_seed_{exp,frac}`` are ignored
        with a warning.  A file whose only rule is ``default`` becomes top-level values.

        ``skip_modules`` defaults to ``["lm_head"]``, whereas the original pretraining
        transform flipped every Linear including the output head; pass ``skip_modules=[]``
        to reproduce that.
        """
        data = _load_yaml(path_or_dict)
        if not isinstance(data, Mapping):
            raise TypeError(f"original YAML config must be a mapping, got {data!r}")
        data = dict(data)
        use_regex = data.pop("use_regex", True)
        if not isinstance(use_regex, bool):
            raise TypeError(f"use_regex must be true or false, got {use_regex!r}")
        flavor = data.pop("transform_flavor", "fc")
        if flavor != "fc":
            raise ValueError(
                f"transform_flavor {flavor!r} is not supported; the only flavor is 'fc'"
            )
        if "layer_name_to_config" in data:
            rules = data.pop("layer_name_to_config")
            if data:
                raise ValueError(
                    f"unknown key(s) {sorted(data)} in the original YAML config; expected "
                    "use_regex, transform_flavor, layer_name_to_config"
                )
        else:
            rules = data
        if not isinstance(rules, Mapping) or not rules:
            raise ValueError(
                f"original YAML config has no layer_name_to_config rules, got {rules!r}"
            )
        seen_seeds: set[str] = set()
        converted: dict[str, dict | None] = {}
        for key, rule in rules.items():
            if not isinstance(key, str):
                raise TypeError(f"layer_name_to_config key must be a str, got {key!r}")
            pattern = key if use_regex or key == DEFAULT_RULE_KEY else re.escape(key)
            if rule is None:
                converted[pattern] = None
            else:
                converted[pattern] = _convert_original_fc(
                    rule, f"layer_name_to_config[{key!r}]", seen_seeds
                )
        _warn_seeds(seen_seeds)
        common = {"seed": seed, "compat_snap": compat_snap}
        if skip_modules is not None:
            common["skip_modules"] = skip_modules
        only = converted.get(DEFAULT_RULE_KEY)
        if len(converted) == 1 and only is not None:
            return cls(**only, **common)
        return cls(layer_name_to_config=converted, **common)

    @classmethod
    def from_original_toml(
        cls,
        path_or_dict,
        *,
        skip_modules: list[str] | None = None,
        seed: int = 0,
        compat_snap: bool = False,
    ) -> BitflipConfig:
        """The ``BitflipConfig`` of an original LoRA ``transform_cfg.toml`` (see
        ``read_original_toml``); ``lm_head`` is skipped, as in the original."""
        return read_original_toml(
            path_or_dict, skip_modules=skip_modules, seed=seed, compat_snap=compat_snap
        )[0]


def read_original_toml(
    path_or_dict,
    *,
    skip_modules: list[str] | None = None,
    seed: int = 0,
    compat_snap: bool = False,
) -> tuple[BitflipConfig, dict, bool]:
    """Read an original LoRA fine-tuning ``transform_cfg.toml`` (path or parsed dict).

    Layout: top-level ``use_lora`` (bool, default true), ``[fc]`` with the six x_/w_ keys
    (missing or empty means no flips; ``{x,w}_seed_*`` are ignored with a warning) and
    ``[lora]`` with ``r`` and ``lora_alpha`` (defaults 32 and 32, as the original script).

    Returns ``(config, lora_kwargs, use_lora)`` with ``lora_kwargs = {"r": ...,
    "lora_alpha": ...}``.  The original skipped every Linear whose name contains
    ``lm_head``; ``skip_modules`` defaults to ``["lm_head"]``.
    """
    data = _load_toml(path_or_dict)
    unknown = [k for k in data if k not in ("use_lora", "fc", "lora")]
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the original TOML config; expected use_lora, [fc], [lora]"
        )
    use_lora = data.get("use_lora", True)
    if not isinstance(use_lora, bool):
        raise TypeError(f"use_lora must be true or false, got {use_lora!r}")
    seen_seeds: set[str] = set()
    fc = _convert_original_fc(data.get("fc", {}), "[fc]", seen_seeds)
    _warn_seeds(seen_seeds)
    lora = data.get("lora", {})
    if not isinstance(lora, Mapping):
        raise TypeError(f"[lora] must be a table, got {lora!r}")
    unknown = [k for k in lora if k not in ORIGINAL_LORA_DEFAULTS]
    if unknown:
        raise ValueError(f"[lora] has unknown key(s) {unknown}; allowed keys: r, lora_alpha")
    lora_kwargs = {**ORIGINAL_LORA_DEFAULTS, **lora}
    r = lora_kwargs["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"[lora].r must be a positive int, got {r!r}")
    alpha = lora_kwargs["lora_alpha"]
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"[lora].lora_alpha must be a positive number, got {alpha!r}")
    kwargs = {"seed": seed, "compat_snap": compat_snap}
    if skip_modules is not None:
        kwargs["skip_modules"] = skip_modules
    return BitflipConfig(**fc, **kwargs), lora_kwargs, use_lora


# ---------------------------------------------------------------------- helpers


def _convert_original_fc(rule, where: str, seen_seeds: set[str]) -> dict:
    """One original per-layer config -> the six x_/w_ values (null p -> 0, null t -> None)."""
    if not isinstance(rule, Mapping):
        raise TypeError(f"{where} must be a mapping or null, got {rule!r}")
    unknown = [k for k in rule if k not in RULE_KEYS and k not in ORIGINAL_SEED_KEYS]
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {unknown}; allowed keys: "
            f"{list(RULE_KEYS + ORIGINAL_SEED_KEYS)}"
        )
    seen_seeds.update(k for k in rule if k in ORIGINAL_SEED_KEYS)
    out = {}
    for key in RULE_KEYS:
        value = rule.get(key)
        if isinstance(value, str):
            # PyYAML reads "1e-5" (no dot) as a string; the original accepted such values
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"{where}.{key} must be a number or null, got {value!r}") from None
        if value is None and not _is_threshold_key(key):
            value = 0.0
        out[key] = _validate_value(f"{where}.{key}", key, value)
    return out


def _warn_seeds(seen: set[str]) -> None:
    if seen:
        keys = ", ".join(k for k in ORIGINAL_SEED_KEYS if k in seen)
        warnings.warn(_SEED_WARNING.format(keys=keys), UserWarning, stacklevel=3)


def _load_yaml(path_or_dict):
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict))
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading YAML configs needs PyYAML: pip install pyyaml") from e
    with open(path_or_dict, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _load_toml(path_or_dict) -> dict:
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict))
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise ImportError("reading TOML configs on Python 3.10 needs tomli") from e
    with open(path_or_dict, "rb") as f:
        return tomllib.load(f)
