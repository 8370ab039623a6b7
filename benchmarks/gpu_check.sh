#!/usr/bin/env bash
# One prepared GPU check: environment, a real training run through main.py, whole-step
# throughput, an exported model against the CPU, K runs in one process, the LKCA views (at
# 8x8 against MHSA, and over grid sizes up to 64x64), the two AutoAugment forms, the
# streaming path's host decode + crop against the device's step, and the projected CIFAR-10
# recipe time.
#
#   bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--train_data DIR]
#
# --train_data: a TFDS data_dir with Tiny-ImageNet prepared from its first 20 classes
# (small enough to travel with the call; benchmarks/gpu_prepare.sh makes it). The `train`
# part then runs `main.py` for GPU_CHECK_TRAIN_STEPS steps (default 2,000) of lkca_t on
# it, the whole recipe shortened to those steps (evaluations and the checkpoint
# included); --smoke runs it on the embedded digits for a few steps of a tiny model.
# A device machine that sends back only a few files wants the results folder packed, the
# profiler's XPlane files (several MB a trace; the summary reads the .trace.json.gz) left out:
#   bash benchmarks/gpu_check.sh --out /tmp/gc
#   tar czf "$OUT/gpu_check.tgz" --exclude='*.xplane.pb' -C /tmp gc
#
# Results (one JSON per part, logs/, parts.tsv, summary.json) go to DIR, else $OUT, else
# bench_results/gpu_check. Every part runs under its own `timeout`; a part that fails or
# times out is recorded as such in summary.json and the rest still run. The whole run
# stays within GPU_CHECK_BUDGET_S (default 540 s, then the summary, inside 10 min): each
# part gets at most what is left, and parts with under 10 s left are recorded as skipped.
# The most wanted parts run first. On an H200 (jax 0.11.2) each program compiles in 35 to
# 120 s, so one call covers three or four parts: GPU_CHECK_PARTS picks them, and a
# compilation cache named by JAX_COMPILATION_CACHE_DIR (kept, and carried to the next
# call) spares the compiles a part repeats. --smoke: every part with tiny settings (about
# two minutes on 2 CPU cores).
#
# Environment:
#   PYTHON                the interpreter (default: python, else python3)
#   GPU_CHECK_BUDGET_S    the whole run's limit in seconds (default 540; --smoke 240)
#   GPU_CHECK_PARTS       the parts to run, comma-separated (default: all); the others are
#                         recorded as not selected
#   GPU_CHECK_TRAIN_STEPS the steps of the `train` part (default 2000)
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
#   autoaugment, randaugment (gpu_check.py): jax and lkca_jax.augment only.
#   export (gpu_check.py): flatbuffers (jax.export's serialization), etils (lkca_jax.files).
#   train (main.py on the prepared subset) and stream: tensorflow_datasets for its
#     builders and its tf.train.Example proto (pure Python; no TensorFlow) with
#     array_record, tensorflow-metadata, promise, googleapis-common-protos,
#     immutabledict, toml, dm-tree, simple_parsing, docstring_parser and termcolor;
#     stream also grain.
# The H200 image of 2026-12-04 (Python 3.12, jax 0.11.2, flax 0.12.10) had tensorboard,
# wrapt, etils, absl-py and protobuf, and none of the others. The env part reports which
# of NEEDED import.
#
# Offline wheels: if benchmarks/wheels/ (git-ignored) holds .whl files, those whose
# distribution is not installed are installed with --no-deps into a folder put on
# PYTHONPATH (no write access to site-packages needed, no registry).
# `bash benchmarks/gpu_prepare.sh --zip tiny-imagenet-200.zip`, run where the package
# registry is, fills it (benchmarks/gpu_wheels.txt, about 10 MB) and writes the `train`
# part's data to benchmarks/gpu_data; carry both to the run.

set -u
cd "$(dirname "$0")/.." || exit 1

SMOKE=0
OUT_DIR="${OUT:-bench_results/gpu_check}"
TRAIN_DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    --train_data) TRAIN_DATA="$2"; shift ;;
    --train_data=*) TRAIN_DATA="${1#--train_data=}" ;;
    *) echo "error: unknown argument $1; use [--smoke] [--out DIR] [--train_data DIR]" >&2
       exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-$(command -v python || command -v python3)}"
