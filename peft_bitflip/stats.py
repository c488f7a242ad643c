"""Counting flipped bits and zeroed elements: for tests, the demo and logging."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from .functional import apply_flip_spec
from .kernels.op import backend_for, bitflip_counted_impl
from .kernels.reference import bitflip_counted_native
from .kernels.sampling import ceil_div, check_flip_counts, flip_table
from .spec import FlipSpec, check_dtype

INT_VIEW = {16: torch.int16, 32: torch.int32}


def as_unsigned(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor as int64 values in [0, 2^bits)."""
    n_bits = check_dtype(t.dtype).n_bits
    return t.contiguous().view(INT_VIEW[n_bits]).to(torch.int64) & ((1 << n_bits) - 1)


def flipped_bits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """int64 XOR of the bit patterns of x and y (bit b set where bit b differs)."""
    return as_unsigned(x) ^ as_unsigned(y)


def per_bit_counts(diff: torch.Tensor, n_bits: int) -> torch.Tensor:
    """How many elements have bit b set in ``diff``, for b = 0 (LSB) .. n_bits-1."""
    return torch.stack([((diff >> b) & 1).sum() for b in range(n_bits)])


@dataclass(frozen=True)
class FlipCounts:
    """Flipped bits by group between a tensor and its flipped copy (before zero-out)."""

    n_elements: int
    exp_bits: int  # flipped sign/exponent bits
    frac_bits: int  # flipped mantissa bits
    n_exp: int  # exp-group bits per element
    n_frac: int  # mantissa bits per element

    def z_scores(self, p_exp: float, p_frac: float) -> tuple[float, float]:
        """How many binomial standard deviations each count lies from its expectation."""
        return (
            binomial_z(self.exp_bits, self.n_elements * self.n_exp, p_exp),
            binomial_z(self.frac_bits, self.n_elements * self.n_frac, p_frac),
        )


def count_flips(x: torch.Tensor, y: torch.Tensor) -> FlipCounts:
    """Count flipped exp (incl. sign) and mantissa bits between ``x`` and ``y``."""
    layout = check_dtype(x.dtype)
    diff = flipped_bits(x, y)
    frac_mask = (1 << layout.n_frac) - 1
    frac = _popcount(diff & frac_mask)
    exp = _popcount(diff >> layout.n_frac)
    return FlipCounts(x.numel(), int(exp), int(frac), layout.n_exp, layout.n_frac)


def _popcount(v: torch.Tensor) -> int:
    total = 0
    while bool((v != 0).any()):
        total += int((v & 1).sum())
        v = v >> 1
    return total


def binomial_z(count: int, trials: int, p: float) -> float:
    """(count - trials p) / sqrt(trials p (1 - p)); 0 when the variance is 0 and count matches."""
    mean = trials * p
    var = trials * p * (1 - p)
    if var == 0:
        return 0.0 if count == mean else math.inf
    return (count - mean) / math.sqrt(var)


# ---------------------------------------------------------------------------------------------
# True counts of what the bit-flip layers did, accumulated on the device (for logging)
# ---------------------------------------------------------------------------------------------

_SWAR_MASKS = (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F)
_KINDS = ("x", "w", "y")  # layer inputs, weights, outputs
_COUNT_COLUMNS = 6  # exp flips, frac flips, zeroed, non-finite, burst events, burst bits


