"""Whole-train-step throughput of the trainer's own jitted step, per model and compute dtype.

    python -m lkca_jax.tools.bench_step [--models lkca_t,lkca_b,vit_1m,vit] [--batch 128]
        [--dtype float32,bfloat16] [--steps 20] [--out bench_results/bench_step.json] [--smoke]
        [--runs K] [--forms auto,cpu,plain] [--columns fixed,pipeline] [--trace_dir DIR]

Flags:
  --models  comma-separated presets of `lkca_jax.models.PRESETS`.
  --batch   global batch size.
  --dtype   comma-separated compute dtypes (`--config.dtype`): float32, bfloat16 or both;
            parameters and optimizer state stay float32 either way (checked, see
            `state_dtypes` in the JSON).
  --steps   timed steps per model, dtype and column, after compilation and one warm-up step.
  --out     where the JSON results go.
  --smoke   tiny shapes for tests: width 32, depth 1, 2 heads, batch 16, 2 steps.
  --runs    K > 1: instead, the cost of many runs in one process (`config.num_runs`):
            per model and dtype, K runs side by side in one vmapped step against K
            single runs (seeds 0..K-1), `Training.step` with the pipeline, all
            interleaved as below. Reported: median ms of the K-run step and the sum of
            the K single runs' medians, their ratio (below 1: the K-run step is
            cheaper), and bytes per run from each compiled step's memory analysis.
  --forms   comma-separated layer forms (`lkca_jax.backend.forms`): auto (the
            backend's own), cpu (the CPU-tuned forms) or plain (the GPU/TPU forms), each
            a case of its own, so both can be timed on any backend.
  --columns which of the two columns below to time.
  --trace_dir  also record `jax.profiler` traces of TRACE_STEPS more steps of every case
            and column, one folder each (DIR/<model>-<dtype>-<forms>-<column>, for
            TensorBoard's profiler or Perfetto), and report what they show
            (`trace_summary`): ops a step, the time their lanes were busy, and the
            busiest ops.

Every case is the trainer's step as `train.build_training` builds it (CutMix/Mixup,
the model with stochastic depth, label-smoothed loss, AdamW, state donated) on
`synthetic_cifar` (32×32×3 uint8 noise, 10 classes, patch 4: an 8×8 grid, no
TFDS needed), under `configs/default.py`'s recipe otherwise. Two columns:

  fixed     `Training.train_step` on one fixed, already augmented and normalised batch:
            the model, loss and optimizer alone;
  pipeline  `Training.step`: the pipeline's batch with the full CIFAR-10 per-image
            augmentation (flip, crop, AutoAugment, erasing), then the same step.

Model by model: its (dtype, form) steps are built, then its (dtype, form, column)
cases run interleaved, one step each in turn, the order reversed every other round
(A B B A), so load from other processes hits them alike. The JSON is written after
every model ("complete": false until the last), so a run stopped by a time limit
keeps what it finished. Reported per case: median and min ms/step
and images/s (batch / median), plus the load average at start and end.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import statistics
import time

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS

COLUMNS = ("fixed", "pipeline")
COLUMN_NOTES = {
  "fixed": "train_step on one fixed, normalised batch (no per-image augmentation)",
  "pipeline": "Training.step: pipeline batch with the CIFAR-10 augmentation, then train_step",
}
DATASET = "synthetic_cifar"
SMOKE = {"batch": 16, "steps": 2, "overrides": {"dim": 32, "depth": 1, "num_heads": 2}}
TRACE_STEPS = 3  # steps of each case and column that --trace_dir records
CPU_LANES = "XLA:CPU threads"  # what `op_lanes` calls the lanes of a trace without a device


def step_config(model: str, *, batch: int, dtype: str, overrides: dict | None = None):
  """The reference recipe on synthetic CIFAR-shaped data for one model and compute dtype."""
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.dataset.name = DATASET
  config.model = model
  config.batch_size = batch
  config.dtype = dtype
  for key, value in (overrides or {}).items():
    config.model_overrides[key] = value
  return config


def float_dtypes(tree) -> list[str]:
  """Sorted names of the floating dtypes among a pytree's array leaves."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return sorted(
    {
      str(x.dtype)
      for x in jax.tree.leaves(tree)
      if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    }
  )


