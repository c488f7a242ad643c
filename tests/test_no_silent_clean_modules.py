"""Issue 35.9: every linear-like module that ``apply_bitflip`` leaves clean is reported, by name,
with the reason (nn.Linear subclasses such as nn.MultiheadAttention's out_proj included)."""

from __future__ import annotations

import pytest
from torch import nn

import peft_bitflip as pb


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


class _MyLinear(nn.Linear):
    """A subclass whose forward may not be nn.Linear's."""


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.fc = nn.Linear(16, 16)
        self.custom = _MyLinear(16, 16)
        self.lm_head = nn.Linear(16, 8)


def test_linear_subclasses_left_clean_are_reported_with_reasons():
    model = _Net()
    summary = pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=0.01))
    assert list(summary.flipped) == ["fc"]
    text = str(summary)
    assert "bit flips on 1 modules, 4 left clean" in text
    assert "attn.out_proj" in text and "custom" in text
    # nn.MultiheadAttention multiplies by its own in_proj_weight: a weight-bearing module too
    assert set(summary.clean) == {"attn", "attn.out_proj", "custom", "lm_head"}
    assert "in_proj_weight" in summary.clean["attn"]
    # weights (not biases): fc 16x16 flipped of fc, custom, lm_head, attn in_proj and out_proj
    assert summary.flipped_parameters == 256
    assert summary.matmul_parameters == 256 + 256 + 128 + 3 * 256 + 256
    assert "MultiheadAttention" in summary.clean["attn.out_proj"]
    assert "out_proj.forward" in summary.clean["attn.out_proj"]
    assert "_MyLinear" in summary.clean["custom"] and "subclass" in summary.clean["custom"]
    assert "skip_modules" in summary.clean["lm_head"]
    assert summary.skipped == ["lm_head"]
    for name, reason in summary.clean.items():  # each name on a line with its reason
        assert any(name in li and reason in li for li in text.splitlines()), (name, text)


def test_rule_reasons_name_the_rule():
    model = _Net()
    cfg = pb.BitflipConfig(layer_name_to_config={"fc": None}, skip_modules=[])
    summary = pb.apply_bitflip(model, cfg)
    assert not summary.flipped
    assert "'fc'" in summary.clean["fc"] and "None" in summary.clean["fc"]
    assert "no layer_name_to_config rule" in summary.clean["lm_head"]
