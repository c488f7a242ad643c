"""``peft-bitflip`` command line: ``demo``, ``eval``, ``generate``, ``sweep``, ``compare``.

Every model subcommand takes a checkpoint path or Hub id and flip settings: by default the
checkpoint's own (config.json), or ``--bitflip_config FILE`` (a BitflipConfig JSON, a model's
config.json, the original's meta YAML or transform_cfg TOML) and/or inline ``--x_p_exp`` ...
flags (which override the file), or ``--clean``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .config import RULE_KEYS

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
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_probability(text: str) -> float:
    """A probability: ``1.5e-5``, ``2^-16`` or ``2**-16``."""
    t = text.strip().replace("^", "**")
    try:
        return 2.0 ** float(t[3:]) if t.startswith("2**") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text!r}") from None


def parse_threshold(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a threshold (number or 'none'): {text!r}") from None


def add_flip_arguments(parser: argparse.ArgumentParser, *, clean_flag: bool = True) -> None:
    g = parser.add_argument_group("flips (default: the checkpoint's own config.json settings)")
    g.add_argument(
        "--bitflip_config",
        default=None,
        help="BitflipConfig JSON, a model's config.json, the original's meta YAML or "
        "transform_cfg TOML",
    )
    for key in FLIP_FLAGS:
        kind = parse_threshold if key.endswith("_t") else parse_probability
        g.add_argument(
            f"--{key}",
            type=kind,
            default=argparse.SUPPRESS,
            help="overrides the file / checkpoint value",
        )
    g.add_argument("--bitflip_seed", type=int, default=argparse.SUPPRESS)
    if clean_flag:
        g.add_argument("--clean", action="store_true", help="evaluate without flips")


def read_bitflip_file(path: str):
    """A :class:`BitflipConfig` from a JSON, YAML (original meta) or TOML (original LoRA) file."""
    from .config import BitflipConfig, read_original_toml

    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return BitflipConfig.from_json_file(path)
    if ext in (".yaml", ".yml"):
        return BitflipConfig.from_original_yaml(path)
    if ext == ".toml":
        return read_original_toml(path)[0]
    raise ValueError(f"--bitflip_config {path!r}: expected a .json, .yaml or .toml file")


def flips_from_args(args, base=None):
    """The run's BitflipConfig: ``--clean`` gives None; file and inline flags override
    ``base``; with neither, ``base`` (``None`` stands for the checkpoint's own settings)."""
    from .config import BitflipConfig
    from .evaluation import KEEP

    if getattr(args, "clean", False):
        return None
    cfg = read_bitflip_file(args.bitflip_config) if args.bitflip_config else base
    inline = {k: getattr(args, k) for k in FLIP_FLAGS if hasattr(args, k)}
    if hasattr(args, "bitflip_seed"):
        inline["seed"] = args.bitflip_seed
    if not inline:
        return KEEP if cfg is None else cfg
    values = cfg.to_dict() if isinstance(cfg, BitflipConfig) else {}
    values.update(inline)
    return BitflipConfig.from_dict(values)


def add_model_arguments(parser, *, model_positional=True):
    if model_positional:
        parser.add_argument("model", help="checkpoint directory or Hub id")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_data_arguments(parser):
    g = parser.add_argument_group("perplexity data (default: the embedded offline corpus)")
    g.add_argument("--dataset_name", default=None)
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--validation_file", default=None, help=".txt/.json/.jsonl/.csv file")
    g.add_argument("--block_size", type=int, default=256, help="tokens per block")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--max_batches", type=int, default=32, help="first N batches (0: all)")


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
    return data.tokenize_and_group(raw["validation"], tokenizer, args.block_size)


def _max_batches(args):
    return None if args.max_batches == 0 else args.max_batches


def _describe(flips) -> str:
    from .evaluation import KEEP

    if flips is None:
        return "none"
    if flips == KEEP:
        return "checkpoint's"
    vals = [f"{k}={getattr(flips, k):g}" for k in FLIP_FLAGS if getattr(flips, k) is not None]
    return ", ".join(vals) + f", seed={flips.seed}"


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


# ---------------------------------------------------------------------- subcommands


def eval_command(args) -> int:
    """lm-eval tasks on a model with or without flips."""
    from lm_eval.utils import make_table

    from .evaluation import lm_eval_results, load_model

    flips = flips_from_args(args)
    model, tok = load_model(args.model, flips, dtype=TORCH_DTYPES[args.dtype], device=args.device)
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
    if args.save_dir:
        out = {
            "model": args.model,
            "flips": _describe(flips),
            "results": results["results"],
            "config": results.get("config"),
        }
        _write_json(os.path.join(args.save_dir, "results.json"), out)
        print(f"wrote {os.path.join(args.save_dir, 'results.json')}")
    return 0


def generate_command(args) -> int:
    """Text generation under flips (the original's hf-gen)."""
    from .evaluation import generate_text, load_model

    flips = flips_from_args(args)
    model, tok = load_model(args.model, flips, dtype=TORCH_DTYPES[args.dtype], device=args.device)
    response = generate_text(
        model,
        tok,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(f"flips: {_describe(flips)}\n--- prompt ---\n{args.prompt}\n--- response ---\n{response}")
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        path = os.path.join(args.save_dir, "prompt-response.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{args.prompt}\n---\n{response}\n")
        print(f"wrote {path}")
    return 0


def sweep_command(args) -> int:
    """Perplexity over a grid of error rates and seeds; CSV, summary JSON and PNG plot."""
    from .evaluation import load_model, plot_sweep, summarize_sweep, sweep

    model, tok = load_model(args.model, None, dtype=TORCH_DTYPES[args.dtype], device=args.device)
    blocks = validation_blocks(args, tok)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "sweep.csv")
    points = sweep(
        model,
        blocks,
        args.p,
        targets=args.targets,
        fields=args.fields,
        seeds=args.seeds,
        x_zero_out_t=args.x_zero_out_t,
        w_zero_out_t=args.w_zero_out_t,
        batch_size=args.batch_size,
        max_batches=_max_batches(args),
        csv_path=csv_path,
    )
    rows = summarize_sweep(points)
    _write_json(os.path.join(args.out, "summary.json"), {"model": args.model, "rows": rows})
    plot_sweep(rows, os.path.join(args.out, "sweep.png"), title=f"{args.model}")
    print(f"{'p':>10} {'target':>6} {'field':>5} {'ppl mean':>12} {'sd':>10} seeds")
    for r in rows:
        print(
            f"{r['p']:>10.3g} {r['target']:>6} {r['field']:>5} {r['ppl_mean']:>12.4g} "
            f"{r['ppl_std']:>10.3g} {r['seeds']}"
        )
    print(f"wrote {csv_path}, summary.json and sweep.png in {args.out}")
    return 0


def compare_command(args) -> int:
    """The seed's table: clean model, clean model under flips, fine-tuned model under flips."""
    import statistics

    from .config import BitflipConfig
    from .evaluation import compare_table, load_model, perplexity

    flips = flips_from_args(args, base=BitflipConfig.original_default())
    settings = [("clean", args.clean_model, None), ("flipped", args.clean_model, flips)]
    for path in args.finetuned:
        settings.append(("flipped + fine-tuned", path, flips))
    rows = []
    blocks = None
    for name, path, cfg in settings:
        seeds = [None] if cfg is None else args.seeds
        ppl = []
        for seed in seeds:
            run_cfg = (
                None if cfg is None else BitflipConfig.from_dict({**cfg.to_dict(), "seed": seed})
            )
            model, tok = load_model(
                path, run_cfg, dtype=TORCH_DTYPES[args.dtype], device=args.device
            )
            if blocks is None:
                blocks = validation_blocks(args, tok)
            r = perplexity(
                model, blocks, batch_size=args.batch_size, max_batches=_max_batches(args)
            )
            ppl.append(r["perplexity"])
            del model
        finite = all(math.isfinite(v) for v in ppl)
        rows.append(
            {
                "setting": name,
                "model": path,
                "flips": _describe(cfg),
                "ppl_mean": statistics.fmean(ppl) if finite else math.inf,
                "ppl_std": statistics.stdev(ppl) if finite and len(ppl) > 1 else 0.0,
                "seeds": len(ppl),
                "perplexities": ppl,
            }
        )
    table = compare_table(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        _write_json(os.path.join(args.out, "compare.json"), rows)
        print(f"wrote compare.md and compare.json in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-bitflip`` command line (subcommands demo, eval, generate, sweep, compare)."""
    parser = argparse.ArgumentParser(
        prog="peft-bitflip", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="flip a random tensor and check the flip rates (offline)")
    d.add_argument("--n", type=int, default=1 << 20, help="number of elements")
    d.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--p", type=float, nargs="+", default=[0.5, 2**-6, 1e-3, 2**-16])
    d.add_argument("--threshold", type=float, default=30.0, help="zero-out threshold")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)

    e = sub.add_parser("eval", help="lm-eval tasks with or without flips")
    add_model_arguments(e)
    add_flip_arguments(e)
    e.add_argument(
        "--tasks",
        default="wikitext",
        help="comma-separated lm-eval tasks; bitflip_text_ppl runs offline",
    )
    e.add_argument("--batch_size", type=int, default=8)
    e.add_argument("--limit", type=float, default=None)
    e.add_argument("--max_length", type=int, default=None)
    e.add_argument("--num_fewshot", type=int, default=None)
    e.add_argument("--metadata", default=None, help="JSON passed to the tasks")
    e.add_argument("--save_dir", default=None)
    e.set_defaults(func=eval_command)

    g = sub.add_parser("generate", help="generate text under flips")
    add_model_arguments(g)
    add_flip_arguments(g)
    g.add_argument("--prompt", default="London is")
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--save_dir", default=None)
    g.set_defaults(func=generate_command)

    w = sub.add_parser("sweep", help="perplexity vs bit-error rate: CSV + PNG (resumable)")
    add_model_arguments(w)
    add_data_arguments(w)
    w.add_argument(
        "--p",
        type=parse_probability,
        nargs="+",
        default=[0.0, 1e-9, 1e-7, 1e-6, 2**-16, 1e-4, 2**-10],
    )
    w.add_argument("--targets", nargs="+", choices=["x", "w", "both"], default=["both"])
    w.add_argument("--fields", nargs="+", choices=["exp", "frac", "both"], default=["both"])
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    w.add_argument("--x_zero_out_t", type=parse_threshold, default=30.0)
    w.add_argument("--w_zero_out_t", type=parse_threshold, default=1.25)
    w.add_argument("--out", default="sweep_out", help="directory (an existing CSV is resumed)")
    w.set_defaults(func=sweep_command)

    c = sub.add_parser("compare", help="clean / flipped / flipped + fine-tuned table")
    c.add_argument("--clean_model", required=True, help="the model before fine-tuning")
    c.add_argument("--finetuned", nargs="*", default=[], help="fine-tuned checkpoint(s)")
    add_model_arguments(c, model_positional=False)
    add_flip_arguments(c, clean_flag=False)
    add_data_arguments(c)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--out", default=None)
    c.set_defaults(func=compare_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
