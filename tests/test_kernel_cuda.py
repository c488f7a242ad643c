"""The Triton kernel on a CUDA GPU agrees bit for bit with the CPU reference (needs CUDA)."""

from __future__ import annotations

import functools

import pytest
import torch
from bitstats import INT_VIEW, assert_binomial, group_counts

import peft_bitflip as pb
from peft_bitflip.kernels import reference
from peft_bitflip.kernels.sampling import flip_table, group_size

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
P_PAIRS = [(0.5, 0.5), (2**-6, 2**-10), (1e-3, 1e-3), (2**-16, 2**-16), (1e-9, 1e-12), (0.0, 0.3)]


def _bits(t):
    return t.contiguous().view(INT_VIEW[t.element_size() * 8])


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_exp,p_frac", P_PAIRS)
def test_cuda_kernel_matches_cpu_reference(dtype, p_exp, p_frac):
    torch.manual_seed(0)
    n = (1 << 20) + 123
    x = torch.randn(n, dtype=dtype) * 3
    for t, call in [(None, 0), (2.0, 17)]:
        y_gpu = pb.bitflip(x.cuda(), p_exp, p_frac, t, seed=5, stream="s", call=call).cpu()
        y_cpu = pb.bitflip(x, p_exp, p_frac, t, seed=5, stream="s", call=call)
        assert torch.equal(_bits(y_gpu), _bits(y_cpu)), (dtype, p_exp, p_frac, t)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backward_matches_cpu(dtype):
    x = torch.randn(1 << 18, dtype=dtype) * 2
    g = torch.randn(1 << 18, dtype=dtype)
    xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
    for xi in xs:
        (pb.bitflip(xi, 0.01, 0.01, 1.5, seed=2) * g.to(xi.device)).sum().backward()
    assert torch.equal(_bits(xs[0].grad), _bits(xs[1].grad.cpu()))


@cuda
def test_cuda_flip_rates_large_tensor():
    n = 1 << 26
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = pb.bitflip(x, 2**-16, 2**-20, seed=3)
    n_exp, n_frac = group_counts(x.cpu(), y.cpu())
    assert_binomial(n_exp, n * 9, 2**-16, what="exp")
    assert_binomial(n_frac, n * 7, 2**-20, what="frac")


@cuda
def test_cuda_torch_compile_inductor():
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)

    def f(x, w, call):
        return pb.bitflip(x, 1e-3, 1e-3, 30.0, seed=1, stream="x", call=call) @ w.t()

    cf = torch.compile(f, fullgraph=True)
    for c in range(2):
        call = torch.tensor(c, device="cuda")
        assert torch.equal(cf(x, w, call), f(x, w, call))


@cuda
def test_more_than_2_31_elements():
    """64-bit offsets and group counters: the tail of a 2^31 + 4096 element tensor."""
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 4096
    if free < 3 * n * 2:
        pytest.skip("not enough GPU memory")
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    y = pb.bitflip(x, 1e-3, 1e-3, seed=8, stream="big")
    del x
    tail = 1 << 16
    start = n - tail
    assert start % group_size(torch.bfloat16) == 0
    table = flip_table(1e-3, 1e-3, torch.bfloat16, "cpu")
    key = pb.stream_key(8, "big")
    masks = reference.flip_masks(tail, torch.bfloat16, table, 0, *key, start=start)
    expected = (
        torch.ones(tail, dtype=torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    ) ^ masks
    got = y[start:].cpu().view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got, expected)
    assert (masks != 0).sum() > 100


