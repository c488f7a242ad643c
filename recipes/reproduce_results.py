"""The original's result table at small scale, and past it (``docs/results.md``).

One command runs the whole study on a local corpus (``recipes/build_corpus.py``):

1. one tokenizer trained on the training documents, shared by every model;
2. ``pretrain_clm.py`` twice with the same token budget: a clean model and a bit-flip-aware one
   (``--bitflip original``: p = 2^-16 for x and w, zero-out 30 / 1.25); their tokens/s;
3. bit-flip-aware LoRA (``finetune_lora.py``, r = 32, alpha = 32, 1 % of the parameter count
   in tokens) on the clean model, once per flip seed, and for r in ``--ranks`` (alpha = r);
4. every model evaluated on the same validation blocks: clean, and under the original flips
   for each of ``--seeds``;
5. a sweep of perplexity vs p (x and w, sign/exponent and mantissa bits, thresholds 30 / 1.25)
   for the clean, LoRA-recovered and bit-flip-pretrained models.

Writes ``results.json``, ``results.md`` (the tables), ``sweep.csv`` and ``sweep.png`` to
``--output_dir``.  Each stage is skipped when its output exists, so a stopped run resumes::

    python recipes/build_corpus.py --output_dir corpus/en /usr/share/doc/python3.11 ...
    python recipes/reproduce_results.py --train_file corpus/en/train.jsonl \\
        --validation_file corpus/en/validation.jsonl --output_dir results/60M
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import peft_bitflip  # noqa: E402
from peft_bitflip import data, evaluation  # noqa: E402
from peft_bitflip.cli import add_deprecated_alias  # noqa: E402
from peft_bitflip.config import BitflipConfig  # noqa: E402
from recipes import finetune_lora, pretrain_clm  # noqa: E402

TRITON_CACHE = os.environ.get(
    "TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache")
)
SWEEP_P = [1e-9, 1e-8, 1e-7, 1e-6, 2.0**-18, 2.0**-16, 2.0**-14, 2.0**-12, 2.0**-10, 2.0**-8]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--output_dir", default="results/60M")
    p.add_argument("--flavor", default="60M")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--tokenizer_vocab_size", type=int, default=16384)
    p.add_argument("--pretrain_tokens", type=int, default=8_000_000, help="per model")
    p.add_argument("--pretrain_batch_size", type=int, default=16, help="per device")
    p.add_argument("--pretrain_lr", type=float, default=2e-3)
    p.add_argument("--lora_seeds", default="0,1,2", help="flip seeds of the r = 32 runs")
    p.add_argument("--ranks", default="4,16,64", help="extra LoRA ranks (alpha = r, seed 0)")
    p.add_argument(
        "--harsh_p",
        type=float,
        default=2.0**-8,
        help="past the original: p of a harsher setting (all four p) for one more LoRA run "
        "(r = 32, seed 0) and its evaluation; 0 = skip",
    )
    p.add_argument("--lora_workers", type=int, default=1, help="LoRA runs at once (processes)")
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--lora_batch_size", type=int, default=8)
    p.add_argument("--lora_tokens_per_param", type=float, default=0.01)
    p.add_argument(
        "--lora_data_factor",
        type=float,
        default=4.0,
        help="LoRA runs read an evenly strided subset of the training documents holding about "
        "this many times their token budget (so that each run tokenizes only that); 0 = all",
    )
    p.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=8,
        help="processes that tokenize (each LoRA worker gets its share); the packing into "
        "blocks depends on it, so keep it fixed to reproduce a run",
    )
    p.add_argument("--seeds", default="0,1,2", help="flip seeds every evaluation averages over")
    add_deprecated_alias(p, "--eval_seeds", "--seeds")
    p.add_argument("--eval_blocks", type=int, default=128)
    p.add_argument("--sweep_seeds", default="0,1,2")
    p.add_argument("--sweep_batches", type=int, default=4, help="batches of 8 blocks per point")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--check_repro", action="store_true", help="run LoRA seed 0 twice")
    return p


def ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def saved_parameters(path: str) -> int:
    """Number of parameters in the safetensors files of a saved model."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    total += math.prod(f.get_slice(key).get_shape())
    return total


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    if not all(math.isfinite(v) for v in values):
        return math.inf, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Study:
    def __init__(self, args):
        self.args = args
        self.out = args.output_dir
        os.makedirs(self.out, exist_ok=True)
        self.path = os.path.join(self.out, "results.json")
        self.results = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.results = json.load(f)
        self.results.setdefault(
            "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        )
        self.flips = BitflipConfig.original_default()
        self.failed: dict[str, str] = {}  # LoRA runs that failed twice: name -> end of log

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.results, f, indent=2, sort_keys=True, default=str)

    def stage(self, name, fn):
        if name in self.results:
            print(f"[{name}] done earlier")
            return self.results[name]
        start = time.perf_counter()
        value = fn()
        if isinstance(value, dict):
            value["stage_seconds"] = time.perf_counter() - start
        self.results[name] = value
        self.save()
        print(f"[{name}] {time.perf_counter() - start:.0f} s")
        return value

    # ------------------------------------------------------------------ pieces

    def tokenizer(self):
        path = os.path.join(self.out, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            from datasets import load_dataset

            docs = load_dataset("json", data_files=self.args.train_file, split="train")
            tok = data.train_tokenizer(
                docs.select(range(min(len(docs), 20_000)))["text"],
                vocab_size=self.args.tokenizer_vocab_size,
                model_max_length=self.args.seq_len,
            )
            tok.save_pretrained(path)
        from transformers import AutoTokenizer

        return path, AutoTokenizer.from_pretrained(path)

    def eval_blocks(self, tokenizer):
        from datasets import load_dataset

        docs = load_dataset("json", data_files=self.args.validation_file, split="train")
        blocks = data.tokenize_and_group(
            docs, tokenizer, self.args.seq_len, prepend_bos=True, add_special_tokens=False
        )
        return blocks.select(range(min(len(blocks), self.args.eval_blocks)))

    def pretrain(self, name, bitflip, tok_path):
        a = self.args
        out = os.path.join(self.out, name)
        argv = [
            "--flavor", a.flavor, "--seq_len", str(a.seq_len), "--tokenizer_name", tok_path,
            "--train_file", a.train_file, "--validation_file", a.validation_file,
            "--train_tokens", str(a.pretrain_tokens),
            "--per_device_train_batch_size", str(a.pretrain_batch_size),
            "--learning_rate", str(a.pretrain_lr), "--bitflip", bitflip,
            "--eval_blocks", "8", "--eval_seeds", "0",  # evaluated below, all models alike
            "--save_steps", "0", "--seed", str(a.seed), "--output_dir", out,
            "--logging_steps", "50", "--disable_tqdm",
            "--preprocessing_num_workers", str(a.preprocessing_num_workers),
        ]  # fmt: skip
        r = pretrain_clm.main(argv)
        keep = ("train_steps", "train_tokens", "train_runtime_s", "tokens_per_second")
        return {"path": out, "argv": argv, **{k: r[k] for k in keep}, "plan": r["plan"]}

    def lora_train_file(self, num_params: int) -> str:
        """Every k-th training document, k chosen so that the subset holds about
        ``--lora_data_factor`` times the LoRA token budget (at the corpus's own
        characters per token, measured on the tokenizer's training sample)."""
        a = self.args
        if a.lora_data_factor <= 0:
            return a.train_file
        path = os.path.join(self.out, "lora_train.jsonl")
        if not os.path.exists(path):
            with open(a.train_file) as f:
                docs = f.readlines()
            chars = sum(len(json.loads(d)["text"]) for d in docs)
            want = a.lora_data_factor * a.lora_tokens_per_param * num_params * self.chars_per_token
            stride = max(1, int(chars // max(want, 1.0)))
            with open(path + ".tmp", "w") as f:
                f.writelines(docs[::stride])
            os.replace(path + ".tmp", path)
        return path

    def lora_argv(self, name, base, tok_path, rank, seed, p=None):
        a = self.args
        argv = [
            "--model_name_or_path", base, "--tokenizer_name", tok_path,
            "--train_file", self.lora_data, "--validation_file", a.validation_file,
            "--block_size", str(a.seq_len), "--lora_r", str(rank), "--lora_alpha", str(rank),
            "--bitflip_seed", str(seed), "--tokens_per_param", str(a.lora_tokens_per_param),
            "--per_device_train_batch_size", str(a.lora_batch_size),
            "--learning_rate", str(a.lora_lr), "--weight_decay", "0.0",
            "--eval_batches", "0", "--bf16", "--full_determinism", "--seed", str(a.seed),
            "--output_dir", os.path.join(self.out, name),
            "--logging_steps", "20", "--disable_tqdm",
            "--preprocessing_num_workers",
            str(max(1, a.preprocessing_num_workers // max(1, a.lora_workers))),
        ]  # fmt: skip
        if p is not None:
            for key in ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac"):
                argv += [f"--{key}", repr(p)]
        return argv

    def lora_stages(self, runs: dict):
        """Fine-tune every LoRA run of ``runs`` ({name: argv}) not done yet, in
        ``--lora_workers`` processes at once (each with its own data-set and Triton caches).
        A run that fails is tried once more; runs that fail twice are listed in
        ``self.failed`` (with the end of their log) and the study goes on without them."""
        todo = {k: v for k, v in runs.items() if k not in self.results}
        script = os.path.abspath(finetune_lora.__file__)
        pending = [(name, argv, 1) for name, argv in todo.items()]
        running: list = []
        start = time.perf_counter()
        while pending or running:
            while pending and len(running) < max(1, self.args.lora_workers):
                name, argv, attempt = pending.pop(0)
                if self.args.lora_workers <= 1:
                    finetune_lora.main(argv)
                    self.record_lora(name, argv, start)
                    continue
                cache = os.path.join(self.out, "cache", name)
                if os.path.isdir(TRITON_CACHE):  # kernels compiled by this process: reuse them
                    shutil.copytree(TRITON_CACHE, os.path.join(cache, "triton"), dirs_exist_ok=True)
                env = dict(
                    os.environ,
                    HF_DATASETS_CACHE=os.path.join(cache, "datasets"),
                    TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                )
                log = open(os.path.join(self.out, f"{name}.log"), "w")
                proc = subprocess.Popen(
                    [sys.executable, script, *argv], env=env, stdout=log, stderr=subprocess.STDOUT
                )
                running.append((name, argv, attempt, proc, log))
            for item in list(running):
                name, argv, attempt, proc, log = item
                if proc.poll() is None:
                    continue
                log.close()
                running.remove(item)
                if proc.returncode == 0:
                    self.record_lora(name, argv, start)
                    continue
                with open(log.name) as f:
                    tail = "".join(f.readlines()[-30:])
                print(f"[{name}] failed (exit {proc.returncode}, attempt {attempt}):\n{tail}")
                if attempt == 1:
                    os.replace(log.name, log.name + ".1")
                    pending.append((name, argv, 2))
                else:
                    self.failed[name] = tail
            time.sleep(1)

    def record_lora(self, name, argv, start):
        with open(os.path.join(self.out, name, "all_results.json")) as f:
            r = json.load(f)
        keep = ("train_steps", "train_tokens", "train_runtime", "train_loss")
        self.results[name] = {
            "path": os.path.join(self.out, name),
            "argv": argv,
            **{k: r[k] for k in keep},
            "stage_seconds": time.perf_counter() - start,
        }
        self.save()
        print(f"[{name}] done")

    def evaluate(self, path, blocks, flips=None):
        """Clean and flipped (``flips``, default the original's; each eval seed) perplexity
        of a saved model."""
        flips = flips or self.flips
        model, _ = evaluation.load_model(path, None, device=self.device)
        model.eval()
        clean = evaluation.perplexity(model, blocks)["perplexity"]
        flipped = {}
        for s in ints(self.args.seeds):
            peft_bitflip.apply_bitflip(model, dataclasses.replace(flips, seed=s))
            evaluation.reset_streams(model)
            flipped[s] = evaluation.perplexity(model, blocks)["perplexity"]
        m, sd = mean_sd(flipped.values())
        return {"clean": clean, "flipped": flipped, "flipped_mean": m, "flipped_sd": sd}

    def sweep(self, paths: dict, blocks):
        csv_dir = os.path.join(self.out, "sweeps")
        os.makedirs(csv_dir, exist_ok=True)
        rows = []
        for label, path in paths.items():
            model, _ = evaluation.load_model(path, None, device=self.device)
            model.eval()
            points = evaluation.sweep(
                model,
                blocks,
                SWEEP_P,
                seeds=ints(self.args.sweep_seeds),
                max_batches=self.args.sweep_batches,
                csv_path=os.path.join(csv_dir, f"{label}.csv"),
                progress=False,
            )
            for row in evaluation.summarize_sweep(points):
                rows.append({"model": label, **row})
        evaluation.plot_sweep(
            rows,
            os.path.join(self.out, "sweep.png"),
            title=f"aixsim-{self.args.flavor}: perplexity vs bit flip probability",
        )
        return {"rows": rows}

    # ------------------------------------------------------------------ the study

    def run(self):
        a = self.args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        tok_path, tokenizer = self.tokenizer()
        blocks = self.eval_blocks(tokenizer)
        self.results["eval_tokens"] = len(blocks) * (a.seq_len - 1)
        self.results["settings"] = vars(a)
        clean = self.stage("pretrain_clean", lambda: self.pretrain("clean", "none", tok_path))
        aware = self.stage(
            "pretrain_bitflip", lambda: self.pretrain("bitflip", "original", tok_path)
        )
        texts = [json.loads(line)["text"] for line in open(a.validation_file)]
        self.chars_per_token = sum(map(len, texts)) / sum(
            len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
        )
        self.lora_data = self.lora_train_file(saved_parameters(clean["path"]))
        runs = {}
        for s in ints(a.lora_seeds):
            runs[f"lora_r32_s{s}"] = self.lora_argv(
                f"lora_r32_s{s}", clean["path"], tok_path, 32, s
            )
        for r in ints(a.ranks):
            runs[f"lora_r{r}_s0"] = self.lora_argv(f"lora_r{r}_s0", clean["path"], tok_path, r, 0)
        if a.check_repro:
            runs["lora_r32_s0_again"] = self.lora_argv(
                "lora_r32_s0_again", clean["path"], tok_path, 32, 0
            )
        if a.harsh_p:
            runs["lora_harsh_r32_s0"] = self.lora_argv(
                "lora_harsh_r32_s0", clean["path"], tok_path, 32, 0, p=a.harsh_p
            )
        self.lora_stages(runs)
        models = {"clean": clean["path"], "bitflip": aware["path"]}
        models.update({k: v["path"] for k, v in self.results.items() if k.startswith("lora_")})
        for name, path in models.items():
            self.stage(f"eval_{name}", lambda path=path: self.evaluate(path, blocks))
        if a.harsh_p:
            harsh = dataclasses.replace(
                self.flips, **{k: a.harsh_p for k in ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")}
            )
            for name in ("clean", "bitflip", "lora_harsh_r32_s0"):
                self.stage(f"harsh_{name}", lambda n=name: self.evaluate(models[n], blocks, harsh))
        recovered = [k for k in (f"lora_r32_s{s}" for s in ints(a.lora_seeds)) if k in models]
        sweep_models = {"clean-trained": clean["path"], "bitflip-pretrained": aware["path"]}
        if recovered:
            sweep_models[f"LoRA-recovered (r=32, seed {recovered[0][10:]})"] = models[recovered[0]]
        self.stage("sweep", lambda: self.sweep(sweep_models, blocks))
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(self.markdown())
        print(self.markdown())
        if self.failed:
            raise SystemExit(f"LoRA runs failed twice: {sorted(self.failed)}")
        return self.results

    def markdown(self) -> str:
        R, a = self.results, self.args
        e = {k[5:]: v for k, v in R.items() if k.startswith("eval_") and isinstance(v, dict)}
        fmt = "{:.2f} ± {:.2f}".format
        lines = [f"device: {R['device']}; evaluation on {R['eval_tokens']:,} tokens", ""]
        c, b = R["pretrain_clean"], R["pretrain_bitflip"]
        lines += [
            "| pretraining | tokens | steps | tokens/s | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| clean | {c['train_tokens']:,} | {c['train_steps']} | "
            f"{c['tokens_per_second']:,.0f} | 1.00 |",
            f"| bit-flip-aware | {b['train_tokens']:,} | {b['train_steps']} | "
            f"{b['tokens_per_second']:,.0f} | "
            f"{c['tokens_per_second'] / b['tokens_per_second']:.2f}x slower |",
            "",
            "| model | evaluated clean | evaluated under flips (mean ± sd over flip seeds) |",
            "|---|---:|---:|",
            f"| clean-pretrained | {e['clean']['clean']:.2f} | "
            f"{fmt(e['clean']['flipped_mean'], e['clean']['flipped_sd'])} |",
            f"| bit-flip-pretrained | {e['bitflip']['clean']:.2f} | "
            f"{fmt(e['bitflip']['flipped_mean'], e['bitflip']['flipped_sd'])} |",
            "",
        ]
        lora = [e[f"lora_r32_s{s}"] for s in ints(a.lora_seeds) if f"lora_r32_s{s}" in e]
        rec = mean_sd(x["flipped_mean"] for x in lora)
        lines += [
            "| row (as the original's table) | perplexity | seeds |",
            "|---|---:|---:|",
            f"| clean model, no flips | {e['clean']['clean']:.2f} | - |",
            f"| clean model under flips | "
            f"{fmt(e['clean']['flipped_mean'], e['clean']['flipped_sd'])} | eval {a.seeds} |",
            f"| bit-flip-aware LoRA r=32, under flips | {fmt(*rec)} | train {a.lora_seeds} |",
            f"| bit-flip-aware *pretrained*, under flips | "
            f"{fmt(e['bitflip']['flipped_mean'], e['bitflip']['flipped_sd'])} | "
            f"eval {a.seeds} |",
            "",
            "| LoRA rank (alpha = r, seed 0) | trainable tokens | under flips | clean |",
            "|---:|---:|---:|---:|",
        ]
        for r in sorted({4, 16, 32, 64} & ({32} | set(ints(a.ranks)))):
            k = f"lora_r{r}_s0"
            if k in e:
                lines.append(
                    f"| {r} | {R[k]['train_tokens']:,} | "
                    f"{fmt(e[k]['flipped_mean'], e[k]['flipped_sd'])} | {e[k]['clean']:.2f} |"
                )
        h = {k[6:]: v for k, v in R.items() if k.startswith("harsh_")}
        if h:
            lines += [
                "",
                f"| harsher flips, p = {a.harsh_p:g} for all four (thresholds 30 / 1.25) | "
                "under flips | clean |",
                "|---|---:|---:|",
            ]
            names = {
                "clean": "clean-pretrained",
                "bitflip": "bit-flip-pretrained (at 2^-16)",
                "lora_harsh_r32_s0": f"clean + bit-flip-aware LoRA r=32 at p = {a.harsh_p:g}",
            }
            for k, label in names.items():
                if k in h:
                    lines.append(
                        f"| {label} | {fmt(h[k]['flipped_mean'], h[k]['flipped_sd'])} | "
                        f"{h[k]['clean']:.2f} |"
                    )
        if "lora_r32_s0_again" in e:
            same = e["lora_r32_s0_again"]["flipped"] == e["lora_r32_s0"]["flipped"]
            lines += ["", f"LoRA r=32 seed 0 run twice: identical perplexities: {same}"]
        for name, tail in self.failed.items():
            lines += ["", f"LoRA run {name} FAILED twice; end of its log:", "```", tail, "```"]
        if "sweep" in R:
            lines += [
                "",
                "| p | " + " | ".join(sorted({r["model"] for r in R["sweep"]["rows"]})) + " |",
            ]
            models = sorted({r["model"] for r in R["sweep"]["rows"]})
            lines.append("|---:|" + "---:|" * len(models))
            for p in SWEEP_P:
                cells = []
                for m in models:
                    row = [r for r in R["sweep"]["rows"] if r["model"] == m and r["p"] == p]
                    cells.append(fmt(row[0]["ppl_mean"], row[0]["ppl_std"]) if row else "-")
                lines.append(f"| {p:.3g} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    return Study(args).run()


if __name__ == "__main__":
    main()
