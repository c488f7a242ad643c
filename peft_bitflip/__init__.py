"""peft_bitflip: simulate random bit flips in the linear layers of language models."""

from .callback import BitflipCallback, FlipSchedule, add_bitflip_callback
from .config import BitflipConfig
from .functional import apply_flip_spec, bitflip, stream_key
from .hf_quantizer import BitflipHfQuantizer, load_config_with
from .hf_quantizer import register as _register_transformers
from .layers import BitflipConv1D, BitflipLinear, disable_bitflips, recompute_flipped_inputs
from .peft_registry import register as _register_peft
from .spec import FlipSpec, snap_probability
from .stats import FlipStatsRecorder, TensorFlipStats
from .training_faults import TrainingFaultCallback, TrainingFaults, add_training_fault_callback
from .transform import BitflipSummary, apply_bitflip, remove_bitflip
from .tuner import BitflipLoraConfig, BitflipLoraModel

_register_peft()
_register_transformers()

__version__ = "0.1.0"

__all__ = [
    "BitflipCallback",
    "FlipSchedule",
    "FlipStatsRecorder",
    "TensorFlipStats",
    "TrainingFaultCallback",
    "TrainingFaults",
    "add_bitflip_callback",
    "add_training_fault_callback",
    "BitflipConfig",
    "BitflipConv1D",
    "BitflipHfQuantizer",
    "BitflipLinear",
    "BitflipLoraConfig",
    "BitflipLoraModel",
    "BitflipSummary",
    "FlipSpec",
    "apply_bitflip",
    "apply_flip_spec",
    "bitflip",
    "disable_bitflips",
    "load_config_with",
    "recompute_flipped_inputs",
    "remove_bitflip",
    "snap_probability",
    "stream_key",
]
