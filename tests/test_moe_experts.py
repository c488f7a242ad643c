"""Issue 36.1: the fused experts of MoE models (transformers 5: 3-D ``gate_up_proj`` /
``down_proj``) are flipped like linear layers: inputs and weights of every expert matmul, per
expert streams, zero-out, straight-through backward, statistics, config.json round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_gpt_oss, tiny_mixtral, tiny_qwen2_moe, token_ids
from transformers import AutoModelForCausalLM

import peft_bitflip as pb
from peft_bitflip.calibration import calibrate_zero_out
from peft_bitflip.experts import BitflipExpertsMixin
from peft_bitflip.functional import apply_flip_spec, stream_key
from peft_bitflip.layers import bitflip_layers
from peft_bitflip.spec import FlipSpec
from peft_bitflip.stats import FlipStatsRecorder, binomial_z

MODELS = {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss, "qwen2_moe": tiny_qwen2_moe}
EXPERTS = "model.layers.0.mlp.experts"


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _experts(model):
    return model.get_submodule(EXPERTS)


def _routing(experts, tokens=12, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, experts.down_proj.shape[1 if not experts.is_transposed else 2])
    index = torch.stack(
        [torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(tokens)]
    )
    weights = torch.rand(tokens, k, generator=g)
    return hidden, index, weights


@pytest.mark.parametrize("arch", list(MODELS))
def test_p0_equals_the_stock_experts_forward(arch):
    model = MODELS[arch]()
    ids = token_ids()
    stock = _logits(model, ids)
    stock_experts = copy.deepcopy(_experts(model))
    summary = pb.apply_bitflip(model, pb.BitflipConfig())
    assert isinstance(_experts(model), BitflipExpertsMixin)
    assert isinstance(_experts(model), type(stock_experts))  # a subclass of the stock class
    assert EXPERTS in summary.flipped
    assert torch.equal(_logits(model, ids), stock)
    routing = _routing(stock_experts)
    with torch.no_grad():
        assert torch.equal(_experts(model)(*routing), stock_experts(*routing))
    assert int(_experts(model).bitflip_calls) == 2  # one call per forward
    assert pb.remove_bitflip(model) == len(summary.flipped)
    assert type(_experts(model)) is type(stock_experts)


def _weights_zeroed(model, t):
    """A copy of ``model`` whose flipped weights are 0 where |w| >= t (what zero-out does)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith(("proj", "proj.weight")) and "bias" not in name:
                p.masked_fill_(p.abs() >= t, 0.0)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_weight_zero_out_applies_to_the_experts(arch):
    model = MODELS[arch]()
    t = 0.06  # cuts part of the N(0, 0.05) expert weights
    assert (_experts(model).gate_up_proj.abs() >= t).any()
    reference = _weights_zeroed(model, t)
    ids = token_ids()
    pb.apply_bitflip(model, pb.BitflipConfig(w_zero_out_t=t))
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert not torch.equal(_logits(model, ids), _logits(MODELS[arch](), ids))


