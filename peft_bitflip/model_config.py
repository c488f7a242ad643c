"""The fault model recorded on a transformers model: ``model.config.quantization_config``.

:func:`attach_bitflip_config` is what makes ``save_pretrained`` write a model's
:class:`~peft_bitflip.config.BitflipConfig` to ``config.json`` (``apply_bitflip`` and the PEFT
tuner call it); :func:`detach_bitflip_config` undoes it.  One place for the transform and the
transformers quantizer (``hf_quantizer.py``), which both use it.
"""

from __future__ import annotations

import copy
import weakref

from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.auto import AutoHfQuantizer

from .config import QUANT_METHOD, BitflipConfig

__all__ = ["attach_bitflip_config", "config_is_own", "detach_bitflip_config"]


_OWN_CONFIG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its config


def config_is_own(model: PreTrainedModel) -> None:
    """Record that ``model.config`` belongs to ``model`` alone (``from_pretrained`` builds a
    model with a deep copy of its config): :func:`attach_bitflip_config` will not copy it."""
    _OWN_CONFIG[model] = model.config


def _own_config(model: PreTrainedModel) -> None:
    """Give ``model`` a config object of its own (a shallow copy, once), so that writing the
    BitflipConfig into it does not reach other models built from the same config object
    (``LlamaForCausalLM(cfg)`` keeps ``cfg`` itself).  The submodules that hold the model's
    config object (``model.model``, attention layers, ...) get the copy too."""
    config = model.config
    if _OWN_CONFIG.get(model) is config:
        return
    own = copy.copy(config)
    for module in model.modules():
        if module.__dict__.get("config") is config:
            module.config = own
    _OWN_CONFIG[model] = own


def attach_bitflip_config(model: nn.Module, config: BitflipConfig) -> None:
    """Record ``config`` on a transformers model so ``save_pretrained`` writes it to config.json.

    Called by :func:`~peft_bitflip.apply_bitflip` and the PEFT tuner; a no-op for modules that
    are not ``PreTrainedModel``.  The model is marked the way ``from_pretrained`` marks it
    (``hf_quantizer``, ``quantization_method``) but not ``is_quantized`` (weights stay float).
    The first call gives the model a copy of its config object to write to (the model and its
    submodules use the copy; the config object it was built from is left unchanged).
    """
    if not isinstance(model, PreTrainedModel):
        return
    _own_config(model)
    model.config.quantization_config = config
    # the registered quantizer class (peft_bitflip's __init__ registers it): no import of
    # hf_quantizer here, which imports the transform that calls this
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD


def detach_bitflip_config(model: nn.Module) -> None:
    """Undo :func:`attach_bitflip_config` (the model saves as a clean model again)."""
    if not isinstance(model, PreTrainedModel):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(getattr(quantizer, "quantization_config", None), BitflipConfig):
        quantizer.remove_quantization_config(model)
