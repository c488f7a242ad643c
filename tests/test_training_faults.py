"""Training-step faults: flips in dX, dW, AdamW's moments and the parameters, at their rates,
from their own streams, counted, and the same after a resume."""

from __future__ import annotations

import copy

import pytest
import torch
from bitstats import INT_VIEW, assert_binomial, flipped_bits, group_counts, per_bit_counts
from torch import nn

from peft_bitflip.spec import FlipSpec
from peft_bitflip.training_faults import (
    TrainingFaultHooks,
    TrainingFaults,
    parse_training_faults,
)

P = 0.02  # per bit: ~20 flips per 1k bits, enough trials in a 64x64 tensor for 5-sigma checks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _step_gradients(model, opt) -> tuple[dict, dict]:
    """One step: ({id(param): its clean gradient}, {id(param): the gradient the update uses})."""
    seen = {}
    opt.register_step_pre_hook(  # runs after the faults' hook: the gradient the update uses
        lambda o, a, k: seen.update({id(p): p.grad.clone() for p in model.parameters()})
    )
    x, y = _batch(0)
    ((model(x) - y) ** 2).mean().backward()
    clean = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    return clean, seen


def test_grad_w_flips_the_gradient_the_optimizer_sees_at_its_rate():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = TrainingFaults(grad_w=FlipSpec(p_exp=P, p_frac=P)).attach(model, opt)
    clean, seen = _step_gradients(model, opt)
    exp = frac = n = 0
    for p in model.parameters():
        e, f = group_counts(clean[id(p)], seen[id(p)])
        exp, frac, n = exp + e, frac + f, n + p.numel()
    assert_binomial(exp, n * 9, P, what="grad_w exp")
    assert_binomial(frac, n * 23, P, what="grad_w frac")
    counts = hooks.counts()["grad_w"]
    assert (counts["exp_flips"], counts["frac_flips"]) == (exp, frac)
    assert (counts["exp_bits"], counts["frac_bits"]) == (n * 9, n * 23)


@pytest.mark.parametrize("site", ["exp_avg", "exp_avg_sq", "param"])
def test_adamw_state_and_parameter_flips_after_the_update(site):
    clean_model, faulty_model = _model(), _model()
    clean_opt = torch.optim.AdamW(clean_model.parameters(), lr=1e-3)
    faulty_opt = torch.optim.AdamW(faulty_model.parameters(), lr=1e-3)
    hooks = TrainingFaults(**{site: FlipSpec(p_exp=P, p_frac=P)}).attach(faulty_model, faulty_opt)
    _train(clean_model, clean_opt, 1)
    _train(faulty_model, faulty_opt, 1)
    exp = frac = n = 0
    for pc, pf in zip(clean_model.parameters(), faulty_model.parameters()):
        a, b = (
            (pc, pf) if site == "param" else (clean_opt.state[pc][site], faulty_opt.state[pf][site])
        )
        e, f = group_counts(a.detach(), b.detach())
        exp, frac, n = exp + e, frac + f, n + a.numel()
        if site != "param":  # the other tensors untouched
            assert _bits_equal(pc.detach(), pf.detach())
    assert_binomial(exp, n * 9, P, what=f"{site} exp")
    assert_binomial(frac, n * 23, P, what=f"{site} frac")
    assert hooks.counts()[site]["exp_flips"] == exp and hooks.step == 1


def test_grad_x_flips_what_a_layer_passes_back_to_its_input():
    model = _model()
    faults = TrainingFaults(grad_x=FlipSpec(p_exp=0.0, p_frac=P), modules=r"^2$")
    hooks = TrainingFaultHooks(faults, model, optimizer=None)
    assert list(hooks.layers) == ["2"]
    x, y = _batch(0)

    def d_hidden(with_faults: bool) -> torch.Tensor:
        h = model[1](model[0](x))
        grads = []
        h.register_hook(grads.append)
        ((model[2](h) - y) ** 2).mean().backward()
        return grads[0]

    flipped = d_hidden(True)
    hooks.remove()
    clean = d_hidden(False)
    exp, frac = group_counts(clean, flipped)
    assert exp == 0
    assert_binomial(frac, clean.numel() * 23, P, what="grad_x frac")


