"""``BitflipCallback``: flip statistics, a flip-probability schedule and resumable flip streams
for the transformers ``Trainer``.

    import peft_bitflip  # registers the BITFLIP_LORA tuner
    from peft_bitflip.callback import add_bitflip_callback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    add_bitflip_callback(trainer, schedule="linear", schedule_steps=500)
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)

What it does:

* **Statistics.**  Every training log (the entries with ``"loss"``, written every
  ``logging_steps``) gets rates and a total, printed with the loss::

      bitflip/exp_flip_rate        sign/exponent flips per sign/exponent bit (x and w)
      bitflip/frac_flip_rate       mantissa flips per mantissa bit
      bitflip/zeroed_rate          share of the elements set to 0 by zero-out
      bitflip/flips_total          bits flipped since this train() call began
      bitflip/nonfinite_loss       1 if a training loss since the previous log was NaN/Inf
      bitflip/p_scale              the schedule factor f of the last step

  and the reporting integrations (TensorBoard, W&B, ...) and ``state.log_history`` also get the
  raw counts behind them, over the optimizer steps since the previous log (activation-checkpoint
  recomputation and evaluation are not counted), for layer inputs (``x``), weights (``w``) and
  both (no prefix)::

      bitflip/{x_,w_,}elements     elements that went through the fault model
      bitflip/{x_,w_,}exp_bits     sign+exponent bits among them (the trials of p_exp)
      bitflip/{x_,w_,}frac_bits    mantissa bits among them (the trials of p_frac)
      bitflip/{x_,w_,}exp_flips    sign/exponent bits that flipped
      bitflip/{x_,w_,}frac_flips   mantissa bits that flipped
      bitflip/{x_,w_,}zeroed       elements set to 0 by zero-out
      bitflip/outputs              output elements the bit-flip layers computed
      bitflip/nonfinite_outputs    of them NaN or +-Inf (zero-out caps x and W, not x W: an
                                   fp16 output can overflow, see docs/statistics.md)
      bitflip/nonfinite_output_rate  nonfinite_outputs / outputs
      bitflip/{x,w}_p_{exp,frac}   the flip probability in use (largest over the layers)
      bitflip/{x_,w_,}burst_{elements,events,bits}  where a layer has burst faults: elements
                                   sampled, burst events, bits they inverted
      bitflip/burst_event_rate     burst_events / burst_elements

  :func:`add_bitflip_callback` places the callback before the integrations and a small
  :class:`BitflipLogTrimmer` after them, before the printer / progress bar, which drops the raw
  counts from the printed line.
  So ``exp_flips / exp_bits`` is the measured flip rate.  Counting runs on the device without
  host synchronisation until the log (see :class:`~peft_bitflip.stats.FlipStatsRecorder`, also
  usable without Trainer): one extra read of each flipped tensor by a Triton kernel on CUDA,
  plus a second, flip-only pass for tensors with a zero-out threshold (a flipped 8192x4096
  bf16 linear layer on an H100: 0.44 ms without, 0.55-0.67 ms with counting); with
  ``log_stats=False`` nothing is counted and nothing is added to the forward.  Counts are
  per rank, summed over ranks at log time when torch.distributed is initialised
  (``all_reduce=True``).  Trainer calls integrations (TensorBoard, W&B, ...) before callbacks
  added with ``callbacks=[...]``/``add_callback``; use :func:`add_bitflip_callback` so that they
  see the statistics (``state.log_history`` gets them either way).
* **Non-finite losses.**  The callback watches the loss of every training forward (a forward
  hook on the model: one on-device check, read at log time) and the logged loss.  The first
  time one is NaN/Inf it says so once (``warnings.warn`` and the logger), in one line with the
  reason: exponent flips without zero-out in some layers, else the share of the bit-flip
  layers' output elements that were NaN/Inf (each rank checks its own losses).  Trainer's
  ``logging_nan_inf_filter`` (on by default) logs a finite loss for such steps; the warning and
  ``bitflip/nonfinite_loss`` do not.
* **Schedule.**  Every flip probability of the model (``p_exp``, ``p_frac`` and ``p_bits`` of
  inputs and weights, and the burst event rates) is multiplied by ``f(step)`` in [0, 1] at the
  start of each optimizer step
  (``step`` = optimizer steps completed, ``state.global_step``); the targets are the layers'
  settings when training starts.  Zero-out thresholds are not scaled.  At the end of training
  the layers get their target settings back.  See :class:`FlipSchedule`.
* **Resume.**  The callback's state in ``trainer_state.json`` holds every layer's
  ``bitflip_calls`` counter and target settings, so ``train(resume_from_checkpoint=...)``
  continues the exact flip sequence also for PEFT models (whose checkpoints hold only the
  adapter).  The callback restores itself in ``on_train_begin``; leave
  ``restore_callback_states_from_checkpoint`` at False (with True, Trainer re-creates the
  callback at the end of its list, after the integrations).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Mapping

import torch
from transformers import DefaultFlowCallback, TrainerCallback
from transformers.trainer_callback import ExportableState

from .layers import bitflip_layers
from .spec import FlipSpec
from .stats import FlipStatsRecorder, TensorFlipStats

__all__ = ["BitflipCallback", "BitflipLogTrimmer", "FlipSchedule", "add_bitflip_callback"]

logger = logging.getLogger(__name__)

PREFIX = "bitflip/"
SCHEDULE_KINDS = ("constant", "linear", "step")
STATE_VERSION = 1
_STAT_FIELDS = ("elements", "exp_bits", "frac_bits", "exp_flips", "frac_flips", "zeroed")
_BURST_FIELDS = ("burst_elements", "burst_events", "burst_bits")  # logged where bursts are on
# what the printed training log keeps (the trackers and log_history get every bitflip/ entry)
SUMMARY_KEYS = tuple(
    PREFIX + k
    for k in (
        "exp_flip_rate",
        "frac_flip_rate",
        "zeroed_rate",
        "flips_total",
        "nonfinite_loss",
        "p_scale",
    )
)
EXP_WITHOUT_ZERO_OUT = (
    "exponent flips without zero-out produce Inf/NaN; set a zero-out threshold "
    "(x_zero_out_t / w_zero_out_t)"
)


def _check_steps(steps, name: str = "schedule_steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name} must be an int >= 0, got {steps!r}")
    return int(steps)


@dataclasses.dataclass(frozen=True)
class FlipSchedule:
    """The factor ``f(step)`` in [0, 1] that scales every flip probability.

    ``step`` is the number of optimizer steps completed before the current one.

    * ``"constant"``: f = 1.
    * ``"linear"``: warm-up, f = min(1, step / steps): 0 in the first step, 1 from step
      ``steps`` on (``steps=0``: always 1).
    * ``"step"``: f = 0 while step < ``steps``, then 1.
    """

    kind: str = "constant"
    steps: int = 0

    def __post_init__(self):
        if self.kind == "callable":
            raise ValueError(
                "schedule='callable' marks a checkpoint written with a custom schedule function, "
                "which is not stored; pass the function again (BitflipCallback(schedule=fn)) and "
                "leave TrainingArguments.restore_callback_states_from_checkpoint=False (the "
                "callback restores its own state)"
            )
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULE_KINDS)} or a callable, "
                f"got {self.kind!r}"
            )
        object.__setattr__(self, "steps", _check_steps(self.steps))
        if self.kind == "constant" and self.steps:
            raise ValueError(
                f"schedule_steps is used by the 'linear' and 'step' schedules only, got "
                f"{self.steps!r} with 'constant'"
            )

    def __call__(self, step: int) -> float:
        if self.kind == "linear":
            return 1.0 if step >= self.steps else step / self.steps
        if self.kind == "step":
            return 0.0 if step < self.steps else 1.0
        return 1.0


def _scaled(spec: FlipSpec, f: float) -> FlipSpec:
    if f == 1.0:
        return spec
    bits = None if spec.p_bits is None else tuple((pos, p * f) for pos, p in spec.p_bits)
    return dataclasses.replace(spec, p_exp=spec.p_exp * f, p_frac=spec.p_frac * f, p_bits=bits)


def stats_to_logs(stats: dict[str, TensorFlipStats]) -> dict[str, int | float]:
    """``{"bitflip/x_exp_flips": ..., ...}`` from :meth:`FlipStatsRecorder.read`'s totals."""
    out = {}
    for kind, prefix in (("x", "x_"), ("w", "w_"), ("all", "")):
        for field in _STAT_FIELDS:
            out[f"{PREFIX}{prefix}{field}"] = getattr(stats[kind], field)
    if "y" in stats:
        y = stats["y"]
        out[PREFIX + "outputs"] = y.elements
        out[PREFIX + "nonfinite_outputs"] = y.nonfinite
        out[PREFIX + "nonfinite_output_rate"] = y.nonfinite_rate
    if stats["all"].burst_elements:  # some layer has burst faults
        for kind, prefix in (("x", "x_"), ("w", "w_"), ("all", "")):
            for field in _BURST_FIELDS:
                out[f"{PREFIX}{prefix}{field}"] = getattr(stats[kind], field)
        out[PREFIX + "burst_event_rate"] = stats["all"].burst_event_rate
    return out


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def summary_logs(stats: dict[str, TensorFlipStats], flips_total: int) -> dict[str, int | float]:
    """The rates of :data:`SUMMARY_KEYS` from :meth:`FlipStatsRecorder.read`'s totals."""
    a = stats["all"]
    return {
        PREFIX + "exp_flip_rate": _rate(a.exp_flips, a.exp_bits),
        PREFIX + "frac_flip_rate": _rate(a.frac_flips, a.frac_bits),
        PREFIX + "zeroed_rate": _rate(a.zeroed, a.elements),
        PREFIX + "flips_total": flips_total,
    }