WHEELS="${GPU_CHECK_WHEELS:-benchmarks/wheels}"
VITS="${GPU_CHECK_VIT_MODELS:-$([ "$SMOKE" = 1 ] && echo vit_1m || echo vit_1m,vit)}"
if [ -n "$TRAIN_DATA" ] && [ ! -d "$TRAIN_DATA/tiny_imagenet" ]; then
  echo "error: --train_data=$TRAIN_DATA holds no prepared tiny_imagenet; make it with" \
    "bash benchmarks/gpu_prepare.sh --zip tiny-imagenet-200.zip" >&2
  exit 2
fi
if [ -n "${GPU_CHECK_PARTS:-}" ]; then
  "$PY" benchmarks/gpu_check.py check-parts "$GPU_CHECK_PARTS" || exit 2
fi
mkdir -p "$OUT_DIR/logs" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
: > "$OUT_DIR/parts.tsv"
export TF_CPP_MIN_LOG_LEVEL=2
BEGIN=$(date +%s)
# The whole run's limit; the parts' own timeouts add up to more.
BUDGET="${GPU_CHECK_BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 240 || echo 540)}"
SELECTED="${GPU_CHECK_PARTS:-}"
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
  # The offline wheels and the environment always run: every part needs them, or reads them.
  if [ -n "$SELECTED" ] && [ "$name" != wheels ] && [ "$name" != env ] \
    && [[ ",$SELECTED," != *",$name,"* ]]; then
    printf '%s\tunselected\t0\t\t%s\n' "$name" "$json" >> "$OUT_DIR/parts.tsv"
    return
  fi
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
  [ -n "$json" ] && rm -f "$json"  # never an earlier call's results read as this one's
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

# main.py as a user runs it, from a fresh workdir; its summary.json is the part's JSON.
train_part() {
  rm -rf "$OUT_DIR/train_workdir"
  if [ "$SMOKE" = 1 ]; then
    "$PY" main.py --config configs/digits.py --workdir "$OUT_DIR/train_workdir" \
      --config.model_overrides.dim=32 --config.model_overrides.depth=1 \
      --config.model_overrides.num_heads=2 --config.num_train_steps=4 \
      --config.eval_every_steps=2 --config.log_every_steps=2
  elif [ -z "$TRAIN_DATA" ]; then
    echo "error: no --train_data: make it with benchmarks/gpu_prepare.sh, then pass" \
      "--train_data benchmarks/gpu_data"
    return 2
  else
    "$PY" main.py --config configs/tinyimagenet.py --workdir "$OUT_DIR/train_workdir" \
      --config.model=lkca_t --config.dataset.data_dir="$TRAIN_DATA" \
      --config.dataset.download=False --config.dataset.classes=20 \
      --config.num_train_steps="${GPU_CHECK_TRAIN_STEPS:-2000}" \
      --config.optimizer.warmup_epochs=1 --config.log_every_steps=200
  fi
}
export -f train_part
export SMOKE TRAIN_DATA

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
# On the H200: 184 s for 2,000 steps, about 145 of them compiling the train and eval steps.
part train "$([ "$SMOKE" = 1 ] && echo 90 || echo 240)" "$O/train_workdir/summary.json" \
  train_part
if [ "$SMOKE" = 1 ]; then
  # Tiny: bench_step's --smoke (width 32, depth 1, batch 16 whatever --batch says, 2
  # steps), one dtype a part. Repeated cases hit the compilation cache (smoke lkca_t and
  # lkca_b are one program), so the whole run takes about a minute on 2 cores.
  part step_b128_lkca_t 90 "$O/step_b128_lkca_t.json" $STEP --smoke --models lkca_t \
    --dtype float32 --trace_dir "$O/traces" --out "$O/step_b128_lkca_t.json"
  part export 60 "$O/export.json" "$PY" benchmarks/gpu_check.py export --smoke --batch 4 \
    --steps 2 --out "$O/export.json"
  part forms 60 "$O/forms.json" $STEP --smoke --models lkca_t --dtype float32 \
    --forms plain,cpu --columns fixed --out "$O/forms.json"
  part views 60 "$O/views.json" $VIEWS --grids 2,3 --levels mix --dim 8 --tokens 16 \
    --repeats 2 --max_seconds 0.05 --out "$O/views.json"
  part runs 90 "$O/runs.json" $STEP --smoke --models lkca_t --dtype float32 --runs 2 \
    --out "$O/runs.json"
  part step_b128_lkca_b 60 "$O/step_b128_lkca_b.json" $STEP --smoke --models lkca_b \
    --dtype float32 --out "$O/step_b128_lkca_b.json"
  part mixers 60 "$O/mixers.json" $MIXERS --cases lkca-attention,lkca-conv --shapes 8x8 \
    --repeats 2 --max_seconds 0.05 --out "$O/mixers.json"
  part autoaugment 60 "$O/autoaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --batch 4 --steps 2 --out "$O/autoaugment.json"
  part randaugment 60 "$O/randaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --policy rand-m9-mstd0.5-inc1 --batch 4 --steps 2 --out "$O/randaugment.json"
  part stream 60 "$O/stream.json" "$PY" -m lkca_jax.tools.bench_stream --images 4 \
    --out "$O/stream.json"
  part step_b128_vit 60 "$O/step_b128_vit.json" $STEP --smoke --models "$VITS" \
    --dtype bfloat16 --out "$O/step_b128_vit.json"
  part step_b1024_lkca 60 "$O/step_b1024_lkca.json" $STEP --smoke --models lkca_t,lkca_b \
    --dtype float32 --out "$O/step_b1024_lkca.json"
  part step_b1024_vit 60 "$O/step_b1024_vit.json" $STEP --smoke --models "$VITS" \
    --dtype bfloat16 --out "$O/step_b1024_vit.json"
