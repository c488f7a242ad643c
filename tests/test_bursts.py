"""Burst faults (issue 33.2): kernel == reference, event rate, lengths, starts, independence,
identity at rate 0, purity, config.json round trip, layers, LoRA merge, statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bitstats import INT_VIEW, as_unsigned, assert_binomial
from peft import get_peft_model
from tiny_models import tiny_llama, token_ids
from torch import nn
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
from peft_bitflip.bursts import Bursts, BurstSpec, apply_burst_spec, burst
from peft_bitflip.functional import stream_key
from peft_bitflip.kernels.burst_reference import burst_reference
from peft_bitflip.kernels.burst_sampling import burst_shape, burst_table, field_bits
from peft_bitflip.spec import check_dtype

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _diff(x, y) -> torch.Tensor:
    """int64 XOR of the bit patterns of x and y (per element)."""
    return as_unsigned(x) ^ as_unsigned(y)


def _runs(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, lowest bit) of each nonzero diff, checking it is one run of adjacent bits."""
    low = torch.log2((diff & -diff).double()).round().long()
    run = diff >> low
    length = torch.log2((run + 1).double()).round().long()
    assert torch.equal((1 << length) - 1, run), "a burst is not one run of adjacent bits"
    return length, low


def _same_bits(a, b) -> bool:
    view = INT_VIEW[check_dtype(a.dtype).n_bits]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = [
    (0.05, 2, "any"),
    (0.3, {2: 0.5, 3: 0.25, 5: 0.25}, "exp"),
    (1.0, {3: 0.5, 6: 0.5}, "frac"),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference(dtype, needs_interpreter, monkeypatch):
    """The Triton kernel (through its interpreter) and the CPU reference, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(999).to(dtype)  # not a whole number of groups
    key = stream_key(3, "layer", "x_burst", 0)
    for rate, length, field in CASES:
        spec = BurstSpec(rate, length, field)
        got = {}
        for backend in ("triton", "reference"):
            monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
            got[backend] = apply_burst_spec(x, spec, key, 7, zero_out_threshold=2.0)
        assert _same_bits(got["triton"], got["reference"]), (dtype, rate, length, field)
        assert not _same_bits(got["reference"], x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rate", [0.01, 0.4])
def test_event_rate_within_5_sigma(dtype, rate):
    x = torch.randn(1 << 15).to(dtype)
    y = burst(x, rate, {2: 0.5, 4: 0.5}, seed=1, stream="s", call=3)
    events = int((_diff(x, y) != 0).sum())
    assert_binomial(events, x.numel(), rate, what=f"{dtype} events at {rate}")


@pytest.mark.parametrize("field", ["any", "exp", "frac"])
def test_length_histogram_and_uniform_start(field):
    """Per length k: its share of the events within 5 sd, and each start position within 5 sd
    of 1 / (positions where k bits fit in the field); no burst leaves its field."""
    dtype = torch.float32
    lengths = {2: 0.5, 3: 0.3, 7: 0.2}
    x = torch.zeros(1 << 16, dtype=dtype)  # every event changes a zero element
    y = burst(x, 0.5, lengths, field, seed=2, call=0)
    diff = _diff(x, y)
    length, low = _runs(diff[diff != 0])
    n = length.numel()
    assert_binomial(n, x.numel(), 0.5, what="events")
    shift, width = field_bits(field, dtype)
    assert (low >= shift).all() and (low + length <= shift + width).all()
    assert set(length.tolist()) == set(lengths)
    for k, p in lengths.items():
        starts = low[length == k] - shift
        assert_binomial(starts.numel(), n, p, what=f"length {k}")
        positions = width - k + 1
        counts = torch.bincount(starts, minlength=positions)
        assert counts.numel() == positions
        for s, c in enumerate(counts.tolist()):
            assert_binomial(c, starts.numel(), 1 / positions, what=f"k={k} start {s}")


def test_events_independent_of_neighbours_and_of_the_flip_streams():
    """Neighbouring elements: pairs with two events within 5 sd of (n-1) q^2 (variance of the
    overlapping pairs' sum included); the burst and flip streams of a layer's tensor: elements
    with both within 5 sd of n q f."""
    n, q = 1 << 16, 0.3
    zeros = torch.zeros(n, dtype=torch.bfloat16)
    bursts = Bursts("layer", 5, BurstSpec(q, 3), BurstSpec())
    call = torch.tensor(2)
    events = _diff(zeros, bursts.burst("x", zeros, call)) != 0
    pairs = int((events[1:] & events[:-1]).sum())
    var = (n - 1) * q**2 * (1 - q**2) + 2 * (n - 2) * (q**3 - q**4)
    assert abs(pairs - (n - 1) * q**2) <= 5 * math.sqrt(var), pairs
    p = 0.02
    flip_key = stream_key(5, "layer", "x", 0)  # what the layer's x flips use
    flipped = pb.functional.apply_flip_spec(zeros, pb.FlipSpec(p, p), flip_key, call)
    hit = _diff(zeros, flipped) != 0
    f = 1 - (1 - p) ** 16
    assert_binomial(int(hit.sum()), n, f, what="flipped elements")
    assert_binomial(int((hit & events).sum()), n, q * f, what="elements with both")


def test_rate_zero_is_exact_identity():
    x = torch.randn(300).bfloat16()
    key = stream_key(0, "a")
    assert apply_burst_spec(x, BurstSpec(0.0, 5), key, 4) is x
    table = burst_table(0.0, ((2, 1.0),), x.dtype, "cpu")
    assert _same_bits(
        burst_reference(x, table, burst_shape(((2, 1.0),), "any", x.dtype), 4, 1, 2), x
    )
    flips = pb.BitflipConfig(x_p_exp=0.01, w_p_frac=0.02, w_zero_out_t=2.0, x_zero_out_t=30.0)
    zero_bursts = pb.BitflipConfig.from_dict(flips.to_dict(), x_burst_rate=0.0, burst_length=7)
    logits = []
    for cfg in (flips, zero_bursts):
        model = tiny_llama()
        pb.apply_bitflip(model, cfg)
        assert all(m.bitflip_bursts is None for _, m in pb.layers.bitflip_layers(model))
        logits.append(_logits(model, token_ids()))
    assert torch.equal(*logits)


def test_pure_function_of_values_settings_seed_stream_call():
    x = torch.randn(64, 48)
    args = dict(rate=0.2, length={2: 0.5, 9: 0.5}, field="any")
    a = burst(x, **args, seed=4, stream="s", call=1)
    assert _same_bits(a, burst(x.t().contiguous().t(), **args, seed=4, stream="s", call=1))
    assert _same_bits(a, burst(x, **args, seed=4, stream="s", call=torch.tensor(1)))
    for other in (dict(seed=5, stream="s", call=1), dict(seed=4, stream="t", call=1),
                  dict(seed=4, stream="s", call=2)):  # fmt: skip
        assert not _same_bits(a, burst(x, **args, **other)), other


def test_layer_applies_bursts_before_flips_and_zero_out_with_ste_gradient():
    torch.manual_seed(0)
    layer = nn.ModuleDict({"l": nn.Linear(24, 16)})
    cfg = pb.BitflipConfig(
        x_burst_rate=0.1, w_burst_rate=0.1, burst_length=4, w_zero_out_t=1.0, x_zero_out_t=2.0
    )
    pb.apply_bitflip(layer, cfg)
    lin = layer["l"]
    x = torch.randn(5, 24, requires_grad=True)
    lin(x).square().sum().backward()
    call = torch.tensor(0)
    xb = lin.bitflip_bursts.burst("x", x.detach(), call)
    wb = lin.bitflip_bursts.burst("w", lin.weight.detach(), call)
    assert not torch.equal(xb, x) and not torch.equal(wb, lin.weight)
    x_keep, w_keep = xb.abs() < 2.0, wb.abs() < 1.0
    assert not w_keep.all()
    xs = torch.where(x_keep, xb, 0).requires_grad_()
    ws = torch.where(w_keep, wb, 0).requires_grad_()
    out = F.linear(xs, ws, lin.bias.detach())
    assert torch.equal(lin.bitflip_calls, torch.tensor(1))
    out.square().sum().backward()
    assert torch.allclose(lin.weight.grad, torch.where(w_keep, ws.grad, 0))
    assert torch.allclose(x.grad, torch.where(x_keep, xs.grad, 0))


def test_a_zero_out_only_spec_runs_in_the_burst_pass(monkeypatch):
    """Without gradients, a tensor with bursts and a zero-out but no transient flips is zeroed
    by the burst pass itself (one pass over it, not two): the same values and counter as the
    two-pass path, which the layer keeps while a recorder counts and under autograd (where the
    flip kernel's backward keeps the zero mask); eager and compiled."""
    import peft_bitflip.bursts as bursts_mod

    thresholds = []
    real = bursts_mod.apply_burst_spec

    def spy(x, spec, key, call=0, zero_out_threshold=None):
        thresholds.append(zero_out_threshold)
        return real(x, spec, key, call, zero_out_threshold)

    monkeypatch.setattr(bursts_mod, "apply_burst_spec", spy)
    cfg = pb.BitflipConfig(
        x_burst_rate=0.2, w_burst_rate=0.2, burst_length=4, w_zero_out_t=1.0, x_zero_out_t=2.0
    )
    results = {}
    for mode in ("one pass", "recorded", "with grad", "compiled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 16))
        pb.apply_bitflip(model, cfg)
        x = torch.randn(5, 24)
        thresholds.clear()
        with torch.set_grad_enabled(mode == "with grad"):
            if mode == "recorded":
                with pb.FlipStatsRecorder(model):
                    out = model(x)
            elif mode == "compiled":
                torch._dynamo.reset()
                try:
                    out = torch.compile(model, backend="aot_eager")(x)
                finally:
                    torch._dynamo.reset()
            else:
                out = model(x)
        if mode in ("one pass", "compiled"):
            assert thresholds == [2.0, 1.0]  # x, then W in the burst pass
        else:
            assert thresholds == [None, None]  # the flip kernel zeroes
        results[mode] = (out.detach(), model[0].bitflip_calls)
    want = results["recorded"]
    w_bursts = model[0].bitflip_bursts.burst("w", model[0].weight.detach(), torch.tensor(0))
    assert (w_bursts.abs() >= 1.0).any()  # the zero-out acts on W
    for mode in ("one pass", "with grad", "compiled"):
        for got, ref in zip(results[mode], want):
            assert torch.equal(got, ref), mode


def test_save_reload_keeps_bursts(tmp_path):
    cfg = pb.BitflipConfig(
        x_burst_rate=0.01,
        w_burst_rate=0.02,
        burst_length={2: 0.5, 4: 0.5},
        burst_field="frac",
        layer_name_to_config={".*down_proj": {"w_burst_rate": 0.1}, "default": {}},
        w_zero_out_t=10.0,
        x_zero_out_t=100.0,
    )
    ids = token_ids()
    model = tiny_llama()
    pb.apply_bitflip(model, cfg)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config == cfg
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    down = loaded.get_submodule("model.layers.0.mlp.down_proj").bitflip_bursts
    assert down.w.rate == 0.1 and down.w.lengths == ((2, 0.5), (4, 0.5))
    assert not any("burst" in k for k in pb.BitflipConfig(w_p_exp=0.1).to_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x_burst_rate=1.5), "x_burst_rate"),
        (dict(layer_name_to_config={"a": {"w_burst_rate": -1}}), "w_burst_rate"),
        (dict(burst_length=1), "burst_length must be an int in"),
        (dict(burst_length=33), "burst_length must be an int in"),
        (dict(burst_length={2: 0.5}), "sum to 1"),
        (dict(burst_length={2: 0.5, "x": 0.5}), "burst_length key 'x'"),
        (dict(burst_length={}), "at least one"),
        (dict(burst_field="sign"), "burst_field must be one of"),
    ],
)
def test_bad_settings_raise_named_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pb.BitflipConfig(**kwargs)


def test_burst_longer_than_its_field_is_refused_naming_it():
    model = tiny_llama().to(torch.bfloat16)
    cfg = pb.BitflipConfig(w_burst_rate=0.1, burst_length=10, burst_field="exp", w_zero_out_t=9.0)
    pb.apply_bitflip(model, cfg)
    with pytest.raises(ValueError, match="burst_length up to 10 bits.*'exp' field.*9 bits"):
        model(token_ids())


def test_lora_merge_keeps_bursts_and_other_settings_are_refused():
    cfg = pb.BitflipLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        w_burst_rate=0.05,
        x_burst_rate=0.01,
        burst_length={2: 0.5, 3: 0.5},
        w_zero_out_t=100.0,
        x_zero_out_t=100.0,
    )
    ids = token_ids()
    model = get_peft_model(tiny_llama(), cfg)
    assert model.peft_config["default"].bitflip_config().burst_length == {2: 0.5, 3: 0.5}
    with pb.disable_bitflips(model):
        clean = _logits(model, ids)
    before = _logits(model, ids)
    assert not torch.equal(before, clean)
    merged = model.merge_and_unload()
    for _, m in pb.layers.bitflip_layers(merged):
        m.bitflip_calls.zero_()  # the call of `before`
    assert torch.equal(_logits(merged, ids), before)
    other = tiny_llama()
    pb.apply_bitflip(other, pb.BitflipConfig(w_burst_rate=0.01, w_zero_out_t=10.0))
    with pytest.raises(ValueError, match="bursts"):
        get_peft_model(
            other, pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], w_zero_out_t=10.0)
        )


