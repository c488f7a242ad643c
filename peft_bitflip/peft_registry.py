"""Register the ``BITFLIP_LORA`` tuner with PEFT.

PEFT has no public way to add a tuner from outside: ``PeftType`` is a closed enum and
``register_peft_method`` rejects other names.  Its dispatch, though, goes through plain dicts
keyed by ``config.peft_type`` (``peft.mapping``), and a plain string works as a key.  This module
inserts ``"BITFLIP_LORA"`` there, after checking that the dicts exist in the installed PEFT.

Consequences: ``adapter_config.json`` records ``"peft_type": "BITFLIP_LORA"`` and the bit-flip
fields; ``PeftModel.from_pretrained`` restores both once ``peft_bitflip`` is imported; without the
import, PEFT fails loudly (``KeyError: 'BITFLIP_LORA'``) instead of loading a clean LoRA.
"""

from __future__ import annotations

import peft
from packaging.version import Version

MIN_PEFT = Version("0.21.0")


def register() -> None:
    from . import tuner

    if Version(peft.__version__.split("+")[0]) < MIN_PEFT:
        raise ImportError(f"peft_bitflip needs peft >= {MIN_PEFT}, found {peft.__version__}")
    try:
        from peft.mapping import (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
        )
    except ImportError as e:  # pragma: no cover - depends on PEFT internals
        raise ImportError(
            f"peft {peft.__version__} has no PEFT_TYPE_TO_*_MAPPING tables; cannot register "
            "the BITFLIP_LORA tuner"
        ) from e
    PEFT_TYPE_TO_CONFIG_MAPPING[tuner.PEFT_TYPE] = tuner.BitflipLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[tuner.PEFT_TYPE] = tuner.BitflipLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[tuner.PEFT_TYPE] = "lora_"
