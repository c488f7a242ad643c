"""Bit flips in the fused experts of transformers' mixture-of-experts models.

transformers 5 keeps the experts of an MoE block (Mixtral, Qwen-MoE, OLMoE, DeepSeek, gpt-oss, ...)
in one module with 3-D parameters: ``gate_up_proj`` (or ``up_proj``) and ``down_proj``, one
matrix per expert, computed by grouped or batched matmuls.  The classes that
``@use_experts_implementation`` decorates describe their layout with attributes (``has_gate``,
``has_bias``, ``is_transposed``, ``has_post_expert_norm``) and gate with ``_apply_gate``; any
such module is flipped here.

``apply_bitflip`` turns it, in place, into a subclass of its own class mixed with
:class:`BitflipExpertsMixin` (the parameters, config and hooks stay; ``isinstance`` with the
original class still holds).  Its forward is the eager loop of the stock experts forward over
the experts that receive tokens, each of the two matmuls of an expert computed by
:func:`~peft_bitflip.layers.flipped_linear`::

    h = gate(flip(x_e) @ flip(W_gate_up[e])^T + b_gate_up[e])
    y = flip(h) @ flip(W_down[e])^T + b_down[e]

so expert inputs and expert weights follow the fault model of the linear layers: zero-out,
straight-through gradient zero where zeroed, ``flip(W)`` recomputed in backward (not stored),
autocast, ``recompute_flipped_inputs``, statistics.  Every expert matmul has streams of its own:
``stream_key(seed, f"{name}.{proj}.{e}", "x" | "w", rank)`` with ``proj`` the parameter's name
(``gate_up_proj``, ``up_proj``, ``down_proj``) and ``e`` the expert index.  The module has one
call counter (``bitflip_calls``, one call per forward, shared by its experts' streams).  A
weight is flipped when its expert computes (an expert that receives no token reads no weight).
Biases are added unflipped, as in the linear layers.  With flips off (``disable_bitflips``) the
stock forward runs.  Under ``torch.compile`` the flipped forward runs eagerly (a graph break per
experts module): which experts get tokens, and how many, steers the loop, and every expert
matmul has constants of its own (stream keys, stuck bits), so tracing it would compile a graph
per routing pattern and expert.

Stuck bits and bursts (``bitflip_stuck``: a :class:`~peft_bitflip.stuck_at.ExpertsStuckAt`;
``bitflip_bursts``: a :class:`~peft_bitflip.bursts.Bursts`) act on every expert matmul as on a
linear layer named ``f"{name}.{proj}.{e}"``, before its flips: stuck bits over the expert's
weight slice ``W[e]`` (as the module stores it) and its input features, drawn on that name's
streams and cached per slice; bursts on that name's burst streams at the module's call.
"""

from __future__ import annotations

import collections
import sys

import torch
from torch import nn

from .flipped_linear import flipped_linear
from .functional import stream_key
from .kernels.sampling import write_next_call
from .layers import _PENDING_MAX, BitflipLayerMixin, _checkpoint_phase, data_parallel_rank
from .linear_ops import _autocast_dtype

__all__ = ["BitflipExpertsMixin", "bitflip_experts_class", "expert_weight_names", "is_experts"]

_LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed")


