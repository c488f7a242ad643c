"""Optional dependencies: which ``pip install 'peft-bitflip[extra]'`` a feature needs."""

from __future__ import annotations

import importlib

__all__ = ["MissingExtraError", "require"]

EXTRA_OF = {"lm_eval": "eval", "datasets": "eval", "matplotlib": "eval", "trl": "recipes"}
"""Module -> the extra of pyproject.toml that installs it."""


class MissingExtraError(ImportError):
    """A feature's optional dependency is not installed; the message names the extra."""


def require(feature: str, *modules: str) -> None:
    """Import ``modules`` or raise :class:`MissingExtraError` naming ``feature``, the missing
    modules and the ``pip install`` command of their extra."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        extras = sorted({EXTRA_OF.get(m, "eval") for m in missing})
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'peft-bitflip[{','.join(extras)}]' (from a checkout: "
            f'pip install -e ".[{",".join(extras)}]")'
        )
