"""Trains at one image size, moves to another (docs/results.md, "Across resolutions").

    python -m lkca_jax.tools.resolution_transfer --config configs/tinyimagenet.py \\
        --config.dataset.classes=20 [--models lkca_t,vit_1m] [--seeds 3] [--low 32] \\
        [--high 64] [--patch_size 8] [--low_steps N] [--finetune_steps M] \\
        [--finetune_learning_rate LR] [--workdir DIR] [--out FILE.md] [--config.KEY=VALUE ...]

For each model (a preset, all seeds side by side in one process, `config.num_runs`):

1. `low`: trained at --low × --low pixels (`dataset.image_size`) for --low_steps, warming
   up for the recipe's share of them (its first tenth), as `compare` and `reproduce` do;
2. its parameters moved to --high (`init_from`; LKCA kernels both ways, "pad" and
   "resample", position tables resampled) and evaluated there untrained;
3. `finetune_<move>`: fine-tuned at --high from those parameters for --finetune_steps
   (fresh optimizer, peak learning rate --finetune_learning_rate, no warmup);
4. `scratch`: trained at --high from scratch for --low_steps + --finetune_steps.

The patch size stays --patch_size, so the grid grows from low/p to high/p. Each stage trains
in DIR/<model>/<stage>; a stage whose summary.json exists is read back, not trained again
(rerun the same command to finish an interrupted experiment: a stage stopped by SIGTERM or
Ctrl-C ends the command with one line, exit code 1, and resumes from its checkpoint). A seed
that died is left out of its cell's mean, which counts the seeds that finished. The
Markdown table (top-1 in %, mean ± sample std over the seeds, ddof 1) and its values (JSON,
same name) are written after every stage; its header names the config file and every other
key set on the command line that changes the training (`cli.config_changes`). Compiled
programs are kept in DIR/jax_cache (as `compare` does). Bad input is one `error:` line and
exit code 2 before any training.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from lkca_jax.tools import _experiment as experiment
from lkca_jax.tools import cli
from lkca_jax.tools.compare import enable_compile_cache

FLAGS = flags.FLAGS
# Config keys the table's header states or every stage sets itself; any other key set on the
# command line that changes the training is named in the header (`cli.config_changes`).
STATED = frozenset(
  {
    "batch_size",
    "dataset.classes",
    "dataset.image_size",
    "model",
    "num_runs",
    "num_train_steps",
    "patch_size",
    "seed",
  }
)
STAGE_TITLES = {
  "low": "trained at low",
  "moved": "moved to high, untrained",
  "finetune": "fine-tuned at high",
  "scratch": "from scratch at high",
}


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
  flags.DEFINE_list("models", ["lkca_t", "vit_1m"], "Model presets, one row group each.")
  flags.DEFINE_integer("seeds", 3, "Seeds side by side in one process (num_runs).")
  flags.DEFINE_integer("low", 32, "Training image size (pixels a side).")
  flags.DEFINE_integer("high", 64, "The image size moved to (pixels a side).")
  flags.DEFINE_integer("patch_size", 8, "Patch size at both image sizes.")
  flags.DEFINE_integer("low_steps", 300, "Training steps at --low.")
  flags.DEFINE_integer("finetune_steps", 100, "Fine-tuning steps at --high.")
  flags.DEFINE_float("finetune_learning_rate", 5e-4, "Peak learning rate of the fine-tuning.")
  cli.define_output_dir("workdir", "workdirs/resolution_transfer", "Where every stage trains.")
  cli.define_output_file("out", "bench_results/resolution_transfer.md", "The Markdown table.")


def stage_config(base, model: str, size: int, steps: int, *, init_from=None, kernels="pad"):
  """A stage's config: `steps` steps of `model` at `size` pixels, the seeds side by side; a
  stage from scratch warms up for the recipe's share of them (`experiment.configure`), a
  fine-tuning from `init_from` not at all."""
  config = experiment.configure(base, seed=base.seed, seeds=FLAGS.seeds, steps=steps)
  config.model = model
  config.dataset.image_size = size
  config.patch_size = FLAGS.patch_size
  config.eval_every_steps = steps  # one evaluation, at the end
  config.checkpoint_every_steps = steps
  if init_from is not None:
    config.init_from, config.init_from_kernels = init_from, kernels
    config.optimizer.learning_rate = FLAGS.finetune_learning_rate
    config.optimizer.warmup_epochs, config.optimizer.warmup_fraction = 0, None
  return config


def kernel_moves(model: str) -> tuple[str, ...]:
  """Both kernel moves for a model with an LKCA layer; one row ("-") for the others."""
  from lkca_jax import models  # pylint: disable=import-outside-toplevel
  from lkca_jax.layers.lkca import KERNEL_MOVES  # pylint: disable=import-outside-toplevel

  mixer = models.PRESETS[model].mixer
  mixers = [mixer] if isinstance(mixer, str) else list(mixer)
  return KERNEL_MOVES if "lkca" in mixers else ("-",)


def top1s(result: dict) -> list[float]:
  """Each seed's final test top-1 from a summary (train) or an evaluation result."""
  if "runs" in result and result["runs"] and "final_top1" in result["runs"][0]:
    return [r["final_top1"] for r in result["runs"]]
  return [r["top1"] for r in result["runs"]]


