"""Stuck-at faults (issue 33.1): rates, stuck values, persistence, ranks, lists, merge, config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from bitstats import assert_binomial
from peft import get_peft_model
from tiny_models import tiny_llama, token_ids
from torch import nn
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
from peft_bitflip.spec import check_dtype
from peft_bitflip.stuck_at import StuckAt, StuckSpec, export_stuck_positions

INT = {16: torch.int16, 32: torch.int32}
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _bit_table(t: torch.Tensor) -> torch.Tensor:
    """(elements, bits) 0/1 table of t's bit patterns, bit 0 least significant."""
    n = check_dtype(t.dtype).n_bits
    ints = t.contiguous().view(INT[n]).to(torch.int64).reshape(-1, 1) & ((1 << n) - 1)
    return (ints >> torch.arange(n)) & 1


def _stuck_table(stuck: StuckAt, tensor: str, numel: int, dtype) -> tuple:
    """(mask, ones) 0/1 tables (numel, bits) of the stuck bits."""
    n = check_dtype(dtype).n_bits
    mask = torch.zeros(numel, n, dtype=torch.int64)
    ones = torch.zeros(numel, n, dtype=torch.int64)
    for i, b, v in stuck.positions(tensor, numel, dtype):
        mask[i, b], ones[i, b] = 1, v
    return mask, ones


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_stuck_count_per_group_and_one_share(dtype):
    p_exp, p_frac, share, numel = 0.02, 0.005, 0.3, 1 << 14
    stuck = StuckAt("layer", 7, StuckSpec(), StuckSpec(p_exp, p_frac, share))
    mask, ones = _stuck_table(stuck, "w", numel, dtype)
    layout = check_dtype(dtype)
    exp_count = int(mask[:, layout.n_frac :].sum())
    frac_count = int(mask[:, : layout.n_frac].sum())
    assert_binomial(exp_count, numel * layout.n_exp, p_exp, what=f"{dtype} exp stuck")
    assert_binomial(frac_count, numel * layout.n_frac, p_frac, what=f"{dtype} frac stuck")
    assert_binomial(int(ones.sum()), int(mask.sum()), share, what="stuck-at-1 share")
    assert not (ones & (1 - mask)).any()  # only stuck bits are stuck at 1


def test_stuck_bits_read_as_stuck_whatever_the_weight():
    torch.manual_seed(0)
    stuck = StuckAt("l", 3, StuckSpec(), StuckSpec(0.05, 0.05, 0.5))
    w = torch.randn(16, 24, dtype=torch.bfloat16)
    mask, ones = _stuck_table(stuck, "w", w.numel(), w.dtype)
    assert mask.sum() > 0 and ones.sum() > 0 and (mask - ones).sum() > 0
    for weight in (w, -w, torch.zeros_like(w), torch.full_like(w, float("nan"))):
        out = _bit_table(stuck.stuck("w", weight))
        before = _bit_table(weight)
        assert torch.equal(out * mask, ones)  # stuck bits read as their value
        assert torch.equal(out * (1 - mask), before * (1 - mask))  # the others unchanged


def test_input_lanes_are_stuck_for_every_token():
    stuck = StuckAt("l", 1, StuckSpec(0.1, 0.1, 0.5), StuckSpec())
    x = torch.randn(3, 5, 40)
    mask, ones = _stuck_table(stuck, "x", 40, x.dtype)
    assert mask.sum() > 0
    out = stuck.stuck("x", x)
    for token in out.reshape(-1, 40):
        assert torch.equal(_bit_table(token) * mask, ones)
    assert torch.equal(
        _bit_table(out) * (1 - mask).repeat(15, 1), _bit_table(x) * (1 - mask).repeat(15, 1)
    )


def test_same_positions_every_call_and_rank_and_not_rank_dependent(monkeypatch):
    cfg = pb.BitflipConfig(
        w_stuck_p_exp=0.01, w_stuck_p_frac=0.01, x_stuck_p_frac=0.05, w_zero_out_t=100.0
    )
    ids = token_ids()
    model = tiny_llama()
    pb.apply_bitflip(model, cfg)
    calls = [_logits(model, ids) for _ in range(3)]
    assert all(torch.equal(calls[0], c) for c in calls[1:])  # stuck-at only: no call dependence
    assert not torch.equal(calls[0], _logits(tiny_llama(), ids))
    positions = export_stuck_positions(model)
    monkeypatch.setenv("RANK", "1")
    other = tiny_llama()
    pb.apply_bitflip(other, cfg)
    assert torch.equal(_logits(other, ids), calls[0])
    assert export_stuck_positions(other) == positions
    layer = other.get_submodule(Q)
    assert layer.stream_keys() != model.get_submodule(Q).stream_keys()  # transient flips do


