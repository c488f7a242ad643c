"""Faults in the training step itself: bit flips in gradients and in optimizer state.

The forward flips (:class:`~peft_bitflip.config.BitflipConfig`) strike the inputs and weights
a layer reads.  :class:`TrainingFaults` strikes what a training step keeps in memory besides
them, at framework level, with the same kernel, the same statistics and their own streams:

========== ============================================================ =====================
site       what flips                                                   when
========== ============================================================ =====================
``grad_x`` dX: the gradient a selected linear layer passes to its input each backward of the layer
``grad_w`` dW: the ``.grad`` of each selected trainable parameter      once per optimizer step,
                                                                        before the update
``exp_avg`` AdamW's first moment of each selected parameter            after each update
``exp_avg_sq`` AdamW's second moment                                    after each update
``param``  the parameter itself (the master weights the optimizer       after each update
           updates; a flip persists until later updates move it)
========== ============================================================ =====================

Each site has a :class:`~peft_bitflip.spec.FlipSpec` (``p_exp``: every sign/exponent bit,
``p_frac``: every mantissa bit, ``p_bits``: per-bit-position rates, optional zero-out
threshold, inclusive: ``|v| >= t``, NaN and +-Inf become 0), applied by the forward flips'
function.  Counts are per group (sign+exponent, mantissa): with ``p_bits`` the logged
``_{exp,frac}_rate`` is the flips per bit of the group, over all of its positions.  Tensors
of other dtypes than float32/bfloat16/float16 (e.g. AdamW's ``step`` counter) are left alone.

Streams and determinism: the flips of a site are a pure function of (values, spec, ``seed``,
stream, call), the stream named ``("training", site, <module or parameter name>, rank[, m])``
and the call = the optimizer step index (steps completed before this one; ``m`` = the index of
the backward within the step, for ``grad_x`` under gradient accumulation).  So sites, tensors,
ranks and micro-batches draw independent flips, and a run resumed from a checkpoint at step k
(:meth:`TrainingFaultHooks.load_state_dict`, or the Trainer callback, which reads
``state.global_step``) draws the same flips as the uninterrupted run.  Streams include the
data-parallel rank, as the forward flips do: a fault strikes one device's memory, so replicas
may diverge (a real silent-data-corruption effect of faults in data-parallel training).

Plain PyTorch::

    faults = TrainingFaults(grad_w=FlipSpec(p_exp=1e-6, p_frac=1e-6), exp_avg_sq=FlipSpec(1e-7))
    hooks = faults.attach(model, optimizer)   # hooks on the layers and the optimizer
    ...  loss.backward(); optimizer.step(); optimizer.zero_grad()  ...
    hooks.counts()                            # flipped bits per site so far
    hooks.remove()

Trainer: :func:`add_training_fault_callback` (logs ``train_faults/<site>_*`` flips and rates).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import torch
from torch import nn
from transformers import DefaultFlowCallback, TrainerCallback

from .functional import stream_key
from .kernels.op import new_flip_counts
from .layers import data_parallel_rank
from .spec import FlipSpec, check_dtype, validate_seed
from .stats import apply_flip_spec_counted

__all__ = [
    "SITES",
    "TrainingFaults",
    "TrainingFaultHooks",
    "TrainingFaultCallback",
    "add_training_fault_callback",
    "parse_training_faults",
]

SITES = ("grad_x", "grad_w", "exp_avg", "exp_avg_sq", "param")
OPTIMIZER_STATE_SITES = ("exp_avg", "exp_avg_sq")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG_PREFIX = "train_faults/"


def _spec(site: str, value) -> FlipSpec | None:
    if value is None or isinstance(value, FlipSpec):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in dataclasses.fields(FlipSpec)}
        if unknown:
            raise ValueError(f"{site}: unknown FlipSpec field(s) {sorted(unknown)}")
        return FlipSpec(**value)
    raise TypeError(f"{site} must be a FlipSpec, a dict of its fields or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainingFaults:
    """Bit flips in the training step (see the module docstring for the sites and streams).

    Args:
        grad_x, grad_w, exp_avg, exp_avg_sq, param: the :class:`FlipSpec` of each site (or a
            dict of its fields), ``None`` for a site left alone.
        modules: regular expression (``re.search``) on module names: which linear layers get
            ``grad_x`` flips and whose parameters get the other sites.  ``None``: every
            ``nn.Linear`` (bit-flip layers included) and every trainable parameter.
        seed: names the streams with the sites (an int in [0, 2**63)).
    """

    grad_x: FlipSpec | None = None
    grad_w: FlipSpec | None = None
    exp_avg: FlipSpec | None = None
    exp_avg_sq: FlipSpec | None = None
    param: FlipSpec | None = None
    modules: str | None = None
    seed: int = 0

    def __post_init__(self):
        for site in SITES:
            object.__setattr__(self, site, _spec(site, getattr(self, site)))
        object.__setattr__(self, "seed", validate_seed("seed", self.seed))
        if self.modules is not None:
            if not isinstance(self.modules, str):
                raise TypeError(f"modules must be a regular expression (str), got {self.modules!r}")
            try:
                re.compile(self.modules)
            except re.error as e:
                raise ValueError(
                    f"modules={self.modules!r} is not a regular expression: {e}"
                ) from None

    @property
    def active_sites(self) -> tuple[str, ...]:
        """The sites whose spec changes anything."""
        return tuple(
            s for s in SITES if getattr(self, s) is not None and not getattr(self, s).is_identity
        )

    def to_dict(self) -> dict:
        out = {s: (None if getattr(self, s) is None else getattr(self, s).to_dict()) for s in SITES}
        return {**out, "modules": self.modules, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainingFaults:
        unknown = set(data) - set(SITES) - {"modules", "seed"}
        if unknown:
            raise ValueError(
                f"unknown TrainingFaults field(s) {sorted(unknown)}; sites are {SITES}"
            )
        return cls(**data)

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int = 0
    ):
        """Register the hooks on ``model`` (``grad_x``) and ``optimizer`` (the other sites);
        returns the :class:`TrainingFaultHooks` (``remove()`` undoes it).  ``step``: optimizer
        steps already completed (resuming)."""
        return TrainingFaultHooks(self, model, optimizer, step)


def parse_training_faults(text: str, seed: int = 0, modules: str | None = None) -> TrainingFaults:
    """``"grad_w=1e-6,exp_avg_sq.exp=1e-7"`` -> :class:`TrainingFaults` (a recipe/CLI flag).

    ``site=p`` sets p for every bit of the site, ``site.exp=p`` / ``site.frac=p`` one group,
    ``site.sign=p`` / ``site.bit:N=p`` / ``site.bit:N-M=p`` the rate of those bit positions
    (``FlipSpec.p_bits``, 0 = least significant bit; the campaign sites' names), which then
    flip at that rate instead of their group's, ``site.t=x`` its zero-out threshold; p may be
    written ``2^-20``."""
    from .campaign import check_site_bits, site_bit_rates

    fields: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        site, _, part = key.strip().partition(".")
        try:
            positions = part not in ("", "exp", "frac", "t") and check_site_bits(part)
        except ValueError:
            positions = None
        if not sep or site not in SITES or positions is None:
            raise ValueError(
                f"training fault {item!r}: expected site=p, site.exp=p, site.frac=p, "
                f"site.sign=p, site.bit:N=p, site.bit:N-M=p or site.t=x with site in {SITES}"
            )
        number = _number(value.strip(), item)
        spec = fields.setdefault(site, {})
        if positions:
            spec.setdefault("p_bits", {}).update(site_bit_rates(positions, number))
        if part in ("", "exp"):
            spec["p_exp"] = number
        if part in ("", "frac"):
            spec["p_frac"] = number
        if part == "t":
            spec["zero_out_threshold"] = number
    return TrainingFaults(
        **{s: FlipSpec(**f) for s, f in fields.items()}, modules=modules, seed=seed
    )


def _number(text: str, item: str) -> float:
    m = re.fullmatch(r"2\^(-?\d+)", text)
    try:
        return 2.0 ** int(m.group(1)) if m else float(text)
    except ValueError:
        raise ValueError(f"training fault {item!r}: {text!r} is not a number") from None


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's / Trainer's wrapper."""
    while hasattr(optimizer, "optimizer") and isinstance(
        optimizer.optimizer, torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


class TrainingFaultHooks:
    """The hooks of one :meth:`TrainingFaults.attach`; counts what they flipped.

    ``step`` is the optimizer step index the next flips use; it advances after each
    ``optimizer.step()``.  ``state_dict()`` / ``load_state_dict()`` carry it and the counts."""

    def __init__(self, faults: TrainingFaults, model: nn.Module, optimizer, step: int = 0):
        if not isinstance(faults, TrainingFaults):
            raise TypeError(f"faults must be TrainingFaults, got {type(faults).__name__}")
        if (
            faults.active_sites
            and any(s != "grad_x" for s in faults.active_sites)
            and optimizer is None
        ):
            raise ValueError(
                f"sites {[s for s in faults.active_sites if s != 'grad_x']} need the optimizer: "
                "attach(model, optimizer)"
            )
        self.faults = faults
        self.step = int(step)
        self._micro: dict[str, int] = {}
        self._counts: dict[tuple, torch.Tensor] = {}  # (site, device) -> new_flip_counts
        self._trials: dict[str, list[int]] = {s: [0, 0] for s in SITES}
        self._handles = []
        self.optimizer = _unwrap(optimizer) if optimizer is not None else None
        pattern = re.compile(faults.modules) if faults.modules is not None else None

        def selected(name: str) -> bool:
            return pattern is None or pattern.search(name) is not None

        self.layers = {
            n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected(n)
        }
        if (
            pattern is not None
            and not self.layers
            and not any(selected(n) for n, _ in model.named_parameters())
        ):
            raise ValueError(
                f"modules={faults.modules!r} matches no module or parameter of the model"
            )
        self.param_names = {
            p: n
            for n, p in model.named_parameters()
            if p.requires_grad and selected(n.rpartition(".")[0])
        }
        if faults.grad_x is not None and not faults.grad_x.is_identity:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_full_backward_hook(self._grad_x_hook(name)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_update))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_update))

    # -- flipping -------------------------------------------------------------------------

    def _flip(
        self, site: str, t: torch.Tensor, name: str, *extra, in_place: bool = False
    ) -> torch.Tensor:
        """``t`` after the site's flips (and zero-out), counting them (one kernel pass on the
        GPU); ``t`` itself if no flip, or with ``in_place`` when it was flipped in place (a
        contiguous tensor: the kernel writes into it, no copy)."""
        spec = getattr(self.faults, site)
        if spec is None or spec.is_identity or t.dtype not in _FLOAT_DTYPES or t.numel() == 0:
            return t
        key = stream_key(self.faults.seed, "training", site, name, data_parallel_rank(), *extra)
        counts = self._counts.get((site, t.device))
        if counts is None:
            counts = new_flip_counts(t.device)
            self._counts[(site, t.device)] = counts
        out = t if in_place and t.is_contiguous() else None
        flipped = apply_flip_spec_counted(t.detach(), spec, key, self.step, counts, out)
        layout = check_dtype(t.dtype)  # the exp group holds the sign bit
        self._trials[site][0] += t.numel() * layout.n_exp
        self._trials[site][1] += t.numel() * layout.n_frac
        return flipped

    def _grad_x_hook(self, name: str):
        def hook(module, grad_input, grad_output):
            if not grad_input or grad_input[0] is None:
                return None
            micro = self._micro.get(name, 0)
            self._micro[name] = micro + 1
            return (self._flip("grad_x", grad_input[0], name, micro), *grad_input[1:])

        return hook

    def _params(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in self.param_names:
                    yield self.param_names[p], p

    def _before_update(self, optimizer, args, kwargs):
        for name, p in self._params():
            if p.grad is not None:
                flipped = self._flip("grad_w", p.grad, name, in_place=True)
                if flipped is not p.grad:
                    p.grad.copy_(flipped)

    def _after_update(self, optimizer, args, kwargs):
        for name, p in self._params():
            state = self.optimizer.state.get(p, {})
            for site in OPTIMIZER_STATE_SITES:
                value = state.get(site)
                if isinstance(value, torch.Tensor):
                    flipped = self._flip(site, value, name, in_place=True)
                    if flipped is not value:
                        value.copy_(flipped)
            data = p.data
            flipped = self._flip("param", data, name, in_place=True)
            if flipped is not data:
                data.copy_(flipped)
        self.step += 1
        self._micro.clear()

    # -- bookkeeping ----------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int | float]]:
        """Per active site: flipped exp / mantissa bits, zeroed elements, the bits that went
        through the fault model and the measured rates (reads the device counters)."""
        out = {}
        for site in self.faults.active_sites:
            exp = frac = zeroed = 0
            for (counted, _), c in self._counts.items():
                if counted == site:
                    e, f, z = (int(v) for v in c.sum(0).tolist())
                    exp, frac, zeroed = exp + e, frac + f, zeroed + z
            n_exp, n_frac = self._trials[site]
            out[site] = {
                "exp_flips": exp,
                "frac_flips": frac,
                "zeroed": zeroed,
                "exp_bits": n_exp,
                "frac_bits": n_frac,
                "exp_rate": exp / n_exp if n_exp else math.nan,
                "frac_rate": frac / n_frac if n_frac else math.nan,
            }
        return out

    def reset_counts(self) -> None:
        self._counts.clear()
        self._trials = {s: [0, 0] for s in SITES}

    def state_dict(self) -> dict:
        return {"step": self.step, "faults": self.faults.to_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if TrainingFaults.from_dict(state["faults"]) != self.faults:
            raise ValueError(
                "the checkpoint's training faults differ from these: "
                f"{state['faults']} vs {self.faults.to_dict()}"
            )
        self.step = int(state["step"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class TrainingFaultCallback(TrainerCallback):
    """Training-step faults under the transformers ``Trainer``.

    Attaches :class:`TrainingFaultHooks` at the start of training (the optimizer step index is
    ``state.global_step``, so a resumed run draws the same flips), and adds to every training
    log, for each active site, ``train_faults/<site>_{exp,frac}_flips``, ``_zeroed`` and the
    measured ``_{exp,frac}_rate`` since the previous log.  Works beside
    :class:`~peft_bitflip.callback.BitflipCallback` (forward flips)."""

    def __init__(self, faults: TrainingFaults):
        if not isinstance(faults, TrainingFaults):
            raise TypeError(f"faults must be TrainingFaults, got {type(faults).__name__}")
        self.faults = faults
        self.hooks: TrainingFaultHooks | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("TrainingFaultCallback needs the model and the optimizer from Trainer")
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = self.faults.attach(model, optimizer, step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.hooks is None:
            return
        entries = {}
        for site, c in self.hooks.counts().items():
            for k, v in c.items():
                if k not in ("exp_bits", "frac_bits"):
                    entries[f"{LOG_PREFIX}{site}_{k}"] = v
        self.hooks.reset_counts()
        history = state.log_history[-1] if state.log_history else None
        # the entry Trainer.log appended for these logs (a copy plus "step"; NaN losses too)
        same = history is not None and all(
            k in history and (history[k] is v or history[k] == v) for k, v in logs.items()
        )
        logs.update(entries)
        if same:
            history.update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def add_training_fault_callback(trainer, faults: TrainingFaults) -> TrainingFaultCallback:
    """Insert a :class:`TrainingFaultCallback` right after Trainer's ``DefaultFlowCallback``
    (and a :class:`~peft_bitflip.callback.BitflipCallback` there), so that its counts are in
    ``logs`` before the reporting integrations and the printer see them.  Returns it."""
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(cb, TrainingFaultCallback) for cb in callbacks):
        raise ValueError("the trainer already has a TrainingFaultCallback")
    callback = TrainingFaultCallback(faults)
    before = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    after_flips = [i for i, cb in enumerate(callbacks) if type(cb).__name__ == "BitflipCallback"]
    at = max([*before, *after_flips]) + 1 if before or after_flips else 0
    callbacks.insert(at, callback)
    return callback
