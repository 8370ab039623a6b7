#!/usr/bin/env bash
# One prepared GPU check: environment, whole-step throughput, K runs in one process, the
# LKCA views (at 8x8 against MHSA, and over grid sizes up to 64x64), the two AutoAugment
# forms, the streaming path's host decode + crop against the device's step, and the
# projected CIFAR-10 recipe time.
#
#   bash benchmarks/gpu_check.sh [--smoke] [--out DIR]
#
# Results (one JSON per part, logs/, parts.tsv, summary.json) go to DIR, else $OUT, else
# bench_results/gpu_check. Every part runs under its own `timeout`; a part that fails or
# times out is recorded as such in summary.json and the rest still run. The whole run
# stays within GPU_CHECK_BUDGET_S (default 450 s, then the summary, well inside 8 min):
# each part gets at most what is left, and parts with under 10 s left are recorded as
# skipped. The most wanted parts run first. --smoke: every part with tiny settings
# (about a minute on 2 CPU cores).
#
# Environment:
#   PYTHON                the interpreter (default: python, else python3)
#   GPU_CHECK_BUDGET_S    the whole run's limit in seconds (default 450; --smoke 240)
#   GPU_CHECK_WHEELS      the offline wheels folder (default benchmarks/wheels)
#   GPU_CHECK_VIT_MODELS  the models of the two ViT parts (default vit_1m,vit; --smoke
#                         vit_1m); the test passes an unknown one to check that failing
#                         parts are recorded and the others still run
#
# What the parts import beyond jax, flax, optax, orbax-checkpoint and numpy:
#   bench_step (step_*, runs): ml_collections (configs/default.py, train.py), clu and
#     tensorboard (lkca_jax/metric_writer.py, imported by train.py), wrapt (imported by
#     clu), etils and absl-py. NOT tensorflow nor tensorflow_datasets: the synthetic_cifar
#     data and the TF-free metric writer never import them (TFDS is imported only to
#     prepare or load real datasets, TF only by clu's TF writer, which is deferred).
#   bench_mixers, bench_views: ml_collections (through lkca_jax.tools.cli); not clu or
#     tensorboard.
#   autoaugment (gpu_check.py): jax and lkca_jax.augment only.
#   stream (bench_stream on synthetic JPEGs): pillow, grain (its array_record), and
#     tensorflow_datasets for its tf.train.Example proto (pure Python, with its own
#     imports: etils, promise, tensorflow-metadata, protobuf, ...); no TensorFlow.
# So ml_collections MUST be carried to a machine without it, and clu, tensorboard and
# wrapt too for the bench_step parts. The env part reports which of them import.
#
# Offline wheels: if benchmarks/wheels/ (git-ignored) holds .whl files, those whose
# distribution is not installed are installed with --no-deps into a folder put on
# PYTHONPATH (no write access to site-packages needed, no registry). Fill it on a machine
# with the package registry, for the GPU machine's Python (printed by the env part):
#   pip download --no-deps -d benchmarks/wheels ml_collections==1.1.0 clu==0.0.12 \
#     tensorboard==2.21.0                                   # pure Python: any version
#   pip download --no-deps -d benchmarks/wheels --only-binary=:all: \
#     --platform manylinux2014_x86_64 --python-version 3.12 wrapt==2.5.2   # compiled
# (versions as in requirements.txt; wrapt needs the GPU machine's Python version), and
# carry it to the run: carry=["benchmarks/wheels"].

set -u
cd "$(dirname "$0")/.." || exit 1

