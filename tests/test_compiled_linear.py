"""The bit-flip layers under torch.compile: the fused forward and backward enter the graph as
the ops of peft_bitflip.compiled_linear, give what the eager layers give (same flips for the
same seed and call, same gradients, counters advancing alike), and keep no flipped weight for
backward (the unfused form, traced before, did)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import peft_bitflip as pb
from peft_bitflip.compiled_linear import compiled_flipped_linear
from peft_bitflip.flipped_linear import flipped_linear_unfused
from peft_bitflip.spec import FlipSpec


@pytest.fixture(autouse=True)
def _cpu_reference(reference_backend):
    pass


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models: dynamo's caches (and its recompile limit, 8 per code
    object, which the layers' shared forward would reach over this file) start empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


X_SPEC = FlipSpec(0.02, 0.02, 3.0)  # many flips and zeroed elements at this size
W_SPEC = FlipSpec(0.02, 0.01, 0.2)
KEYS = (pb.stream_key(0, "l", "x"), pb.stream_key(0, "l", "w"))
CONFIG = pb.BitflipConfig(
    x_p_exp=0.02, x_p_frac=0.02, x_zero_out_t=3.0, w_p_exp=0.02, w_p_frac=0.01, w_zero_out_t=0.2
)


def run(fn, x_spec=X_SPEC, grad_x=True, grad_w=True, conv1d=False, **kw):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 24, generator=gen) * 2).requires_grad_(grad_x)
    w = torch.randn(*((24, 16) if conv1d else (16, 24)), generator=gen) * 0.2
    w.requires_grad_(grad_w)
    b = torch.randn(16, generator=gen).requires_grad_()
    y = fn(x, w, b, x_spec, W_SPEC, *KEYS, torch.tensor(3), conv1d, **kw)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("grad_x,grad_w", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("conv1d", [False, True])
def test_the_op_gives_the_unfused_outputs_and_gradients(recompute, grad_x, grad_w, conv1d):
    want = run(flipped_linear_unfused, grad_x=grad_x, grad_w=grad_w, conv1d=conv1d)
    got = run(
        compiled_flipped_linear, grad_x=grad_x, grad_w=grad_w, conv1d=conv1d,
        recompute_input=recompute,
    )  # fmt: skip
    assert torch.equal(got[0], want[0])
    for g, e in zip(got[1:], want[1:]):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    assert (want[1] is None or (want[1] == 0).any()) and (want[2] is None or (want[2] == 0).any())


@pytest.mark.parametrize("x_spec", [FlipSpec(), FlipSpec(0.0, 0.0, 3.0), FlipSpec(0.05, 0.0)])
def test_the_op_with_x_unflipped_or_only_zeroed_or_unthresholded(x_spec):
    want = run(flipped_linear_unfused, x_spec=x_spec)
    got = run(compiled_flipped_linear, x_spec=x_spec)
    # without a threshold x's flips can make Inf/NaN: equal where both are NaN
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    for g, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, equal_nan=True)


class GraphRecorder:
    """An aot_eager-like backend that keeps the forward and backward FX graphs it compiles."""

    def __init__(self):
        self.forward, self.backward = [], []
        self.backend = aot_autograd(fw_compiler=self._fw, bw_compiler=self._bw)

    def _fw(self, gm, _inputs):
        self.forward.append(gm)
        return gm.forward

    def _bw(self, gm, _inputs):
        self.backward.append(gm)
        return gm.forward


def ops_in(graphs):
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def mlp(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False)
    )
    pb.apply_bitflip(model, CONFIG)
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_model_equals_eager_over_steps(autocast):
    eager = mlp()
    compiled_model = copy.deepcopy(eager)
    recorder = GraphRecorder()
    compiled = torch.compile(compiled_model, backend=recorder.backend, fullgraph=True)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1)) * 2
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    outs = []
    for _ in range(3):  # a new call index each step, without recompiling
        with ctx:
            ye, yc = eager(x), compiled(x)
        assert torch.equal(ye, yc)
        outs.append(ye)
        ye.float().square().sum().backward()
        yc.float().square().sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-5, msg=name)
            if name.endswith("weight"):  # the zero-out masked some of the gradient
                assert (pe.grad == 0).any(), name
            pe.grad = pc.grad = None
    assert not torch.equal(outs[0], outs[1])
    for le, lc in zip(eager, compiled_model):
        if isinstance(le, pb.BitflipLinear):
            assert int(le.bitflip_calls) == int(lc.bitflip_calls) == 3
    assert len(recorder.forward) == len(recorder.backward) == 1  # compiled once
    fw, bw = ops_in(recorder.forward), ops_in(recorder.backward)
    assert fw.count("peft_bitflip.flipped_linear.default") == 2
    assert bw.count("peft_bitflip.flipped_linear_backward.default") == 2
    assert not any("peft_bitflip.bitflip" in t for t in fw + bw)  # not the unfused form


def test_compiled_graph_keeps_no_flipped_weight():
    """What the forward graph hands to backward: inputs, flip(x), masks, call indices; no
    tensor of a weight's shape except the weights themselves (graph inputs)."""
    model = mlp()
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder.backend, fullgraph=True)
    compiled(torch.randn(5, 24) * 2).sum().backward()
    (fw,) = recorder.forward
    (output,) = [n for n in fw.graph.nodes if n.op == "output"]
    placeholders = {n for n in fw.graph.nodes if n.op == "placeholder"}
    weight_shapes = {tuple(m.weight.shape) for m in model if isinstance(m, pb.BitflipLinear)}
    saved = [n for n in output.args[0][1:] if n is not None and n not in placeholders]
    shapes = {tuple(n.meta["val"].shape) for n in saved if "val" in n.meta}
    assert shapes and not shapes & weight_shapes


