"""The original's table on a real pretrained model, what its damage is made of, and the fix.

One command (``docs/results.md``, real-model section) on a real causal LM (e.g. SmolLM2-135M
from ``../shared/tools/real-model.sh``) and a local English corpus split into train and
validation (``recipes/build_corpus.py``; the evaluation text is never trained on):

1. attribution (``peft_bitflip.attribution``): clean; the original's zero-out alone (x, W,
   both, p = 0); the flips alone; both; thresholds calibrated to the model
   (``calibrate_zero_out``, margin 2, on training text) with and without flips; flip seeds;
   per-layer counts of the real values the thresholds cut;
2. LoRA through ``finetune_lora.py`` (HF Trainer), every linear layer but ``lm_head``, 1 % of
   the parameter count in tokens unless noted: bit-flip-aware r = 32 under the original fault
   model (flip seeds ``--lora_seeds``) and with ``--more_factor`` times the tokens; the *same*
   LoRA trained without flips or zero-out; trained with the zero-out only (p = 0); trained
   under the flips with calibrated thresholds; ranks ``--ranks`` (alpha = r);
3. every model evaluated clean, under the original fault model and under the flips with the
   calibrated thresholds, for each of ``--seeds``;
4. generation samples (one prompt, greedy): clean, flipped, flipped with calibrated thresholds,
   recovered;
5. the recovered LoRA merged and saved by the recipe, reloaded by ``AutoModelForCausalLM`` in a
   fresh process with flips on: its perplexity must equal the in-process one.

Writes ``results.json`` and ``results.md``; every stage is recorded when it finishes and
skipped when the command runs again (``--max_minutes`` stops cleanly between stages)::

    python recipes/reproduce_real_model.py --model /tmp/real-model/smollm2-135m \\
        --train_file corpus/en/train.jsonl --validation_file corpus/en/validation.jsonl \\
        --output_dir results/smollm2-135m --lora_workers 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``recipes`` and the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import peft_bitflip  # noqa: E402
from peft_bitflip import data, evaluation  # noqa: E402
from peft_bitflip.attribution import attribute, attribution_markdown  # noqa: E402
from peft_bitflip.calibration import calibrate_zero_out  # noqa: E402
from peft_bitflip.cli import add_deprecated_alias  # noqa: E402
from peft_bitflip.config import BitflipConfig  # noqa: E402
from recipes.reproduce_results import Study, ints  # noqa: E402

P_KEYS = ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")
RELOAD_SNIPPET = """
import json, sys, torch
import peft_bitflip
from transformers import AutoModelForCausalLM
from peft_bitflip.evaluation import perplexity, reset_streams
path, blocks, dtype, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
layers = peft_bitflip.layers.bitflip_layers(model)
reset_streams(model)  # the saved counters are those at the end of training: start at call 0
r = perplexity(model, torch.load(blocks))
print(json.dumps({"perplexity": r["perplexity"], "bitflip_layers": len(layers),
                  "seed": model.config.quantization_config.seed}))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a pretrained causal LM folder")
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--output_dir", default="results/real-model")
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--eval_blocks", type=int, default=64, help="validation blocks evaluated")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2", help="flip seeds every evaluation averages over")
    add_deprecated_alias(p, "--eval_seeds", "--seeds")
    p.add_argument("--calibration_margin", type=float, default=2.0)
    p.add_argument("--calibration_blocks", type=int, default=32, help="training blocks")
    p.add_argument("--lora_seeds", default="0,1,2", help="flip seeds of the r = 32 runs")
    p.add_argument("--ranks", default="8,128", help="more LoRA ranks (alpha = r, seed 0)")
    p.add_argument("--more_factor", type=float, default=3.0, help="tokens of the longer run")
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--lora_batch_size", type=int, default=8)
    p.add_argument("--lora_tokens_per_param", type=float, default=0.01)
    p.add_argument("--lora_max_steps", type=int, default=None, help="cap (smoke tests)")
    p.add_argument("--lora_workers", type=int, default=1, help="LoRA runs at once (processes)")
    p.add_argument(
        "--lora_data_factor",
        type=float,
        default=6.0,
        help="LoRA runs read a strided subset of the training documents of about this many "
        "times the 1 %% budget (0 = all)",
    )
    p.add_argument("--preprocessing_num_workers", type=int, default=4)
    p.add_argument("--prompt", default="The most important thing about a healthy economy is")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_minutes", type=float, default=0, help="stop between stages (0: no)")
    p.add_argument("--skip_lora", action="store_true", help="stages 1 and 4 only")
    return p


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    if not values or not all(math.isfinite(v) for v in values):
        return math.inf, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(m, sd) -> str:
    return "diverged" if not math.isfinite(m) else f"{m:.2f} ± {sd:.2f}"


class OutOfTime(Exception):
    pass