class Case:
  """One model at one dtype: its Training, its state, and both timed columns."""

  def __init__(self, config):
    import jax  # pylint: disable=import-outside-toplevel

    from lkca_jax import train  # pylint: disable=import-outside-toplevel

    self.run = train.Run.prepare(config)
    self.training = train.build_training(self.run, config)
    self.state = self.training.state
    self.step_index = 0
    # One augmented, normalised batch, reused: the "fixed" column leaves the pipeline out.
    self.fixed_batch = jax.block_until_ready(self.training.batch(0))

  def step(self, column: str) -> float:
    """One train step of `column`; returns its wall seconds (blocked until ready)."""
    import jax  # pylint: disable=import-outside-toplevel

    t = self.training
    if column == "pipeline":  # the epoch order is drawn once an epoch: outside the timing
      jax.block_until_ready(t.epoch_order(self.step_index // t.pipeline.steps_per_epoch))
    start = time.perf_counter()
    if column == "fixed":
      self.state, metrics = t.train_step(self.state, self.fixed_batch, t.train_key)
    else:
      self.state, metrics = t.step(self.state, self.step_index)
    jax.block_until_ready((self.state, metrics))
    self.step_index += 1
    return time.perf_counter() - start


def step_bytes(case) -> int:
  """Peak bytes of a case's compiled training step (its memory analysis)."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  t = case.training
  lowered = t.compiled_step.lower(case.state, case.fixed_batch, t.train_key, t.hparams, t.all_alive)
  return train.step_memory_bytes(lowered.compile())


def trace_case(case, column: str, directory: str, steps: int = TRACE_STEPS) -> dict:
  """Records `steps` steps of `column` with `jax.profiler` into `directory`; returns their
  `trace_summary`, or the profiler's error: the timings do not depend on it."""
  import jax  # pylint: disable=import-outside-toplevel

  try:
    with jax.profiler.trace(directory):
      for _ in range(steps):
        case.step(column)
  except RuntimeError as e:  # the profiler could not start or write (no CUPTI, say)
    return {"dir": directory, "error": f"jax.profiler: {e}"}
  return trace_summary(directory, steps)


def op_lanes(processes: dict, threads: dict, keys: set) -> tuple[str, set]:
  """What the lanes that ops run on are, and their (pid, tid) among `keys`: a device's
  kernel streams (threads named "Stream ..." of /device:GPU:N or /device:TPU:N), every lane
  of the devices if none is named so, and without a device XLA:CPU's threads (tf_XLA...)."""
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  on_devices = {key for key in keys if key[0] in devices}
  streams = {key for key in on_devices if threads.get(key, "").startswith("Stream")}
  if streams:
    return "device streams", streams
  if on_devices:
    return "device lanes", on_devices
  return CPU_LANES, {key for key in keys if threads.get(key, "").startswith("tf_XLA")}


def is_op(event: dict, lanes: str) -> bool:
  """Whether a trace event on `op_lanes`' lanes is an op: every event on a device's lanes
  (kernels, copies); on XLA:CPU's threads those naming the HLO op they run (its other
  events are its executor's and thread pools' own)."""
  return lanes != CPU_LANES or "hlo_op" in (event.get("args") or {})


def busy_time(intervals) -> float:
  """The length of the union of (start, end) intervals."""
  total, reached = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reached:
      total += end - max(start, reached)
      reached = end
  return total


def read_trace(directory: str) -> tuple[list[dict], dict, dict]:
  """The events of the newest *.trace.json.gz under `directory`, with its process names
  {pid: name} and thread names {(pid, tid): name}; FileNotFoundError if there is none."""
  found = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True))
  if not found:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
  with gzip.open(found[-1], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  return events, processes, threads


def trace_summary(directory: str, steps: int, top: int = 10) -> dict:
  """What a `jax.profiler` trace of `steps` steps says of the ops that ran them (the events
  on the lanes `op_lanes` picks that `is_op`; a loop or call and the ops of its body each
  count): per step, the ops, the time at least one lane was busy, and the span
  from the first op's start to the last op's end (the gaps between steps included); the
  same per lane; the `top` ops by time. Lanes busy for much less than the span are
  waiting: on kernel launches, on the host, or on each other."""
  try:
    events, processes, threads = read_trace(directory)
  except FileNotFoundError as e:
    return {"dir": directory, "error": str(e)}
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e]
  kind, lanes = op_lanes(processes, threads, {(e["pid"], e.get("tid")) for e in ops})
  ops = [e for e in ops if (e["pid"], e.get("tid")) in lanes and is_op(e, kind)]
  if not ops:
    return {"dir": directory, "lanes": kind, "error": f"no op events on {kind}"}
  per_op, per_lane = {}, {}
  for e in ops:
    total, calls = per_op.get(e["name"], (0.0, 0))
    per_op[e["name"]] = (total + e["dur"], calls + 1)
    lane = threads.get((e["pid"], e.get("tid")), f"{e['pid']}/{e.get('tid')}")
    per_lane.setdefault(lane, []).append((e["ts"], e["ts"] + e["dur"]))
  spans = [span for lane in per_lane.values() for span in lane]
  span = max(end for _, end in spans) - min(start for start, _ in spans)
  busy = busy_time(spans)
  per_step_ms = lambda microseconds: microseconds / 1e3 / steps  # noqa: E731
  busiest = sorted(per_op.items(), key=lambda item: -item[1][0])[:top]
  return {
    "dir": directory,
    "steps": steps,
    "lanes": kind,
    "ops_per_step": len(ops) / steps,
    "busy_ms_per_step": per_step_ms(busy),
    "span_ms_per_step": per_step_ms(span),
    "busy_fraction": busy / span if span else None,
    "per_lane": {
      lane: {"ops_per_step": len(s) / steps, "busy_ms_per_step": per_step_ms(busy_time(s))}
      for lane, s in sorted(per_lane.items())
    },
    "top_ops": [
      {"name": name, "ms_per_step": per_step_ms(total), "calls_per_step": calls / steps}
      for name, (total, calls) in busiest
    ],
  }


