#!/usr/bin/env bash
# Prepares, on a machine with the package registry, what benchmarks/gpu_check.sh takes to a
# GPU machine that has none: the wheels it lacks and the real data of its `train` part.
#
#   bash benchmarks/gpu_prepare.sh [--zip tiny-imagenet-200.zip] [--classes 20]
#       [--python_version 3.12] [--no_wheels]
#
# Writes benchmarks/wheels/ (benchmarks/gpu_wheels.txt, for the GPU machine's Python: the
# compiled ones for manylinux x86-64, the sdist-only ones built here) and, with --zip,
# benchmarks/gpu_data/ (Tiny-ImageNet's first --classes classes, prepared as array_record;
# 22 MB for 20). Both are git-ignored. Then, on the GPU machine, in one call that carries
# both folders:
#   bash benchmarks/gpu_check.sh --out /tmp/gc --train_data benchmarks/gpu_data
#   tar czf "$OUT/gc.tgz" -C /tmp gc
# It runs with the repository's .venv (`make install`) unless PYTHON names another Python.
# Every failure is one `error:` line and exit code 2.

set -u
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python || command -v python3)}"
ZIP="" CLASSES=20 PYVER=3.12 WHEELS=1
fail() { echo "error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --zip) ZIP="${2:-}"; shift ;;
    --classes) CLASSES="${2:-}"; shift ;;
    --python_version) PYVER="${2:-}"; shift ;;
    --no_wheels) WHEELS=0 ;;
    *) fail "unknown argument $1; use [--zip FILE] [--classes K] [--python_version X.Y] [--no_wheels]" ;;
  esac
  shift
done
[ -z "$ZIP" ] || [ -f "$ZIP" ] || fail "--zip=$ZIP is not a file: give the official tiny-imagenet-200.zip"
[ "$WHEELS" = 1 ] || [ -n "$ZIP" ] || fail "nothing to prepare: give --zip, or drop --no_wheels"
# Cutting and preparing the data runs the package: check for it before any download.
[ -z "$ZIP" ] || "$PY" -c "import absl, lkca_jax" 2> /dev/null \
  || fail "$PY cannot import lkca_jax: run make install (it makes .venv), or set PYTHON to a Python with requirements.txt installed"

if [ "$WHEELS" = 1 ]; then
  mkdir -p benchmarks/wheels || fail "cannot make benchmarks/wheels"
  TAGS=(--python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  grep -v '^#' benchmarks/gpu_wheels.txt | while read -r pin; do
    [ -n "$pin" ] || continue
    # A wheel for the GPU machine's Python, else (a pure-Python sdist) one built here.
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${TAGS[@]}" -d benchmarks/wheels \
      "$pin" 2> /dev/null \
      || "$PY" -m pip wheel -q --no-deps -w benchmarks/wheels "$pin" > /dev/null \
      || fail "$pin: no wheel for Python $PYVER on manylinux x86-64, and none could be built"
  done || exit 2
  echo "benchmarks/wheels: $(ls benchmarks/wheels/*.whl | wc -l) wheels, $(du -sh benchmarks/wheels | cut -f1)"
fi

if [ -n "$ZIP" ]; then
  SUB="$(mktemp -d)" || fail "cannot make a temporary folder"
  trap 'rm -rf "$SUB"' EXIT
  "$PY" benchmarks/tiny_imagenet_subset.py --zip "$ZIP" --classes "$CLASSES" \
    --out "$SUB/tiny-imagenet-200.zip" || exit 2
  rm -rf benchmarks/gpu_data
  "$PY" -m lkca_jax.tools.prepare --dataset tiny_imagenet --manual_dir "$SUB" \
    --data_dir benchmarks/gpu_data || exit 2
fi
