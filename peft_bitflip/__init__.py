"""peft_bitflip: simulate random bit flips in the linear layers of language models."""

from .config import BitflipConfig
from .functional import apply_flip_spec, bitflip, stream_key
from .spec import FlipSpec, snap_probability

__version__ = "0.1.0"

__all__ = [
    "BitflipConfig",
    "FlipSpec",
    "apply_flip_spec",
    "bitflip",
    "snap_probability",
    "stream_key",
]