def format_trace(name: str, summary: dict) -> str:
  if "error" in summary:
    return f"trace {name}: {summary['error']}"
  s, first = summary, summary["top_ops"][0]
  return (
    f"trace {name}: {s['ops_per_step']:.0f} ops a step on {s['lanes']}, busy "
    f"{s['busy_ms_per_step']:.1f} of {s['span_ms_per_step']:.1f} ms "
    f"({100 * s['busy_fraction']:.0f} %); most time: {first['name']} "
    f"({first['ms_per_step']:.2f} ms a step)"
  )


def trace_cases(model: str, cases: dict, columns, trace_dir: str, log=print) -> dict:
  """`trace_case` of every (dtype, form) case and column of `model`, each into its own
  folder of `trace_dir`: {(dtype, form): {column: summary}}."""
  traced = {}
  for (dtype, form), case in cases.items():
    for column in columns:
      directory = os.path.join(trace_dir, f"{model}-{dtype}-{form}-{column}")
      traced.setdefault((dtype, form), {})[column] = summary = trace_case(case, column, directory)
      log(format_trace(f"{model}/{dtype}/{form}/{column}", summary))
  return traced


def run_runs_benchmark(
  models: list[str],
  dtypes: list[str],
  *,
  runs: int,
  batch: int,
  steps: int,
  overrides: dict | None = None,
  log=print,
) -> dict:
  """K runs in one process against K single runs, per (model, dtype); see --runs."""

  load_start = os.getloadavg()
  cases = {}
  for model in models:
    for dtype in dtypes:
      config = step_config(model, batch=batch, dtype=dtype, overrides=overrides)
      many = config.copy_and_resolve_references()
      many.num_runs = runs
      singles = []
      for k in range(runs):
        single = config.copy_and_resolve_references()
        single.seed = k
        singles.append(Case(single))
      together = Case(many)
      for case in (together, *singles):  # compile, then one warm step: not timed
        case.step("pipeline")
        case.step("pipeline")
      log(f"compiled {model} {dtype}: {runs} runs together and apart")
      cases[(model, dtype)] = [together, *singles]
  order = [(key, i) for key in cases for i in range(runs + 1)]
  times = {item: [] for item in order}
  for round_ in range(steps):
    for key, i in order if round_ % 2 == 0 else order[::-1]:
      times[(key, i)].append(cases[key][i].step("pipeline"))
  results = []
  for (model, dtype), (together, *singles) in cases.items():
    together_ms = 1e3 * statistics.median(times[((model, dtype), 0)])
    separate_ms = sum(
      1e3 * statistics.median(times[((model, dtype), i)]) for i in range(1, runs + 1)
    )
    many_bytes, single_bytes = step_bytes(together), step_bytes(singles[0])
    results.append(
      {
        "model": model,
        "dtype": dtype,
        "runs": runs,
        "params": together.run.num_params,
        "together_ms": together_ms,
        "separate_ms": separate_ms,
        "ratio": together_ms / separate_ms,
        "together_step_ms": [1e3 * s for s in times[((model, dtype), 0)]],
        "single_bytes": single_bytes,
        "together_bytes": many_bytes,
        "together_bytes_per_run": many_bytes / runs,
      }
    )
  return {
    "config": {
      "models": models,
      "dtypes": dtypes,
      "batch_size": batch,
      "steps": steps,
      "runs": runs,
      "dataset": DATASET,
      "model_overrides": overrides or {},
    },
    "results": results,
    **provenance(load_start),
  }


