"""Offline data utilities shared by the recipes (fine-tuning, pretraining, evaluation).

* :func:`local_corpus` -- a text corpus present on every machine: the documentation topics
  that ship with Python (``pydoc_data.topics``), split deterministically into train and
  validation documents.  It is the default of every recipe, so they run without network.
* :func:`load_raw_datasets` / :func:`load_text_datasets` -- a Hub dataset by name, local
  ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` files, or the local corpus, always as a
  ``DatasetDict`` with ``train`` and ``validation`` splits.
* :func:`train_tokenizer` -- a byte-level BPE tokenizer trained locally (``tokenizers``),
  wrapped as a ``transformers`` fast tokenizer.
* :func:`tiny_llama_config` -- a tiny Llama configuration for offline runs and tests.
* :func:`tokenize_and_group` -- documents -> fixed blocks of ``block_size`` tokens for causal
  language modelling (``labels == input_ids``; transformers shifts them inside the model).
* :func:`token_budget_steps` -- a token budget (1 % of the parameter count by default, as the
  original LoRA fine-tune) turned into optimizer steps.

Everything here works offline; only :func:`load_raw_datasets` with a ``dataset_name`` needs
the Hub (or a populated ``datasets`` cache).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

__all__ = [
    "LOCAL_CORPUS_NAME",
    "budget_tokens",
    "count_parameters",
    "instruction_corpus",
    "load_raw_datasets",
    "load_text_datasets",
    "local_corpus",
    "local_corpus_documents",
    "pick_text_column",
    "tiny_llama_config",
    "token_budget_steps",
    "tokenize_and_group",
    "tokens_per_step",
    "train_tokenizer",
]

LOCAL_CORPUS_NAME = "pydoc-topics"
"""Name of the embedded corpus: ``pydoc_data.topics`` of the running Python."""
DEFAULT_VALIDATION_FRACTION = 0.1
_SPLIT_SALT = "peft_bitflip.local_corpus"

TEXT_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
}
TXT_SAMPLE_BY = ("paragraph", "document", "line")

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


# ---------------------------------------------------------------------- the local corpus


def _unit_hash(name: str, salt: str = _SPLIT_SALT) -> float:
    """A number in [0, 1) that depends only on ``name`` (SHA-256; not Python's salted hash)."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (exclusive), got {value!r}")
    return value


def local_corpus_documents(
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> dict[str, list[tuple[str, str]]]:
    """The documentation topics of this Python as ``{"train": [(name, text)], "validation": ...}``.

    A topic goes to ``validation`` when the SHA-256 hash of its name, as a number in [0, 1),
    is below ``validation_fraction``: the split is the same on every run and machine (for one
    Python version), the two splits are disjoint, and adding topics does not move others.
    Both splits are non-empty (if no hash falls below the fraction, the topic with the
    smallest hash is moved to validation).  Documents are sorted by topic name.
    """
    from pydoc_data.topics import topics

    fraction = _check_fraction("validation_fraction", validation_fraction)
    items = sorted((name, text) for name, text in topics.items() if text.strip())
    if len(items) < 2:  # pragma: no cover - every CPython ships ~80 topics
        raise RuntimeError("pydoc_data.topics has fewer than two non-empty topics")
    hashes = {name: _unit_hash(name) for name, _ in items}
    val_names = {name for name, h in hashes.items() if h < fraction}
    if not val_names:
        val_names = {min(hashes, key=hashes.get)}
    if len(val_names) == len(items):
        val_names.discard(max(hashes, key=hashes.get))
    return {
        "train": [(n, t) for n, t in items if n not in val_names],
        "validation": [(n, t) for n, t in items if n in val_names],
    }


def local_corpus(validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
    """The embedded offline corpus as a ``DatasetDict`` (``train`` / ``validation``).

    Columns: ``text`` (the topic's documentation, ~1.5k characters median, ~465k characters
    in all for CPython 3.11) and ``topic`` (its name).  See :func:`local_corpus_documents`
    for the split.
    """
    from datasets import Dataset, DatasetDict

    docs = local_corpus_documents(validation_fraction)
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [t for _, t in items], "topic": [n for n, _ in items]}
            )
            for split, items in docs.items()
        }
    )


