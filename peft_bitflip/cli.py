"""``peft-bitflip`` command line: ``demo``, ``eval``, ``generate``, ``sweep``, ``compare``,
``attribute``.

Every model subcommand takes a checkpoint path or Hub id and flip settings: by default the
checkpoint's own (config.json), or ``--bitflip_config FILE`` (a BitflipConfig JSON, a model's
config.json, the original's meta YAML or transform_cfg TOML) and/or inline ``--x_p_exp`` ...
flags (which override the file), or ``--clean``.

One vocabulary (Trainer's where it has one): ``--output_dir`` (results folder), ``--seed`` (the
flip seed of a single run), ``--seeds`` (the flip seeds a command averages over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import torch

from .config import P_BITS_KEYS, RULE_KEYS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def demo(args) -> int:
    """Flip a random tensor at several error rates and compare the measured rates with p."""
    from . import bitflip
    from .kernels.op import backend_for
    from .stats import count_flips

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    print(
        f"peft-bitflip demo: {args.n} {args.dtype} elements on {device} "
        f"(backend: {backend_for(device)}), seed {args.seed}"
    )
    print(
        f"{'p':>10} {'exp flips':>10} {'expected':>10} {'z':>6} {'frac flips':>10} "
        f"{'expected':>10} {'z':>6} {'zeroed |y|>=t':>14}"
    )
    worst = 0.0
    for p in args.p:
        y = bitflip(x, p, p, None, seed=args.seed, stream="demo")
        c = count_flips(x, y)
        z_e, z_f = c.z_scores(p, p)
        zeroed = int(
            (bitflip(x, p, p, args.threshold, seed=args.seed, stream="demo") == 0).sum()
            - (x == 0).sum()
        )
        worst = max(worst, abs(z_e), abs(z_f))
        print(
            f"{p:>10.3g} {c.exp_bits:>10} {c.n_elements * c.n_exp * p:>10.1f} {z_e:>6.2f} "
            f"{c.frac_bits:>10} {c.n_elements * c.n_frac * p:>10.1f} {z_f:>6.2f} {zeroed:>14}"
        )
    ok = worst <= 5.0
    print(f"largest deviation {worst:.2f} standard deviations: {'OK' if ok else 'FAIL'} (limit 5)")
    return 0 if ok else 1


# ---------------------------------------------------------------------- shared arguments

FLIP_FLAGS = RULE_KEYS  # x_p_exp, x_p_frac, x_zero_out_t, w_p_exp, w_p_frac, w_zero_out_t
BURST_FLAGS = ("x_burst_rate", "w_burst_rate", "burst_length", "burst_field")  # bursts.py
P_BITS_FLAGS = P_BITS_KEYS  # x_p_bits, w_p_bits: "15=1e-3,sign=1e-4"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_probability(text: str) -> float:
    """A probability in [0, 1]: ``1.5e-5``, ``2^-16`` or ``2**-16`` (every subcommand and the
    recipes parse probabilities with this)."""
    t = text.strip().replace(" ", "").replace("^", "**")
    try:
        v = 2.0 ** float(t[3:]) if t.startswith("2**") else float(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a probability: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability must be in [0, 1], got {text!r}")
    return v


def parse_burst_length(text: str) -> int | dict[int, float]:
    """A burst length: ``3`` (k bits) or ``2:0.5,4:0.5`` (k: probability pairs summing to 1)."""
    from .bursts import validate_burst_length

    try:
        if ":" not in text:
            return validate_burst_length("burst length", int(text))
        pairs = [item.split(":") for item in text.split(",")]
        return validate_burst_length("burst length", {int(k): float(p) for k, p in pairs})
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(
            f"not a burst length (k, or k:p,k:p,... with p summing to 1): {text!r} ({e})"
        ) from None


def parse_p_bits(text: str) -> dict[str, float] | None:
    """Per-bit-position rates ``POSITION=P[,POSITION=P...]`` (position: an int, 0 = least
    significant bit, or ``sign``; P as :func:`parse_probability` reads it), e.g.
    ``15=1e-3,sign=2^-20``; ``none`` gives None (the groups alone)."""
    from .spec import p_bits_dict, validate_p_bits

    if text.strip().lower() in ("none", "null", "off"):
        return None
    rates = []
    for item in text.split(","):
        position, sep, p = item.partition("=")
        if not sep or not position.strip():
            raise argparse.ArgumentTypeError(
                f"not a POSITION=P entry: {item!r} (e.g. 15=1e-3,sign=1e-4)"
            )
        try:
            rates.append((position.strip(), parse_probability(p)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: {e}") from None
    try:
        return p_bits_dict(validate_p_bits("p_bits", rates))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_site_bits(text: str) -> str:
    """A campaign site's bit set: exp, frac, sign, bit:N or bit:N-M."""
    from .campaign import check_site_bits

    try:
        return check_site_bits(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_threshold(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a threshold (number or 'none'): {text!r}") from None


def parse_seed(text: str) -> int:
    """A flip or sampling seed: an int in [0, 2**63)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seed (an int >= 0): {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {v}")
    return v


def parse_count(text: str) -> int:
    """An int >= 0 (0 means 'all' where a flag says so)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int >= 0: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def parse_positive(text: str) -> int:
    v = parse_count(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return v


def parse_margin(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a margin (a number >= 1): {text!r}") from None
    if not (v >= 1.0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"the margin must be a finite number >= 1, got {text}")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` that shows every default (unless the help text states it) and keeps
    descriptions as written."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--help`` shows defaults (every subcommand's parser)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: stores into the new flag's ``dest``
    and warns (a ``FutureWarning``) naming the new flag; the commands' and the recipes' one
    mechanism.

    ``as_list``: store ``[value]`` (the new flag takes a list); ``settings`` (optional): a
    function mapping the old flag's value to ``{dest: value}``, for old flags whose values
    differ from the new one's (``--precision bf16`` -> ``bf16 = True``); a ``ValueError`` it
    raises ends the parse with an error naming the old flag."""

    def __init__(
        self, option_strings, dest, new_flag: str, as_list: bool = False, settings=None, **kwargs
    ):
        kwargs.setdefault("default", argparse.SUPPRESS)
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag, self.as_list, self.settings = new_flag, as_list, settings

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated and will be removed in the next release: "
            f"use {self.new_flag}",
            FutureWarning,
            stacklevel=2,
        )
        if self.settings is None:
            setattr(namespace, self.dest, [values] if self.as_list else values)
            return
        try:
            settings = self.settings(values)
        except ValueError as e:
            parser.error(f"{option_string}: {e}")
        for key, value in settings.items():
            setattr(namespace, key, value)


def add_deprecated_alias(parser, old: str, new: str, *, as_list: bool = False, **kwargs) -> None:
    """Accept ``old`` as a deprecated spelling of the flag ``new`` (same ``dest``)."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(
        old, dest=dest, action=DeprecatedAlias, new_flag=new, as_list=as_list, **kwargs
    )


def add_output_dir(parser, *, default=None, old: str | None = None, help: str) -> None:
    """``--output_dir`` (and its deprecated spelling ``old``: ``--save_dir`` / ``--out``)."""
    parser.add_argument("--output_dir", default=default, help=help)
    if old:
        add_deprecated_alias(parser, old, "--output_dir")


def add_seeds(parser, *, help: str = "flip seeds; rows with flips are averaged over them"):
    """``--seeds``: the flip seeds a command averages over (``--bitflip_seed N`` is the
    deprecated spelling of ``--seeds N``)."""
    parser.add_argument("--seeds", type=parse_seed, nargs="+", default=[0, 1, 2], help=help)
    add_deprecated_alias(parser, "--bitflip_seed", "--seeds", as_list=True, type=parse_seed)


def add_flip_arguments(
    parser: argparse.ArgumentParser, *, clean_flag: bool = True, seed_flag: bool = True
) -> None:
    """The fault-model flags.  ``seed_flag``: the command runs once and takes ``--seed`` (the
    flip seed); commands that average over ``--seeds`` (see :func:`add_seeds`) pass False."""
    g = parser.add_argument_group(
        "flips (default: the checkpoint's config.json; a flag sets that value for every module, "
        "on top of --bitflip_config, else the checkpoint's config, else the original's "
        "p = 2^-16, thresholds 30 / 1.25)"
    )
    g.add_argument(
        "--bitflip_config",
        default=None,
        help="BitflipConfig JSON, a model's config.json, the original's meta YAML or "
        "transform_cfg TOML",
    )
    for key in FLIP_FLAGS:
        kind = parse_threshold if key.endswith("_t") else parse_probability
        bits = "sign/exponent" if key.endswith("_exp") else "mantissa"
        what = (
            "zero-out threshold (|v| >= t -> 0; 'none' = off)"
            if key.endswith("_t")
            else f"flip probability of each {bits} bit (1.5e-5 or 2^-16)"
        )
        g.add_argument(
            f"--{key}",
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{'input' if key[0] == 'x' else 'weight'} {what} (default: the checkpoint's)",
        )
    g.add_argument(
        "--x_burst_rate",
        type=parse_probability,
        default=argparse.SUPPRESS,
        help="burst fault events per input element and call (default: the checkpoint's)",
    )
    g.add_argument(
        "--w_burst_rate",
        type=parse_probability,
        default=argparse.SUPPRESS,
        help="burst fault events per weight element and call (default: the checkpoint's)",
    )
    g.add_argument(
        "--burst_length",
        type=parse_burst_length,
        default=argparse.SUPPRESS,
        help="bits per burst: k (2..32) or k:p,k:p,... (default: the checkpoint's, else 2)",
    )
    g.add_argument(
        "--burst_field",
        choices=("any", "exp", "frac"),
        default=argparse.SUPPRESS,
        help="where a burst may lie in an element (default: the checkpoint's, else any)",
    )
    for key in P_BITS_FLAGS:
        g.add_argument(
            f"--{key}",
            type=parse_p_bits,
            default=argparse.SUPPRESS,
            metavar="POS=P,...",
            help=f"{'input' if key[0] == 'x' else 'weight'} flip probability per bit position, "
            "overriding its group's (0 = least significant bit, 'sign'; e.g. 15=1e-3,sign=1e-4; "
            "'none' = off; default: the checkpoint's)",
        )
    if seed_flag:
        g.add_argument(
            "--seed",
            type=parse_seed,
            default=argparse.SUPPRESS,
            help="flip seed (default: the checkpoint's; alone it does not switch flips on)",
        )
        add_deprecated_alias(g, "--bitflip_seed", "--seed", type=parse_seed)
    if clean_flag:
        g.add_argument("--clean", action="store_true", help="evaluate without flips")


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "calibrated zero-out (thresholds from the model's own per-layer maxima)"
    )
    g.add_argument(
        "--calibrate_zero_out",
        type=parse_margin,
        default=None,
        metavar="MARGIN",
        help="set every layer's x and W threshold to MARGIN x its maximum |x| (calibration "
        "text, flips off) and |w| (e.g. 2; default: off)",
    )
    g.add_argument(
        "--calibration_file",
        default=None,
        help="text for the calibration (default: the training split of the evaluation data, "
        "else the embedded corpus)",
    )
    g.add_argument(
        "--calibration_batches", type=parse_positive, default=8, help="batches of calibration text"
    )


def read_bitflip_file(path: str):
    """A :class:`BitflipConfig` from a JSON, YAML (original meta) or TOML (original LoRA) file."""
    from .config import BitflipConfig, read_original_toml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--bitflip_config {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return BitflipConfig.from_json_file(path)
    if ext in (".yaml", ".yml"):
        return BitflipConfig.from_original_yaml(path)
    if ext == ".toml":
        return read_original_toml(path)[0]
    raise ValueError(f"--bitflip_config {path!r}: expected a .json, .yaml or .toml file")


def flips_from_args(args, checkpoint=None, *, default=None):
    """The run's fault model: a ``BitflipConfig`` or ``None`` (clean).

    ``--clean`` gives None.  Without a file or inline flag: ``checkpoint`` (the checkpoint's
    own config, None for a clean checkpoint), else ``default``.  Otherwise the flags set their
    value for every module (per-module rules lose that key) on top of ``--bitflip_config``,
    else ``checkpoint``, else the original's fault model (p = 2^-16, thresholds 30 / 1.25).
    ``--seed`` alone never switches flips on: on a run that would be clean it only seeds
    what else the command draws (``generate``'s sampler).
    """
    from .config import BitflipConfig

    if getattr(args, "clean", False):
        return None
    file_cfg = read_bitflip_file(args.bitflip_config) if args.bitflip_config else None
    flags = FLIP_FLAGS + BURST_FLAGS + P_BITS_FLAGS
    inline = {k: getattr(args, k) for k in flags if hasattr(args, k)}
    if hasattr(args, "seed"):
        inline["seed"] = args.seed
    if file_cfg is None and checkpoint is None and default is None and set(inline) == {"seed"}:
        return None  # a seed alone does not switch flips on
    if file_cfg is None and not inline:
        return checkpoint if checkpoint is not None else default
    base = file_cfg or checkpoint or BitflipConfig.original_default()
    values = base.to_dict()
    values.update(inline)
    if values["layer_name_to_config"] is not None:
        values["layer_name_to_config"] = [
            [pat, None if rule is None else {k: v for k, v in rule.items() if k not in inline}]
            for pat, rule in values["layer_name_to_config"]
        ]
    return BitflipConfig.from_dict(values)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser, *, model_positional=True):
    if model_positional:
        parser.add_argument("model", help="checkpoint directory or Hub id")
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPES), default="float32", help="weights' dtype"
    )
    parser.add_argument("--device", default=default_device(), help="torch device")


def add_data_arguments(parser):
    g = parser.add_argument_group("perplexity data (default: the embedded offline corpus)")
    g.add_argument("--dataset_name", default=None, help="datasets Hub name")
    g.add_argument("--dataset_config_name", default=None, help="its config")
    g.add_argument("--validation_file", default=None, help=".txt/.json/.jsonl/.csv file")
    g.add_argument("--train_file", default=None, help="its training split (calibration text)")
    g.add_argument("--block_size", type=parse_positive, default=256, help="tokens per block")
    g.add_argument("--batch_size", type=parse_positive, default=8, help="blocks per batch")
    g.add_argument("--max_batches", type=parse_count, default=32, help="first N batches (0: all)")


def check_text_file(path: str, flag: str) -> None:
    """Raise an error naming ``path`` unless it is a non-empty UTF-8 text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise ValueError(f"{flag} {path!r} is empty")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < (1 << 20) or e.start < len(head) - 4:  # not a character cut at the end
            raise ValueError(
                f"{flag} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    if b"\x00" in head:
        raise ValueError(f"{flag} {path!r} is a binary file, not text")


def check_data_arguments(args) -> None:
    for flag in ("validation_file", "train_file", "calibration_file"):
        path = getattr(args, flag, None)
        if path:
            check_text_file(path, f"--{flag}")


def _blocks_of(raw, tokenizer, block_size: int, what: str):
    from . import data

    blocks = data.tokenize_and_group(raw, tokenizer, block_size)
    if len(blocks) == 0:
        raise ValueError(
            f"the {what} text gives no block of {block_size} tokens; use a smaller "
            "--block_size or more text"
        )
    return blocks


def validation_blocks(args, tokenizer):
    """Validation blocks of ``--block_size`` tokens (``--validation_file`` or
    ``--dataset_name``'s validation split, else the embedded corpus)."""
    from . import data

    if args.validation_file:
        raw = data.load_text_datasets(
            train_file=args.validation_file, validation_file=args.validation_file
        )
    else:
        raw = data.load_text_datasets(args.dataset_name, args.dataset_config_name)
    return _blocks_of(raw["validation"], tokenizer, args.block_size, "validation")


def calibration_blocks(args, tokenizer):
    """Blocks for ``--calibrate_zero_out``: ``--calibration_file``, else ``--train_file``,
    else the training split of ``--dataset_name`` / the embedded corpus (never the validation
    text when a training split exists)."""
    from . import data

    block_size = getattr(args, "block_size", 256)
    path = args.calibration_file or getattr(args, "train_file", None)
    if path:
        raw = data.load_text_datasets(train_file=path, validation_file=path)
    elif getattr(args, "validation_file", None):
        raise ValueError(
            "--calibrate_zero_out with --validation_file needs --calibration_file or "
            "--train_file: calibrating on the evaluation text would hide its own outliers"
        )
    else:
        raw = data.load_text_datasets(
            getattr(args, "dataset_name", None), getattr(args, "dataset_config_name", None)
        )
    return _blocks_of(raw["train"], tokenizer, block_size, "calibration")


def calibrated(args, model, tokenizer, base):
    """``base`` with thresholds calibrated on ``model`` (see ``--calibrate_zero_out``)."""
    from .calibration import calibrate_zero_out

    blocks = calibration_blocks(args, tokenizer)
    cfg = calibrate_zero_out(
        model,
        blocks,
        margin=args.calibrate_zero_out,
        base=base,
        batch_size=getattr(args, "batch_size", 8),
        max_batches=args.calibration_batches,
    )
    n_tok = min(len(blocks), args.calibration_batches * getattr(args, "batch_size", 8))
    print(
        f"calibrated zero-out on {n_tok} blocks: margin {args.calibrate_zero_out:g}, "
        f"{_describe(cfg)}"
    )
    return cfg


def _max_batches(args):
    return None if args.max_batches == 0 else args.max_batches


def _range(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "off"
    lo, hi = min(vals), max(vals)
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"


def _describe(flips, seeds=None) -> str:
    """The resolved fault model in one line (``seeds``: the flip seeds of a row that
    averages several, in place of the config's one seed)."""
    if flips is None:
        return "none (clean)"
    rules = flips.layer_name_to_config or {}
    parts = []
    for t in ("x", "w"):
        p_exp, p_frac = getattr(flips, f"{t}_p_exp"), getattr(flips, f"{t}_p_frac")
        key = f"{t}_zero_out_t"
        ts = [r.get(key) for r in rules.values() if r and key in r]
        thr = f"per layer {_range(ts)}" if ts else _range([getattr(flips, key)])
        parts.append(f"{t}: p_exp={p_exp:g}, p_frac={p_frac:g}, zero-out {thr}")
    tail = f", {len(rules)} per-module rules" if rules else ""
    seed = f"seeds={','.join(map(str, seeds))}" if seeds else f"seed={flips.seed}"
    return "; ".join(parts) + f"; {seed}{tail}"


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def _checked_model(path: str) -> None:
    """Fail before anything runs if ``path`` is not a causal-LM checkpoint."""
    from transformers import AutoConfig

    from .evaluation import check_causal_lm, check_model_source

    check_model_source(path)
    check_causal_lm(AutoConfig.from_pretrained(path), path)


def _resolved_flips(args, path, default=None):
    """The fault model of a run on checkpoint ``path`` (see :func:`flips_from_args`)."""
    from .evaluation import checkpoint_bitflip_config

    _checked_model(path)
    return flips_from_args(args, checkpoint_bitflip_config(path), default=default)


def _load(args, path, flips, *, calibrate: bool):
    """(model, tokenizer, flips) of ``path`` under ``flips``, thresholds calibrated if asked."""
    from .evaluation import load_model, reset_streams
    from .transform import apply_bitflip

    dtype = TORCH_DTYPES[args.dtype]
    if not (calibrate and flips is not None):
        model, tok = load_model(path, flips, dtype=dtype, device=args.device)
        return model, tok, flips
    model, tok = load_model(path, None, dtype=dtype, device=args.device)
    flips = calibrated(args, model, tok, flips)
    apply_bitflip(model, flips)
    reset_streams(model)
    return model, tok, flips


def _nonfinite_metrics(results: dict) -> list[str]:
    bad = []
    for task, metrics in (results.get("results") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value) and "stderr" not in name:
                bad.append(f"{task}/{name}")
    return bad


# ---------------------------------------------------------------------- subcommands


def eval_command(args) -> int:
    """lm-eval tasks on a model with or without flips."""
    from .extras import require

    require("peft-bitflip eval", "lm_eval", "datasets")
    from lm_eval.utils import make_table

    from .diagnosis import nonfinite_reason
    from .evaluation import lm_eval_results

    check_data_arguments(args)
    flips = _resolved_flips(args, args.model)
    model, tok, flips = _load(args, args.model, flips, calibrate=bool(args.calibrate_zero_out))
    print(f"model {args.model}, flips: {_describe(flips)}")
    metadata = json.loads(args.metadata) if args.metadata else None
    results = lm_eval_results(
        model,
        tok,
        args.tasks.split(","),
        batch_size=args.batch_size,
        limit=args.limit,
        max_length=args.max_length,
        num_fewshot=args.num_fewshot,
        metadata=metadata,
    )
    print(make_table(results))
    bad = _nonfinite_metrics(results)
    reason = nonfinite_reason(model) if bad else None
    if bad:
        print(f"WARNING: non-finite results ({', '.join(bad)}): {reason}")
    if args.output_dir:
        from .run_record import fault_model_record, run_record

        out = {
            "model": args.model,
            "flips": _describe(flips),
            "bitflip_config": None if flips is None else flips.to_dict(),
            "results": results["results"],
            "nonfinite": bad,
            "reason": reason,
            "config": results.get("config"),
            "run": run_record(
                command=_command(args),
                fault_model=fault_model_record(flips),
                seeds=[] if flips is None else [flips.seed],
                data=_lm_eval_data(args, results, metadata),
                batch={
                    "batch_size": args.batch_size,
                    "limit": args.limit,
                    "num_fewshot": args.num_fewshot,
                },
                settings=_run_settings(args),
            ),
        }
        _write_json(os.path.join(args.output_dir, "results.json"), out)
        print(f"wrote {os.path.join(args.output_dir, 'results.json')}")
    return 0


def _sampling_seed(args, flips) -> int:
    """``--sampling_seed``, else the run's flip seed (``--seed``, else the fault model's),
    else 0."""
    if args.sampling_seed is not None:
        return args.sampling_seed
    if hasattr(args, "seed"):
        return args.seed
    return 0 if flips is None else flips.seed


def generate_command(args) -> int:
    """Text generation under flips (the original's hf-gen)."""
    from .evaluation import generate_text

    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give some text to continue")
    check_data_arguments(args)
    flips = _resolved_flips(args, args.model)
    model, tok, flips = _load(args, args.model, flips, calibrate=bool(args.calibrate_zero_out))
    response = generate_text(
        model,
        tok,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=_sampling_seed(args, flips),
    )
    print(f"flips: {_describe(flips)}\n--- prompt ---\n{args.prompt}\n--- response ---\n{response}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "prompt-response.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{args.prompt}\n---\n{response}\n")
        print(f"wrote {path}")
    return 0


def _data_source(args) -> str:
    if args.validation_file:
        return os.path.abspath(args.validation_file)
    return args.dataset_name or "embedded corpus"


# ---------------------------------------------------------------------- run records


def _command(args) -> list[str]:
    """The command line of this run, as :func:`main` got it."""
    return getattr(args, "argv", None) or ["peft-bitflip", *sys.argv[1:]]


def _run_settings(args) -> dict:
    """What else changes a number: dtype, device, calibrated zero-out."""
    out = {"dtype": args.dtype, "device": str(args.device)}
    if getattr(args, "calibrate_zero_out", None):
        out.update(
            calibrate_zero_out=args.calibrate_zero_out,
            calibration_batches=args.calibration_batches,
        )
    return out


def _calibration_data(args) -> dict:
    """Where ``--calibrate_zero_out``'s text came from (see :func:`calibration_blocks`)."""
    from .run_record import file_record

    path = args.calibration_file or getattr(args, "train_file", None)
    name = getattr(args, "dataset_name", None) or "the embedded corpus"
    return {
        "source": os.path.abspath(path) if path else f"training split of {name}",
        "file": file_record(path) if path else None,
        "sequence_length": getattr(args, "block_size", 256),
        "max_blocks": args.calibration_batches * getattr(args, "batch_size", 8),
    }


def _perplexity_data(args, blocks) -> dict:
    """The data of a perplexity run: source (file path and sha256, dataset or corpus name),
    sequence length, the blocks and tokens evaluated and a fingerprint of those tokens."""
    from .evaluation import _block_tensor, tokens_fingerprint
    from .run_record import file_record

    ids = _block_tensor(blocks)
    n = ids.size(0)
    if args.max_batches:
        n = min(n, args.max_batches * args.batch_size)
    data = {
        "source": _data_source(args),
        "file": file_record(args.validation_file) if args.validation_file else None,
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "sequence_length": ids.size(1),
        "blocks": n,
        "tokens": n * ids.size(1),
        "tokens_fingerprint": tokens_fingerprint(ids[:n]),
    }
    if getattr(args, "calibrate_zero_out", None):
        data["calibration"] = _calibration_data(args)
    return data


def _perplexity_batch(args, data) -> dict:
    return {
        "batch_size": args.batch_size,
        "max_batches": args.max_batches or None,
        "batches": math.ceil(data["blocks"] / args.batch_size),
    }


def _lm_eval_data(args, results, metadata) -> dict:
    """The data of an lm-eval run: tasks, their versions and document counts, the task
    metadata and the sha256 of every local file it names, the model's context length."""
    from .run_record import file_record

    files = (metadata or {}).get("data_files") or []
    files = [files] if isinstance(files, str) else list(files)
    data = {
        "tasks": args.tasks.split(","),
        "task_versions": results.get("versions"),
        "documents": results.get("n-samples"),
        "metadata": metadata,
        "files": [file_record(f) for f in files if os.path.isfile(f)],
        "sequence_length": (results.get("config") or {}).get("max_length"),
    }
    if getattr(args, "calibrate_zero_out", None):
        data["calibration"] = _calibration_data(args)
    return data


def sweep_command(args) -> int:
    """Perplexity over a grid of error rates and seeds; CSV, summary JSON and PNG plot."""
    from .extras import require

    require("peft-bitflip sweep", "datasets", "matplotlib")
    from .config import BitflipConfig
    from .diagnosis import EXP_WITHOUT_ZERO_OUT
    from .evaluation import (
        flip_config_for,
        load_model,
        plot_sweep,
        summarize_sweep,
        sweep,
        sweep_grid,
    )
    from .run_record import fault_model_record, run_record

    sweep_grid(args.p, args.targets, args.fields, args.seeds)  # fail before loading anything
    check_data_arguments(args)
    _checked_model(args.model)
    model, tok = load_model(args.model, None, dtype=TORCH_DTYPES[args.dtype], device=args.device)
    blocks = validation_blocks(args, tok)
    zero_out = None
    if args.calibrate_zero_out:
        zero_out = calibrated(args, model, tok, BitflipConfig())
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = os.path.join(args.output_dir, "sweep.csv")
    settings = {
        "model": args.model,
        "data": _data_source(args),
        "block_size": args.block_size,
        "calibrate_zero_out": args.calibrate_zero_out,
    }
    points = sweep(
        model,
        blocks,
        args.p,
        targets=args.targets,
        fields=args.fields,
        seeds=args.seeds,
        x_zero_out_t=args.x_zero_out_t,
        w_zero_out_t=args.w_zero_out_t,
        zero_out=zero_out,
        batch_size=args.batch_size,
        max_batches=_max_batches(args),
        csv_path=csv_path,
        settings=settings,
    )
    rows = summarize_sweep(points)
    for r in rows:  # each row's fault model, complete, with the seeds it averages
        cfg = flip_config_for(
            r["p"], r["target"], r["field"], x_zero_out_t=args.x_zero_out_t,
            w_zero_out_t=args.w_zero_out_t, zero_out=zero_out,
        )  # fmt: skip
        r["bitflip_config"] = fault_model_record(cfg, r["flip_seeds"])
    data = _perplexity_data(args, blocks)
    record = run_record(
        command=_command(args),
        fault_model={
            "grid": {"p": args.p, "targets": args.targets, "fields": args.fields},
            "x_zero_out_t": None if zero_out is not None else args.x_zero_out_t,
            "w_zero_out_t": None if zero_out is not None else args.w_zero_out_t,
            "calibrated": None if zero_out is None else zero_out.to_dict(),
            "rows": "each row's bitflip_config",
        },
        seeds=sorted(set(args.seeds)),
        data=data,
        batch=_perplexity_batch(args, data),
        settings=_run_settings(args),
    )
    note = ""
    if any(r["diverged"] for r in rows):
        unguarded = zero_out is None and (args.x_zero_out_t is None or args.w_zero_out_t is None)
        exp = any(f in ("exp", "both") for f in args.fields)
        note = EXP_WITHOUT_ZERO_OUT if unguarded and exp else "non-finite loss under flips"
    _write_json(
        os.path.join(args.output_dir, "summary.json"),
        {
            "model": args.model,
            "settings": settings,
            "rows": rows,
            "note": note or None,
            "run": record,
        },
    )
    plot_sweep(rows, os.path.join(args.output_dir, "sweep.png"), title=f"{args.model}", note=note)
    print(f"{'p':>10} {'target':>6} {'field':>5} {'ppl mean':>12} {'sd':>10} seeds")
    for r in rows:
        if r["diverged"]:
            mean = f"diverged ({r['diverged']}/{r['seeds']} seeds, "
            mean += f"{r['nonfinite_share']:.0%} of batches)"
            print(f"{r['p']:>10.3g} {r['target']:>6} {r['field']:>5} {mean}")
            continue
        print(
            f"{r['p']:>10.3g} {r['target']:>6} {r['field']:>5} {r['ppl_mean']:>12.4g} "
            f"{r['ppl_std']:>10.3g} {r['seeds']}"
        )
    if note:
        print(f"diverged points: {note}")
    print(f"wrote {csv_path}, summary.json and sweep.png in {args.output_dir}")
    return 0


def compare_command(args) -> int:
    """The seed's table: clean model, clean model under flips, fine-tuned model under flips."""
    import statistics

    from .extras import require

    require("peft-bitflip compare", "datasets")

    from .config import BitflipConfig
    from .diagnosis import nonfinite_reason
    from .evaluation import compare_table, perplexity
    from .run_record import fault_model_record, run_record

    # every input is checked before the first measurement
    check_data_arguments(args)
    for path in [args.clean_model, *args.finetuned]:
        _checked_model(path)
    flips = _resolved_flips(args, args.clean_model, default=BitflipConfig.original_default())
    if flips is None:
        raise ValueError(f"{args.clean_model} carries no flips and none were given")
    settings = [("clean", args.clean_model, None), ("flipped", args.clean_model, flips)]
    for path in args.finetuned:
        settings.append(("flipped + fine-tuned", path, flips))
    rows = []
    blocks = None
    for name, path, cfg in settings:
        seeds = [None] if cfg is None else args.seeds
        results = []
        for seed in seeds:
            run_cfg = (
                None if cfg is None else BitflipConfig.from_dict({**cfg.to_dict(), "seed": seed})
            )
            model, tok, used = _load(args, path, run_cfg, calibrate=bool(args.calibrate_zero_out))
            if blocks is None:
                blocks = validation_blocks(args, tok)
            r = perplexity(
                model, blocks, batch_size=args.batch_size, max_batches=_max_batches(args)
            )
            if r["diverged"] and not r["reason"]:
                r["reason"] = nonfinite_reason(model)
            results.append(r)
            del model
        ppl = [r["perplexity"] for r in results]
        diverged = sum(r["diverged"] for r in results)
        reasons = [r["reason"] for r in results if r["reason"]]
        rows.append(
            {
                "setting": name,
                "model": path,
                "flips": _describe(used, [s for s in seeds if s is not None]),
                "bitflip_config": fault_model_record(used, [s for s in seeds if s is not None]),
                "ppl_mean": statistics.fmean(ppl) if not diverged else math.inf,
                "ppl_std": statistics.stdev(ppl) if not diverged and len(ppl) > 1 else 0.0,
                "seeds": len(ppl),
                "flip_seeds": [s for s in seeds if s is not None],
                "perplexities": ppl,
                "diverged": diverged,
                "reason": reasons[0] if reasons else None,
            }
        )
    table = compare_table(rows)
    print(table)
    data = _perplexity_data(args, blocks)
    record = run_record(
        command=_command(args),
        fault_model=fault_model_record(flips, list(dict.fromkeys(args.seeds))),
        seeds=list(dict.fromkeys(args.seeds)),
        data=data,
        batch=_perplexity_batch(args, data),
        settings=_run_settings(args),
    )
    for reason in sorted({r["reason"] for r in rows if r["reason"]}):
        print(f"diverged: {reason}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "compare.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        _write_json(os.path.join(args.output_dir, "compare.json"), {"rows": rows, "run": record})
        print(f"wrote compare.md and compare.json in {args.output_dir}")
    return 0


def attribute_command(args) -> int:
    """Clean / zero-out alone / flips alone / both: what the fault model's damage is made of."""
    from .extras import require

    require("peft-bitflip attribute", "datasets")
    from .attribution import attribute, attribution_markdown
    from .config import BitflipConfig
    from .evaluation import load_model
    from .run_record import fault_model_record, run_record

    check_data_arguments(args)
    flips = _resolved_flips(args, args.model, default=BitflipConfig.original_default())
    model, tok = load_model(args.model, None, dtype=TORCH_DTYPES[args.dtype], device=args.device)
    blocks = validation_blocks(args, tok)
    print(f"model {args.model}; fault model: {_describe(flips)}")
    cal = calibrated(args, model, tok, flips) if args.calibrate_zero_out else None
    report = attribute(
        model,
        blocks,
        flips,
        seeds=args.seeds,
        calibrated=cal,
        batch_size=args.batch_size,
        max_batches=_max_batches(args),
        progress=True,
    )
    report.update(model=args.model, data=_data_source(args), block_size=args.block_size)
    data = _perplexity_data(args, blocks)
    report["run"] = run_record(
        command=_command(args),
        fault_model=fault_model_record(flips, report["seeds"]),
        seeds=report["seeds"],
        data=data,
        batch=_perplexity_batch(args, data),
        settings=_run_settings(args),
    )
    text = attribution_markdown(report, top=args.top)
    print(text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "attribution.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        _write_json(os.path.join(args.output_dir, "attribution.json"), report)
        print(f"wrote attribution.md and attribution.json in {args.output_dir}")
    return 0


def campaign_command(args) -> int:
    """Flip one site (module group x tensor x bit group) at a time against the golden run:
    ranking table (markdown, CSV, JSON) and heatmap; resumable; a time budget."""
    from . import data
    from .calibration import calibrate_zero_out
    from .campaign import (
        campaign,
        campaign_markdown,
        module_groups,
        sites_for,
        write_campaign_outputs,
    )
    from .config import BitflipConfig
    from .evaluation import load_model, tokens_fingerprint
    from .extras import require
    from .run_record import fault_model_record, file_record, run_record

    require("peft-bitflip campaign", "datasets", "matplotlib")
    check_text_file(args.text, "--text")
    _checked_model(args.model)
    regexes = {}
    for item in args.site_regex or []:
        label, sep, pattern = item.partition("=")
        if not sep or not label or not pattern:
            raise ValueError(f"--site_regex {item!r}: expected LABEL=REGEX")
        regexes[label] = pattern
    model, tok = load_model(args.model, None, dtype=TORCH_DTYPES[args.dtype], device=args.device)
    groups = {}
    for grouping in args.sites or ([] if regexes else ["blocks"]):
        groups.update(module_groups(model, grouping))
    if regexes:
        clash = sorted(set(regexes) & set(groups))
        if clash:
            raise ValueError(f"--site_regex label(s) {clash} name a --sites group already: rename")
        groups.update(module_groups(model, "regex", regexes))
    sites = sites_for(groups, args.tensors, args.bits)
    raw = data.load_text_datasets(train_file=args.text, validation_file=args.text)
    blocks = _blocks_of(raw["validation"], tok, args.block_size, "--text")
    n_blocks = min(len(blocks), math.ceil(args.tokens / args.block_size))
    ids = torch.tensor(blocks["input_ids"][:n_blocks])
    zero_out = None
    if args.zero_out == "calibrated":
        zero_out = calibrate_zero_out(
            model, ids, margin=args.zero_out_margin, base=BitflipConfig(),
            batch_size=args.batch_size,
        )  # fmt: skip
    elif args.zero_out == "fixed":
        zero_out = BitflipConfig(x_zero_out_t=args.x_zero_out_t, w_zero_out_t=args.w_zero_out_t)
    print(
        f"campaign: {args.model}, {len(sites)} sites x {len(set(args.seeds))} seeds on "
        f"{n_blocks} blocks of {args.block_size} tokens, p = {args.p:g}, zero-out "
        f"{args.zero_out}"
    )
    settings = {
        "model": args.model,
        "text": os.path.abspath(args.text),
        "block_size": args.block_size,
        "zero_out_mode": args.zero_out,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    result = campaign(
        model, ids, sites, p=args.p, seeds=args.seeds, zero_out=zero_out,
        batch_size=args.batch_size, csv_path=os.path.join(args.output_dir, "campaign_units.csv"),
        settings=settings, max_minutes=args.max_minutes,
    )  # fmt: skip
    title = f"{os.path.basename(os.path.normpath(args.model))}: p = {args.p:g}, zero-out "
    title += args.zero_out
    record = run_record(
        command=_command(args),
        fault_model={
            "sites": {s.name: list(s.modules) for s in sites},
            "p": args.p,
            "zero_out": fault_model_record(zero_out, args.seeds),
        },
        seeds=args.seeds,
        data={  # the layout of the other commands' records (_perplexity_data)
            "source": os.path.abspath(args.text), "file": file_record(args.text),
            "sequence_length": args.block_size, "blocks": n_blocks, "tokens": int(ids.numel()),
            "tokens_fingerprint": tokens_fingerprint(ids),
        },
        batch={"batch_size": args.batch_size},
        settings={"dtype": args.dtype, "device": args.device, "zero_out_mode": args.zero_out,
                  "zero_out_margin": args.zero_out_margin},
    )  # fmt: skip
    paths = write_campaign_outputs(result, args.output_dir, title, run=record)
    print(campaign_markdown(result, title))
    state = "complete" if result.complete else "stopped by --max_minutes (run again to go on)"
    print(f"{state}; {result.seconds:.1f} s; wrote {', '.join(paths)}")
    return 0


def add_campaign_parser(sub) -> None:
    """The ``campaign`` subcommand's arguments."""
    k = sub.add_parser(
        "campaign",
        help="fault campaign: flips confined to one site (modules x tensor x bits) at a time "
        "against the golden run; ranking table and heatmap (resumable)",
    )
    k.add_argument("--model", required=True, help="checkpoint directory or Hub id (clean)")
    k.add_argument("--text", required=True, help=".txt/.json/.jsonl/.csv text to evaluate on")
    k.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    k.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    k.add_argument(
        "--sites", nargs="+", choices=["blocks", "attn_mlp", "proj"], default=None,
        help="module groups: each decoder block (the default without --site_regex), "
        "attention vs MLP, each projection kind",
    )  # fmt: skip
    k.add_argument(
        "--site_regex", nargs="+", metavar="LABEL=REGEX",
        help="more groups: the modules whose name the regex full-matches",
    )  # fmt: skip
    k.add_argument("--tensors", nargs="+", choices=["x", "w"], default=["x", "w"])
    k.add_argument(
        "--bits", nargs="+", type=parse_site_bits, default=["exp", "frac"],
        help="exp = sign and exponent bits, frac = mantissa bits, sign, bit:N (one bit position, "
        "0 = least significant) or bit:N-M",
    )  # fmt: skip
    k.add_argument("--p", type=parse_probability, default=1e-3, help="flip probability per bit")
    k.add_argument("--seeds", type=parse_seed, nargs="+", default=[0, 1, 2])
    k.add_argument("--block_size", type=parse_positive, default=512)
    k.add_argument("--batch_size", type=parse_positive, default=8)
    k.add_argument("--tokens", type=parse_positive, default=16384, help="tokens of --text used")
    k.add_argument(
        "--zero_out", choices=["calibrated", "fixed", "off"], default="calibrated",
        help="zero-out of the site's tensor: calibrated = MARGIN x each layer's max |x| on the "
        "campaign tokens / max |w| (never fires without flips); fixed = --x_zero_out_t / "
        "--w_zero_out_t; off",
    )  # fmt: skip
    k.add_argument("--zero_out_margin", type=parse_margin, default=2.0)
    k.add_argument("--x_zero_out_t", type=parse_threshold, default=30.0)
    k.add_argument("--w_zero_out_t", type=parse_threshold, default=1.25)
    k.add_argument(
        "--max_minutes", type=float, default=None,
        help="stop cleanly before a run that would end past this budget",
    )  # fmt: skip
    add_output_dir(k, default="campaign_out", help="directory (resumed if it exists)")
    k.set_defaults(func=campaign_command)


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-bitflip`` command line (subcommands demo, eval, generate, sweep, compare,
    attribute); every ``--help`` shows the defaults."""
    parser = Parser(prog="peft-bitflip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = sub.add_parser("demo", help="flip a random tensor and check the flip rates (offline)")
    d.add_argument("--n", type=parse_positive, default=1 << 20, help="number of elements")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="tensor dtype")
    d.add_argument("--device", default=default_device(), help="torch device")
    d.add_argument(
        "--p",
        type=parse_probability,
        nargs="+",
        default=[0.5, 2**-6, 1e-3, 2**-16],
        help="flip probabilities per bit (1.5e-5 or 2^-16)",
    )
    d.add_argument(
        "--threshold", type=parse_threshold, default=30.0, help="zero-out threshold ('none': off)"
    )
    d.add_argument("--seed", type=parse_seed, default=0, help="flip seed")
    d.set_defaults(func=demo)

    e = sub.add_parser("eval", help="lm-eval tasks with or without flips")
    add_model_arguments(e)
    add_flip_arguments(e)
    add_calibration_arguments(e)
    e.add_argument(
        "--tasks",
        default="wikitext",
        help="comma-separated lm-eval tasks; bitflip_text_ppl runs offline",
    )
    e.add_argument("--batch_size", type=parse_positive, default=8, help="lm-eval batch size")
    e.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval)")
    e.add_argument("--max_length", type=int, default=None, help="tokens (default: the model's)")
    e.add_argument("--num_fewshot", type=int, default=None, help="as in lm-eval")
    e.add_argument("--metadata", default=None, help="JSON passed to the tasks")
    add_output_dir(e, old="--save_dir", help="writes results.json (default: nothing written)")
    e.set_defaults(func=eval_command)

    g = sub.add_parser("generate", help="generate text under flips")
    add_model_arguments(g)
    add_flip_arguments(g)
    add_calibration_arguments(g)
    g.add_argument("--prompt", default="London is", help="text to continue")
    g.add_argument("--max_new_tokens", type=parse_positive, default=128, help="tokens to add")
    g.add_argument(
        "--do_sample", action=argparse.BooleanOptionalAction, default=True, help="sample"
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top_k", type=int, default=50, help="sampling top-k")
    g.add_argument("--top_p", type=float, default=0.9, help="sampling top-p")
    g.add_argument(
        "--sampling_seed",
        type=parse_seed,
        default=None,
        help="seed of the sampler (default: the run's flip seed, 0 without flips)",
    )
    add_output_dir(g, old="--save_dir", help="writes prompt-response.txt")
    g.set_defaults(func=generate_command)

    w = sub.add_parser("sweep", help="perplexity vs bit-error rate: CSV + PNG (resumable)")
    add_model_arguments(w)
    add_data_arguments(w)
    w.add_argument(
        "--p",
        type=parse_probability,
        nargs="+",
        default=[0.0, 1e-9, 1e-7, 1e-6, 2**-16, 1e-4, 2**-10],
        help="flip probabilities per bit (1.5e-5 or 2^-16)",
    )
    w.add_argument(
        "--targets", nargs="+", choices=["x", "w", "both"], default=["both"], help="what flips"
    )
    w.add_argument(
        "--fields",
        nargs="+",
        choices=["exp", "frac", "both"],
        default=["both"],
        help="which bits flip",
    )
    w.add_argument("--seeds", type=parse_seed, nargs="+", default=[0, 1, 2], help="flip seeds")
    w.add_argument(
        "--x_zero_out_t", type=parse_threshold, default=30.0, help="input threshold ('none')"
    )
    w.add_argument(
        "--w_zero_out_t", type=parse_threshold, default=1.25, help="weight threshold ('none')"
    )
    add_calibration_arguments(w)
    add_output_dir(
        w,
        default="sweep_out",
        old="--out",
        help="folder of sweep.csv, summary.json, sweep.png (an existing CSV of the same "
        "settings is resumed)",
    )
    w.set_defaults(func=sweep_command)

    c = sub.add_parser("compare", help="clean / flipped / flipped + fine-tuned table")
    c.add_argument("--clean_model", required=True, help="the model before fine-tuning")
    c.add_argument("--finetuned", nargs="*", default=[], help="fine-tuned checkpoint(s)")
    add_model_arguments(c, model_positional=False)
    add_flip_arguments(c, clean_flag=False, seed_flag=False)
    add_calibration_arguments(c)
    add_data_arguments(c)
    add_seeds(c)
    add_output_dir(c, old="--out", help="writes compare.md and compare.json")
    c.set_defaults(func=compare_command)

    a = sub.add_parser(
        "attribute",
        help="what the damage is made of: clean, zero-out alone, flips alone, both; cuts per layer",
    )
    add_model_arguments(a)
    add_flip_arguments(a, clean_flag=False, seed_flag=False)
    add_calibration_arguments(a)
    add_data_arguments(a)
    add_seeds(a)
    a.add_argument("--top", type=parse_count, default=10, help="layers listed by cuts")
    add_output_dir(a, help="writes attribution.md and attribution.json")
    a.set_defaults(func=attribute_command)
    add_campaign_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = ["peft-bitflip", *argv]  # the run records' command line
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
