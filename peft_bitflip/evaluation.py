"""Evaluation of models with and without flips: perplexity, lm-eval, generation, sweeps.

* :func:`load_model` -- a checkpoint with its own flips (config.json), other flips, or clean.
* :func:`perplexity` -- ``exp`` of the mean next-token loss over fixed-length blocks (every
  predicted token weighs the same), computed directly from the model's loss.
* :func:`lm_eval_results` -- lm-eval-harness ``simple_evaluate`` on a model object (the
  ``bitflip_text_ppl`` offline task is on the task path).
* :func:`generate_text` -- sampling under flips with the original's options.
* :func:`sweep` -- perplexity over a grid of error rates and seeds, resumable through its CSV.
* :func:`compare_table` -- the seed's clean / flipped / flipped + fine-tuned table.

Flips are on in train and eval mode alike; each evaluation starts the streams at call 0, so
the same seed gives the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .config import BURST_KEYS, P_BITS_KEYS, STUCK_KEYS, BitflipConfig
from .layers import bitflip_layers

__all__ = [
    "KEEP",
    "SweepPoint",
    "check_causal_lm",
    "check_model_source",
    "checkpoint_bitflip_config",
    "compare_table",
    "flip_config_for",
    "format_perplexity",
    "generate_text",
    "lm_eval_results",
    "load_model",
    "perplexity",
    "plot_sweep",
    "reset_streams",
    "summarize_sweep",
    "sweep",
    "sweep_grid",
    "with_probabilities",
]

KEEP = "checkpoint"
"""``load_model(..., bitflip=KEEP)``: use the flips recorded in the checkpoint's config.json."""


def load_model(
    name_or_path: str,
    bitflip: BitflipConfig | str | None = KEEP,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs,
):
    """``(model, tokenizer)`` of a causal LM checkpoint.

    ``bitflip``: :data:`KEEP` (the flips config.json records, if any), a :class:`BitflipConfig`
    (replaces them) or ``None`` (clean, even if config.json records flips).  Streams start at
    call 0.  ``kwargs`` go to ``from_pretrained``.  A missing local folder, a PEFT adapter
    folder and a model that is not a causal LM (an encoder such as BERT, an encoder-decoder)
    raise an error naming the path before anything is loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf_quantizer import load_config_with

    check_model_source(name_or_path)
    if bitflip != KEEP:
        if bitflip is not None and not isinstance(bitflip, BitflipConfig):
            raise TypeError(
                f"bitflip must be {KEEP!r}, None or a BitflipConfig, got {type(bitflip).__name__}"
            )
        kwargs["config"] = load_config_with(name_or_path, bitflip)
    check_causal_lm(kwargs.get("config") or AutoConfig.from_pretrained(name_or_path), name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    model.to(device).eval()
    reset_streams(model)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def check_model_source(name_or_path) -> None:
    """Raise an error naming ``name_or_path`` when it cannot be a checkpoint: a local path
    that does not exist, a file, a folder without ``config.json`` (a PEFT adapter folder
    gets its own message).  Hub ids (``name`` or ``org/name``) pass."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            raise ValueError(
                f"{path} is a PEFT adapter folder (adapter_config.json, no config.json): load it "
                "with PeftModel.from_pretrained(base_model, path), merge_and_unload() it, "
                "save_pretrained the merged model and pass that folder"
            )
        raise FileNotFoundError(f"{path} has no config.json: it is not a model checkpoint folder")
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the checkpoint folder")
    local = path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1
    if local or "\\" in path or path in ("", ".", ".."):
        raise FileNotFoundError(f"model path {path!r} does not exist")


