"""Apply a :class:`~peft_bitflip.config.BitflipConfig` to any PyTorch / HF model, and undo it.

``apply_bitflip(model, config)`` turns every ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``)
whose name the config does not skip into a bit-flip layer, in place: the module keeps its
parameters, hooks and device; only its class changes.  ``remove_bitflip(model)`` turns them back.
Subclasses of ``nn.Linear`` (quantised or adapter layers) are left alone: flipping them would
not mean what the fault model says.

On a transformers ``PreTrainedModel`` the config is also recorded as
``model.config.quantization_config``, so ``save_pretrained`` writes it to ``config.json`` and
``from_pretrained`` rebuilds the flips (see ``hf_quantizer.py``); ``remove_bitflip`` removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import BitflipConfig
from .layers import BitflipConv1D, BitflipLayerMixin, BitflipLinear, Conv1D, bitflip_layers
from .spec import FlipSpec

__all__ = ["BitflipSummary", "apply_bitflip", "remove_bitflip", "candidate_modules"]


def _bitflip_class(module: nn.Module):
    if type(module) is nn.Linear:
        return BitflipLinear
    if Conv1D is not None and type(module) is Conv1D:
        return BitflipConv1D
    return None


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every plain ``nn.Linear`` / ``Conv1D`` or existing bit-flip layer."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if _bitflip_class(m) is not None or isinstance(m, BitflipLayerMixin)
    ]


@dataclass
class BitflipSummary:
    """Which modules got which settings, and which were left clean."""

    flipped: dict[str, tuple[FlipSpec, FlipSpec]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def groups(self) -> dict[tuple[FlipSpec, FlipSpec], list[str]]:
        out: dict = {}
        for name, specs in self.flipped.items():
            out.setdefault(specs, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [f"bit flips on {len(self.flipped)} modules, {len(self.skipped)} left clean"]
        for (xs, ws), names in self.groups().items():
            lines.append(
                f"  {len(names)} modules: x(p_exp={xs.p_exp:g}, p_frac={xs.p_frac:g}, "
                f"t={xs.zero_out_threshold}) w(p_exp={ws.p_exp:g}, p_frac={ws.p_frac:g}, "
                f"t={ws.zero_out_threshold}) e.g. {names[0]}"
            )
        if self.skipped:
            lines.append(
                f"  clean: {', '.join(self.skipped[:8])}{' ...' if len(self.skipped) > 8 else ''}"
            )
        return "\n".join(lines)


def apply_bitflip(
    model: nn.Module, config: BitflipConfig, *, check_rules: bool = True
) -> BitflipSummary:
    """Make the linear layers of ``model`` flip bits as ``config`` says (in place).

    Module names are relative to ``model`` and are what ``config``'s regex rules match and what
    the random streams are named by.  Applying again updates settings in place and keeps the
    call counters.  With ``check_rules`` a rule that matches no module raises ``ValueError``.
    A transformers model records ``config`` in ``model.config.quantization_config``.
    """
    if not isinstance(config, BitflipConfig):
        raise TypeError(f"config must be a BitflipConfig, got {type(config).__name__}")
    candidates = candidate_modules(model)
    if check_rules:
        config.check_rules_match([n for n, _ in candidates])
    summary = BitflipSummary()
    for name, module in candidates:
        specs = config.resolve(name)
        if specs is None:
            if isinstance(module, BitflipLayerMixin):
                _restore(module)
            summary.skipped.append(name)
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
        summary.flipped[name] = (x_spec, w_spec)
    from .hf_quantizer import attach_bitflip_config  # imports this module

    attach_bitflip_config(model, config)
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
    ):
        module.__dict__.pop(attr, None)
    module.__class__ = original


def remove_bitflip(model: nn.Module) -> int:
    """Turn every bit-flip layer of ``model`` back into its original class; returns how many."""
    from .hf_quantizer import detach_bitflip_config  # imports this module

    layers = bitflip_layers(model)
    for _, m in layers:
        _restore(m)
    detach_bitflip_config(model)
    return len(layers)