SMOKE=0
OUT_DIR="${OUT:-bench_results/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    *) echo "unknown argument $1; use [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-$(command -v python || command -v python3)}"
WHEELS="${GPU_CHECK_WHEELS:-benchmarks/wheels}"
VITS="${GPU_CHECK_VIT_MODELS:-$([ "$SMOKE" = 1 ] && echo vit_1m || echo vit_1m,vit)}"
mkdir -p "$OUT_DIR/logs" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
: > "$OUT_DIR/parts.tsv"
export TF_CPP_MIN_LOG_LEVEL=2
BEGIN=$(date +%s)
# The whole run's limit; the parts' own timeouts add up to more.
BUDGET="${GPU_CHECK_BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 240 || echo 450)}"
# One compilation cache for all parts, outside $OUT (it need not come back): the K-runs
# part compiles K identical single-run steps, and the parts share programs.
# A cache the caller names (the test suite's) is used and kept.
SITE=""
if [ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_CACHE=""
  trap 'rm -rf ${SITE:+"$SITE"}' EXIT
else
  JAX_CACHE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_jax_cache.XXXXXX")"
  trap 'rm -rf "$JAX_CACHE" ${SITE:+"$SITE"}' EXIT
  export JAX_COMPILATION_CACHE_DIR="$JAX_CACHE"
fi
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# part NAME TIMEOUT_S JSON_OUT COMMAND...: runs it, logs it, records rc and seconds; never
# stops the script.
part() {
  local name="$1" limit="$2" json="$3"
  shift 3
  local log="$OUT_DIR/logs/$name.log" start ms rc left
  # Never past the overall budget: a part gets what is left of it, or is skipped.
  left=$((BUDGET - $(date +%s) + BEGIN))
  if [ "$left" -lt 10 ]; then
    echo "skipped: ${BUDGET}s budget spent" > "$log"
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$log" "$json" >> "$OUT_DIR/parts.tsv"
    echo "--- $name: skipped, budget spent"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "--- $name (timeout ${limit}s): $*"
  start=$(date +%s%N)
  # bash -c: so the shell functions below (exported) run under timeout too.
  timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  tail -n 15 "$log"
  printf '%s\t%s\t%d.%03d\t%s\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$log" \
    "$json" >> "$OUT_DIR/parts.tsv"
  echo "--- $name: rc $rc"
}

env_part() {
  nvidia-smi -L 2>&1 || echo "no nvidia-smi"
  "$PY" benchmarks/gpu_check.py env --wheels "$WHEELS" --out "$OUT_DIR/env.json"
}
export -f env_part
export PY OUT_DIR WHEELS

# Offline wheels, before anything imports them.
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
  install_wheels() {
    local missing
    missing=$("$PY" benchmarks/gpu_check.py missing-wheels "$WHEELS") || return 1
    echo "missing: ${missing:-none}"
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086 # one wheel path a word
    "$PY" -m pip install --no-index --no-deps --target "$SITE" $missing
  }
  export -f install_wheels
  export PY SITE WHEELS
  part wheels 30 "" install_wheels
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

STEP="$PY -m lkca_jax.tools.bench_step"
MIXERS="$PY -m lkca_jax.tools.bench_mixers"
VIEWS="$PY -m lkca_jax.tools.bench_views"
O="$OUT_DIR"
part env 30 "$O/env.json" env_part
if [ "$SMOKE" = 1 ]; then
  # Tiny: bench_step's --smoke (width 32, depth 1, batch 16 whatever --batch says, 2
  # steps), one dtype a part. Repeated cases hit the compilation cache (smoke lkca_t and
  # lkca_b are one program), so the whole run takes about a minute on 2 cores.
  part step_b128_lkca_t 90 "$O/step_b128_lkca_t.json" $STEP --smoke --models lkca_t \
    --dtype float32 --out "$O/step_b128_lkca_t.json"
  part step_b128_lkca_b 60 "$O/step_b128_lkca_b.json" $STEP --smoke --models lkca_b \
    --dtype float32 --out "$O/step_b128_lkca_b.json"
  part forms 60 "$O/forms.json" $STEP --smoke --models lkca_t --dtype float32 \
    --forms plain,cpu --columns fixed --out "$O/forms.json"
  part mixers 60 "$O/mixers.json" $MIXERS --cases lkca-attention,lkca-conv --shapes 8x8 \
    --repeats 2 --max_seconds 0.05 --out "$O/mixers.json"
  part views 60 "$O/views.json" $VIEWS --grids 2,3 --levels mix --dim 8 --tokens 16 \
    --repeats 2 --max_seconds 0.05 --out "$O/views.json"
  part runs 90 "$O/runs.json" $STEP --smoke --models lkca_t --dtype float32 --runs 2 \
    --out "$O/runs.json"
  part autoaugment 60 "$O/autoaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --batch 4 --steps 2 --out "$O/autoaugment.json"
  part stream 60 "$O/stream.json" "$PY" -m lkca_jax.tools.bench_stream --images 4 \
    --out "$O/stream.json"
  part step_b128_vit 60 "$O/step_b128_vit.json" $STEP --smoke --models "$VITS" \
    --dtype bfloat16 --out "$O/step_b128_vit.json"
  part step_b1024_lkca 60 "$O/step_b1024_lkca.json" $STEP --smoke --models lkca_t,lkca_b \
    --dtype float32 --out "$O/step_b1024_lkca.json"
  part step_b1024_vit 60 "$O/step_b1024_vit.json" $STEP --smoke --models "$VITS" \
    --dtype bfloat16 --out "$O/step_b1024_vit.json"
else
  # Most wanted first: lkca_t, then lkca_b, at the recipe's batch (the projection; one
  # process each, so a slow compile of one cannot lose the other), the view choice, K
  # runs, AutoAugment; the ViTs and batch 1024 last, cut short by the overall budget.
  DT=float32,bfloat16
  part step_b128_lkca_t 120 "$O/step_b128_lkca_t.json" $STEP --models lkca_t --batch 128 \
    --dtype $DT --steps 20 --out "$O/step_b128_lkca_t.json"
  part step_b128_lkca_b 90 "$O/step_b128_lkca_b.json" $STEP --models lkca_b --batch 128 \
    --dtype $DT --steps 20 --out "$O/step_b128_lkca_b.json"
  # The layer forms on this backend: the plain ones it runs against the CPU-tuned ones
  # (lkca_jax/layers/backend.py), so the per-backend choice is measured here too.
  part forms 90 "$O/forms.json" $STEP --models lkca_t,vit --batch 128 --dtype $DT \
    --forms plain,cpu --columns fixed --steps 20 --out "$O/forms.json"
  # The module cases only (the mixing-only ones would explain, not decide): six compiles.
  part mixers 45 "$O/mixers.json" $MIXERS --cases mhsa,lkca-attention,lkca-conv \
    --shapes 8x8,16x16 --repeats 15 --max_seconds 0.5 --out "$O/mixers.json"
  # The three views over grid sizes: the bare mixing step, which sets
  # lkca.AUTO_FFT_MIN_TOKENS["default"], and the whole mixer; 60 compiles. The block
  # level is left to a run of its own (`bench_views --levels block`).
  part views 120 "$O/views.json" $VIEWS --grids 8,16,32,48,64 --levels mix,mixer \
    --repeats 10 --max_seconds 0.5 --out "$O/views.json"
  # The recipe's dtype (configs/default.py: float32); the 8 single runs are one program,
  # compiled once (and already by step_b128_lkca_t) thanks to the cache.
  part runs 90 "$O/runs.json" $STEP --models lkca_t --batch 128 --runs 8 \
    --dtype float32 --steps 10 --out "$O/runs.json"
  part autoaugment 30 "$O/autoaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --batch 128 --steps 20 --out "$O/autoaugment.json"
  # Does the host keep the device busy when streaming? One core's decode + crop
  # rate on synthetic JPEGs (64 px, and ImageNet-size to 224), set against the step parts'
  # images/s in the summary.
  part stream 45 "$O/stream.json" "$PY" -m lkca_jax.tools.bench_stream --images 500 \
    --out "$O/stream.json"
  part step_b128_vit 75 "$O/step_b128_vit.json" $STEP --models "$VITS" --batch 128 \
    --dtype $DT --steps 20 --out "$O/step_b128_vit.json"
  part step_b1024_lkca 75 "$O/step_b1024_lkca.json" $STEP --models lkca_t,lkca_b \
    --batch 1024 --dtype $DT --steps 10 --out "$O/step_b1024_lkca.json"
  part step_b1024_vit 60 "$O/step_b1024_vit.json" $STEP --models "$VITS" --batch 1024 \
    --dtype $DT --steps 10 --out "$O/step_b1024_vit.json"
fi

MODE=$([ "$SMOKE" = 1 ] && echo smoke || echo full)
"$PY" benchmarks/gpu_check.py summary "$OUT_DIR" --mode "$MODE"