def test_positions_depend_on_seed_layer_and_tensor():
    a = StuckAt("a", 0, StuckSpec(0.05), StuckSpec(0.05))
    positions = a.positions("w", 512, torch.bfloat16)
    assert positions
    assert (
        StuckAt("a", 1, StuckSpec(), StuckSpec(0.05)).positions("w", 512, torch.bfloat16)
        != positions
    )
    assert (
        StuckAt("b", 0, StuckSpec(), StuckSpec(0.05)).positions("w", 512, torch.bfloat16)
        != positions
    )
    assert a.positions("x", 512, torch.bfloat16) != positions


def test_stuck_then_transient_flips_and_zero_out():
    """Stuck bits are forced before the transient flips of the same call (same flip draws)."""
    torch.manual_seed(0)
    layer = nn.ModuleDict({"l": nn.Linear(32, 16, bias=False)})
    cfg = dict(w_p_exp=0.01, w_p_frac=0.01, w_zero_out_t=4.0)
    pb.apply_bitflip(layer, pb.BitflipConfig(**cfg, w_stuck_p_exp=0.02, w_stuck_p_frac=0.02))
    lin = layer["l"]
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = lin(x)
    stuck_w = lin.bitflip_stuck.stuck("w", lin.weight.detach())
    want = F.linear(x, pb.apply_flip_spec(stuck_w, lin.w_spec, lin.stream_keys()[1], 0))
    assert torch.equal(out, want)


def test_explicit_lists_are_applied_exactly_and_replay_drawn_ones():
    entries = [[0, 15, 1], [5, 0, 1], [5, 3, 0], [31, 14, 1]]
    cfg = pb.BitflipConfig(stuck_at_positions={Q: {"w": entries, "x": [[2, 7, 1]]}})
    model = tiny_llama().to(torch.bfloat16)
    pb.apply_bitflip(model, cfg)
    layer = model.get_submodule(Q)
    out = _bit_table(layer.bitflip_stuck.stuck("w", layer.weight.detach()))
    for i, b, v in entries:
        assert out[i, b] == v
    assert export_stuck_positions(model) == {Q: {"x": [[2, 7, 1]], "w": sorted(entries)}}
    assert (
        layer.bitflip_stuck.stuck("x", torch.zeros(2, 32, dtype=torch.bfloat16))[:, 2]
        .view(torch.int16)
        .eq(1 << 7)
        .all()
    )
    # a drawn fault set exported and replayed as a list gives the same model
    ids = token_ids()
    drawn = tiny_llama()
    fault = dict(w_stuck_p_exp=0.01, x_stuck_p_frac=0.02, seed=5)
    pb.apply_bitflip(drawn, pb.BitflipConfig(**fault, w_zero_out_t=100.0))
    replay = tiny_llama()
    listed = export_stuck_positions(drawn)
    pb.apply_bitflip(replay, pb.BitflipConfig(stuck_at_positions=listed, w_zero_out_t=100.0))
    assert torch.equal(_logits(replay, ids), _logits(drawn, ids))


def test_save_reload_keeps_stuck_bits(tmp_path):
    cfg = pb.BitflipConfig(
        w_stuck_p_exp=0.01,
        w_stuck_p_frac=0.02,
        x_stuck_p_exp=0.01,
        stuck_one_share=0.25,
        stuck_at_positions={Q: {"w": [[3, 2, 1]]}},
        layer_name_to_config={".*down_proj": {"w_stuck_p_exp": 0.1}, "default": {}},
        w_zero_out_t=100.0,
        x_zero_out_t=100.0,
    )
    ids = token_ids()
    model = tiny_llama()
    pb.apply_bitflip(model, cfg)
    before = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config == cfg
    assert torch.equal(_logits(loaded, ids), before)
    down = loaded.get_submodule("model.layers.0.mlp.down_proj").bitflip_stuck
    assert down.w.p_exp == 0.1 and down.w.one_share == 0.25  # per-layer override
    assert loaded.get_submodule(Q).bitflip_stuck.w.positions == ((3, 2, 1),)


def test_config_round_trip_and_no_keys_when_unset():
    cfg = pb.BitflipConfig(x_stuck_p_frac=1e-3, stuck_at_positions={"a": {"x": [(1, 2, 0)]}})
    d = cfg.to_dict()
    assert d["x_stuck_p_frac"] == 1e-3 and d["stuck_at_positions"] == {"a": {"x": [[1, 2, 0]]}}
    assert pb.BitflipConfig.from_json_file(_write(cfg)) == cfg
    assert not any("stuck" in k for k in pb.BitflipConfig(w_p_exp=0.1).to_dict())


