"""The fault model for one tensor: which bits flip with which probability, and what is zeroed.

Bit groups (IEEE layout, most significant bit first):

========  ====================  ==================
dtype     "exp" group           "frac" group
========  ====================  ==================
float32   sign + 8 exponent     23 mantissa bits
bfloat16  sign + 8 exponent     7 mantissa bits
float16   sign + 5 exponent     10 mantissa bits
========  ====================  ==================

The sign bit belongs to the "exp" group, as in the original mase-triton kernel.  Every bit
of a group flips independently with that group's probability, unless ``p_bits`` gives its
position a rate of its own (see :class:`FlipSpec`).  After flipping, an element
is set to 0 when ``|y| >= zero_out_threshold`` (inclusive) or when it is NaN or +-Inf; this
applies to every element, flipped or not.  ``zero_out_threshold=None`` disables it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "FlipSpec",
    "BIT_LAYOUTS",
    "BitLayout",
    "SUPPORTED_DTYPES",
    "snap_probability",
    "validate_probability",
    "validate_threshold",
    "validate_seed",
    "check_dtype",
    "MAX_SEED",
    "SIGN",
    "validate_p_bits",
    "require_group_rates",
]

COMPAT_MIN_HALVES = 1
COMPAT_MAX_HALVES = 24  # the original kernel asserts n <= 24, i.e. p >= 2**-24
MAX_SEED = 2**63  # seeds are in [0, 2**63): an int64, as config.json and torch store them


@dataclass(frozen=True)
class BitLayout:
    """Bit layout of a float dtype: total bits, exp-group bits (incl. sign), mantissa bits."""

    n_bits: int
    n_exp: int  # sign + exponent bits (the "exp" group), the top bits of the word
    n_frac: int  # mantissa bits, the low bits of the word


BIT_LAYOUTS: dict[torch.dtype, BitLayout] = {
    torch.float32: BitLayout(32, 9, 23),
    torch.bfloat16: BitLayout(16, 9, 7),
    torch.float16: BitLayout(16, 6, 10),
}
SUPPORTED_DTYPES = tuple(BIT_LAYOUTS)


def check_dtype(dtype: torch.dtype, name: str = "x") -> BitLayout:
    """Return the bit layout of ``dtype`` or raise ``TypeError`` naming it."""
    try:
        return BIT_LAYOUTS[dtype]
    except KeyError:
        raise TypeError(
            f"{name} has dtype {dtype}; bit flips support only float32, bfloat16 and float16"
        ) from None


def _is_real(value) -> bool:
    """A real number (``int``, ``float``, numpy scalars, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, str))


def validate_probability(name: str, p) -> float:
    """Return ``p`` as a float in [0, 1]; raise ``TypeError``/``ValueError`` naming ``name``.
    Any real number type is accepted (numpy scalars too), bools are not."""
    if not _is_real(p):
        raise TypeError(f"{name} must be a float in [0, 1], got {p!r} ({type(p).__name__})")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def validate_threshold(name: str, t) -> float | None:
    """Return ``t`` as a float >= 0 (``inf`` allowed) or ``None``; raise naming ``name``."""
    if t is None:
        return None
    if not _is_real(t):
        raise TypeError(f"{name} must be None or a float >= 0, got {t!r} ({type(t).__name__})")
    t = float(t)
    if math.isnan(t) or t < 0:
        raise ValueError(f"{name} must be None or a float >= 0, got {t!r}")
    return t