def check_causal_lm(config, name: str = "the model") -> None:
    """Raise ``ValueError`` unless ``config`` describes a causal (decoder-only) language model.

    Encoders (BERT, RoBERTa, MiniLM, ... unless configured ``is_decoder=True``) and
    encoder-decoders would run through ``AutoModelForCausalLM`` and give meaningless
    perplexities and text; the model-agnostic parts (``apply_bitflip``, save / reload, the
    PEFT tuner) work on them."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = "an encoder-decoder"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = f"model type {model_type!r} has no causal-LM head in transformers"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    ):
        why = f"an encoder ({model_type}, is_decoder=False)"
    if why:
        raise ValueError(
            f"{name} is {why}, not a causal language model: perplexity, generation and sweeps "
            "need a decoder-only LM (apply_bitflip, save/reload and BitflipLoraConfig work on "
            "any model in Python)"
        )


def checkpoint_bitflip_config(name_or_path) -> BitflipConfig | None:
    """The :class:`BitflipConfig` a checkpoint's ``config.json`` records, or ``None``."""
    from transformers import AutoConfig

    qc = getattr(AutoConfig.from_pretrained(name_or_path), "quantization_config", None)
    if isinstance(qc, BitflipConfig):
        return qc
    if isinstance(qc, dict) and qc.get("quant_method") == "bitflip":
        return BitflipConfig.from_dict(qc)
    return None