def _write(cfg, path="/tmp/peft_bitflip_stuck_cfg.json"):
    cfg.to_json_file(path)
    return path


def test_zero_rate_is_bit_identical_to_no_stuck_at():
    ids = token_ids()
    flips = dict(x_p_exp=0.01, w_p_frac=0.02, w_zero_out_t=2.0, x_zero_out_t=30.0)
    a, b = tiny_llama(), tiny_llama()
    pb.apply_bitflip(a, pb.BitflipConfig(**flips))
    pb.apply_bitflip(b, pb.BitflipConfig(**flips, w_stuck_p_exp=0.0, stuck_one_share=0.9))
    assert all(m.bitflip_stuck is None for _, m in pb.layers.bitflip_layers(b))
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_gradient_is_straight_through():
    torch.manual_seed(0)
    layer = nn.ModuleDict({"l": nn.Linear(24, 8)})
    pb.apply_bitflip(layer, pb.BitflipConfig(w_stuck_p_frac=0.05, x_stuck_p_frac=0.05))
    lin = layer["l"]
    x = torch.randn(5, 24, requires_grad=True)
    lin(x).square().sum().backward()
    xs = lin.bitflip_stuck.stuck("x", x.detach()).requires_grad_()
    ws = lin.bitflip_stuck.stuck("w", lin.weight.detach()).requires_grad_()
    bs = lin.bias.detach().clone().requires_grad_()
    F.linear(xs, ws, bs).square().sum().backward()
    assert not torch.equal(ws, lin.weight) and not torch.equal(xs, x)
    assert torch.allclose(lin.weight.grad, ws.grad) and torch.allclose(x.grad, xs.grad)
    assert torch.allclose(lin.bias.grad, bs.grad)


def test_merge_and_unload_keeps_stuck_bits():
    cfg = pb.BitflipLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        w_stuck_p_exp=0.01,
        w_stuck_p_frac=0.02,
        x_stuck_p_frac=0.01,
        w_zero_out_t=100.0,
    )
    ids = token_ids()
    model = get_peft_model(tiny_llama(), cfg)
    assert model.peft_config["default"].bitflip_config().w_stuck_p_frac == 0.02
    before = _logits(model, ids)
    with pb.disable_bitflips(model):
        clean = _logits(model, ids)
    assert not torch.equal(before, clean)
    # training through the stuck merged weight reaches the LoRA factors
    model(ids).logits.sum().backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.grad.abs().sum() > 0
    merged = model.merge_and_unload()
    assert torch.equal(_logits(merged, ids), before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(w_stuck_p_exp=-0.1), "w_stuck_p_exp"),
        (dict(x_stuck_p_frac=1.5), "x_stuck_p_frac"),
        (dict(w_stuck_p_frac=math.nan), "w_stuck_p_frac"),
        (dict(stuck_one_share=2.0), "stuck_one_share"),
        (dict(layer_name_to_config={"a": {"w_stuck_p_exp": 3.0}}), "w_stuck_p_exp"),
        (dict(stuck_at_positions={"a": {"w": [[1, 2]]}}), r"\['a'\]\['w'\]\[0\]"),
        (dict(stuck_at_positions={"a": {"w": [[-1, 2, 0]]}}), "index must be >= 0"),
        (dict(stuck_at_positions={"a": {"w": [[1, 32, 0]]}}), "bit must be in"),
        (dict(stuck_at_positions={"a": {"w": [[1, 3, 2]]}}), "value must be 0 or 1"),
        (dict(stuck_at_positions={"a": {"w": [[1, 3, 0], [1, 3, 1]]}}), "both 0 and 1"),
        (dict(stuck_at_positions={"a": {"y": []}}), "unknown tensor"),
        (dict(stuck_at_positions={"a": [[1, 2, 3]]}), r"stuck_at_positions\['a'\]"),
    ],
)
def test_bad_settings_raise_named_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pb.BitflipConfig(**kwargs)


def test_bad_positions_for_the_model_raise_named_errors():
    with pytest.raises(ValueError, match="not bit-flip layers"):
        pb.apply_bitflip(tiny_llama(), pb.BitflipConfig(stuck_at_positions={"nope": {"w": []}}))
    model = tiny_llama().to(torch.bfloat16)
    pb.apply_bitflip(model, pb.BitflipConfig(stuck_at_positions={Q: {"w": [[10**6, 0, 1]]}}))
    with pytest.raises(ValueError, match="element index 1000000"):
        model(token_ids())
    model = tiny_llama().to(torch.bfloat16)
    pb.apply_bitflip(model, pb.BitflipConfig(stuck_at_positions={Q: {"w": [[0, 20, 1]]}}))
    with pytest.raises(ValueError, match="bit 20.*16 bits"):
        model(token_ids())


