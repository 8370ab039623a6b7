"""Training throughput with the per-image augmentation on and off, interleaved in one process.

    python -m lkca_jax.tools.bench_pipeline --config configs/tinyimagenet.py \\
        [--config.model=lkca_b] [--steps 20] [--block 1] [--out bench_results/pipeline.json] \\
        [--config.KEY=VALUE ...]

A timed step is what the trainer does per step: `pipeline.train_batch` (gather
+ per-image augmentation) then the jitted `train_step`, blocked until ready.
"on" uses the config's augmentation; "off" turns the per-image steps off
(flip False, crop_padding 0, autoaugment None, random_erasing 0: normalise
only). Batch-level CutMix / Mixup run inside the train step, unchanged in both.
The modes alternate in blocks of --block steps (A B B A order), so load from
other processes hits both alike; compilation and a warm-up step per mode are
excluded, and the MEDIAN step time gives images/s.

Three on/off throughput ratios are reported: "ratio", of the median images/s;
"paired_ratio", the median over k of off_k / on_k (the k-th steps of the two
modes ran side by side, under one load); "additive_ratio", off step /
(off step + on batch - off batch), which rests on the batch timings: short,
so steady even on a busy machine. Also timed, interleaved the same way:
`pipeline.train_batch` alone, `jit(augment_batch)` alone on a fixed batch, and
(unless --nobreakdown) augment_batch with one enabled stage on at a time, to
show where the augmentation time goes.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS

# The input pipeline's goal: training with augmentation at least 85% as fast as without.
TARGET_RATIO = 0.85
MODES = ("on", "off")


def augment_off(augment):
  """The same AugmentConfig with every per-image random step off (normalise only)."""
  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel

  return augment_lib.stages_off(augment)


def pipeline_with_augment(pipeline, augment, key):
  """A second Pipeline over the same images and labels, with another augmentation."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lkca_jax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel

  arrays = lambda split: (np.asarray(split.images), np.asarray(split.labels))
  return pipeline_lib.Pipeline(
    pipeline.mesh,
    arrays(pipeline.train),
    arrays(pipeline.test),
    global_batch=pipeline.global_batch,
    repeats=pipeline.repeats,
    augment=augment,
    key=key,
    placement=pipeline.placement,
    epoch_order=pipeline.order,
    epoch_length=pipeline.epoch_length,
  )