else
  # Most wanted first: the real run (above), lkca_t at the recipe's batch (the
  # projection), the layer forms (the per-backend choice), the LKCA views over grids (the
  # `auto` crossover), K runs, then lkca_b; the rest last, cut short by the budget.
  DT=float32,bfloat16
  # With profiler traces of 3 more steps of each case: the ops a step and how much of it
  # the GPU's streams are busy (launch-bound or not), the traces themselves in traces/.
  part step_b128_lkca_t 240 "$O/step_b128_lkca_t.json" $STEP --models lkca_t --batch 128 \
    --dtype $DT --steps 20 --trace_dir "$O/traces" --out "$O/step_b128_lkca_t.json"
  # An exported artifact (lkca_jax.exporting, every platform) run here against the CPU:
  # that its cuda branch runs and agrees, and its forward pass at batch 256.
  part export 60 "$O/export.json" "$PY" benchmarks/gpu_check.py export --batch 256 \
    --steps 20 --out "$O/export.json"
  # The layer forms on this backend: the plain ones it runs against the CPU-tuned ones
  # (lkca_jax/backend.py), so the per-backend choice is measured here too; the
  # recipe's dtype only: four programs, 35 to 60 s each to compile on the H200.
  part forms 300 "$O/forms.json" $STEP --models lkca_t,vit --batch 128 --dtype float32 \
    --forms plain,cpu --columns fixed --steps 20 --out "$O/forms.json"
  # The three views over grid sizes: the bare mixing step, which sets
  # lkca.AUTO_FFT_MIN_TOKENS["default"], and the whole mixer; 60 compiles. The block
  # level is left to a run of its own (`bench_views --levels block`).
  part views 300 "$O/views.json" $VIEWS --grids 8,16,32,48,64 --levels mix,mixer \
    --repeats 10 --max_seconds 0.5 --out "$O/views.json"
  # The recipe's dtype (configs/default.py: float32). Two programs, the single run's and
  # the 8 runs': on the H200, more than 240 s in a fresh process, 148 s with the single
  # run's already in a compilation cache (2026-12-04c; the views part took 221 s).
  part runs 330 "$O/runs.json" $STEP --models lkca_t --batch 128 --runs 8 \
    --dtype float32 --steps 10 --out "$O/runs.json"
  part step_b128_lkca_b 240 "$O/step_b128_lkca_b.json" $STEP --models lkca_b --batch 128 \
    --dtype $DT --steps 20 --out "$O/step_b128_lkca_b.json"
  # The module cases only (the mixing-only ones would explain, not decide): six compiles.
  part mixers 45 "$O/mixers.json" $MIXERS --cases mhsa,lkca-attention,lkca-conv \
    --shapes 8x8,16x16 --repeats 15 --max_seconds 0.5 --out "$O/mixers.json"
  part autoaugment 30 "$O/autoaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --batch 128 --steps 20 --out "$O/autoaugment.json"
  # DeiT's RandAugment (configs/imagenet.py) in the same two forms: 15 ops in the select.
  part randaugment 30 "$O/randaugment.json" "$PY" benchmarks/gpu_check.py autoaugment \
    --policy rand-m9-mstd0.5-inc1 --batch 128 --steps 20 --out "$O/randaugment.json"
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