def _model_loss(output):
    """The ``loss`` of a model output (a ``ModelOutput`` or dict), else None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class BitflipCallback(TrainerCallback, ExportableState):
    """Trainer callback for models with bit-flip layers (see the module docstring).

    Args:
        schedule: ``"constant"`` (default), ``"linear"`` (warm-up over ``schedule_steps``),
            ``"step"`` (off for ``schedule_steps`` steps), a :class:`FlipSchedule`, or a callable
            ``f(step) -> float`` in [0, 1].
        schedule_steps: the length of the ``"linear"`` / ``"step"`` schedule, in optimizer steps.
        log_stats: add the flip statistics to the training logs (False: nothing is counted).
        all_reduce: sum the statistics over the ranks of torch.distributed at log time.
        warmup_steps: shorthand for ``schedule="linear", schedule_steps=warmup_steps`` (0: off).
    """

    def __init__(
        self,
        schedule: str | FlipSchedule | Callable[[int], float] = "constant",
        schedule_steps: int = 0,
        log_stats: bool = True,
        all_reduce: bool = True,
        warmup_steps: int = 0,
    ):
        if _check_steps(warmup_steps, "warmup_steps"):
            if schedule != "constant" or schedule_steps:
                raise ValueError(
                    f"warmup_steps={warmup_steps!r} is a shorthand for schedule='linear', "
                    f"schedule_steps={warmup_steps!r}; got schedule={schedule!r}, "
                    f"schedule_steps={schedule_steps!r} too"
                )
            schedule, schedule_steps = "linear", warmup_steps
        if isinstance(schedule, str):
            schedule = FlipSchedule(schedule, schedule_steps)
        elif callable(schedule):
            if _check_steps(schedule_steps):
                raise ValueError(
                    f"schedule_steps is only used with a schedule name, got {schedule_steps!r} "
                    f"together with {schedule!r}"
                )
        else:
            raise TypeError(
                f"schedule must be a name ({', '.join(SCHEDULE_KINDS)}), a FlipSchedule or a "
                f"callable, got {schedule!r}"
            )
        for name, value in (("log_stats", log_stats), ("all_reduce", all_reduce)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.schedule = schedule
        self.log_stats = log_stats
        self.all_reduce = all_reduce
        self.flip_state = None  # set by Trainer when it re-creates the callback; informational
        self._layers: list | None = None  # [(bitflip_name, layer)]
        self._model = None  # the trained model (set in on_train_begin)
        self._targets: dict[str, tuple[FlipSpec, FlipSpec]] = {}
        self._burst_targets: dict = {}  # layer name: its Bursts (or None) at train begin
        self._recorder: FlipStatsRecorder | None = None
        self._scale: float | None = None
        self._loss_hook = None  # the model's forward hook that watches the training loss
        self._watching = False  # inside a training step
        self._bad_losses: torch.Tensor | None = None  # non-finite losses since the last log
        self._seen_losses = 0  # losses seen since the last log
        self._said_nonfinite = False
        self._flips_total = 0  # bits flipped since train() began

    # -- the schedule ---------------------------------------------------------------------

    def scale_at(self, step: int) -> float:
        """The schedule factor for the optimizer step that follows ``step`` completed ones."""
        f = self.schedule(step)
        if isinstance(f, torch.Tensor) and f.numel() == 1:
            f = f.item()
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 <= f <= 1.0:
            raise ValueError(
                f"the flip schedule must return a float in [0, 1], got {f!r} at step {step}"
            )
        return float(f)

    def _apply_scale(self, f: float) -> None:
        if f == self._scale:
            return
        for name, layer in self._layers:
            x_spec, w_spec = self._targets[name]
            layer.set_bitflip(_scaled(x_spec, f), _scaled(w_spec, f))
            bursts = self._burst_targets.get(name)
            if bursts is not None:
                layer.bitflip_bursts = bursts.scaled(f)
        self._scale = f

    # -- checkpoint state -----------------------------------------------------------------

    def _schedule_args(self) -> dict:
        if isinstance(self.schedule, FlipSchedule):
            return {"schedule": self.schedule.kind, "schedule_steps": self.schedule.steps}
        return {"schedule": "callable", "schedule_steps": 0}

    def state(self) -> dict:
        """JSON state for ``trainer_state.json``: per-layer call counters and target settings."""
        args = {**self._schedule_args(), "log_stats": self.log_stats, "all_reduce": self.all_reduce}
        flip_state = None
        if self._layers is not None:
            calls = [layer.bitflip_calls for _, layer in self._layers]
            device = calls[0].device
            values = torch.stack([c.to(device) for c in calls]).tolist()
            flip_state = {
                "version": STATE_VERSION,
                "scale": self._scale,
                "calls": {name: v for (name, _), v in zip(self._layers, values)},
                "targets": {
                    name: {"x": x.to_dict(), "w": w.to_dict()}
                    for name, (x, w) in self._targets.items()
                },
            }
        return {"args": args, "attributes": {"flip_state": flip_state}}

    def _restore(self, state) -> None:
        name = type(self).__name__
        saved = (state.stateful_callbacks or {}).get(name)
        if isinstance(saved, list):
            raise ValueError(
                f"the checkpoint holds the states of {len(saved)} {name}s; use one {name} per "
                "Trainer"
            )
        flip_state = (saved or {}).get("attributes", {}).get("flip_state")
        if flip_state is None:
            msg = (
                f"resuming at step {state.global_step} from a checkpoint without {name} state: "
                "the flip streams continue from the model's bitflip_calls counters (restored "
                "from full-model checkpoints; 0 for PEFT adapter checkpoints), not from the "
                "interrupted run's"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
            return
        if flip_state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown {name} state version {flip_state.get('version')!r}")
        model_names = {n for n, _ in self._layers}
        saved_names = set(flip_state["calls"])
        if saved_names != model_names:
            missing = sorted(saved_names - model_names)
            extra = sorted(model_names - saved_names)
            raise ValueError(
                "the checkpoint's bit-flip layers do not match the model's: "
                f"{len(missing)} only in the checkpoint {missing[:5]}, "
                f"{len(extra)} only in the model {extra[:5]}"
            )
        mine, theirs = self._schedule_args(), saved.get("args", {})
        if any(theirs.get(k, v) != v for k, v in mine.items()):
            logger.warning(
                "resuming with schedule %s; the checkpoint was written with %s",
                mine,
                {k: theirs.get(k) for k in mine},
            )
        changed = []
        for layer_name, layer in self._layers:
            layer.bitflip_calls.fill_(int(flip_state["calls"][layer_name]))
            layer._pending_calls.clear()
            t = flip_state["targets"][layer_name]
            targets = (FlipSpec(**t["x"]), FlipSpec(**t["w"]))
            if targets != self._targets[layer_name]:
                changed.append(layer_name)
            self._targets[layer_name] = targets
        if changed:
            msg = (
                f"{len(changed)} bit-flip layers (e.g. {changed[0]}) have settings that differ "
                "from the checkpoint's targets; continuing with the checkpoint's"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)

    # -- non-finite losses ----------------------------------------------------------------

    def _watch_loss(self, module, args, output) -> None:
        """Forward hook: count the training forwards and those whose loss is NaN/Inf (on the
        device, no host synchronisation)."""
        loss = _model_loss(output) if self._watching else None
        if loss is None:
            return
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int64)
        self._bad_losses = (
            bad if self._bad_losses is None else self._bad_losses + bad.to(self._bad_losses.device)
        )
        self._seen_losses += 1

    def _nonfinite_reason(self, outputs: TensorFlipStats | None) -> str:
        """Why losses may be non-finite: exponent flips without zero-out, else the share of
        NaN/Inf outputs of the bit-flip layers (``outputs``: their counts, None if off) and the
        trainable parameters that hold NaN/Inf (an update wrote them)."""
        bare = [
            (name, kind)
            for name, layer in self._layers
            for kind in ("x", "w")
            if getattr(layer, f"{kind}_spec").flips_exponent()
            and getattr(layer, f"{kind}_spec").zero_out_threshold is None
        ]
        if bare:
            names = list(dict.fromkeys(n for n, _ in bare))  # in module order
            kinds = " and ".join(
                word
                for kind, word in (("x", "inputs"), ("w", "weights"))
                if (names[0], kind) in bare
            )
            return (
                f"{EXP_WITHOUT_ZERO_OUT} ({len(names)} of {len(self._layers)} bit-flip layers, "
                f"e.g. the {kinds} of {names[0]})"
            )
        broken = self._nonfinite_parameters()
        params = (
            f"; {len(broken)} trainable parameter tensors hold NaN/Inf now (e.g. {broken[0]}): "
            "an optimizer update wrote them (e.g. training-step faults: a flipped sign of AdamW's "
            "exp_avg_sq makes sqrt(v) NaN), and every later forward is non-finite"
            if broken
            else ""
        )
        if outputs is None:
            return (
                "zero-out is on for every exponent flip; the bit-flip layers' non-finite outputs "
                f"are not counted (log_stats=False){params}"
            )
        counted = (
            f"{100 * outputs.nonfinite_rate:.3g}% of the bit-flip layers' output elements were "
            f"NaN/Inf ({outputs.nonfinite} of {outputs.elements})"
        )
        if outputs.nonfinite:
            return (
                f"{counted}: zero-out caps inputs and weights, not their products (bounds in "
                f"docs/statistics.md){params}"
            )
        return f"{counted}: the non-finite values arose outside the bit-flip layers{params}"

    def _nonfinite_parameters(self) -> list[str]:
        """Names of the trainable parameters holding NaN/Inf (checked only when a loss was
        non-finite: one reduction per parameter)."""
        model = self._model
        if model is None:
            return []
        with torch.no_grad():
            return [
                n for n, p in model.named_parameters()
                if p.requires_grad and p.is_floating_point() and not torch.isfinite(p).all()
            ]  # fmt: skip

    def _check_loss(self, state, logs: dict, outputs: TensorFlipStats | None) -> int:
        """1 if a training loss since the last log was NaN/Inf (said once), else 0."""
        bad = int(self._bad_losses) if self._bad_losses is not None else 0
        seen, self._bad_losses, self._seen_losses = self._seen_losses, None, 0
        logged = logs.get("loss")
        logged_bad = isinstance(logged, numbers.Real) and not math.isfinite(logged)
        if not (bad or logged_bad):
            return 0
        if not self._said_nonfinite:
            self._said_nonfinite = True
            if bad:
                where = f"{bad} of {seen} training batches since the last log"
            else:
                where = f"the logged loss is {logged}"
            if bad and not logged_bad:
                where += "; Trainer's logging_nan_inf_filter logged a finite loss instead"
            msg = (
                f"BitflipCallback: non-finite training loss at step {state.global_step} "
                f"({where}): {self._nonfinite_reason(outputs)}"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
        return 1

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("BitflipCallback needs the model (Trainer passes it to callbacks)")
        layers = [(layer.bitflip_name, layer) for _, layer in bitflip_layers(model)]
        if not layers:
            raise ValueError(
                "BitflipCallback: the model has no bit-flip layers; transform it first with "
                "peft_bitflip.apply_bitflip(model, BitflipConfig(...)) or "
                "get_peft_model(model, BitflipLoraConfig(...))"
            )
        names = [n for n, _ in layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"several bit-flip layers share a bitflip_name: {dup[:5]}")
        self._layers = layers
        self._model = model
        self._targets = {n: (layer.x_spec, layer.w_spec) for n, layer in layers}
        # burst settings come from the model's config (not the checkpoint state)
        self._burst_targets = {n: layer.bitflip_bursts for n, layer in layers}
        self._scale = None
        if state.global_step > 0:
            self._restore(state)
            if getattr(args, "restore_callback_states_from_checkpoint", False):
                logger.warning(
                    "restore_callback_states_from_checkpoint=True: Trainer re-created the "
                    "BitflipCallback after the reporting integrations, which then miss the "
                    "bitflip/ statistics (log_history still has them); leave it False, the "
                    "callback restores its own state"
                )
        # Trainer's _save_checkpoint expects an entry for every stateful callback (KeyError when
        # a checkpoint written without this callback is resumed with it)
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if self._recorder is not None:
            self._recorder.stop()
        self._recorder = FlipStatsRecorder(model) if self.log_stats else None
        if self._loss_hook is not None:
            self._loss_hook.remove()
        self._loss_hook = model.register_forward_hook(torch.compiler.disable(self._watch_loss))
        self._bad_losses, self._seen_losses, self._said_nonfinite = None, 0, False
        self._flips_total = 0
        self._apply_scale(self.scale_at(state.global_step))  # evaluation before step 1 too

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply_scale(self.scale_at(state.global_step))
        self._watching = True
        if self._recorder is not None:
            self._recorder.start()

    def on_step_end(self, args, state, control, **kwargs):
        self._watching = False
        if self._recorder is not None:
            self._recorder.stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        if self._recorder is None:
            self._check_loss(state, logs, None)
            return
        history = state.log_history[-1] if state.log_history else None
        if history is not None and not all(
            k in history and (history[k] is v or history[k] == v) for k, v in logs.items()
        ):
            history = None  # not the entry Trainer.log appended for these logs
        stats = self._recorder.read(reset=True, all_reduce=self.all_reduce)
        self._flips_total += stats["all"].exp_flips + stats["all"].frac_flips
        entries = summary_logs(stats, self._flips_total)
        entries.update(stats_to_logs(stats))
        entries[PREFIX + "nonfinite_loss"] = self._check_loss(state, logs, stats["y"])
        entries[PREFIX + "p_scale"] = self._scale
        for kind in ("x", "w"):
            for group in ("exp", "frac"):
                entries[f"{PREFIX}{kind}_p_{group}"] = max(
                    getattr(getattr(layer, f"{kind}_spec"), f"effective_p_{group}")
                    for _, layer in self._layers
                )
        logs.update(entries)
        if history is not None:
            history.update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        self._watching = False
        if self._recorder is not None:
            self._recorder.stop()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._layers is not None:
            self._apply_scale(1.0)  # back to the target settings


class BitflipLogTrimmer(TrainerCallback):
    """Drops the raw ``bitflip/`` counts from ``logs`` (keeping :data:`SUMMARY_KEYS`), so that
    callbacks after it (the printer / progress bar) show rates and totals only.  Placed by
    :func:`add_bitflip_callback` after the reporting integrations; ``state.log_history`` keeps
    every entry."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            for key in [k for k in logs if k.startswith(PREFIX) and k not in SUMMARY_KEYS]:
                del logs[key]


