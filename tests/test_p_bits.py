"""Per-bit-position flip rates (``FlipSpec.p_bits``, ``{x,w}_p_bits``): rates, streams, paths,
config.json, flags and campaign sites.  Statistical checks: binomial, 5 standard deviations."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from bitstats import INT_VIEW, assert_binomial, flipped_bits, per_bit_counts
from peft import get_peft_model
from tiny_models import tiny_llama, token_ids
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
import peft_bitflip.campaign as cp
from peft_bitflip.cli import parse_p_bits, parse_site_bits
from peft_bitflip.evaluation import reset_streams
from peft_bitflip.flipped_linear import flipped_linear_unfused
from peft_bitflip.functional import (
    apply_flip_spec,
    flip_spec_grad,
    flip_spec_grad_,
    flip_specs_masked,
    zero_masked_,
)
from peft_bitflip.layers import BitflipLinear, bitflip_layers
from peft_bitflip.position_flips import flip_classes
from peft_bitflip.spec import BIT_LAYOUTS
from peft_bitflip.stats import FlipStatsRecorder

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY = pb.stream_key(5, "layer", "x")


def _same_bits(a, b):
    view = INT_VIEW[BIT_LAYOUTS[a.dtype].n_bits]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _spec_flips(x, spec, call=0, key=KEY):
    return apply_flip_spec(x, spec, key, call)


# --- rates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2**-12, 0.3])  # the kernel's sparse and dense paths
def test_each_position_flips_at_its_rate(reference_backend, dtype, p):
    """Listed positions (sign, a top exponent bit, a mantissa bit) at p or p/2, unlisted
    mantissa bits at the group rate p/4, unlisted exponent bits (p_exp = 0) never."""
    layout = BIT_LAYOUTS[dtype]
    n = 1 << 17 if p < 0.01 else 1 << 12
    top_exp, low = layout.n_bits - 2, 1
    spec = pb.FlipSpec(0.0, p / 4, p_bits={"sign": p, top_exp: p, low: p / 2})
    x = torch.randn(n, dtype=dtype)
    counts = per_bit_counts(flipped_bits(x, _spec_flips(x, spec)), layout.n_bits)
    for b in range(layout.n_bits):
        rate = {layout.n_bits - 1: p, top_exp: p, low: p / 2}.get(
            b, p / 4 if b < layout.n_frac else 0.0
        )
        if rate == 0:
            assert int(counts[b]) == 0, (dtype, b)
        else:
            assert_binomial(int(counts[b]), n, rate, what=f"{dtype} bit {b}")


def test_two_classes_are_independent(reference_backend):
    """Joint flips of two positions of different classes (and of one class) occur at the
    product of their rates, within 5 sd."""
    n = 1 << 16
    x = torch.zeros(n, dtype=torch.float32)
    spec = pb.FlipSpec(p_bits={3: 0.3, 30: 0.2, 12: 0.3})
    assert len(flip_classes(spec, torch.float32)) == 2
    diff = flipped_bits(x, _spec_flips(x, spec))
    bit = {b: (diff >> b) & 1 for b in (3, 12, 30)}
    for a, b, pa, pb_ in [(3, 30, 0.3, 0.2), (3, 12, 0.3, 0.3), (12, 30, 0.3, 0.2)]:
        assert_binomial(int((bit[a] & bit[b]).sum()), n, pa * pb_, what=f"bits {a} and {b}")


def test_every_position_listed_gives_the_groups_distribution_not_their_bits(reference_backend):
    """p_bits naming every position with p_exp / p_frac: the same per-bit rates and flips per
    element as the groups (within 5 sd), from other streams (other bits)."""
    n, p_exp, p_frac = 1 << 14, 0.05, 0.1
    layout = BIT_LAYOUTS[torch.bfloat16]
    groups = pb.FlipSpec(p_exp, p_frac)
    rates = {b: (p_exp if b >= layout.n_frac else p_frac) for b in range(layout.n_bits)}
    listed = pb.FlipSpec(0.0, 0.0, p_bits=rates)
    x = torch.randn(n, dtype=torch.bfloat16)
    outs = [_spec_flips(x, s) for s in (groups, listed)]
    assert not _same_bits(outs[0], outs[1])
    for y in outs:
        diff = flipped_bits(x, y)
        counts = per_bit_counts(diff, layout.n_bits)
        for b in range(layout.n_bits):
            assert_binomial(int(counts[b]), n, rates[b], what=f"bit {b}")
        ones = torch.stack([(diff >> b) & 1 for b in range(16)]).sum(0)
        # P(no flip in an element) = (1-p_exp)^9 (1-p_frac)^7
        clean = (1 - p_exp) ** 9 * (1 - p_frac) ** 7
        assert_binomial(int((ones == 0).sum()), n, clean, what="elements without a flip")


def test_zero_rates_are_exact(reference_backend):
    """p = 0 entries never flip their position; all zeros and no threshold is the identity."""
    x = torch.randn(4096, dtype=torch.float16)
    spec = pb.FlipSpec(1.0, 1.0, p_bits={"sign": 0.0, 0: 0.0, 11: 0})
    diff = flipped_bits(x, _spec_flips(x, spec))
    assert torch.all(diff == 0xFFFF ^ (1 << 15) ^ 1 ^ (1 << 11))
    nothing = pb.FlipSpec(p_bits={b: 0.0 for b in range(16)})
    assert nothing.is_identity and _spec_flips(x, nothing) is x


def test_pure_function_of_call_and_stream(reference_backend):
    x = torch.randn(2048, dtype=torch.bfloat16)
    spec = pb.FlipSpec(p_bits={"sign": 0.1, 9: 0.05}, zero_out_threshold=4.0)
    a, b = _spec_flips(x, spec, 3), _spec_flips(x, spec, 3)
    assert _same_bits(a, b)
    assert not _same_bits(a, _spec_flips(x, spec, 4))
    assert not _same_bits(a, _spec_flips(x, spec, 3, pb.stream_key(5, "layer", "w")))
    # the functional API is the same function
    y = pb.bitflip(x, zero_out_threshold=4.0, seed=5, stream="s", call=3, p_bits={15: 0.1, 9: 0.05})
    assert _same_bits(y, _spec_flips(x, spec, 3, pb.stream_key(5, "s")))


def test_reference_equals_triton_interpreter(needs_interpreter, monkeypatch):
    x = torch.randn(300, dtype=torch.bfloat16) * 3
    spec = pb.FlipSpec(0.01, 0.0, 2.0, p_bits={"sign": 0.2, 2: 2**-3, 8: 0.2})
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    y_kernel = _spec_flips(x, spec, 7)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    assert _same_bits(y_kernel, _spec_flips(x, spec, 7))


def test_zero_out_after_all_flips_and_straight_through_gradient(reference_backend):
    x = torch.randn(4096, requires_grad=True)
    spec = pb.FlipSpec(p_bits={30: 0.2, "sign": 0.5}, zero_out_threshold=2.0)
    y = _spec_flips(x, spec, 2)
    flips_only = _spec_flips(x.detach(), pb.FlipSpec(p_bits={30: 0.2, "sign": 0.5}), 2)
    zeroed = ~(flips_only.abs() < 2.0)
    assert zeroed.any() and torch.equal(y.detach(), torch.where(zeroed, 0.0, flips_only))
    y.backward(torch.arange(4096.0))
    assert torch.equal(x.grad, torch.where(zeroed, 0.0, torch.arange(4096.0)))


def test_masked_and_gradient_entry_points_agree_with_autograd(reference_backend):
    """The non-differentiable entry points the fused layers use give, for a p_bits spec, the
    flipped tensor and zero mask of apply_flip_spec and its autograd gradient."""
    x = torch.randn(999, dtype=torch.bfloat16) * 2
    spec = pb.FlipSpec(p_bits={"sign": 0.3, 13: 0.1}, p_frac=0.01, zero_out_threshold=3.0)
    xr = x.clone().requires_grad_()
    y = apply_flip_spec(xr, spec, KEY, 3)
    y.backward(torch.ones_like(y))
    assert (y == 0).any() and (xr.grad == 0).any()
    w = torch.randn(50, dtype=torch.bfloat16)
    following = torch.empty((), dtype=torch.int64)
    xf, wf, mask = flip_specs_masked(x, w, spec, pb.FlipSpec(), KEY, KEY, 3, True, following)
    assert _same_bits(xf, y) and wf is w and int(following) == 4
    assert torch.equal(zero_masked_(torch.ones_like(x), mask, x.dtype), xr.grad)
    assert torch.equal(flip_spec_grad(torch.ones_like(x), x, spec, KEY, 3), xr.grad)
    grad = torch.ones_like(x)
    assert _same_bits(flip_spec_grad_(grad, x, spec, KEY, 3, want_flipped=True), y)
    assert torch.equal(grad, xr.grad)


def test_exponent_exposure_ignores_the_sign_and_mantissa():
    assert not pb.FlipSpec(p_bits={"sign": 0.1, 3: 0.1}).flips_exponent()
    assert pb.FlipSpec(p_bits={"sign": 0.1, 14: 0.1}).flips_exponent()
    assert not pb.FlipSpec(p_bits={20: 0.1}).flips_exponent(torch.float32)  # fp32 mantissa
    assert pb.FlipSpec(p_exp=0.1, p_bits={"sign": 0.0}).flips_exponent(torch.float16)
    assert not pb.FlipSpec(p_exp=0.1, p_bits={b: 0.0 for b in range(10, 15)}).flips_exponent(
        torch.float16
    )


def test_bad_p_bits_name_the_value():
    with pytest.raises(ValueError, match="'top'"):
        pb.FlipSpec(p_bits={"top": 0.1})
    with pytest.raises(ValueError, match=r"p_bits\[3\].*1.5"):
        pb.FlipSpec(p_bits={3: 1.5})
    with pytest.raises(ValueError, match="-1"):
        pb.FlipSpec(p_bits={-1: 0.1})
    with pytest.raises(TypeError, match="p_bits"):
        pb.FlipSpec(p_bits=0.1)
    spec = pb.FlipSpec(p_bits={20: 0.1})
    spec.bit_rates(torch.float32)  # fine for float32
    with pytest.raises(ValueError, match="position 20 but torch.bfloat16 has 16 bits"):
        _spec_flips(torch.ones(4, dtype=torch.bfloat16), spec)
    with pytest.raises(ValueError, match="bit 15 .* twice"):
        pb.FlipSpec(p_bits={"sign": 0.1, 15: 0.2}).bit_rates(torch.float16)


# --- layers --------------------------------------------------------------------------------------


def _layer(x_spec, w_spec):
    torch.manual_seed(0)
    layer = BitflipLinear(24, 16)
    layer.init_bitflip("lin", x_spec, w_spec, seed=4)
    return layer


X_SPEC = pb.FlipSpec(p_exp=0.002, p_bits={"sign": 0.1, 2: 0.3}, zero_out_threshold=2.0)
W_SPEC = pb.FlipSpec(p_frac=0.01, p_bits={29: 0.02}, zero_out_threshold=0.3)


def test_layer_forward_backward_equal_the_flip_ops(reference_backend):
    layer = _layer(X_SPEC, W_SPEC)
    x = torch.randn(5, 24, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    # the same through the unfused ops at call 0, written out by hand
    x2, w2 = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    (kx, kw) = layer.stream_keys()
    ref = flipped_linear_unfused(x2, w2, layer.bias.detach(), X_SPEC, W_SPEC, kx, kw, 0)
    ref.backward(torch.ones_like(ref))
    assert torch.equal(out, ref) and int(layer.bitflip_calls) == 1
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, w2.grad)
    xf = apply_flip_spec(x.detach(), X_SPEC, kx, 0)
    assert (xf == 0).any() and torch.all(x.grad[xf == 0] == 0)


def test_stats_count_the_realised_flips_at_listed_positions(reference_backend):
    layer = _layer(pb.FlipSpec(p_bits={"sign": 0.2, 1: 0.3}, zero_out_threshold=1.0), pb.FlipSpec())
    x = torch.randn(64, 24)
    with FlipStatsRecorder(layer) as rec:
        with torch.no_grad():
            layer(x)
    counts = rec.read()["x"]
    flipped = apply_flip_spec(x, pb.FlipSpec(p_bits={"sign": 0.2, 1: 0.3}), layer.stream_keys()[0])
    diff = flipped_bits(x, flipped)
    assert counts.exp_flips == int(((diff >> 31) & 1).sum()) > 0
    assert counts.frac_flips == int(((diff >> 1) & 1).sum()) > 0
    assert int((diff & ~((1 << 31) | 2)).sum()) == 0  # nothing else flipped
    assert counts.zeroed == int((~(flipped.abs() < 1.0)).sum())


def _assert_like_eager(run):
    """``run(layer, x)`` at call 0 gives the eager layer's output, gradients and counter."""
    layer = _layer(X_SPEC, W_SPEC)
    x = torch.randn(5, 24, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    layer.bitflip_calls.zero_()
    out2 = run(layer, x)
    out2.sum().backward()
    assert int(layer.bitflip_calls) == 1 and torch.equal(out, out2)
    assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], layer.weight.grad)