def _first_paragraph(text: str, max_chars: int) -> str:
    """The first prose paragraph of a pydoc topic (after its title and underline)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    body = [p for p in paragraphs if not set(p.splitlines()[-1]) <= set("*=-")]
    para = (body or paragraphs)[0]
    para = " ".join(para.split())
    if len(para) > max_chars:
        cut = para.rfind(" ", 0, max_chars)
        para = para[: cut if cut > 0 else max_chars] + " ..."
    return para


def instruction_corpus(
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION, max_completion_chars: int = 400
):
    """A small offline instruction data set built from the local corpus (prompt / completion).

    One example per topic: prompt ``"Explain the Python topic '<name>'.\\n"``, completion =
    the topic's first paragraph (whitespace collapsed, at most ``max_completion_chars``
    characters).  Same train / validation split as :func:`local_corpus`.
    """
    from datasets import Dataset, DatasetDict

    if max_completion_chars < 16:
        raise ValueError(f"max_completion_chars must be >= 16, got {max_completion_chars!r}")
    docs = local_corpus_documents(validation_fraction)
    out = {}
    for split, items in docs.items():
        out[split] = Dataset.from_dict(
            {
                "prompt": [f"Explain the Python topic '{n}'.\n" for n, _ in items],
                "completion": [_first_paragraph(t, max_completion_chars) for _, t in items],
            }
        )
    return DatasetDict(out)


# ---------------------------------------------------------------------- loading data sets


def _builder_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TEXT_EXTENSIONS:
        raise ValueError(
            f"unsupported data file extension {ext or '(none)'!r} of {path!r}; "
            f"use one of {sorted(TEXT_EXTENSIONS)}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    return TEXT_EXTENSIONS[ext]


def _split_off_validation(train, percentage: float):
    """(train, validation): the first ``percentage`` % of ``train`` becomes validation (as the
    HF ``run_clm`` examples do with ``train[:p%]`` / ``train[p%:]``)."""
    n = len(train)
    if n < 2:
        raise ValueError(
            f"cannot split a validation set off a training set of {n} example(s); "
            "pass a validation file / split"
        )
    n_val = min(n - 1, max(1, round(n * percentage / 100.0)))
    return train.select(range(n_val, n)), train.select(range(n_val))


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: float = 5,
    txt_sample_by: str = "paragraph",
    keep_linebreaks: bool = True,
    local_validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    **load_kwargs,
):
    """A ``DatasetDict`` with ``train`` and ``validation`` splits, columns as in the source.

    Sources, in order:

    * ``dataset_name`` (+ ``dataset_config_name``): ``datasets.load_dataset`` (Hub or cache;
      ``load_kwargs`` such as ``trust_remote_code`` / ``revision`` are passed on);
    * ``train_file`` (+ ``validation_file``): local ``.txt``/``.text`` (one document per
      blank-line-separated paragraph with ``txt_sample_by="paragraph"``, per file with
      ``"document"``, per line with ``"line"``), ``.json`` / ``.jsonl`` (records with a text
      field) or ``.csv`` files;
    * neither: the embedded :func:`local_corpus` (``local_validation_fraction`` of its topics
      are validation).

    Without a ``validation`` split (no ``validation_file``, or a Hub data set that has none)
    the first ``validation_split_percentage`` % of ``train`` becomes validation and the rest
    stays train.
    """
    from datasets import DatasetDict, load_dataset

    if dataset_name is not None and (train_file or validation_file):
        raise ValueError("give either dataset_name or train_file/validation_file, not both")
    if validation_file and not train_file:
        raise ValueError("validation_file needs a train_file")
    if dataset_name is None and dataset_config_name is not None:
        raise ValueError("dataset_config_name needs a dataset_name")
    pct = validation_split_percentage
    if isinstance(pct, bool) or not isinstance(pct, numbers.Real) or not 0 < pct < 100:
        raise ValueError(f"validation_split_percentage must be in (0, 100), got {pct!r}")

    if dataset_name is None and not train_file:
        return local_corpus(local_validation_fraction)

    if dataset_name is not None:
        try:
            raw = load_dataset(dataset_name, dataset_config_name, **load_kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not load the data set {dataset_name!r} "
                f"(config {dataset_config_name!r}): {e}\nWithout network, pass local files "
                "(--train_file / --validation_file) or leave the data set out to use the "
                "embedded offline corpus."
            ) from e
        if not isinstance(raw, DatasetDict):
            raw = DatasetDict({"train": raw})
    else:
        files = {"train": train_file}
        if validation_file:
            files["validation"] = validation_file
        builders = {split: _builder_for(path) for split, path in files.items()}
        if len(set(builders.values())) != 1:
            raise ValueError(
                f"train_file and validation_file must be of the same kind, got {builders}"
            )
        builder = builders["train"]
        kwargs = dict(load_kwargs)
        if builder == "text":
            if txt_sample_by not in TXT_SAMPLE_BY:
                raise ValueError(
                    f"txt_sample_by must be one of {TXT_SAMPLE_BY}, got {txt_sample_by!r}"
                )
            kwargs.update(sample_by=txt_sample_by, keep_linebreaks=keep_linebreaks)
        raw = load_dataset(builder, data_files=files, **kwargs)

    if "train" not in raw:
        raise ValueError(f"the data set has no 'train' split (splits: {list(raw)})")
    if "validation" not in raw:
        train, validation = _split_off_validation(raw["train"], pct)
        raw = DatasetDict({"train": train, "validation": validation})
    return DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def pick_text_column(column_names: Sequence[str], text_column: str | None = None) -> str:
    """``text_column`` if given (it must exist), else ``"text"``, else the first column
    (the original fine-tuning script's rule)."""
    names = list(column_names)
    if text_column is not None:
        if text_column not in names:
            raise ValueError(f"text column {text_column!r} not in the data set's columns {names}")
        return text_column
    if "text" in names:
        return "text"
    if not names:
        raise ValueError("the data set has no columns")
    return names[0]


def load_text_datasets(*args, text_column: str | None = None, **kwargs):
    """:func:`load_raw_datasets`, reduced to one string column ``text`` with empty documents
    (whitespace only) removed.  See :func:`pick_text_column` for the column chosen."""
    from datasets import DatasetDict

    raw = load_raw_datasets(*args, **kwargs)
    out = {}
    for split, ds in raw.items():
        col = pick_text_column(ds.column_names, text_column)
        feature = ds.features[col]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(
                f"column {col!r} of split {split!r} is not a string column ({feature}); "
                "name the text column explicitly"
            )
        ds = ds.remove_columns([c for c in ds.column_names if c != col])
        if col != "text":
            ds = ds.rename_column(col, "text")
        ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
        if len(ds) == 0:
            raise ValueError(f"split {split!r} has no non-empty documents")
        out[split] = ds
    return DatasetDict(out)


# ---------------------------------------------------------------------- tokenizer, model


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1024,
):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, id 1), ``<pad>`` (pad, id 2), ``<unk>``
    (id 3, never produced: every byte has a token).  No token is added automatically
    (``tokenizer(text)`` gives only the text's tokens), no prefix space is added, so
    ``decode(encode(text)) == text`` for any string.  ``vocab_size`` counts the special
    tokens and the 256 byte tokens; it is an upper bound (a small corpus may give fewer).
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    n_min = len(specials) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < n_min:
        raise ValueError(f"vocab_size must be >= {n_min} (special + byte tokens), got {vocab_size}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")

    def _iter() -> Iterator[str]:
        n = 0
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
            n += 1
            yield t
        if n == 0:
            raise ValueError("train_tokenizer needs at least one text")

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **kwargs,
):
    """A tiny ``LlamaConfig`` (defaults: hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128,
    256 positions; ~2·64·vocab + 70k parameters) for offline runs and tests.

    Token ids default to :func:`train_tokenizer`'s (bos 0, eos 1, pad 2) when
    ``vocab_size`` is large enough to hold them.  ``kwargs`` go to ``LlamaConfig``.
    """
    from transformers import LlamaConfig

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            "hidden_size must be a multiple of num_attention_heads and num_attention_heads a "
            f"multiple of num_key_value_heads, got {hidden_size}, {num_attention_heads}, "
            f"{num_key_value_heads}"
        )
    return LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0 if bos_token_id is None else bos_token_id,
        eos_token_id=1 if eos_token_id is None else eos_token_id,
        pad_token_id=2 if pad_token_id is None else pad_token_id,
        **kwargs,
    )