def _stock_loop(experts, hidden, index, weights, matmul):
    """The stock eager loop over the experts that get tokens, ``matmul(proj, e, h)`` computing
    each expert matmul without its bias (added after it, as the stock forward does)."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    out = torch.zeros_like(hidden)
    mask = torch.nn.functional.one_hot(index, experts.num_experts + 1).permute(2, 1, 0)
    for e in range(experts.num_experts):
        top_k_pos, token_idx = torch.where(mask[e])
        if not len(token_idx):
            continue
        h = hidden[token_idx]
        for proj in (first, "down_proj"):
            h = matmul(proj, e, h)
            if experts.has_bias:
                h = h + getattr(experts, proj + "_bias")[e]
            if proj == first:
                h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        out.index_add_(0, token_idx, h * weights[token_idx, top_k_pos, None])
    return out


def _reference_experts(experts, name, seed, x_spec, w_spec, hidden, index, weights, call):
    """The stock eager loop with differentiable flips (apply_flip_spec) on every expert
    matmul's input and weight, streams named ``{name}.{proj}.{e}`` / x|w / rank 0."""

    def matmul(proj, e, h):
        stream = f"{name}.{proj}.{e}"
        xf = apply_flip_spec(h, x_spec, stream_key(seed, stream, "x", 0), call)
        wf = apply_flip_spec(
            getattr(experts, proj)[e], w_spec, stream_key(seed, stream, "w", 0), call
        )
        return xf @ wf if experts.is_transposed else xf @ wf.t()

    return _stock_loop(experts, hidden, index, weights, matmul)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_forward_and_backward_equal_the_reference_rule(arch):
    model = MODELS[arch]()
    x_spec = FlipSpec(2**-4, 2**-3, 0.5)
    w_spec = FlipSpec(2**-4, 2**-3, 0.06)
    cfg = pb.BitflipConfig(
        x_p_exp=x_spec.p_exp, x_p_frac=x_spec.p_frac, x_zero_out_t=x_spec.zero_out_threshold,
        w_p_exp=w_spec.p_exp, w_p_frac=w_spec.p_frac, w_zero_out_t=w_spec.zero_out_threshold,
        seed=7,
    )  # fmt: skip
    reference = copy.deepcopy(_experts(model))
    pb.apply_bitflip(model, cfg)
    experts = _experts(model)
    hidden, index, weights = _routing(experts)
    params = [p for n, p in experts.named_parameters() if "proj" in n]
    ref_params = [p for n, p in reference.named_parameters() if "proj" in n]
    grads = []
    for module, ps in ((experts, params), (reference, ref_params)):
        h = hidden.clone().requires_grad_()
        if module is experts:
            out = module(h, index, weights)
        else:
            out = _reference_experts(module, EXPERTS, 7, x_spec, w_spec, h, index, weights, 0)
        out.pow(2).sum().backward()
        grads.append((out.detach(), h.grad, [p.grad for p in ps]))
    (out, gh, gp), (ref_out, ref_gh, ref_gp) = grads
    assert torch.equal(out, ref_out)
    assert not torch.equal(out, reference(hidden, index, weights))  # flips happened
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    for g, r in zip(gp, ref_gp):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # straight-through, zero where the forward zeroed: some weight gradients are exactly 0
    assert (gp[0] == 0).any() and (gp[0] != 0).any()


def test_expert_streams_are_independent():
    model = tiny_mixtral()
    pb.apply_bitflip(model, pb.BitflipConfig(w_p_frac=2**-4))
    experts = _experts(model)
    keys = [experts.stream_keys(p, e) for p in ("gate_up_proj", "down_proj") for e in range(4)]
    flat = [k for pair in keys for k in pair]
    assert len(set(flat)) == len(flat)  # x / w, per matmul, per expert
    other = _experts(model).stream_keys("gate_up_proj", 0) != model.get_submodule(
        "model.layers.1.mlp.experts"
    ).stream_keys("gate_up_proj", 0)
    assert other  # per module too
    w = torch.ones(64, 32)  # the same weight in two experts flips at different positions
    spec = experts.w_spec
    f0 = apply_flip_spec(w, spec, keys[0][1], 0)
    f1 = apply_flip_spec(w, spec, keys[1][1], 0)
    assert not torch.equal(f0 != w, f1 != w)


def test_expert_flip_rates_within_5_sigma():
    model = tiny_mixtral()
    p_exp, p_frac = 2**-7, 2**-5
    pb.apply_bitflip(
        model, pb.BitflipConfig(x_p_exp=p_exp, x_p_frac=p_frac, w_p_exp=p_exp, w_p_frac=p_frac)
    )
    experts = _experts(model)
    routing = _routing(experts, tokens=32)
    with FlipStatsRecorder(model) as rec, torch.no_grad():
        experts(*routing)
        stats = rec.read_per_layer()[EXPERTS]
    hit = routing[1].unique().numel()
    per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
    assert stats["w"].elements == hit * per_expert
    assert stats["x"].elements == 2 * 32 * (32 + 64)  # 2 experts per token: H in, I in
    for kind in ("x", "w"):
        s = stats[kind]
        assert abs(binomial_z(s.exp_flips, s.exp_bits, p_exp)) < 5, (kind, s)
        assert abs(binomial_z(s.frac_flips, s.frac_bits, p_frac)) < 5, (kind, s)


