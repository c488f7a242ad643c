"""BitflipCallback: true flip statistics, the probability schedule, resumable flip streams."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama, token_ids
from transformers import (
    DefaultFlowCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import peft_bitflip as pb
from peft_bitflip.callback import (
    SUMMARY_KEYS,
    BitflipCallback,
    BitflipLogTrimmer,
    FlipSchedule,
    add_bitflip_callback,
)
from peft_bitflip.functional import apply_flip_spec
from peft_bitflip.kernels import sampling
from peft_bitflip.layers import _checkpoint_phase, bitflip_layers
from peft_bitflip.stats import (
    FlipStatsRecorder,
    _add_counts,
    binomial_z,
    count_flips,
    flip_count_tensor,
)

FLIPS = dict(
    x_p_exp=0.02, x_p_frac=0.02, w_p_exp=0.02, w_p_frac=0.02, x_zero_out_t=3.0, w_zero_out_t=0.05
)
STAT_KEYS = (
    [
        f"bitflip/{k}{f}"
        for k in ("x_", "w_", "")
        for f in ("elements", "exp_bits", "frac_bits", "exp_flips", "frac_flips", "zeroed")
    ]
    + ["bitflip/p_scale"]
    + [f"bitflip/{k}_p_{g}" for k in "xw" for g in ("exp", "frac")]
)
Z_MAX = 5.0  # flip rates must lie within 5 binomial standard deviations of p


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _plain_model(**flips):
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**{**FLIPS, **flips}))
    return model


def _lora_model(seed=0, **flips):
    model = tiny_llama()
    torch.manual_seed(seed)
    cfg = pb.BitflipLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **{**FLIPS, **flips},
    )
    return get_peft_model(model, cfg)


def _independent_counts(model, run):
    """Flip counts of every layer forward in ``run()``, recomputed from the captured tensors.

    Counts with ``stats.count_flips`` (a loop over bits) and a direct zero-out test on a flip-only
    pass of the same stream and call index, not with the recorder's code.
    """
    records, handles = [], []
    for _, layer in bitflip_layers(model):
        lora = next((m for m in model.modules() if getattr(m, "base_layer", None) is layer), None)

        def pre_hook(module, args, layer=layer, lora=lora):
            if _checkpoint_phase() == "recompute":
                return
            weight = layer.weight
            if lora is not None:  # BitflipLoraLinear: flip(W + s B A)
                weight = (weight + lora.get_delta_weight("default")).to(layer.weight.dtype)
            records.append(
                (layer, args[0].detach().clone(), weight.detach().clone(), int(layer.bitflip_calls))
            )

        handles.append((lora or layer).register_forward_pre_hook(pre_hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    totals = {k: dict(elements=0, exp_flips=0, frac_flips=0, zeroed=0) for k in "xw"}
    for layer, x, w, call in records:
        x_key, w_key = layer.stream_keys()
        for kind, t, spec, key in (("x", x, layer.x_spec, x_key), ("w", w, layer.w_spec, w_key)):
            flipped = apply_flip_spec(
                t, dataclasses.replace(spec, zero_out_threshold=None), key, call
            )
            c = count_flips(t, flipped)
            zeroed = 0
            if spec.zero_out_threshold is not None:
                big = flipped.float().abs() >= spec.zero_out_threshold
                zeroed = int((big | ~torch.isfinite(flipped)).sum())
            tot = totals[kind]
            tot["elements"] += t.numel()
            tot["exp_flips"] += c.exp_bits
            tot["frac_flips"] += c.frac_bits
            tot["zeroed"] += zeroed
    return totals, len(records)


def _as_dict(s):
    return dict(
        elements=s.elements, exp_flips=s.exp_flips, frac_flips=s.frac_flips, zeroed=s.zeroed
    )


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_recorder_counts_are_the_true_counts(kind):
    model = _plain_model() if kind == "plain" else _lora_model()
    ids = token_ids()
    with FlipStatsRecorder(model) as rec:
        expected, n_forwards = _independent_counts(model, lambda: model(ids))
    stats = rec.read()
    assert n_forwards == len(bitflip_layers(model))
    for k in "xw":
        assert _as_dict(stats[k]) == expected[k]
        assert stats[k].exp_flips > 100 and stats[k].frac_flips > 100
    assert stats["x"].zeroed > 0 and stats["w"].zeroed > 0  # the thresholds bite
    assert stats["all"].exp_flips == stats["x"].exp_flips + stats["w"].exp_flips
    # bits = elements x bits per element (float32: 9 exp, 23 mantissa)
    assert stats["w"].exp_bits == 9 * stats["w"].elements
    assert stats["w"].frac_bits == 23 * stats["w"].elements
    # read() reset the counts; a stopped recorder counts nothing and leaves no attribute
    model(ids)
    assert rec.read()["all"].elements == 0
    assert all("bitflip_stats" not in m.__dict__ for _, m in bitflip_layers(model))


def test_recording_changes_neither_outputs_nor_gradients():
    ids = token_ids()
    results = []
    for record in (False, True):
        model = _lora_model()
        model.train()
        rec = FlipStatsRecorder(model)
        if record:
            rec.start()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.logits.detach(), grads))
        assert (rec.read()["all"].exp_flips > 0) == record
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_activation_checkpointing_recompute_is_not_counted():
    ids = token_ids()
    model = _plain_model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forwards = []
    hooks = [
        m.register_forward_pre_hook(lambda *_: forwards.append(1)) for _, m in bitflip_layers(model)
    ]
    with FlipStatsRecorder(model) as rec:
        model(ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    assert len(forwards) == 2 * len(hooks)  # every layer ran twice: forward and recompute
    reference = _plain_model()  # same counters, no checkpointing
    expected, _ = _independent_counts(reference, lambda: reference(ids))
    stats = rec.read()
    assert {k: _as_dict(stats[k]) for k in "xw"} == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_count_kernel_matches_the_pytorch_count(needs_interpreter, monkeypatch, dtype):
    x = torch.randn(3, 2500).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -5.0, 0.0]).to(dtype)
    y = pb.bitflip(x, 0.1, 0.2, seed=1)  # reference backend (fixture)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "triton")  # the count through the kernel
    for t in (None, 1.0):
        out = torch.zeros((2, 3), dtype=torch.int64)
        _add_counts(out[1], x.t(), y.t(), t)  # strided views
        _add_counts(out[1], x, y, t)
        expected = flip_count_tensor(x, y, t)
        assert torch.equal(out[1], 2 * expected) and not out[0].any()
        assert expected[0] > 0 and expected[1] > 0 and (expected[2] > 0) == (t is not None)
        c = count_flips(x, y)
        assert expected[:2].tolist() == [c.exp_bits, c.frac_bits]


def test_log_stats_false_counts_nothing(tmp_path):
    model = _plain_model()
    trainer = _trainer(model, tmp_path, max_steps=1, save_strategy="no")
    add_bitflip_callback(trainer, log_stats=False)
    trainer.train()
    assert not any(k.startswith("bitflip/") for e in trainer.state.log_history for k in e)


def test_all_reduce_with_a_process_group(tmp_path):
    model = _plain_model()
    rec = FlipStatsRecorder(model)
    with rec:
        model(token_ids())
    local = rec.read(reset=False)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        assert rec.read(all_reduce=True) == local
    finally:
        torch.distributed.destroy_process_group()


# ---- the schedule ------------------------------------------------------------------------


def test_schedule_values():
    assert [FlipSchedule()(s) for s in (0, 5, 10**6)] == [1.0, 1.0, 1.0]
    warm = FlipSchedule("linear", 4)
    assert [warm(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert FlipSchedule("linear", 0)(0) == 1.0
    step = FlipSchedule("step", 3)
    assert [step(s) for s in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert BitflipCallback(warmup_steps=4).schedule == warm
    assert BitflipCallback("step", 3).schedule == step


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(schedule="cosine"), ValueError, "'cosine'"),
        (dict(schedule="linear", schedule_steps=-1), ValueError, "-1"),
        (dict(schedule="linear", schedule_steps=2.5), ValueError, "2.5"),
        (dict(schedule="step", schedule_steps=True), ValueError, "True"),
        (dict(schedule="constant", schedule_steps=3), ValueError, "3"),
        (dict(schedule=lambda s: 1.0, schedule_steps=3), ValueError, "3"),
        (dict(schedule=0.5), TypeError, "0.5"),
        (dict(schedule="callable"), ValueError, "custom schedule function"),
        (dict(log_stats=1), TypeError, "log_stats"),
        (dict(warmup_steps=-2), ValueError, "warmup_steps must be an int >= 0, got -2"),
        (dict(warmup_steps=5, schedule="step"), ValueError, "shorthand"),
    ],
)
def test_bad_callback_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BitflipCallback(**kwargs)


def _begin(cb, model, step=0, stateful=None):
    state = TrainerState(global_step=step, stateful_callbacks=stateful or {})
    cb.on_train_begin(SimpleNamespace(), state, TrainerControl(), model=model)
    return state


def test_schedule_scales_probabilities_not_thresholds():
    model = _plain_model()
    layer = model.model.layers[0].mlp.up_proj
    target = layer.x_spec
    cb = BitflipCallback(schedule="linear", schedule_steps=4)
    state = _begin(cb, model)
    for step, f in [(0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)]:
        state.global_step = step
        cb.on_step_begin(None, state, None)
        assert layer.x_spec == dataclasses.replace(
            target, p_exp=target.p_exp * f, p_frac=target.p_frac * f
        )
        assert layer.x_spec.zero_out_threshold == target.zero_out_threshold
    bad = BitflipCallback(schedule=lambda s: 1.5)
    with pytest.raises(ValueError, match=r"got 1\.5 at step 0"):
        _begin(bad, model)


def test_warm_up_keeps_the_flip_table_cache_bounded():
    warm = FlipSchedule("linear", 5000)
    spec = pb.FlipSpec(2**-10, 3e-4, 30.0)
    for step in range(0, 5000, 2):
        s = dataclasses.replace(
            spec, p_exp=spec.p_exp * warm(step), p_frac=spec.p_frac * warm(step)
        )
        sampling.flip_table(s.effective_p_exp, s.effective_p_frac, torch.bfloat16, "cpu")
    assert len(sampling._DEVICE_TABLES) <= sampling._MAX_CACHED_TABLES
    info = sampling.gap_table.cache_info()
    assert info.currsize <= info.maxsize


# ---- the flip state in checkpoints --------------------------------------------------------


def test_no_bitflip_layers_is_an_error():
    with pytest.raises(ValueError, match="no bit-flip layers"):
        _begin(BitflipCallback(), tiny_llama())


def test_state_restores_counters_and_rejects_other_layer_sets():
    ids = token_ids()
    trained = _plain_model()
    cb = BitflipCallback(schedule="step", schedule_steps=1)
    _begin(cb, trained)
    trained(ids)
    trained(ids)
    saved = json.loads(json.dumps({"BitflipCallback": cb.state()}))  # as in trainer_state.json
    fresh = _plain_model()
    _begin(BitflipCallback(schedule="step", schedule_steps=1), fresh, step=2, stateful=saved)
    for (name, a), (_, b) in zip(bitflip_layers(trained), bitflip_layers(fresh)):
        assert int(a.bitflip_calls) == int(b.bitflip_calls) == 2, name
    calls = saved["BitflipCallback"]["attributes"]["flip_state"]["calls"]
    calls["model.layers.9.mlp.up_proj"] = calls.pop("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="do not match.*model.layers.9.mlp.up_proj"):
        _begin(BitflipCallback(), _plain_model(), step=2, stateful=saved)


# ---- with Trainer -------------------------------------------------------------------------


def _dataset(n=12, length=16):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def _trainer(model, out, **kw):
    args = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    args.update(kw)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_dataset())


class _Probe(TrainerCallback):
    """Sees what callbacks after the bit-flip callback see."""

    def __init__(self, layer):
        self.layer, self.p_exp, self.logs = layer, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.p_exp.append(self.layer.x_spec.p_exp)

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def _train_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def test_trainer_logs_true_rates_and_reaches_later_callbacks(tmp_path, capsys):
    p = 0.01
    model = _plain_model(**{k: p for k in ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")})
    trainer = _trainer(model, tmp_path, max_steps=4, save_strategy="no", logging_steps=2)
    cb = add_bitflip_callback(trainer)
    tracker = _Probe(model.model.layers[0].mlp.up_proj)  # where the integrations are
    trainer.callback_handler.callbacks.insert(2, tracker)
    shown = _Probe(model.model.layers[0].mlp.up_proj)  # after the printer
    trainer.add_callback(shown)
    order = trainer.callback_handler.callbacks
    assert isinstance(order[0], DefaultFlowCallback) and order[1] is cb
    printer = next(i for i, c in enumerate(order) if isinstance(c, PrinterCallback))
    trimmer = next(i for i, c in enumerate(order) if isinstance(c, BitflipLogTrimmer))
    assert order.index(cb) < order.index(tracker) < trimmer == printer - 1
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert set(STAT_KEYS) <= entry.keys() and set(SUMMARY_KEYS) <= entry.keys()
        assert entry["bitflip/p_scale"] == 1.0 and entry["bitflip/x_p_exp"] == p
        assert (
            entry["bitflip/exp_flip_rate"] == entry["bitflip/exp_flips"] / entry["bitflip/exp_bits"]
        )
        assert entry["bitflip/zeroed_rate"] == entry["bitflip/zeroed"] / entry["bitflip/elements"]
    totals = [e["bitflip/exp_flips"] + e["bitflip/frac_flips"] for e in logs]
    assert [e["bitflip/flips_total"] for e in logs] == [totals[0], totals[0] + totals[1]]
    # the trackers get the raw counts; the printed line and later callbacks the summary only
    assert all(set(STAT_KEYS) <= e.keys() for e in tracker.logs if "loss" in e)
    for e in shown.logs:
        assert {k for k in e if k.startswith("bitflip/")} <= set(SUMMARY_KEYS)
    assert sum("loss" in e for e in shown.logs) == 2
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "'loss'" in ln]
    assert len(printed) == 2 and all("exp_flip_rate" in ln for ln in printed)
    assert not any("bitflip/x_exp_bits" in ln for ln in printed)
    assert not any(k.startswith("bitflip/") for e in tracker.logs if "loss" not in e for k in e)
    # elements: 2 log intervals x 2 steps x 2 sequences x 16 tokens x sum of in_features
    in_features = sum(m.in_features for _, m in bitflip_layers(model))
    assert sum(e["bitflip/x_elements"] for e in logs) == 4 * 2 * 16 * in_features
    for kind in ("x_", "w_"):
        for group in ("exp", "frac"):
            flips = sum(e[f"bitflip/{kind}{group}_flips"] for e in logs)
            bits = sum(e[f"bitflip/{kind}{group}_bits"] for e in logs)
            assert flips > 500
            assert abs(binomial_z(flips, bits, p)) < Z_MAX, (kind, group, flips, bits)


def test_trainer_step_schedule_really_scales_p(tmp_path):
    model = _plain_model()
    layer = model.model.layers[0].mlp.up_proj
    target = layer.x_spec
    trainer = _trainer(model, tmp_path, max_steps=4, save_strategy="no")
    add_bitflip_callback(trainer, schedule="step", schedule_steps=2)
    probe = _Probe(layer)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.p_exp == [0.0, 0.0, target.p_exp, target.p_exp]
    logs = _train_logs(trainer)
    for entry, f in zip(logs, [0.0, 0.0, 1.0, 1.0]):
        assert entry["bitflip/p_scale"] == f
        assert entry["bitflip/x_p_exp"] == target.p_exp * f
        flips = entry["bitflip/exp_flips"] + entry["bitflip/frac_flips"]
        assert (flips > 0) == (f > 0)
    assert layer.x_spec == target  # targets are back after training


def test_callback_given_to_trainer_still_fills_log_history(tmp_path):
    model = _plain_model()
    trainer = _trainer(model, tmp_path, max_steps=2, save_strategy="no")
    trainer.add_callback(BitflipCallback())  # after the integrations
    trainer.train()
    assert all(set(STAT_KEYS) <= e.keys() for e in _train_logs(trainer))


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _calls(model):
    return {m.bitflip_name: int(m.bitflip_calls) for _, m in bitflip_layers(model)}


def test_resume_continues_the_exact_flip_sequence(tmp_path):
    kw = dict(schedule="linear", schedule_steps=4)
    full_model = _lora_model()
    full = _trainer(full_model, tmp_path / "full")
    add_bitflip_callback(full, **kw)
    full.train()
    full_logs = {e["step"]: e for e in _train_logs(full)}
    ckpt = tmp_path / "full" / "checkpoint-3"

    resumed_model = _lora_model(seed=1)  # different LoRA init: the checkpoint must restore it
    resumed = _trainer(resumed_model, tmp_path / "resumed")
    add_bitflip_callback(resumed, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    resumed_logs = {e["step"]: e for e in _train_logs(resumed)}

    assert _calls(resumed_model) == _calls(full_model)
    assert set(resumed_logs) == {1, 2, 3, 4, 5, 6}  # 1-3 come from the checkpoint
    for step in (4, 5, 6):
        for key in ["loss", *STAT_KEYS]:
            assert resumed_logs[step][key] == full_logs[step][key], (step, key)
    assert resumed_logs[4]["bitflip/p_scale"] == 0.75
    final, again = _lora_state(full_model), _lora_state(resumed_model)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

    # Trainer's own callback restore re-creates the callback (at the end of the list): same run
    again_model = _lora_model(seed=2)
    again = _trainer(again_model, tmp_path / "again", restore_callback_states_from_checkpoint=True)
    add_bitflip_callback(again, **kw)
    again.train(resume_from_checkpoint=str(ckpt))
    assert isinstance(again.callback_handler.callbacks[-1], BitflipCallback)
    assert _calls(again_model) == _calls(full_model)
    assert [e["loss"] for e in _train_logs(again)] == [full_logs[s]["loss"] for s in range(1, 7)]

    # control: the same checkpoint without the callback's state resumes other flips
    lost = tmp_path / "lost"
    shutil.copytree(ckpt, lost)
    state = json.loads((lost / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["BitflipCallback"]
    (lost / "trainer_state.json").write_text(json.dumps(state))
    control_model = _lora_model()
    control = _trainer(control_model, tmp_path / "control")
    add_bitflip_callback(control, **kw)
    with pytest.warns(UserWarning, match="without BitflipCallback state"):
        control.train(resume_from_checkpoint=str(lost))
    assert _train_logs(control)[0]["loss"] != full_logs[4]["loss"]
    assert _calls(control_model) != _calls(full_model)