def provenance(load_start) -> dict:
  """Where and under what load a result was measured."""
  import jax  # pylint: disable=import-outside-toplevel

  return {
    "jax": jax.__version__,
    "machine": cli.machine_info(),
    "load_average_start": list(load_start),
    "load_average_end": list(os.getloadavg()),
  }


def format_runs_table(results: dict) -> str:
  c = results["config"]
  lines = [
    f"{c['runs']} runs in one process vs {c['runs']} single runs, batch "
    f"{c['batch_size']} each, median of {c['steps']} interleaved steps",
    f"{'model':<10}{'dtype':<10}{'together ms':>12}{'apart ms':>10}{'ratio':>7}"
    f"{'MiB/run together':>18}{'MiB single':>12}",
  ]
  for r in results["results"]:
    lines.append(
      f"{r['model']:<10}{r['dtype']:<10}{r['together_ms']:>12.1f}"
      f"{r['separate_ms']:>10.1f}{r['ratio']:>7.2f}"
      f"{r['together_bytes_per_run'] / 2**20:>18.1f}{r['single_bytes'] / 2**20:>12.1f}"
    )
  start, end = results["load_average_start"], results["load_average_end"]
  lines.append(f"load average {start[0]:.2f} -> {end[0]:.2f}")
  return "\n".join(lines)


def column_stats(seconds: list[float], batch: int) -> dict:
  median_ms = 1e3 * statistics.median(seconds)
  return {
    "median_ms": median_ms,
    "min_ms": 1e3 * min(seconds),
    "images_per_second": batch / (median_ms / 1e3),
    "step_ms": [1e3 * s for s in seconds],
  }


def bench_config(models, dtypes, forms, columns, batch, steps, overrides) -> dict:
  """What a `run_benchmark` result was measured with."""
  return {
    "models": models,
    "dtypes": dtypes,
    "forms": list(forms),
    "columns": list(columns),
    "batch_size": batch,
    "steps": steps,
    "dataset": DATASET,
    "image_shape": [32, 32, 3],
    "num_classes": 10,
    "patch_size": 4,
    "model_overrides": overrides or {},
  }