def test_mixtral_summary_counts_parameters():
    model = tiny_mixtral()
    summary = pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=0.01))
    experts = [n for n in summary.flipped if n.endswith("mlp.experts")]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    weights = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2}
    clean = weights["lm_head.weight"] + sum(v for n, v in weights.items() if "mlp.gate" in n)
    total = sum(weights.values()) - weights["model.embed_tokens.weight"]
    assert summary.matmul_parameters == total
    assert summary.flipped_parameters == total - clean
    assert summary.coverage > 0.9
    assert "embedding" in summary.clean["model.embed_tokens"]
    assert "router" in summary.clean["model.layers.0.mlp.gate"]
    assert f"{summary.flipped_parameters:,} of {total:,}" in str(summary)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_save_and_reload_gives_identical_logits(arch, tmp_path):
    model = MODELS[arch]()
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=2**-6, w_p_frac=2**-6, w_zero_out_t=1.0))
    ids = token_ids()
    _logits(model, ids)  # the counters move on: the checkpoint keeps them
    model.save_pretrained(tmp_path)
    expected = _logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(_experts(loaded), BitflipExpertsMixin)
    assert int(_experts(loaded).bitflip_calls) == 1
    assert torch.equal(_experts(loaded).gate_up_proj, _experts(model).gate_up_proj)
    assert torch.equal(_logits(loaded, ids), expected)


def test_disable_bitflips_runs_the_stock_forward():
    model = tiny_mixtral()
    ids = token_ids()
    stock = _logits(model, ids)
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=0.1, w_p_frac=0.1))
    assert not torch.equal(_logits(model, ids), stock)
    with pb.disable_bitflips(model):
        assert torch.equal(_logits(model, ids), stock)


def _reset_counters(model):
    for m in model.modules():
        if isinstance(getattr(m, "bitflip_calls", None), torch.Tensor):
            m.bitflip_calls.zero_()


EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA_FLIPS = dict(x_p_frac=2**-6, w_p_frac=2**-6, w_p_exp=2**-8, w_zero_out_t=0.06)


def test_bitflip_lora_on_expert_parameters_flips_the_merged_weight(tmp_path):
    from peft import PeftModel, get_peft_model

    cfg = pb.BitflipLoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, init_lora_weights=False,
        **LORA_FLIPS,
    )  # fmt: skip
    model = get_peft_model(tiny_mixtral(), cfg)
    summary = model.base_model.bitflip_summary
    assert EXPERTS in summary.flipped
    assert not [n for n in summary.clean if "experts" in n]  # the factors are inside flip(W')
    ids = token_ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    factors = [(n, p) for n, p in model.named_parameters() if "experts" in n and p.requires_grad]
    assert len(factors) == 2 * 2 * 2  # 2 layers x 2 parameters x (A, B)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in factors)
    model.eval()
    _reset_counters(model)
    adapter = _logits(model, ids)
    with pb.disable_bitflips(model):
        assert not torch.equal(_logits(model, ids), adapter)
    model.save_pretrained(tmp_path)
    merged = copy.deepcopy(model).merge_and_unload()
    assert isinstance(_experts(merged), BitflipExpertsMixin)
    _reset_counters(merged)
    assert torch.equal(_logits(merged, ids), adapter)  # flip(W + s*B@A) either way
    reloaded = PeftModel.from_pretrained(tiny_mixtral(), tmp_path).eval()
    _reset_counters(reloaded)
    assert torch.equal(_logits(reloaded, ids), adapter)


def test_bitflip_lora_refuses_the_experts_module_as_a_target_module():
    from peft import get_peft_model

    cfg = pb.BitflipLoraConfig(r=4, target_modules=["experts"], x_p_frac=0.01)
    with pytest.raises(ValueError, match="MoE experts module.*target_parameters"):
        get_peft_model(tiny_mixtral(), cfg)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_mixtral().train()
        pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=2**-4, w_p_frac=2**-4, w_zero_out_t=0.06))
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        ids = token_ids()
        model(ids, labels=ids).loss.backward()
        grads.append(_experts(model).down_proj.grad)
        assert int(_experts(model).bitflip_calls) == 1  # the recomputation reuses the call
    assert torch.equal(grads[0], grads[1])


