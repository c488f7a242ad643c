"""Stuck-at faults: a fixed set of bits of a layer's weight or input lanes forced to 0 or 1.

A stuck bit reads as its stuck value at every forward, whatever is written to it:
``value = (value & ~stuck_mask) | stuck_ones``, applied before the transient flips and the
zero-out of the same tensor (so a transient flip that lands on a stuck bit still inverts it,
as a fault on the path after the memory cell would).  Which bits are stuck is drawn once, as
a pure function of (seed, layer name, tensor, rate, the tensor's element count and dtype):

* positions: the layer's flip function (:func:`~peft_bitflip.functional.apply_flip_spec`)
  applied to a zero tensor of the tensor's size and dtype, with ``p_exp`` / ``p_frac`` the
  stuck rates, on the stream ``stream_key(seed, name, "w_stuck" | "x_stuck")`` at call 0: every
  set bit of the result is a stuck bit.  Each sign/exponent bit is stuck with probability
  ``p_exp``, each mantissa bit with ``p_frac``, independently; the CPU reference and the GPU
  kernel give the same positions.
* values: a second draw on the same stream at call 1, on a zero tensor of one element per
  element with a stuck bit (in index order), with probability ``one_share`` for every bit; a
  stuck bit is stuck at 1 where that draw set its bit, else at 0.

The stream has no data-parallel rank in it (unlike the transient flips): a stuck cell belongs
to the tensor, so every rank holding the tensor sees the same stuck bits.  Nothing is stored in
``state_dict``: a reloaded or resumed model redraws the same positions.

Weights: positions index the weight's elements in row-major order of the weight as the module
stores it (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2's ``Conv1D``).  In a
bit-flip LoRA layer they act on the merged weight ``W + s B A`` the layer computes with, so
``merge_and_unload`` keeps them.  Inputs: positions are drawn over the input feature dimension
(``in_features`` elements): a stuck lane forces the same (feature, bit) of every token.

Positions are kept sparse (element index, the stuck bits' mask, the stuck-at-1 bits), not as a
tensor-sized mask.  Explicit positions (a replayable fault list, as PyTorchALFI saves one) are
``[element index, bit, value]`` entries; bit 0 is the least significant bit of the element's
bit pattern (the sign bit is 15 for 16-bit dtypes, 31 for float32).  They add to the drawn
positions and win where both name the same bit.  :func:`export_stuck_positions` writes the
positions of a model in that form, for ``BitflipConfig(stuck_at_positions=...)`` to replay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import numbers
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .experts import expert_weight_names, is_experts
from .functional import apply_flip_spec, stream_key
from .kernels.op import backend_for
from .kernels.sampling import group_size
from .kernels.sparse_stuck import SparseStuck
from .linear_ops import _autocast_dtype
from .spec import FlipSpec, check_dtype, validate_probability

__all__ = [
    "STUCK_RATE_KEYS",
    "ExpertsStuckAt",
    "StuckAt",
    "StuckBits",
    "StuckSpec",
    "export_stuck_positions",
    "stuck_at_for",
    "validate_stuck_positions",
]

STUCK_RATE_KEYS = (
    "x_stuck_p_exp",
    "x_stuck_p_frac",
    "w_stuck_p_exp",
    "w_stuck_p_frac",
    "stuck_one_share",
)
"""The stuck-at settings a per-module rule may set (``BitflipConfig`` fields too)."""
TENSORS = ("x", "w")
_INT_VIEW = {16: torch.int16, 32: torch.int32}
_MAX_BITS = 32


# ---------------------------------------------------------------------- validation


def _integer(where: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {what} must be an int, got {value!r}")
    return int(value)


def _validated_entries(where: str, entries) -> list[list[int]]:
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
        raise TypeError(f"{where} must be a list of [index, bit, value] entries, got {entries!r}")
    out, seen = [], {}
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"{at} must be an [index, bit, value] triple, got {entry!r}")
        index = _integer(at, "index", entry[0])
        bit = _integer(at, "bit", entry[1])
        value = _integer(at, "value", entry[2])
        if index < 0:
            raise ValueError(f"{at}: index must be >= 0, got {index}")
        if not 0 <= bit < _MAX_BITS:
            raise ValueError(f"{at}: bit must be in [0, {_MAX_BITS}), got {bit}")
        if value not in (0, 1):
            raise ValueError(f"{at}: value must be 0 or 1, got {value}")
        if seen.get((index, bit), value) != value:
            raise ValueError(f"{at}: bit {bit} of element {index} is stuck at both 0 and 1")
        seen[(index, bit)] = value
        out.append([index, bit, value])
    return out


def validate_stuck_positions(name: str, value) -> dict[str, dict[str, list[list[int]]]] | None:
    """``value`` as ``{layer name: {"x" | "w": [[index, bit, value], ...]}}`` (plain ints),
    or None; raise ``TypeError`` / ``ValueError`` naming ``name``, the layer and the entry."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be None or a dict {{layer name: {{'x'|'w': [[index, bit, value], "
            f"...]}}}}, got {value!r}"
        )
    out = {}
    for layer, lists in value.items():
        if not isinstance(layer, str):
            raise TypeError(f"{name} key must be a layer name (str), got {layer!r}")
        if not isinstance(lists, Mapping):
            raise TypeError(f"{name}[{layer!r}] must be a dict {{'x'|'w': [...]}}, got {lists!r}")
        unknown = [k for k in lists if k not in TENSORS]
        if unknown:
            raise ValueError(f"{name}[{layer!r}] has unknown tensor(s) {unknown}; use 'x', 'w'")
        out[layer] = {
            t: _validated_entries(f"{name}[{layer!r}][{t!r}]", lists[t])
            for t in TENSORS
            if t in lists
        }
    return out


