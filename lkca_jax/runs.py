"""Runs side by side in one process: the seeds x sweep grid, each run's keys, the record its
checkpoints keep, and the statistics over runs that logs and summaries report."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import jax
import ml_collections
import numpy as np

from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import config_checks, models


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a process: its seed, swept values, and its own single-run config."""

  index: int
  seed: int
  values: dict  # {swept config key: value}
  config: ml_collections.ConfigDict  # num_runs=1, no sweep: trains this run alone


def _get_key(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _set_key(config, key: str, value) -> None:
  *path, last = key.split(".")
  for part in path:
    config = config[part]
  config[last] = value


def run_specs(config) -> list[RunSpec]:
  """Every combination of the sweep (in the order given) times the seeds, seed fastest."""
  sweep = config_checks.parse_sweep(config.sweep)
  specs = []
  for combo in itertools.product(*sweep.values()):
    values = dict(zip(sweep, combo, strict=True))
    for k in range(config.num_runs):
      single = copy.deepcopy(config)
      with single.unlocked():
        single.num_runs, single.sweep, single.seed = 1, "", config.seed + k
        for key, value in values.items():
          _set_key(single, key, value)
      specs.append(RunSpec(len(specs), config.seed + k, values, single))
  return specs


def describe_values(values: dict) -> str:
  """ "label_smoothing=0.1, mixing.prob=0": swept values as logs and reports show them."""
  return ", ".join(f"{k}={v:g}" for k, v in values.items())


def run_name(seed: int, values: dict) -> str:
  """ "seed 3, label_smoothing=0.1": how a run is named in logs and reports."""
  return ", ".join([f"seed {seed}", *([describe_values(values)] if values else [])])


def hparams(config) -> dict[str, float]:
  """The step's per-run scalars of a single-run config: the value of each sweepable key."""
  values = {key: _get_key(config, key) for key in config_checks.SWEEPABLE}
  if values["model_overrides.drop_path_rate"] is None:
    values["model_overrides.drop_path_rate"] = models.PRESETS[config.model].drop_path_rate
  return values


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(data key, train key) of a run: the pipeline's order and augmentation, and the step's."""
  data_key, train_key = jax.random.split(jax.random.key(seed))
  return data_key, train_key


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
  values = [float(v) for v in values]
  if not values:
    return None, None
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a run's checkpoints remember about it: test results so far, its best, its death."""

  best_top1: float = -1.0
  best_step: int = 0
  history: tuple = ()  # {"step", "loss", "top1", "top5"} at each evaluation
  died_at_step: int | None = None
  died_with_loss: str | None = None  # its loss at that step ("nan", "inf"), as JSON keeps it

  def evaluated(self, step: int, result: dict) -> RunRecord:
    better = self.died_at_step is None and result["top1"] > self.best_top1
    return dataclasses.replace(
      self,
      history=(*self.history, {"step": step, **result}),
      best_top1=result["top1"] if better else self.best_top1,
      best_step=step if better else self.best_step,
    )


def checkpoint_meta(records) -> dict:
  """The metadata saved with every checkpoint: one record a run."""
  return {"runs": [dataclasses.asdict(r) | {"history": list(r.history)} for r in records]}


def records_from_meta(meta: dict, num_runs: int) -> tuple[RunRecord, ...]:
  """The runs' records from a checkpoint's metadata (also the single-run layout before 0.1)."""
  runs = meta.get("runs")
  if runs is None and {"best_top1", "best_step", "history"} <= meta.keys():
    runs = [meta]  # one run's fields at the top: how single runs were saved before
  if runs is None or len(runs) != num_runs:
    raise checkpoint_lib.CheckpointError(
      f"the checkpoint's metadata holds {'no' if runs is None else len(runs)} run records, "
      f"this config trains {num_runs}; resume with the config it was trained with"
    )
  return tuple(
    RunRecord(
      r["best_top1"],
      r["best_step"],
      tuple(r["history"]),
      r.get("died_at_step"),
      r.get("died_with_loss"),
    )
    for r in runs
  )


def run_scalars(per_run: list[dict | None], prefix: str) -> dict[str, float]:
  """Scalars to log: one run's as `<prefix>KEY`; several runs' as run<k>/<prefix>KEY, with
  their mean/ and std/ over the runs given (None: a dead run, left out)."""
  if len(per_run) == 1:
    return {f"{prefix}{key}": value for key, value in (per_run[0] or {}).items()}
  scalars = {}
  keys = next((r for r in per_run if r is not None), {})
  for key in keys:
    values = {k: r[key] for k, r in enumerate(per_run) if r is not None}
    scalars.update({f"run{k}/{prefix}{key}": v for k, v in values.items()})
    mean, std = mean_std(values.values())
    scalars.update(
      {f"mean/{prefix}{key}": mean, **({f"std/{prefix}{key}": std} if std is not None else {})}
    )
  return scalars


AVERAGE_METRICS = ("final_ema_top1", "best_ema_top1")  # of a run with ema_decay > 0


def run_summaries(specs, records) -> list[dict]:
  """Per run: seed, swept values, final and best test top-1, best step, death if any; with
  a moving average of the parameters (ema_decay), its final and best top-1 too."""
  runs = []
  for spec, rec in zip(specs, records, strict=True):
    final = rec.history[-1] if rec.history else None
    runs.append(
      {
        "run": spec.index,
        "seed": spec.seed,
        "values": spec.values,
        "final_top1": final["top1"] if final else None,
        "final_top5": final["top5"] if final else None,
        "best_top1": rec.best_top1 if final else None,
        "best_step": rec.best_step,
        "died_at_step": rec.died_at_step,
        "died_with_loss": rec.died_with_loss,
        **_average_summary(rec),
      }
    )
  return runs


def _average_summary(rec: RunRecord) -> dict:
  """Final and best test top-1 of the parameters' moving average, where it was evaluated."""
  averaged = [h["ema_top1"] for h in rec.history if "ema_top1" in h]
  if not averaged:
    return {}
  return dict(zip(AVERAGE_METRICS, (averaged[-1], max(averaged)), strict=True))


def group_summaries(runs: list[dict]) -> list[dict]:
  """Per swept combination: mean ± sample std (ddof 1) of final and best top-1 over its seeds.

  Runs that died (non-finite loss) or never evaluated are left out of the statistics.
  """
  groups = {}
  for r in runs:
    group = groups.setdefault(
      tuple(r["values"].items()), {"values": r["values"], "seeds": [], "finished_seeds": []}
    )
    group["seeds"].append(r["seed"])
    if r["died_at_step"] is None and r["final_top1"] is not None:
      group["finished_seeds"].append(r["seed"])
  for key, group in groups.items():
    done = [
      r for r in runs if tuple(r["values"].items()) == key and r["seed"] in group["finished_seeds"]
    ]
    for metric in ("final_top1", "best_top1", *AVERAGE_METRICS):
      if all(metric in r for r in done):
        group[f"{metric}_mean"], group[f"{metric}_std"] = mean_std(r[metric] for r in done)
  return list(groups.values())
