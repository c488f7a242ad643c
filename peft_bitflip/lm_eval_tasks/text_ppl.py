"""Documents and metrics of the ``bitflip_text_ppl`` lm-eval task (offline perplexity)."""

from __future__ import annotations

import os
import re


def _read_documents(path: str, sample_by: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if sample_by == "document":
        docs = [text]
    elif sample_by == "paragraph":
        docs = re.split(r"\n\s*\n", text)
    else:
        raise ValueError(f"sample_by must be 'document' or 'paragraph', got {sample_by!r}")
    return [d.strip() for d in docs if d.strip()]


def load_documents(data_files=None, sample_by: str = "paragraph", max_documents=None, **_):
    """The task's ``DatasetDict`` with one ``test`` split of ``{"text": ...}`` documents.

    ``data_files``: a path or list of paths to UTF-8 text files (absolute, or relative to the
    working directory); each file is split into documents at blank lines
    (``sample_by="paragraph"``) or kept whole (``"document"``).  Without files: the validation
    split of :func:`peft_bitflip.data.local_corpus` (Python's own documentation).
    ``max_documents`` keeps the first N documents.  Other metadata keys are ignored.
    """
    import datasets

    if data_files:
        paths = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        docs = [d for p in paths for d in _read_documents(os.fspath(p), sample_by)]
    else:
        from peft_bitflip.data import local_corpus

        docs = list(local_corpus()["validation"]["text"])
    if max_documents is not None:
        docs = docs[: int(max_documents)]
    if not docs:
        raise ValueError(f"no documents found in data_files={data_files!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": docs})})


def process_results(doc, results):
    """Word / byte perplexity and bits per byte, counted on the document text (as wikitext)."""
    (loglikelihood,) = results
    text = doc["text"]
    n_words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
