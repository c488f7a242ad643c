"""Why a result is not finite: one-line reasons for NaN / Inf losses under flips.

A bit-flip run can end in a non-finite loss for three reasons, which this module tells apart
from the model's bit-flip layers (no forward needed):

* exponent flips without zero-out: flipping the top exponent bit of a value near 1.0 makes
  it ~1.7e38 in float32 / bfloat16 (Inf in float16), and the next matmul or softmax gives
  Inf or NaN; a zero-out threshold removes such values;
* float16 products: zero-out caps the inputs and weights of a layer, not its output, and a
  float16 output overflows above 65,504 (see ``docs/statistics.md``);
* none of these: the model is non-finite on its own (check it without flips).
"""

from __future__ import annotations

import torch

from .layers import bitflip_layers

__all__ = ["EXP_WITHOUT_ZERO_OUT", "nonfinite_reason", "unguarded_exponent_flips"]

EXP_WITHOUT_ZERO_OUT = (
    "exponent flips without zero-out produce Inf/NaN; set a zero-out threshold "
    "(x_zero_out_t / w_zero_out_t, or calibrate_zero_out)"
)
FP16_OVERFLOW = (
    "float16 layer outputs overflow (> 65504): zero-out caps inputs and weights, not their "
    "products; evaluate in bfloat16 or float32, or lower the thresholds"
)
NO_FLIPS = "the model gives a non-finite loss without any bit-flip layer; check it clean"
OTHER = "non-finite loss under flips although zero-out is on for every flipped tensor"


def unguarded_exponent_flips(model: torch.nn.Module) -> list[str]:
    """Names of the bit-flip layers (with ``/x`` or ``/w``) whose sign/exponent bits flip
    while that tensor has no zero-out threshold."""
    out = []
    for name, layer in bitflip_layers(model):
        if not layer.bitflip_enabled:
            continue
        for kind, spec in (("x", layer.x_spec), ("w", layer.w_spec)):
            if spec.flips_exponent() and spec.zero_out_threshold is None:
                out.append(f"{name}/{kind}")
    return out


def nonfinite_reason(model: torch.nn.Module) -> str:
    """The most likely reason for a non-finite loss of ``model`` (one line)."""
    layers = [m for _, m in bitflip_layers(model) if m.bitflip_enabled]
    if not layers:
        return NO_FLIPS
    unguarded = unguarded_exponent_flips(model)
    if unguarded:
        n = len({u.rsplit("/", 1)[0] for u in unguarded})
        return f"{EXP_WITHOUT_ZERO_OUT} ({n} of {len(layers)} flipped layers have none)"
    if any(next(m.parameters(recurse=False)).dtype == torch.float16 for m in layers):
        return FP16_OVERFLOW
    return OTHER