class RealModelStudy(Study):
    def __init__(self, args):
        super().__init__(args)
        self.start = time.perf_counter()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32

    def stage(self, name, fn):
        if name not in self.results and self.args.max_minutes:
            if time.perf_counter() - self.start > 60 * self.args.max_minutes:
                raise OutOfTime(name)
        return super().stage(name, fn)

    # ------------------------------------------------------------------ data

    def blocks(self, path, n, tokenizer):
        from datasets import load_dataset

        docs = load_dataset("json", data_files=path, split="train")
        if path == self.args.train_file:  # a strided subset is enough for calibration
            docs = docs.select(range(0, len(docs), max(1, len(docs) // 64)))
        blocks = data.tokenize_and_group(docs, tokenizer, self.args.block_size)
        if len(blocks) < n:
            raise ValueError(f"{path} gives {len(blocks)} blocks of {self.args.block_size} < {n}")
        return torch.tensor(blocks.select(range(n))["input_ids"])

    # ------------------------------------------------------------------ pieces

    def load(self, path):
        model, tok = evaluation.load_model(path, None, dtype=self.dtype, device=self.device)
        return model, tok

    def ppl(self, model, blocks) -> dict:
        r = evaluation.perplexity(model, blocks, batch_size=self.args.eval_batch_size)
        return {k: r[k] for k in ("perplexity", "loss", "nonfinite_batches", "reason")}

    def evaluate(self, path, blocks):
        """Clean, under the original fault model and under the flips with calibrated
        thresholds, for every eval seed."""
        model, _ = self.load(path)
        out = {"clean": self.ppl(model, blocks)["perplexity"]}
        for name, cfg in (("original", self.flips), ("calibrated", self.calibrated)):
            per_seed = {}
            for s in ints(self.args.seeds):
                peft_bitflip.apply_bitflip(
                    model, BitflipConfig.from_dict({**cfg.to_dict(), "seed": s})
                )
                evaluation.reset_streams(model)
                per_seed[s] = self.ppl(model, blocks)["perplexity"]
            peft_bitflip.remove_bitflip(model)
            m, sd = mean_sd(per_seed.values())
            out[name] = {"per_seed": per_seed, "mean": m, "sd": sd}
        return out

    def lora_argv(self, name, rank, seed, flags=(), factor=1.0):
        a = self.args
        argv = [
            "--model_name_or_path", a.model, "--train_file", self.lora_data,
            "--validation_file", a.validation_file, "--block_size", str(a.block_size),
            "--lora_r", str(rank), "--lora_alpha", str(rank), "--bitflip_seed", str(seed),
            "--tokens_per_param", repr(a.lora_tokens_per_param * factor),
            "--per_device_train_batch_size", str(a.lora_batch_size),
            "--learning_rate", str(a.lora_lr), "--weight_decay", "0.0", "--eval_batches", "0",
            "--seed", str(a.seed), "--output_dir", os.path.join(self.out, name),
            "--logging_steps", "50", "--disable_tqdm",
            "--preprocessing_num_workers",
            str(max(1, a.preprocessing_num_workers // max(1, a.lora_workers))),
            *flags,
        ]  # fmt: skip
        if self.device == "cuda":
            argv += ["--bf16", "--full_determinism"]
        if a.lora_max_steps:
            argv += ["--max_steps", str(a.lora_max_steps)]
        return argv

    def lora_runs(self) -> dict:
        a = self.args
        no_p = [x for k in P_KEYS for x in (f"--{k}", "0")]
        no_t = ["--x_zero_out_t", "none", "--w_zero_out_t", "none"]
        margin = ["--calibrate_zero_out", repr(a.calibration_margin)]
        runs = {}
        for s in ints(a.lora_seeds):
            runs[f"lora_r32_s{s}"] = self.lora_argv(f"lora_r32_s{s}", 32, s)
        if a.more_factor and a.more_factor != 1:
            runs["lora_r32_more"] = self.lora_argv("lora_r32_more", 32, 0, factor=a.more_factor)
        runs["lora_r32_noflips"] = self.lora_argv("lora_r32_noflips", 32, 0, no_p + no_t)
        runs["lora_r32_zeroout_only"] = self.lora_argv("lora_r32_zeroout_only", 32, 0, no_p)
        runs["lora_r32_calibrated"] = self.lora_argv("lora_r32_calibrated", 32, 0, margin)
        for r in ints(a.ranks):
            runs[f"lora_r{r}_s0"] = self.lora_argv(f"lora_r{r}_s0", r, 0)
        return runs

    def steps_of(self, argv) -> int:
        """Optimizer steps of a LoRA run (its token budget over tokens per step)."""
        a = self.args
        tpp = float(argv[argv.index("--tokens_per_param") + 1])
        steps = math.ceil(tpp * self.results["num_parameters"] / (a.lora_batch_size * a.block_size))
        return min(steps, a.lora_max_steps) if a.lora_max_steps else steps

    def run_loras(self, runs: dict) -> None:
        """The LoRA runs in chunks of ``--lora_workers`` (longest first); with
        ``--max_minutes``, a chunk starts only if its estimated time (steps x the seconds per
        step measured so far, 0.3 s before any measurement) fits in what is left."""
        a = self.args
        order = sorted(runs, key=lambda k: -self.steps_of(runs[k]))
        workers = max(1, a.lora_workers)
        for i in range(0, len(order), workers):
            chunk = {k: runs[k] for k in order[i : i + workers]}
            if a.max_minutes:
                done = [v for k, v in self.results.items() if k.startswith("lora_")]
                per_step = max(
                    [v["train_runtime"] / v["train_steps"] for v in done if v.get("train_steps")]
                    or [0.3]
                )
                estimate = max(self.steps_of(v) for v in chunk.values()) * per_step + 60
                left = 60 * a.max_minutes - (time.perf_counter() - self.start)
                if estimate > left:
                    print(f"next LoRA chunk {list(chunk)}: ~{estimate:.0f} s, {left:.0f} s left")
                    raise OutOfTime("lora: " + ", ".join(chunk))
            self.lora_stages(chunk)

    def generation(self, lora_path):
        a = self.args
        model, tok = self.load(a.model)
        texts = {}
        settings = [
            ("clean", None),
            ("original fault model", self.flips),
            ("flips + calibrated zero-out", self.calibrated),
        ]
        for label, cfg in settings:
            if cfg is not None:
                peft_bitflip.apply_bitflip(model, cfg)
                evaluation.reset_streams(model)
            texts[label] = evaluation.generate_text(
                model, tok, a.prompt, max_new_tokens=a.max_new_tokens, do_sample=False
            )
            peft_bitflip.remove_bitflip(model)
        if lora_path:
            model, tok = self.load(lora_path)
            peft_bitflip.apply_bitflip(model, self.flips)
            evaluation.reset_streams(model)
            texts["recovered (bit-flip-aware LoRA r=32), original fault model"] = (
                evaluation.generate_text(
                    model, tok, a.prompt, max_new_tokens=a.max_new_tokens, do_sample=False
                )
            )
        return {"prompt": a.prompt, "texts": texts}

    def reload_check(self, path, blocks, expected):
        """Perplexity of the saved merged model reloaded in a fresh process (its own config.json
        flips, seed as trained, streams from call 0), against the in-process value of the same
        seed (the model loaded clean, the original fault model applied)."""
        blocks_path = os.path.join(self.out, "eval_blocks.pt")
        torch.save(blocks, blocks_path)
        dtype = str(self.dtype).replace("torch.", "")
        proc = subprocess.run(
            [sys.executable, "-c", RELOAD_SNIPPET, path, blocks_path, dtype, self.device],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the reload check failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        return {**got, "in_process": expected, "equal": got["perplexity"] == expected}

    # ------------------------------------------------------------------ the study

    def run(self):
        a = self.args
        try:
            self._run()
        except OutOfTime as e:
            print(f"--max_minutes {a.max_minutes} reached before stage {e}; run again to go on")
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(self.markdown())
        print(self.markdown())
        return self.results

    def _run(self):
        a = self.args
        model, tok = self.load(a.model)
        eval_blocks = self.blocks(a.validation_file, a.eval_blocks, tok)
        self.results["eval_tokens"] = eval_blocks.numel() - eval_blocks.size(0)
        self.results["settings"] = vars(a)
        self.results["num_parameters"] = data.count_parameters(model)

        def calibration():
            blocks = self.blocks(a.train_file, a.calibration_blocks, tok)
            cfg = calibrate_zero_out(
                model, blocks, margin=a.calibration_margin, base=self.flips,
                batch_size=a.eval_batch_size,
            )  # fmt: skip
            return {"config": cfg.to_dict()}

        cal = self.stage("calibration", calibration)
        self.calibrated = BitflipConfig.from_dict(cal["config"])

        def attribution():
            report = attribute(
                model, eval_blocks, self.flips, seeds=ints(a.seeds),
                calibrated=self.calibrated, batch_size=a.eval_batch_size,
            )  # fmt: skip
            report["markdown"] = attribution_markdown(report, top=12)
            return report

        self.stage("attribution", attribution)
        model = None  # free it before the LoRA runs
        lora_path = None
        if not a.skip_lora:
            texts = [json.loads(line)["text"] for line in open(a.validation_file)][:50]
            self.chars_per_token = sum(map(len, texts)) / sum(
                len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]
            )
            self.args.lora_tokens_per_param = a.lora_tokens_per_param
            self.lora_data = self.lora_train_file(self.results["num_parameters"])
            self.run_loras({k: v for k, v in self.lora_runs().items() if k not in self.results})
            lora_path = self.results.get("lora_r32_s0", {}).get("path")
        models = {"base": a.model}
        models.update({k: v["path"] for k, v in self.results.items() if k.startswith("lora_")})
        for name, path in models.items():
            self.stage(f"eval_{name}", lambda path=path: self.evaluate(path, eval_blocks))
        self.stage("generation", lambda: self.generation(lora_path))
        if lora_path:
            seed = int(self.results["lora_r32_s0"]["argv"][
                self.results["lora_r32_s0"]["argv"].index("--bitflip_seed") + 1])  # fmt: skip
            expected = self.results["eval_lora_r32_s0"]["original"]["per_seed"]
            expected = expected.get(seed, expected.get(str(seed)))
            self.stage("reload_check", lambda: self.reload_check(lora_path, eval_blocks, expected))
        if self.failed:
            raise SystemExit(f"LoRA runs failed twice: {sorted(self.failed)}")

    def markdown(self) -> str:
        R, a = self.results, self.args
        lines = [
            f"device: {R.get('device')}; model {a.model} ({R.get('num_parameters', 0):,} "
            f"parameters); evaluation on {R.get('eval_tokens', 0):,} predicted tokens of "
            f"{a.validation_file}, blocks of {a.block_size}, dtype {self.dtype}",
            "",
        ]
        if "attribution" in R:
            lines += ["## What the damage is made of", "", R["attribution"]["markdown"], ""]
        e = {k[5:]: v for k, v in R.items() if k.startswith("eval_") and isinstance(v, dict)}
        if e:
            names = {
                "base": "pretrained model, no LoRA",
                "lora_r32_more": f"bit-flip-aware LoRA r=32, {a.more_factor:g}x the tokens",
                "lora_r32_noflips": "LoRA r=32 trained *without* flips or zero-out",
                "lora_r32_zeroout_only": "LoRA r=32 trained with the zero-out only (p = 0)",
                "lora_r32_calibrated": "bit-flip-aware LoRA r=32, calibrated thresholds",
            }
            for s in ints(a.lora_seeds):
                names[f"lora_r32_s{s}"] = f"bit-flip-aware LoRA r=32 (flip seed {s})"
            for r in ints(a.ranks):
                names[f"lora_r{r}_s0"] = f"bit-flip-aware LoRA r={r}"
            lines += [
                "## The original's table, and past it",
                "",
                "Perplexity, mean ± sd over evaluation flip seeds "
                f"{a.seeds}; 'original' = x and W at p = 2^-16, zero-out 30 / 1.25; "
                "'calibrated' = the same flips with thresholds 2x each layer's own maxima.",
                "",
                "| model | train tokens | clean | under the original fault model | "
                "under flips + calibrated zero-out |",
                "|---|---:|---:|---:|---:|",
            ]
            for k, label in names.items():
                if k not in e:
                    continue
                tokens = R.get(k, {}).get("train_tokens")
                lines.append(
                    f"| {label} | {'-' if tokens is None else f'{tokens:,}'} | "
                    f"{e[k]['clean']:.2f} | {fmt(e[k]['original']['mean'], e[k]['original']['sd'])}"
                    f" | {fmt(e[k]['calibrated']['mean'], e[k]['calibrated']['sd'])} |"
                )
            seeds = [e[f"lora_r32_s{s}"] for s in ints(a.lora_seeds) if f"lora_r32_s{s}" in e]
            if len(seeds) > 1:
                m, sd = mean_sd(x["original"]["mean"] for x in seeds)
                lines += ["", f"Over LoRA flip seeds {a.lora_seeds}: {fmt(m, sd)} under the "
                          "original fault model."]  # fmt: skip
            lines.append("")
        if "generation" in R:
            g = R["generation"]
            lines += ["## Generation (greedy)", "", f"Prompt: {g['prompt']!r}", ""]
            for label, text in g["texts"].items():
                lines.append(f"- **{label}**: {text.strip()!r}")
            lines.append("")
        if "reload_check" in R:
            c = R["reload_check"]
            lines += [
                "## Merged, saved, reloaded in a fresh process",
                "",
                f"AutoModelForCausalLM.from_pretrained of the merged LoRA (flip seed {c['seed']}, "
                f"{c['bitflip_layers']} bit-flip layers): perplexity {c['perplexity']:.4f}, in "
                f"process {c['in_process']:.4f}: equal = {c['equal']}",
                "",
            ]
        for name, tail in self.failed.items():
            lines += [f"LoRA run {name} FAILED twice; end of its log:", "```", tail, "```", ""]
        return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return RealModelStudy(args).run()


if __name__ == "__main__":
    main()