def run_benchmark(
  models: list[str],
  dtypes: list[str],
  *,
  batch: int,
  steps: int,
  overrides: dict | None = None,
  forms: tuple[str, ...] = ("auto",),
  columns: tuple[str, ...] = COLUMNS,
  log=print,
  on_model=None,
  trace_dir: str | None = None,
) -> dict:
  """Times the train step model by model: builds its (dtype, form) steps, then times them
  and the columns interleaved, then traces them if `trace_dir` is given (`trace_cases`).
  After each model's timings, and again after its traces, `on_model(results so far)`
  (marked "complete": False), so a run cut short keeps every model it timed."""
  from lkca_jax import backend  # pylint: disable=import-outside-toplevel

  load_start = os.getloadavg()
  results, compile_seconds = [], {}

  def report(complete: bool) -> dict:
    return {
      "config": {
        **bench_config(models, dtypes, forms, columns, batch, steps, overrides),
        "trace_dir": trace_dir,
        "trace_steps": TRACE_STEPS if trace_dir else 0,
      },
      "columns": COLUMN_NOTES,
      "complete": complete,
      "results": list(results),
      "compile_seconds": dict(compile_seconds),
      **provenance(load_start),
    }

  for model in models:
    cases = {}
    for dtype, form in itertools.product(dtypes, forms):
      start = time.perf_counter()
      with backend.forms(form):  # read when the step is traced: at its first call, below
        case = Case(step_config(model, batch=batch, dtype=dtype, overrides=overrides))
        for column in columns:  # compile, then one warm step: excluded from the timings
          case.step(column)
          case.step(column)
      name = f"{model}/{dtype}/{form}"
      compile_seconds[name] = time.perf_counter() - start
      log(f"compiled {name} ({case.run.num_params:,} params) in {compile_seconds[name]:.1f}s")
      cases[(dtype, form)] = case
    order = [(key, column) for key in cases for column in columns]
    times = {item: [] for item in order}
    for round_ in range(steps):
      for key, column in order if round_ % 2 == 0 else order[::-1]:
        times[(key, column)].append(cases[key].step(column))
    done = [case_result(model, key, case, times, columns, batch) for key, case in cases.items()]
    results.extend(done)
    if on_model is not None:  # the timings on disk before any trace is taken
      on_model(report(complete=False))
    if trace_dir:
      traced = trace_cases(model, cases, columns, trace_dir, log)
      for r in done:
        r["trace"] = traced[(r["dtype"], r["forms"])]
      if on_model is not None:
        on_model(report(complete=False))
    del cases  # the next model's programs and states in their place
  return report(complete=True)


def case_result(model: str, key: tuple, case, times: dict, columns, batch: int) -> dict:
  """One (dtype, form) case's timings per column, as `run_benchmark` reports them."""
  dtype, form = key
  return {
    "model": model,
    "dtype": dtype,
    "forms": form,
    "params": case.run.num_params,
    **{column: column_stats(times[(key, column)], batch) for column in columns},
    "state_dtypes": {
      "params": float_dtypes(case.state.params),
      "opt_state": float_dtypes(case.state.opt_state),
    },
  }