def reset_streams(model: torch.nn.Module) -> None:
    """Set every bit-flip layer's call counter to 0 (the next forward draws call 0)."""
    for _, layer in bitflip_layers(model):
        layer.bitflip_calls.zero_()
        layer._pending_calls.clear()


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    blocks,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of ``model`` on equal-length token ``blocks``.

    ``blocks``: rows with ``input_ids`` (a ``datasets.Dataset`` from
    :func:`~peft_bitflip.data.tokenize_and_group`, a list of lists or a 2-D tensor); the first
    ``max_batches`` batches of ``batch_size`` rows are used (``None``: all).  Returns

    * ``loss``: mean next-token cross-entropy (nats) over every predicted token, ``perplexity``:
      ``exp(loss)``, ``tokens``, ``batches``;
    * ``nonfinite_batches``: batches whose loss was NaN or Inf (flips can make logits
      non-finite); when there is any, ``diverged`` is true, ``perplexity`` is ``inf``,
      ``loss`` is the mean over the batches that stayed finite (``nan`` if none did) and
      ``reason`` says why in one line (see :func:`~peft_bitflip.diagnosis.nonfinite_reason`).
    """
    from .diagnosis import nonfinite_reason

    token_batches = batches_of(blocks, batch_size, max_batches)
    n_batches = len(token_batches)
    device = next(model.parameters()).device
    total, tokens, finite_tokens, nonfinite = 0.0, 0, 0, 0
    if progress:
        from tqdm.auto import tqdm

        token_batches = tqdm(token_batches, desc="perplexity", leave=False)
    for batch in token_batches:
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss.float().item()
        n = batch.size(0) * (batch.size(1) - 1)
        tokens += n
        if math.isfinite(loss):
            total += loss * n
            finite_tokens += n
        else:
            nonfinite += 1
    loss = total / finite_tokens if finite_tokens else math.nan
    out = {
        "loss": loss,
        "perplexity": _exp(loss) if not nonfinite else math.inf,
        "tokens": tokens,
        "batches": n_batches,
        "nonfinite_batches": nonfinite,
        "diverged": nonfinite > 0,
        "reason": nonfinite_reason(model) if nonfinite else None,
    }
    return out


def _exp(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def batches_of(blocks, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """The first ``max_batches`` (``None``: all) batches of ``batch_size`` rows of ``blocks``
    (token ids: see :func:`perplexity`); the last batch may be smaller."""
    ids = _block_tensor(blocks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None (all) or >= 1, got {max_batches}")
    n = math.ceil(ids.size(0) / batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    return [ids[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def _block_tensor(blocks) -> torch.Tensor:
    """``blocks`` (a ``datasets.Dataset``, a 2-D tensor or a list of lists) as a 2-D tensor."""
    if isinstance(blocks, torch.Tensor):
        ids = blocks
    elif hasattr(blocks, "column_names"):  # a datasets.Dataset
        ids = torch.tensor(blocks["input_ids"][:])
    else:
        ids = torch.tensor(list(blocks))
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"blocks must be (n, length >= 2) token ids, got shape {tuple(ids.shape)}")
    if ids.size(0) == 0:
        raise ValueError("blocks is empty: no token block to evaluate")
    return ids


def format_perplexity(result: dict, digits: int = 2) -> str:
    """``"38.53"``, or ``"diverged (3/4 batches non-finite)"`` for a :func:`perplexity` result."""
    if result.get("nonfinite_batches"):
        return f"diverged ({result['nonfinite_batches']}/{result['batches']} batches non-finite)"
    return f"{result['perplexity']:.{digits}f}"


def lm_eval_results(
    model,
    tokenizer,
    tasks: Sequence[str] = ("wikitext",),
    *,
    batch_size: int = 8,
    limit: float | None = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    metadata: dict | None = None,
) -> dict:
    """lm-eval-harness ``simple_evaluate`` of a model object; returns its results dict.

    The ``bitflip_text_ppl`` task (offline perplexity on local text, see
    ``peft_bitflip/lm_eval_tasks``) is on the task path; ``metadata`` reaches task loaders
    (e.g. ``{"data_files": [...], "max_documents": 100}``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .lm_eval_tasks import TASK_DIR

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = TaskManager(include_path=TASK_DIR, metadata=metadata)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        metadata=metadata,
        batch_size=batch_size,  # recorded in results["config"] (the model is built already)
        device=str(lm.device),
    )
    results.pop("samples", None)
    results.setdefault("config", {})["max_length"] = lm.max_length
    return results


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 0.9,
    seed: int = 0,
) -> str:
    """The model's continuation of ``prompt`` (the response only), sampled under flips.

    ``seed`` seeds torch's sampler; the flips follow the model's own streams.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError(
            f"the prompt {prompt!r} gives no tokens (this tokenizer adds no BOS token): "
            "give a prompt with some text"
        )
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if tokenizer.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


TARGETS = ("x", "w", "both")
FIELDS = ("exp", "frac", "both")
P_KEYS = ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")


def flip_config_for(
    p: float,
    target: str = "both",
    field: str = "both",
    *,
    seed: int = 0,
    x_zero_out_t: float | None = 30.0,
    w_zero_out_t: float | None = 1.25,
    skip_modules: Sequence[str] = ("lm_head",),
    zero_out: BitflipConfig | None = None,
) -> BitflipConfig:
    """A :class:`BitflipConfig` flipping with probability ``p`` the ``field`` bits
    (``exp`` = sign and exponent, ``frac`` = mantissa, or ``both``) of the ``target`` tensors
    (``x`` = layer inputs, ``w`` = weights, or ``both``); thresholds as the original's.

    ``zero_out``: take the zero-out thresholds (per module, e.g. from
    :func:`~peft_bitflip.calibration.calibrate_zero_out`), the modules it wraps and its skip
    list from this config instead of ``x_zero_out_t`` / ``w_zero_out_t`` / ``skip_modules``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
    values = {}
    for t in ("x", "w"):
        on = target in (t, "both")
        values[f"{t}_p_exp"] = p if on and field in ("exp", "both") else 0.0
        values[f"{t}_p_frac"] = p if on and field in ("frac", "both") else 0.0
    if zero_out is not None:
        return with_probabilities(zero_out, values, seed=seed)
    return BitflipConfig(
        **values,
        x_zero_out_t=x_zero_out_t,
        w_zero_out_t=w_zero_out_t,
        seed=seed,
        skip_modules=list(skip_modules),
    )


_KEPT_RULE_KEYS = ("x_zero_out_t", "w_zero_out_t") + P_BITS_KEYS + STUCK_KEYS + BURST_KEYS