def test_activation_checkpointing_repeats_the_flips(reference_backend):
    _assert_like_eager(lambda m, x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False))


def test_torch_compile_gives_the_eager_result(reference_backend):
    """Under torch.compile the p_bits flips run eagerly (a graph break)."""
    # aot_eager: dynamo and autograd, no code generation (seconds)
    _assert_like_eager(lambda m, x: torch.compile(m, backend="aot_eager")(x))


def test_lora_layer_and_its_merge_agree(reference_backend):
    lora = pb.BitflipLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], seed=2,
        x_p_bits={"sign": 0.01, 30: 1e-3}, w_p_bits={22: 0.05}, x_zero_out_t=8.0,
        w_zero_out_t=1.0,
    )  # fmt: skip
    model = get_peft_model(tiny_llama(), lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = token_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.get_base_layer().x_spec.p_bits == ((30, 1e-3), ("sign", 0.01))
    before = {m.bitflip_name: int(m.bitflip_calls) for _, m in bitflip_layers(model)}
    with torch.no_grad():
        adapter = model(ids).logits
    merged = model.merge_and_unload()
    for _, m in bitflip_layers(merged):
        m.bitflip_calls.fill_(before[m.bitflip_name])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter, atol=1e-5)


# --- config.json and flags -----------------------------------------------------------------------