def test_streams_differ_by_site_tensor_and_seed_and_repeat_with_the_seed():
    def flipped_grads(seed):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        TrainingFaults(grad_w=FlipSpec(p_frac=0.2), seed=seed).attach(model, opt)
        out = []
        opt.register_step_pre_hook(
            lambda o, a, k: out.extend(p.grad.clone() for p in model.parameters())
        )
        _train(model, opt, 1)
        return out

    a, b, c = flipped_grads(0), flipped_grads(0), flipped_grads(1)
    assert all(_bits_equal(u, v) for u, v in zip(a, b))
    assert not _bits_equal(a[0], c[0])
    # the two weights draw different flips: their XOR patterns with the clean grads differ
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)  # lr 0: grads are clean
    x, y = _batch(0)
    ((model(x) - y) ** 2).mean().backward()
    clean = [p.grad for p in model.parameters()]
    patterns = [(u.view(torch.int32) ^ g.view(torch.int32)) for u, g in zip(a, clean)]
    assert not torch.equal(patterns[0], patterns[2])


def test_a_resumed_run_draws_the_same_flips():
    faults = TrainingFaults(
        grad_w=FlipSpec(p_frac=1e-3), exp_avg=FlipSpec(p_frac=1e-3), param=FlipSpec(p_frac=1e-3)
    )
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    faults.attach(model, opt)
    _train(model, opt, 4)

    first = _model()
    first_opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
    hooks = faults.attach(first, first_opt)
    _train(first, first_opt, 2)
    saved = (
        copy.deepcopy(first.state_dict()),
        copy.deepcopy(first_opt.state_dict()),
        hooks.state_dict(),
    )
    resumed = _model(seed=7)  # other initial weights: everything comes from the checkpoint
    resumed.load_state_dict(saved[0])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    resumed_opt.load_state_dict(saved[1])
    again = faults.attach(resumed, resumed_opt)
    again.load_state_dict(saved[2])
    assert again.step == 2
    _train(resumed, resumed_opt, 2, start=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert _bits_equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="differ"):
        TrainingFaults(grad_w=FlipSpec(p_frac=0.5)).attach(resumed, resumed_opt).load_state_dict(
            saved[2]
        )


def test_zero_out_threshold_of_a_site():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    faults = TrainingFaults(grad_w=FlipSpec(p_exp=0.05, zero_out_threshold=1.0))
    hooks = faults.attach(model, opt)
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.extend(p.grad.clone() for p in model.parameters())
    )
    _train(model, opt, 1)
    for g in seen:
        assert torch.isfinite(g).all() and g.abs().max() < 1.0
    assert hooks.counts()["grad_w"]["zeroed"] > 0


def test_parse_training_faults():
    f = parse_training_faults("grad_w=2^-10, exp_avg_sq.exp=1e-6, exp_avg_sq.t=100", seed=3)
    assert f.grad_w == FlipSpec(2**-10, 2**-10)
    assert f.exp_avg_sq == FlipSpec(1e-6, 0.0, 100.0)
    assert f.active_sites == ("grad_w", "exp_avg_sq") and f.seed == 3
    assert TrainingFaults.from_dict(f.to_dict()) == f


