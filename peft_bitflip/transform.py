"""Apply a :class:`~peft_bitflip.config.BitflipConfig` to any PyTorch / HF model, and undo it.

``apply_bitflip(model, config)`` turns every ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``)
whose name the config does not skip into a bit-flip layer, in place: the module keeps its
parameters, hooks and device; only its class changes.  ``remove_bitflip(model)`` turns them back.
Subclasses of ``nn.Linear`` (quantised or adapter layers, ``nn.MultiheadAttention``'s
``out_proj``) are left alone: flipping them would not mean what the fault model says.  The
summary names every linear-like module left clean, with the reason.

On a transformers ``PreTrainedModel`` the config is also recorded as
``model.config.quantization_config``, so ``save_pretrained`` writes it to ``config.json`` and
``from_pretrained`` rebuilds the flips (see ``hf_quantizer.py``); ``remove_bitflip`` removes it.

PEFT models: modules are named as in the model without PEFT's wrappers (a LoRA layer's
``base_layer`` by the LoRA layer's name, a ``modules_to_save`` copy by the module it replaces),
so a merged model draws the same flips; LoRA factors and other adapter parts are never made
bit-flip layers.  On a ``PeftModel`` the config is recorded on its base model and in its
``BitflipLoraConfig`` adapters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .bursts import bursts_for
from .config import BitflipConfig
from .experts import bitflip_experts_class, expert_weight_names, is_experts
from .layers import BitflipConv1D, BitflipLayerMixin, BitflipLinear, Conv1D, bitflip_layers
from .model_config import attach_bitflip_config, detach_bitflip_config
from .spec import FlipSpec
from .stuck_at import check_position_names, position_names, stuck_at_for

__all__ = ["BitflipSummary", "apply_bitflip", "remove_bitflip", "candidate_modules"]


def _bitflip_class(module: nn.Module):
    if type(module) is nn.Linear:
        return BitflipLinear
    if Conv1D is not None and type(module) is Conv1D:
        return BitflipConv1D
    if is_experts(module) and not isinstance(module, BitflipLayerMixin):  # MoE (experts.py)
        return bitflip_experts_class(type(module))
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(module: nn.Module, name: str, out: list, seen: set, adapter_of=None) -> None:
    """Append (name, module, adapter_of) for ``module`` and below, named as without PEFT's
    wrappers: a tuner layer's ``base_layer`` and a ``modules_to_save`` wrapper's modules take
    the wrapper's name; the other parts of a tuner layer (LoRA factors, ...) come with
    ``adapter_of`` set to that tuner layer (they are never made bit-flip layers)."""
    if id(module) in seen:  # shared modules: the first name, as named_modules() gives
        return
    seen.add(id(module))
    out.append((name, module, adapter_of))
    if adapter_of is None and isinstance(module, BaseTunerLayer):
        for child_name, child in module.named_children():
            if child_name == "base_layer":
                _walk(child, name, out, seen)
            else:
                _walk(child, _join(name, child_name), out, seen, module)
    elif adapter_of is None and isinstance(module, AuxiliaryTrainingWrapper):
        for child in module.children():  # original_module; the copies in modules_to_save
            for m in child.values() if isinstance(child, nn.ModuleDict) else [child]:
                _walk(m, name, out, seen)
    else:
        for child_name, child in module.named_children():
            _walk(child, _join(name, child_name), out, seen, adapter_of)


def _walk_model(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    out: list = []
    _walk(model, "", out, set())
    return out


def _is_candidate(module: nn.Module, adapter_of) -> bool:
    return adapter_of is None and (
        _bitflip_class(module) is not None or isinstance(module, BitflipLayerMixin)
    )


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every plain ``nn.Linear`` / ``Conv1D``, transformers fused-experts
    module (``experts.py``) or existing bit-flip layer;
    in PEFT layers only the base layers and ``modules_to_save`` copies, named as in the model
    without PEFT's wrappers (a copy shares the name of the module it replaces)."""
    return [(n, m) for n, m, adapter_of in _walk_model(model) if _is_candidate(m, adapter_of)]


_MHA_REASON = (
    "out_proj of nn.MultiheadAttention, which computes with out_proj.weight in "
    "F.multi_head_attention_forward and never calls out_proj.forward: a bit-flip layer there "
    "would flip nothing (its input projections are not modules either)"
)