@cuda
@pytest.mark.parametrize(
    "xs,ws",
    [
        (pb.FlipSpec(2**-8, 2**-8, 2.0), pb.FlipSpec(2**-10, 2**-6, 1.5)),
        (pb.FlipSpec(1e-3, 0.3, 3.0), pb.FlipSpec(0.3, 2**-4, 1.5)),  # dense fields
    ],
)
def test_cuda_one_launch_for_x_and_w_and_in_place_grad_mask_match_cpu(xs, ws):
    """The layers' paired forward launch and in-place gradient mask (the backward's recompute)
    on the GPU equal the CPU reference bit for bit, at low p and at high p."""
    from peft_bitflip import functional as F

    torch.manual_seed(1)
    x = torch.randn(4, 300, 256, dtype=torch.bfloat16) * 2
    w = torch.randn(512, 256, dtype=torch.bfloat16)
    kx, kw = pb.stream_key(3, "l", "x"), pb.stream_key(3, "l", "w")
    got = F.apply_flip_specs(x.cuda(), w.cuda(), xs, ws, kx, kw, 9)
    want = (F.apply_flip_spec(x, xs, kx, 9), F.apply_flip_spec(w, ws, kw, 9))
    for g_, w_ in zip(got, want):
        assert torch.equal(_bits(g_.cpu()), _bits(w_))
    grad = torch.randn(x.shape)
    expected = F.flip_spec_grad(grad, x, xs, kx, 9)
    grad_gpu = grad.cuda()
    xf = F.flip_spec_grad_(grad_gpu, x.cuda(), xs, kx, 9, want_flipped=True)
    assert torch.equal(grad_gpu.cpu(), expected)
    assert torch.equal(_bits(xf.cpu()), _bits(want[0]))
    assert (expected == 0).any()


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_packed_zero_masks_match_cpu(dtype):
    """The flip with its packed zero mask (single and paired launch) and the mask-zeroing
    kernel on the GPU equal the CPU reference bit for bit."""
    from peft_bitflip import functional as F

    torch.manual_seed(2)
    x = torch.randn(3, 301, 256, dtype=dtype) * 2
    w = torch.randn(512, 256, dtype=dtype)
    xs, ws = pb.FlipSpec(2**-8, 2**-8, 2.0), pb.FlipSpec(2**-10, 2**-6, 1.5)
    kx, kw = pb.stream_key(4, "l", "x"), pb.stream_key(4, "l", "w")
    xf, x_mask = F.apply_flip_spec_masked(x, xs, kx, 11)
    assert x_mask.any()
    for got_x, got_mask in (
        F.apply_flip_spec_masked(x.cuda(), xs, kx, 11),
        F.flip_specs_masked(x.cuda(), w.cuda(), xs, ws, kx, kw, 11, True)[::2],
    ):
        assert torch.equal(_bits(got_x.cpu()), _bits(xf))
        assert torch.equal(got_mask.cpu(), x_mask)
    grad = torch.randn(x.shape)
    expected = F.zero_masked_(grad.clone(), x_mask, dtype)
    assert torch.equal(F.zero_masked_(grad.cuda(), x_mask.cuda(), dtype).cpu(), expected)
    w_mask = F.apply_flip_spec_masked(w, ws, kw, 11)[1]
    grad_w = torch.randn(w.shape)
    expected_w = F.zero_masked_(grad_w.clone(), w_mask, dtype)
    got_x, got_w = grad.cuda(), grad_w.cuda()
    F.zero_masked_(got_x, x_mask.cuda(), dtype, got_w, w_mask.cuda(), dtype)  # one launch
    assert torch.equal(got_x.cpu(), expected) and torch.equal(got_w.cpu(), expected_w)
    assert torch.equal(expected, F.flip_spec_grad(grad, x, xs, kx, 11))


@cuda
@pytest.mark.parametrize("specs", ["x and w", "only x", "only w"])
def test_cuda_layer_counter_written_by_the_flip_kernel(specs):
    """A BitflipLinear on the GPU: each forward (no_grad, with grad, LoRA) advances its
    counter by one, written by the flip kernel, and flips as the CPU reference does at that
    call index."""
    from peft_bitflip.flipped_linear import flipped_linear_unfused

    x_spec, w_spec = pb.FlipSpec(0.01, 0.01, 3.0), pb.FlipSpec(0.01, 0.01, 0.2)
    x_spec = pb.FlipSpec() if specs == "only w" else x_spec
    w_spec = pb.FlipSpec() if specs == "only x" else w_spec
    torch.manual_seed(0)
    layer = pb.BitflipLinear(256, 128, dtype=torch.bfloat16)
    layer.init_bitflip("l", x_spec, w_spec, seed=1)
    layer.cuda()
    xs = [torch.randn(64, 256, dtype=torch.bfloat16) * 2 for _ in range(3)]
    with torch.no_grad():
        y0 = layer(xs[0].cuda())
    y1 = layer(xs[1].cuda().requires_grad_())
    y1.float().sum().backward()
    assert int(layer.bitflip_calls) == 2
    for i, y in enumerate((y0, y1)):
        with torch.no_grad():
            want = flipped_linear_unfused(
                xs[i], layer.weight.cpu(), layer.bias.cpu(), x_spec, w_spec,
                *layer.stream_keys(), torch.tensor(i),
            )  # fmt: skip
        torch.testing.assert_close(y.float().cpu(), want.float(), rtol=2e-2, atol=2e-2)
    a = (torch.randn(8, 256, device="cuda") * 0.1).requires_grad_()
    b = torch.randn(128, 8, device="cuda") * 0.1
    layer.flipped_lora_forward(xs[2].cuda().requires_grad_(), a, b, 2.0).float().sum().backward()
    assert int(layer.bitflip_calls) == 3