def test_per_bit_position_rates_of_a_site_from_the_flag():
    """``site.bit:N=p`` / ``site.sign=p`` (the campaign sites' names) give FlipSpec.p_bits:
    the gradient's bit 30 and sign bit flip at their rates (5 sd), every other position
    stays clean; the hooks count them in the sign+exponent group."""
    f = parse_training_faults("grad_w.bit:30=0.02,grad_w.sign=2^-4,exp_avg.bit:3-5=1e-3")
    assert f.grad_w == FlipSpec(p_bits={30: 0.02, "sign": 2**-4})
    assert f.exp_avg == FlipSpec(p_bits={3: 1e-3, 4: 1e-3, 5: 1e-3})
    assert TrainingFaults.from_dict(f.to_dict()) == f
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = TrainingFaults(grad_w=f.grad_w).attach(model, opt)
    clean, seen = _step_gradients(model, opt)
    per_bit = sum(per_bit_counts(flipped_bits(clean[i], seen[i]), 32) for i in clean)
    n = sum(p.numel() for p in model.parameters())
    assert_binomial(int(per_bit[30]), n, 0.02, what="bit 30")
    assert_binomial(int(per_bit[31]), n, 2**-4, what="sign")
    assert int(per_bit[:30].sum()) == 0
    counts = hooks.counts()["grad_w"]
    assert (counts["exp_flips"], counts["frac_flips"]) == (int(per_bit[30:].sum()), 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("grad=1e-3", "site=p"),
        ("grad_w.mant=1e-3", "site=p"),
        ("grad_w=lots", "'lots' is not a number"),
        ("grad_w=1.5", "p_exp"),
        ("param=nan", "p_exp"),
        ("grad_w", "site=p"),
        ("grad_w.bit:5-3=1e-3", "site.bit:N-M=p"),
        ("grad_w.bit=1e-3", "site.bit:N=p"),
        ("grad_w.sign=1.5", "p_bits"),
    ],
)
def test_bad_training_fault_flags_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_training_faults(text)


def test_bad_attach_arguments_are_named():
    model = _model()
    with pytest.raises(ValueError, match="need the optimizer"):
        TrainingFaults(grad_w=FlipSpec(p_frac=0.1)).attach(model)
    with pytest.raises(ValueError, match=r"modules='attn' matches no module"):
        TrainingFaults(grad_x=FlipSpec(p_frac=0.1), modules="attn").attach(model)
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainingFaults(modules="(")
    with pytest.raises(ValueError, match="unknown TrainingFaults field"):
        TrainingFaults.from_dict({"grad_y": None})