def test_config_round_trip_through_auto_model(tmp_path, reference_backend):
    cfg = pb.BitflipConfig(
        x_p_bits={"sign": 1e-3, 30: 0.01}, w_p_bits={"3": 0.2}, w_zero_out_t=1.0,
        x_zero_out_t=10.0, seed=7,
        layer_name_to_config={r".*\.mlp\..*": {"w_p_bits": {"sign": 0.5}}, "default": {}},
    )  # fmt: skip
    model = tiny_llama()
    pb.apply_bitflip(model, cfg)
    mlp = dict(bitflip_layers(model))["model.layers.0.mlp.up_proj"]
    assert mlp.w_spec.p_bits == (("sign", 0.5),) and mlp.x_spec.p_bits == (
        (30, 0.01),
        ("sign", 1e-3),
    )
    ids = token_ids()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["x_p_bits"] == {"30": 0.01, "sign": 1e-3} and saved["w_p_bits"] == {"3": 0.2}
    assert "x_p_bits" not in pb.BitflipConfig().to_dict()  # unset: not written
    expected = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config == cfg
    assert torch.equal(reloaded(ids).logits, expected)
    lora = pb.BitflipLoraConfig.from_bitflip_config(cfg, r=2)
    assert lora.bitflip_config() == cfg and lora.x_p_bits == {"30": 0.01, "sign": 1e-3}