@cuda
def test_cuda_graph_of_an_eager_forward_advances_the_counter_on_each_replay():
    """A CUDA graph captured around an eager forward: each replay draws new flips and advances
    the counter (it is incremented in place while capturing)."""
    torch.manual_seed(0)
    layer = pb.BitflipLinear(256, 128, dtype=torch.bfloat16)
    layer.init_bitflip("l", pb.FlipSpec(0.01, 0.01, 3.0), pb.FlipSpec(0.01, 0.01, 0.2))
    layer.cuda()
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer(x)  # warm-up outside the capture (Triton compiles here)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    start = int(layer.bitflip_calls)
    outs = []
    for _ in range(2):
        graph.replay()
        outs.append(y.clone())
    assert int(layer.bitflip_calls) == start + 2
    assert not torch.equal(outs[0], outs[1])


def _assert_inductor_equals_eager(eager, mode=None):
    """torch.compile (inductor, ``mode``) of a copy of ``eager`` (bf16, on the GPU, input width
    512) gives its outputs bit for bit and its gradients, three training steps (the compiled
    copy runs first), then a no-grad call."""
    import copy

    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, mode=mode)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16) * 2
    twins = dict(twin.named_parameters())
    for _ in range(3):
        yc = compiled(x)
        ye = eager(x)
        assert torch.equal(ye, yc)
        yc.float().square().mean().backward()
        ye.float().square().mean().backward()
        for name, pe in eager.named_parameters():
            if pe.requires_grad:  # the loss's backward is inductor's: close, not equal
                torch.testing.assert_close(twins[name].grad, pe.grad, msg=name)
                pe.grad = twins[name].grad = None
    with torch.no_grad():
        assert torch.equal(compiled(x), eager(x))


def _flipped_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256, bias=False)
    )  # no op between the layers: inductor's own kernels could round differently
    cfg = pb.BitflipConfig(
        x_p_exp=1e-3, x_p_frac=1e-3, x_zero_out_t=3.0,
        w_p_exp=1e-3, w_p_frac=1e-3, w_zero_out_t=0.04,
    )  # fmt: skip
    pb.apply_bitflip(net, cfg)
    return net.to("cuda", torch.bfloat16)


