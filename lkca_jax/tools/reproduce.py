"""Trains the paper's ViT / ViT-LKCA pairs of one results table and sets ours beside theirs.

    python -m lkca_jax.tools.reproduce --table cifar10|cifar100|svhn|tinyimagenet \
        [--rows vit_1m,lkca_t] [--steps N] [--runs K] [--out DIR] \
        [--config FILE] [--config.KEY=VALUE ...]

Every row of the table (`lkca_jax.paper`, the paper's numbers kept once) is a
preset; --rows picks some (default: all of the table).
A row is K runs (--runs, default 1) with seeds config.seed .. config.seed + K − 1,
trained side by side in one process (`config.num_runs`: one vmapped step, one
`train.train_and_evaluate`), all with the table's dataset config
(configs/<table>.py, the full reference recipe) unless --config names another
(the tests run the cifar10 rows on configs/digits.py). --steps N sets
config.num_train_steps: a shortened proxy, which the table says it is.

A row's run directory is OUT/<preset> (OUT: --out, default
workdirs/reproduce_<table>). A finished row writes OUT/<preset>/row.json
(atomically); it is the marker that the row is done, and a later invocation
skips that row ("skipped ..." on stdout) and reads its values back. A row
interrupted mid-training resumes from its checkpoints; one whose training
finished is read from its summary.json, not trained again. A finished row
whose settings (the row's config and K) differ from this invocation's is an
error: pass another --out.

After every row, OUT/table.md and OUT/table.json are rewritten (atomically):
per row the paper's top-1, ours (final top-1 on the whole test split, in %,
mean ± sample std over the runs, read from the runs' summary.json), ours −
paper, the best top-1 (mean), parameters, steps per run, the training wall
time of all runs and the machine.

Bad input is one `error:` line on stderr and exit code 2 before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lkca_jax import paper  # noqa: E402
from lkca_jax.tools import cli  # noqa: E402
from lkca_jax.tools.cli import fail, machine_info, write_atomic, write_json  # noqa: E402

FLAGS = flags.FLAGS

TABLES = tuple(paper.TABLES)
ROW_FILE = "row.json"  # a finished row's values; its presence marks the row done


@dataclasses.dataclass(frozen=True)
class PaperRow:
  preset: str
  paper_name: str
  paper_top1: float  # %


def paper_rows(table: str) -> list[PaperRow]:
  """The rows the paper reports for `table`, in the paper's order."""
  return [PaperRow(m.preset, m.name, m.top1[table]) for m in paper.models(table)]


def config_path(table: str) -> str:
  """configs/<table>.py: the dataset's reference-recipe config."""
  import configs  # pylint: disable=import-outside-toplevel

  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f"{table}.py")


class UsageError(ValueError):
  """Input the command cannot run with; the message names the fix."""


def select_rows(table: str, names: list[str] | None) -> list[PaperRow]:
  rows = paper_rows(table)
  if not names:
    return rows
  by_preset = {row.preset: row for row in rows}
  if len(set(names)) != len(names):
    raise UsageError(f"--rows {','.join(names)} names a row twice; list each once")
  unknown = [name for name in names if name not in by_preset]
  if unknown:
    raise UsageError(
      f"--rows: the paper's {table} table has no row {unknown[0]!r}; its rows "
      f"are {','.join(by_preset)}"
    )
  return [by_preset[name] for name in names]


# --- one row -------------------------------------------------------------------
def row_config(base, preset: str, steps: int | None):
  """`base` training `preset` (for `steps` steps, when given)."""
  config = copy.deepcopy(base)
  config.model = preset
  if steps is not None:
    config.num_train_steps = steps
  return config


