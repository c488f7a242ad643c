"""``peft-bitflip-lm-eval``: lm-eval-harness's command line with peft_bitflip loaded.

lm-eval's CLI has no plugin mechanism, so a bit-flip checkpoint (``config.json`` with
``quantization_config.quant_method == "bitflip"``) makes the stock ``lm_eval`` fail with
``ValueError: Unknown quantization type, got bitflip``.  This command is ``lm_eval`` itself,
same arguments and subcommands, run after ``import peft_bitflip`` registered the bit-flip
quantizer, so ``--model hf --model_args pretrained=<checkpoint>`` evaluates with flips on.
It also puts peft_bitflip's own tasks (``bitflip_text_ppl``: offline perplexity on local
text) on the task path, next to any ``--include_path`` given.

    peft-bitflip-lm-eval --model hf --model_args pretrained=out/merged --tasks wikitext
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

from .lm_eval_tasks import TASK_DIR

__all__ = ["main", "include_bitflip_tasks"]


def include_bitflip_tasks() -> None:
    """Make every ``lm_eval`` ``TaskManager`` of this process also scan :data:`TASK_DIR`."""
    from lm_eval.tasks.manager import TaskManager

    if getattr(TaskManager.__init__, "_peft_bitflip", False):
        return
    original = TaskManager.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        paths = bound.arguments.get("include_path") or []
        paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        if not any(Path(p).resolve() == Path(TASK_DIR) for p in paths):
            paths.append(TASK_DIR)
        bound.arguments["include_path"] = paths
        original(*bound.args, **bound.kwargs)

    __init__._peft_bitflip = True
    TaskManager.__init__ = __init__


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``) with the plugin registered."""
    import peft_bitflip  # noqa: F401  (registers quant_method "bitflip" and BITFLIP_LORA)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "peft-bitflip-lm-eval needs lm-eval: pip install 'peft-bitflip[eval]'"
        ) from e
    include_bitflip_tasks()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
