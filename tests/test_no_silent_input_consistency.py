"""Issues 35.11 / 36.7: one seed range everywhere; numpy scalars accepted; call indexes and loaded
counters range-checked; a stream name that is not valid text gives a named error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

import peft_bitflip as pb

X = torch.linspace(-3, 3, 256)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


@pytest.mark.parametrize("seed", [2**63, 2**70, -1])
def test_seed_out_of_range_is_refused_by_bitflip_like_by_bitflip_config(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        pb.BitflipConfig(seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        pb.bitflip(X, 0.1, seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        pb.stream_key(seed, "a")


def test_numpy_scalars_are_accepted_everywhere(tmp_path):
    ref = pb.bitflip(X, 0.1, 0.05, 2.0, seed=7, stream=3, call=2)
    out = pb.bitflip(
        X, np.float32(0.1), np.float64(0.05), np.float32(2.0), seed=np.int64(7),
        stream=np.int64(3), call=np.int64(2),
    )  # fmt: skip
    assert torch.equal(out, ref)
    cfg = pb.BitflipConfig(
        x_p_exp=np.float32(0.5), w_zero_out_t=np.float64(1.25), seed=np.int64(3),
        layer_name_to_config={"default": {"w_p_frac": np.float32(0.25)}},
    )  # fmt: skip
    assert cfg.seed == 3 and type(cfg.seed) is int and type(cfg.x_p_exp) is float
    assert cfg == pb.BitflipConfig(
        x_p_exp=0.5, w_zero_out_t=1.25, seed=3, layer_name_to_config={"default": {"w_p_frac": 0.25}}
    )
    assert pb.FlipSpec(np.float32(0.5), np.int64(0), np.float32(3.0)).p_exp == 0.5
    lora = pb.BitflipLoraConfig(
        r=4, target_modules=["q_proj"], x_p_exp=np.float32(0.5), bitflip_seed=np.int64(2),
        w_zero_out_t=np.float64(1.0),
    )  # fmt: skip
    assert type(lora.x_p_exp) is float and type(lora.bitflip_seed) is int
    lora.save_pretrained(tmp_path)  # JSON-safe
    assert type(pb.BitflipLoraConfig.from_pretrained(tmp_path).w_zero_out_t) is float


@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_bool_and_str_probabilities_are_still_refused(bad):
    with pytest.raises(TypeError, match="p_exp"):
        pb.FlipSpec(p_exp=bad)


@pytest.mark.parametrize("call", [-1, 2**32, -(2**40)])
def test_call_tensor_out_of_range_is_refused(call):
    with pytest.raises(ValueError, match=rf"call must be .*\[0, 2\*\*32\).*{call}"):
        pb.bitflip(X, 0.1, call=torch.tensor(call))


def test_call_tensor_in_range_equals_the_int():
    by_tensor = pb.bitflip(X, 0.1, zero_out_threshold=100.0, call=torch.tensor(5))
    assert torch.equal(by_tensor, pb.bitflip(X, 0.1, zero_out_threshold=100.0, call=5))


def test_lone_surrogate_stream_name_is_a_named_value_error():
    with pytest.raises(ValueError, match="stream"):
        pb.bitflip(X, 0.1, stream="\ud800")


@pytest.mark.parametrize("value", [-5, 2**32])
def test_loaded_counter_out_of_range_fails_at_load(tmp_path, value):
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=0.01))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    key = "model.layers.0.self_attn.q_proj.bitflip_calls"
    state[key] = torch.tensor(value, dtype=torch.int64)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.self_attn\.q_proj.*{value}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