def format_table(results: dict) -> str:
  c = results["config"]
  lines = [
    f"train step, batch {c['batch_size']}, {c['dataset']} 32x32x3, median of "
    f"{c['steps']} interleaved steps per case",
    f"{'model':<10}{'dtype':<10}{'forms':<7}"
    + "".join(f"{column + ' ms':>13}{'min':>8}{'img/s':>8}" for column in c["columns"]),
  ]
  for r in results["results"]:
    lines.append(
      f"{r['model']:<10}{r['dtype']:<10}{r['forms']:<7}"
      + "".join(
        f"{r[column]['median_ms']:>13.1f}{r[column]['min_ms']:>8.1f}"
        f"{r[column]['images_per_second']:>8.1f}"
        for column in c["columns"]
      )
    )
  start, end = results["load_average_start"], results["load_average_end"]
  lines.append(cli.machine_line(results["machine"], start[0], end[0]))
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_list("models", ["lkca_t", "lkca_b", "vit_1m", "vit"], "Model presets.")
  flags.DEFINE_integer("batch", 128, "Global batch size.")
  flags.DEFINE_list("dtype", ["float32", "bfloat16"], "Compute dtypes: float32, bfloat16.")
  flags.DEFINE_integer("steps", 20, "Timed steps per model, dtype and column.")
  cli.define_output_file("out", "bench_results/bench_step.json", "Where the JSON results go.")
  flags.DEFINE_bool("smoke", False, "Tiny shapes and 2 steps (for tests).")
  flags.DEFINE_integer("runs", 1, "K > 1: time K runs in one process against K single runs.")
  flags.DEFINE_list("forms", ["auto"], "Layer forms: auto, cpu, plain (lkca_jax/backend.py).")
  flags.DEFINE_list("columns", list(COLUMNS), "Columns to time: fixed, pipeline.")
  cli.define_output_dir(
    "trace_dir", None, "Also record jax.profiler traces of every case and column here."
  )


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  from absl import logging  # pylint: disable=import-outside-toplevel

  from lkca_jax import backend, train  # pylint: disable=import-outside-toplevel
  from lkca_jax import models as models_lib  # pylint: disable=import-outside-toplevel

  cli.check_presets(FLAGS.models)
  bad = [d for d in FLAGS.dtype if d not in models_lib.DTYPES]
  if not FLAGS.dtype or bad:
    cli.fail(f"--dtype must list {sorted(models_lib.DTYPES)}, got {FLAGS.dtype}")
  batch, steps, overrides = FLAGS.batch, FLAGS.steps, None
  if FLAGS.smoke:
    batch, steps, overrides = SMOKE["batch"], SMOKE["steps"], SMOKE["overrides"]
  if batch < 1 or steps < 1:
    cli.fail(f"--batch and --steps must be at least 1, got {batch} and {steps}")
  if FLAGS.runs < 1:
    cli.fail(f"--runs must be at least 1, got {FLAGS.runs}")
  if not FLAGS.forms or set(FLAGS.forms) - set(backend.FORMS):
    cli.fail(f"--forms must list {list(backend.FORMS)}, got {FLAGS.forms}")
  if not FLAGS.columns or set(FLAGS.columns) - set(COLUMNS):
    cli.fail(f"--columns must list {list(COLUMNS)}, got {FLAGS.columns}")
  if FLAGS.runs > 1 and (FLAGS.forms != ["auto"] or FLAGS.columns != list(COLUMNS)):
    cli.fail("--runs times the pipeline step in the backend's own forms; drop --forms, --columns")
  if FLAGS.runs > 1 and FLAGS.trace_dir is not None:
    cli.fail("--trace_dir traces the cases of the per-model benchmark; drop --runs or --trace_dir")
  out = cli.output_file(FLAGS.out, "--out")
  trace_dir = (
    None if FLAGS.trace_dir is None else str(cli.output_dir(FLAGS.trace_dir, "--trace_dir"))
  )
  logging.set_verbosity(logging.WARNING)
  try:
    if FLAGS.runs > 1:
      results = run_runs_benchmark(
        FLAGS.models, FLAGS.dtype, runs=FLAGS.runs, batch=batch, steps=steps, overrides=overrides
      )
    else:
      results = run_benchmark(
        FLAGS.models,
        FLAGS.dtype,
        batch=batch,
        steps=steps,
        overrides=overrides,
        forms=tuple(FLAGS.forms),
        columns=tuple(FLAGS.columns),
        # Each finished model on disk at once: a run stopped by a time limit keeps them.
        on_model=lambda partial: cli.write_json(out, partial),
        trace_dir=trace_dir,
      )
  except train.ConfigError as e:
    cli.fail(str(e))
  print(format_runs_table(results) if FLAGS.runs > 1 else format_table(results))
  print(f"wrote {cli.write_json(out, results)}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