@dataclass(frozen=True)
class StuckSpec:
    """Stuck-at settings of one tensor of one layer.

    ``p_exp`` / ``p_frac``: probability that each sign/exponent / mantissa bit is stuck;
    ``one_share``: probability that a drawn stuck bit is stuck at 1 (else at 0);
    ``positions``: explicit ``(index, bit, value)`` entries (see the module doc)."""

    p_exp: float = 0.0
    p_frac: float = 0.0
    one_share: float = 0.5
    positions: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self):
        for f in ("p_exp", "p_frac", "one_share"):
            object.__setattr__(self, f, validate_probability(f, getattr(self, f)))
        entries = _validated_entries("positions", self.positions)
        object.__setattr__(self, "positions", tuple(tuple(e) for e in entries))

    @property
    def is_identity(self) -> bool:
        """No bit can be stuck."""
        return self.p_exp == 0 and self.p_frac == 0 and not self.positions


# ---------------------------------------------------------------------- drawing


class StuckBits(NamedTuple):
    """Sparse stuck bits of a tensor: ``index`` (int64, sorted element indices), ``keep``
    (``~mask`` of the stuck bits) and ``ones`` (the bits stuck at 1), both in the signed integer
    view of the tensor's dtype (int16 / int32), one entry per element that has a stuck bit."""

    index: Tensor
    keep: Tensor
    ones: Tensor


def _signed(value: int, n_bits: int) -> int:
    return value - (1 << n_bits) if value >> (n_bits - 1) else value


def _draw(spec: StuckSpec, key, numel: int, dtype: torch.dtype, device, where: str) -> StuckBits:
    """The stuck bits of a tensor of ``numel`` elements of ``dtype`` (see the module doc)."""
    n_bits = check_dtype(dtype, where).n_bits
    view = _INT_VIEW[n_bits]
    if spec.p_exp > 0 or spec.p_frac > 0:
        zeros = torch.zeros(numel, dtype=dtype, device=device)
        drawn = apply_flip_spec(zeros, FlipSpec(spec.p_exp, spec.p_frac), key, 0).view(view)
        index = drawn.nonzero().view(-1)
        mask = drawn[index]
        del drawn, zeros
        # stuck-at-1 draw: one element per stuck element (index order), each bit at one_share
        share = FlipSpec(spec.one_share, spec.one_share)
        values = torch.zeros(index.numel(), dtype=dtype, device=device)
        ones = mask & apply_flip_spec(values, share, key, 1).view(view)
    else:
        index = torch.zeros(0, dtype=torch.int64, device=device)
        mask = ones = torch.zeros(0, dtype=view, device=device)
    if spec.positions:
        index, mask, ones = _with_explicit(spec, index, mask, ones, numel, n_bits, view, where)
    return StuckBits(index, ~mask, ones)