def train_stage(config, workdir: str, stop) -> dict:
  """The stage's summary: read back where it finished, else trained (or resumed) now.
  Raises experiment.Stopped where a signal stopped it; `stop` is the command's
  train.StopSignal, shared by its stages."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if summary["step"] == summary["total_steps"]:
      return summary
  summary = train.train_and_evaluate(config, workdir, stop=stop)
  if summary["stopped_by"]:
    raise experiment.Stopped(
      f"stopped by {summary['stopped_by']} at step {summary['step']} of {workdir}; the "
      f"stages before it are in {FLAGS.out}; run the same command to resume"
    )
  return summary


def evaluate_moved(config, workdir: str) -> dict:
  """Top-1 of the moved parameters, untrained (train.evaluate with init_from, no checkpoint)."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  path = os.path.join(workdir, "eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = train.evaluate(config, os.path.join(workdir, "no_checkpoints_here"))
  os.makedirs(workdir, exist_ok=True)
  cli.write_json(path, result)
  return result


def cell(values: list[float | None] | None) -> str:
  """Mean ± sample std in %; "…" for a stage not run yet; a seed that died (None) is left
  out, and the count of those that finished is given."""
  from lkca_jax import runs  # pylint: disable=import-outside-toplevel

  if not values:
    return "…"
  finished = [v for v in values if v is not None]
  if not finished:
    return f"– (0/{len(values)})"
  mean, std = runs.mean_std(finished)
  text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
  return text if len(finished) == len(values) else f"{text} ({len(finished)}/{len(values)})"


def render(report: dict) -> str:
  s = report["settings"]
  low, high = s["low"], s["high"]
  lines = [
    f"{s['dataset']}{f', first {c} classes' if (c := s['classes']) else ''}; "
    f"patch {s['patch_size']}: "
    f"{low}×{low} px ({low // s['patch_size']}² grid) → {high}×{high} px "
    f"({high // s['patch_size']}² grid). Top-1 % on the validation split, mean ± std over "
    f"{s['seeds']} seeds. Steps: {s['low_steps']} at {low}, {s['finetune_steps']} fine-tuning "
    f"at {high}, {s['low_steps'] + s['finetune_steps']} from scratch at {high}; batch "
    f"{s['batch_size']}; fine-tuning at a peak learning rate of {s['finetune_learning_rate']}."
    + _config_line(s),
    "",
    f"| model | kernel move | at {low} | at {high}, moved, untrained | at {high}, fine-tuned "
    f"| at {high}, from scratch |",
    "|---|---|---|---|---|---|",
  ]
  for row in report["rows"]:
    lines.append(
      f"| {row['model']} | {row['kernels']} | {cell(row.get('low'))} | "
      f"{cell(row.get('moved'))} | {cell(row.get('finetune'))} | {cell(row.get('scratch'))} |"
    )
  return "\n".join(lines) + "\n"


def _config_line(s: dict) -> str:
  changes = cli.format_config_changes(s["config_changes"])
  return f" Config `{s['config_file']}`" + (
    f", set on the command line: {changes}." if changes else "."
  )


def write(report: dict, out: str) -> None:
  cli.write_atomic(out, render(report))
  cli.write_json(os.path.splitext(out)[0] + ".json", report)


