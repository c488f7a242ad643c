"""A ``trust_remote_code`` fallback for saved bit-flip checkpoints.

Installing the package makes stock tools load bit-flip checkpoints with no import (see
``_peft_bitflip_autoload.py``).  Where that cannot act (site hooks off: ``python -S``,
``PEFT_BITFLIP_AUTOLOAD=0``, an environment that ignores ``.pth`` files), :func:`add_remote_code`
makes a saved checkpoint loadable with ``trust_remote_code=True``: it writes a small
``modeling_peft_bitflip.py`` beside the weights and an ``auto_map`` entry in ``config.json``.
The stub imports peft_bitflip (which registers the bit-flip quantizer) and hands over to the
architecture's own class, so the model loads with its flips on; where peft-bitflip is not
installed it fails with "pip install peft-bitflip" instead of loading a clean model.
"""

from __future__ import annotations

import json
import os

__all__ = ["STUB_FILE", "add_remote_code"]

STUB_FILE = "modeling_peft_bitflip.py"
STUB_CLASS = "BitflipCausalLM"
_STUB = '''"""Loads this bit-flip checkpoint (its config.json's quantization_config has
quant_method "bitflip") with trust_remote_code=True.  Written by
peft_bitflip.remote_code.add_remote_code."""

try:
    import peft_bitflip  # noqa: F401  (registers quant_method "bitflip" with transformers)
except ImportError as e:
    raise ImportError(
        "this checkpoint simulates bit flips with peft-bitflip, which is not installed: "
        "pip install peft-bitflip (without it the model would load without its flips)"
    ) from e

from transformers import {config_class} as _Config
from transformers import {model_class} as _Model


class {stub_class}(_Model):
    """{model_class} with the checkpoint's bit-flip layers (built by peft_bitflip)."""

    config_class = _Config

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _Model.from_pretrained(*args, **kwargs)
'''


def add_remote_code(path: str | os.PathLike) -> str:
    """Write the ``trust_remote_code`` stub into the saved checkpoint folder ``path`` and point
    ``config.json``'s ``auto_map["AutoModelForCausalLM"]`` to it; returns the stub's path.

    ``path`` must hold a ``config.json`` with a bit-flip ``quantization_config`` (what
    ``save_pretrained`` of a flipped model writes) of a causal LM that transformers knows.
    Calling it again rewrites the same files.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json: save the model there first")
    with open(cfg_path, encoding="utf-8") as f:
        data = json.load(f)
    qc = data.get("quantization_config") or {}
    if qc.get("quant_method") != "bitflip":
        raise ValueError(
            f"{cfg_path} carries no bit-flip quantization_config; apply_bitflip (or a "
            "BitflipLoraConfig) before save_pretrained"
        )
    model_type = data.get("model_type")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    config_class = CONFIG_MAPPING_NAMES.get(model_type)
    if not (model_class and config_class and hasattr(transformers, model_class)):
        raise ValueError(
            f"{cfg_path}: model_type {model_type!r} has no causal-LM class in transformers "
            f"{transformers.__version__}"
        )
    stub = os.path.join(path, STUB_FILE)
    with open(stub, "w", encoding="utf-8") as f:
        f.write(
            _STUB.format(config_class=config_class, model_class=model_class, stub_class=STUB_CLASS)
        )
    auto_map = dict(data.get("auto_map") or {})
    auto_map["AutoModelForCausalLM"] = f"{STUB_FILE[:-3]}.{STUB_CLASS}"
    data["auto_map"] = auto_map
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return stub
