"""A non-finite training loss is said once, with its reason (issue 29.3, the callback part): the
exponent flips without zero-out, or the share of non-finite layer outputs the statistics
counted; ``bitflip/nonfinite_loss`` flags every log, also where Trainer's
``logging_nan_inf_filter`` (on by default) hides the NaN in the logged loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_llama
from transformers import Trainer, TrainingArguments

import peft_bitflip as pb
from peft_bitflip.callback import add_bitflip_callback

EXP_REASON = (
    "exponent flips without zero-out produce Inf/NaN; set a zero-out threshold "
    "(x_zero_out_t / w_zero_out_t)"
)


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _train(tmp_path, flips, nan_filter=True, **cb_kwargs):
    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(**flips))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (6, 16), generator=g)
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        logging_nan_inf_filter=nan_filter,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    add_bitflip_callback(trainer, **cb_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "non-finite training loss" in str(w.message)]
    return [e for e in trainer.state.log_history if "loss" in e], said


@pytest.mark.parametrize("nan_filter", [True, False])
def test_nan_loss_from_exponent_flips_without_zero_out_is_named(tmp_path, nan_filter):
    logs, said = _train(tmp_path, dict(x_p_exp=0.05), nan_filter)
    assert len(logs) == 2 and all(e["bitflip/nonfinite_loss"] == 1 for e in logs)
    if not nan_filter:
        assert all(math.isnan(e["loss"]) for e in logs)
    else:  # Trainer logged a finite loss (0.0) for NaN steps: the flag and the warning tell
        assert all(math.isfinite(e["loss"]) for e in logs)
    assert len(said) == 1 and EXP_REASON in said[0] and "\n" not in said[0]
    assert "step 1 (1 of 1 training batches since the last log" in said[0]
    if nan_filter:
        assert "logging_nan_inf_filter" in said[0]


def test_nan_loss_under_zero_out_names_the_share_of_nonfinite_outputs(tmp_path):
    # thresholds too large to keep the products finite (zero-out caps x and W, not x W)
    flips = dict(x_p_exp=0.02, w_p_exp=0.02, x_zero_out_t=1e36, w_zero_out_t=1e36)
    logs, said = _train(tmp_path, flips, nan_filter=False)
    assert all(math.isnan(e["loss"]) and e["bitflip/nonfinite_loss"] == 1 for e in logs)
    first = logs[0]
    assert first["bitflip/nonfinite_outputs"] > 0
    share = first["bitflip/nonfinite_outputs"] / first["bitflip/outputs"]
    assert first["bitflip/nonfinite_output_rate"] == share
    assert len(said) == 1 and "exponent flips without zero-out" not in said[0]
    assert f"{100 * share:.3g}% of the bit-flip layers' output elements" in said[0]


def test_finite_loss_says_nothing(tmp_path):
    flips = dict(x_p_exp=0.01, w_p_exp=0.01, x_zero_out_t=3.0, w_zero_out_t=0.5)
    logs, said = _train(tmp_path, flips)
    assert said == [] and len(logs) == 2
    for e in logs:
        assert e["bitflip/nonfinite_loss"] == 0 and e["bitflip/nonfinite_outputs"] == 0
        assert e["bitflip/outputs"] > 0 and e["bitflip/nonfinite_output_rate"] == 0.0


def test_nan_loss_is_said_without_statistics(tmp_path):
    logs, said = _train(tmp_path, dict(w_p_exp=0.05), log_stats=False)
    assert len(said) == 1 and EXP_REASON in said[0]
    assert not any(k.startswith("bitflip/") for e in logs for k in e)


def test_nan_parameters_from_training_faults_are_named_not_the_flips(tmp_path):
    """A sign flip in AdamW's exp_avg_sq makes an update NaN: the warning names the trainable
    parameters that hold NaN, not the forward flips (which are zeroed-out here)."""
    from peft_bitflip.training_faults import TrainingFaults, add_training_fault_callback

    model = tiny_llama()
    pb.apply_bitflip(model, pb.BitflipConfig(x_p_frac=1e-3, x_zero_out_t=100.0))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (6, 16), generator=g)
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        logging_nan_inf_filter=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    add_bitflip_callback(trainer)
    add_training_fault_callback(trainer, TrainingFaults(exp_avg_sq=pb.FlipSpec(p_exp=0.2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "non-finite training loss" in str(w.message)]
    assert len(said) == 1 and "trainable parameter tensors hold NaN/Inf" in said[0]
    assert "exp_avg_sq" in said[0] and EXP_REASON not in said[0] and "\n" not in said[0]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert math.isnan(logs[-1]["loss"])  # NaN losses logged as NaN: their counts still recorded
    assert all("train_faults/exp_avg_sq_exp_flips" in e for e in logs)