def test_recorder_counts_burst_events():
    model = tiny_llama()
    cfg = pb.BitflipConfig(
        x_burst_rate=0.02, w_burst_rate=0.05, burst_length=3, x_zero_out_t=1e3, w_zero_out_t=1e3
    )
    pb.apply_bitflip(model, cfg)
    with pb.FlipStatsRecorder(model) as rec:
        model(token_ids())
        stats = rec.read()
    for kind, rate in (("x", 0.02), ("w", 0.05)):
        s = stats[kind]
        assert s.burst_elements == s.elements > 0
        assert_binomial(s.burst_events, s.burst_elements, rate, what=f"{kind} events")
        assert s.burst_bits == 3 * s.burst_events
    from peft_bitflip.callback import stats_to_logs

    logs = stats_to_logs(stats)
    assert logs["bitflip/burst_events"] == stats["all"].burst_events
    assert "bitflip/burst_events" not in stats_to_logs(pb.FlipStatsRecorder(model).read())


def test_compiled_layer_gives_the_eager_result():
    """Under torch.compile the burst op is the custom op peft_bitflip::burst: same values.
    x and W have burst and flip tables of their own, both constants of the one graph (two
    different tables from one function failed in AOTAutograd before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    cfg = pb.BitflipConfig(
        x_burst_rate=0.05, w_burst_rate=0.1, x_p_frac=0.02, w_p_frac=0.01,
        x_zero_out_t=40.0, w_zero_out_t=4.0,
    )  # fmt: skip
    pb.apply_bitflip(model, cfg)
    x = torch.randn(4, 32)
    eager = torch.stack([model(x) for _ in range(2)])
    model[0].bitflip_calls.zero_()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        assert torch.equal(torch.stack([compiled(x) for _ in range(2)]), eager)
    finally:
        torch._dynamo.reset()


def test_cli_and_recipe_flags_set_the_burst_fields():
    import argparse

    from peft_bitflip.cli import build_parser, flips_from_args, parse_burst_length
    from recipes.arguments import BitflipArguments

    assert parse_burst_length("3") == 3
    assert parse_burst_length("2:0.25,5:0.75") == {2: 0.25, 5: 0.75}
    for bad in ("1", "2:0.5", "a:1"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            parse_burst_length(bad)
    flags = "--w_burst_rate 2^-10 --burst_length 2:0.5,3:0.5 --burst_field frac"
    args = build_parser().parse_args(["eval", "m", *flags.split()])
    base = pb.BitflipConfig(w_p_exp=1e-3, w_zero_out_t=2.0, seed=3)
    cfg = flips_from_args(args, checkpoint=base)
    assert (cfg.w_burst_rate, cfg.x_burst_rate, cfg.burst_field) == (2**-10, 0.0, "frac")
    assert cfg.burst_length == {2: 0.5, 3: 0.5} and cfg.w_p_exp == 1e-3 and cfg.seed == 3
    recipe = BitflipArguments(x_burst_rate="1e-4", burst_length="4", burst_field="exp")
    assert recipe.flip_values() == dict(x_burst_rate=1e-4, burst_length=4, burst_field="exp")


def test_calibrated_zero_out_keeps_burst_settings():
    from peft_bitflip.calibration import calibrate_zero_out

    rules = {".*down_proj": {"w_burst_rate": 0.01}, "default": {}}
    base = pb.BitflipConfig(x_burst_rate=1e-3, burst_length=3, layer_name_to_config=rules)
    cal = calibrate_zero_out(tiny_llama(), token_ids(), base=base, x=False)
    assert cal.burst_values_for("model.layers.0.mlp.down_proj")["w_burst_rate"] == 0.01
    assert cal.burst_values_for(Q) == {"x_burst_rate": 1e-3, "w_burst_rate": 0.0}
    assert cal.burst_length == 3


def test_callback_schedule_scales_burst_rates():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from peft_bitflip.callback import BitflipCallback

    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(w_burst_rate=0.2, burst_length=3, w_zero_out_t=9.0))
    layer = model.get_submodule(Q)
    cb = BitflipCallback(schedule="linear", schedule_steps=4)
    state = TrainerState(global_step=0)
    cb.on_train_begin(SimpleNamespace(), state, TrainerControl(), model=model)
    for step, f in [(0, 0.0), (1, 0.25), (4, 1.0)]:
        state.global_step = step
        cb.on_step_begin(None, state, None)
        assert layer.bitflip_bursts.w == BurstSpec(0.2 * f, 3)
        assert layer.bitflip_bursts.x.is_identity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_equals_cpu_reference(dtype):
    """The compiled CUDA kernel (direct launches after the first) and the CPU reference."""
    x = torch.randn((1 << 20) + 3).to(dtype)
    key = stream_key(11, "layer", "w_burst", 0)
    for rate, length, field in [(2**-16, 2, "any"), *CASES]:
        spec = BurstSpec(rate, length, field)
        want = apply_burst_spec(x, spec, key, 9, zero_out_threshold=3.0)
        for _ in range(2):
            got = apply_burst_spec(x.cuda(), spec, key, 9, zero_out_threshold=3.0).cpu()
            assert _same_bits(got, want), (dtype, rate, length, field)


def test_moe_experts_take_bursts_and_exponent_bursts_warn(monkeypatch):
    """MoE experts take bursts (tests/test_moe_experts.py checks them); exponent bursts
    without zero-out warn, on linear layers and on experts alike."""
    import warnings

    from tiny_models import tiny_mixtral

    from peft_bitflip import transform

    experts = "model.layers.0.mlp.experts"
    only_experts = {experts: {"w_burst_rate": 1e-3}}  # (the other modules: no faults)
    monkeypatch.setattr(transform, "_WARNED_NO_ZERO_OUT", set())
    with pytest.warns(UserWarning, match=f"without zero-out on w.*e.g. {experts}"):
        model = tiny_mixtral()
        pb.apply_bitflip(model, pb.BitflipConfig(layer_name_to_config=only_experts))
    assert model.get_submodule(experts).bitflip_bursts.w.rate == 1e-3
    monkeypatch.setattr(transform, "_WARNED_NO_ZERO_OUT", set())
    with pytest.warns(UserWarning, match="without zero-out on w"):
        pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(w_burst_rate=1e-3, burst_field="exp"))
    monkeypatch.setattr(transform, "_WARNED_NO_ZERO_OUT", set())
    with warnings.catch_warnings(record=True) as caught:  # mantissa-only bursts cannot
        warnings.simplefilter("always")  # reach the exponent: no warning
        pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(w_burst_rate=1e-3, burst_field="frac"))
    assert not [w for w in caught if "zero-out" in str(w.message)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_cpu_pass_equals_the_torch_path(dtype, monkeypatch):
    """The native CPU burst pass (the default on the CPU) and the torch path, bit for bit:
    every case above, with and without the zero-out, a tail group, split over threads."""
    from peft_bitflip.kernels import burst_reference as br
    from peft_bitflip.kernels import cpu_native

    assert br._native_burst_library("cpu", 1, 2) is not None  # built and checked (once)
    calls = []
    native_burst = cpu_native.burst
    monkeypatch.setattr(cpu_native, "burst", lambda *a: (calls.append(1), native_burst(*a)))
    monkeypatch.setattr(cpu_native, "_PARALLEL_FROM", 64)
    x = (torch.randn(64 * 8 * 3 + 5, generator=torch.Generator().manual_seed(4)) * 8).to(dtype)
    key = stream_key(3, "layer", "x_burst", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for (rate, length, field), t in zip(CASES * 2, [None] * len(CASES) + [3.0] * len(CASES)):
            lengths = (
                tuple(sorted(length.items())) if isinstance(length, dict) else ((length, 1.0),)
            )
            table = burst_table(rate, lengths, dtype, "cpu")
            shape = burst_shape(lengths, field, dtype)
            got = burst_reference(x, table, shape, 11, *key, t)
            want = br._torch_burst(x, table, shape, 11, *key, t)
            assert _same_bits(got, want), (dtype, rate, length, field, t)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 * len(CASES)  # the native pass ran every time
