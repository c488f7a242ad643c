"""PEFT tuner: ``BitflipLoraConfig`` / ``BitflipLoraModel`` (bit-flip-aware LoRA).

``get_peft_model(model, BitflipLoraConfig(r=32, x_p_exp=2**-16, ...))`` makes every linear layer
that the bit-flip settings select a bit-flip layer, and adds LoRA adapters to the
``target_modules``.  An adapted layer computes, as the original system does,

    y = flip(x) @ flip(W + s * B @ A)^T + b,      s = lora_alpha / r

so the adapter is trained through the fault model, and after ``merge_and_unload()`` the merged
layer (still a bit-flip layer, holding ``W + s * B @ A``) gives the same output for the same seed.
``W + s * B @ A`` is formed as ``float32(W) + float32(B) @ float32(A) * s`` rounded to W's
dtype, by the forward and by ``merge`` alike.  With one active adapter the layer takes the fast
path (:func:`~peft_bitflip.flipped_linear.flipped_lora_linear`: one kernel pass merges, flips
and zeroes the weight; A and B get rank-r gradients).  LoRA dropout does not fit this formulation
(there is no separate LoRA input path), so ``lora_dropout`` must be 0; DoRA and other LoRA
variants are not supported.  MoE experts (3-D parameters, ``experts.py``) take adapters through
``target_parameters`` (PEFT's ``ParamWrapper``): the delta joins the parameter the bit-flip
experts read, so they flip ``W + s * B @ A`` too, with PEFT's arithmetic for the sum, which its
merge repeats.  ``lora_bias=True`` adds ``s * lora_B.bias`` to the (unflipped) bias ``b``
(the general path; ``merge`` folds it into the base bias, which must exist).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .bursts import burst_settings, bursts_for
from .config import BURST_KEYS, P_BITS_KEYS, RULE_KEYS, STUCK_KEYS, BitflipConfig
from .experts import BitflipExpertsMixin, is_experts
from .kernels.lora import merge_lora_weight, merged_lora_weight
from .layers import BitflipLayerMixin
from .stuck_at import stuck_at_for, stuck_settings
from .transform import apply_bitflip, candidate_modules

PEFT_TYPE = "BITFLIP_LORA"
BITFLIP_FIELDS = RULE_KEYS  # x_p_exp, x_p_frac, x_zero_out_t, w_p_exp, w_p_frac, w_zero_out_t
STUCK_FIELDS = (*STUCK_KEYS, "stuck_at_positions")  # the stuck-at faults (same names)
BURST_FIELDS = (*BURST_KEYS, "burst_length", "burst_field")  # the burst faults (same names)
P_BITS_FIELDS = P_BITS_KEYS  # x_p_bits, w_p_bits: per-bit-position rates (same names)
FAULT_FIELDS = STUCK_FIELDS + BURST_FIELDS + P_BITS_FIELDS  # the fields past RULE_KEYS


@dataclass
class BitflipLoraConfig(LoraConfig):
    """``LoraConfig`` plus the fault model (same meaning as in :class:`BitflipConfig`).

    ``x_*`` act on each layer's input, ``w_*`` on its (LoRA-merged) weight; ``p_exp`` is the flip
    probability of each sign/exponent bit, ``p_frac`` of each mantissa bit; ``*_zero_out_t``
    zeroes ``|y| >= t``, NaN and Inf (None: off).  ``seed`` names the random streams (as
    ``BitflipConfig.seed``; default 0); ``layer_name_to_config`` / ``skip_modules`` are per-module
    rules (regex full match).  Flips act on every linear layer the rules select, not only on
    ``target_modules``.

    ``bitflip_seed`` is the deprecated name of ``seed`` (removed in the next release): passing it
    alone warns and sets ``seed``.  Both are written to ``adapter_config.json`` with the same
    value, so the previous release (which knows only ``bitflip_seed``) reads new files and this
    one reads old files.
    """

    x_p_exp: float = field(default=0.0, metadata={"help": "flip prob. of input sign/exp bits"})
    x_p_frac: float = field(default=0.0, metadata={"help": "flip prob. of input mantissa bits"})
    x_zero_out_t: float | None = field(default=None, metadata={"help": "input zero-out |x|>=t"})
    w_p_exp: float = field(default=0.0, metadata={"help": "flip prob. of weight sign/exp bits"})
    w_p_frac: float = field(default=0.0, metadata={"help": "flip prob. of weight mantissa bits"})
    w_zero_out_t: float | None = field(default=None, metadata={"help": "weight zero-out |w|>=t"})
    seed: int | None = field(default=None, metadata={"help": "seed of the flip streams (0)"})
    bitflip_seed: int | None = field(
        default=None, metadata={"help": "deprecated name of seed (kept equal to it)"}
    )
    compat_snap: bool = field(default=False, metadata={"help": "snap p like the original"})
    layer_name_to_config: Any | None = field(
        default=None, metadata={"help": "per-module rules {regex: {x_p_exp: ...} | None}"}
    )
    skip_modules: list | None = field(
        default_factory=lambda: ["lm_head"], metadata={"help": "modules never flipped (regex)"}
    )
    x_stuck_p_exp: float = field(default=0.0, metadata={"help": "stuck rate, input sign/exp bits"})
    x_stuck_p_frac: float = field(default=0.0, metadata={"help": "stuck rate, input mantissa"})
    w_stuck_p_exp: float = field(default=0.0, metadata={"help": "stuck rate, weight sign/exp"})
    w_stuck_p_frac: float = field(default=0.0, metadata={"help": "stuck rate, weight mantissa"})
    stuck_one_share: float = field(default=0.5, metadata={"help": "share of bits stuck at 1"})
    stuck_at_positions: Any | None = field(
        default=None, metadata={"help": "explicit stuck bits {layer: {x|w: [[i, bit, v]]}}"}
    )
    x_p_bits: Any | None = field(
        default=None, metadata={"help": "per-bit-position input rates {position|sign: p}"}
    )
    w_p_bits: Any | None = field(
        default=None, metadata={"help": "per-bit-position weight rates {position|sign: p}"}
    )
    x_burst_rate: float = field(default=0.0, metadata={"help": "burst events per input element"})
    w_burst_rate: float = field(default=0.0, metadata={"help": "burst events per weight element"})
    burst_length: Any = field(default=2, metadata={"help": "bits per burst: k or {k: prob}"})
    burst_field: str = field(
        default="any", metadata={"help": "where bursts lie: any, exp or frac bits"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.lora_dropout:
            raise ValueError(
                f"lora_dropout must be 0 for bit-flip LoRA (y = flip(x) @ flip(W + s*B@A)^T has "
                f"no separate LoRA input to drop out), got {self.lora_dropout!r}"
            )
        if self.use_dora:
            raise ValueError("use_dora=True is not supported by BitflipLoraConfig")
        if self.bitflip_seed is not None:
            if self.seed is None:
                warnings.warn(
                    "BitflipLoraConfig: bitflip_seed is the deprecated name of seed and goes in "
                    f"the next release: pass seed={self.bitflip_seed!r} (an adapter_config.json "
                    "with only bitflip_seed still loads; save it again to write seed)",
                    FutureWarning,
                    stacklevel=3,
                )
                self.seed = self.bitflip_seed
            elif self.seed != self.bitflip_seed:
                raise ValueError(
                    f"BitflipLoraConfig got seed={self.seed!r} and bitflip_seed="
                    f"{self.bitflip_seed!r} (the deprecated name of seed): give only seed"
                )
        if self.seed is None:
            self.seed = 0
        self.set_bitflip_config(self.bitflip_config())  # validates and normalises the fields

    def set_bitflip_config(self, bitflip: BitflipConfig) -> None:
        """Set the bit-flip fields to ``bitflip``'s fault model (plain floats and ints, the
        rules in their ordered list form), as ``apply_bitflip`` on a PeftModel does."""
        d = bitflip.to_dict()
        for k in BITFLIP_FIELDS:
            setattr(self, k, d[k])
        self.seed = self.bitflip_seed = d["seed"]  # bitflip_seed: for the previous release
        self.compat_snap = d["compat_snap"]
        self.layer_name_to_config = d["layer_name_to_config"]
        self.skip_modules = d["skip_modules"]
        for k in FAULT_FIELDS:
            setattr(self, k, copy.deepcopy(getattr(bitflip, k)))

    def bitflip_config(self) -> BitflipConfig:
        """The model-level :class:`BitflipConfig` these fields describe."""
        return BitflipConfig(
            **{k: getattr(self, k) for k in BITFLIP_FIELDS},
            seed=self.seed,
            compat_snap=self.compat_snap,
            layer_name_to_config=self.layer_name_to_config,
            skip_modules=list(self.skip_modules or []),
            **{k: getattr(self, k) for k in FAULT_FIELDS},
        )

    @classmethod
    def from_bitflip_config(cls, bitflip: BitflipConfig, **lora_kwargs) -> BitflipLoraConfig:
        """A ``BitflipLoraConfig`` with ``bitflip``'s fault model and the given LoRA fields."""
        d = bitflip.to_dict()
        return cls(
            **{k: d[k] for k in BITFLIP_FIELDS},
            seed=d["seed"],
            compat_snap=d["compat_snap"],
            layer_name_to_config=d["layer_name_to_config"],
            skip_modules=d["skip_modules"],
            **{k: copy.deepcopy(getattr(bitflip, k)) for k in FAULT_FIELDS},
            **lora_kwargs,
        )


