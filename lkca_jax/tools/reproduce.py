"""Trains the paper's ViT / ViT-LKCA pairs of one results table and sets ours beside theirs.

    python -m lkca_jax.tools.reproduce --table cifar10|cifar100|svhn|tinyimagenet \\
        [--rows vit_1m,lkca_t] [--steps N] [--runs K] [--out DIR] \\
        [--config FILE] [--config.KEY=VALUE ...]

Every row of the table (`lkca_jax.paper`, the paper's numbers kept once) is a
preset; --rows picks some (default: all of the table). The experiment runner
(`lkca_jax.tools._experiment`) trains a row as K runs (--runs, default 1) with
seeds config.seed .. config.seed + K − 1, side by side in one process
(`config.num_runs`: one vmapped step, one `train.train_and_evaluate`), all with
the table's dataset config (configs/<table>.py, the full reference recipe)
unless --config names another (the tests run the cifar10 rows on
configs/digits.py). --steps N sets config.num_train_steps: a shortened proxy,
which the table says it is, whose warmup keeps the recipe's share of the run (10 of 100
epochs: its first tenth), so that its rate still decays. The table names every config key
that differs from configs/<table>.py, the recipe of the paper's numbers (a class subset,
another batch size, a preset override), beyond where data and outputs live and how often
runs report.

A row's run directory is OUT/<preset> (OUT: --out, default
workdirs/reproduce_<table>), each run's own summary in OUT/<preset>/seed<k>. A
finished row writes OUT/<preset>/row.json (atomically); it is the marker that
the row is done, and a later invocation skips that row ("skipped ..." on
stdout) and reads its values back. A row interrupted mid-training resumes from
its checkpoints; one whose training finished is read from its summary.json, not
trained again. A finished row whose config (K and --steps included) differs
from this invocation's is an error: pass another --out.

After every row, OUT/table.md and OUT/table.json are rewritten (atomically):
per row the paper's top-1, ours (final top-1 on the whole test split, in %,
mean ± sample std over the runs, read from the runs' summary.json), ours −
paper, the best top-1 (mean), parameters, steps per run, the training wall
time of all runs and the machine. Top-1 values in table.json, the paper's
included, are fractions, as in summary.json.

Bad input is one `error:` line on stderr and exit code 2 before any training.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from lkca_jax import paper
from lkca_jax.tools import _experiment as experiment
from lkca_jax.tools import cli

FLAGS = flags.FLAGS
TABLES = tuple(paper.TABLES)
# Config keys the table states per row (the preset, seeds and steps), not recipe changes.
NOT_RECIPE = frozenset({"model", "seed", "num_runs", "num_train_steps"})


def config_path(table: str) -> str:
  """configs/<table>.py: the dataset's reference-recipe config."""
  import configs  # pylint: disable=import-outside-toplevel

  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f"{table}.py")


def select_rows(table: str, names: list[str] | None) -> list[paper.Model]:
  models = paper.models(table)
  if not names:
    return models
  experiment.check_once(names, "--rows", "row")
  by_preset = {model.preset: model for model in models}
  unknown = [name for name in names if name not in by_preset]
  if unknown:
    raise experiment.UsageError(
      f"--rows: the paper's {table} table has no row {unknown[0]!r}; its rows "
      f"are {','.join(by_preset)}"
    )
  return [by_preset[name] for name in names]


def recipe_changes(base, table: str) -> list[tuple]:
  """(key, the recipe's value, base's) for each key where `base` differs from the table's
  recipe (configs/<table>.py), leaving out what the table states itself (NOT_RECIPE) and
  what leaves the training as it is (where data and outputs live, how often a run reports:
  `run_files.SAME_TRAINING`); a start from another run's weights (init_from) is a change."""
  import importlib  # pylint: disable=import-outside-toplevel

  from lkca_jax import run_files  # pylint: disable=import-outside-toplevel

  recipe = importlib.import_module(f"configs.{table}").get_config()
  ignore = NOT_RECIPE | run_files.SAME_TRAINING
  return run_files.differences(json.loads(recipe.to_json_best_effort()), base, ignore)


def row(base, model: paper.Model, table: str, *, runs: int, steps: int | None):
  """The experiment's row of `model`: `base` training its preset, beside the paper's top-1."""
  config = experiment.configure(base, seed=base.seed, seeds=runs, steps=steps)
  config.model = model.preset
  values = {"preset": model.preset, "paper_name": model.name, "paper_top1": model.top1[table] / 100}
  return experiment.Row(model.preset, config, values)


# --- the table -----------------------------------------------------------------
def _machine(row: dict) -> str:
  return cli.hardware(row["machine"], row["devices"])


