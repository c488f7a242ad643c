"""transformers integration: ``config.json["quantization_config"]`` holds the BitflipConfig.

``import peft_bitflip`` registers ``quant_method: "bitflip"`` with transformers' public extension
point (``register_quantization_config`` / ``register_quantizer``).  Then:

* ``AutoModelForCausalLM.from_pretrained(path)`` of a checkpoint whose ``config.json`` carries a
  BitflipConfig rebuilds the bit-flip layers with the saved settings (and the saved call counters);
* ``from_pretrained(clean_path, quantization_config=BitflipConfig(...))`` turns a clean checkpoint
  into a flipped model;
* ``save_pretrained`` / ``push_to_hub`` of a flipped model write the config (and counters) back;
* ``model.dequantize()`` gives the clean model back (layers restored, config entry removed).

Nothing is quantised: weights stay in their float dtype and are loaded unchanged.  The model is
therefore *not* marked ``is_quantized`` after loading, so ``.half()``, ``.to(dtype)``, full
fine-tuning with Trainer and LoRA all work as on a clean model.

transformers lets ``config.json`` win over a ``quantization_config=`` keyword (it only warns).
To load a saved flipped checkpoint with other settings, use :func:`load_config_with`, or call
:func:`~peft_bitflip.apply_bitflip` with the new config on the loaded model (counters continue).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, BitflipConfig
from .layers import bitflip_layers
from .model_config import attach_bitflip_config, config_is_own, detach_bitflip_config
from .transform import apply_bitflip, remove_bitflip

__all__ = [
    "BitflipHfQuantizer",
    "attach_bitflip_config",
    "detach_bitflip_config",
    "load_config_with",
    "quantizer_detached",
    "register",
]


class BitflipHfQuantizer(HfQuantizer):
    """Applies a :class:`BitflipConfig` while transformers builds a model (weights untouched)."""

    requires_calibration = False

    def __init__(self, quantization_config: BitflipConfig, **kwargs):
        if not isinstance(quantization_config, BitflipConfig):
            raise TypeError(
                "BitflipHfQuantizer needs a BitflipConfig, got "
                f"{type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        # the model is still on the meta device: only the module classes change;
        # from_pretrained gave it a deep copy of the config: no further copy is needed
        config_is_own(model)
        apply_bitflip(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for _, layer in bitflip_layers(model):
            calls = layer.bitflip_calls
            device = next(layer.parameters(recurse=False)).device  # weight (experts: gate_up)
            if calls.device != device:
                layer.bitflip_calls = calls = calls.to(device)
            # transformers flags every tensor it loaded; a counter missing from the checkpoint (a
            # clean checkpoint) was left as uninitialised memory: such streams start at call 0
            if not getattr(calls, "_is_hf_initialized", False):
                calls.zero_()
        _check_loaded_counters(model)
        model.is_quantized = False  # plain float weights: allow .half(), full training, ...
        return model

    def _dequantize(self, model, dtype=None):
        remove_bitflip(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _check_loaded_counters(model) -> None:
    """Refuse counters outside [0, 2**32) (an edited or corrupt checkpoint): such a call index
    would reuse the flips of other calls, silently."""
    by_device: dict = {}
    for name, layer in bitflip_layers(model):
        calls = layer.bitflip_calls
        if calls.device.type != "meta":  # (offloaded: not loaded here)
            by_device.setdefault(calls.device, []).append((name, calls))
    bad = []
    for layers in by_device.values():  # one transfer per device
        values = torch.stack([c.reshape(()) for _, c in layers]).tolist()
        bad += [f"{n}.bitflip_calls = {v}" for (n, _), v in zip(layers, values) if v < 0 or v >> 32]
    if bad:
        raise ValueError(
            "the checkpoint holds bit-flip call counters outside [0, 2**32): "
            + ", ".join(bad[:5])
            + (" ..." if len(bad) > 5 else "")
            + ". Counters count forward calls and cannot be negative; fix or delete them "
            "(a missing counter starts at 0)."
        )


def register() -> None:
    """Register ``quant_method="bitflip"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not BitflipConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(BitflipConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not BitflipHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(BitflipHfQuantizer)


@contextlib.contextmanager
def quantizer_detached(model: nn.Module):
    """Inside this context ``model.hf_quantizer`` is unset, so that
    ``model.save_pretrained(path, state_dict=sd)`` writes ``sd``.

    transformers replaces a ``state_dict`` given to ``save_pretrained`` by the quantizer's
    (``None`` for us, hence ``model.state_dict()``); under FSDP2 that is the sharded DTensors,
    and safetensors fails ("invalid python storage").  ``config.quantization_config`` stays, so
    config.json still carries the BitflipConfig.  Trainer subclasses use it in ``_save``, as
    ``recipes/pretrain_clm.py`` does.
    """
    quantizer = getattr(model, "hf_quantizer", None) if isinstance(model, PreTrainedModel) else None
    if not isinstance(quantizer, BitflipHfQuantizer):
        yield model
        return
    model.hf_quantizer = None
    try:
        yield model
    finally:
        model.hf_quantizer = quantizer


def load_config_with(
    pretrained_model_name_or_path: str | os.PathLike,
    bitflip_config: BitflipConfig | None,
    **kwargs,
) -> PretrainedConfig:
    """The model config of a checkpoint with its bit-flip settings replaced.

    Pass the result as ``from_pretrained(path, config=...)``: transformers otherwise keeps the
    ``quantization_config`` of config.json and ignores a ``quantization_config=`` keyword.
    ``bitflip_config=None`` loads the checkpoint clean (no flips, no warning).
    """
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
    if bitflip_config is None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        if not isinstance(bitflip_config, BitflipConfig):
            raise TypeError(
                "bitflip_config must be a BitflipConfig or None, got "
                f"{type(bitflip_config).__name__}"
            )
        config.quantization_config = bitflip_config.to_dict()
    return config