class BitflipLoraLinear(LoraLinear):
    """LoRA layer over a bit-flip layer: ``flip(x) @ flip(W + sum_a s_a B_a @ A_a)^T + b'``,
    ``b' = b + sum_a s_a lora_B_a.bias`` (adapters with ``lora_bias=True``; not flipped)."""

    flips_merged_weight = True  # the transform leaves its factors clean: they are flipped in W'

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A.keys()]
        if not adapters:
            return base.flipped_forward(x, base.weight, base.bias)

        biased = [a for a in adapters if self.lora_B[a].bias is not None]
        if len(adapters) == 1 and not biased:  # the fast path: merge + flip in one pass
            a = adapters[0]
            return base.flipped_lora_forward(
                x, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]
            )

        def merged_weight():
            weight = base.weight
            for adapter in adapters:
                weight = self._merged(weight, adapter)
            return weight

        # the merged weight is built again in backward instead of being kept (flipped_linear);
        # the LoRA biases join the (unflipped) bias, with autograd to lora_B's bias
        params = [base.weight]
        params += [m[a].weight for a in adapters for m in (self.lora_A, self.lora_B)]
        bias = base.bias
        for a in biased:
            bias = self._merged_bias(bias, a)
        scales = tuple(self.scaling[a] for a in adapters)  # (the stuck-at cache's key)
        return base.flipped_forward(x, merged_weight, bias, weight_params=params, weight_key=scales)

    def _merged(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        """``weight + s B @ A`` for ``adapter`` (float32 sum rounded to weight's dtype)."""
        return merge_lora_weight(
            weight,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.scaling[adapter],
            self.get_base_layer()._is_conv1d,
        )

    def _merged_bias(self, bias: torch.Tensor | None, adapter: str) -> torch.Tensor:
        """``bias + s * lora_B.bias`` of ``adapter`` (float32 sum rounded to bias's dtype, or to
        the weight's where the base layer has no bias), by the forward and ``merge`` alike."""
        extra = self.lora_B[adapter].bias.float() * self.scaling[adapter]
        if bias is None:
            return extra.to(self.get_base_layer().weight.dtype)
        return (bias.float() + extra).to(bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (and LoRA biases into the base bias) with the
        arithmetic the forward uses, so the merged layer gives the adapter layer's output for
        the same seed.  A LoRA bias needs a base bias to fold into (as in PEFT)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            has_bias = self.lora_B[name].bias is not None
            if has_bias and base.bias is None:
                raise ValueError(
                    f"cannot merge adapter {name!r} (lora_bias=True) into a layer with no bias: "
                    "the merged model's architecture has no bias parameter to hold s * "
                    "lora_B.bias (a bias added here would be dropped when the checkpoint is "
                    "reloaded). Keep the adapter unmerged, or train it with lora_bias=False."
                )
            with torch.no_grad():
                merged = merged_lora_weight(
                    base.weight,
                    self.lora_A[name].weight,
                    self.lora_B[name].weight,
                    self.scaling[name],
                    base._is_conv1d,
                )
                bias = self._merged_bias(base.bias, name) if has_bias else None
            if safe_merge and not (
                torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())
            ):
                raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
            base.weight.data = merged
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters.append(name)

    def __repr__(self) -> str:
        return "bitflip_" + super().__repr__()


def _check_model_fault_model(model, wanted: BitflipConfig) -> None:
    """Refuse to silently replace the fault model the model's bit-flip layers carry (a loaded
    checkpoint's config.json, an earlier ``apply_bitflip``).  The layers decide, not
    ``model.config``: a model without bit-flip layers carries no fault model, whatever its
    config object says (another model built from the same config object may have set it)."""
    candidates = candidate_modules(model)
    if not any(isinstance(m, BitflipLayerMixin) for _, m in candidates):
        return
    differences = []
    for name, m in candidates:
        specs = wanted.resolve(name)
        if not isinstance(m, BitflipLayerMixin):
            if specs is not None:
                differences.append(f"{name}: clean in the model, flipped by the adapter's")
        elif specs is None:
            differences.append(f"{name}: flipped in the model, clean by the adapter's")
        elif specs != (m.x_spec, m.w_spec) or m.bitflip_seed != wanted.seed:
            differences.append(
                f"{name}: model x {m.x_spec}, w {m.w_spec}, seed {m.bitflip_seed}; adapter x "
                f"{specs[0]}, w {specs[1]}, seed {wanted.seed}"
            )
        elif stuck_settings(m.bitflip_stuck) != stuck_settings(
            stuck_at_for(wanted, name, is_experts(m))
        ):
            differences.append(
                f"{name}: model stuck-at {m.bitflip_stuck}; adapter stuck-at "
                f"{stuck_at_for(wanted, name, is_experts(m))}"
            )
        elif burst_settings(m.bitflip_bursts) != burst_settings(bursts_for(wanted, name)):
            differences.append(
                f"{name}: model bursts {m.bitflip_bursts}; adapter bursts "
                f"{bursts_for(wanted, name)}"
            )
    if differences:
        existing = getattr(getattr(model, "config", None), "quantization_config", None)
        raise ValueError(
            "the model already carries a BitflipConfig (from config.json or apply_bitflip) that "
            "differs from the BitflipLoraConfig's fault model:\n  "
            + "\n  ".join(differences[:3])
            + (f"\n  ... ({len(differences)} modules differ)" if len(differences) > 3 else "")
            + (f"\n  model: {existing}" if isinstance(existing, BitflipConfig) else "")
            + f"\n  adapter: {wanted}\nUse BitflipLoraConfig.from_bitflip_config("
            "model.config.quantization_config, r=..., ...) to keep the model's, or call "
            "peft_bitflip.apply_bitflip(model, new_config) first to change it."
        )


_EXPERTS_LORA = (
    "target_modules matched a MoE experts module ({cls}), which is no linear layer: adapt its "
    "stacked expert weights with target_parameters=['mlp.experts.gate_up_proj', "
    "'mlp.experts.down_proj'] (PEFT's ParamWrapper: the experts then flip W + s*B@A)"
)


class BitflipLoraModel(LoraModel):
    """``LoraModel`` that first applies the fault model, then adds :class:`BitflipLoraLinear`."""

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage=False, state_dict=None):
        cfg = config[adapter_name] if isinstance(config, dict) else config
        _check_model_fault_model(model, cfg.bitflip_config())
        self.bitflip_summary = apply_bitflip(model, cfg.bitflip_config())
        super().__init__(
            model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
        )

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        # PeftModel.add_adapter already rejects adapters of another peft_type
        for name, existing in self.peft_config.items():
            if existing is not config:
                if existing.bitflip_config() != config.bitflip_config():
                    raise ValueError(
                        f"adapter settings of the fault model differ from adapter {name!r}: "
                        "the flips belong to the model, so every adapter must use the same ones"
                    )

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, BitflipExpertsMixin) and kwargs.get("parameter_name") is None:
            raise ValueError(_EXPERTS_LORA.format(cls=type(base).__name__))
        if isinstance(base, BitflipLayerMixin) and kwargs.get("parameter_name") is None:
            lora_config.fan_in_fan_out = base._is_conv1d
            return BitflipLoraLinear(
                target,
                adapter_name,
                config=lora_config,
                is_target_conv_1d_layer=base._is_conv1d,
                **kwargs,
            )
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