def _flipped_lora_net():
    from peft import get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 256, bias=False))
    cfg = pb.BitflipLoraConfig(
        r=8, lora_alpha=16, target_modules=["0", "1"], lora_dropout=0.0,
        x_p_exp=1e-3, x_p_frac=1e-3, x_zero_out_t=3.0,
        w_p_exp=1e-3, w_p_frac=1e-3, w_zero_out_t=0.04,
    )  # fmt: skip
    model = get_peft_model(net.to("cuda", torch.bfloat16), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


@cuda
def test_cuda_inductor_compiled_layers_equal_eager():
    """torch.compile (inductor) of a model of bit-flip layers: the fused layer ops in the graph
    give the eager model's outputs and gradients, step after step."""
    _assert_inductor_equals_eager(_flipped_net())


@cuda
def test_cuda_inductor_compiled_lora_equals_eager():
    """torch.compile (inductor) of a bit-flip LoRA model: the fused LoRA ops in the graph give
    the eager model's outputs and adapter gradients.  (First passed on an H200, 2026-12-03.)"""
    _assert_inductor_equals_eager(_flipped_lora_net())


@cuda
@pytest.mark.parametrize("lora", [False, True], ids=["layers", "lora"])
def test_cuda_graphs_with_new_flip_tables_equal_eager(lora):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of a model whose flip tables do not
    exist yet: the layers create them during the graphs' warm-up, outside the graphs' memory
    pool (a table kept in the pool failed inductor's pool check in a fresh process, and replays
    could overwrite it); steps equal the eager model's."""
    from peft_bitflip.kernels import sampling

    torch._dynamo.reset()
    sampling._DEVICE_TABLES.clear()
    _assert_inductor_equals_eager(
        _flipped_lora_net() if lora else _flipped_net(), "reduce-overhead"
    )


def _every_kernel_once(xg, w, call):
    """Run each kernel that the layers launch (paired, single and masked flips, the in-place
    gradient mask, the mask-zeroing kernel on two tensors, the LoRA merge + flip with its mask,
    the zeroed-weight correction with the input gradient's mask, the merge with x's flip) on
    ``xg`` (GPU, bf16, any view) and ``w`` (CPU, bf16, (out, in)), and check each result
    against the CPU reference: bit for bit, the correction within float32 rounding."""
    from peft_bitflip import functional as F
    from peft_bitflip.kernels import lora

    xs, ws = pb.FlipSpec(2**-8, 2**-8, 2.0), pb.FlipSpec(2**-10, 2**-6, 1.5)
    kx, kw = pb.stream_key(6, "l", "x"), pb.stream_key(6, "l", "w")
    x, wg = xg.cpu(), w.cuda()
    want_x, want_mask = F.apply_flip_spec_masked(x, xs, kx, call)
    want_w, w_mask = F.apply_flip_spec_masked(w, ws, kw, call)
    got_x, got_w, got_mask = F.flip_specs_masked(xg, wg, xs, ws, kx, kw, call, True)
    for got, want in ((got_x, want_x), (got_w, want_w)):
        assert torch.equal(_bits(got.cpu()), _bits(want))
    assert torch.equal(got_mask.cpu(), want_mask)
    assert torch.equal(_bits(F.apply_flip_spec(xg, xs, kx, call).cpu()), _bits(want_x))
    single_x, single_mask = F.apply_flip_spec_masked(xg, xs, kx, call)
    assert torch.equal(_bits(single_x.cpu()), _bits(want_x))
    assert torch.equal(single_mask.cpu(), want_mask)
    grad = torch.randn(x.shape, dtype=x.dtype)
    grad_g = grad.cuda()
    flipped = F.flip_spec_grad_(grad_g, xg, xs, kx, call, want_flipped=True)
    assert torch.equal(_bits(flipped.cpu()), _bits(want_x))
    assert torch.equal(_bits(grad_g.cpu()), _bits(F.flip_spec_grad(grad, x, xs, kx, call)))
    grad_w = torch.randn(w.shape, dtype=w.dtype)
    gx, gw = grad.cuda(), grad_w.cuda()
    F.zero_masked_(gx, want_mask.cuda(), x.dtype, gw, w_mask.cuda(), w.dtype)
    assert torch.equal(_bits(gx.cpu()), _bits(F.zero_masked_(grad.clone(), want_mask, x.dtype)))
    assert torch.equal(_bits(gw.cpu()), _bits(F.zero_masked_(grad_w.clone(), w_mask, w.dtype)))
    gen = torch.Generator().manual_seed(call)
    a = torch.randint(-4, 5, (2, w.shape[1]), generator=gen).float() / 4
    b = torch.randint(-4, 5, (w.shape[0], 2), generator=gen).float() / 4
    w32 = torch.randint(-8, 9, w.shape, generator=gen).float() / 8  # W + 0.5 B@A is exact
    got_m, got_zeroed = lora.merge_flip_lora(
        w32.cuda(), a.cuda(), b.cuda(), 0.5, False, torch.bfloat16, ws, kw,
        torch.tensor(call, device="cuda"), True,
    )  # fmt: skip
    want_m, want_zeroed = lora.merge_flip_lora(
        w32, a, b, 0.5, False, torch.bfloat16, ws, kw, torch.tensor(call), True
    )
    assert torch.equal(_bits(got_m.cpu()), _bits(want_m))
    assert torch.equal(got_zeroed.cpu(), want_zeroed) and want_zeroed.any()
    g2 = torch.randn(x.numel() // x.shape[-1], w.shape[0])
    x2 = torch.randn(g2.shape[0], w.shape[1])
    got_c = [torch.zeros(a.shape, device="cuda"), torch.zeros(b.shape, device="cuda")]
    got_gx = grad.cuda()
    lora.subtract_zeroed_correction_(
        *got_c, got_zeroed, g2.cuda(), x2.cuda(), a.cuda(), b.cuda(), got_gx,
        want_mask.cuda(), x.dtype,
    )  # fmt: skip
    want_c = [torch.zeros(a.shape), torch.zeros(b.shape)]
    want_gx = grad.clone()
    lora.subtract_zeroed_correction_(
        *want_c, want_zeroed, g2, x2, a, b, want_gx, want_mask, x.dtype
    )
    for got, want in zip(got_c, want_c):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-3)
    assert torch.equal(_bits(got_gx.cpu()), _bits(want_gx))
    # the backward's merge launch writes s*A and s*B rounded to bf16 as torch rounds them
    a_r, b_r = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
    got_f = lora.merge_flip_lora_for_grads(
        w32.cuda(), a_r.cuda(), b_r.cuda(), 0.3, False, torch.bfloat16, ws, kw,
        torch.tensor(call, device="cuda"),
    )  # fmt: skip
    assert torch.equal(_bits(got_f[2].cpu()), _bits((a_r * 0.3).to(torch.bfloat16)))
    assert torch.equal(_bits(got_f[3].cpu()), _bits((b_r * 0.3).to(torch.bfloat16)))
    # the LoRA forward's one launch: x's flip and mask with the merged weight's flip
    got_mw, got_xf, got_xm = lora.merge_flip_lora_and_x(
        w32.cuda(), a.cuda(), b.cuda(), 0.5, False, torch.bfloat16, ws, kw, xg, xs, kx,
        torch.tensor(call, device="cuda"), True,
    )  # fmt: skip
    assert torch.equal(_bits(got_mw.cpu()), _bits(want_m))
    assert torch.equal(_bits(got_xf.cpu()), _bits(want_x))
    assert torch.equal(got_xm.cpu(), want_mask)


@cuda
def test_cuda_direct_launches_equal_the_cpu_reference():
    """The kernels' launchers (``kernels/launcher.py``) call Triton's JIT once per
    specialisation and the compiled kernel directly after that: second launches with the same
    specialisation (another call index, other values) equal the CPU reference bit for bit too,
    and a misaligned view or an element count not divisible by 16 gets its own kernel."""
    from peft_bitflip.kernels import launcher, triton_bitflip, triton_lora

    if not launcher.direct_launch_enabled():
        pytest.skip("direct launches are off for this Triton release")
    launchers = [
        triton_bitflip._launch_single,
        triton_bitflip._launch_pair,
        triton_bitflip._launch_zero_by_masks,
        triton_lora._launch_merge_flip,
        triton_lora._launch_zeroed_correction,
    ]
    torch.manual_seed(3)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    n_odd = 7 * 61 * 63  # not a multiple of 16
    aligned = torch.randn(5, 48, 64, dtype=torch.bfloat16, device="cuda") * 2
    odd = torch.empty(n_odd + 1, dtype=torch.bfloat16, device="cuda")[1:].view(7, 61, 63)
    odd.copy_(torch.randn(7, 61, 63) * 2)  # 2 bytes into its storage: misaligned
    assert odd.data_ptr() % 16 and aligned.data_ptr() % 16 == 0
    for xg in (aligned, odd, aligned[:, :47]):  # the last is not contiguous
        _every_kernel_once(xg, w, call=3)  # compiles and launches through the JIT, if new
        known = {id(ln): set(ln._compiled) for ln in launchers}
        assert all(known.values())
        _every_kernel_once(xg.neg_(), w * 0.5, call=4)  # the same specialisations: direct
        for ln in launchers:
            assert set(ln._compiled) == known[id(ln)], ln.fn.__name__
    single = triton_bitflip._launch_single._compiled
    assert len({spec[3] for spec in single}) >= 2  # aligned and misaligned inputs


@cuda
def test_cuda_mm_float32_is_the_float32_product():
    """The LoRA gradients' rank-r products in float32 (``mm_float32``: written in float32 by
    the matmul where this PyTorch can, per input dtype) equal the float64 product within the
    float32 accumulation error, or are the 16-bit product cast where it cannot."""
    from peft_bitflip.kernels.lora import _MM_OUT_DTYPE, mm_float32

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(300, 40, device="cuda", dtype=dtype)
        b = torch.randn(40, 70, device="cuda", dtype=dtype)
        got = mm_float32(a, b)
        assert got.dtype == torch.float32 and got.shape == (300, 70)
        want = a.double() @ b.double()
        if _MM_OUT_DTYPE[dtype]:  # a float32 result: float32 accumulation error only
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        else:  # this PyTorch has no out_dtype for it: the 16-bit product, cast
            assert torch.equal(got, (a @ b).float())
        assert torch.equal(mm_float32(a.float(), b.float()), a.float() @ b.float())
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11):
        assert _MM_OUT_DTYPE[torch.bfloat16]  # seen on the device image's torch 2.11