def with_probabilities(config: BitflipConfig, values: dict, seed: int | None = None):
    """A copy of ``config`` whose four flip probabilities are ``values`` (keys of
    ``x_p_exp`` ... ``w_p_frac``) for every module, keeping its zero-out thresholds, per-bit-
    position rates, stuck-at and burst settings (per-module rules too), wrapped modules and
    skip list; ``seed`` replaces its seed if given.  Per-bit-position rates override the swept
    group probabilities at their positions, so a warning names them."""
    d = config.to_dict()
    d.update(values)
    if seed is not None:
        d["seed"] = seed
    rules = d["layer_name_to_config"] or []
    p_bits = {k: d[k] for k in P_BITS_KEYS if d.get(k)}
    p_bits.update(
        {f"{pattern}: {k}": rule[k] for pattern, rule in rules if rule for k in P_BITS_KEYS
         if rule.get(k)}
    )  # fmt: skip
    if p_bits:
        warnings.warn(
            f"the sweep sets the group flip probabilities; the per-bit-position rates {p_bits} "
            "keep their own values at their positions",
            stacklevel=2,
        )
    if d["layer_name_to_config"] is not None:
        d["layer_name_to_config"] = [
            [pattern, None if rule is None else {k: v for k, v in rule.items() if k in
                                                  _KEPT_RULE_KEYS}]
            for pattern, rule in d["layer_name_to_config"]
        ]  # fmt: skip
    return BitflipConfig.from_dict(d)


@dataclass(frozen=True)
class SweepPoint:
    """One sweep measurement: error rate, what was flipped, seed and the result.

    ``perplexity`` is ``inf`` when any batch gave a non-finite loss (``nonfinite_batches`` of
    ``batches``); ``loss`` is then the mean over the finite batches (``nan`` if none).
    """

    p: float
    target: str
    field: str
    seed: int
    loss: float
    perplexity: float
    nonfinite_batches: int = 0
    batches: int = 0

    @property
    def key(self) -> tuple:
        return (float(self.p), self.target, self.field, int(self.seed))

    @property
    def diverged(self) -> bool:
        return self.nonfinite_batches > 0


SWEEP_COLUMNS = [
    "p", "target", "field", "seed", "loss", "perplexity", "nonfinite_batches", "batches",
]  # fmt: skip
SETTINGS_FILE = "sweep_settings.json"


def _unique(values, name: str, convert) -> list:
    """``values`` converted, duplicates removed (first kept), order kept; empty is an error."""
    out = []
    for v in values:
        v = convert(v)
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"the sweep needs at least one {name}")
    return out


def _seed(value) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seeds must be ints, got {value!r}")
    if not 0 <= int(value) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {value!r}")
    return int(value)


def sweep_grid(p_values, targets, fields, seeds) -> list[tuple]:
    """The (p, target, field, seed) points of a sweep, duplicates removed (``1e-3`` and
    ``0.001`` are one p; a seed given twice is one seed), validated before anything runs."""
    ps = _unique(p_values, "p", lambda v: float(v))
    ts = _unique(targets, "target", str)
    fs = _unique(fields, "field", str)
    ss = _unique(seeds, "seed", _seed)
    grid = [(p, t, f, s) for p in ps for t in ts for f in fs for s in ss]
    for p, t, f, _ in grid:
        flip_config_for(p, t, f)  # raises naming a bad p, target or field
    return grid


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's parameters (names, shapes, dtypes and up to 4096 evenly
    strided values of each): different models or weights give different fingerprints."""
    import hashlib

    h = hashlib.sha256()
    for name, param in model.named_parameters():
        t = param.detach().reshape(-1)
        step = max(1, t.numel() // 4096)
        sample = t[::step].float().cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def tokens_fingerprint(ids: torch.Tensor) -> str:
    """A short hash of a 2-D token tensor (its shape and every id)."""
    import hashlib

    ids = ids.to(torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(ids.shape)}".encode() + ids.numpy().tobytes()).hexdigest()[:16]


def read_csv_rows(path: str, columns: list[str], parse) -> list:
    """The complete rows of a CSV written by :func:`write_csv_atomic`, each passed through
    ``parse(fields)`` (which raises ``ValueError`` for a bad row).  Rows cut short (a killed
    write of an older version) or unparsable are dropped with a warning, so they are measured
    again; a header other than ``columns`` raises ``ValueError``."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return []
    lines = text.splitlines(keepends=True)
    header = next(csv.reader([lines[0]]))
    if header != columns:
        raise ValueError(
            f"{path} is not a CSV of this kind and version (columns {header}, expected "
            f"{columns}); use another output folder or delete it"
        )
    rows, bad = [], []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            if not line.endswith("\n"):
                raise ValueError("no line end (cut short)")
            r = next(csv.reader([line]))
            if len(r) != len(columns):
                raise ValueError(f"{len(r)} columns")
            row = parse(r)
        except (ValueError, IndexError) as e:
            bad.append(f"line {i} ({e})")
            continue
        rows.append(row)
    if bad:
        warnings.warn(
            f"{path}: ignoring {len(bad)} incomplete row(s), measured again: {', '.join(bad)}",
            UserWarning,
            stacklevel=3,
        )
    return rows


