"""The sampling scheme shared by the Triton kernel and the PyTorch reference.

Both implementations follow exactly these rules, so they agree bit for bit:

* Elements are taken in logical (row-major) order and cut into *groups* of ``G`` consecutive
  elements (``G = 128 // bits_per_element``: 8 for 16-bit dtypes, 4 for float32).
* Each group has two *fields*: the exp field (the sign+exponent bits of its G elements,
  ``N_E = G * n_exp`` bits) and the frac field (``N_F = G * n_frac`` mantissa bits).  Field bit
  ``q`` lives in element ``q // n`` of the group, at bit ``q % n`` of that element's field.
* Random words come from Philox4x32 (10 rounds) keyed by the stream key ``(k0, k1)`` with the
  counter ``(group index low 32 bits, group index high 32 bits, iteration, call index)``.
  Words 0-1 of a draw give a 63-bit uniform for the exp field, words 2-3 one for the frac field.
* Flip positions in a field are found by gap sampling: the gap to the next flipped bit is
  geometric, ``P(gap = j) = (1 - p)^j p``, drawn by inverting the table
  ``T[j] = floor(2^63 (1 - (1 - p)^(j + 1)))``: the gap is the number of ``j`` with
  ``T[j] <= u``.  Iteration 0 draws the first gap; a flip beyond the field ends the field.
  So each bit flips independently with probability ``p`` (to within 2^-63) for any p in [0, 1],
  and at small p almost every group is settled by one draw and one comparison.

Tables are stored as ``T[j] - 1`` in int64 so that p = 1 (``T = 2^63``) fits.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from ..spec import BitLayout, check_dtype

GROUP_BITS = 128  # data bits per group: one Philox draw (4 words) settles a group at small p
PHILOX_ROUNDS = 10
U63 = 1 << 63

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


@functools.cache
def group_size(dtype: torch.dtype) -> int:
    """Elements per group for ``dtype``."""
    return GROUP_BITS // check_dtype(dtype).n_bits


def field_sizes(dtype: torch.dtype) -> tuple[int, int]:
    """(N_E, N_F): bits in the exp and frac field of one group."""
    layout: BitLayout = check_dtype(dtype)
    g = group_size(dtype)
    return g * layout.n_exp, g * layout.n_frac


@functools.lru_cache(maxsize=4096)
def gap_table(p: float, n: int) -> tuple[int, ...]:
    """``T[j] - 1`` for j in [0, n): the geometric gap CDF scaled to 2^63, minus one."""
    if p <= 0.0:
        return (-1,) * n
    if p >= 1.0:
        return (U63 - 1,) * n
    log_q = math.log1p(-p)
    out = []
    for j in range(n):
        cdf = -math.expm1((j + 1) * log_q)  # 1 - (1-p)^(j+1), accurate for tiny p
        out.append(min(int(math.ldexp(cdf, 63)), U63) - 1)
    return tuple(out)


_DEVICE_TABLES: dict = {}


def _cached_device_tensor(values, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device`` that a cache may keep for the process.

    On CUDA it is allocated by another thread: while CUDA graphs are warmed up or captured
    (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``) the allocations of the
    current thread or stream go to the graph's private memory pool, whose memory is reused by
    later replays unless the graph tracks the tensor; a table kept there would be overwritten.
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    made, failed = [], []

    def make():
        try:
            with torch.cuda.device(device):
                made.append(torch.tensor(values, dtype=torch.int64, device=device))
                torch.cuda.current_stream(device).synchronize()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=make, name="peft_bitflip-table")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    t = made[0]
    t.record_stream(torch.cuda.current_stream(device))  # not reused under our kernels if evicted
    return t


_MAX_CACHED_TABLES = 1024


@torch.compiler.assume_constant_result
def flip_table(p_exp: float, p_frac: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The int64 table ``[T_E - 1 (N_E entries), T_F - 1 (N_F entries)]`` on ``device`` (cached)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    key = (float(p_exp), float(p_frac), dtype, device)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        n_e, n_f = field_sizes(dtype)
        values = gap_table(float(p_exp), n_e) + gap_table(float(p_frac), n_f)
        t = _cached_device_tensor(values, device)
        if len(_DEVICE_TABLES) >= _MAX_CACHED_TABLES:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
        _DEVICE_TABLES[key] = t
    return t


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints >= 0 (plain Python: ``triton.cdiv`` costs a few us per call from
    the host in recent Triton releases, where it is a constexpr function)."""
    return -(-a // b)


def zero_mask_size(n_elements: int, dtype: torch.dtype) -> int:
    """Bytes of the packed zero mask of ``n_elements`` elements of ``dtype``: one uint8 per
    group, bit j set when element j of the group was zeroed."""
    return ceil_div(n_elements, group_size(dtype))


def search_steps(n: int) -> int:
    """Binary-search steps to find a count in [0, n]."""
    return max(1, (n).bit_length())


def write_next_call(call, next_call) -> None:
    """``next_call = call + 1`` (0-dim int64 tensors) with a torch op: a layer's call counter
    for its next forward, where no flip kernel ran to write it."""
    if next_call is None:
        return
    if next_call.device == call.device:
        torch.add(call, 1, out=next_call)  # one launch
    else:
        next_call.copy_(call + 1)