def validate_seed(name: str, seed) -> int:
    """Return ``seed`` as an int in [0, 2**63) (any integer type, numpy's too; not a bool);
    raise ``TypeError``/``ValueError`` naming ``name``.  The one check of every seed."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    if not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


SIGN = "sign"
"""The name ``p_bits`` accepts for the sign bit (position ``n_bits - 1`` of the dtype)."""


def _position(name: str, pos) -> int | str:
    """A ``p_bits`` key as an int >= 0 or ``"sign"`` (digit strings: JSON object keys)."""
    if isinstance(pos, str):
        text = pos.strip()
        if text.lower() == SIGN:
            return SIGN
        if text.isdigit():
            return int(text)
    elif isinstance(pos, numbers.Integral) and not isinstance(pos, bool) and int(pos) >= 0:
        return int(pos)
    raise ValueError(
        f"{name} has the bit position {pos!r}; positions are integers >= 0 (0 = least "
        f"significant bit) or {SIGN!r}"
    )


def validate_p_bits(name: str, p_bits) -> tuple[tuple[int | str, float], ...] | None:
    """``p_bits`` as a sorted tuple of ``(position, p)`` pairs (``"sign"`` last), or None for
    None / an empty mapping.  Accepts a mapping or (position, p) pairs; raises naming the bad
    position or value.  Positions are checked against a dtype by :func:`bit_rates`."""
    if p_bits is None:
        return None
    if isinstance(p_bits, Mapping):
        items = list(p_bits.items())
    elif isinstance(p_bits, (list, tuple)) and all(
        isinstance(i, (list, tuple)) and len(i) == 2 for i in p_bits
    ):
        items = [tuple(i) for i in p_bits]
    else:
        raise TypeError(
            f"{name} must be None or a dict {{bit position: probability}}, got {p_bits!r}"
        )
    out: dict[int | str, float] = {}
    for pos, p in items:
        position = _position(name, pos)
        if position in out:
            raise ValueError(f"{name} gives bit position {position!r} twice")
        out[position] = validate_probability(f"{name}[{pos!r}]", p)
    if not out:
        return None
    return tuple(sorted(out.items(), key=lambda kv: (kv[0] == SIGN, kv[0] if kv[0] != SIGN else 0)))


def p_bits_dict(p_bits) -> dict[str, float] | None:
    """A normalised ``p_bits`` as the JSON-safe dict config.json stores: ``{"15": p, ...}``."""
    return None if p_bits is None else {str(pos): p for pos, p in p_bits}


def snap_probability(p: float) -> float:
    """The probability the original kernel really uses for a requested ``p``.

    mase-triton turns p into ``n = ceil(log2(1/p))`` and flips with ``0.5**n`` (it rounds p
    *down* to a power of two), and only allows ``1 <= n <= 24``.  ``p = 0`` stays 0 (the
    original's "disabled"); n is clamped to [1, 24], so p = 1 snaps to 0.5 and p < 2**-24
    snaps to 2**-24.
    """
    p = validate_probability("p", p)
    if p == 0.0:
        return 0.0
    n = math.ceil(-math.log2(p))
    # guard against log2 rounding for exact powers of two
    if 0.5 ** (n - 1) <= p:
        n -= 1
    n = min(max(n, COMPAT_MIN_HALVES), COMPAT_MAX_HALVES)
    return 0.5**n


@dataclass(frozen=True)
class FlipSpec:
    """Fault settings for one tensor.

    Args:
        p_exp: probability that each sign/exponent bit flips, any value in [0, 1].
        p_frac: probability that each mantissa bit flips, any value in [0, 1].
        zero_out_threshold: after flipping, elements with ``|y| >= t`` (inclusive), NaN or
            +-Inf become 0.  ``None`` disables zero-out.
        compat_snap: use the original's probabilities (``snap_probability``) instead of the
            exact ``p``, to reproduce its numbers.
        p_bits: per-bit-position rates ``{position: p}`` (a dict, or None: the groups
            alone).  Position 0 is the least significant bit of the stored word in the
            tensor's dtype, ``n_bits - 1`` the sign (also accepted as ``"sign"``): float32 31 =
            sign, 30..23 exponent, 22..0 mantissa; bfloat16 15 = sign, 14..7 exponent, 6..0
            mantissa; float16 15 = sign, 14..10 exponent, 9..0 mantissa.  A listed position
            flips with its own p instead of its group's; unlisted positions keep ``p_exp`` /
            ``p_frac``.  A position the tensor's dtype does not have is an error when the spec
            is applied.  Stored normalised as sorted ``(position, p)`` pairs.

    Derived (read-only) attributes: ``effective_p_exp`` / ``effective_p_frac`` /
    ``effective_p_bits`` (the probabilities the kernel uses: snapped under ``compat_snap``),
    ``flips`` (any bit can flip) and ``is_identity`` (the transform returns its input
    unchanged).
    """

    p_exp: float = 0.0
    p_frac: float = 0.0
    zero_out_threshold: float | None = None
    compat_snap: bool = False
    p_bits: tuple[tuple[int | str, float], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "p_exp", validate_probability("p_exp", self.p_exp))
        object.__setattr__(self, "p_frac", validate_probability("p_frac", self.p_frac))
        object.__setattr__(
            self,
            "zero_out_threshold",
            validate_threshold("zero_out_threshold", self.zero_out_threshold),
        )
        if not isinstance(self.compat_snap, bool):
            raise TypeError(f"compat_snap must be a bool, got {self.compat_snap!r}")
        # derived values, plain attributes (not fields): every layer call reads them
        snap = snap_probability if self.compat_snap else float
        object.__setattr__(self, "p_bits", validate_p_bits("p_bits", self.p_bits))
        derived = dict(effective_p_exp=snap(self.p_exp), effective_p_frac=snap(self.p_frac))
        derived["effective_p_bits"] = (
            None if self.p_bits is None else tuple((pos, snap(p)) for pos, p in self.p_bits)
        )
        derived["flips"] = derived["effective_p_exp"] > 0 or derived["effective_p_frac"] > 0
        if self.p_bits is not None:  # a listed position may be the only one that flips
            derived["flips"] = derived["flips"] or any(
                p > 0 for _, p in derived["effective_p_bits"]
            )
        derived["is_identity"] = not derived["flips"] and self.zero_out_threshold is None
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict (``p_bits`` as ``{"position": p}`` or None);
        ``FlipSpec(**d)`` rebuilds the spec."""
        d = asdict(self)
        d["p_bits"] = p_bits_dict(self.p_bits)
        return d

    def bit_rates(self, dtype: torch.dtype) -> tuple[float, ...]:
        """The effective flip probability of each bit position of ``dtype`` (index 0 = least
        significant bit); raises ``ValueError`` naming a ``p_bits`` position the dtype lacks."""
        return bit_rates(self, dtype)

    def flips_exponent(self, dtype: torch.dtype | None = None) -> bool:
        """Whether an exponent bit of ``dtype`` can flip (the flips that make huge values,
        Inf and NaN; the sign bit does not count); ``None``: of any supported dtype whose
        positions ``p_bits`` fits."""
        if self.p_bits is None:
            return self.effective_p_exp > 0
        dtypes = [dtype] if dtype is not None else list(BIT_LAYOUTS)
        for dt in dtypes:
            layout = check_dtype(dt)
            if dtype is None and any(
                pos != SIGN and pos >= layout.n_bits for pos, _ in self.p_bits
            ):
                continue
            if any(p > 0 for p in bit_rates(self, dt)[layout.n_frac : layout.n_bits - 1]):
                return True
        return False


def require_group_rates(where: str, *specs: FlipSpec) -> None:
    """Raise ``ValueError`` when a spec has ``p_bits``: ``where`` (a fused kernel path) samples
    the two groups only."""
    if any(s.p_bits is not None for s in specs):
        raise ValueError(
            f"{where} samples the exp/frac groups only; a spec with per-bit-position rates "
            "(p_bits) runs the unfused path (flipped_linear / flipped_lora_linear route it)"
        )


def bit_rates(spec: FlipSpec, dtype: torch.dtype) -> tuple[float, ...]:
    """``spec``'s effective flip probability per bit position of ``dtype`` (0 = LSB)."""
    layout = check_dtype(dtype)
    rates = [spec.effective_p_frac] * layout.n_frac + [spec.effective_p_exp] * layout.n_exp
    named: dict[int, object] = {}
    for pos, p in spec.effective_p_bits or ():
        index = layout.n_bits - 1 if pos == SIGN else pos
        if index >= layout.n_bits:
            raise ValueError(
                f"p_bits has bit position {pos} but {dtype} has {layout.n_bits} bits "
                f"(positions 0..{layout.n_bits - 1}, {layout.n_bits - 1} = sign)"
            )
        if index in named:
            raise ValueError(
                f"p_bits names bit {index} of {dtype} twice ({named[index]!r} and {pos!r})"
            )
        named[index] = pos
        rates[index] = p
    return tuple(rates)