def test_kernel_and_reference_draw_the_same_positions(needs_interpreter, monkeypatch):
    """The positions come from the flip function: the Triton kernel (here through its
    interpreter, on the GPU compiled) and the CPU reference give the same stuck bits."""
    drawn = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
        stuck = StuckAt("l", 9, StuckSpec(0.02, 0.01), StuckSpec(0.03, 0.02, 0.4))
        drawn[backend] = [stuck.positions(t, 1000, torch.bfloat16) for t in ("x", "w")]
    assert drawn["triton"] == drawn["reference"] and drawn["triton"][1]


def test_autocast_sticks_the_bits_of_the_values_the_matmul_reads():
    torch.manual_seed(0)
    layer = nn.ModuleDict({"l": nn.Linear(32, 16)})
    pb.apply_bitflip(layer, pb.BitflipConfig(w_stuck_p_frac=0.05, x_stuck_p_frac=0.05))
    lin = layer["l"]
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = lin(x)
    xs = lin.bitflip_stuck.stuck("x", x.bfloat16())
    ws = lin.bitflip_stuck.stuck("w", lin.weight.detach().bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(xs, ws, lin.bias.bfloat16()))


def test_compiled_layer_gives_the_eager_result():
    torch.manual_seed(0)
    layer = nn.ModuleDict({"l": nn.Linear(32, 16)})
    cfg = pb.BitflipConfig(w_stuck_p_frac=0.05, x_stuck_p_frac=0.05, w_p_frac=0.01)
    pb.apply_bitflip(layer, cfg)
    lin = layer["l"]
    x = torch.randn(4, 32)
    eager = [lin(x) for _ in range(2)]
    lin.bitflip_calls.zero_()
    torch._dynamo.reset()
    compiled = torch.compile(lin, backend="aot_eager")
    try:
        assert all(torch.equal(a, compiled(x)) for a in eager)
    finally:
        torch._dynamo.reset()


def test_lora_adapter_with_other_stuck_settings_is_refused():
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(w_stuck_p_exp=0.01, w_zero_out_t=10.0))
    cfg = pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], w_zero_out_t=10.0)
    with pytest.raises(ValueError, match="stuck"):
        get_peft_model(model, cfg)


def test_calibrated_zero_out_keeps_stuck_settings():
    from peft_bitflip.calibration import calibrate_zero_out

    rules = {".*down_proj": {"w_stuck_p_frac": 0.01}, "default": {}}
    base = pb.BitflipConfig(x_stuck_p_exp=1e-3, stuck_one_share=0.2, layer_name_to_config=rules)
    cal = calibrate_zero_out(tiny_llama(), token_ids(), base=base, x=False)
    down = cal.stuck_values_for("model.layers.0.mlp.down_proj")
    assert down["w_stuck_p_frac"] == 0.01 and down["x_stuck_p_exp"] == 1e-3
    assert cal.stuck_values_for(Q)["w_stuck_p_frac"] == 0.0
    assert cal.stuck_one_share == 0.2


def _count_weight_builds(monkeypatch, stuck: StuckAt) -> list:
    """A list that gets one entry per stuck weight ``stuck`` builds (its ``stuck("w", ...)``)."""
    builds = []
    original = StuckAt.stuck

    def counted(self, tensor, t):
        if self is stuck and tensor == "w":
            builds.append(t.dtype)
        return original(self, tensor, t)

    monkeypatch.setattr(StuckAt, "stuck", counted)
    return builds


def _fresh(holder, x):
    """The output of a copy of ``holder`` (copies leave the stuck-weight cache behind)."""
    with torch.no_grad():
        return copy.deepcopy(holder)["l"](x)