def test_p_bits_flag_parses_and_names_bad_values():
    assert parse_p_bits("15=1e-3, sign=2^-10") == {"15": 1e-3, "sign": 2**-10}
    assert parse_p_bits("none") is None
    assert parse_site_bits("bit:3-5") == "bit:3-5"
    with pytest.raises(argparse.ArgumentTypeError, match="'bit:x'"):
        parse_site_bits("bit:x")
    for bad, named in [("15", "'15'"), ("top=0.1", "'top'"), ("3=2", "'3=2'"), ("3=.1,3=.2", "3")]:
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            parse_p_bits(bad)


def test_recipe_and_cli_flags_set_p_bits(tmp_path):
    pytest.importorskip("datasets")  # the recipes' extra
    from peft_bitflip.cli import build_parser, flips_from_args
    from recipes import common, finetune_lora
    from recipes.arguments import BitflipArguments

    parser = finetune_lora.build_parser()
    args = common.parse_args(
        parser, ["--w_p_bits", "sign=0.5,3=2^-4"], script="finetune_lora.py", output_name="t"
    )
    flips, _, _ = common.bitflip_settings(args)
    assert flips.w_p_bits == {"3": 2**-4, "sign": 0.5} and flips.w_p_exp == 2**-16
    with pytest.raises(ValueError, match="--x_p_bits 'sign=x'"):
        BitflipArguments(x_p_bits="sign=x").flip_values()
    args = build_parser().parse_args(["eval", "m", "--x_p_bits", "15=1e-3,sign=1e-4"])
    cfg = flips_from_args(args)
    assert cfg.x_p_bits == {"15": 1e-3, "sign": 1e-4} and cfg.x_p_exp == 2**-16


