"""Linear layers whose input and weight pass through the bit-flip fault model every forward.

``BitflipLinear`` (an ``nn.Linear``) and ``BitflipConv1D`` (transformers' GPT-2 ``Conv1D``) keep
the module's parameters and add:

* ``x_spec`` / ``w_spec``: :class:`~peft_bitflip.spec.FlipSpec` for the input and the weight;
* ``bitflip_name`` / ``bitflip_seed``: name the random streams; the Philox keys are
  ``stream_key(seed, name, "x" | "w", data-parallel rank)``, so layers, tensors and ranks draw
  independent flips;
* ``bitflip_calls``: an int64 buffer counting forward calls.  It is the call index of the
  streams, lives in ``state_dict`` (checkpoints restore it) and advances by one per forward
  (in eager mode by replacing the tensor, written by the flip kernel: see
  :meth:`BitflipLayerMixin.claim_call`; read the attribute, do not keep the tensor);
* ``bitflip_enabled``: switch flips off without removing the layer (see ``disable_bitflips``);
* ``bitflip_stats``: ``None`` (default: nothing is counted, no cost) or a
  :class:`~peft_bitflip.stats.FlipStatsAccumulator` that receives the true counts of flipped bits
  and zeroed elements of every forward, and of the NaN / +-Inf elements of its output (see
  :class:`~peft_bitflip.stats.FlipStatsRecorder`).  The recomputation of a checkpointed region
  is not counted again.

On the ``meta`` device (shape inference, ``accelerate.init_empty_weights``) a layer returns the
clean layer's meta result: no flips, its counter unchanged, nothing counted.

Activation checkpointing (non-reentrant, the transformers default): a forward that runs again
during backward to recompute activations reuses the call index of the original forward, so the
recomputed activations see the same flips.  Forwards inside a checkpointed region queue their
call index for that (read off torch.utils.checkpoint's saved-tensor hooks); the recompute takes
them back in order.

The forward itself is :func:`~peft_bitflip.flipped_linear.flipped_linear` (and its LoRA form):
the autograd Functions and their unfused references live in :mod:`peft_bitflip.flipped_linear`,
the tensor math they share with the ``torch.compile`` ops in :mod:`peft_bitflip.linear_ops`;
this module holds the layers alone.
"""

from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch import nn

from .flipped_linear import flipped_linear, flipped_lora_linear
from .functional import stream_key
from .kernels.lora import merge_lora_weight, merged_lora_weight
from .kernels.op import call_snapshot
from .kernels.sampling import write_next_call
from .linear_ops import _autocast_dtype, linear
from .spec import FlipSpec

try:  # GPT-2 style layers; transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

__all__ = [
    "BitflipLinear",
    "BitflipConv1D",
    "BitflipLayerMixin",
    "disable_bitflips",
    "recompute_flipped_inputs",
]

_PENDING_MAX = 1024
_NO_FLIPS = FlipSpec()  # the identity (built once: a FlipSpec validates its fields)


def data_parallel_rank() -> int:
    """Rank of this process: torch.distributed's if initialised, else ``$RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _checkpoint_phase() -> str | None:
    """ "forward" inside a checkpointed forward, "recompute" inside its recomputation, else None.

    Read off the saved-tensor hooks that ``torch.utils.checkpoint`` (non-reentrant) installs.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if hooks is None:
        return None
    name = getattr(hooks[0], "__qualname__", "")
    if name.startswith("_checkpoint_hook"):
        return "forward"
    if name.startswith("_recomputation_hook"):
        return "recompute"
    return None


def _zero_out_only(spec: FlipSpec, burst_spec, stats, stuck) -> float | None:
    """The zero-out threshold of ``spec`` when the burst pass can run it instead of a flip
    pass of its own: without gradients (with them the flip kernel's backward keeps the zero
    mask for the gradient at no extra pass), ``spec`` flips nothing, the tensor has burst
    events, nothing counts what changed (``stats``: the counts keep bursts and zeroed elements
    apart) and no stuck bits are forced in the flip pass; else None."""
    if spec.flips or spec.zero_out_threshold is None or burst_spec.is_identity:
        return None
    if torch.is_grad_enabled() or stats is not None or stuck is not None:
        return None
    return spec.zero_out_threshold


