"""Train or evaluate an LKCA / ViT model from an ml_collections config.

    python main.py --config configs/tinyimagenet.py [--workdir DIR] [--config.KEY=VALUE ...]
    python main.py --config configs/digits.py --mode eval [--checkpoint DIR/checkpoints/STEP]
    python main.py --config configs/workdir.py:DIR --mode eval    # DIR's run, its own config

The workdir defaults to workdirs/<config name> (DIR for configs/workdir.py:DIR); running
the same command again resumes from the latest checkpoint there. Bad input (unknown preset,
dataset or config key, impossible shapes, unprepared data) is reported in
one line with exit code 2 before anything is compiled.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before jaxlib and TensorFlow load

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lkca_jax.tools import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, logs and summary.json go (default: workdirs/<config name>, or DIR "
    "for configs/workdir.py:DIR).",
  )
  flags.DEFINE_enum(
    "mode", "train", ["train", "eval"], "Train (and resume), or evaluate a checkpoint."
  )
  flags.DEFINE_string("checkpoint", None, "With --mode eval: a checkpoint step directory.")
  cli.define_output_dir(
    "compilation_cache",
    None,
    "JAX's persistent compilation cache: a rerun or resume of the same model, batch and "
    "dtype loads its compiled steps (minutes of compiling on a GPU). Default: "
    f"$JAX_COMPILATION_CACHE_DIR, else {cli.COMPILATION_CACHE} in $LKCA_JAX_CACHE_DIR or "
    "~/.cache/lkca_jax; '' turns it off.",
  )
  flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first: one process per "
    "host (TPU pod slices, multi-node GPU under SLURM/MPI/Kubernetes).",
  )
  flags.DEFINE_string(
    "coordinator",
    None,
    "With --multihost: HOST:PORT of process 0 (default: "
    "$JAX_COORDINATOR_ADDRESS, else detected from the cluster).",
  )
  flags.DEFINE_integer(
    "num_processes",
    None,
    "With --multihost: the number of processes (default: $JAX_NUM_PROCESSES, else detected).",
  )
  flags.DEFINE_integer(
    "process_id",
    None,
    "With --multihost: this process's rank (default: $JAX_PROCESS_ID, else detected).",
  )
  flags.DEFINE_bool(
    "log_all_processes",
    False,
    "With --multihost: every process logs, not only process 0 (warnings and errors always show).",
  )


# Flags read only beside another: given without it, they would be dropped unseen.
MULTIHOST_FLAGS = ("coordinator", "num_processes", "process_id", "log_all_processes")


def check_flag_pairs() -> None:
  if FLAGS.checkpoint is not None and FLAGS.mode != "eval":
    cli.fail(
      "--checkpoint is read only with --mode eval; to train from another run's weights pass "
      "--config.init_from=WORKDIR, to resume a run give its --workdir"
    )
  if not FLAGS.multihost:
    for name in MULTIHOST_FLAGS:
      if FLAGS[name].present and FLAGS[name].value is not False:  # --process_id=0 too
        cli.fail(f"--{name} is read only with --multihost (one process per host); add it")


def main(argv):
  del argv  # cli.run refuses positional arguments
  from lkca_jax import distributed

  check_flag_pairs()
  cli.use_compilation_cache(FLAGS.compilation_cache)  # before anything compiles

  if FLAGS.multihost:
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    distributed.exit_on_failure(_main)  # a failed process must not hold the others
  else:
    _main()


def _main():
  import jax

  from lkca_jax import distributed, runs, train

  config = FLAGS.config
  workdir = FLAGS.workdir or cli.default_workdir()
  lead = jax.process_index() == 0
  logging.set_verbosity(logging.INFO if lead or FLAGS.log_all_processes else logging.WARNING)
  try:
    if FLAGS.multihost:  # before anything is built: a mismatch would deadlock later
      distributed.check_same_everywhere(
        config.to_json_best_effort(sort_keys=True), os.path.abspath(workdir)
      )
    if FLAGS.mode == "eval":
      result = train.evaluate(config, workdir, FLAGS.checkpoint)
      if lead:
        many = len(result["runs"]) > 1
        for r in result["runs"] if many else []:  # each, then their mean
          print(
            f"eval {result['checkpoint']} run {r['run']} "
            f"({runs.run_name(r['seed'], r['values'])}): "
            f"top1 {r['top1']:.4f} top5 {r['top5']:.4f} loss {r['loss']:.4f}{averaged(r)}"
          )
        print(
          f"eval {result['checkpoint']}{' mean' if many else ''}: "
          f"top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f}"
          f"{averaged(result)}"
        )
      return
    summary = train.train_and_evaluate(config, workdir)
  except train.REPORTED_ERRORS as e:
    cli.fail_training(e)
  if not lead:  # one report for the job
    return
  if summary["stopped_by"]:
    print(
      f"stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint saved in "
      f"{workdir}. Run the same command to resume."
    )
    return
  if summary["num_runs"] > 1:
    print_runs(config, summary, workdir)
    return
  average = (
    f"moving average final top1 {summary['final_ema_top1']:.4f}, "
    f"best {summary['best_ema_top1']:.4f}, "
    if "final_ema_top1" in summary
    else ""
  )
  print(
    f"{config.model} on {config.dataset.name}: final top1 {summary['final_top1']:.4f}, "
    f"best top1 {summary['best_top1']:.4f} (step {summary['best_step']}), {average}"
    f"{summary['params']:,} params, {summary['wall_seconds']:.0f}s; "
    f"summary in {workdir}/summary.json"
  )


def averaged(result: dict) -> str:
  """The evaluation of the parameters' moving average (ema_decay > 0), where there is one."""
  if "ema_top1" not in result:
    return ""
  return (
    f"; moving average top1 {result['ema_top1']:.4f} top5 {result['ema_top5']:.4f} "
    f"loss {result['ema_loss']:.4f}"
  )


def print_runs(config, summary, workdir) -> None:
  """One line per swept combination (mean ± sample std over its seeds), one per dead run."""
  from lkca_jax import runs

  def cell(group, key):
    mean, std = group[f"{key}_mean"], group[f"{key}_std"]
    return "–" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")

  print(
    f"{config.model} on {config.dataset.name}: {summary['num_runs']} runs, "
    f"{summary['params']:,} params each, {summary['wall_seconds']:.0f}s"
  )
  for group in summary["groups"]:
    values = runs.describe_values(group["values"]) or "all runs"
    average = (
      f", moving average final top1 {cell(group, 'final_ema_top1')}"
      if "final_ema_top1_mean" in group
      else ""
    )
    print(
      f"  {values}: final top1 {cell(group, 'final_top1')}, best top1 "
      f"{cell(group, 'best_top1')}{average} over seeds {group['finished_seeds']}"
    )
  for r in summary["runs"]:
    if r["died_at_step"] is not None:
      name = runs.run_name(r["seed"], r["values"])
      print(f"  run {r['run']} ({name}) died: loss non-finite at step {r['died_at_step']}")
  print(f"summary in {workdir}/summary.json")


if __name__ == "__main__":
  cli.run(main, "main.py", define_flags=define_flags)