def interleaved_times(
  runs: dict[str, Callable[[int], float]], count: int, block: int
) -> dict[str, list[float]]:
  """`count` timings of each `runs[name](index) -> seconds`, in alternating blocks.

  Blocks go A B B A A B ...: each mode is as often first as second, so a
  trend in machine load does not favour either. `index` counts all calls.
  """
  names = list(runs)
  times = {name: [] for name in names}
  index = 0
  for round_ in range(-(-count // block)):
    for name in names if round_ % 2 == 0 else names[::-1]:
      for _ in range(min(block, count - len(times[name]))):
        times[name].append(runs[name](index))
        index += 1
  return times


def median_ms(seconds: list[float]) -> float:
  return 1e3 * statistics.median(seconds)


class TrainLoop:
  """Times the trainer's own step (`Training.step`: batch, then the jitted update).

  One donated state is threaded through both modes; each mode is a Training
  with its own pipeline. The epoch order is drawn outside the timed span, as
  the trainer draws it once an epoch.
  """

  def __init__(self, trainings: dict):
    self.trainings = trainings
    self.state = next(iter(trainings.values())).state

  def step(self, mode: str, step: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel

    training = self.trainings[mode]
    jax.block_until_ready(training.epoch_order(step // training.pipeline.steps_per_epoch))
    start = time.perf_counter()
    self.state, metrics = training.step(self.state, step)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start


def timed_call(fn, *args) -> float:
  import jax  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def augment_stages(augment) -> dict:
  """name -> AugmentConfig with only that stage of `augment` on, for each enabled stage.

  Timing augment_batch with each times a stage as augment_batch runs it;
  every one includes the normalisation, which "normalize" times alone. The
  stages and their order are augment.STAGES, the ones augment_batch runs.
  """
  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel

  return {stage.name: stage.alone(augment) for stage in augment_lib.enabled_stages(augment)}


def summarize(step_times: dict, batch_ms: dict, batch: int) -> dict:
  """Per-mode medians and the three on/off ratios from raw step times (seconds).

  "ratio" divides the median images/s; "paired_ratio" is the median over k of
  off_k / on_k (the k-th steps of both modes ran side by side, under one load);
  "additive_ratio" is off / (off + on batch − off batch): the steps run one
  after the other, so on = off + the extra batch time, and this ratio rests
  on the short, low-noise batch timings.
  """
  results = {}
  for name in MODES:
    ms = median_ms(step_times[name])
    results[name] = {
      "median_step_ms": ms,
      "images_per_second": batch / (ms / 1e3),
      "step_ms": [1e3 * t for t in step_times[name]],
    }
  off_ms = results["off"]["median_step_ms"]
  pairs = zip(step_times["on"], step_times["off"], strict=True)
  return {
    **results,
    "ratio": results["on"]["images_per_second"] / results["off"]["images_per_second"],
    "paired_ratio": statistics.median(off_s / on_s for on_s, off_s in pairs),
    "additive_ratio": off_ms / (off_ms + batch_ms["on"] - batch_ms["off"]),
  }


def run_benchmark(config, *, steps: int, block: int, breakdown: bool = True, log=print) -> dict:
  """Builds the trainer's pieces from `config` and times both modes; returns the results."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  load_start = os.getloadavg()
  run = train.Run.prepare(config)
  start = time.perf_counter()
  training = train.build_training(run, config)
  load_seconds = time.perf_counter() - start
  on = training.pipeline
  pipelines = {
    "on": on,
    "off": pipeline_with_augment(on, augment_off(on.augment), jax.random.key(config.seed)),
  }
  log(
    f"data on {on.placement} in {load_seconds:.1f}s; compiling "
    f"{config.model} ({run.num_params:,} params) at batch {config.batch_size}"
  )
  compile_seconds, step_times = time_train_steps(training, pipelines, steps, block)
  images = np.asarray(on.train.images[: config.batch_size])
  keys = lambda i: jax.random.fold_in(jax.random.key(config.seed), i)  # noqa: E731
  batch_times, augment_times = time_pipelines(pipelines, images, keys, steps, block)
  stages = time_stages(on.augment, images, keys, steps) if breakdown else {}
  batch_ms = {name: median_ms(batch_times[name]) for name in MODES}
  return {
    "config": {
      "model": config.model,
      "dataset": config.dataset.name,
      "params": run.num_params,
      "batch_size": config.batch_size,
      "dtype": config.dtype,
    },
    "augment": {
      "on": dataclasses.asdict(on.augment),
      "off": dataclasses.asdict(augment_off(on.augment)),
    },
    "note": (
      "'off' turns only the per-image augmentation off; batch-level CutMix/Mixup "
      "(inside the train step) are the same in both modes"
    ),
    "steps": steps,
    "block": block,
    **judged(summarize(step_times, batch_ms, config.batch_size)),
    "pipeline_batch_ms": batch_ms,
    "augment_batch_ms": {name: median_ms(augment_times[name]) for name in MODES},
    "augment_stage_ms": stages,
    "load_seconds": load_seconds,
    "compile_seconds": compile_seconds,
    "machine": {
      **cli.machine_info(),
      "load_average_start": load_start,
      "load_average_end": os.getloadavg(),
    },
  }


def judged(summary: dict) -> dict:
  return {
    "train": summary,
    "target_ratio": TARGET_RATIO,
    "meets_target": summary["ratio"] >= TARGET_RATIO,
  }


def time_train_steps(training, pipelines, steps: int, block: int) -> tuple[float, dict]:
  """(seconds to compile and warm up, the whole train step's times in both modes,
  interleaved)."""
  loop = TrainLoop(
    {"on": training, "off": dataclasses.replace(training, pipeline=pipelines["off"])}
  )
  start = time.perf_counter()
  for name in MODES:  # compile, then one warm step each: excluded from the timings
    loop.step(name, 0)
    loop.step(name, 1)
  compile_seconds = time.perf_counter() - start
  base = 2  # steps already taken
  return compile_seconds, interleaved_times(
    {name: (lambda i, n=name: loop.step(n, base + i)) for name in MODES}, steps, block
  )


def time_pipelines(pipelines, images, keys, steps: int, block: int) -> tuple[dict, dict]:
  """(the pipeline's batch alone, the augmentation alone on a fixed batch), in both modes."""
  import jax  # pylint: disable=import-outside-toplevel

  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel

  orders = {name: pipelines[name].epoch_order(0) for name in MODES}
  augments = {
    name: jax.jit(lambda key, x, a=pipelines[name].augment: augment_lib.augment_batch(key, x, a))
    for name in MODES
  }
  spe = pipelines["on"].steps_per_epoch
  for name in MODES:  # compile
    jax.block_until_ready(pipelines[name].train_batch(orders[name], 0))
    jax.block_until_ready(augments[name](keys(0), images))
  batch_times = interleaved_times(
    {
      name: (lambda i, n=name: timed_call(pipelines[n].train_batch, orders[n], i % spe))
      for name in MODES
    },
    steps,
    block,
  )
  augment_times = interleaved_times(
    {name: (lambda i, n=name: timed_call(augments[n], keys(i), images)) for name in MODES},
    steps,
    block,
  )
  return batch_times, augment_times


def time_stages(augment, images, keys, steps: int) -> dict:
  """Median milliseconds of each augmentation stage alone on a fixed batch."""
  import jax  # pylint: disable=import-outside-toplevel

  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel

  functions = {
    name: jax.jit(lambda key, x, a=stage: augment_lib.augment_batch(key, x, a))
    for name, stage in augment_stages(augment).items()
  }
  for fn in functions.values():  # compile
    jax.block_until_ready(fn(keys(0), images))
  stage_times = interleaved_times(
    {name: (lambda i, f=fn: timed_call(f, keys(i), images)) for name, fn in functions.items()},
    steps,
    1,
  )
  return {name: median_ms(t) for name, t in stage_times.items()}


def format_table(results: dict) -> str:
  t, m, c = results["train"], results["machine"], results["config"]
  lines = [
    f"{c['model']} on {c['dataset']}, batch {c['batch_size']}, median of {results['steps']} "
    f"steps a mode (blocks of {results['block']}, interleaved)",
    f"{'augmentation':<14}{'images/s':>10}{'step ms':>10}{'batch ms':>10}{'augment ms':>12}",
  ]
  for name in MODES:
    lines.append(
      f"{name:<14}{t[name]['images_per_second']:>10.1f}"
      f"{t[name]['median_step_ms']:>10.1f}{results['pipeline_batch_ms'][name]:>10.1f}"
      f"{results['augment_batch_ms'][name]:>12.1f}"
    )
  verdict = "meets" if results["meets_target"] else "BELOW"
  lines.append(
    f"ratio on/off: {t['ratio']:.3f} ({verdict} the {results['target_ratio']:.0%} "
    "target); "
    f"median of paired step ratios {t['paired_ratio']:.3f}; off step / (off step + "
    f"extra batch ms) {t['additive_ratio']:.3f}"
  )
  if results["augment_stage_ms"]:
    lines.append(
      "augment_batch with one stage on (ms a batch, each + normalize): "
      + ", ".join(f"{k} {v:.1f}" for k, v in results["augment_stage_ms"].items())
    )
  lines.append(
    "step: train_batch + train_step; batch: pipeline.train_batch alone (gather + "
    "augment); augment: jit(augment_batch) alone"
  )
  lines.append(results["note"])
  lines.append(cli.machine_line(m, m["load_average_start"][0], m["load_average_end"][0]))
  return "\n".join(lines)


def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
  )
  flags.DEFINE_integer("steps", 20, "Timed steps per mode.")
  flags.DEFINE_integer("block", 1, "Steps per block; the modes alternate block by block.")
  cli.define_output_file("out", "bench_results/pipeline.json", "Where the JSON results go.")
  flags.DEFINE_bool("breakdown", True, "Also time each augmentation stage alone.")


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  if FLAGS.steps < 1 or FLAGS.block < 1:
    cli.fail(f"--steps and --block must be at least 1, got {FLAGS.steps} and {FLAGS.block}")
  out = cli.output_file(FLAGS.out, "--out")
  from absl import logging  # pylint: disable=import-outside-toplevel

  from lkca_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  logging.set_verbosity(logging.WARNING)
  try:
    results = run_benchmark(
      FLAGS.config, steps=FLAGS.steps, block=FLAGS.block, breakdown=FLAGS.breakdown
    )
  except (train.ConfigError, data_lib.DatasetUnavailableError) as e:
    cli.fail(str(e))
  print(format_table(results))
  print(f"wrote {cli.write_json(out, results)}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