def _with_explicit(spec, index, mask, ones, numel, n_bits, view, where):
    """The drawn (index, mask, ones) with the explicit entries added (they win on a bit)."""
    bits: dict[int, list[int]] = {}
    full = (1 << n_bits) - 1
    for i, m, o in zip(index.tolist(), mask.tolist(), ones.tolist()):
        bits[i] = [m & full, o & full]
    for i, (index_, bit, value) in enumerate(spec.positions):
        if index_ >= numel:
            raise ValueError(
                f"{where}: stuck position {i} has element index {index_}, but the tensor has "
                f"{numel} elements"
            )
        if bit >= n_bits:
            raise ValueError(
                f"{where}: stuck position {i} names bit {bit}, but its dtype has {n_bits} bits"
            )
        m, o = bits.setdefault(index_, [0, 0])
        bits[index_] = [m | (1 << bit), (o & ~(1 << bit)) | (value << bit)]
    order = sorted(bits)
    device = index.device
    return (
        torch.tensor(order, dtype=torch.int64, device=device),
        torch.tensor([_signed(bits[i][0], n_bits) for i in order], dtype=view, device=device),
        torch.tensor([_signed(bits[i][1], n_bits) for i in order], dtype=view, device=device),
    )


# ---------------------------------------------------------------------- applying