def popcount(v: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each element of a **non-negative** integer tensor (same dtype).

    The SWAR bit trick (a fixed handful of elementwise ops, no loop over bits), so it runs on
    GPU-size tensors; for int8/16/32/64 values in [0, 2^(bits-1)).
    """
    bits = torch.iinfo(v.dtype).bits
    top = (1 << (bits - 1)) - 1  # keep the masks positive in the signed dtype
    m1, m2, m4 = (m & top for m in _SWAR_MASKS)
    v = v - ((v >> 1) & m1)  # 2-bit sums
    v = (v & m2) + ((v >> 2) & m2)  # 4-bit sums
    v = (v + (v >> 4)) & m4  # byte sums
    shift = 8
    while shift < bits:
        v = v + (v >> shift)
        shift *= 2
    return v & 0x7F


def flip_count_tensor(
    x: torch.Tensor, flipped: torch.Tensor, threshold: float | None
) -> torch.Tensor:
    """``[exp-group flips, mantissa flips, zeroed elements]`` as an int64 tensor on x's device.

    ``flipped`` is ``x`` after the bit flips and *before* zero-out (same dtype and shape);
    flips are the differing bits (the sign counts in the exp group); zeroed are the elements
    that zero-out with ``threshold`` sets to 0 (``|y| >= t`` in float32, NaN, +-Inf; 0 when
    ``threshold`` is None).  No host synchronisation.
    """
    return _flip_counts(x, flipped, _float32(threshold))


def burst_count_tensor(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``[events, flipped bits]`` (int64 tensor on the device) between a tensor and its copy
    after the burst faults: an event changes exactly one element, so events = changed
    elements.  No host synchronisation."""
    layout = check_dtype(before.dtype)
    view = INT_VIEW[layout.n_bits]
    diff = before.contiguous().view(view) ^ after.contiguous().view(view)
    diff = diff.to(torch.int64) & ((1 << layout.n_bits) - 1)
    return torch.stack([(diff != 0).sum(), popcount(diff).sum()])


@torch.compiler.assume_constant_result
def _float32(t: float | None) -> float | None:
    """``t`` rounded to float32 (as the kernel compares), kept a Python scalar."""
    return None if t is None else struct.unpack("f", struct.pack("f", t))[0]


def _flip_counts(x: torch.Tensor, flipped: torch.Tensor, t32) -> torch.Tensor:
    """The counts in PyTorch ops; ``t32``: None or the threshold rounded to float32."""
    layout = check_dtype(x.dtype)
    view = INT_VIEW[layout.n_bits]
    diff = x.view(view) ^ flipped.view(view)
    frac = diff & ((1 << layout.n_frac) - 1)
    exp = (diff >> layout.n_frac) & ((1 << layout.n_exp) - 1)  # arithmetic shift, then mask
    counts = [popcount(exp).sum(dtype=torch.int64), popcount(frac).sum(dtype=torch.int64)]
    if t32 is None:
        counts.append(torch.zeros((), dtype=torch.int64, device=x.device))
    else:
        keep = flipped.to(torch.float32).abs() < t32  # the zero-out rule of the kernel
        counts.append(keep.numel() - keep.sum(dtype=torch.int64))
    return torch.stack(counts)


if triton is not None:
    from .kernels.triton_bitflip import popcount32

    @triton.jit
    def _flip_count_kernel(
        x_ptr,
        f_ptr,
        out_ptr,
        n,
        threshold,
        HAS_ZERO: tl.constexpr,
        ELEM_BITS: tl.constexpr,
        N_EXP: tl.constexpr,
        N_FRAC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Adds [exp flips, mantissa flips, zeroed] of BLOCK elements to out[0:3] (int64)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        x = tl.load(x_ptr + offs, mask=inb, other=0)
        f = tl.load(f_ptr + offs, mask=inb, other=0)
        if ELEM_BITS == 16:
            d = (x.to(tl.int16, bitcast=True) ^ f.to(tl.int16, bitcast=True)).to(tl.int32)
        else:
            d = x.to(tl.int32, bitcast=True) ^ f.to(tl.int32, bitcast=True)
        frac = d & ((1 << N_FRAC) - 1)
        exp = (d >> N_FRAC) & ((1 << N_EXP) - 1)
        # relaxed (the default acq_rel fences each add); no add of a zero (small p: most blocks)
        n_exp = tl.sum(popcount32(exp), axis=0).to(tl.int64)
        n_frac = tl.sum(popcount32(frac), axis=0).to(tl.int64)
        if n_exp != 0:
            tl.atomic_add(out_ptr, n_exp, sem="relaxed")
        if n_frac != 0:
            tl.atomic_add(out_ptr + 1, n_frac, sem="relaxed")
        if HAS_ZERO:
            keep = tl.abs(f.to(tl.float32)) < threshold  # NaN and Inf compare false
            n_zeroed = tl.sum((inb & (keep == 0)).to(tl.int32), axis=0).to(tl.int64)
            if n_zeroed != 0:
                tl.atomic_add(out_ptr + 2, n_zeroed, sem="relaxed")

    @triton.jit
    def _nonfinite_count_kernel(y_ptr, out_ptr, n, FLOAT_MAX: tl.constexpr, BLOCK: tl.constexpr):
        """Adds the NaN/+-Inf elements among BLOCK elements of y to out[0] (int64)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        y = tl.load(y_ptr + offs, mask=inb, other=0).to(tl.float32)
        bad = tl.where(inb & ((tl.abs(y) <= FLOAT_MAX) == 0), 1, 0)  # NaN compares false
        n_bad = tl.sum(bad, axis=0).to(tl.int64)
        if n_bad != 0:  # nearly always 0: no add (relaxed where there is one)
            tl.atomic_add(out_ptr, n_bad, sem="relaxed")


COUNT_BLOCK = 4096


def _add_counts(out: torch.Tensor, x: torch.Tensor, flipped: torch.Tensor, threshold) -> None:
    """``out += flip_count_tensor(x, flipped, threshold)`` for a contiguous int64 ``out`` (3,).

    Where the bit-flip op runs its Triton kernel (CUDA; the CPU with the interpreter) one
    Triton kernel reads each tensor once: 0.07-0.08 ms for 8192x4096 bf16 on an H100, where
    the PyTorch ops (~30 elementwise passes) take 2.1-2.6 ms, several times the layer's
    matmul.  Elsewhere, and while ``torch.compile`` traces, the PyTorch ops (which inductor
    fuses).  No host synchronisation.
    """
    t32 = _float32(threshold)
    if torch.compiler.is_compiling() or triton is None or backend_for(x.device) != "triton":
        out += _flip_counts(x, flipped, t32)
        return
    layout = check_dtype(x.dtype)
    x, flipped = x.contiguous().view(-1), flipped.contiguous().view(-1)
    grid = (ceil_div(x.numel(), COUNT_BLOCK),)
    _flip_count_kernel[grid](
        x,
        flipped,
        out,
        x.numel(),
        t32 if t32 is not None else 0.0,
        HAS_ZERO=t32 is not None,
        ELEM_BITS=layout.n_bits,
        N_EXP=layout.n_exp,
        N_FRAC=layout.n_frac,
        BLOCK=COUNT_BLOCK,
        num_warps=8,
    )


_COUNTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_flip_spec_counted(
    x: torch.Tensor, spec, key, call, counts: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``apply_flip_spec(x, spec, key, call)`` (not differentiable), adding what it did to
    ``counts`` (:func:`~peft_bitflip.kernels.op.new_flip_counts` on x's device: int64 rows
    whose sum is [sign/exponent bits flipped, mantissa bits flipped, elements zeroed]).
    ``out``: where the result goes (``x`` itself: in place; the result is returned either
    way).  For a contiguous ``x`` without per-bit-position rates one pass flips, counts,
    zeroes and writes: the Triton kernel (CUDA, the interpreter) or the native CPU pass;
    elsewhere the flips, the count (:func:`_add_counts`) and the zero-out run one after the
    other.  No host synchronisation."""
    check_flip_counts(x, counts, out)
    with torch.no_grad():
        y = None
        if spec.is_identity:
            y = x
        elif spec.p_bits is None and x.is_contiguous() and not torch.compiler.is_compiling():
            table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
            t = spec.zero_out_threshold
            if backend_for(x.device) == "triton":
                call = torch.as_tensor(call, dtype=torch.int64, device=x.device)
                return bitflip_counted_impl(x, table, call, *key, t, spec.flips, counts, out)
            if x.device.type == "cpu":  # None where the native pass does not run
                y = bitflip_counted_native(x, table, call, *key, t, spec.flips, counts, out)
        if y is None:
            y = apply_flip_spec(x, replace(spec, zero_out_threshold=None), key, call)
            _add_counts(counts[0], x, y, spec.zero_out_threshold)
            if spec.zero_out_threshold is not None:
                y = apply_flip_spec(y, FlipSpec(zero_out_threshold=spec.zero_out_threshold), key)
        if out is None or y is out:
            return y
        out.copy_(y)
        return out


def _add_nonfinite(out: torch.Tensor, y: torch.Tensor) -> None:
    """``out[0] += (number of NaN / +-Inf elements of y)`` for an int64 ``out``; on the device,
    no host synchronisation.  One Triton kernel reading y once where the bit-flip op runs its
    Triton kernel (float32 / bf16 / fp16: 0.03 ms for 8192x4096 bf16 on an H100, the PyTorch
    ops 0.38 ms), else (and while ``torch.compile`` traces) PyTorch ops."""
    if (
        torch.compiler.is_compiling()
        or triton is None
        or y.dtype not in _COUNTED_DTYPES
        or backend_for(y.device) != "triton"
    ):
        out[0] += y.numel() - torch.isfinite(y).sum(dtype=torch.int64)
        return
    y = y.contiguous().view(-1)
    grid = (ceil_div(y.numel(), COUNT_BLOCK),)
    _nonfinite_count_kernel[grid](
        y, out, y.numel(), FLOAT_MAX=torch.finfo(torch.float32).max, BLOCK=COUNT_BLOCK,
        num_warps=8,
    )  # fmt: skip


@dataclass(frozen=True)
class TensorFlipStats:
    """Totals of what the flips did to one kind of tensor (layer inputs, weights or both), or
    of what came out of the layers.

    ``elements``: elements that went through the fault model (one per element per forward),
    for the layers' outputs (``"y"``) the output elements computed;
    ``exp_bits`` / ``frac_bits``: sign+exponent / mantissa bits among them (the trials);
    ``exp_flips`` / ``frac_flips``: bits that really flipped (before zero-out);
    ``zeroed``: elements that zero-out really set to 0 (after flipping);
    ``nonfinite``: output elements that are NaN or +-Inf (outputs only: 0 for inputs and
    weights, whose zero-out leaves no non-finite value and which are not counted otherwise);
    ``burst_events`` / ``burst_bits``: burst fault events (elements struck) and the bits they
    inverted; ``burst_elements``: elements that went through burst sampling (the trials of
    the event rate; 0 where no layer has bursts).
    """

    elements: int = 0
    exp_bits: int = 0
    frac_bits: int = 0
    exp_flips: int = 0
    frac_flips: int = 0
    zeroed: int = 0
    nonfinite: int = 0
    burst_events: int = 0
    burst_bits: int = 0
    burst_elements: int = 0

    def __add__(self, other: TensorFlipStats) -> TensorFlipStats:
        return TensorFlipStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, ...]:
        return (
            self.elements,
            self.exp_bits,
            self.frac_bits,
            self.exp_flips,
            self.frac_flips,
            self.zeroed,
            self.nonfinite,
            self.burst_events,
            self.burst_bits,
            self.burst_elements,
        )

    @property
    def exp_rate(self) -> float:
        """Flipped sign/exponent bits per such bit (0.0 when none was processed)."""
        return self.exp_flips / self.exp_bits if self.exp_bits else 0.0

    @property
    def frac_rate(self) -> float:
        """Flipped mantissa bits per mantissa bit (0.0 when none was processed)."""
        return self.frac_flips / self.frac_bits if self.frac_bits else 0.0

    @property
    def zeroed_rate(self) -> float:
        """Zeroed elements per element (0.0 when none was processed)."""
        return self.zeroed / self.elements if self.elements else 0.0

    @property
    def burst_event_rate(self) -> float:
        """Burst events per element that went through burst sampling (0.0 when none did)."""
        return self.burst_events / self.burst_elements if self.burst_elements else 0.0

    @property
    def nonfinite_rate(self) -> float:
        """NaN / +-Inf elements per element (0.0 when none was processed)."""
        return self.nonfinite / self.elements if self.elements else 0.0


class FlipStatsAccumulator:
    """Counts for one layer: flips, zeroed and non-finite elements on the device, sizes on the
    host.

    ``record`` is called by the layer (see ``flipped_linear``) with the tensor, its result and
    the settings used; it launches one counting kernel per tensor (see :func:`_add_counts`) and
    never synchronises with the host.  With a zero-out threshold the flips are counted on a
    second, flip-only pass of the same stream (the zeroed elements hide their flipped bits),
    outside autograd.  ``record_output`` counts the NaN / +-Inf elements of the layer's output
    (one more read of it, see :func:`_add_nonfinite`).
    """

    def __init__(self):
        # int64 (3, 6): [x, w, y] x [exp flips, frac flips, zeroed, non-finite, burst events,
        # burst bits]
        self.counts: torch.Tensor | None = None
        # [x, w, y] x [elements, exp/frac bits, burst elements]
        self.sizes = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]

    def _counts_on(self, device: torch.device) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros((3, _COUNT_COLUMNS), dtype=torch.int64, device=device)
        elif self.counts.device != device:
            self.counts = self.counts.to(device)
        return self.counts

    def record(self, kind: str, x: torch.Tensor, y: torch.Tensor, spec, key, call) -> None:
        """Add what ``spec`` did to ``x`` (result ``y``) at stream ``key``, ``call``."""
        i = _KINDS.index(kind)
        layout = check_dtype(x.dtype)
        n = x.numel()
        sizes = self.sizes[i]
        sizes[0] += n
        sizes[1] += n * layout.n_exp
        sizes[2] += n * layout.n_frac
        if spec.is_identity or n == 0:
            return
        with torch.no_grad():
            x = x.detach()
            if spec.zero_out_threshold is None:
                flipped = y.detach()
            elif spec.flips:
                flipped = apply_flip_spec(x, replace(spec, zero_out_threshold=None), key, call)
            else:
                flipped = x
            counts = self._counts_on(x.device)
            _add_counts(counts[i, :3], x, flipped, spec.zero_out_threshold)

    def record_bursts(self, kind: str, before: torch.Tensor, after: torch.Tensor) -> None:
        """Add the burst events and bits between ``before`` and ``after`` (its copy after the
        burst faults, before zero-out) of ``kind`` ("x" / "w")."""
        i = _KINDS.index(kind)
        self.sizes[i][3] += before.numel()
        if before.numel():
            with torch.no_grad():
                counts = self._counts_on(before.device)
                counts[i, 4:] += burst_count_tensor(before.detach(), after.detach())

    def record_output(self, out: torch.Tensor) -> None:
        """Add the elements of the layer's output ``out`` and how many are NaN or +-Inf."""
        self.sizes[2][0] += out.numel()
        if out.numel():
            with torch.no_grad():
                _add_nonfinite(self._counts_on(out.device)[2, 3:], out.detach())

    def reset(self) -> None:
        if self.counts is not None:
            self.counts.zero_()
        self.sizes = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