def test_stuck_weight_is_built_once_and_again_only_after_the_weight_changes(monkeypatch):
    """Issue 33.4: a weight that does not change is stuck once (not at every call, nor again
    in backward); an optimizer step, load_state_dict, a dtype change or autocast rebuild it."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(32, 16)})
    cfg = pb.BitflipConfig(w_stuck_p_exp=0.02, w_stuck_p_frac=0.05, w_zero_out_t=100.0)
    pb.apply_bitflip(holder, cfg)
    lin = holder["l"]
    builds = _count_weight_builds(monkeypatch, lin.bitflip_stuck)
    x = torch.randn(4, 32)
    with torch.inference_mode():  # built here, usable by the training forwards below
        first = [lin(x)]
    with torch.no_grad():
        first += [lin(x) for _ in range(3)]
    assert all(torch.equal(first[0], o) for o in first) and len(builds) == 1
    assert not torch.equal(first[0], F.linear(x, lin.weight, lin.bias))
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    for _ in range(2):  # two accumulated micro-batches: forward and backward reuse it
        lin(x).square().sum().backward()
    assert len(builds) == 1 and lin.weight.grad.abs().sum() > 0
    opt.step()
    stepped = lin(x)
    assert len(builds) == 2 and torch.equal(stepped, _fresh(holder, x))
    assert not torch.equal(stepped, first[0])
    holder.load_state_dict({k: v * 0.5 for k, v in holder.state_dict().items()})
    assert torch.equal(lin(x), _fresh(holder, x)) and len(builds) == 3
    with torch.no_grad():
        lin.weight.data.mul_(2)  # not seen by the version counter: clear() is the way
    lin.bitflip_stuck.clear()
    assert torch.equal(lin(x), _fresh(holder, x)) and len(builds) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert lin(x).dtype == torch.bfloat16
    holder.to(torch.float16)
    assert torch.equal(lin(x.half()), _fresh(holder, x.half()))
    assert builds[-2:] == [torch.bfloat16, torch.float16]
    lin.bitflip_stuck.keep_weight = False  # the memory-saving mode: built at every call
    lin.bitflip_stuck.clear()
    outputs = [lin(x.half()) for _ in range(2)]
    assert len(builds) == 8 and lin.bitflip_stuck._weight is None
    assert all(torch.equal(o, _fresh(holder, x.half())) for o in outputs)


def test_lora_stuck_weight_follows_the_factors_and_scale(monkeypatch):
    cfg = pb.BitflipLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
        w_stuck_p_exp=0.01, w_stuck_p_frac=0.02, w_zero_out_t=100.0,
    )  # fmt: skip
    ids = token_ids()
    model = get_peft_model(tiny_llama(), cfg)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    builds = _count_weight_builds(monkeypatch, q.base_layer.bitflip_stuck)
    before = _logits(model, ids)
    assert torch.equal(_logits(model, ids), before) and len(builds) == 1  # eval: built once
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(ids).logits.square().mean().backward()
    opt.step()
    after = _logits(model, ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, _logits(copy.deepcopy(model), ids))
    with torch.no_grad():  # an in-place change of a factor alone, between two evaluations
        q.lora_B["default"].weight.add_(0.5)
    changed = _logits(model, ids)
    assert torch.equal(changed, _logits(copy.deepcopy(model), ids))
    assert not torch.equal(changed, after)
    q.scaling["default"] *= 3
    assert torch.equal(_logits(model, ids), _logits(copy.deepcopy(model), ids))
    assert not torch.equal(_logits(model, ids), changed)


def test_compiled_forward_has_no_stuck_at_graph_break():
    """Issue 33.4: the stuck bits are drawn while tracing, not in a compiler-disabled
    function, so a layer with stuck bits compiles as one graph; each layer traces its own."""

    def make(rate):
        torch.manual_seed(0)
        holder = nn.ModuleDict({"l": nn.Linear(32, 16)})
        cfg = pb.BitflipConfig(w_stuck_p_frac=rate, x_stuck_p_frac=rate, w_p_frac=0.01)
        pb.apply_bitflip(holder, cfg)
        return holder["l"]

    a, b = make(0.05), make(0.1)
    x = torch.randn(4, 32, requires_grad=True)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(a)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        a.bitflip_calls.zero_()
        eager = {}
        for name, m in (("a", a), ("b", b)):
            out = m(x)
            eager[name] = (out, torch.autograd.grad(out.square().sum(), m.weight)[0])
            m.bitflip_calls.zero_()
        assert not torch.equal(eager["a"][0], eager["b"][0])
        compiled = torch.compile(lambda m, x: m(x), backend="aot_eager", fullgraph=True)
        for name, m in (("a", a), ("b", b)):
            out = compiled(m, x)
            assert torch.equal(out, eager[name][0])
            grad = torch.autograd.grad(out.square().sum(), m.weight)[0]
            assert torch.equal(grad, eager[name][1])
    finally:
        torch._dynamo.reset()


def test_export_under_autocast_gives_the_bits_the_layers_force():
    """Issue 33.4: under a bf16 autocast the layers force the stuck bits of the bf16 values;
    the export made under the same autocast replays them (a float32 export would not)."""
    ids = token_ids()
    fault = dict(w_stuck_p_exp=0.01, w_stuck_p_frac=0.02, x_stuck_p_frac=0.05, seed=3)
    drawn = tiny_llama()
    pb.apply_bitflip(drawn, pb.BitflipConfig(**fault, w_zero_out_t=100.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        listed = export_stuck_positions(drawn)
        want = _logits(drawn, ids)
    assert max(b for lists in listed.values() for t in lists.values() for _, b, _ in t) < 16
    assert listed != export_stuck_positions(drawn)  # float32 bits without autocast
    replay = tiny_llama()
    pb.apply_bitflip(replay, pb.BitflipConfig(stuck_at_positions=listed, w_zero_out_t=100.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_logits(replay, ids), want)


def test_weight_frozen_after_a_cached_build_gets_no_gradient_pass():
    """Issue 33.4: a stuck weight cached while W still required a gradient (an evaluation
    before W is frozen, as before a LoRA adapter is added) must not keep a graph into W: the
    frozen steps would compute dW (a third matmul) and accumulate it into W.grad."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(32, 16, bias=False)})
    pb.apply_bitflip(holder, pb.BitflipConfig(w_stuck_p_frac=0.05, w_zero_out_t=100.0))
    lin = holder["l"]
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin(x)  # caches the stuck weight while lin.weight.requires_grad
    cached = lin.bitflip_stuck._weight[2]
    assert cached.grad_fn is None and not cached.requires_grad
    lin.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    lin(xg).square().sum().backward()
    assert lin.weight.grad is None and xg.grad is not None
    with torch.inference_mode():  # built in inference mode: still usable by autograd later
        lin.bitflip_stuck.clear()
        lin(x)
    lin(xg).sum().backward()
    assert lin.weight.grad is None