class _ApplyStuck(torch.autograd.Function):
    """``(t & keep) | ones`` at the stuck elements (of the flattened tensor, or of its last
    dimension's lanes), out of place; straight-through gradient."""

    @staticmethod
    def forward(ctx, t, index, keep, ones, lanes: bool):
        out = t.clone(memory_format=torch.contiguous_format)
        ints = out.view(_INT_VIEW[check_dtype(t.dtype).n_bits])
        if lanes:
            ints[..., index] = (ints[..., index] & keep) | ones
        else:
            flat = ints.view(-1)
            flat[index] = (flat[index] & keep) | ones
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class _StraightThrough(torch.autograd.Function):
    """``stuck`` (a stuck copy of ``source``, maybe in another dtype) with the gradient passed
    straight through to ``source`` (cast to its dtype)."""

    @staticmethod
    def forward(ctx, source, stuck):
        ctx.dtype = source.dtype
        return stuck.view_as(stuck)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _capturing() -> bool:
    """Whether a CUDA graph is being captured (a cached weight would be frozen into it)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _no_graph():
    """Outside inference mode (the stuck weight outlives the call) and without autograd: in
    that order, since ``inference_mode(False)`` turns grad mode back on.  (Built the other way
    round, a copy cached while the weight required a gradient kept a graph into it: a later
    step with the weight frozen computed and accumulated its gradient anyway.)"""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _identity(t: Tensor) -> tuple:
    """What tells a tensor's values apart without reading them: the object, its version
    counter (in-place writes), storage, layout, dtype, device; () for an inference tensor
    (it has no version counter: never cached)."""
    try:
        version = t._version
    except RuntimeError:
        return ()
    return (id(t), version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


@torch.compiler.assume_constant_result
def _traced_bits(stuck: StuckAt, token: int, tensor: str, numel: int, dtype, device):
    """:meth:`StuckAt.bits` run while ``torch.compile`` traces (the draw happens then, outside
    the graph; the graph holds the bits as constants).  ``token`` (the :class:`StuckAt`'s)
    is an argument so that the compiled code is guarded on it: another layer's code traces
    its own bits."""
    return stuck._drawn_bits(tensor, numel, dtype, device)


class StuckAt:
    """The stuck-at faults of one layer: settings, the drawn bits (cached per element count,
    dtype and device: a pure function of them, so never saved), and their application.

    Memory: the drawn bits (an int64 index plus two mask words per element with a stuck bit)
    and, in eager mode where W's flip kernel does not force them itself (see
    :meth:`apply_fused`: the CPU, dense stuck bits, a built weight without gradients), the
    layer's weight with its stuck bits forced: one weight-sized tensor
    in the dtype the matmul reads (e.g. bf16 under a bf16 autocast), kept between calls so
    that a weight that does not change (a frozen base weight under LoRA, evaluation) is built
    once, not at every forward and again in backward.  It is rebuilt when what it was built
    from changes: another tensor, an in-place write (an optimizer step, ``load_state_dict``;
    seen through the tensor's version counter), new storage, dtype, device, autocast dtype,
    or (LoRA) the A / B factors or scale.  A write through ``weight.data`` bypasses the version
    counter: call :meth:`clear` after one.  ``keep_weight = False`` (per layer) builds it at
    every forward instead and keeps nothing between calls (with gradients until backward),
    for a model whose memory cannot take the copies.  Under ``torch.compile`` and while a
    CUDA graph is captured the stuck weight is built in the graph at every call instead;
    under ``torch.compile`` the bits are drawn while tracing (no graph break).
    """

    _tokens = itertools.count()
    keep_weight = True  # keep the stuck weight between calls (see the class doc)

    def __init__(self, name: str, seed: int, x: StuckSpec, w: StuckSpec):
        self.name, self.seed, self.x, self.w = name, seed, x, w
        self.token = next(StuckAt._tokens)
        self._bits: dict = {}
        self._weight = None  # (identity key, weakrefs to the sources, stuck weight)

    def __repr__(self) -> str:
        return f"StuckAt({self.name!r}, seed={self.seed}, x={self.x}, w={self.w})"

    def __getstate__(self) -> dict:  # copies and pickles leave the caches behind
        return {**self.__dict__, "_bits": {}, "_weight": None}

    def clear(self) -> None:
        """Drop the cached stuck weight (it is built again at the next forward)."""
        self._weight = None

    def key(self, tensor: str) -> tuple[int, int]:
        """The stream of the stuck bits of ``tensor`` ("x" / "w"): no rank in it."""
        return stream_key(self.seed, self.name, f"{tensor}_stuck")

    def bits(self, tensor: str, numel: int, dtype: torch.dtype, device) -> StuckBits:
        """The stuck bits of ``tensor`` for ``numel`` elements (x: ``in_features`` lanes)."""
        device = torch.device(device)
        if torch.compiler.is_compiling():
            return _traced_bits(self, self.token, tensor, numel, dtype, device)
        return self._drawn_bits(tensor, numel, dtype, device)

    def _drawn_bits(self, tensor: str, numel: int, dtype: torch.dtype, device) -> StuckBits:
        cache_key = (tensor, numel, dtype, device)
        found = self._bits.get(cache_key)
        if found is None:
            spec = self.x if tensor == "x" else self.w
            where = f"{self.name} {tensor} (stuck-at)"
            found = _draw(spec, self.key(tensor), numel, dtype, device, where)
            self._bits[cache_key] = found
        return found

    def positions(
        self, tensor: str, numel: int, dtype: torch.dtype, device="cpu"
    ) -> list[list[int]]:
        """The stuck bits of ``tensor`` as ``[[index, bit, value], ...]`` (an explicit list that
        replays them), drawn on ``device`` (the same on every device)."""
        bits = self.bits(tensor, numel, dtype, device)
        n_bits = check_dtype(dtype).n_bits
        out = []
        for i, keep, ones in zip(bits.index.tolist(), bits.keep.tolist(), bits.ones.tolist()):
            mask = ~keep
            out += [[i, b, (ones >> b) & 1] for b in range(n_bits) if (mask >> b) & 1]
        return out

    def lanes(self, in_features: int, dtype: torch.dtype, device) -> Tensor | None:
        """The stuck input lanes as a dense (2, ``in_features``) tensor in the signed integer
        view of ``dtype``: keep (``~mask``; -1 where no bit is stuck) and ones, per feature,
        for the flip kernel to force in its pass over x; None where no lane is stuck.  Built
        once per (in_features, dtype, device) and kept (two words per input feature)."""
        device = torch.device(device)
        cache_key = ("x_lanes", in_features, dtype, device)
        if cache_key not in self._bits:
            bits = self.bits("x", in_features, dtype, device)
            dense = None
            if bits.index.numel():
                view = _INT_VIEW[check_dtype(dtype).n_bits]
                dense = torch.zeros(2, in_features, dtype=view, device=device)
                dense[0] = -1
                dense[0, bits.index] = bits.keep
                dense[1, bits.index] = bits.ones
            self._bits[cache_key] = dense
        return self._bits[cache_key]

    def stuck(self, tensor: str, t: Tensor) -> Tensor:
        """``t`` with the stuck bits of ``tensor`` forced (a new tensor; ``t`` if none)."""
        lanes = tensor == "x"
        numel = t.size(-1) if lanes else t.numel()
        bits = self.bits(tensor, numel, t.dtype, t.device)
        if bits.index.numel() == 0:
            return t
        return _ApplyStuck.apply(t, bits.index, bits.keep, bits.ones, lanes)

    def sparse(self, numel: int, dtype: torch.dtype, device) -> SparseStuck:
        """The weight's stuck bits for ``numel`` elements of ``dtype`` as the flip kernel takes
        them (:class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck`), built once and kept."""
        device = torch.device(device)
        cache_key = ("w_sparse", numel, dtype, device)
        found = self._bits.get(cache_key)
        if found is None:
            bits = self.bits("w", numel, dtype, device)
            found = SparseStuck(bits.index, bits.keep, bits.ones, numel, dtype)
            self._bits[cache_key] = found
        return found

    def apply_fused(
        self, x: Tensor, weight, weight_params, compute, weight_key, x_spec, w_spec=None,
        weight_like: Tensor | None = None,
    ):  # fmt: skip
        """:meth:`apply`, leaving the stuck bits to the flip kernels where they can take them:
        returns (x, weight, weight_params, x lanes or None, weight bits or None).

        Input lanes: with lanes, x comes back without them (cast to ``compute``) and the
        caller passes them on with it (``flipped_linear(..., x_lanes=)``): one pass over x
        fewer.  They are fused when x has a flip kernel pass (``x_spec``, the layer's
        transient-flip spec of x, or None when something acts between the stuck bits and the
        flips: bursts, statistics) with no per-bit-position rates, outside ``torch.compile``,
        on the Triton backend, and ``in_features`` is a multiple of the kernel's group (8
        16-bit / 4 float32 elements); else they are forced here, as :meth:`apply` does.

        Weight bits: with them (a :class:`~peft_bitflip.kernels.sparse_stuck.SparseStuck`),
        ``weight`` and ``weight_params`` come back as they came and the caller passes the bits
        on (``flipped_linear(..., w_stuck=)``): W's flip kernel forces them in its own pass, in
        the forward and in backward's recompute, so no stuck copy of W is built (after every
        optimizer step) or kept.  They are fused on the same terms with ``w_spec`` (the
        layer's spec of W), when the stuck elements are at most :attr:`kernel_density` of the
        weight (the kernel walks them one by one), and, for a weight that ``weight`` builds,
        while a gradient flows to ``weight_params`` (then the cached stuck copy would be
        rebuilt at every step anyway).  ``weight_like``: a tensor with the element count and
        dtype of the weight ``weight`` builds (default: ``weight``, or ``weight_params[0]``
        for a built weight)."""
        w_bits = self._weight_bits(weight, weight_params, compute, w_spec, weight_like)
        x, lanes = self._stuck_x(x, compute, x_spec)
        if w_bits is None:  # the stuck copy of the weight (x is done)
            x, weight, weight_params = self.apply(
                x, weight, weight_params, compute, weight_key, lanes_done=True
            )
        return x, weight, weight_params, lanes, w_bits

    kernel_density = 1 / 32
    """Most elements with a stuck bit, as a share of the weight, whose bits the flip kernel
    forces (above it the stuck copy of :meth:`apply` is built instead)."""

    def _stuck_x(self, x: Tensor, compute, x_spec) -> tuple:
        """(x cast to ``compute``, lanes or None): x's stuck lanes forced here (a separate
        pass), or left to its flip kernel (returned as lanes, see :meth:`apply_fused`)."""
        if self.x.is_identity:
            return x, None
        x = x if compute is None else x.to(compute)
        if self._fusable(x, x.dtype, x_spec):
            lanes = self.lanes(x.size(-1), x.dtype, x.device)
            if lanes is not None:
                return x, lanes
        return self.stuck("x", x), None

    def _weight_bits(self, weight, weight_params, compute, w_spec, weight_like):
        """W's stuck bits for its flip kernel (see :meth:`apply_fused`), or None."""
        if self.w.is_identity or w_spec is None or w_spec.is_identity or w_spec.p_bits is not None:
            return None
        if callable(weight):
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in weight_params)):
                return None  # (frozen or evaluated: the cached stuck copy saves the build)
            like = weight_like if weight_like is not None else weight_params[0]
        else:
            like = weight if weight_like is None else weight_like
        if torch.compiler.is_compiling() or _capturing() or backend_for(like.device) != "triton":
            return None
        numel = like.numel()
        bits = self.sparse(numel, compute or like.dtype, like.device)
        return bits if len(bits) <= numel * self.kernel_density else None

    @staticmethod
    def _fusable(x: Tensor, dtype: torch.dtype, x_spec) -> bool:
        """Whether x's flip kernel can force x's stuck lanes (see :meth:`apply_fused`);
        ``dtype``: the dtype x is flipped in."""
        if x_spec is None or x_spec.is_identity or x_spec.p_bits is not None:
            return False
        if torch.compiler.is_compiling() or x.dim() == 0 or x.numel() == 0:
            return False
        return backend_for(x.device) == "triton" and x.size(-1) % group_size(dtype) == 0

    def apply(self, x: Tensor, weight, weight_params, compute, weight_key=(), lanes_done=False):
        """(x, weight, weight_params) of a layer forward with the stuck bits forced.

        ``weight``: a tensor, or a function building it from the tensors ``weight_params``
        (LoRA: W + s B A); ``weight_key``: whatever else decides the built weight (LoRA: the
        merge function and scale).  ``compute``: the autocast dtype or None; stuck bits act on
        the values the matmul consumes, cast to it.  The weight comes back as a tensor (the
        cached stuck weight, see the class doc; gradients pass straight through to
        ``weight`` or ``weight_params``) and ``weight_params`` as ``()``.  ``lanes_done``:
        leave x as it is (its stuck lanes go to the flip kernel, :meth:`apply_fused`)."""
        if not self.x.is_identity and not lanes_done:
            x = self.stuck("x", x if compute is None else x.to(compute))
        if self.w.is_identity:
            return x, weight, weight_params
        return x, self._stuck_weight(weight, tuple(weight_params), compute, weight_key), ()

    def _stuck_weight(self, weight, weight_params, compute, weight_key) -> Tensor:
        build = weight if callable(weight) else None
        sources = weight_params if build is not None else (weight,)

        def built():
            w = build() if build is not None else weight
            return w if compute is None else w.to(compute)

        if torch.compiler.is_compiling() or _capturing():  # in the graph, every call
            return self.stuck("w", built())
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in sources)
        identities = tuple(_identity(p) for p in sources)
        key = (identities, compute, weight_key) if all(identities) else None
        cached = self._weight
        hit = (
            key is not None
            and cached is not None
            and cached[0] == key
            and all(r() is p for r, p in zip(cached[1], sources))
        )
        if build is not None and grad:  # one merge with its graph, for the factors' grads
            source = built()
            stuck = cached[2] if hit else self._store(key, sources, source.detach())
            return _StraightThrough.apply(source, stuck)
        if hit:
            stuck = cached[2]
        else:
            with _no_graph():
                stuck = self._store(key, sources, built())
        return _StraightThrough.apply(weight, stuck) if grad else stuck

    def _store(self, key, sources, weight: Tensor) -> Tensor:
        """The stuck copy of ``weight`` (detached), cached under ``key`` (None: not cached)."""
        self._weight = None  # the old copy goes before the new one is built
        with _no_graph():
            stuck = self.stuck("w", weight)  # (weight itself where no bit is stuck)
        if key is not None and self.keep_weight:
            self._weight = (key, tuple(weakref.ref(p) for p in sources), stuck)
        return stuck


def stuck_at_for(config, name: str, experts: bool = False) -> StuckAt | ExpertsStuckAt | None:
    """The :class:`StuckAt` of module ``name`` under ``config`` (a ``BitflipConfig``), or, with
    ``experts`` (a fused MoE experts module), its :class:`ExpertsStuckAt`; None when none of
    its bits can be stuck."""
    values = config.stuck_values_for(name)
    if values is None:
        return None
    positions = config.stuck_at_positions or {}
    if experts and name in positions:
        raise ValueError(
            f"stuck_at_positions names the MoE experts module {name!r}: name each expert "
            f"matmul instead, as '{name}.<parameter>.<expert>' (e.g. '{name}.down_proj.0'), "
            "the names export_stuck_positions writes"
        )
    lists = {} if experts else positions.get(name, {})
    share = values["stuck_one_share"]
    specs = {
        t: StuckSpec(
            values[f"{t}_stuck_p_exp"], values[f"{t}_stuck_p_frac"], share, lists.get(t, ())
        )
        for t in TENSORS
    }
    if experts:
        listed = {k: v for k, v in positions.items() if k.startswith(name + ".")}
        if all(s.is_identity for s in specs.values()) and not listed:
            return None
        return ExpertsStuckAt(name, config.seed, specs["x"], specs["w"], listed)
    if all(s.is_identity for s in specs.values()):
        return None
    return StuckAt(name, config.seed, specs["x"], specs["w"])


class ExpertsStuckAt:
    """The stuck-at faults of a fused MoE experts module: the module's rates (``x`` / ``w``,
    :class:`StuckSpec` without positions) and, per expert matmul, a :class:`StuckAt` of its
    own named ``f"{module}.{parameter}.{expert}"`` (e.g. ``...mlp.experts.down_proj.3``):
    its stream, ``stream_key(seed, that name, "x_stuck" | "w_stuck")``, and its explicit
    positions, ``stuck_at_positions[that name]``, over the expert's 2-D weight slice
    ``W[expert]`` as the module stores it and over the expert's input features (``listed``:
    those entries of the config)."""

    def __init__(self, name: str, seed: int, x: StuckSpec, w: StuckSpec, listed: Mapping):
        self.name, self.seed, self.x, self.w = name, seed, x, w
        self.listed = {
            k: {t: tuple(map(tuple, v)) for t, v in d.items()} for k, d in listed.items()
        }
        self._matmuls: dict = {}

    def __repr__(self) -> str:
        return (
            f"ExpertsStuckAt({self.name!r}, seed={self.seed}, x={self.x}, w={self.w}, "
            f"{len(self.listed)} matmul(s) with explicit positions)"
        )

    def matmul(self, proj: str, expert: int) -> StuckAt | None:
        """The :class:`StuckAt` of expert ``expert``'s matmul with parameter ``proj`` (kept:
        its drawn bits and stuck weight slice are cached there), or None without stuck bits."""
        found = self._matmuls.get((proj, expert), False)
        if found is False:
            name = f"{self.name}.{proj}.{expert}"
            lists = self.listed.get(name, {})
            x, w = (
                dataclasses.replace(s, positions=lists.get(t, ()))
                for t, s in zip(TENSORS, (self.x, self.w))
            )
            found = None if x.is_identity and w.is_identity else StuckAt(name, self.seed, x, w)
            self._matmuls[(proj, expert)] = found
        return found

    def clear(self) -> None:
        """Drop the cached stuck weight slices (see :meth:`StuckAt.clear`)."""
        for stuck in self._matmuls.values():
            if stuck is not None:
                stuck.clear()

    def sticks_listed(self, tensor: str) -> bool:
        """Whether an explicit position of ``tensor`` ("x" / "w") is listed for a matmul."""
        return any(lists.get(tensor) for lists in self.listed.values())


def stuck_settings(stuck: StuckAt | ExpertsStuckAt | None) -> tuple | None:
    """What decides the stuck bits of a :class:`StuckAt` / :class:`ExpertsStuckAt` (for
    comparing two), or None."""
    if stuck is None:
        return None
    return (stuck.name, stuck.seed, stuck.x, stuck.w, getattr(stuck, "listed", None))


def check_position_names(config, flipped_names) -> None:
    """Raise ``ValueError`` naming the layers of ``config.stuck_at_positions`` that are not
    bit-flip layers (or expert matmuls ``<experts module>.<parameter>.<expert>``, see
    :func:`position_names`) of the model: their faults would silently do nothing."""
    missing = [n for n in (config.stuck_at_positions or {}) if n not in flipped_names]
    if missing:
        names = list(flipped_names)
        raise ValueError(
            f"stuck_at_positions names layer(s) {missing} that are not bit-flip layers of the "
            f"model; layers are named as e.g. {names[:3]} (the experts of an MoE module as "
            "'<module>.<parameter>.<expert>')"
        )


def position_names(name: str, module: torch.nn.Module) -> list[str]:
    """The names ``stuck_at_positions`` gives the matmuls of bit-flip module ``name``: the
    name itself for a linear layer, ``f"{name}.{parameter}.{expert}"`` for every expert matmul
    of a fused MoE experts module."""
    if not is_experts(module):
        return [name]
    return [
        f"{name}.{proj}.{e}"
        for proj in expert_weight_names(module)
        for e in range(module.num_experts)
    ]


def _stuck_matmuls(module: torch.nn.Module):
    """(StuckAt, weight as the matmul reads it, in_features) of every matmul of a bit-flip
    module with stuck bits: the layer itself, or each expert's slice ``W[expert]``."""
    stuck = module.bitflip_stuck
    if not isinstance(stuck, ExpertsStuckAt):
        weight = module.weight
        conv1d = getattr(module, "_is_conv1d", False)
        yield stuck, weight, weight.shape[0] if conv1d else weight.shape[1]
        return
    for proj in expert_weight_names(module):
        stacked = module._parameters[proj]  # (not the attribute: a PEFT ParamWrapper adds dW)
        for e in range(module.num_experts):
            found = stuck.matmul(proj, e)
            if found is not None:
                weight = stacked[e]
                yield found, weight, weight.shape[0] if module.is_transposed else weight.shape[1]


def export_stuck_positions(model: torch.nn.Module, x_dtype: torch.dtype | None = None) -> dict:
    """The stuck bits of every bit-flip layer of ``model`` as an explicit list
    ``{layer name: {"x": [...], "w": [...]}}`` (``BitflipConfig.stuck_at_positions`` replays
    it), in the dtype the layers force them in: under a ``torch.autocast`` active on the
    weights' device (call this inside the same autocast as the forward) its dtype for both;
    without, the weight's dtype, and for input lanes ``x_dtype`` (the input's dtype; default
    the weight's).  A fused MoE experts module has one entry per expert matmul, named
    ``f"{module}.{parameter}.{expert}"`` (its weight: the expert's 2-D slice ``W[expert]``)."""
    out = {}
    for _, module in model.named_modules():
        if getattr(module, "bitflip_stuck", None) is None:
            continue
        for stuck, weight, in_features in _stuck_matmuls(module):
            compute = _autocast_dtype(weight)
            entry = {}
            if not stuck.x.is_identity:
                dtype = compute or x_dtype or weight.dtype
                entry["x"] = stuck.positions("x", in_features, dtype, weight.device)
            if not stuck.w.is_identity:
                dtype = compute or weight.dtype
                entry["w"] = stuck.positions("w", weight.numel(), dtype, weight.device)
            out[stuck.name] = entry
    return out
