"""recipes/build_corpus.py: text from plain, HTML, gzip and zip files becomes JSON-lines
documents; code, tagged text, duplicates and excluded files are handled as documented."""

from __future__ import annotations

import gzip
import json
import os
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from recipes import build_corpus  # noqa: E402

PROSE = (
    "The committee said that it would not be able to finish the work before the end of the "
    "year, and that the members of the public who had written to them should be patient while "
    "they read all of the letters and made up their minds about what was to be done next. "
)


def prose(topic: str, n: int = 3) -> str:
    return f"{topic}. " + PROSE * n


def read(path):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def test_sources_filters_and_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(prose("Apples") + "\n\n" + prose("Apples"))  # duplicate doc
    code = "\n".join(f"x{i} = f(y{i}) + g[{i}]  # {i}" for i in range(40))
    (src / "code.txt").write_text(code)  # no English stop words: dropped
    (src / "b.html").write_text(
        f"<html><head><title>t</title><script>var a = 1;</script></head><body>"
        f"<nav>Home Next</nav><p>{prose('Bananas')}</p></body></html>"
    )
    with gzip.open(src / "c.txt.gz", "wt") as f:
        f.write(prose("Cherries"))
    with zipfile.ZipFile(src / "d.zip", "w") as z:
        z.writestr("brown/ca01", " ".join(f"{w}/nn" for w in prose("Dates").split()))
    (src / "skip.txt").write_text(prose("Excluded"))

    out = tmp_path / "out"
    stats = build_corpus.main(
        [
            str(src),
            "--output_dir",
            str(out),
            "--exclude",
            "*/skip.txt",
            "--validation_fraction",
            "0.5",
        ]  # fmt: skip
    )
    docs = read(out / "train.jsonl") + read(out / "validation.jsonl")
    starts = sorted(d.split(".")[0] for d in docs)
    assert starts == ["Apples", "Bananas", "Cherries", "Dates"]  # one Apples, no code/excluded
    html = next(d for d in docs if d.startswith("Bananas"))
    assert "var a" not in html and "Home Next" not in html
    dates = next(d for d in docs if d.startswith("Dates"))
    assert "/nn" not in dates  # part-of-speech tags removed
    splits = stats["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 4
    assert json.loads((out / "stats.json").read_text())["splits"] == splits

    # the split depends on the text only: the same corpus built again splits the same way
    again_dir = str(tmp_path / "again")
    again = build_corpus.main(
        [
            str(src),
            "--output_dir",
            again_dir,
            "--exclude",
            "*/skip.txt",
            "--validation_fraction",
            "0.5",
        ]  # fmt: skip
    )
    assert again["splits"] == splits
    assert read(tmp_path / "again" / "validation.jsonl") == read(out / "validation.jsonl")


@pytest.mark.parametrize("flag,value", [("--validation_fraction", "1.5"),
                                        ("--min_stopword_fraction", "-0.1")])  # fmt: skip
def test_bad_fractions_are_rejected(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit):
        build_corpus.main([str(tmp_path), "--output_dir", str(tmp_path / "o"), flag, value])
    assert value in capsys.readouterr().err