# ---------------------------------------------------------------------- blocks


def _tokenize_batch(
    texts: list[str], tokenizer, append_eos: bool, add_special_tokens: bool, prepend_bos=False
):
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)
    ids = enc["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if prepend_bos:
        ids = [x if (x and x[0] == bos) else [bos, *x] for x in ids]
    if append_eos and eos is not None:
        ids = [x if (x and x[-1] == eos) else [*x, eos] for x in ids]
    return {"input_ids": ids}


def _group_batch(batch, block_size: int):
    stream = [t for ids in batch["input_ids"] for t in ids]
    n = (len(stream) // block_size) * block_size
    blocks = [stream[i : i + block_size] for i in range(0, n, block_size)]
    return {
        "input_ids": blocks,
        "attention_mask": [[1] * block_size for _ in blocks],
        "labels": [list(b) for b in blocks],
    }


def tokenize_and_group(
    dataset,
    tokenizer,
    block_size: int,
    *,
    text_column: str = "text",
    append_eos: bool = True,
    add_special_tokens: bool = True,
    prepend_bos: bool = False,
    batch_size: int = 1000,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
):
    """Tokenize documents and cut the token stream into blocks of ``block_size`` tokens.

    Each document is tokenized (with the tokenizer's own special tokens when
    ``add_special_tokens``, e.g. Llama's BOS) and, when ``append_eos``, followed by the EOS
    token.  The documents of each ``datasets.map`` batch of ``batch_size`` documents are
    concatenated and split into consecutive blocks; the remainder (< ``block_size`` tokens)
    of each batch is dropped, as in the HF ``run_clm`` examples.  Rows get ``input_ids``,
    ``attention_mask`` (all ones) and ``labels`` (= ``input_ids``; the model shifts them).

    ``prepend_bos`` starts every document with the BOS token when the tokenizer does not
    already (the original pretraining's ``encode(bos=True, eos=True)``).

    ``dataset`` is a ``Dataset``, an ``IterableDataset`` (streaming: blocks are made lazily,
    ``num_proc`` and the cache do not apply) or a ``DatasetDict`` / ``IterableDatasetDict``
    (each split is processed).  Raises ``ValueError`` if a ``Dataset`` yields no block (too
    little text for ``block_size``).
    """
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True needs a tokenizer with an eos token")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos=True needs a tokenizer with a bos token")
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return type(dataset)(
            {
                split: tokenize_and_group(
                    ds,
                    tokenizer,
                    block_size,
                    text_column=text_column,
                    append_eos=append_eos,
                    add_special_tokens=add_special_tokens,
                    prepend_bos=prepend_bos,
                    batch_size=batch_size,
                    num_proc=num_proc,
                    load_from_cache_file=load_from_cache_file,
                )
                for split, ds in dataset.items()
            }
        )
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"text column {text_column!r} not in the data set's columns {columns}")
    tokenize_kwargs = {
        "tokenizer": tokenizer,
        "append_eos": append_eos,
        "add_special_tokens": add_special_tokens,
        "prepend_bos": prepend_bos,
    }
    if isinstance(dataset, IterableDataset):
        tokenized = dataset.select_columns([text_column]).map(
            _tokenize_batch,
            batched=True,
            batch_size=batch_size,
            remove_columns=[text_column],
            input_columns=[text_column],
            fn_kwargs=tokenize_kwargs,
        )
        return tokenized.map(
            _group_batch,
            batched=True,
            batch_size=batch_size,
            remove_columns=["input_ids"],
            fn_kwargs={"block_size": int(block_size)},
        )
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        input_columns=[text_column],
        fn_kwargs=tokenize_kwargs,
        load_from_cache_file=load_from_cache_file,
        desc="tokenizing",
    )
    blocks = tokenized.map(
        _group_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=tokenized.column_names,
        fn_kwargs={"block_size": int(block_size)},
        load_from_cache_file=load_from_cache_file,
        desc=f"grouping into blocks of {block_size}",
    )
    if len(blocks) == 0:
        n_tokens = sum(len(x) for x in tokenized["input_ids"])
        raise ValueError(
            f"the data set gives no full block of {block_size} tokens ({n_tokens} tokens in "
            f"{len(dataset)} documents); use a smaller block_size or more text"
        )
    return blocks