def finished_summary(path: str) -> dict | None:
  """The summary.json of a run that trained to its end, else None."""
  try:
    with open(os.path.join(path, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if summary.get("stopped_by") or summary.get("step") != summary.get("total_steps"):
    return None
  return summary


class Stopped(RuntimeError):
  """A run stopped by a signal; its checkpoint is kept and the row stays unfinished."""


def train_row(config, runs: int, *, workdir: str) -> list[dict]:
  """Trains `runs` independent runs of `config` (seeds config.seed + 0 .. runs − 1).

  The runs train side by side in one process (`config.num_runs`, one vmapped
  step); a row that already finished in `workdir` is read back, not retrained.
  Returns one summary per run that finished (a run whose loss went non-finite
  is left out and logged), in seed order, shaped as a single run's summary.
  """
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  summary = finished_summary(workdir)
  if summary is None:
    row_config = copy.deepcopy(config)
    row_config.num_runs = runs
    summary = train.train_and_evaluate(row_config, workdir)
    if summary["stopped_by"]:
      raise Stopped(
        f"stopped by {summary['stopped_by']} in {workdir}; run the same command to resume"
      )
  finished = [
    r for r in summary["runs"] if r["died_at_step"] is None and r["final_top1"] is not None
  ]
  for r in summary["runs"]:
    if r not in finished:
      print(f"run with seed {r['seed']} in {workdir} died at step {r['died_at_step']}: left out")
  if not finished:
    raise Stopped(f"every run in {workdir} died (non-finite loss); lower the learning rate")
  share = summary["wall_seconds"] / len(summary["runs"])  # one process trained them all
  return [
    {
      **summary,
      "final_top1": r["final_top1"],
      "best_top1": r["best_top1"],
      "best_step": r["best_step"],
      "wall_seconds": share,
      "config": {**summary["config"], "seed": r["seed"]},
    }
    for r in finished
  ]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def summarize_row(row: PaperRow, config, summaries: list[dict], fingerprint: dict) -> dict:
  """The row's table values from its runs' summaries (top-1 values in %)."""
  finals = [100 * s["final_top1"] for s in summaries]
  bests = [100 * s["best_top1"] for s in summaries]
  mean, std = mean_std(finals)
  best_mean, best_std = mean_std(bests)
  first = summaries[0]
  recipe_steps = config.num_epochs * first["steps_per_epoch"]
  return {
    "preset": row.preset,
    "paper_name": row.paper_name,
    "paper_top1": row.paper_top1,
    "top1_mean": mean,
    "top1_std": std,
    "difference": mean - row.paper_top1,
    "best_top1_mean": best_mean,
    "best_top1_std": best_std,
    "params": first["params"],
    "devices": first["devices"],
    "steps": first["total_steps"],
    "recipe_steps": recipe_steps,
    "proxy": first["total_steps"] != recipe_steps,
    "dataset": first["dataset"],
    "train_images": first["train_images"],
    "test_images": first["test_images"],
    "wall_seconds": float(sum(s["wall_seconds"] for s in summaries)),
    "machine": machine_info(),
    "runs": [
      {
        "seed": s["config"]["seed"],
        "final_top1": 100 * s["final_top1"],
        "best_top1": 100 * s["best_top1"],
        "best_step": s["best_step"],
        "wall_seconds": s["wall_seconds"],
      }
      for s in summaries
    ],
    "settings": fingerprint,
    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


def fingerprint(config, runs: int) -> dict:
  """What makes two invocations' rows the same: the row's config (base seed) and K."""
  return {"config": json.loads(config.to_json_best_effort()), "runs": runs}


def load_row(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


# --- the table -----------------------------------------------------------------
def _value(mean, std=None, signed=False) -> str:
  if mean is None:
    return "–"
  text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
  return text + (f" ± {std:.2f}" if std is not None else "")


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _machine(row: dict) -> str:
  """The devices a run used, of the machine's."""
  machine = row["machine"]
  return f"{row['devices']}× {machine['device_kind']} ({machine['backend']})"


def format_table(report: dict) -> str:
  s = report["settings"]
  done = [row for row in report["rows"] if row.get("top1_mean") is not None]
  lines = [f"## {paper.TABLES[s['table']]}: the paper's top-1 against lkca_jax", ""]
  if s["dataset"] != s["table_dataset"]:
    lines += [
      f"**Not the paper's dataset**: config `{s['config_file']}` trains on "
      f"{s['dataset']}, while the paper's numbers are for {paper.TABLES[s['table']]}; "
      "the differences below compare unlike things.",
      "",
    ]
  proxies = sorted({(row["steps"], row["recipe_steps"]) for row in done if row["proxy"]})
  if proxies:
    budget = "; ".join(
      f"{steps:,} steps per run instead of the recipe's {recipe:,}" for steps, recipe in proxies
    )
    lines += [
      f"**Shortened proxy** ({budget}): not the paper's training budget, so the "
      "numbers are not comparable to the paper's.",
      "",
    ]
  elif done:
    lines += [f"Full recipe of `{s['config_file']}`.", ""]
  last = s["seed"] + s["runs"] - 1
  seeds = f"seeds {s['seed']}..{last}" if s["runs"] > 1 else f"seed {s['seed']}"
  lines += [
    f"Ours: final top-1 on the whole test split, in %, mean ± sample std (ddof 1) over "
    f"{s['runs']} run(s) ({seeds}); best: the best evaluation of a run, mean over runs. "
    "Wall: the trainer's wall time, all runs of the row.",
    "",
    "| model | preset | paper | ours | ours − paper | best | params | steps | wall | machine |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for row in report["rows"]:
    if row.get("top1_mean") is None:
      lines.append(
        f"| {row['paper_name']} | `{row['preset']}` | {row['paper_top1']:.2f} "
        "| not run | – | – | – | – | – | – |"
      )
      continue
    lines.append(
      f"| {row['paper_name']} | `{row['preset']}` | {row['paper_top1']:.2f} "
      f"| {_value(row['top1_mean'], row['top1_std'])} | {_value(row['difference'], signed=True)} "
      f"| {_value(row['best_top1_mean'])} | {row['params']:,} | {row['steps']:,} "
      f"| {_duration(row['wall_seconds'])} | {_machine(row)} |"
    )
  return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> None:
  write_atomic(os.path.join(out, "table.md"), format_table(report))
  write_json(os.path.join(out, "table.json"), report)


# --- command line ----------------------------------------------------------------
def table_in_argv(argv: list[str]) -> str | None:
  """The --table value of a command line, before absl parses it (it picks --config's default)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--table="):
      return arg.split("=", 1)[1]
    if arg == "--table" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_flags(table: str | None) -> None:
  """The command's flags; --config defaults to configs/<table>.py (defined on demand, so
  importing this module registers none)."""
  default = config_path(table) if table in TABLES else None
  config_flags.DEFINE_config_file(
    "config",
    default,
    "The config file (default: configs/<table>.py, the table's dataset).",
    lock_config=True,
  )
  flags.DEFINE_enum("table", None, list(TABLES), "Which of the paper's tables to reproduce.")
  flags.DEFINE_list("rows", None, "Presets of the table to run (default: all of its rows).")
  flags.DEFINE_integer(
    "steps",
    None,
    "Training steps per run: a shortened proxy (default: the config's full recipe).",
    lower_bound=1,
  )
  flags.DEFINE_integer(
    "runs", 1, "Independent runs per row, seeds config.seed + 0..K-1.", lower_bound=1
  )
  flags.DEFINE_string("out", None, "Output directory (default workdirs/reproduce_<table>).")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass settings as --flag=VALUE or --config.KEY=VALUE")
  if FLAGS.table is None:
    fail(f"--table is required: one of {','.join(TABLES)}")
  table, runs, steps = FLAGS.table, FLAGS.runs, FLAGS.steps
  out = FLAGS.out or os.path.join("workdirs", f"reproduce_{table}")
  if not FLAGS["verbosity"].present:  # one line a row; --verbosity=0 shows the trainer's log
    logging.set_verbosity(logging.WARNING)
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  base = FLAGS.config
  # Everything that can fail on input fails here, before the first step.
  try:
    rows = select_rows(table, FLAGS.rows)
    configs = {row.preset: row_config(base, row.preset, steps) for row in rows}
    prints = {preset: fingerprint(config, runs) for preset, config in configs.items()}
    finished = {}
    for row in rows:
      done = load_row(os.path.join(out, row.preset, ROW_FILE))
      if done is None:
        train.Run.prepare(configs[row.preset])  # validates config, data and model
      elif done.get("settings") != prints[row.preset]:
        raise UsageError(
          f"{os.path.join(out, row.preset, ROW_FILE)} is a finished row with "
          "other settings (config, --steps or --runs); pass another --out"
        )
      else:
        finished[row.preset] = done
  except (UsageError, train.ConfigError) as e:
    fail(str(e))

  report = {
    "settings": {
      "argv": sys.argv,
      "table": table,
      "table_dataset": paper.DATASETS[table],
      "config_file": config_flags.get_config_filename(FLAGS["config"]),
      "dataset": base.dataset.name,
      "rows": [row.preset for row in rows],
      "runs": runs,
      "seed": base.seed,
      "steps": steps,
      "out": out,
      "std_ddof": 1,
    },
    "rows": [finished.get(row.preset) or dataclasses.asdict(row) for row in rows],
  }
  failed = 0
  for index, row in enumerate(rows):
    if row.preset in finished:
      print(
        f"skipped {row.preset}: finished ({os.path.join(out, row.preset, ROW_FILE)})", flush=True
      )
      continue
    workdir = os.path.join(out, row.preset)
    try:
      summaries = train_row(configs[row.preset], runs, workdir=workdir)
    except train.NonFiniteLossError as e:
      print(f"{row.preset}: {e}", file=sys.stderr)
      failed += 1
      continue
    except Stopped as e:
      write_report(report, out)
      print(f"{row.preset}: {e}", file=sys.stderr)
      sys.exit(1)
    result = summarize_row(row, configs[row.preset], summaries, prints[row.preset])
    write_json(os.path.join(workdir, ROW_FILE), result)
    report["rows"][index] = result
    write_report(report, out)
    print(
      f"{row.preset}: {_value(result['top1_mean'], result['top1_std'])} % "
      f"(paper {row.paper_top1:.2f}, {_value(result['difference'], signed=True)}), "
      f"{result['steps']:,} steps, {_duration(result['wall_seconds'])}",
      flush=True,
    )
  write_report(report, out)
  print(format_table(report))
  print(f"table: {os.path.join(out, 'table.md')}; values: {os.path.join(out, 'table.json')}")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  if table_in_argv(sys.argv) is None and not any(a.startswith(("--help", "-?")) for a in sys.argv):
    fail(f"--table is required: one of {','.join(TABLES)}")
  define_flags(table_in_argv(sys.argv))
  cli.run(main, "python -m lkca_jax.tools.reproduce")