def _preamble(s: dict, done: list[dict]) -> list[str]:
  """What the numbers below are: the dataset, the budget, the runs."""
  lines = []
  title = paper.TABLES[s["table"]]
  if s["dataset"] != paper.DATASETS[s["table"]]:
    lines += [
      f"**Not the paper's dataset**: config `{s['config_file']}` trains on "
      f"{s['dataset']}, while the paper's numbers are for {title}; "
      "the differences below compare unlike things.",
      "",
    ]
  if s.get("changed"):
    lines += [_changed(s["changed"], s["table"]), ""]
  proxies = sorted(
    {
      (r["steps"], r["recipe_steps"], r.get("warmup_steps"))
      for r in done
      if r["steps"] != r["recipe_steps"]
    },
    key=str,
  )
  if proxies:
    budget = "; ".join(
      f"{steps:,} steps per run instead of the recipe's {recipe:,}"
      + ("" if warmup is None else f", warming up for the first {warmup:,}")
      for steps, recipe, warmup in proxies
    )
    lines += [
      f"**Shortened proxy** ({budget}): not the paper's training budget, so the "
      "numbers are not comparable to the paper's.",
      "",
    ]
  elif done:
    lines += [f"Full {'budget' if s.get('changed') else 'recipe'} of `{s['config_file']}`.", ""]
  last = s["seed"] + s["runs"] - 1
  seeds = f"seeds {s['seed']}..{last}" if s["runs"] > 1 else f"seed {s['seed']}"
  return lines + [
    f"Ours: final top-1 on the whole test split, in %, mean ± sample std (ddof 1) over "
    f"{s['runs']} run(s) ({seeds}); best: the best evaluation of a run, mean over runs. "
    "Wall: the trainer's wall time, all runs of the row.",
    "",
  ]


def _changed(changed: list, table: str) -> str:
  """The line that names the keys where the config differs from the paper's recipe."""

  def value(v):
    return "unset" if v is None else json.dumps(v)

  listed = "; ".join(f"`{key}` {value(a)} → {value(b)}" for key, a, b in changed)
  return (
    f"**Not the paper's recipe**: the config differs from `configs/{table}.py`, the recipe "
    f"the paper's numbers come from, in {listed}; the differences below compare "
    "unlike things."
  )


def format_table(report: dict) -> str:
  s = report["settings"]
  done = [r for r in report["rows"] if r["final_top1_mean"] is not None]
  lines = [f"## {paper.TABLES[s['table']]}: the paper's top-1 against lkca_jax", ""]
  lines += _preamble(s, done)
  lines += [
    "| model | preset | paper | ours | ours − paper | best | params | steps | wall | machine |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in report["rows"]:
    start = f"| {r['paper_name']} | `{r['preset']}` | {experiment.percent(r['paper_top1'])} "
    mean = r["final_top1_mean"]
    if mean is None:
      lines.append(start + "| not run | – | – | – | – | – | – |")
      continue
    lines.append(
      start + f"| {experiment.percent(mean, r['final_top1_std'])} "
      f"| {experiment.percent(mean - r['paper_top1'], signed=True)} "
      f"| {experiment.percent(r['best_top1_mean'])} | {r['params']:,} | {r['steps']:,} "
      f"| {experiment.duration(r['wall_seconds'])} | {_machine(r)} |"
    )
  failed = experiment.failures(report)
  if failed:
    lines += [""] + [f"- failed: {f}" for f in failed]
  return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------
def table_in_argv(argv: list[str]) -> str | None:
  """The --table value of a command line, before absl parses it (it picks --config's default)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--table="):
      return arg.split("=", 1)[1]
    if arg == "--table" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_flags() -> None:
  """The command's flags; --config defaults to configs/<--table>.py of this process's command
  line (defined on demand, so importing this module registers none)."""
  table = table_in_argv(sys.argv)
  config_flags.DEFINE_config_file(
    "config",
    config_path(table) if table in TABLES else None,
    "The config file (default: configs/<table>.py, the table's dataset).",
    lock_config=True,
  )
  flags.DEFINE_enum("table", None, list(TABLES), "Which of the paper's tables to reproduce.")
  flags.register_validator(
    "table", lambda value: value is not None, f"--table is required: one of {','.join(TABLES)}"
  )
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
  cli.define_output_dir("out", None, "Output directory (default workdirs/reproduce_<table>).")


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  table, runs, base = FLAGS.table, FLAGS.runs, FLAGS.config
  out = FLAGS.out or os.path.join("workdirs", f"reproduce_{table}")
  # Everything that can fail on input fails here, before the first step.
  try:
    rows = [
      row(base, m, table, runs=runs, steps=FLAGS.steps) for m in select_rows(table, FLAGS.rows)
    ]
    reproduction = experiment.Experiment(
      directory=out,
      table=os.path.join(out, "table.md"),
      flag="--out",
      settings={
        "table": table,
        "config_file": config_flags.get_config_filename(FLAGS["config"]),
        "dataset": base.dataset.name,
        "rows": [r.name for r in rows],
        "runs": runs,
        "seed": base.seed,
        "steps": FLAGS.steps,
        "changed": recipe_changes(base, table),
        "out": out,
      },
      rows=rows,
      render=format_table,
      resume=True,
    )
    cli.output_dir(out, "--out")
    experiment.quiet_trainer_log()
    experiment.prepare(reproduction)
  except experiment.UsageError as e:
    cli.fail(str(e))
  return experiment.run(reproduction)


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
