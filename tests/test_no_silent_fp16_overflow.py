"""fp16 outputs overflow although zero-out is on (issue 35.7): zero-out caps inputs and weights,
not their products, so the statistics count the non-finite elements of every flipped layer's
output (``read()["y"]``), per layer too (``read_per_layer``)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, token_ids

import peft_bitflip as pb
from peft_bitflip import stats as stats_module
from peft_bitflip.layers import BitflipLinear, bitflip_layers
from peft_bitflip.stats import FlipStatsRecorder, TensorFlipStats, _add_nonfinite

FP16_MAX = 65504.0
K = 4096  # in_features: the zero-out bound K * 30 * 1.25 = 153,600 is beyond fp16's range


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _overflowing_layer():
    """fp16 layer with zero-out 30 / 1.25 whose clean outputs are 48,992 (rows 0-2) and 2,048
    (rows 3-5); mantissa flips of W at p = 0.5 push rows 0-2 past fp16's maximum."""
    layer = BitflipLinear(K, 4, bias=False).half()
    with torch.no_grad():
        layer.weight.fill_(0.5)  # mantissa 0: every flip makes |w| larger, still < 1 < 1.25
    layer.init_bitflip("fc", pb.FlipSpec(0.0, 0.0, 30.0), pb.FlipSpec(0.0, 0.5, 1.25))
    x = torch.full((6, K), 23.92, dtype=torch.float16)  # < 30: kept
    x[3:] = 1.0
    return layer, x


def test_fp16_overflow_under_zero_out_is_counted_in_the_outputs():
    layer, x = _overflowing_layer()
    clean = torch.nn.functional.linear(x, layer.weight).detach()
    assert clean.abs().max() == 48992.0 < FP16_MAX < K * 30.0 * 1.25
    outputs = []
    with FlipStatsRecorder(layer) as rec:
        with torch.no_grad():  # the unfused form
            outputs.append(layer(x))
        outputs.append(layer(x.requires_grad_()).detach())  # the autograd Function
        a = torch.zeros(2, K, dtype=torch.float16)  # the LoRA fast path (B A = 0: W itself)
        b = torch.zeros(4, 2, dtype=torch.float16)
        outputs.append(layer.flipped_lora_forward(x.detach(), a, b, 1.0).detach())
    expected = sum(int((~torch.isfinite(y)).sum()) for y in outputs)
    assert expected > 0 and all(torch.isfinite(y[3:]).all() for y in outputs)
    stats = rec.read()
    assert stats["y"] == TensorFlipStats(elements=3 * x.numel() // K * 4, nonfinite=expected)
    assert stats["y"].nonfinite_rate == expected / stats["y"].elements
    assert stats["w"].zeroed == 0 and stats["x"].zeroed == 0  # zero-out removed nothing
    assert stats["all"] == stats["x"] + stats["w"] and stats["all"].nonfinite == 0


def test_no_output_count_without_a_recorder(monkeypatch):
    def fail(*args):
        raise AssertionError("counted without a recorder")

    monkeypatch.setattr(stats_module, "_add_nonfinite", fail)
    layer, x = _overflowing_layer()
    with torch.no_grad():
        layer(x)
    layer(x.requires_grad_())
    assert layer.bitflip_stats is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_nonfinite_count_matches_torch(needs_interpreter, monkeypatch, dtype):
    y = torch.randn(3, 5000).to(dtype)
    y[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, 0.0]).to(dtype)
    y[2, 4000:4100] = float("nan")
    expected = int((~torch.isfinite(y)).sum())
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    monkeypatch.setattr(torch, "isfinite", None)  # the kernel counts, not the PyTorch ops
    out = torch.zeros(2, dtype=torch.int64)
    _add_nonfinite(out[1:], y)
    _add_nonfinite(out[1:], y.t())  # strided
    assert out.tolist() == [0, 2 * expected] and expected == 103


def test_read_per_layer_by_bitflip_name():
    model = tiny_llama()
    pb.apply_bitflip(
        model,
        pb.BitflipConfig(x_p_exp=0.02, w_p_exp=0.02, x_zero_out_t=3.0, w_zero_out_t=0.5),
    )
    ids = token_ids()
    tokens = ids.numel()
    with FlipStatsRecorder(model) as rec:
        model(ids)
    per_layer = rec.read_per_layer()
    layers = dict((m.bitflip_name, m) for _, m in bitflip_layers(model))
    assert list(per_layer) == list(layers)
    for name, stats in per_layer.items():
        assert set(stats) == {"x", "w", "y", "all"}
        assert stats["x"].elements == tokens * layers[name].in_features
        assert stats["w"].elements == layers[name].weight.numel()
        assert stats["y"] == TensorFlipStats(elements=tokens * layers[name].out_features)
        assert stats["all"] == stats["x"] + stats["w"]
    totals = rec.read(reset=False)  # read_per_layer did not reset either
    for kind in ("x", "w", "y", "all"):
        assert sum((s[kind] for s in per_layer.values()), TensorFlipStats()) == totals[kind]
    assert totals["x"].exp_flips > 0 and totals["x"].zeroed > 0
    assert rec.read_per_layer(reset=True) == per_layer
    assert all(s["all"].elements == 0 for s in rec.read_per_layer().values())
