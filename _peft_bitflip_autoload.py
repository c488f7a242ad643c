"""Load peft_bitflip when transformers meets a bit-flip checkpoint, with no import by the user.

``pip install peft-bitflip`` puts ``peft_bitflip-autoload.pth`` into site-packages; Python runs
it at start-up, and it imports this module (standard library only), which puts one finder on
``sys.meta_path``.  The finder waits for ``transformers.quantizers.auto``; once that module is
loaded, its two quantizer tables look up ``"bitflip"`` lazily: the first time transformers asks
for the method (``from_pretrained`` of a checkpoint whose ``config.json`` says
``"quant_method": "bitflip"``: ``AutoModelForCausalLM``, ``pipeline``, ``lm_eval --model hf``),
``import peft_bitflip`` registers the real classes and loading goes on with flips on.

Cost: a process that never imports transformers pays one string comparison per import; one that
imports transformers but never loads a bit-flip checkpoint never imports peft_bitflip.
``PEFT_BITFLIP_AUTOLOAD=0`` (or false / no / off) turns it off: transformers then skips the
unknown method with a warning and loads a *clean* model, as without the package.
"""

import os
import sys

QUANT_METHOD = "bitflip"
TARGET = "transformers.quantizers.auto"
TABLES = ("AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING")
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``PEFT_BITFLIP_AUTOLOAD`` is 0 / false / no / off."""
    return os.environ.get("PEFT_BITFLIP_AUTOLOAD", "1").strip().lower() not in _OFF


class LazyTable(dict):
    """A transformers quantizer table that imports peft_bitflip the first time ``"bitflip"``
    is looked up (``in``, ``[]``, ``get``); every other key behaves as in a plain dict."""

    _loading = False

    def _load(self, key) -> None:
        if key != QUANT_METHOD or LazyTable._loading or dict.__contains__(self, key):
            return
        if not enabled():
            return
        LazyTable._loading = True
        try:
            import peft_bitflip  # noqa: F401  (registers "bitflip" in both tables)
        finally:
            LazyTable._loading = False

    def __contains__(self, key) -> bool:
        self._load(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._load(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._load(key)
        return dict.get(self, key, default)


def patch(module) -> None:
    """Make ``module``'s quantizer tables :class:`LazyTable` instances (same entries)."""
    for name in TABLES:
        table = getattr(module, name, None)
        if isinstance(table, dict) and not isinstance(table, LazyTable):
            setattr(module, name, LazyTable(table))


class _PatchingLoader:
    """Runs the real loader, then :func:`patch` on the loaded module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        patch(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class Finder:
    """A meta-path finder that finds nothing itself: for :data:`TARGET` it asks the other
    finders and wraps the loader they return."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is cls:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Put :class:`Finder` on ``sys.meta_path`` (once), unless switched off."""
    if not enabled():
        return
    if TARGET in sys.modules:  # transformers came first: patch it now
        patch(sys.modules[TARGET])
        return
    if Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)


install()