def _param3d(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused-experts module this package can flip: a class
    decorated by ``@use_experts_implementation`` (layout attributes, ``_apply_gate``) holding 3-D
    ``gate_up_proj`` (``up_proj`` without gate) and ``down_proj`` parameters."""
    if not all(hasattr(module, a) for a in _LAYOUT_ATTRS) or not hasattr(module, "_apply_gate"):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return _param3d(module, first) and _param3d(module, "down_proj")


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The names of the two stacked weight parameters of an experts module (first, down)."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


class BitflipExpertsMixin(BitflipLayerMixin):
    """Fault-model state of a fused-experts module and its flipped forward (see the module
    docstring).  ``x_spec`` / ``w_spec`` apply to every expert matmul's input and weight."""

    def init_bitflip(self, name: str, x_spec, w_spec, seed: int = 0) -> None:
        self.bitflip_name = name
        self.bitflip_seed = seed
        self.x_spec = x_spec
        self.w_spec = w_spec
        self.bitflip_enabled = True
        self._bitflip_keys = None  # {(proj, expert): (x key, w key)}, filled as experts compute
        self._pending_calls = collections.deque(maxlen=_PENDING_MAX)
        device = self.down_proj.device if self.down_proj.device.type != "meta" else "cpu"
        self.register_buffer("bitflip_calls", torch.zeros((), dtype=torch.int64, device=device))

    def stream_keys(self, proj: str | None = None, expert: int = 0):
        """((x key), (w key)) of expert ``expert``'s matmul with parameter ``proj`` (default:
        the first one, ``gate_up_proj`` or ``up_proj``) on this rank; cached."""
        proj = proj or expert_weight_names(self)[0]
        keys = self._bitflip_keys
        if keys is None:
            keys = {}
            if not torch.compiler.is_compiling():
                self._bitflip_keys = keys
        pair = keys.get((proj, expert))
        if pair is None:
            stream, rank = f"{self.bitflip_name}.{proj}.{expert}", data_parallel_rank()
            pair = (
                stream_key(self.bitflip_seed, stream, "x", rank),
                stream_key(self.bitflip_seed, stream, "w", rank),
            )
            keys[(proj, expert)] = pair
        return pair

    def _stock_forward(self, hidden_states, top_k_index, top_k_weights):
        """The original class's forward (transformers' experts dispatch)."""
        return super(BitflipLayerMixin, self).forward(hidden_states, top_k_index, top_k_weights)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not self.bitflip_enabled:
            return self._stock_forward(hidden_states, top_k_index, top_k_weights)
        if torch.compiler.is_compiling():  # the data-dependent loop runs eagerly (module doc)
            return _eager_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        # (the parameters, not self.down_proj: under a PEFT ParamWrapper reading it sums W + dW)
        if hidden_states.device.type == "meta" or next(self.parameters()).device.type == "meta":
            return torch.zeros_like(hidden_states, device="meta")  # shape inference only
        stats = self.bitflip_stats
        if stats is not None and _checkpoint_phase() == "recompute":
            stats = None  # counted in the forward already
        call, following = self.claim_call()
        try:
            return self._flipped_experts(hidden_states, top_k_index, top_k_weights, call, stats)
        finally:
            write_next_call(call, following)

    def _expert_matmul(self, proj: str, expert: int, x, weights, biases, call, stats):
        """flip(x) @ flip(W[expert])^T (W[expert] for a transposed layout), plus
        ``biases[expert]`` unless ``biases`` is None; ``weights`` / ``biases``: the stacked
        parameters named ``proj`` and ``proj + "_bias"``.  The matmul's stuck bits, then its
        bursts act before the flips, as in a linear layer."""
        x_key, w_key = self.stream_keys(proj, expert)
        weight, params, lanes, w_stuck = weights[expert], (), None, None
        stuck = None if self.bitflip_stuck is None else self.bitflip_stuck.matmul(proj, expert)
        bursts = None if self.bitflip_bursts is None else self.bitflip_bursts.matmul(proj, expert)
        compute = _autocast_dtype(x)
        if stuck is not None:  # the stuck slice cached against the stacked parameter
            slice_ = weight
            if not stuck.w.is_identity:
                weight, params = (lambda: weights[expert]), (weights,)
            fuse = bursts is None and stats is None  # nothing between stuck bits and flips
            x, weight, params, lanes, w_stuck = stuck.apply_fused(
                x, weight, params, compute, (), self.x_spec if fuse else None,
                self.w_spec if fuse else None, slice_,
            )  # fmt: skip
            if w_stuck is not None:  # the flip kernel forces them: the slice itself will do
                weight, params = slice_, ()
        if bursts is not None:
            x, weight, params = bursts.apply(x, weight, params, compute, call, stats)
        out = flipped_linear(
            x, weight, None, self.x_spec, self.w_spec, x_key, w_key, call,
            self.is_transposed, stats, params, self.bitflip_recompute_input, x_lanes=lanes,
            w_stuck=w_stuck,
        )  # fmt: skip
        if biases is not None:  # added after the product, as the stock forward does
            out = out + biases[expert]
        return out

    def _flipped_experts(self, hidden_states, top_k_index, top_k_weights, call, stats):
        """The stock eager loop (experts in index order, tokens in the order it gathers them),
        with every matmul flipped."""
        n = self.num_experts
        # each parameter read once per forward (a PEFT ParamWrapper computes W + s*B@A per read)
        (first, w1, b1), (down, w2, b2) = (
            (p, getattr(self, p), getattr(self, p + "_bias") if self.has_bias else None)
            for p in expert_weight_names(self)
        )
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            if e >= n:  # expert-parallel sentinel: no local expert
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            h = self._expert_matmul(first, e, hidden_states[token_idx], w1, b1, call, stats)
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = self._expert_matmul(down, e, h, w2, b2, call, stats)
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def bitflip_repr(self) -> str:
        return super().bitflip_repr() + f", per-expert streams over {self.num_experts} experts"

    def extra_repr(self) -> str:
        return "bitflip(" + self.bitflip_repr() + ")"  # (the stock class has no extra_repr)


# the flipped experts outside torch.compile (dynamo breaks the graph around them)
_eager_experts_forward = torch.compiler.disable(
    BitflipExpertsMixin.forward, reason="peft_bitflip: data-dependent MoE experts loop"
)

_CLASSES: dict[type, type] = {}


def bitflip_experts_class(cls: type) -> type:
    """The bit-flip subclass of the experts class ``cls`` (one per class, registered in this
    module under a unique name so that pickle finds it)."""
    made = _CLASSES.get(cls)
    if made is None:
        name = f"Bitflip{cls.__name__}"
        if hasattr(sys.modules[__name__], name):  # another class of that name (another model)
            name = f"{name}_{len(_CLASSES)}"
        made = type(name, (BitflipExpertsMixin, cls), {"__module__": __name__})
        made.__qualname__ = name
        setattr(sys.modules[__name__], name, made)
        _CLASSES[cls] = made
    return made
