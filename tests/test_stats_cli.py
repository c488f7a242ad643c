"""Bit counting helpers and the ``peft-bitflip demo`` command."""

from __future__ import annotations

import torch

from peft_bitflip.cli import main
from peft_bitflip.stats import binomial_z, count_flips


def test_count_flips_counts_each_group():
    x = torch.zeros(3, dtype=torch.bfloat16)
    # element 0: sign bit + lowest mantissa bit; element 1: exponent LSB; element 2 untouched
    bits = torch.tensor([0x8001, 0x0080, 0x0000], dtype=torch.int32).to(torch.int16)
    y = bits.view(torch.bfloat16)
    c = count_flips(x, y)
    assert (c.exp_bits, c.frac_bits, c.n_exp, c.n_frac, c.n_elements) == (2, 1, 9, 7, 3)


def test_binomial_z():
    assert binomial_z(50, 100, 0.5) == 0.0
    assert binomial_z(60, 100, 0.5) == 2.0
    assert binomial_z(0, 100, 0.0) == 0.0


def test_demo_command_reports_rates(reference_backend, capsys):
    assert main(["demo", "--n", "65536", "--device", "cpu", "--p", "0.01", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "backend: reference" in out
    assert "OK" in out and out.count("\n") >= 4


def test_demo_command_fails_on_wrong_rates(reference_backend, monkeypatch, capsys):
    """The demo's check can fail: with a broken kernel (flip nothing) it reports FAIL."""
    import peft_bitflip

    monkeypatch.setattr(peft_bitflip, "bitflip", lambda x, *a, **k: x.clone())
    assert main(["demo", "--n", "65536", "--device", "cpu", "--p", "0.01"]) == 1
    assert "FAIL" in capsys.readouterr().out