def _unsupported_reason(module: nn.Module, adapter_of) -> str | None:
    """Why a linear-like module that is no candidate stays clean (None: not linear-like, or a
    factor of a bit-flip LoRA layer, flipped within the merged weight W + s*B@A)."""
    kinds = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)
    if _is_candidate(module, adapter_of):
        return None
    if not isinstance(module, kinds) and (adapter_of is not None or not _weights(module)):
        return None  # no weight parameters (norm scales and biases are not weights here)
    if adapter_of is not None:
        if getattr(adapter_of, "flips_merged_weight", False):  # a BitflipLoraLinear
            return None
        if getattr(adapter_of, "parameter_name", None) is not None and isinstance(
            adapter_of.get_base_layer(), BitflipLayerMixin
        ):  # PEFT's ParamWrapper: the delta joins the parameter the bit-flip module reads
            return None
        return (
            f"adapter part of a PEFT {type(adapter_of).__name__} layer: its output is added "
            "unflipped (BitflipLoraConfig flips the merged weight W + s*B@A instead)"
        )
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return _MHA_REASON
    if not isinstance(module, kinds):
        return _other_weights_reason(module)
    cls = type(module)
    return (
        f"unsupported subclass {cls.__qualname__} ({cls.__module__}) of "
        f"{'nn.Linear' if isinstance(module, nn.Linear) else 'Conv1D'}: its forward need not "
        "be the plain product (quantised or adapter layers), so flips would not mean what the "
        "fault model says"
    )


_EMBEDDING_REASON = (
    "embedding: a table lookup, not a matmul with an input, so the fault model (flip the input "
    "and the weight of a matmul) does not apply; its weights are not flipped"
)
_ROUTER_REASON = (
    "MoE router {cls}: its forward multiplies by its weight inside the routing (F.linear, "
    "softmax, top-k), not through a module the transform can replace; routing stays clean"
)
_OTHER_REASON = (
    "{cls} ({module}) computes with its own weight parameters ({names}) in its forward, not "
    "through nn.Linear, Conv1D or a transformers experts module: not flipped"
)


