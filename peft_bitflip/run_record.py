"""The run record: what a result file needs to be reproduced from itself.

Every result file of ``peft-bitflip eval | compare | sweep | attribute`` carries one under the
key ``"run"``: the full resolved fault model (every field, the per-module rules, the flip seeds
actually used: a result averaged over seeds lists them all), the data (file path and sha256,
or the dataset / corpus name; tokens and sequence length), the batch settings (the resolved
batch size, never null), the package versions and the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import shlex
from collections.abc import Sequence
from datetime import datetime, timezone

from .config import BitflipConfig

__all__ = ["file_record", "fault_model_record", "run_record", "versions"]

PACKAGES = ("peft_bitflip", "torch", "transformers", "peft", "accelerate", "triton", "lm_eval")
_DISTRIBUTIONS = {"peft_bitflip": "peft-bitflip", "lm_eval": "lm-eval"}


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that change a number (None: not installed), and
    Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["peft_bitflip"] is None:  # run from a checkout, not installed
        from . import __version__

        out["peft_bitflip"] = __version__
    return out


def file_record(path: str) -> dict:
    """``{"path": absolute path, "sha256": hex digest, "bytes": size}`` of a data file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": os.path.abspath(path),
        "sha256": digest.hexdigest(),
        "bytes": os.path.getsize(path),
    }


def fault_model_record(config: BitflipConfig | None, seeds: Sequence[int] | None = None):
    """Every field of ``config`` (as ``to_dict`` writes them: the per-module rules as an ordered
    list; the stuck-at fields also at their defaults), or
    None for a clean run.  ``seeds``: the flip seeds a result averages over; with more than
    one, ``"seed"`` is None and ``"seeds"`` lists them (never one seed standing for several)."""
    if config is None:
        return None
    seeds = [config.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("a result under flips needs at least one flip seed")
    fields = {  # to_dict leaves the stuck-at fields out at their defaults; a record has them all
        f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config)
    }
    return {
        **fields,
        **config.to_dict(),
        "seed": seeds[0] if len(seeds) == 1 else None,
        "seeds": seeds,
    }


def run_record(
    *,
    command: Sequence[str],
    fault_model,
    seeds: Sequence[int],
    data: dict,
    batch: dict,
    settings: dict | None = None,
) -> dict:
    """The ``"run"`` entry of a result file.

    ``fault_model``: a :func:`fault_model_record` (or any JSON-ready description, e.g. a
    sweep's grid); ``seeds``: every flip seed the results use ([] for a clean run); ``data``:
    source, sha256 / name, tokens, sequence length; ``batch``: must hold an int
    ``batch_size`` >= 1; ``settings``: anything else that changes a number (dtype, device...).
    """
    size = batch.get("batch_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"the run record needs the resolved batch size (an int >= 1), got {size!r}"
        )
    return {
        "command": shlex.join(command),
        "fault_model": fault_model,
        "seeds": [int(s) for s in seeds],
        "data": data,
        "batch": batch,
        "settings": settings or {},
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