def _trainer(model, out, faults):
    from tiny_models import VOCAB
    from transformers import Trainer, TrainingArguments

    from peft_bitflip.training_faults import TrainingFaultCallback

    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, VOCAB, (12, 16), generator=g)
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3,
        logging_steps=1, save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    callbacks = [] if faults is None else [TrainingFaultCallback(faults)]
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_trainer_callback_logs_rates_and_resumes_the_same_flips(tmp_path):
    from tiny_models import tiny_llama

    faults = TrainingFaults(exp_avg=FlipSpec(p_frac=0.01), grad_w=FlipSpec(p_frac=0.01))
    torch.manual_seed(0)
    full_model = tiny_llama()
    full = _trainer(full_model, tmp_path / "full", faults)
    full.train()
    logs = [e for e in full.state.log_history if "loss" in e]
    n = sum(p.numel() for p in full_model.parameters())
    for entry in logs:  # one optimizer step per log: the rate of that step's flips
        assert_binomial(round(entry["train_faults/grad_w_frac_flips"]), n * 23, 0.01, what="grad_w")
        assert entry["train_faults/grad_w_exp_flips"] == 0
        assert entry["train_faults/exp_avg_frac_rate"] > 0

    torch.manual_seed(1)
    resumed_model = tiny_llama()  # other weights: the checkpoint restores them
    resumed = _trainer(resumed_model, tmp_path / "resumed", faults)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_the_fault_model_guide_snippet_runs(tmp_path):
    from test_docs import blocks
    from tiny_models import tiny_llama

    (code,) = [b for b in blocks("docs/fault-model.md", ("python",)) if "TrainingFaults" in b]
    model = tiny_llama()
    trainer = _trainer(model, tmp_path, None)
    namespace = {
        "trainer": trainer,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters()),
    }
    exec(code, namespace)
    added = [
        c for c in trainer.callback_handler.callbacks if type(c).__name__ == "TrainingFaultCallback"
    ]
    assert len(added) == 1 and added[0].faults.active_sites == ("grad_w", "exp_avg_sq")
    assert namespace["hooks"].faults.active_sites == ("grad_w", "exp_avg_sq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "p, threshold, shape",
    [
        (2**-12, None, (37, 29)),  # sparse: blocks with several groups holding flips
        (2**-14, 1.0, (97, 61)),  # sparse + zero-out: some blocks hold no flip, only zeros
        (0.05, 1.0, (37, 29)),  # dense + zero-out
        ((2**-12, 0.05), None, (37, 29)),  # a sparse and a dense field: their counts add up
        (0.0, 1.0, (97, 61)),  # the zero-out alone (a site without flips)
    ],
)
def test_counted_flip_kernel_equals_flip_then_count(
    needs_interpreter, monkeypatch, dtype, p, threshold, shape
):
    """Issue 33.4: the training sites' flip counts its flips and zeroed elements in the flip
    kernel's own pass (the Triton backend, here its interpreter), in place or not: the result
    is ``apply_flip_spec``'s and the counts those of the separate count, bit for bit.  A block
    without a flip counts only its zeroed elements (its own branch of the kernel); full
    blocks take the sampling's own counts, the last (partial) one counts differing bits.
    ``p``: both fields' rate, or (sign/exponent, mantissa)."""
    from peft_bitflip.functional import apply_flip_spec
    from peft_bitflip.kernels import triton_bitflip
    from peft_bitflip.kernels.op import new_flip_counts
    from peft_bitflip.stats import apply_flip_spec_counted, flip_count_tensor

    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    p_exp, p_frac = p if isinstance(p, tuple) else (p, p)
    spec = FlipSpec(p_exp, p_frac, threshold)
    p = max(p_exp, p_frac)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)  # a tail
    want = apply_flip_spec(x, spec, (5, 6), 7)
    flips_only = apply_flip_spec(x, FlipSpec(p_exp, p_frac), (5, 6), 7)
    want_counts = flip_count_tensor(x, flips_only, threshold)
    assert (want_counts[:2].sum() > 0) == (p > 0)
    assert (want_counts[2] > 0) == (threshold is not None)
    assert (want_counts[0] > 0) == (p_exp > 0) and (want_counts[1] > 0) == (p_frac > 0)
    block, _ = triton_bitflip._launch_config(
        dtype, True, 0, False, threshold is not None, True, None, None, count=True
    )
    if p > 2**-10:  # the dense launch (dense-only, or mixed): full blocks and a partial one
        from peft_bitflip.kernels.sampling import FLIPS_DENSE_ONLY, flip_table, flips_mode

        mode = flips_mode(flip_table(p_exp, p_frac, dtype, "cpu"), True)
        assert mode == (FLIPS_DENSE_ONLY if p_exp == p_frac else True)
        dense_block, _ = triton_bitflip._launch_config(
            dtype, True, 0, False, threshold is not None, True, None, None, dense=True, count=True
        )
        assert x.numel() > dense_block and x.numel() % dense_block != 0
    flipped = flips_only.view(-1).view(torch.uint8) != x.view(-1).view(torch.uint8)
    flipped = flipped.view(-1, x.element_size()).any(1)  # per element
    if 0 < p < 2**-13:  # which blocks of the counted launch hold a flip: some, not all
        per_block = flipped.nonzero().squeeze(1) // block
        n_blocks = -(-x.numel() // block)
        assert 0 < per_block.unique().numel() < n_blocks
    if 0 < p < 2**-10:  # full blocks whose one group with flips adds its own counts, and others
        g = 16 // x.element_size()  # elements per group
        n_full = x.numel() // block
        groups_hit = flipped[: n_full * block].view(n_full, block // g, g).any(2).sum(1)
        assert (groups_hit == 1).any() if p < 2**-13 else (groups_hit > 1).any()
    counts = new_flip_counts("cpu")
    got = apply_flip_spec_counted(x, spec, (5, 6), 7, counts)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(counts.sum(0), want_counts)
    assert (counts != 0).any(1).sum() > 1  # spread over the rows (several blocks counted)
    # in place the kernel stores only the groups that changed: both kinds are here
    changed = (want.view(torch.uint8) != x.view(torch.uint8)).view(-1, x.element_size()).any(1)
    assert changed.any() and not changed.all()
    inplace = x.clone()
    assert apply_flip_spec_counted(inplace, spec, (5, 6), 7, counts, out=inplace) is inplace
    assert torch.equal(inplace.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(counts.sum(0), 2 * want_counts)  # added to, not overwritten
    with pytest.raises(ValueError, match=r"counts must be .* of shape \(64, 3\)"):
        apply_flip_spec_counted(x, spec, (5, 6), 7, torch.zeros(3, dtype=torch.int64))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 3e38 -> float16 Inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counted_zero_out_on_the_bits_equals_the_float_comparison(
    needs_interpreter, monkeypatch, dtype
):
    """The counted launch zeroes on the bit patterns (``zero_out_bits``: two 16-bit values per
    word, no float comparison): for every 16-bit pattern (float32: patterns next to each
    threshold, NaN, Inf, subnormals, random ones) and thresholds at the dtypes' edges it keeps
    exactly what ``|y| < threshold`` in float32 keeps and counts what it zeroes, with a
    partial last block too, in place or not."""
    from bitstats import EDGE_THRESHOLDS, edge_values

    from peft_bitflip.kernels.op import new_flip_counts
    from peft_bitflip.kernels.reference import keep_mask, zero_out
    from peft_bitflip.stats import apply_flip_spec_counted

    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")
    values, bits = edge_values(dtype), 8 * dtype.itemsize
    seen = set()
    for t in EDGE_THRESHOLDS:
        for x in (values, values[1:]):  # a whole number of blocks, then a partial last block
            want = zero_out(x, t)
            zeroed = int((~keep_mask(x, t)).sum())
            seen.add((zeroed == 0, zeroed == x.numel()))
            counts = new_flip_counts("cpu")
            got = apply_flip_spec_counted(x, FlipSpec(zero_out_threshold=t), (1, 2), 0, counts)
            assert torch.equal(got.view(INT_VIEW[bits]), want.view(INT_VIEW[bits])), t
            assert counts.sum(0).tolist() == [0, 0, zeroed], t
            inplace = x.clone()
            apply_flip_spec_counted(
                inplace, FlipSpec(zero_out_threshold=t), (1, 2), 0, counts, out=inplace
            )
            assert torch.equal(inplace.view(INT_VIEW[bits]), want.view(INT_VIEW[bits])), t
    assert seen >= {(False, True), (False, False)}  # all zeroed, some zeroed


def test_sites_on_the_triton_backend_equal_the_cpu_path(needs_interpreter, monkeypatch):
    """Every site (dX, dW, AdamW moments, parameters, with a zero-out on one) flips and counts
    the same on the Triton backend (one counted kernel pass, in place for the optimizer's
    tensors) as on the CPU path."""
    faults = TrainingFaults(
        grad_x=FlipSpec(P, P), grad_w=FlipSpec(P, P, 0.5), exp_avg=FlipSpec(P, P),
        exp_avg_sq=FlipSpec(P, P), param=FlipSpec(P / 4, P / 4), seed=3,
    )  # fmt: skip
    got = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", backend)
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        hooks = faults.attach(model, opt)
        _train(model, opt, 1)
        got[backend] = ([p.detach().clone() for p in model.parameters()], hooks.counts())
        hooks.remove()
    for a, b in zip(got["triton"][0], got["reference"][0]):  # (bytes: flips may give NaN)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert got["triton"][1] == got["reference"][1]
    assert all(c["exp_flips"] + c["frac_flips"] > 0 for c in got["triton"][1].values())
    assert got["triton"][1]["grad_w"]["zeroed"] > 0