def test_calibration_refuses_moe_experts_clearly():
    model = tiny_mixtral()
    with pytest.raises(
        NotImplementedError, match="MoE experts module 'model.layers.0.mlp.experts'"
    ):
        calibrate_zero_out(model, token_ids(), x=False, w=True)


def test_trainer_callback_counts_the_experts(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peft_bitflip.callback import add_bitflip_callback

    model = tiny_mixtral().train()
    p = 2**-5
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=p, w_p_frac=p))
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in token_ids(4, 16, seed=2)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
        use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    add_bitflip_callback(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    linear = sum(m.weight.numel() for _, m in bitflip_layers(model) if hasattr(m, "weight"))
    per_expert = _experts(model).gate_up_proj[0].numel() + _experts(model).down_proj[0].numel()
    for entry in logs:  # one forward per step: the linear weights and those of the hit experts
        experts_part = entry["bitflip/w_elements"] - linear
        assert experts_part > 0 and experts_part % per_expert == 0
    flips = sum(e["bitflip/w_frac_flips"] for e in logs)
    bits = sum(e["bitflip/w_frac_bits"] for e in logs)
    assert abs(binomial_z(flips, bits, p)) < 5


def test_recompute_flipped_inputs_gives_the_same_expert_gradients():
    model = tiny_mixtral()
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=2**-4, x_zero_out_t=0.5, w_p_frac=2**-4))
    experts = _experts(model)
    hidden, index, weights = _routing(experts)
    grads = []
    for recompute in (False, True):
        assert pb.recompute_flipped_inputs(model, recompute) == len(bitflip_layers(model))
        experts.bitflip_calls.zero_()
        h = hidden.clone().requires_grad_()
        experts(h, index, weights).pow(2).sum().backward()
        grads.append((h.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
        experts.zero_grad()
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- issue 33: stuck-at and bursts

STUCK = dict(w_stuck_p_exp=2**-7, w_stuck_p_frac=2**-5, x_stuck_p_frac=2**-4, stuck_one_share=0.4)
BURSTS = dict(x_burst_rate=2**-5, w_burst_rate=2**-4, burst_length={2: 0.5, 3: 0.5})
FLIPS = dict(x_p_frac=2**-6, w_p_frac=2**-6, w_p_exp=2**-9, w_zero_out_t=0.06, x_zero_out_t=40.0)


def _nested(path: str, leaf: torch.nn.Module) -> torch.nn.Module:
    """A tree of ModuleDicts in which ``leaf`` is named ``path``."""
    root = node = torch.nn.ModuleDict()
    *parents, last = path.split(".")
    for part in parents:
        node[part] = torch.nn.ModuleDict()
        node = node[part]
    node[last] = leaf
    return root


def _linear_layers(stock, cfg):
    """{(proj, expert): a plain bit-flip linear layer (nn.Linear, or Conv1D for the transposed
    layout; no bias) named ``{EXPERTS}.{proj}.{expert}`` holding a copy of W[expert]}, flipped
    by ``cfg``: its streams, stuck bits and bursts are those of a linear layer of that name."""
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for proj in ("gate_up_proj" if stock.has_gate else "up_proj", "down_proj"):
        for e in range(stock.num_experts):
            w = getattr(stock, proj)[e].detach().clone()
            if stock.is_transposed:  # (in, out), as GPT-2's Conv1D stores it
                layer = Conv1D(w.shape[1], w.shape[0])
            else:
                layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            if stock.is_transposed:
                layer.bias = None
            tree = _nested(f"{EXPERTS}.{proj}.{e}", layer)
            pb.apply_bitflip(tree, cfg)
            layers[(proj, e)] = tree.get_submodule(f"{EXPERTS}.{proj}.{e}")
    return layers


def _experts_through_linear_layers(stock, layers, hidden, index, weights):
    """The stock eager loop with each expert matmul computed by its linear layer."""
    return _stock_loop(stock, hidden, index, weights, lambda proj, e, h: layers[(proj, e)](h))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
FAULT_CASES = [
    ("mixtral", "stuck"),
    ("gpt_oss", "bursts"),
    ("mixtral", "both"),
    ("gpt_oss", "both"),
]


def _faults(kind: str) -> dict:
    return {"stuck": STUCK, "bursts": BURSTS, "both": {**STUCK, **BURSTS}}[kind]


def _struck(stuck, bursts, t, call, tensor="w"):
    """``t`` (a matmul's weight, or with ``tensor="x"`` its input) with the matmul's stuck
    bits and its bursts at ``call`` (no flips); ``stuck`` / ``bursts`` may be None."""
    if stuck is not None:
        t = stuck.stuck(tensor, t)
    if bursts is not None:
        t = bursts.burst(tensor, t, call)
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch, faults", FAULT_CASES)
def test_expert_faults_equal_linear_layers_expert_by_expert(arch, faults, device):
    """Stuck bits and bursts of every expert matmul are those of a plain linear layer named
    ``{module}.{proj}.{expert}`` with the expert's weight (the transposed layout: a Conv1D),
    forward and backward (straight-through where stuck), at two calls.  On CUDA both run the
    Triton kernels: the stuck / burst weights are equal bit for bit, outputs and gradients
    within cuBLAS rounding (the same matmul on another operand layout may round otherwise)."""
    cfg = pb.BitflipConfig(**FLIPS, **_faults(faults), seed=5)
    model = MODELS[arch]()
    stock = copy.deepcopy(_experts(model))
    pb.apply_bitflip(model, cfg)
    experts = _experts(model).to(device)
    layers = {k: m.to(device) for k, m in _linear_layers(stock, cfg).items()}
    stock.to(device)
    assert all((m.bitflip_stuck is not None) == (faults != "bursts") for m in layers.values())
    assert all((m.bitflip_bursts is not None) == (faults != "stuck") for m in layers.values())
    for (proj, e), layer in layers.items():
        call = torch.tensor(1, device=device)
        stuck = experts.bitflip_stuck and experts.bitflip_stuck.matmul(proj, e)
        bursts = experts.bitflip_bursts and experts.bitflip_bursts.matmul(proj, e)
        with torch.no_grad():
            got = _struck(stuck, bursts, getattr(experts, proj)[e], call)
            want = _struck(layer.bitflip_stuck, layer.bitflip_bursts, layer.weight, call)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (proj, e)
    for call in range(2):
        hidden, index, weights = (t.to(device) for t in _routing(experts, seed=call))
        results = []
        for run in ("experts", "linear"):
            h = hidden.clone().requires_grad_()
            if run == "experts":
                out = experts(h, index, weights)
            else:
                out = _experts_through_linear_layers(stock, layers, h, index, weights)
            out.pow(2).sum().backward()
            results.append((out.detach(), h.grad))
        if device == "cpu":
            assert torch.equal(results[0][0], results[1][0]), (call, "forward")
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
        for proj in expert_params(experts):
            grad = getattr(experts, proj).grad
            for e in range(experts.num_experts):
                layer_grad = layers[(proj, e)].weight.grad
                if layer_grad is None:  # the expert got no token
                    assert not grad[e].any()
                    continue
                torch.testing.assert_close(grad[e], layer_grad, rtol=1e-5, atol=1e-6)
        for p in [*experts.parameters(), *(p for m in layers.values() for p in m.parameters())]:
            p.grad = None
    # the faults were there: the stock module computes something else
    with torch.no_grad():
        routing = [t.to(device) for t in _routing(experts)]
        assert not torch.equal(experts(*routing), stock(*routing))


def expert_params(experts):
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_cuda_expert_faults_equal_the_cpu_ones(arch):
    """The experts' faults do not depend on the device: ``export_stuck_positions`` lists the
    same stuck bits, and every expert's weight slice and input with its stuck bits and the
    bursts of a call are equal bit for bit on CUDA (Triton kernels) and on the CPU."""
    from peft_bitflip.stuck_at import export_stuck_positions

    cfg = pb.BitflipConfig(**FLIPS, **STUCK, **BURSTS, seed=7)
    models = {}
    for device in ("cpu", "cuda"):
        models[device] = MODELS[arch]()
        pb.apply_bitflip(models[device], cfg)
        models[device].to(device)
    assert export_stuck_positions(models["cpu"]) == export_stuck_positions(models["cuda"])
    cpu, gpu = _experts(models["cpu"]), _experts(models["cuda"])
    for dtype, ints in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        for proj in expert_params(cpu):
            w = getattr(cpu, proj).detach().to(dtype)
            x = torch.randn(5, w.shape[1 if cpu.is_transposed else 2]).to(dtype)
            for e in range(cpu.num_experts):
                for tensor, t in (("w", w[e]), ("x", x)):
                    got, want = (
                        _struck(
                            m.bitflip_stuck.matmul(proj, e),
                            m.bitflip_bursts.matmul(proj, e),
                            t.to(device),
                            torch.tensor(3, device=device),
                            tensor,
                        )
                        for m, device in ((gpu, "cuda"), (cpu, "cpu"))
                    )
                    assert torch.equal(got.cpu().view(ints), want.view(ints)), (proj, e, tensor)


def test_expert_stuck_positions_per_matmul_stable_reloaded_and_replayed(tmp_path, monkeypatch):
    """Every expert matmul has stuck bits of its own (named ``{module}.{proj}.{expert}``),
    the same at every call, on another rank and after save / reload; the exported list
    replays them."""
    from peft_bitflip.stuck_at import export_stuck_positions

    cfg = pb.BitflipConfig(**STUCK, **FLIPS, seed=3)
    model = tiny_mixtral()
    pb.apply_bitflip(model, cfg)
    ids = token_ids()
    first = export_stuck_positions(model)
    _logits(model, ids)
    assert export_stuck_positions(model) == first
    names = [f"{EXPERTS}.{p}.{e}" for p in ("gate_up_proj", "down_proj") for e in range(4)]
    assert EXPERTS not in first and all(n in first for n in names)
    for t in ("x", "w"):
        sets = [frozenset(map(tuple, first[n][t])) for n in names]
        assert all(sets) and len(set(sets)) == len(sets), t  # per expert and projection
    monkeypatch.setenv("RANK", "1")  # no rank in the stuck streams (unlike the flips)
    other_rank = tiny_mixtral()
    pb.apply_bitflip(other_rank, cfg)
    assert export_stuck_positions(other_rank) == first
    monkeypatch.delenv("RANK")
    model.save_pretrained(tmp_path)
    expected = _logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert export_stuck_positions(loaded) == first
    assert torch.equal(_logits(loaded, ids), expected)
    # the exported list alone (no rates) replays the drawn bits
    replay = tiny_mixtral()
    pb.apply_bitflip(replay, pb.BitflipConfig(**FLIPS, seed=3, stuck_at_positions=first))
    _reset_counters(model)
    assert torch.equal(_logits(replay, ids), _logits(model, ids))
    with pytest.raises(ValueError, match=r"mlp\.experts'\].*<module>\.<parameter>\.<expert>"):
        pb.apply_bitflip(tiny_mixtral(), pb.BitflipConfig(stuck_at_positions={EXPERTS: {}}))


def test_expert_bursts_strike_at_their_rate():
    """Burst events per element of the experts' inputs and weights: within 5 sd of the rate,
    on streams that differ between experts (the same weight struck at other elements)."""
    rate = 2**-6
    model = tiny_mixtral()
    thresholds = dict(x_zero_out_t=1e3, w_zero_out_t=1e3)
    pb.apply_bitflip(model, pb.BitflipConfig(x_burst_rate=rate, w_burst_rate=rate, **thresholds))
    experts = _experts(model)
    with torch.no_grad():
        experts.gate_up_proj.copy_(experts.gate_up_proj[0].expand_as(experts.gate_up_proj))
    routing = _routing(experts, tokens=64)
    with FlipStatsRecorder(model) as rec, torch.no_grad():
        experts(*routing)
        stats = rec.read_per_layer()[EXPERTS]
    for kind in ("x", "w"):
        s = stats[kind]
        assert s.burst_elements == s.elements > 0
        z = binomial_z(s.burst_events, s.burst_elements, rate)
        assert abs(z) < 5, (kind, s)
    struck = []
    for e in range(2):
        b = experts.bitflip_bursts.matmul("gate_up_proj", e)
        w = experts.gate_up_proj[e]
        struck.append(b.burst("w", w, torch.tensor(0)) != w)
    assert struck[0].any() and not torch.equal(struck[0], struck[1])


def test_training_step_with_expert_faults_and_lora_merge_keeps_them(tmp_path):
    """A training step through stuck and burst experts reaches every expert parameter and the
    LoRA factors of the experts (PEFT's ParamWrapper: the faults act on W + s*B@A);
    merge_and_unload keeps the same outputs."""
    from peft import get_peft_model

    model = tiny_mixtral().train()
    pb.apply_bitflip(model, pb.BitflipConfig(**STUCK, **BURSTS, **FLIPS))
    ids = token_ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for proj in ("gate_up_proj", "down_proj"):
        grad = getattr(_experts(model), proj).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    cfg = pb.BitflipLoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, init_lora_weights=False,
        **STUCK, **BURSTS, **FLIPS,
    )  # fmt: skip
    peft_model = get_peft_model(tiny_mixtral(), cfg)
    peft_model(ids, labels=ids).loss.backward()
    factors = [p for n, p in peft_model.named_parameters() if "experts" in n and p.requires_grad]
    assert factors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    peft_model.eval()
    _reset_counters(peft_model)
    adapter = _logits(peft_model, ids)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    _reset_counters(merged)
    assert torch.equal(_logits(merged, ids), adapter)
    with pb.disable_bitflips(merged):
        assert not torch.equal(_logits(merged, ids), adapter)


def test_frozen_expert_weights_are_stuck_once(monkeypatch):
    """The stuck slice of each expert is built once while W does not change (evaluation,
    frozen base weights: forward and backward reuse it) and again after an optimizer step."""
    from peft_bitflip.stuck_at import StuckAt

    builds = []
    original = StuckAt.stuck

    def counted(self, tensor, t):
        if tensor == "w":
            builds.append(self.name)
        return original(self, tensor, t)

    monkeypatch.setattr(StuckAt, "stuck", counted)
    model = tiny_mixtral()
    pb.apply_bitflip(model, pb.BitflipConfig(w_stuck_p_frac=2**-5, w_zero_out_t=1e3))
    experts = _experts(model)
    routing = _routing(experts, tokens=32)
    hit = routing[1].unique().numel()
    with torch.no_grad():
        outputs = [experts(*routing) for _ in range(3)]
    assert all(torch.equal(outputs[0], o) for o in outputs)
    assert sorted(builds) == sorted({*builds}) and len(builds) == 2 * hit  # once per matmul
    opt = torch.optim.SGD([experts.down_proj], lr=0.1)
    experts(*routing).sum().backward()
    assert len(builds) == 2 * hit and experts.down_proj.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        experts(*routing)
    assert len(builds) == 3 * hit  # down_proj's slices again, gate_up_proj's kept


def test_expert_stuck_lanes_fused_in_the_flip_kernel(needs_interpreter, monkeypatch):
    """On the Triton backend (here its interpreter) the experts' stuck input lanes go to the
    flip kernel's pass over x, not a pass of their own; outputs and gradients are those of the
    CPU path, which forces them separately first."""
    from peft_bitflip.stuck_at import _ApplyStuck

    lane_passes = []
    monkeypatch.setattr(
        _ApplyStuck,
        "apply",
        lambda *a, _f=_ApplyStuck.apply: lane_passes.append(a[4]) or _f(*a),
    )
    cfg = pb.BitflipConfig(x_stuck_p_frac=2**-3, x_p_frac=2**-6, x_zero_out_t=40.0, seed=1)
    got = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
        model = tiny_mixtral()
        pb.apply_bitflip(model, cfg)
        experts = _experts(model)
        hidden, index, weights = _routing(experts, tokens=3)
        lane_passes.clear()
        h = hidden.requires_grad_()
        out = experts(h, index, weights)
        out.pow(2).sum().backward()
        got[backend] = (out.detach(), h.grad, experts.down_proj.grad)
        matmuls = 2 * index.unique().numel()
        assert sum(lane_passes) == (0 if backend == "triton" else matmuls), backend
    for a, b in zip(got["triton"], got["reference"]):
        assert torch.equal(a, b)


# ---------------------------------------------- issue 33: torch.compile with stuck bits and bursts

EAGER_LOOP = "data-dependent MoE experts loop"  # the reason of the experts' graph break


def _expert_rules(kind: str) -> pb.BitflipConfig:
    """Flips and zero-out on every layer; the stuck bits and / or bursts on the experts."""
    rule = {k: v for k, v in _faults(kind).items() if k != "burst_length"}
    rules = {r".*\.experts": rule, "default": {}}
    return pb.BitflipConfig(
        **FLIPS, seed=5, burst_length=BURSTS["burst_length"], layer_name_to_config=rules
    )


def _counters(model) -> list[int]:
    return [int(m.bitflip_calls) for m in model.modules() if hasattr(m, "bitflip_calls")]


@pytest.mark.parametrize(
    "arch, faults", [("gpt_oss", "stuck"), ("mixtral", "bursts"), ("gpt_oss", "both")]
)
def test_compiled_model_with_expert_faults_gives_the_eager_results(arch, faults):
    """Under ``torch.compile`` (aot_eager) the flipped experts loop runs eagerly, its only
    graph break (the rest of the model compiles): a tiny MoE model with stuck bits and / or
    bursts on its experts gives the eager model's logits, input and parameter gradients at
    two calls, without recompiling at the second, and the call counters advance alike."""
    from torch._dynamo.utils import counters

    eager = MODELS[arch]().train()
    pb.apply_bitflip(eager, _expert_rules(faults))
    experts = _experts(eager)
    assert (experts.bitflip_stuck is not None) == (faults != "bursts")
    assert (experts.bitflip_bursts is not None) == (faults != "stuck")
    assert eager.get_submodule("model.layers.0.self_attn.q_proj").bitflip_stuck is None
    twin = copy.deepcopy(eager)
    ids = token_ids(2, 6)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(twin, backend="aot_eager")
        for call in range(2):
            results = []
            for model, run in ((eager, eager), (twin, compiled)):
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                out = run(inputs_embeds=embeds, labels=ids)
                out.loss.backward()
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                results.append((out.logits.detach(), embeds.grad, grads))
                model.zero_grad(set_to_none=True)
            (logits, grad_in, grads), (c_logits, c_grad_in, c_grads) = results
            assert torch.equal(logits, c_logits), call
            assert torch.equal(grad_in, c_grad_in), call
            assert grads.keys() == c_grads.keys() and any("experts" in n for n in grads)
            assert all(torch.equal(grads[n], c_grads[n]) for n in grads), call
            if call == 0:
                graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs  # no recompile
        breaks = list(counters["graph_break"])
        assert breaks and all(EAGER_LOOP in reason for reason in breaks), breaks
        assert _counters(twin) == _counters(eager) == [2] * len(_counters(eager))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_compiled_experts_module_gives_the_eager_results_and_no_full_graph(arch):
    """The experts module compiled on its own, with stuck bits, bursts, flips and zero-out:
    the eager outputs, input and weight gradients at two calls.  ``fullgraph=True`` cannot
    hold it (which experts get tokens, and how many, decides the loop): the error says why."""
    model = MODELS[arch]()
    pb.apply_bitflip(model, pb.BitflipConfig(**FLIPS, **STUCK, **BURSTS, seed=5))
    experts = _experts(model)
    routings = [_routing(experts, tokens=6, seed=call) for call in range(2)]
    results = {"eager": [], "compiled": []}
    torch._dynamo.reset()
    try:
        compiled = torch.compile(experts, backend="aot_eager")
        for run, module in (("eager", experts), ("compiled", compiled)):
            experts.bitflip_calls.zero_()
            for hidden, index, weights in routings:
                h = hidden.clone().requires_grad_()
                out = module(h, index, weights)
                out.pow(2).sum().backward()
                results[run] += [out.detach(), h.grad]
                results[run] += [p.grad for p in experts.parameters() if p.grad is not None]
                experts.zero_grad(set_to_none=True)
            assert int(experts.bitflip_calls) == 2
        assert len(results["eager"]) == len(results["compiled"]) >= 2 * 4
        assert all(torch.equal(a, b) for a, b in zip(results["eager"], results["compiled"]))
        full = torch.compile(experts, backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match=EAGER_LOOP):
            full(*_routing(experts, tokens=6))
    finally:
        torch._dynamo.reset()
