"""Issue 35.6: exponent flips without a zero-out threshold warn (once per situation)."""

from __future__ import annotations

import warnings

import pytest
from peft import get_peft_model
from tiny_models import tiny_llama

import peft_bitflip as pb
from peft_bitflip import transform

MATCH = r"exponent flips without zero-out produce Inf/NaN.*x_zero_out_t / w_zero_out_t"


@pytest.fixture(autouse=True)
def _fresh(reference_backend, monkeypatch):
    monkeypatch.setattr(transform, "_WARNED_NO_ZERO_OUT", set(), raising=False)


def _no_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    assert not [w for w in caught if "zero-out" in str(w.message)], [str(w.message) for w in caught]


def test_exponent_flips_without_threshold_warn_once():
    with pytest.warns(UserWarning, match=MATCH) as record:
        pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(x_p_exp=0.01, w_p_exp=0.01))
    text = str(next(w.message for w in record if "zero-out" in str(w.message)))
    assert "x (layer inputs) and w (weights)" in text and "1e38" in text
    _no_warning(lambda: pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(x_p_exp=0.02, w_p_exp=0.1)))
    # another situation (only w lacks a threshold) warns again, once
    with pytest.warns(UserWarning, match=MATCH):
        cfg = pb.BitflipConfig(x_p_exp=0.01, x_zero_out_t=30, w_p_exp=0.01)
        pb.apply_bitflip(tiny_llama(), cfg)


def test_get_peft_model_warns_too():
    cfg = pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], w_p_exp=0.01)
    with pytest.warns(UserWarning, match=MATCH):
        get_peft_model(tiny_llama(), cfg)


def test_thresholds_or_mantissa_flips_only_do_not_warn():
    flips = dict(x_p_exp=0.01, w_p_exp=0.01, x_zero_out_t=30.0, w_zero_out_t=1.25)
    _no_warning(lambda: pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(**flips)))
    mantissa = pb.BitflipConfig(x_p_frac=0.1, w_p_frac=0.1)
    _no_warning(lambda: pb.apply_bitflip(tiny_llama(), mantissa))
    rules = {"default": {"x_zero_out_t": 30.0, "w_zero_out_t": 1.25}}
    cfg = pb.BitflipConfig(x_p_exp=0.01, w_p_exp=0.01, layer_name_to_config=rules)
    _no_warning(lambda: pb.apply_bitflip(tiny_llama(), cfg))


def test_stuck_exponent_bits_without_threshold_warn_too():
    with pytest.warns(UserWarning, match=MATCH) as record:
        pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(w_stuck_p_exp=1e-3))
    text = str(next(w.message for w in record if "zero-out" in str(w.message)))
    assert "w (weights)" in text and "x (layer inputs)" not in text
    _no_warning(lambda: pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(w_stuck_p_frac=1e-3)))


def test_stuck_at_on_moe_experts_acts_and_warns_without_zero_out():
    """Stuck exponent bits on MoE experts change their output (once refused, never silently
    ignored) and, without a weight zero-out, warn as they do on linear layers."""
    import torch
    from tiny_models import tiny_mixtral, token_ids

    ids = token_ids()
    with torch.no_grad():
        clean = tiny_mixtral()(ids).logits
    model = tiny_mixtral()
    with pytest.warns(UserWarning, match=MATCH) as record:
        pb.apply_bitflip(model, pb.BitflipConfig(w_stuck_p_exp=1e-2))
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(m.bitflip_stuck is not None for m in experts)
    stuck = [m for m in model.modules() if getattr(m, "bitflip_stuck", None) is not None]
    text = str(next(w.message for w in record if "zero-out" in str(w.message)))
    assert f"of {len(stuck)} module(s)" in text  # the experts modules counted too
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, clean)
