"""Configurations × seeds → a table: the experiment runner behind `compare` and `reproduce`.

An experiment is a list of rows. A row is one config trained for S seeds side by side in
one process (`config.num_runs` = S, seeds config.seed .. config.seed + S − 1: one vmapped
step, one `train.train_and_evaluate`; run k is exactly the single run of its seed) in
DIR/<row name>, with each finished seed's own values in DIR/<row name>/seed<k>/summary.json.

Everything that can fail on input fails in `prepare`, before the first step: each row's
config, data and model (`train.Run.prepare`), and its directory, by one of two policies:

- fresh (compare): an existing row directory is refused, or with `overwrite` deleted
  (only one that a training run wrote);
- resume (reproduce): a row whose DIR/<name>/row.json exists finished in an earlier
  invocation and is read back (it must hold this invocation's config); an interrupted row
  resumes from its checkpoints, and one whose training finished is read from its
  summary.json, not trained again.

After every row the command's Markdown table and the values behind it (JSON, same name)
are rewritten atomically, so an interrupted experiment keeps its finished rows. In the JSON
every top-1 is a fraction, as in summary.json; a row's statistics are over its seeds that
finished: the mean and the sample standard deviation (`runs.mean_std`, ddof 1). A seed
whose loss became non-finite is listed with its error; the command then exits 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from lkca_jax.tools import cli

ROW_FILE = "row.json"  # resume: a finished row's values; its presence marks the row done
# What a directory must hold for `overwrite` to delete it: something train_and_evaluate wrote.
RUN_DIR_MARKERS = ("config.json", "summary.json", "checkpoints")


class UsageError(ValueError):
  """Input the experiment cannot run with; the message names the fix."""


class Stopped(RuntimeError):
  """Training stopped by a signal; the row keeps its checkpoints and stays unfinished."""


@dataclasses.dataclass
class Row:
  """One configuration: its name (its directory under the experiment's), config and values."""

  name: str
  config: Any  # trains config.num_runs seeds from config.seed (see `configure`)
  values: dict = dataclasses.field(default_factory=dict)  # its row of the JSON
  run: Any = None  # its train.Run, once prepared
  done: bool = False  # resume: finished by an earlier invocation


@dataclasses.dataclass
class Experiment:
  directory: str  # row r trains in DIR/<r.name>
  table: str  # the Markdown table's path; the JSON goes next to it, same name
  flag: str  # the command-line flag that names `directory`, for error messages
  settings: dict
  rows: list[Row]
  render: Callable[[dict], str]  # the report ({"settings", "rows"}) → the Markdown table
  resume: bool = False
  overwrite: bool = False

  @property
  def values_path(self) -> str:
    return os.path.splitext(self.table)[0] + ".json"

  def path(self, row: Row) -> str:
    return os.path.join(self.directory, row.name)

  def report(self) -> dict:
    return {"settings": self.settings, "rows": [row.values for row in self.rows]}

  def write(self) -> None:
    report = self.report()
    cli.write_atomic(self.table, self.render(report))
    cli.write_json(self.values_path, report)


# --- building rows ----------------------------------------------------------------
def configure(base, *, seed: int, seeds: int, steps: int | None):
  """A copy of `base` that trains `seeds` runs from `seed` (for `steps` steps, when given).

  Shortened, a per-step schedule keeps its shape: the warmup is the share of the run that
  `base`'s warmup is of its epochs, where the epochs' warmup could outlast the proxy."""
  config = copy.deepcopy(base)
  config.seed, config.num_runs = seed, seeds
  if steps is not None:
    config.num_train_steps = steps
    if config.optimizer.warmup_fraction is None:
      from lkca_jax import schedules  # pylint: disable=import-outside-toplevel

      config.optimizer.warmup_fraction = schedules.warmup_share(config)
  return config


def check_once(names: list[str], flag: str, what: str) -> None:
  if len(set(names)) != len(names):
    raise UsageError(f"{flag} {','.join(names)} names a {what} twice; list each once")


def quiet_trainer_log() -> None:
  """One progress line a row; --verbosity=0 shows the trainer's own log."""
  from absl import flags, logging  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fingerprint(config) -> dict:
  """What makes a finished row this invocation's: the config it trained (seeds included)."""
  return {"config": json.loads(config.to_json_best_effort())}


# --- before the first step ---------------------------------------------------------
def prepare(experiment: Experiment) -> None:
  """Raises UsageError for anything the experiment cannot run with; trains nothing."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  for row in experiment.rows:
    row.values = {"name": row.name, **row.values, "runs": [], **statistics([])}
    if experiment.resume:
      read_back(experiment, row)
  try:
    for row in experiment.rows:
      if not row.done:
        row.run = train.Run.prepare(row.config)  # validates config, data and model
  except train.ConfigError as e:
    raise UsageError(str(e)) from None
  if not experiment.resume:
    paths = [experiment.path(row) for row in experiment.rows]
    clear_run_dirs(paths, overwrite=experiment.overwrite, flag=experiment.flag)


def read_back(experiment: Experiment, row: Row) -> None:
  """Resume: takes `row`'s values from its row.json, if an earlier invocation finished it."""
  from lkca_jax import run_files  # pylint: disable=import-outside-toplevel

  path = os.path.join(experiment.path(row), ROW_FILE)
  values = read_json(path)
  if values is not None and values.get("settings") != fingerprint(row.config):
    raise UsageError(
      f"{path} is a finished row with other settings (config, steps or seeds); "
      f"pass another {experiment.flag}"
    )
  summary = run_files.finished_summary(experiment.path(row))
  if summary is not None and summary["config"] != fingerprint(row.config)["config"]:
    raise UsageError(
      f"{experiment.path(row)} holds a finished training with other settings (config, "
      f"steps or seeds); pass another {experiment.flag}"
    )
  if values is not None:
    row.values, row.done = values, True
    return
  changes = run_files.config_changes(epath.Path(experiment.path(row)), row.config)
  if changes:  # found now, not when the rows before it have trained
    raise UsageError(
      f"{experiment.path(row)} holds checkpoints of a run with other settings "
      f"({'; '.join(changes[:3])}); rerun with the settings it started with, or pass "
      f"another {experiment.flag}"
    )


def clear_run_dirs(paths: list[str], *, overwrite: bool, flag: str) -> None:
  """Fresh: refuses (UsageError) if any run directory exists, or deletes them with `overwrite`."""
  existing = [p for p in paths if os.path.exists(p)]
  if not existing:
    return
  if not overwrite:
    raise UsageError(
      f"run directory {existing[0]} already exists ({len(existing)} of "
      f"{len(paths)}); pass --overwrite to delete and retrain, or another {flag}"
    )
  for path in existing:
    if not os.path.isdir(path) or not any(
      os.path.exists(os.path.join(path, m)) for m in RUN_DIR_MARKERS
    ):
      raise UsageError(
        f"{path} exists but is not a training run directory; --overwrite "
        f"deletes only those: move it away or pass another {flag}"
      )
  for path in existing:
    shutil.rmtree(path)


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# --- training ------------------------------------------------------------------------
def run(experiment: Experiment) -> int:
  """Trains every row not done, rewriting the table after each; returns the exit code."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  experiment.settings.update(argv=sys.argv, std_ddof=1, started=time.strftime("%F %T"))
  stop = train.StopSignal()  # one for every row: it keeps a signal that came in a last step
  for index, row in enumerate(experiment.rows, start=1):
    if row.done:
      print(f"skipped {row.name}: finished ({experiment.path(row)}/{ROW_FILE})", flush=True)
      continue
    try:
      row.values.update(train_row(experiment, row, stop))
    except Stopped as e:
      experiment.write()
      print(str(e), file=sys.stderr)
      return 1
    except train.REPORTED_ERRORS as e:  # the rows done so far are kept
      experiment.write()
      cli.fail_training(e)
    if experiment.resume and row.values["finished_seeds"]:  # a row that failed is retried
      cli.write_json(os.path.join(experiment.path(row), ROW_FILE), row.values)
    experiment.write()
    print(f"[{index}/{len(experiment.rows)}] {progress(row.values)}", flush=True)
    if stop.received and not all(r.done for r in experiment.rows[index:]):
      print(stopped_message(experiment, row, stop.received, finished=True), file=sys.stderr)
      return 1
  experiment.settings["finished"] = time.strftime("%F %T")
  experiment.write()
  print(experiment.render(experiment.report()))
  print(f"table: {experiment.table}; values: {experiment.values_path}")
  return 1 if failures(experiment.report()) else 0


def stopped_message(experiment: Experiment, row: Row, signal_name: str, finished=False) -> str:
  """What a stop by `signal_name` while `row` trained (or, `finished`, in its last step)
  leaves, and how to go on."""
  kept = [r.name for r in experiment.rows[: experiment.rows.index(row) + finished]]
  if experiment.resume:
    again = "run the same command to resume"
  elif kept:
    which = "up to" if finished else "before"
    again = (
      f"the rows {which} it ({', '.join(kept)}) are in {experiment.table}; rerun with "
      "--overwrite to start over"
    )
  else:
    again = "no row finished; rerun with --overwrite to start over"
  when = f"after {row.name} finished" if finished else f"during {row.name}"
  return f"stopped by {signal_name} {when} ({experiment.path(row)}); {again}"


def train_row(experiment: Experiment, row: Row, stop) -> dict:
  """Trains `row`'s seeds (or reads back a training that finished); returns its values.
  `stop`: the experiment's train.StopSignal, shared by its rows."""
  from lkca_jax import run_files, train  # pylint: disable=import-outside-toplevel

  path = experiment.path(row)
  summary = run_files.finished_summary(path) if experiment.resume else None
  if summary is None:
    try:
      summary = train.train_and_evaluate(row.config, path, run=row.run, stop=stop)
    except train.NonFiniteLossError as e:  # every seed died
      seeds = range(row.config.seed, row.config.seed + row.config.num_runs)
      return {"runs": [{"seed": s, "error": str(e)} for s in seeds], **statistics([])}
    finally:
      row.run = None  # its model and data are not needed any more
    if summary["stopped_by"]:
      raise Stopped(stopped_message(experiment, row, summary["stopped_by"]))
  records = seed_records(summary)
  for record in records:
    if "error" not in record:
      write_seed_summary(path, summary, record)
  return {**row_values(row.config, summary, path), "runs": records, **statistics(records)}


def seed_records(summary: dict) -> list[dict]:
  """Per seed of a summary: its top-1 values and its share of the process's speed and wall
  time, or the reason it has none."""
  share = 1 / len(summary["runs"])  # one process trained them all
  speed = summary["train_images_per_second"]
  records = []
  for r in summary["runs"]:
    if r["died_at_step"] is not None or r["final_top1"] is None:
      why = f"loss became non-finite at step {r['died_at_step']}" if r["died_at_step"] else None
      records.append({"seed": r["seed"], "error": why or "never evaluated"})
      continue
    records.append(
      {
        "seed": r["seed"],
        "final_top1": r["final_top1"],
        "best_top1": r["best_top1"],
        "best_step": r["best_step"],
        "train_images_per_second": speed * share if speed else None,
        "wall_seconds": summary["wall_seconds"] * share,
      }
    )
  return records


def row_values(config, summary: dict, path: str) -> dict:
  """What a row's summary says about all its seeds alike."""
  from lkca_jax import schedules  # pylint: disable=import-outside-toplevel

  warmup = schedules.warmup_steps(
    config.optimizer, summary["steps_per_epoch"], summary["total_steps"]
  )
  return {
    "workdir": path,
    "params": summary["params"],
    "devices": summary["devices"],
    "dataset": summary["dataset"],
    "train_images": summary["train_images"],
    "test_images": summary["test_images"],
    "steps": summary["total_steps"],
    "recipe_steps": config.num_epochs * summary["steps_per_epoch"],  # without --steps
    "warmup_steps": min(warmup, summary["total_steps"]),
    "wall_seconds": summary["wall_seconds"],
    "machine": cli.machine_info(),
    "settings": fingerprint(config),
    "finished": time.strftime("%F %T"),
  }


def statistics(records: list[dict]) -> dict:
  """Mean and sample std (ddof 1) of the finished seeds' top-1 values; their mean speed."""
  from lkca_jax.runs import mean_std  # pylint: disable=import-outside-toplevel

  done = [r for r in records if "error" not in r]
  values = {"finished_seeds": [r["seed"] for r in done]}
  for key in ("final_top1", "best_top1"):
    values[f"{key}_mean"], values[f"{key}_std"] = mean_std([r[key] for r in done])
  speeds = [r["train_images_per_second"] for r in done if r["train_images_per_second"]]
  values["train_images_per_second_mean"] = mean_std(speeds)[0]
  return values


def write_seed_summary(path: str, summary: dict, record: dict) -> None:
  """PATH/seed<k>/summary.json: one seed's values of a many-run summary, shaped as its own."""
  config = copy.deepcopy(summary["config"])
  config.update(seed=record["seed"], num_runs=1)
  seed_summary = {k: v for k, v in summary.items() if k not in ("runs", "groups")}
  seed_summary.update(record, config=config, num_runs=1)
  cli.write_json(os.path.join(path, f"seed{record['seed']}", "summary.json"), seed_summary)


# --- what the tables share ----------------------------------------------------------
def percent(fraction, std=None, *, signed: bool = False) -> str:
  """A top-1 fraction as a table cell in %, with its std when there is one; "–" for none."""
  if fraction is None:
    return "–"
  text = f"{100 * fraction:+.2f}" if signed else f"{100 * fraction:.2f}"
  return text + (f" ± {100 * std:.2f}" if std is not None else "")


def duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def failures(report: dict) -> list[str]:
  """ "NAME seed K: why" for every seed of the report that has no values."""
  return [
    f"{row['name']} seed {r['seed']}: {r['error']}"
    for row in report["rows"]
    for r in row.get("runs", [])
    if "error" in r
  ]


def progress(values: dict) -> str:
  """The line a finished row prints."""
  seeds, done = len(values["runs"]), len(values["finished_seeds"])
  speed = values["train_images_per_second_mean"]
  line = (
    f"{values['name']}: final top-1 {percent(values['final_top1_mean'], values['final_top1_std'])}"
    f" %, best {percent(values['best_top1_mean'], values['best_top1_std'])} %, "
    f"{done}/{seeds} seeds finished"
  )
  if "wall_seconds" in values:
    line += f", {speed or 0:.0f} images/s a seed, {duration(values['wall_seconds'])}"
  return line
