"""Build an English pretraining corpus (JSON lines, one ``{"text": ...}`` document per line)
from text that is already on disk: plain text, reStructuredText, POD, HTML, JSON, and the
same inside ``.gz``, ``.zip`` and ``.tar.gz`` archives.

Used for the offline GPU results (``docs/results.md``), where no Hub data set can be
downloaded.  What it does, in order:

1. every file under the given paths is read (archives are opened member by member);
2. HTML loses its markup (``script`` / ``style`` / navigation dropped), POD its ``=command``
   lines, part-of-speech tagged text (``word/tag``, e.g. the Brown corpus) its tags, JSON keeps
   its string values of >= 200 characters;
3. text is cut into documents of at most ``--max_doc_chars`` characters at blank lines;
4. a document is kept when it has >= ``--min_words`` words, and English stop words make up
   >= ``--min_stopword_fraction`` of them (this drops code listings, tables and other
   languages); exact duplicates (after whitespace normalisation) are dropped;
5. each document goes to validation with probability ``--validation_fraction``, decided by a
   hash of its text, so the split does not depend on file order.

Writes ``train.jsonl``, ``validation.jsonl`` and ``stats.json`` (documents, characters and
words per source and split) to ``--output_dir``::

    python recipes/build_corpus.py --output_dir corpus/en /usr/share/doc/python3.11 ...
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import html.parser
import io
import json
import os
import re
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves""".split()
)
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text", ".pod", ".pm", ".tex")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_TAGGED = re.compile(r"(\S+)/[A-Za-z$*+\-.,:()'`]+\b")


class _HTMLText(html.parser.HTMLParser):
    SKIP = {"script", "style", "nav", "head", "footer", "header"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


def untag(text: str) -> str:
    """``The/at jury/nn said/vbd`` -> ``The jury said`` when most tokens carry a tag."""
    tokens = text.split()
    if tokens and sum(bool(_TAGGED.fullmatch(t)) for t in tokens) > 0.8 * len(tokens):
        return _TAGGED.sub(r"\1", text)
    return text


def strip_pod(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("=")]
    return re.sub(r"[A-Z]<{1,2}\s*([^<>]*?)\s*>{1,2}", r"\1", "\n".join(lines))


def _json_strings(value, min_chars: int = 200) -> Iterator[str]:
    if isinstance(value, str):
        if len(value) >= min_chars:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _json_strings(v, min_chars)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v, min_chars)


def file_texts(name: str, payload: bytes) -> Iterator[str]:
    """The texts of one file (``name`` decides the format; archives are opened)."""
    low = name.lower()
    if low.endswith(".gz") and not low.endswith((".tar.gz", ".tgz")):
        try:
            payload = gzip.decompress(payload)
        except OSError:
            return
        yield from file_texts(name[:-3], payload)
        return
    if low.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield from file_texts(info.filename, z.read(info))
        return
    if low.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(fileobj=io.BytesIO(payload)) as t:
            for member in t.getmembers():
                if member.isfile():
                    yield from file_texts(member.name, t.extractfile(member).read())
        return
    text = payload.decode("utf-8", errors="replace")
    if low.endswith(HTML_SUFFIXES):
        yield html_to_text(text)
    elif low.endswith(".json"):
        try:
            yield from _json_strings(json.loads(text))
        except json.JSONDecodeError:
            return
    elif low.endswith((".pod", ".pm")):
        yield strip_pod(text)
    elif low.endswith(TEXT_SUFFIXES) or "." not in os.path.basename(low):
        if "\x00" not in text:
            yield untag(text)


def documents(text: str, max_chars: int) -> Iterator[str]:
    """``text`` cut at blank lines into pieces of at most ``max_chars`` characters."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        if len(para) > max_chars:  # text without blank lines (one paragraph per line)
            paragraphs.extend(para.split("\n"))
        else:
            paragraphs.append(para)
    paragraphs = [p.strip() for p in paragraphs if p.strip()]
    piece: list[str] = []
    size = 0
    for p in paragraphs:
        if piece and size + len(p) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(p)
        size += len(p) + 2
    if piece:
        yield "\n\n".join(piece)


def english_enough(text: str, min_words: int, min_stopword_fraction: float) -> bool:
    words = _WORD.findall(text)
    if len(words) < min_words:
        return False
    stop = sum(w.lower() in STOPWORDS for w in words)
    return stop >= min_stopword_fraction * len(words)


def unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def iter_files(paths: list[str], exclude: list[str] = ()) -> Iterator[tuple[str, str]]:
    """``(source, file path)`` for every file under ``paths`` (sorted: deterministic) whose
    path matches none of the ``exclude`` glob patterns."""
    for source, path in _walk(paths):
        if not any(fnmatch.fnmatch(path, pattern) for pattern in exclude):
            yield source, path


def _walk(paths: list[str]) -> Iterator[tuple[str, str]]:
    for root in paths:
        if os.path.isfile(root):
            yield root, root
            continue
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such file or directory: {root!r}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in sorted(filenames):
                path = os.path.join(dirpath, f)
                if os.path.isfile(path):  # broken links are left out
                    yield root, path


def build(args) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    seen: set[bytes] = set()
    stats: dict = {"sources": {}, "splits": {"train": Counter(), "validation": Counter()}}
    outs = {
        split: open(os.path.join(args.output_dir, f"{split}.jsonl"), "w", encoding="utf-8")
        for split in ("train", "validation")
    }
    try:
        for source, path in iter_files(args.paths, args.exclude):
            with open(path, "rb") as f:
                payload = f.read()
            src = stats["sources"].setdefault(source, Counter())
            for text in file_texts(path, payload):
                for doc in documents(text, args.max_doc_chars):
                    src["candidates"] += 1
                    if not english_enough(doc, args.min_words, args.min_stopword_fraction):
                        continue
                    key = hashlib.blake2b(" ".join(doc.split()).encode(), digest_size=16).digest()
                    if key in seen:
                        src["duplicates"] += 1
                        continue
                    seen.add(key)
                    split = "validation" if unit_hash(doc) < args.validation_fraction else "train"
                    outs[split].write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                    words = len(doc.split())
                    for counter in (src, stats["splits"][split]):
                        counter["documents"] += 1
                        counter["characters"] += len(doc)
                        counter["words"] += words
    finally:
        for f in outs.values():
            f.close()
    stats["settings"] = {
        k: getattr(args, k)
        for k in (
            "max_doc_chars",
            "min_words",
            "min_stopword_fraction",
            "validation_fraction",
            "exclude",
        )
    }
    with open(os.path.join(args.output_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    return stats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("paths", nargs="+", help="files or directories to read")
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="glob pattern of file paths to leave out (repeatable), e.g. '*/print.html'",
    )
    p.add_argument("--max_doc_chars", type=int, default=8_000)
    p.add_argument("--min_words", type=int, default=30)
    p.add_argument("--min_stopword_fraction", type=float, default=0.25)
    p.add_argument("--validation_fraction", type=float, default=0.01)
    args = p.parse_args(argv)
    if not 0 < args.validation_fraction < 1:
        p.error(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
    if not 0 <= args.min_stopword_fraction < 1:
        p.error(f"--min_stopword_fraction must be in [0, 1), got {args.min_stopword_fraction}")
    if args.max_doc_chars < 1 or args.min_words < 0:
        p.error("--max_doc_chars must be >= 1 and --min_words >= 0")
    stats = build(args)
    for split, c in stats["splits"].items():
        print(
            f"{split}: {c['documents']} documents, {c['words']:,} words, {c['characters']:,} chars"
        )
    return stats


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