class FlipStatsRecorder:
    """Record the true flip counts of every bit-flip layer of ``model``.

    ``start()`` attaches a :class:`FlipStatsAccumulator` to each layer (``layer.bitflip_stats``),
    ``stop()`` detaches them (counting then costs nothing), ``read()`` returns the totals since
    the last reset, ``read_per_layer()`` the same per layer.  Also a context manager::

        with FlipStatsRecorder(model) as rec:
            model(ids)
        print(rec.read()["all"].exp_rate, rec.read()["y"].nonfinite)
    """

    def __init__(self, model: torch.nn.Module):
        from .layers import bitflip_layers

        named = bitflip_layers(model)
        if not named:
            raise ValueError("the model has no bit-flip layers to record")
        self.layers = [m for _, m in named]
        # the layers' stream names (the module path when the model was transformed)
        self.names = [getattr(m, "bitflip_name", n) for n, m in named]
        self.accumulators = [FlipStatsAccumulator() for _ in self.layers]

    def start(self) -> FlipStatsRecorder:
        for layer, acc in zip(self.layers, self.accumulators):
            layer.bitflip_stats = acc
        return self

    def stop(self) -> None:
        for layer, acc in zip(self.layers, self.accumulators):
            if layer.__dict__.get("bitflip_stats") is acc:
                del layer.__dict__["bitflip_stats"]  # back to the class default None

    def __enter__(self) -> FlipStatsRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        for acc in self.accumulators:
            acc.reset()

    def _values(self, per_layer: bool, all_reduce: bool) -> list[list[list[int]]]:
        """``[group][kind x, w, y][TensorFlipStats fields]``: one group (the totals) or one per
        layer; one host synchronisation, optionally summed over the ranks."""
        accs = self.accumulators
        groups = [[a] for a in accs] if per_layer else [accs]
        present = [a.counts for a in accs if a.counts is not None]
        device = present[0].device if present else torch.device("cpu")
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            dist = torch.distributed
            if device.type == "cpu" and dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
        else:
            all_reduce = False
        zeros = torch.zeros((3, _COUNT_COLUMNS), dtype=torch.int64, device=device)
        counts = torch.stack([zeros if a.counts is None else a.counts.to(device) for a in accs])
        if not per_layer:
            counts = counts.sum(0, keepdim=True)
        sizes = [
            [[sum(a.sizes[k][j] for a in g) for j in range(4)] for k in range(3)] for g in groups
        ]
        packed = torch.cat([torch.tensor(sizes, dtype=torch.int64, device=device), counts], -1)
        if all_reduce:
            torch.distributed.all_reduce(packed)
        # TensorFlipStats order: the 3 sizes, the 6 counts, then burst elements
        return [[row[:3] + row[4:] + row[3:4] for row in g] for g in packed.tolist()]

    @staticmethod
    def _kinds(table: list[list[int]]) -> dict[str, TensorFlipStats]:
        x, w, y = (TensorFlipStats(*row) for row in table)
        return {"x": x, "w": w, "y": y, "all": x + w}

    def read(self, reset: bool = True, all_reduce: bool = False) -> dict[str, TensorFlipStats]:
        """Totals ``{"x": inputs, "w": weights, "y": outputs, "all": inputs and weights}``
        since the last reset (``"y"``: the output elements and how many were NaN / +-Inf).

        One host synchronisation.  ``all_reduce``: sum over the ranks of torch.distributed
        when it is initialised (every rank must call ``read`` then); else this rank's counts.
        """
        (table,) = self._values(False, all_reduce)
        if reset:
            self.reset()
        return self._kinds(table)

    def read_per_layer(
        self, reset: bool = False, all_reduce: bool = False
    ) -> dict[str, dict[str, TensorFlipStats]]:
        """``{layer name: {"x", "w", "y", "all"}}`` as :meth:`read`, one entry per layer (in
        module order), named by ``layer.bitflip_name``; one host synchronisation."""
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"several bit-flip layers share a bitflip_name: {dup[:5]}")
        tables = self._values(True, all_reduce)
        if reset:
            self.reset()
        return {name: self._kinds(t) for name, t in zip(self.names, tables)}