# ---------------------------------------------------------------------- token budget


def count_parameters(model) -> int:
    """Number of parameters of ``model`` (all of them, trainable or not; shared ones once)."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def budget_tokens(num_params: int, tokens_per_param: float = 0.01) -> int:
    """Token budget ``ceil(num_params x tokens_per_param)`` (tokens), computed exactly in
    decimal (``205120 x 0.01 = 2051.2 -> 2052``), as ``flavors.PretrainPlan`` rounds."""
    n = _positive_int("num_params", num_params)
    tpp = tokens_per_param
    if isinstance(tpp, bool) or not isinstance(tpp, numbers.Real):
        raise TypeError(f"tokens_per_param must be a positive number, got {tpp!r}")
    if not (math.isfinite(tpp) and tpp > 0):
        raise ValueError(f"tokens_per_param must be a positive number, got {tpp!r}")
    return max(1, math.ceil(n * Fraction(repr(float(tpp)))))


def tokens_per_step(
    per_device_batch_size: int,
    block_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
) -> int:
    """Tokens consumed by one optimizer step: sequences per device per micro-batch x block
    size (tokens per sequence) x gradient accumulation steps x number of processes."""
    return (
        _positive_int("per_device_batch_size", per_device_batch_size)
        * _positive_int("block_size", block_size)
        * _positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        * _positive_int("world_size", world_size)
    )


def token_budget_steps(
    *,
    per_device_batch_size: int,
    block_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    num_params: int | None = None,
    tokens_per_param: float = 0.01,
    train_tokens: int | None = None,
    max_train_steps: int | None = None,
) -> int:
    """Number of optimizer steps for a token budget.

    The first of these that is given decides:

    * ``max_train_steps`` (optimizer steps): returned as is;
    * ``train_tokens`` (tokens): ``ceil(train_tokens / tokens_per_step)``;
    * ``num_params`` (parameters) x ``tokens_per_param`` (tokens per parameter; default 0.01,
      i.e. 1 % of the parameter count, the original LoRA fine-tune's budget; from-scratch
      pretraining uses 22): the budget is rounded up to whole tokens (:func:`budget_tokens`),
      then ``ceil(budget / tokens_per_step)``.

    ``tokens_per_step = per_device_batch_size x block_size x gradient_accumulation_steps x
    world_size`` (see :func:`tokens_per_step`).  Unlike the original shell script, gradient
    accumulation is counted, so the run sees the budget (rounded up to a whole step), not a
    multiple of it.  Example: 8e9 parameters, 8 GPUs, batch 1, block 2048, accumulation 2:
    ``ceil(8e7 / 32768) = 2442`` steps (the original ran 4883 steps, twice the budget).
    """
    tps = tokens_per_step(
        per_device_batch_size, block_size, gradient_accumulation_steps, world_size
    )
    if max_train_steps is not None:
        return _positive_int("max_train_steps", max_train_steps)
    if train_tokens is not None:
        budget = _positive_int("train_tokens", train_tokens)
    elif num_params is not None:
        budget = budget_tokens(num_params, tokens_per_param)
    else:
        raise ValueError("token_budget_steps needs max_train_steps, train_tokens or num_params")
    return -(-budget // tps)