def write_csv_atomic(path: str, columns: list[str], rows: Iterable[Sequence]) -> None:
    """Write ``columns`` and every row to ``path`` atomically (a temporary file, then
    ``os.replace``): a killed process leaves either the old or the new file, never a torn row."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse_sweep_row(r: list[str]) -> SweepPoint:
    point = SweepPoint(
        float(r[0]), r[1], r[2], int(r[3]), float(r[4]), float(r[5]), int(r[6]), int(r[7])
    )
    if point.target not in TARGETS or point.field not in FIELDS:
        raise ValueError("unknown target or field")
    return point


def _read_sweep_csv(path: str) -> list[SweepPoint]:
    """The complete rows of a sweep CSV (see :func:`read_csv_rows`)."""
    return read_csv_rows(path, SWEEP_COLUMNS, _parse_sweep_row)


def _write_sweep_csv(path: str, points: Iterable[SweepPoint]) -> None:
    """Write every point to ``path`` atomically (see :func:`write_csv_atomic`)."""
    rows = (
        [pt.p, pt.target, pt.field, pt.seed, pt.loss, pt.perplexity, pt.nonfinite_batches,
         pt.batches]
        for pt in points
    )  # fmt: skip
    write_csv_atomic(path, SWEEP_COLUMNS, rows)


def check_settings(
    csv_path: str, settings: dict, has_rows: bool, settings_file: str = SETTINGS_FILE
) -> None:
    """Record ``settings`` in ``settings_file`` next to ``csv_path``, or, when the CSV already
    holds rows (``has_rows``), refuse to add to it if they were measured under other settings
    (naming each difference)."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    spath = os.path.join(folder, settings_file)
    settings = json.loads(json.dumps(settings))  # the JSON form, as stored
    if os.path.exists(spath):
        with open(spath, encoding="utf-8") as f:
            old = json.load(f)
        if has_rows and old != settings:
            diff = [
                f"{k}: {old.get(k)!r} in the folder, {settings.get(k)!r} now"
                for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)
            ]
            raise ValueError(
                f"{csv_path} holds points measured under other settings ({'; '.join(diff)}); "
                "use another output folder, or delete it to start over"
            )
    elif has_rows:
        raise ValueError(
            f"{csv_path} holds points but no {settings_file} that says how they were measured "
            "(an older version wrote it); use another output folder, or delete it"
        )
    os.makedirs(folder, exist_ok=True)
    with open(spath, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_settings(csv_path: str, settings: dict) -> None:
    """:func:`check_settings` for a sweep CSV."""
    has_rows = bool(_read_sweep_csv(csv_path)) if os.path.exists(csv_path) else False
    check_settings(csv_path, settings, has_rows)


def sweep(
    model,
    blocks,
    p_values: Iterable[float],
    *,
    targets: Sequence[str] = ("both",),
    fields: Sequence[str] = ("both",),
    seeds: Sequence[int] = (0, 1, 2),
    x_zero_out_t: float | None = 30.0,
    w_zero_out_t: float | None = 1.25,
    zero_out: BitflipConfig | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    csv_path: str | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> list[SweepPoint]:
    """Perplexity of ``model`` for every (p, target, field, seed) of the grid.

    The grid is de-duplicated and validated before the first measurement.  The model's
    bit-flip settings are replaced for each point (``apply_bitflip``, streams reset to call 0)
    and removed at the end.  ``zero_out``: per-module thresholds (see :func:`flip_config_for`)
    instead of ``x_zero_out_t`` / ``w_zero_out_t``.

    With ``csv_path`` the CSV is rewritten atomically after every point and points already in
    it are skipped, so an interrupted sweep resumes where it stopped.  Everything that changes
    a number (a fingerprint of the model's weights and of the token blocks, thresholds, batch
    size, number of batches, dtype, plus the caller's ``settings``, e.g. the model path and
    data file) is stored in ``sweep_settings.json`` beside it; resuming under other settings
    raises ``ValueError`` naming the differences.  p = 0 is measured once per seed.
    """
    from .transform import apply_bitflip, remove_bitflip

    grid = sweep_grid(p_values, targets, fields, seeds)
    ids = _block_tensor(blocks)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None (all) or >= 1, got {max_batches}")
    done: dict[tuple, SweepPoint] = {}
    if csv_path:
        remove_bitflip(model)
        param = next(model.parameters())
        record = {
            **(settings or {}),
            "model_fingerprint": model_fingerprint(model),
            "tokens_fingerprint": tokens_fingerprint(ids),
            "dtype": str(param.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "max_batches": max_batches,
            "x_zero_out_t": None if zero_out is not None else x_zero_out_t,
            "w_zero_out_t": None if zero_out is not None else w_zero_out_t,
            "zero_out_config": None if zero_out is None else zero_out.to_dict(),
        }
        _check_settings(csv_path, record)
        existing = _read_sweep_csv(csv_path)
        done = {pt.key: pt for pt in existing}
        _write_sweep_csv(csv_path, existing)  # drops torn rows, writes the header
    todo = [g for g in grid if g not in done]
    iterator = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            todo, desc="sweep", unit="point", initial=len(grid) - len(todo), total=len(grid)
        )
    try:
        for p, t, f, s in iterator:
            cfg = flip_config_for(
                p, t, f, seed=s, x_zero_out_t=x_zero_out_t, w_zero_out_t=w_zero_out_t,
                zero_out=zero_out,
            )  # fmt: skip
            with warnings.catch_warnings():  # a grid without zero-out is asked for: the plot
                warnings.filterwarnings("ignore", message="exponent flips without")  # says so
                apply_bitflip(model, cfg)
            reset_streams(model)
            r = perplexity(model, ids, batch_size=batch_size, max_batches=max_batches)
            point = SweepPoint(
                p, t, f, s, r["loss"], r["perplexity"], r["nonfinite_batches"], r["batches"]
            )
            done[point.key] = point
            if csv_path:
                _write_sweep_csv(csv_path, done.values())
    finally:
        remove_bitflip(model)
    return [done[g] for g in grid]


def summarize_sweep(points: Iterable[SweepPoint]) -> list[dict]:
    """Mean and spread over seeds: one row per (p, target, field), sorted by p.

    ``ppl_mean`` / ``ppl_std`` (sample standard deviation, 0 for one seed) are over the
    seeds' perplexities (``seeds``: their number, ``flip_seeds``: which), ``ppl_min`` /
    ``ppl_max`` their range; a seed that diverged counts as
    ``inf`` (so does the mean).  ``diverged``: seeds with any non-finite batch;
    ``nonfinite_share``: non-finite batches / batches over all seeds.
    """
    groups: dict[tuple, list[SweepPoint]] = {}
    for pt in points:
        groups.setdefault((pt.p, pt.target, pt.field), []).append(pt)
    rows = []
    for (p, t, f), pts in sorted(groups.items()):
        ppl = [pt.perplexity for pt in pts]
        finite = all(math.isfinite(v) for v in ppl)
        batches = sum(pt.batches for pt in pts)
        rows.append(
            {
                "p": p,
                "target": t,
                "field": f,
                "seeds": len(pts),
                "flip_seeds": sorted(pt.seed for pt in pts),
                "ppl_mean": statistics.fmean(ppl) if finite else math.inf,
                "ppl_std": statistics.stdev(ppl) if finite and len(ppl) > 1 else 0.0,
                "ppl_min": min(ppl),
                "ppl_max": max(ppl),
                "diverged": sum(pt.diverged for pt in pts),
                "nonfinite_share": (
                    sum(pt.nonfinite_batches for pt in pts) / batches if batches else 0.0
                ),
            }
        )
    return rows


def plot_sweep(
    rows: list[dict], path: str, title: str = "perplexity vs bit-error rate", note: str = ""
) -> None:
    """A PNG of mean perplexity (error bars: min..max over seeds) against p (log axes), and
    below it the share of batches whose loss was not finite.

    One line per (``model``, target, field); rows without a ``"model"`` key are one model.
    A point where any seed diverged (non-finite loss) cannot sit on the perplexity axis: it is
    drawn as an ``x`` at the top edge, labelled "diverged", and its share shows below.  p = 0
    cannot sit on a log axis: it is drawn as a dashed horizontal line per series.  ``note``: a
    line under the title (e.g. the reason for divergence).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms

    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]}
    )
    top_edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r.get("model"), r["target"], r["field"]), []).append(r)
    any_finite = any_diverged = False
    for (model, t, f), rs in series.items():
        label = "x+w" if t == "both" else t
        label += "" if f == "both" else f" ({f})"
        if model is not None:
            label = f"{model}: {label}"
        pos = [r for r in rs if r["p"] > 0]
        fin = [r for r in pos if math.isfinite(r["ppl_mean"])]
        color = None
        if fin:
            any_finite = True
            xs = [r["p"] for r in fin]
            ys = [r["ppl_mean"] for r in fin]
            err = [
                [y - r["ppl_min"] for y, r in zip(ys, fin)],
                [r["ppl_max"] - y for y, r in zip(ys, fin)],
            ]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            color = line[0].get_color()
        div = [r for r in pos if not math.isfinite(r["ppl_mean"])]
        if div:
            any_diverged = True
            mk = ax.plot(
                [r["p"] for r in div], [0.96] * len(div), "x", color=color, markersize=9,
                mew=2, transform=top_edge, clip_on=False,
                label=f"{label}: diverged" if fin else f"{label}: diverged (every p > 0)",
            )  # fmt: skip
            color = color or mk[0].get_color()
        if pos:
            ax2.plot(
                [r["p"] for r in pos],
                [r.get("nonfinite_share", 0.0) for r in pos],
                marker="o", color=color, label=label,
            )  # fmt: skip
        for r in rs:
            if r["p"] == 0 and math.isfinite(r["ppl_mean"]):
                any_finite = True
                ax.axhline(r["ppl_mean"], linestyle="--", color=color, label=f"{label}, p = 0")
    ax.set_xscale("log")
    if any_finite:
        ax.set_yscale("log")
    else:
        ax.set_yticks([])
    ax.set_ylabel("perplexity")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9 if note else None)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("non-finite\nbatches")
    ax2.set_xlabel("bit flip probability p")
    ax2.grid(True, which="both", alpha=0.3)
    if any_diverged:
        ax2.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``rows`` (``{"setting", "model", "flips", "ppl_mean", "ppl_std",
    "seeds"}``, optionally ``"diverged"``: seeds with a non-finite loss), the layout of the
    original's clean / flipped / fine-tuned table."""
    lines = [
        "| setting | model | flips | perplexity (mean ± sd) | seeds |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['model']} | {r['flips']} | {format_mean(r)} | {r['seeds']} |"
        )
    return "\n".join(lines)


def format_mean(row: dict) -> str:
    """``"38.53 ± 0.21"`` / ``"38.53"`` (one seed), or ``"diverged (2/3 seeds)"``."""
    if row.get("diverged"):
        return f"diverged ({row['diverged']}/{row['seeds']} seeds)"
    if row["seeds"] > 1:
        return f"{row['ppl_mean']:.2f} ± {row['ppl_std']:.2f}"
    return f"{row['ppl_mean']:.2f}"