def _on_meta(*tensors) -> bool:
    """Whether any of ``tensors`` (tensors or other objects, which are ignored) is on meta."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def _meta_linear(x, weight, bias, conv1d):
    """The clean :func:`linear` on the meta device: its result's shape and dtype, no data."""
    x, weight = x.to("meta"), weight.to("meta")
    return linear(x, weight, None if bias is None else bias.to("meta"), conv1d)


class BitflipLayerMixin:
    """Fault-model state and bookkeeping shared by the bit-flip layers."""

    _is_conv1d = False
    bitflip_stats = None  # a FlipStatsAccumulator while statistics are recorded (instance attr)
    # keep x (not flip(x)) for backward and recompute the flip there: less activation memory,
    # one more pass over x; see recompute_flipped_inputs()
    bitflip_recompute_input = False
    # a StuckAt (peft_bitflip.stuck_at) forcing stuck bits of x and W before the flips, or None
    # (instance attribute, set by apply_bitflip)
    bitflip_stuck = None
    # a Bursts (peft_bitflip.bursts) striking x and W at every call after the stuck bits and
    # before the flips, or None (instance attribute, set by apply_bitflip)
    bitflip_bursts = None

    def init_bitflip(self, name: str, x_spec: FlipSpec, w_spec: FlipSpec, seed: int = 0) -> None:
        self.bitflip_name = name
        self.bitflip_seed = seed
        self.x_spec = x_spec
        self.w_spec = w_spec
        self.bitflip_enabled = True
        self._bitflip_keys = None
        self._pending_calls = collections.deque(maxlen=_PENDING_MAX)
        device = self.weight.device if self.weight.device.type != "meta" else "cpu"
        self.register_buffer("bitflip_calls", torch.zeros((), dtype=torch.int64, device=device))

    def set_bitflip(self, x_spec: FlipSpec | None = None, w_spec: FlipSpec | None = None) -> None:
        """Change the fault settings in place (e.g. a probability schedule); streams continue."""
        if x_spec is not None:
            self.x_spec = x_spec
        if w_spec is not None:
            self.w_spec = w_spec

    def stream_keys(self):
        """((x key), (w key)) for this layer on this rank (computed once; under
        ``torch.compile`` computed as constants without being stored, so the first compiled
        call does not change the module and force a recompile on the second)."""
        keys = self._bitflip_keys
        if keys is None:
            rank = data_parallel_rank()
            keys = (
                stream_key(self.bitflip_seed, self.bitflip_name, "x", rank),
                stream_key(self.bitflip_seed, self.bitflip_name, "w", rank),
            )
            if not torch.compiler.is_compiling():
                self._bitflip_keys = keys
        return keys

    def claim_call(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the call index of this forward, the tensor that must receive it + 1, or None).

        In eager mode the counter is not copied and incremented (two launches per forward):
        the current ``bitflip_calls`` tensor itself becomes this forward's call index (nothing
        writes it any more) and a new, still empty tensor takes its place as the buffer; the
        forward's flip kernel writes ``call + 1`` into it (see ``next_call`` of
        :func:`~peft_bitflip.functional.apply_flip_specs`).  The caller must see that it is
        written, also when the forward fails (:meth:`flipped_forward` does).  Under
        ``torch.compile`` the counter is copied and incremented in the graph, and while a CUDA
        graph is being captured it is copied and incremented in place, so that each replay
        advances it (second item None).  Under ``torch.inference_mode`` the new tensor is still
        a normal one (training can follow).

        Inside the original forward of a (non-reentrant) checkpointed region the index is
        queued; the recomputation of that region during backward takes it back (second item
        None), so both see the same flips.
        """
        if torch.compiler.is_compiling():
            counter = self.bitflip_calls
            # with gradients the index must reach backward from before the increment (an
            # opaque snapshot: see call_snapshot); without, a plain clone, which inductor
            # folds away (the op reads the counter before the graph's increment)
            call = call_snapshot(counter) if torch.is_grad_enabled() else counter.clone()
            counter.add_(1)
            return call, None
        phase = _checkpoint_phase()
        if phase == "recompute" and self._pending_calls:
            return self._pending_calls.popleft(), None
        buffers = self._buffers
        call = buffers["bitflip_calls"]
        if call.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph replays what it captures: it must advance the counter in place
            following = None
            call, counter = call.clone(), call
            counter.add_(1)
        elif torch.is_inference_mode_enabled():  # keep the buffer a normal tensor (writable
            with torch.inference_mode(False):  # and savable for backward outside)
                buffers["bitflip_calls"] = following = torch.empty_like(call)
        else:
            buffers["bitflip_calls"] = following = torch.empty_like(call)
        if phase == "forward":
            self._pending_calls.append(call)
        return call, following

    def next_call(self) -> torch.Tensor:
        """The call index for this forward (a tensor), advancing the counter (with a torch op;
        the layers' forwards use :meth:`claim_call`, whose flip kernel advances it)."""
        call, following = self.claim_call()
        write_next_call(call, following)
        return call

    def flipped_forward(
        self, x: torch.Tensor, weight, bias, weight_params=(), weight_key=()
    ) -> torch.Tensor:
        """The layer's computation with ``weight`` (a tensor, or a function building it from
        ``weight_params``, see :func:`flipped_linear`; ``weight_key``: whatever else decides
        the built weight, e.g. LoRA scales, for the stuck-at cache)."""
        if not self.bitflip_enabled:
            return linear(x, weight() if callable(weight) else weight, bias, self._is_conv1d)
        if _on_meta(x, self.weight, weight):
            return _meta_linear(x, weight() if callable(weight) else weight, bias, self._is_conv1d)
        stats = self.bitflip_stats
        if stats is not None and torch.compiler.is_compiling():
            # counting is host-side work: a layer that records statistics runs eagerly (a
            # graph break), with the same flips
            return _eager_flipped_forward(self, x, weight, bias, weight_params)
        # stuck input lanes / weight bits that the flip kernels force (a pass less each)
        x_lanes = w_stuck = None
        if self.bitflip_stuck is not None:  # stuck bits first; the weight built with them
            fuse = self.bitflip_bursts is None and stats is None  # nothing in between
            x, weight, weight_params, x_lanes, w_stuck = self.bitflip_stuck.apply_fused(
                x, weight, weight_params, _autocast_dtype(x), weight_key,
                self.x_spec if fuse else None, self.w_spec if fuse else None,
            )  # fmt: skip
        x_key, w_key = self.stream_keys()
        call, following = self.claim_call()
        if stats is not None and _checkpoint_phase() == "recompute":
            stats = None  # the recomputation repeats flips that were counted in the forward
        x_spec, w_spec = self.x_spec, self.w_spec
        try:
            if self.bitflip_bursts is not None:  # burst events of this call; weight built
                bursts = self.bitflip_bursts
                # a tensor whose spec is only a zero-out: the burst pass zeroes (one pass)
                x_zero = _zero_out_only(x_spec, bursts.x, stats, x_lanes)
                w_zero = _zero_out_only(w_spec, bursts.w, stats, w_stuck)
                x_spec = x_spec if x_zero is None else _NO_FLIPS
                w_spec = w_spec if w_zero is None else _NO_FLIPS
                x, weight, weight_params = bursts.apply(
                    x, weight, weight_params, _autocast_dtype(x), call, stats, x_zero, w_zero
                )
            return flipped_linear(
                x, weight, bias, x_spec, w_spec, x_key, w_key, call,
                self._is_conv1d, stats, weight_params, self.bitflip_recompute_input, following,
                x_lanes, w_stuck,
            )  # fmt: skip
        except BaseException:
            write_next_call(call, following)  # the counter stays valid (writing it twice is ok)
            raise

    def flipped_lora_forward(self, x: torch.Tensor, lora_a, lora_b, scale) -> torch.Tensor:
        """The layer's computation with one LoRA adapter merged into its weight (the fast path,
        see :func:`flipped_lora_linear`)."""
        if not self.bitflip_enabled:
            return self.flipped_forward(
                x,
                lambda: merge_lora_weight(self.weight, lora_a, lora_b, scale, self._is_conv1d),
                self.bias,
                weight_params=[self.weight, lora_a, lora_b],
            )
        if self.bitflip_stuck is not None or self.bitflip_bursts is not None:
            # stuck bits / bursts of the merged weight: built, as merge() builds it
            merge = merge_lora_weight if torch.is_grad_enabled() else merged_lora_weight
            return self.flipped_forward(
                x,
                lambda: merge(self.weight, lora_a, lora_b, scale, self._is_conv1d),
                self.bias,
                weight_params=[self.weight, lora_a, lora_b],
                weight_key=(merge, scale, self._is_conv1d),
            )
        if _on_meta(x, self.weight, lora_a, lora_b):
            merged = merge_lora_weight(
                *(t.to("meta") for t in (self.weight, lora_a, lora_b)), scale, self._is_conv1d
            )
            return _meta_linear(x, merged, self.bias, self._is_conv1d)
        stats = self.bitflip_stats
        if stats is not None and torch.compiler.is_compiling():  # as in flipped_forward
            return _eager_flipped_lora_forward(self, x, lora_a, lora_b, scale)
        x_key, w_key = self.stream_keys()
        if stats is not None and _checkpoint_phase() == "recompute":
            stats = None  # counted in the forward already
        call, following = self.claim_call()
        try:
            return flipped_lora_linear(
                x, self.weight, lora_a, lora_b, scale, self.bias, self.x_spec, self.w_spec,
                x_key, w_key, call, self._is_conv1d, stats, following,
            )  # fmt: skip
        except BaseException:
            write_next_call(call, following)
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flipped_forward(x, self.weight, self.bias)

    def bitflip_repr(self) -> str:
        def fmt(s: FlipSpec):
            bits = "" if s.p_bits is None else f", p_bits={dict(s.p_bits)}"
            return f"p_exp={s.p_exp:g}, p_frac={s.p_frac:g}{bits}, t={s.zero_out_threshold}"

        return f"x: {fmt(self.x_spec)}; w: {fmt(self.w_spec)}; seed={self.bitflip_seed}"

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bitflip(" + self.bitflip_repr() + ")"


# the layers' computations outside torch.compile (dynamo breaks the graph around them)
_eager_flipped_forward = torch.compiler.disable(BitflipLayerMixin.flipped_forward)
_eager_flipped_lora_forward = torch.compiler.disable(BitflipLayerMixin.flipped_lora_forward)


class BitflipLinear(BitflipLayerMixin, nn.Linear):
    """``nn.Linear`` computing ``flip(x) @ flip(W)^T + b``."""


if Conv1D is not None:

    class BitflipConv1D(BitflipLayerMixin, Conv1D):
        """transformers ``Conv1D`` (weight ``(in, out)``) computing ``flip(x) @ flip(W) + b``."""

        _is_conv1d = True

else:  # pragma: no cover
    BitflipConv1D = None


def bitflip_layers(model: nn.Module):
    """(name, layer) for every bit-flip layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitflipLayerMixin)]


def recompute_flipped_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Trade speed for activation memory in the bit-flip layers of ``model`` (not the LoRA fast
    path); returns the number of layers set.

    By default a layer keeps ``flip(x)`` for backward.  Where several layers read the same
    ``x`` (q/k/v, gate/up) that is one activation-sized tensor per layer instead of one shared
    ``x``: +11% peak memory in a full bf16 training step of a 1B Llama at batch 8x1024
    (``docs/benchmarks.md``).  ``enabled=True`` keeps ``x`` as a clean layer does and
    recomputes ``flip(x)`` in backward (one more read and write of ``x`` per layer; the same
    gradients).  Under an autocast the layers keep a cast copy of ``x`` per layer anyway, and
    with activation checkpointing the kept tensors are not stored, so there it changes little.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    layers = [m for _, m in bitflip_layers(model)]
    for m in layers:
        m.bitflip_recompute_input = enabled
    return len(layers)


@contextlib.contextmanager
def disable_bitflips(model: nn.Module):
    """Context manager: run ``model`` without flips (layers stay in place; counters pause)."""
    layers = [m for _, m in bitflip_layers(model)]
    before = [m.bitflip_enabled for m in layers]
    for m in layers:
        m.bitflip_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.bitflip_enabled = b