def _is_display(callback) -> bool:
    """The printer or a progress bar (Trainer adds it last)."""
    name = type(callback).__name__
    return name.endswith(("PrinterCallback", "ProgressCallback"))


def add_bitflip_callback(trainer, callback: BitflipCallback | None = None, **kwargs):
    """Insert a :class:`BitflipCallback` right after Trainer's ``DefaultFlowCallback`` and a
    :class:`BitflipLogTrimmer` right before the printer / progress bar.

    There the statistics are in ``logs`` before the reporting integrations (TensorBoard, W&B,
    ...) see them, and the printed line carries rates and totals only.  ``callback``: an
    instance, or ``None`` to build one from ``kwargs`` (a ``BitflipCallback`` the trainer
    already has is moved there when neither is given).  Returns the callback.
    """
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, BitflipCallback)]
    if existing and (callback is not None or kwargs):
        raise ValueError(
            "the trainer already has a BitflipCallback; remove it first "
            "(trainer.remove_callback(BitflipCallback)) or call add_bitflip_callback(trainer) "
            "to move it before the integrations"
        )
    if existing:
        callback = existing[0]
        callbacks.remove(callback)
    elif callback is None:
        callback = BitflipCallback(**kwargs)
    elif kwargs:
        raise TypeError("pass either a callback or BitflipCallback arguments, not both")
    elif not isinstance(callback, BitflipCallback):
        raise TypeError(f"callback must be a BitflipCallback, got {type(callback).__name__}")
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flow[0] + 1 if flow else 0, callback)
    if not any(isinstance(cb, BitflipLogTrimmer) for cb in callbacks):
        display = [i for i, cb in enumerate(callbacks) if _is_display(cb)]
        callbacks.insert(display[0] if display else len(callbacks), BitflipLogTrimmer())
    return callback