@cuda
@pytest.mark.parametrize("singles", [0, 4, 1 << 20])
def test_cuda_zeroed_correction_paths_equal_the_reference(monkeypatch, singles):
    """The LoRA gradients' correction at zeroed weights on the GPU against the dense CPU
    reference, with the zeroed weights of each mask tile all through the dense tile product
    (singles=0), as shipped (at most 4 per tile singly), or all singly: a sparse mask (most
    tiles hold none or one) and a dense one (every tile holds several), a transposed (Conv1D)
    mask view, and more rows than one step of the single path takes."""
    from peft_bitflip.kernels import lora, triton_lora

    monkeypatch.setattr(triton_lora, "CORRECTION_SINGLES", singles)
    # a config cache of this test's own (restored with the constant, also if it fails)
    fresh = functools.cache(triton_lora._correction_config.__wrapped__)
    monkeypatch.setattr(triton_lora, "_correction_config", fresh)
    gen = torch.Generator().manual_seed(5)
    t, n_out, n_in, r = 1500, 200, 136, 8
    g = torch.randn(t, n_out, generator=gen).to(torch.bfloat16)
    x = torch.randn(t, n_in, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
    for density, transposed in ((0.0005, False), (0.02, False), (0.02, True)):
        if transposed:
            zeroed = (torch.rand(n_in, n_out, generator=gen) < density).to(torch.uint8).t()
        else:
            zeroed = (torch.rand(n_out, n_in, generator=gen) < density).to(torch.uint8)
        assert zeroed.sum() > 0
        want = [torch.zeros(a.shape), torch.zeros(b.shape)]
        lora.subtract_zeroed_correction_(*want, zeroed, g.float(), x.float(), a, b, scale=0.5)
        got = [torch.zeros(a.shape, device="cuda"), torch.zeros(b.shape, device="cuda")]
        lora.subtract_zeroed_correction_(
            *got, zeroed.cuda(), g.cuda(), x.cuda(), a.cuda(), b.cuda(), scale=0.5
        )
        for got_t, want_t in zip(got, want):
            assert want_t.abs().max() > 0
            torch.testing.assert_close(got_t.cpu(), want_t, rtol=1e-4, atol=1e-3)


DENSE_CASES = [
    (2**-12, 2**-12, (True, True)),
    (0.3, 0.5, (True, True)),
    (0.3, 2**-8, (True, False)),
    (2**-10, 2**-4, (False, True)),
]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_exp,p_frac,dense", DENSE_CASES)
def test_cuda_dense_fields_match_cpu_reference(dtype, p_exp, p_frac, dense):
    """The dense path (each field forced dense or sparse) on the GPU equals the CPU reference
    bit for bit: forward with and without zero-out, the masked gradient and the packed mask."""
    from peft_bitflip.kernels import triton_bitflip

    torch.manual_seed(2)
    x = torch.randn((1 << 20) + 123, dtype=dtype) * 3
    xg = x.cuda()
    tab, tab_gpu = (flip_table(p_exp, p_frac, dtype, d, dense) for d in ("cpu", "cuda"))
    for t, call in [(None, 0), (2.0, 17)]:
        got = triton_bitflip.launch(xg, tab_gpu, torch.tensor(call, device="cuda"), 5, 9, t, True)
        want = reference.bitflip_reference(x, tab, call, 5, 9, t)
        assert torch.equal(_bits(got.cpu()), _bits(want)), (dtype, p_exp, p_frac, dense, t)
    grad = torch.randn(x.shape)
    call = torch.tensor(3, device="cuda")
    got = triton_bitflip.launch(xg, tab_gpu, call, 5, 9, 2.0, True, grad.cuda())
    assert torch.equal(got.cpu(), reference.bitflip_backward_reference(grad, x, tab, 3, 5, 9, 2.0))
    y, mask = triton_bitflip.launch_with_mask(xg, tab_gpu, call, 5, 9, 2.0, True)
    want_y, want_mask = reference.bitflip_masked_reference(x, tab, 3, 5, 9, 2.0)
    assert torch.equal(_bits(y.cpu()), _bits(want_y)) and torch.equal(mask.cpu(), want_mask)


@cuda
@pytest.mark.parametrize("p", [2**-4, 0.3])
def test_cuda_dense_flip_rates_large_tensor(p):
    n = 1 << 24
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = pb.bitflip(x, p, p / 2, seed=3)
    n_exp, n_frac = group_counts(x.cpu(), y.cpu())
    assert_binomial(n_exp, n * 9, p, what="exp")
    assert_binomial(n_frac, n * 7, p / 2, what="frac")


@cuda
def test_cuda_lora_merge_flip_at_high_p_matches_cpu():
    """The LoRA merge + flip launch with dense fields on the GPU equals the CPU reference
    (coarse values make W + s B@A exact on both devices)."""
    from peft_bitflip.kernels import lora

    ws, kw = pb.FlipSpec(0.3, 2**-4, 1.5), pb.stream_key(3, "l", "w")
    gen = torch.Generator().manual_seed(0)
    wl = torch.randint(-8, 9, (384, 256), generator=gen).float() / 8
    a = torch.randint(-4, 5, (4, 256), generator=gen).float() / 4
    b = torch.randint(-4, 5, (384, 4), generator=gen).float() / 4
    args = (0.5, False, torch.bfloat16, ws, kw)
    want_w, want_m = lora.merge_flip_lora(wl, a, b, *args, torch.tensor(7), True)
    call = torch.tensor(7, device="cuda")
    got_w, got_m = lora.merge_flip_lora(wl.cuda(), a.cuda(), b.cuda(), *args, call, True)
    assert torch.equal(_bits(got_w.cpu()), _bits(want_w)) and torch.equal(got_m.cpu(), want_m)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_stuck_lanes_in_the_flip_kernel_match_the_separate_pass(monkeypatch, dtype):
    """Issue 33.4: stuck input lanes forced in the flip kernel's pass over x equal the CPU
    path (a separate pass, then the flips) bit for bit: flip + zero mask, the paired launch,
    backward's zero-grad recompute; and a GPU layer's output and gradients equal those of the
    same layer with the separate pass (forward and recompute; second calls: direct launches)."""
    from torch import nn

    from peft_bitflip.functional import apply_flip_spec_masked, flip_spec_grad_, flip_specs_masked
    from peft_bitflip.spec import FlipSpec
    from peft_bitflip.stuck_at import StuckAt, StuckSpec

    stuck = StuckAt("l", 3, StuckSpec(1e-3, 1e-2), StuckSpec())
    x = torch.randn(3, 37, 4096, generator=torch.Generator().manual_seed(1)).to(dtype) * 2
    w = torch.randn(64, 4096).to(dtype)
    spec, w_spec = FlipSpec(1e-4, 1e-3, 4.0), FlipSpec(0.0, 1e-3, 1.25)
    got = {}
    for device in ("cuda", "cpu"):
        lanes = stuck.lanes(4096, dtype, device)
        xd, wd, g = x.to(device), w.to(device), torch.ones(x.shape, dtype=dtype, device=device)
        got[device] = [
            *apply_flip_spec_masked(xd, spec, (1, 2), 5, True, x_lanes=lanes),
            *flip_specs_masked(xd, wd, spec, w_spec, (1, 2), (3, 4), 5, True, x_lanes=lanes),
            flip_spec_grad_(g, xd, spec, (1, 2), 5, True, lanes),
            g,
        ]
    assert (got["cpu"][1] != 0).any()  # the zero-out fired
    for a, b in zip(got["cuda"], got["cpu"]):  # (bytes: the masks are uint8)
        assert torch.equal(a.cpu().contiguous().view(torch.uint8), b.view(torch.uint8)), dtype

    def layer_run(recompute):
        torch.manual_seed(0)
        holder = nn.ModuleDict({"l": nn.Linear(4096, 64)}).to("cuda", dtype)
        cfg = pb.BitflipConfig(
            x_stuck_p_exp=1e-3, x_stuck_p_frac=1e-2, x_p_exp=1e-4, x_p_frac=1e-3,
            w_p_frac=1e-3, x_zero_out_t=4.0, w_zero_out_t=1.25, seed=2,
        )  # fmt: skip
        pb.apply_bitflip(holder, cfg)
        pb.recompute_flipped_inputs(holder, recompute)
        xg = x.cuda().requires_grad_()
        outs = []
        for _ in range(2):
            out = holder["l"](xg)
            out.float().square().sum().backward()
            outs += [out.detach(), xg.grad, holder["l"].weight.grad]
            xg.grad = holder["l"].weight.grad = None
        return outs

    for recompute in (False, True):
        fused = layer_run(recompute)
        with monkeypatch.context() as m:
            m.setattr(StuckAt, "_fusable", staticmethod(lambda *a: False))
            separate = layer_run(recompute)
        for a, b in zip(fused, separate):
            assert torch.equal(_bits(a), _bits(b)), (dtype, recompute)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_stuck_weight_bits_in_the_flip_kernel_match_the_stuck_copy(monkeypatch, dtype):
    """Issue 33.4: a weight's stuck bits forced in W's flip kernel equal the CPU path (a stuck
    copy, then the flips) bit for bit: single launch with zero mask (both block shapes), the
    paired launch, backward's zero-grad; and a GPU layer trained with W updated every step
    gives the outputs and gradients of the same layer building the stuck copy."""
    from torch import nn

    from peft_bitflip.functional import apply_flip_spec_masked, flip_spec_grad_, flip_specs_masked
    from peft_bitflip.spec import FlipSpec
    from peft_bitflip.stuck_at import StuckAt, StuckSpec

    stuck = StuckAt("l", 3, StuckSpec(), StuckSpec(1e-3, 2e-3))
    w = torch.randn(256, 1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = torch.randn(3, 1000).to(dtype)
    got = {}
    for device in ("cuda", "cpu"):
        bits = stuck.sparse(w.numel(), dtype, device)
        wd, xd, g = w.to(device), x.to(device), torch.ones(w.shape, dtype=dtype, device=device)
        got[device] = []
        for spec in (FlipSpec(1e-4, 1e-3, 1.25), FlipSpec(0.05, 0.05, 1.25)):  # sparse, dense
            got[device] += apply_flip_spec_masked(wd, spec, (1, 2), 5, True, stuck=bits)
            got[device] += flip_specs_masked(xd, wd, spec, spec, (3, 4), (1, 2), 5, w_stuck=bits)
            got[device] += [flip_spec_grad_(g, wd, spec, (1, 2), 5, True, stuck=bits), g]
    assert len(stuck.sparse(w.numel(), dtype, "cpu")) > 100
    for a, b in zip(got["cuda"], got["cpu"]):
        if a is not None:
            assert torch.equal(a.cpu().contiguous().view(torch.uint8), b.view(torch.uint8)), dtype

    def layer_run():
        torch.manual_seed(0)
        holder = nn.ModuleDict({"l": nn.Linear(1024, 256)}).to("cuda", dtype)
        cfg = pb.BitflipConfig(
            w_stuck_p_exp=1e-3, w_stuck_p_frac=5e-4, x_p_frac=1e-3, w_p_frac=1e-3,
            x_zero_out_t=4.0, w_zero_out_t=1.25, seed=2,
        )  # fmt: skip
        pb.apply_bitflip(holder, cfg)
        lin = holder["l"]
        opt = torch.optim.SGD(lin.parameters(), lr=1e-2)
        xg = (torch.randn(4, 7, 1024, device="cuda") * 2).to(dtype).requires_grad_()
        outs = []
        for _ in range(3):
            out = lin(xg)
            out.float().square().sum().backward()
            outs += [out.detach(), xg.grad.clone(), lin.weight.grad.clone()]
            opt.step()
            opt.zero_grad()
            xg.grad = None
        return outs, lin.bitflip_stuck._weight

    fused, kept = layer_run()
    assert kept is None  # no stuck copy was built or kept
    with monkeypatch.context() as m:
        m.setattr(StuckAt, "kernel_density", 0.0)
        separate, kept = layer_run()
    assert kept is not None
    for a, b in zip(fused, separate):
        assert torch.equal(_bits(a), _bits(b)), dtype


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_counted_flip_in_place_matches_cpu(dtype):
    """Issue 33.4: the training sites' counted flip (one kernel pass that flips, zeroes,
    counts and writes in place) equals the CPU path (flip, count, zero-out) bit for bit, and
    its counts equal the CPU's, at sparse and dense rates and with one field of each."""
    from peft_bitflip.kernels.op import new_flip_counts
    from peft_bitflip.spec import FlipSpec
    from peft_bitflip.stats import apply_flip_spec_counted

    x = torch.randn(1000, 999, generator=torch.Generator().manual_seed(3)).to(dtype)
    specs = (
        FlipSpec(1e-4, 1e-3, 1.0),
        FlipSpec(0.05, 0.05),
        FlipSpec(0.3, 0.3, 2.0),
        FlipSpec(2**-12, 0.05, 1.0),
    )
    for spec in specs:
        got = {}
        for device in ("cuda", "cpu"):
            t = x.to(device)
            counts = new_flip_counts(device)
            assert apply_flip_spec_counted(t, spec, (1, 2), 9, counts, out=t) is t
            got[device] = (t, counts.sum(0))
        assert torch.equal(_bits(got["cuda"][0].cpu()), _bits(got["cpu"][0])), (dtype, spec)
        assert torch.equal(got["cuda"][1].cpu(), got["cpu"][1]), (dtype, spec)
        assert got["cpu"][1][:2].sum() > 0


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_counted_zero_out_on_the_bits_matches_cpu(dtype):
    """The counted launch's zero-out on the bit patterns (``zero_out_bits``) keeps what the
    float comparison keeps on the GPU too: every 16-bit pattern (float32: patterns next to
    each threshold, NaN, Inf, random ones), thresholds at the dtypes' edges, at a dense rate
    (its full blocks and a partial last one) and without flips."""
    from bitstats import EDGE_THRESHOLDS, edge_values

    from peft_bitflip.kernels.op import new_flip_counts
    from peft_bitflip.spec import FlipSpec
    from peft_bitflip.stats import apply_flip_spec_counted

    values = edge_values(dtype)[1:]  # not a whole number of blocks
    for t in EDGE_THRESHOLDS:
        for p in (0.0, 0.05):
            got = {}
            for device in ("cuda", "cpu"):
                x = values.to(device)
                counts = new_flip_counts(device)
                y = apply_flip_spec_counted(x, FlipSpec(p, p, t), (1, 2), 9, counts)
                got[device] = (y.cpu(), counts.sum(0).cpu())
            assert torch.equal(_bits(got["cuda"][0]), _bits(got["cpu"][0])), (dtype, t, p)
            assert torch.equal(got["cuda"][1], got["cpu"][1]), (dtype, t, p)
            assert got["cpu"][1][2] > 0


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_flip_count_kernel_matches_the_torch_count(dtype):
    """The callback's count kernel (``stats._add_counts``: one Triton pass with the hardware
    population count on CUDA) gives the torch ops' [sign/exponent flips, mantissa flips,
    zeroed] of a flipped tensor, with and without a zero-out threshold."""
    from peft_bitflip.functional import apply_flip_spec
    from peft_bitflip.spec import FlipSpec
    from peft_bitflip.stats import _add_counts, flip_count_tensor

    x = torch.randn(777, 1001, generator=torch.Generator().manual_seed(5)).to(dtype) * 4
    y = apply_flip_spec(x, FlipSpec(0.01, 0.02), (3, 4), 1)
    for t in (None, 2.0):
        want = flip_count_tensor(x, y, t)
        got = torch.zeros(3, dtype=torch.int64, device="cuda")
        _add_counts(got, x.cuda(), y.cuda(), t)
        assert torch.equal(got.cpu(), want), (dtype, t)
        assert want[:2].min() > 0 and (want[2] > 0) == (t is not None)