# --- campaign ------------------------------------------------------------------------------------


def test_campaign_sign_and_bit_sites_count_their_flips(reference_backend):
    model = tiny_llama(0)
    ids = token_ids(4, 16, seed=1)
    name = "model.layers.0.mlp.gate_proj"
    groups = cp.module_groups(model, "regex", {"g": name.replace(".", r"\.")})
    sites = cp.sites_for(groups, tensors=["x", "w"], bits=["sign", "bit:29-30"])
    r = cp.campaign(model, ids, sites, p=0.5, seeds=[0], batch_size=2, progress=False)
    rows = {(row["tensor"], row["bits"]): row for row in r.rows}
    x_elems, w_elems = 4 * 16 * 32, 64 * 32  # gate_proj: in 32, out 64
    expected = {
        ("x", "sign"): x_elems, ("x", "bit:29-30"): 2 * x_elems,
        ("w", "sign"): 2 * w_elems, ("w", "bit:29-30"): 2 * 2 * w_elems,  # w: once per batch
    }  # fmt: skip
    for key, trials in expected.items():
        row = rows[key]
        assert row["trials"] == trials, key
        assert_binomial(row["flips"], trials, 0.5, what=str(key))
    assert rows[("x", "sign")]["delta_loss"] != 0.0
    with pytest.raises(ValueError, match="'bit:3-1'"):
        cp.Site("g", (name,), "x", "bit:3-1")
    # the sign site replays as its BitflipConfig (the rule carries x_p_bits)
    cfg = cp.site_config(sites[0], 0.5, seed=0)
    assert list(cfg.layer_name_to_config.values())[0]["x_p_bits"] == {"sign": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sign flips alone need no zero-out: no warning
        pb.apply_bitflip(model, cfg)
    reset_streams(model)
    units = [u for u in r.units if u.site == sites[0].name]
    with torch.no_grad():
        for u, batch in zip(units, [ids[:2], ids[2:]]):
            loss, _, finite = cp._token_results(model, batch)
            assert finite and float(loss.sum(dtype=torch.float64)) == u.loss_sum