def run_model(base, model: str, report: dict, out: str, stop) -> None:
  """The four stages of one model, its rows of `report` filled in (and written) as they end.
  `stop`: the command's train.StopSignal, shared by the stages it trains."""
  root = os.path.join(FLAGS.workdir, model)
  low_dir = os.path.join(root, "low")
  rows = [r for r in report["rows"] if r["model"] == model]
  low = top1s(train_stage(stage_config(base, model, FLAGS.low, FLAGS.low_steps), low_dir, stop))
  for row in rows:
    row["low"] = low
  write_trained(report, out, low_dir, stop)
  for row in rows:
    kernels = "pad" if row["kernels"] == "-" else row["kernels"]
    moved = stage_config(base, model, FLAGS.high, 1, init_from=low_dir, kernels=kernels)
    row["moved"] = top1s(evaluate_moved(moved, os.path.join(root, f"moved_{kernels}")))
    write(report, out)
  for row in rows:
    kernels = "pad" if row["kernels"] == "-" else row["kernels"]
    config = stage_config(
      base, model, FLAGS.high, FLAGS.finetune_steps, init_from=low_dir, kernels=kernels
    )
    workdir = os.path.join(root, f"finetune_{kernels}")
    row["finetune"] = top1s(train_stage(config, workdir, stop))
    write_trained(report, out, workdir, stop)
  total = FLAGS.low_steps + FLAGS.finetune_steps
  workdir = os.path.join(root, "scratch")
  scratch = top1s(train_stage(stage_config(base, model, FLAGS.high, total), workdir, stop))
  for row in rows:
    row["scratch"] = scratch
  write_trained(report, out, workdir, stop)


def write_trained(report: dict, out: str, workdir: str, stop) -> None:
  """Writes `report` after the stage in `workdir` finished; then raises experiment.Stopped
  where a signal came too late in that stage's last step to stop it and stages are left."""
  write(report, out)
  last = os.path.join(FLAGS.workdir, FLAGS.models[-1], "scratch")
  if stop.received and workdir != last:
    raise experiment.Stopped(
      f"stopped by {stop.received} after {workdir} finished; it and the stages before it "
      f"are in {out}; run the same command to resume"
    )


def main(argv):
  del argv
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  base = FLAGS.config
  experiment.quiet_trainer_log()  # before the configs' checks start jax
  cli.output_dir(FLAGS.workdir, "--workdir")
  out = str(cli.output_file(FLAGS.out, "--out"))
  if FLAGS.seeds < 1 or FLAGS.low_steps < 1 or FLAGS.finetune_steps < 1:
    cli.fail("--seeds, --low_steps and --finetune_steps must be >= 1")
  try:
    experiment.check_once(FLAGS.models, "--models", "model")
  except experiment.UsageError as e:
    cli.fail(str(e))
  if FLAGS.low % FLAGS.patch_size or FLAGS.high % FLAGS.patch_size:
    cli.fail(f"--patch_size {FLAGS.patch_size} must divide --low and --high")
  try:
    for model in FLAGS.models:  # every config that can be checked before training
      train.Run.prepare(stage_config(base, model, FLAGS.low, FLAGS.low_steps))
      train.Run.prepare(stage_config(base, model, FLAGS.high, FLAGS.low_steps))
  except train.ConfigError as e:
    cli.fail(str(e))
  settings = {
    "config_file": config_flags.get_config_filename(FLAGS["config"]),
    "config_changes": cli.config_changes(FLAGS["config"], STATED),
    "dataset": base.dataset.name,
    "classes": base.dataset.classes,
    "seeds": FLAGS.seeds,
    "low": FLAGS.low,
    "high": FLAGS.high,
    "patch_size": FLAGS.patch_size,
    "low_steps": FLAGS.low_steps,
    "finetune_steps": FLAGS.finetune_steps,
    "finetune_learning_rate": FLAGS.finetune_learning_rate,
    "batch_size": base.batch_size,
    "machine": cli.machine_info(),
  }
  rows = [{"model": m, "kernels": k} for m in FLAGS.models for k in kernel_moves(m)]
  report = {"settings": settings, "rows": rows}
  enable_compile_cache(os.path.join(FLAGS.workdir, "jax_cache"))  # the two fine-tunings: one
  stop = train.StopSignal()  # one for every stage: it keeps a signal that came in a last step
  try:
    for model in FLAGS.models:
      run_model(base, model, report, out, stop)
  except train.REPORTED_ERRORS as e:  # the data or a workdir, found when a stage starts
    cli.fail_training(e)
  except experiment.Stopped as e:
    print(e, file=sys.stderr)
    return 1
  print(render(report))
  return 0


if __name__ == "__main__":
  cli.run(main, "python -m lkca_jax.tools.resolution_transfer", define_flags=define_flags)