def _lanes_layer(dtype, in_features, x_zero_out):
    torch.manual_seed(0)
    holder = nn.ModuleDict({"l": nn.Linear(in_features, 8)}).to(dtype)
    faults = dict(x_stuck_p_exp=0.05, x_stuck_p_frac=0.2, x_p_frac=0.05, w_p_frac=0.05, seed=1)
    if x_zero_out:
        faults["x_zero_out_t"] = 1.0
    pb.apply_bitflip(holder, pb.BitflipConfig(**faults))
    return holder


def _lanes_run(holder, shape, dtype, recompute):
    """(train output, dX, dW, no-grad output) of the layer on a fixed x of ``shape``."""
    pb.recompute_flipped_inputs(holder, recompute)
    lin = holder["l"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    x.requires_grad_()
    out = lin(x)
    out.square().sum().backward()
    with torch.no_grad():
        again = lin(x)
    return out.detach(), x.grad, lin.weight.grad, again


@pytest.mark.parametrize(
    "dtype, shape, zero_out, recompute",
    [
        (torch.float32, (2, 3, 16), True, False),
        (torch.bfloat16, (5, 16), True, True),
        (torch.float16, (2, 2, 16), False, True),
        (torch.bfloat16, (2, 3, 16), False, False),
    ],
)
def test_flip_kernel_forces_stuck_lanes_as_the_separate_pass(
    needs_interpreter, monkeypatch, dtype, shape, zero_out, recompute
):
    """Issue 33.4: stuck input lanes are forced in the flip kernel's pass over x (forward,
    no-grad forward, backward's recompute), not by a pass of their own; outputs and gradients
    are bit-identical to the CPU path, which forces them separately before the flips."""
    from peft_bitflip.kernels import triton_bitflip
    from peft_bitflip.stuck_at import _ApplyStuck

    separate, x_launches = [], []
    monkeypatch.setattr(
        _ApplyStuck, "apply", lambda *a, _f=_ApplyStuck.apply: separate.append(1) or _f(*a)
    )
    run, pair = triton_bitflip._run, triton_bitflip.launch_pair

    def spy(x, lanes):
        if x.shape == shape:  # a launch over x (not W, nor the stuck bits' draw)
            x_launches.append(lanes is not None)

    monkeypatch.setattr(
        triton_bitflip, "_run",
        lambda *a, lanes=None, **k: spy(a[0], lanes) or run(*a, lanes=lanes, **k),
    )  # fmt: skip
    monkeypatch.setattr(triton_bitflip, "launch_pair", lambda *a: spy(a[0], a[13]) or pair(*a))
    got = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
        separate.clear()
        got[backend] = _lanes_run(_lanes_layer(dtype, 16, zero_out), shape, dtype, recompute)
        assert len(separate) == (0 if backend == "triton" else 2)
    for a, b in zip(got["triton"], got["reference"]):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    assert (got["triton"][1] == 0).any() == zero_out  # the zero-out of the stuck x masks dX
    assert len(x_launches) == 2 + recompute and all(x_launches)  # fwd, bwd, no-grad


def test_stuck_lanes_outside_the_kernel_where_it_cannot_take_them(needs_interpreter, monkeypatch):
    """in_features not a multiple of the kernel's group (8 for bf16, also for a float32 x under
    a bf16 autocast, whose group would be 4), or x without transient flips: the stuck lanes are
    forced by the separate pass, with the same result."""
    from peft_bitflip.stuck_at import _ApplyStuck

    separate = []
    monkeypatch.setattr(
        _ApplyStuck, "apply", lambda *a, _f=_ApplyStuck.apply: separate.append(1) or _f(*a)
    )
    got = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
        separate.clear()
        got[backend] = _lanes_run(
            _lanes_layer(torch.bfloat16, 12, True), (3, 12), torch.bfloat16, False
        )
        assert len(separate) == 2
    assert all(torch.equal(a, b) for a, b in zip(got["triton"], got["reference"]))
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    separate.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _lanes_run(_lanes_layer(torch.float32, 12, True), (3, 12), torch.float32, False)
    assert len(separate) == 2
    holder = nn.ModuleDict({"l": nn.Linear(16, 8)})
    pb.apply_bitflip(holder, pb.BitflipConfig(x_stuck_p_frac=0.2, w_p_frac=0.05))
    separate.clear()
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    holder["l"](torch.randn(2, 16))
    assert len(separate) == 1


def _assert_launches_equal_forced_first(t, forced, other, table, lanes=None, stuck=None):
    """Every flip launch of ``t`` that takes its stuck bits (``lanes``: input lanes, ``t``
    the x of the paired launch; ``stuck``: listed bits, ``t`` its W): single, with mask,
    paired with ``other``, backward's zero-grad, equals the launch of ``forced`` (``t`` with
    them forced first) without them, bit for bit; the zero-grad launch zeroes something."""
    from peft_bitflip.kernels import triton_bitflip as tb

    call = torch.tensor(3)

    def same(a, b):
        return a is None and b is None or torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    fused = dict(lanes=lanes, stuck=stuck)
    assert same(tb.launch(t, table, call, 1, 2, 2.0, True, **fused),
                tb.launch(forced, table, call, 1, 2, 2.0, True))  # fmt: skip
    masked = tb.launch_with_mask(t, table, call, 1, 2, 2.0, True, **fused)
    assert all(map(same, masked, tb.launch_with_mask(forced, table, call, 1, 2, 2.0, True)))
    args = (table, table, call, (1, 2), (3, 4), 2.0, 1.0, True, True, True, None)
    pair = (t, other) if stuck is None else (other, t)
    pair_forced = (forced, other) if stuck is None else (other, forced)
    assert all(
        map(same, tb.launch_pair(*pair, *args, lanes, stuck), tb.launch_pair(*pair_forced, *args))
    )
    g1 = torch.randn_like(t)
    g2 = g1.clone()
    y1 = tb.launch_zero_grad_(t, g1, table, call, 1, 2, 1.0, True, True, **fused)
    assert same(y1, tb.launch_zero_grad_(forced, g2, table, call, 1, 2, 1.0, True, True))
    assert same(g1, g2) and (g1 == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_launches_with_lanes_equal_stuck_then_flipped(needs_interpreter, dtype):
    """Every flip launch that takes stuck lanes (single, with mask, paired with W, backward's
    zero-grad) gives what forcing them first and launching without them gives."""
    from peft_bitflip.kernels import triton_bitflip as tb
    from peft_bitflip.kernels.reference import stick_lanes
    from peft_bitflip.kernels.sampling import flip_table

    stuck = StuckAt("l", 4, StuckSpec(0.05, 0.2), StuckSpec())
    n = 16
    lanes = stuck.lanes(n, dtype, "cpu")
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = torch.randn(6, n).to(dtype)
    xs = stick_lanes(x, lanes)
    assert not torch.equal(xs, x)
    table = flip_table(0.05, 0.05, dtype, x.device)
    _assert_launches_equal_forced_first(x, xs, w, table, lanes=lanes)
    call = torch.tensor(3)
    with pytest.raises(ValueError, match="do not fit x"):
        tb.launch(x[..., :8].contiguous(), table, call, 1, 2, 2.0, True, lanes=lanes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [2**-12, 0.05])  # sparse fields (64 x 2 blocks), dense (128 x 1)
def test_kernel_launches_with_listed_stuck_bits_equal_stuck_then_flipped(
    needs_interpreter, dtype, p
):
    """Issue 33.4: every flip launch that takes a weight's listed stuck bits (single, with
    mask, paired with x, backward's zero-grad) gives what forcing them first and launching
    without them gives, with entries on program boundaries and in a partial last block."""
    from peft_bitflip.kernels import triton_bitflip as tb
    from peft_bitflip.kernels.sampling import flip_table, group_size

    shape = (40, 60)  # 2400 elements: several blocks at both shapes, the last one partial
    numel, per_program = shape[0] * shape[1], tb.ROWS_PER_PROGRAM * group_size(dtype)
    edges = [0, per_program - 1, per_program, 2 * per_program + 3, numel - 1]
    listed = tuple((i, b, (i + b) % 2) for i in edges for b in (0, 3))
    stuck = StuckAt("l", 4, StuckSpec(), StuckSpec(0.004, 0.01, 0.5, listed))
    bits = stuck.sparse(numel, dtype, "cpu")
    starts = bits.starts(per_program)
    assert len(bits) > 10 and (starts.diff() > 0).sum() >= 3  # entries in several blocks
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    ws = bits.apply(w)
    assert not torch.equal(ws, w)
    x = torch.randn(3, 5, 16).to(dtype)
    table, call = flip_table(p, p, dtype, w.device), torch.tensor(3)
    assert tb.has_dense_field(table, True) == (p > 2**-9)
    _assert_launches_equal_forced_first(w, ws, x, table, stuck=bits)
    with pytest.raises(ValueError, match="do not fit"):
        tb.launch(w[:20].contiguous(), table, call, 1, 2, 2.0, True, stuck=bits)


def _stuck_weight_layer(dtype, kind):
    """A bit-flip layer (``kind``: "linear", "conv1d" (GPT-2 layout) or "lora", an adapter on
    a frozen base weight) with stuck weight bits, transient flips and zero-out on x and W."""
    torch.manual_seed(0)
    faults = dict(
        w_stuck_p_exp=0.001, w_stuck_p_frac=0.0005, x_stuck_p_frac=0.1, stuck_one_share=0.6,
        x_p_frac=0.05, w_p_frac=0.02, w_p_exp=2**-8, x_zero_out_t=3.0, w_zero_out_t=0.2, seed=2,
    )  # fmt: skip
    if kind == "lora":
        model = get_peft_model(
            tiny_llama(), pb.BitflipLoraConfig(r=4, target_modules=["q_proj"], **faults)
        )
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(prm, std=0.05)
        return model, model.get_submodule("base_model.model." + Q)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        holder = nn.ModuleDict({"l": Conv1D(16, 32)})
    else:
        holder = nn.ModuleDict({"l": nn.Linear(32, 16)})
    holder = holder.to(dtype)
    pb.apply_bitflip(holder, pb.BitflipConfig(**faults))
    return holder, holder["l"]


@pytest.mark.parametrize(
    "dtype, kind, recompute",
    [
        (torch.float32, "linear", False),
        (torch.bfloat16, "linear", True),
        (torch.float16, "conv1d", False),
        (torch.float32, "lora", False),
    ],
)
def test_flip_kernel_forces_stuck_weight_bits_without_a_stuck_copy(
    needs_interpreter, monkeypatch, dtype, kind, recompute
):
    """Issue 33.4: on the Triton backend a weight's stuck bits are forced in W's flip kernel
    (forward, backward's recompute, no-grad forward): no stuck copy of W is built at any
    training step, though W (or the LoRA factors) changes after each.  Outputs and gradients
    are bit-identical to the CPU path, which builds the stuck copy; so is the Triton path with
    the bits above the kernel's density limit (it builds the copy too)."""
    builds = []
    original = StuckAt.stuck
    monkeypatch.setattr(
        StuckAt, "stuck", lambda s, t, v: (t == "w" and builds.append(1)) or original(s, t, v)
    )
    got = {}
    for run in ("triton", "reference", "triton, dense"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", run.split(",")[0])
        monkeypatch.setattr(StuckAt, "kernel_density", 0.0 if "dense" in run else 1 / 32)
        holder, lin = _stuck_weight_layer(dtype, kind)
        pb.recompute_flipped_inputs(holder, recompute)
        params = [p for p in lin.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        builds.clear()
        steps = []
        for step in range(2):
            shape = (2, 5, lin.in_features) if kind == "lora" else (3, 32)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(step)).to(dtype)
            out = lin(x.requires_grad_())
            out.float().square().sum().backward()
            grads = [p.grad.clone() for p in params]
            steps.append((out.detach(), x.grad, *grads))
            opt.step()
            opt.zero_grad()
        fused = run == "triton"
        assert (len(builds) == 0) == fused, (run, len(builds))
        stuck = getattr(lin, "base_layer", lin).bitflip_stuck
        assert (stuck._weight is None) == fused  # no stuck copy kept either
        with torch.no_grad():
            steps.append((lin(x.detach()),))
        got[run] = steps
    for run in ("reference", "triton, dense"):
        for i, (a_step, b_step) in enumerate(zip(got["triton"], got[run])):
            for a, b in zip(a_step, b_step):
                if kind == "lora" and i == 2 and run == "reference":
                    # a no-grad LoRA forward merges with the merge kernel on the Triton
                    # backend (its float32 sums may differ in the last bit), not the reference
                    torch.testing.assert_close(a, b)
                    continue
                assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
