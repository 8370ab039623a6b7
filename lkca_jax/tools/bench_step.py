"""Whole-train-step throughput of the trainer's own jitted step, per model and compute dtype.

    python -m lkca_jax.tools.bench_step [--models lkca_t,lkca_b,vit_1m,vit] [--batch 128]
        [--dtype float32,bfloat16] [--steps 20] [--out bench_results/bench_step.json] [--smoke]
        [--runs K] [--forms auto,cpu,plain] [--columns fixed,pipeline]

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

import itertools
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
) -> dict:
  """Times the train step model by model: builds its (dtype, form) steps, then times them
  and the columns interleaved. After each model `on_model(results so far)` (marked
  "complete": False), so a run cut short keeps every model it finished."""
  from lkca_jax import backend  # pylint: disable=import-outside-toplevel

  load_start = os.getloadavg()
  results, compile_seconds = [], {}

  def report(complete: bool) -> dict:
    return {
      "config": bench_config(models, dtypes, forms, columns, batch, steps, overrides),
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
    for (dtype, form), case in cases.items():
      results.append(
        {
          "model": model,
          "dtype": dtype,
          "forms": form,
          "params": case.run.num_params,
          **{column: column_stats(times[((dtype, form), column)], batch) for column in columns},
          "state_dtypes": {
            "params": float_dtypes(case.state.params),
            "opt_state": float_dtypes(case.state.opt_state),
          },
        }
      )
    del cases  # the next model's programs and states in their place
    if on_model is not None:
      on_model(report(complete=False))
  return report(complete=True)


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
  m = results["machine"]
  start, end = results["load_average_start"], results["load_average_end"]
  lines.append(
    f"machine: {m['platform']}, {m['backend']} {m['device_kind']} x{m['devices']}, "
    f"{m['cpu_count']} CPUs, jax {results['jax']}, load average {start[0]:.2f} -> "
    f"{end[0]:.2f}"
  )
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
  out = cli.output_file(FLAGS.out, "--out")
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
      )
  except train.ConfigError as e:
    cli.fail(str(e))
  print(format_runs_table(results) if FLAGS.runs > 1 else format_table(results))
  print(f"wrote {cli.write_json(out, results)}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
