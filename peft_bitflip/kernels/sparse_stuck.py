"""Sparse stuck bits of a tensor in the form the flip kernel forces them in its own pass.

A weight's stuck bits are few (at a per-bit rate of 2^-16, one bf16 element in 4096 has one),
so the flip kernel takes them as a sorted list instead of a tensor-sized mask: each program
reads the slice of the list that falls in its block (two words of a per-program offset table)
and forces those elements before it flips them.  This module holds that list, the offset table
of a launch shape and the PyTorch reference that forces the same bits out of place (the CPU
path, and wherever no flip kernel runs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import check_dtype

__all__ = ["SparseStuck"]

_INT_VIEW = {16: torch.int16, 32: torch.int32}
_LOW_WORD = 0xFFFFFFFF


class SparseStuck:
    """The stuck bits of a tensor of ``numel`` elements of ``dtype`` (row-major element
    order): ``index`` (int64, increasing), and per listed element ``keep`` (``~mask`` of its
    stuck bits) and ``ones`` (its bits stuck at 1), both in the signed integer view of
    ``dtype`` (int16 / int32).  ``value = (value & keep) | ones`` at those elements.

    ``entries``: the kernel's form, an int64 (n, 2) tensor of rows
    ``[index, (keep & 0xFFFFFFFF) | (ones << 32)]`` (the words sign-extended to 32 bits).
    :meth:`starts` gives the per-program offsets into it for a launch shape; both are
    built once and kept (a few words per stuck element, one per program)."""

    def __init__(self, index: Tensor, keep: Tensor, ones: Tensor, numel: int, dtype):
        n_bits = check_dtype(dtype, "stuck bits").n_bits
        view = _INT_VIEW[n_bits]
        if index.dim() != 1 or keep.shape != index.shape or ones.shape != index.shape:
            raise ValueError(
                f"stuck bits need index, keep and ones of one shape (n,), got "
                f"{tuple(index.shape)}, {tuple(keep.shape)}, {tuple(ones.shape)}"
            )
        if keep.dtype != view or ones.dtype != view:
            raise ValueError(f"keep and ones must be {view} for {dtype}, got {keep.dtype}")
        self.index, self.keep, self.ones = index, keep, ones
        self.numel, self.dtype, self.device = int(numel), dtype, index.device
        words = (keep.to(torch.int64) & _LOW_WORD) | (ones.to(torch.int64) << 32)
        self.entries = torch.stack([index, words], dim=1).contiguous()
        self._starts: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.index.numel()

    def __repr__(self) -> str:
        return f"SparseStuck({len(self)} of {self.numel} elements, {self.dtype}, {self.device})"

    def starts(self, per_program: int) -> Tensor:
        """int32 offsets into :attr:`entries`, one per program plus one: program ``i`` (block
        of elements ``[i * per_program, (i + 1) * per_program)``) forces entries
        ``starts[i]`` to ``starts[i + 1]``."""
        found = self._starts.get(per_program)
        if found is None:
            programs = -(-self.numel // per_program)
            bounds = torch.arange(programs + 1, dtype=torch.int64, device=self.device)
            found = torch.searchsorted(self.index, bounds * per_program).to(torch.int32)
            self._starts[per_program] = found
        return found

    def check_fits(self, t: Tensor, what: str = "x") -> None:
        """Raise ``ValueError`` unless ``t`` is the tensor these bits were drawn for (element
        count, dtype, device): forcing them into another would silently corrupt it."""
        if t.numel() != self.numel or t.dtype != self.dtype or t.device != self.device:
            raise ValueError(
                f"stuck bits drawn for {self.numel} elements of {self.dtype} on {self.device} "
                f"do not fit {what} ({t.numel()} elements of {t.dtype} on {t.device})"
            )

    def apply(self, t: Tensor) -> Tensor:
        """``t`` with the stuck bits forced, out of place (a new contiguous tensor; ``t``
        itself when none is listed).  Not differentiable."""
        self.check_fits(t)
        if len(self) == 0:
            return t
        out = t.detach().clone(memory_format=torch.contiguous_format)
        flat = out.view(-1).view(self.keep.dtype)
        flat[self.index] = (flat[self.index] & self.keep) | self.ones
        return out
