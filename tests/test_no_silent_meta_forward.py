"""A forward on the meta device (shape inference, ``accelerate.init_empty_weights``) returns the
clean layer's meta result instead of failing in the flip code (issue 36.7): no flips, the call
counters unchanged, nothing counted."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from tiny_models import VOCAB, tiny_llama
from transformers import LlamaForCausalLM

import peft_bitflip as pb
from peft_bitflip.layers import BitflipConv1D, BitflipLinear, bitflip_layers
from peft_bitflip.stats import FlipStatsRecorder

X_SPEC = pb.FlipSpec(0.1, 0.1, 3.0)
W_SPEC = pb.FlipSpec(0.1, 0.1, 1.0)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


@pytest.mark.parametrize("cls", [BitflipLinear, BitflipConv1D])
@pytest.mark.parametrize("grad", [True, False])
def test_meta_layer_forward_gives_the_clean_meta_result(cls, grad):
    with torch.device("meta"):
        layer = cls(8, 4) if cls is BitflipLinear else cls(4, 8)
    layer.init_bitflip("fc", X_SPEC, W_SPEC)
    counter = layer.bitflip_calls
    with FlipStatsRecorder(layer) as rec, torch.set_grad_enabled(grad):
        for x in (torch.randn(2, 3, 8, device="meta"), torch.randn(2, 3, 8)):  # meta W; both
            y = layer(x)
            assert y.device.type == "meta" and y.shape == (2, 3, 4) and y.dtype == torch.float32
            a, b = torch.empty(2, 8, device="meta"), torch.empty(4, 2, device="meta")
            y = layer.flipped_lora_forward(x, a, b, 2.0)
            assert y.device.type == "meta" and y.shape == (2, 3, 4)
    assert layer.bitflip_calls is counter and int(counter) == 0
    assert rec.read()["all"].elements == 0


def test_meta_input_on_a_real_layer():
    layer = BitflipLinear(8, 4)
    layer.init_bitflip("fc", X_SPEC, W_SPEC)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(5, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (5, 4)
    assert int(layer.bitflip_calls) == 0


def test_init_empty_weights_model_runs_on_meta():
    config = tiny_llama().config
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_exp=0.1, w_p_exp=0.1, x_zero_out_t=3.0))
    assert bitflip_layers(model)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    out = model(ids)
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 5, VOCAB)
    assert all(int(m.bitflip_calls) == 0 for _, m in bitflip_layers(model))