def test_compiled_no_grad_forward_and_stats_fall_back_alike():
    eager = mlp()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 24) * 2
    with torch.no_grad():
        assert torch.equal(eager(x), compiled(x))
        assert torch.equal(eager(x), compiled(x))
    # a layer recording statistics runs eagerly inside the compiled model (a graph break):
    # the same flips, and the same counts as the eager model's
    recorders = pb.FlipStatsRecorder(eager), pb.FlipStatsRecorder(compiled_model)
    with recorders[0], recorders[1]:
        assert torch.equal(eager(x), torch.compile(compiled_model, backend="aot_eager")(x))
    counts = [r.read()["all"] for r in recorders]
    assert counts[0].as_tuple() == counts[1].as_tuple() and counts[0].exp_flips > 0
    assert torch.equal(eager(x), compiled(x))  # and compiled again without statistics


@pytest.mark.parametrize("backend", ["graph", "inductor"])
def test_compiled_no_grad_forward_takes_the_call_without_a_snapshot(backend):
    """Without gradients the compiled forward takes the call index as a plain clone of the
    counter (no opaque ``call_snapshot``, which inductor cannot fold away: one op less per
    layer).  The op must still see the value from before the increment: each call
    equals the eager model's, and the counters advance alike."""
    eager = mlp()
    twin = copy.deepcopy(eager)
    recorder = GraphRecorder()
    compiled = torch.compile(
        twin, backend=recorder.backend if backend == "graph" else "inductor", fullgraph=True
    )
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(3)) * 2
    outs = []
    with torch.no_grad():
        for _ in range(3):
            ye, yc = eager(x), compiled(x)
            assert torch.equal(ye, yc)
            outs.append(yc)
    assert not torch.equal(outs[0], outs[1])
    calls = [int(m.bitflip_calls) for m in (*eager, *twin) if isinstance(m, pb.BitflipLinear)]
    assert calls == [3] * 4
    if backend == "graph":
        fw = ops_in(recorder.forward)
        assert fw.count("peft_bitflip.flipped_linear.default") == 2
        assert "peft_bitflip.call_snapshot.default" not in fw
        # with gradients the snapshot stays (backward needs the index past the increment)
        compiled(x).sum().backward()
        assert ops_in(recorder.forward[-1:]).count("peft_bitflip.call_snapshot.default") == 2


def test_inductor_backward_draws_the_forward_flips():
    """Inductor (here its CPU backend) gives the eager gradients.  The call index that the
    forward used must reach backward unchanged: a plain clone of the counter was recomputed
    in the backward graph after the counter's increment, so backward flipped W with the next
    call's stream and masked the wrong gradient entries."""
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False))
    pb.apply_bitflip(eager, CONFIG)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="inductor", fullgraph=True)
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(2)) * 2
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        assert torch.equal(ye, yc)
        ye.square().mean().backward()
        yc.square().mean().backward()
        for (name, pe), pc in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-7, msg=name)
            pe.grad = pc.grad = None


def lora_mlp(seed=0):
    """A two-layer MLP with bit-flip LoRA adapters (B drawn non-zero, so the adapters count)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cfg = pb.BitflipLoraConfig.from_bitflip_config(
        CONFIG, r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0
    )
    model = get_peft_model(base, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("backend", ["recorder", "inductor"])
def test_compiled_lora_model_runs_the_fused_ops_and_equals_eager(backend):
    """Bit-flip LoRA under torch.compile: the fused LoRA layer enters the graphs as
    peft_bitflip::flipped_lora_linear and its backward op (not the unfused merge), and the
    compiled model gives the eager outputs and adapter gradients over two steps."""
    eager = lora_mlp()
    twin = copy.deepcopy(eager)
    recorder = GraphRecorder()
    compiled = torch.compile(
        twin, backend=recorder.backend if backend == "recorder" else "inductor", fullgraph=True
    )
    x = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(2)) * 2
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        assert torch.equal(ye, yc)
        ye.square().mean().backward()
        yc.square().mean().backward()
        trained = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
        assert len(trained) == 4  # A and B of both layers
        twins = dict(twin.named_parameters())
        for name, pe in trained:
            torch.testing.assert_close(twins[name].grad, pe.grad, rtol=1e-5, atol=1e-7, msg=name)
            pe.grad = twins[name].grad = None
    if backend == "recorder":
        fw, bw = ops_in(recorder.forward), ops_in(recorder.backward)
        assert fw.count("peft_bitflip.flipped_lora_linear.default") == 2
        assert bw.count("peft_bitflip.flipped_lora_linear_backward.default") == 2
        assert not any("merge" in op for op in fw)