def _weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own weight parameters: what the fault model flips in nn.Linear / Conv1D /
    experts modules, elsewhere every own parameter of >= 2 dimensions except biases."""
    params = module._parameters
    if isinstance(module, BitflipLayerMixin) or _bitflip_class(module) is not None:
        names = expert_weight_names(module) if is_experts(module) else ("weight",)
        return {n: params[n] for n in names if params.get(n) is not None}
    return {n: p for n, p in params.items() if p is not None and p.dim() >= 2 and "bias" not in n}


def _other_weights_reason(module: nn.Module) -> str:
    """Why a module with weight parameters that is no linear-like module stays clean."""
    cls = type(module)
    if isinstance(module, nn.Embedding):
        return _EMBEDDING_REASON
    if "router" in cls.__name__.lower():
        return _ROUTER_REASON.format(cls=cls.__qualname__)
    names = ", ".join(_weights(module))
    return _OTHER_REASON.format(cls=cls.__qualname__, module=cls.__module__, names=names)


def _count_parameters(walked, flipped: dict) -> tuple[int, int]:
    """(flipped weight elements, weight elements of matmul-bearing modules): every module's
    :func:`_weights` but those of embeddings and of adapter parts (LoRA factors), each parameter
    once (a tied one is a matmul weight if any module holding it is one, flipped if any
    flipped module holds it)."""
    seen: dict[int, list] = {}  # id -> [elements, matmul, flipped]
    for name, module, adapter_of in walked:
        if adapter_of is not None:
            continue
        for p in _weights(module).values():
            entry = seen.setdefault(id(p), [p.numel(), False, False])
            entry[1] |= not isinstance(module, nn.Embedding)
            entry[2] |= name in flipped and _is_candidate(module, None)
    matmul = [(n, f) for n, m, f in seen.values() if m]
    return sum(n for n, f in matmul if f), sum(n for n, _ in matmul)


def _config_reason(config: BitflipConfig, name: str) -> str:
    if config.is_skipped(name):
        return f"skip_modules={config.skip_modules}"
    pattern = config.match_rule(name)
    if pattern is None:
        return "no layer_name_to_config rule matches it, and there is no 'default'"
    return f"layer_name_to_config[{pattern!r}] is None"


@dataclass
class BitflipSummary:
    """Which modules got which settings, and which linear-like modules were left clean.

    ``skipped``: the modules the config leaves clean (``skip_modules``, a ``None`` rule, no
    matching rule); ``clean``: every module with weights left clean, name -> reason (those of
    ``skipped``, ``nn.Linear`` subclasses such as ``nn.MultiheadAttention``'s ``out_proj``, the
    factors of a plain PEFT LoRA layer, embeddings, MoE routers, other modules computing with
    weight parameters of their own).

    ``flipped_parameters`` / ``matmul_parameters``: weight elements the flips cover / of all
    matmul-bearing modules (linear layers, experts, routers, ...; not embeddings, which are no
    matmul; norm scales and biases are not weights); ``coverage`` is their ratio."""

    flipped: dict[str, tuple[FlipSpec, FlipSpec]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    clean: dict[str, str] = field(default_factory=dict)
    flipped_parameters: int = 0
    matmul_parameters: int = 0

    @property
    def coverage(self) -> float:
        """Share of the matmul weight elements that are flipped (0.0 without any)."""
        return self.flipped_parameters / self.matmul_parameters if self.matmul_parameters else 0.0

    def groups(self) -> dict[tuple[FlipSpec, FlipSpec], list[str]]:
        out: dict = {}
        for name, specs in self.flipped.items():
            out.setdefault(specs, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [
            f"bit flips on {len(self.flipped)} modules, {len(self.clean)} left clean; "
            f"{self.flipped_parameters:,} of {self.matmul_parameters:,} matmul weight "
            f"parameters flipped ({100 * self.coverage:.1f} %)"
        ]
        for (xs, ws), names in self.groups().items():
            lines.append(
                f"  {len(names)} modules: x(p_exp={xs.p_exp:g}, p_frac={xs.p_frac:g}, "
                f"t={xs.zero_out_threshold}) w(p_exp={ws.p_exp:g}, p_frac={ws.p_frac:g}, "
                f"t={ws.zero_out_threshold}) e.g. {names[0]}"
            )
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.clean.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  clean: {', '.join(names)} -- {reason}")
        return "\n".join(lines)


_WARNED_NO_ZERO_OUT: set = set()  # the situations warned about in this process
_NO_ZERO_OUT = (
    "exponent flips without zero-out on {what} of {n} module(s), e.g. {example}: exponent "
    "flips without zero-out produce Inf/NaN (a flipped top exponent bit turns ~1.0 into ~1e38 "
    "in fp32/bf16 and Inf in fp16); set x_zero_out_t / w_zero_out_t (see calibrate_zero_out)"
)


def _stuck_exponents(root: nn.Module, flipped) -> set[tuple[str, str]]:
    """(module name, "x" | "w") whose stuck-at rates can stick sign/exponent bits, or whose
    bursts can strike them."""
    out = set()
    for name, module in root.named_modules():
        if name not in flipped:
            continue
        stuck = getattr(module, "bitflip_stuck", None)
        bursts = getattr(module, "bitflip_bursts", None)
        for tensor in ("x", "w"):
            spec = None if stuck is None else getattr(stuck, tensor)
            listed = getattr(stuck, "sticks_listed", None)  # an experts module's lists
            if spec is not None and (spec.p_exp > 0 or spec.positions or listed and listed(tensor)):
                out.add((name, tensor))
            burst = None if bursts is None else getattr(bursts, tensor)
            if burst is not None and not burst.is_identity and burst.field != "frac":
                out.add((name, tensor))
    return out


def _warn_no_zero_out(
    flipped: dict[str, tuple[FlipSpec, FlipSpec]], stuck: set[tuple[str, str]] = frozenset()
) -> None:
    """Warn, once per process and set of tensors (x, w, both), where exponent bits flip (or
    can be stuck) without a zero-out threshold: a config without threshold keys has zero-out
    off."""
    names: dict[str, list[str]] = {}
    for name, specs in flipped.items():
        for tensor, spec in zip(("x", "w"), specs):
            exposed = spec.flips_exponent() or (name, tensor) in stuck
            if exposed and spec.zero_out_threshold is None:
                names.setdefault(tensor, []).append(name)
    situation = tuple(t for t in ("x", "w") if t in names)
    if not situation or situation in _WARNED_NO_ZERO_OUT:
        return
    _WARNED_NO_ZERO_OUT.add(situation)
    what = " and ".join({"x": "x (layer inputs)", "w": "w (weights)"}[t] for t in situation)
    modules = list(dict.fromkeys(n for t in situation for n in names[t]))
    message = _NO_ZERO_OUT.format(what=what, n=len(modules), example=modules[0])
    warnings.warn(message, UserWarning, stacklevel=3)


def _peft_parts(model: nn.Module):
    """(the model to flip, the PEFT adapter configs to keep in sync or None, the PEFT tuner or
    None) of ``model``: a ``PeftModel``, a PEFT tuner model or any other module."""
    if isinstance(model, PeftModel):
        tuner = model.base_model
        if isinstance(tuner, BaseTuner):
            return tuner.model, model.peft_config, tuner
        return tuner, model.peft_config, None  # prompt learning: the base model itself
    if isinstance(model, BaseTuner):
        return model.model, model.peft_config, model
    return model, None, None


def _refuse_bitflip_lora_inside(walked) -> None:
    """A model inside a bit-flip LoRA PeftModel: its BitflipLoraConfig would not follow."""
    inside = [n for n, m, _ in walked if getattr(m, "flips_merged_weight", False)]
    if inside:
        raise ValueError(
            f"this model holds bit-flip LoRA layers ({inside[0]}, ...) of a PeftModel: call "
            "apply_bitflip on the PeftModel itself, so that its BitflipLoraConfig adapters "
            "(what adapter_config.json saves) take the new fault model too"
        )


def apply_bitflip(
    model: nn.Module, config: BitflipConfig, *, check_rules: bool = True
) -> BitflipSummary:
    """Make the linear layers of ``model`` flip bits as ``config`` says (in place).

    Module names are relative to ``model`` and are what ``config``'s regex rules match and what
    the random streams are named by.  Applying again updates settings in place and keeps the
    call counters.  With ``check_rules`` a rule that matches no module raises ``ValueError``.
    A transformers model records ``config`` in ``model.config.quantization_config`` (on a
    config object of its own: other models built from the same config object stay clean).

    On a PEFT ``PeftModel`` the layers of its base model are flipped, named as in the base
    model; LoRA factors are never flipped; ``config`` is recorded on the base model (what a
    merged model saves) and in every ``BitflipLoraConfig`` adapter (what the adapter saves).
    Warns once per process when exponent bits flip without a zero-out threshold.
    """
    if not isinstance(config, BitflipConfig):
        raise TypeError(f"config must be a BitflipConfig, got {type(config).__name__}")
    root, peft_configs, tuner = _peft_parts(model)
    walked = _walk_model(root)
    if peft_configs is None:
        _refuse_bitflip_lora_inside(walked)
    candidates = [(n, m) for n, m, adapter_of in walked if _is_candidate(m, adapter_of)]
    if check_rules:
        config.check_rules_match(list(dict.fromkeys(n for n, _ in candidates)))
        flipped = [(n, m) for n, m in candidates if config.resolve(n) is not None]
        check_position_names(config, [p for n, m in flipped for p in position_names(n, m)])
    summary = BitflipSummary()
    for name, module in candidates:
        specs = config.resolve(name)
        if specs is None:
            if isinstance(module, BitflipLayerMixin):
                _restore(module)
            if name not in summary.clean:
                summary.skipped.append(name)
                summary.clean[name] = _config_reason(config, name)
            continue
        x_spec, w_spec = specs
        if isinstance(module, BitflipLayerMixin):
            module.set_bitflip(x_spec, w_spec)
            if module.bitflip_seed != config.seed:
                module.bitflip_seed, module._bitflip_keys = config.seed, None
        else:
            original = type(module)
            module.__class__ = _bitflip_class(module)
            module._bitflip_original_class = original
            module.init_bitflip(name, x_spec, w_spec, config.seed)
        module.bitflip_stuck = stuck_at_for(config, name, is_experts(module))
        module.bitflip_bursts = bursts_for(config, name)
        summary.flipped[name] = (x_spec, w_spec)
    for name, module, adapter_of in walked:
        if name not in summary.flipped and name not in summary.clean:
            reason = _unsupported_reason(module, adapter_of)
            if reason is not None:
                summary.clean[name] = reason
    summary.flipped_parameters, summary.matmul_parameters = _count_parameters(
        walked, summary.flipped
    )
    attach_bitflip_config(root, config)
    for adapter_config in (peft_configs or {}).values():
        if hasattr(adapter_config, "set_bitflip_config"):  # a BitflipLoraConfig
            adapter_config.set_bitflip_config(config)
    if tuner is not None and hasattr(tuner, "bitflip_summary"):
        tuner.bitflip_summary = summary
    _warn_no_zero_out(summary.flipped, _stuck_exponents(root, summary.flipped))
    return summary


def _restore(module: BitflipLayerMixin) -> None:
    original = getattr(module, "_bitflip_original_class", None)
    if original is None:
        original = nn.Linear if isinstance(module, BitflipLinear) else Conv1D
    del module._buffers["bitflip_calls"]
    for attr in (
        "bitflip_name",
        "bitflip_seed",
        "x_spec",
        "w_spec",
        "bitflip_enabled",
        "bitflip_recompute_input",
        "_bitflip_keys",
        "_pending_calls",
        "_bitflip_original_class",
        "bitflip_stuck",
        "bitflip_bursts",
    ):
        module.__dict__.pop(attr, None)
    module.__class__ = original


def remove_bitflip(model: nn.Module) -> int:
    """Turn every bit-flip layer of ``model`` back into its original class; returns how many."""
    layers = bitflip_layers(model)
    for _, m in layers:
        _restore(m)
    detach_bitflip_config(_peft_parts(model)[0])
    return len(layers)
