"""The experiment runner behind compare and reproduce: per-seed values, statistics, resuming.

The commands' end-to-end tests (test_compare.py, test_reproduce.py) train through it; these
check its parts on summaries and directories written here.
"""

import dataclasses
import json

import pytest

from configs import cifar10, digits, imagenet
from lkca_jax import schedules
from lkca_jax.tools import _experiment as experiment


def summary_of(runs, *, speed=300.0, wall=60.0, **extra):
  """A summary.json as train_and_evaluate writes it, for these per-run records."""
  return {
    "model": "lkca_t",
    "step": 20,
    "total_steps": 20,
    "stopped_by": None,
    "final_top1": 0.5,
    "train_images_per_second": speed,
    "wall_seconds": wall,
    "config": {"seed": 0, "num_runs": len(runs), "model": "lkca_t"},
    "num_runs": len(runs),
    "runs": runs,
    "groups": [],
    **extra,
  }


def record(seed, final, best, died=None):
  return {
    "run": seed,
    "seed": seed,
    "values": {},
    "final_top1": final,
    "best_top1": best,
    "best_step": 20,
    "died_at_step": died,
  }


def test_statistics_are_mean_and_sample_std_of_the_finished_seeds():
  # finals [0.5, 0.6, 0.7]: mean 0.6, squared deviations 0.01 + 0 + 0.01, / 2 → std 0.1;
  # bests [0.81, 0.84, 0.90]: mean 0.85, 0.0016 + 0.0001 + 0.0025 = 0.0042, / 2 → √0.0021.
  records = [
    {"seed": k, "final_top1": f, "best_top1": b, "train_images_per_second": v}
    for k, f, b, v in [(0, 0.5, 0.81, 90.0), (1, 0.6, 0.84, 100.0), (2, 0.7, 0.90, 110.0)]
  ]
  records.append({"seed": 3, "error": "loss became non-finite at step 4"})
  stats = experiment.statistics(records)
  assert stats["finished_seeds"] == [0, 1, 2]
  assert stats["final_top1_mean"] == pytest.approx(0.6)
  assert stats["final_top1_std"] == pytest.approx(0.1)
  assert stats["best_top1_mean"] == pytest.approx(0.85)
  assert stats["best_top1_std"] == pytest.approx(0.0021**0.5)
  assert stats["train_images_per_second_mean"] == pytest.approx(100.0)
  one = experiment.statistics(records[:1])
  assert (one["final_top1_mean"], one["final_top1_std"]) == (0.5, None)  # no std of one value
  none = experiment.statistics([])
  assert (none["final_top1_mean"], none["finished_seeds"]) == (None, [])


def test_seed_records_share_the_process_and_name_the_dead():
  summary = summary_of([record(0, 0.5, 0.6), record(1, None, None, died=7)], speed=300, wall=60)
  alive, dead = experiment.seed_records(summary)
  # Two runs trained in one process: each gets half its images/s and wall time.
  assert alive == {
    "seed": 0,
    "final_top1": 0.5,
    "best_top1": 0.6,
    "best_step": 20,
    "train_images_per_second": 150.0,
    "wall_seconds": 30.0,
  }
  assert dead == {"seed": 1, "error": "loss became non-finite at step 7"}


def test_a_seed_summary_is_shaped_as_that_seeds_own_run(tmp_path):
  summary = summary_of([record(0, 0.5, 0.6), record(1, 0.7, 0.8)])
  second = experiment.seed_records(summary)[1]
  experiment.write_seed_summary(str(tmp_path), summary, second)
  written = json.loads((tmp_path / "seed1" / "summary.json").read_text())
  assert (written["final_top1"], written["best_top1"], written["num_runs"]) == (0.7, 0.8, 1)
  assert written["config"] == {"seed": 1, "num_runs": 1, "model": "lkca_t"}
  assert "runs" not in written and "groups" not in written
  assert summary["config"]["seed"] == 0  # the row's own summary is left as it was


def resumable(tmp_path, config):
  row = experiment.Row("lkca_t", config)
  return row, experiment.Experiment(
    directory=str(tmp_path),
    table=str(tmp_path / "table.md"),
    flag="--out",
    settings={},
    rows=[row],
    render=lambda report: "",
    resume=True,
  )


def test_a_finished_row_is_read_back_only_with_the_same_config(tmp_path):
  config = experiment.configure(digits.get_config(), seed=0, seeds=2, steps=6)
  row, exp = resumable(tmp_path, config)
  (tmp_path / "lkca_t").mkdir()
  values = {"name": "lkca_t", "final_top1_mean": 0.4, "settings": experiment.fingerprint(config)}
  (tmp_path / "lkca_t" / experiment.ROW_FILE).write_text(json.dumps(values))
  experiment.read_back(exp, row)
  assert row.done and row.values == values
  other, exp = resumable(tmp_path, experiment.configure(config, seed=0, seeds=3, steps=6))
  with pytest.raises(experiment.UsageError, match="finished row with other settings.*--out"):
    experiment.read_back(exp, other)
  assert not other.done


def test_a_finished_training_of_another_config_is_refused(tmp_path):
  config = experiment.configure(digits.get_config(), seed=0, seeds=1, steps=6)
  (tmp_path / "lkca_t").mkdir()
  stale = summary_of([record(0, 0.5, 0.6)], config={"seed": 0, "num_runs": 1})
  (tmp_path / "lkca_t" / "summary.json").write_text(json.dumps(stale))
  row, exp = resumable(tmp_path, config)
  with pytest.raises(experiment.UsageError, match="finished training with other settings"):
    experiment.read_back(exp, row)


def test_an_unfinished_row_of_another_config_is_refused_before_any_row_trains(tmp_path):
  # What train_and_evaluate leaves of a stopped row: its config.json and a checkpoint.
  config = experiment.configure(digits.get_config(), seed=0, seeds=1, steps=6)
  (tmp_path / "lkca_t" / "checkpoints" / "3").mkdir(parents=True)
  (tmp_path / "lkca_t" / "config.json").write_text(config.to_json_best_effort(indent=2))
  row, exp = resumable(tmp_path, config)
  experiment.read_back(exp, row)  # its own settings: it resumes
  assert not row.done
  longer, exp = resumable(tmp_path, experiment.configure(config, seed=0, seeds=1, steps=12))
  with pytest.raises(experiment.UsageError) as info:
    experiment.read_back(exp, longer)
  assert "num_train_steps: 6 there, 12 here" in str(info.value)
  assert str(info.value).endswith("or pass another --out")


def test_the_table_and_its_values_are_written_whole_next_to_each_other(tmp_path):
  row = experiment.Row("lkca_t", None, {"name": "lkca_t", "runs": []})
  exp = experiment.Experiment(
    directory=str(tmp_path),
    table=str(tmp_path / "tables" / "compare.md"),
    flag="--workdir",
    settings={"dataset": "digits"},
    rows=[row],
    render=lambda report: f"{len(report['rows'])} row on {report['settings']['dataset']}\n",
  )
  exp.write()
  assert (tmp_path / "tables" / "compare.md").read_text() == "1 row on digits\n"
  assert json.loads((tmp_path / "tables" / "compare.json").read_text()) == exp.report()
  assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["compare.json", "compare.md"]


@pytest.mark.parametrize("name,share", [("cifar10", 0.1), ("digits", 1 / 9)])
def test_a_proxy_keeps_the_recipes_warmup_share_so_its_rate_decays(name, share):
  """--steps N: the warmup is the recipe's share of N steps (10 of 100 epochs: a tenth), so
  the proxy's rate peaks early and decays to the end, as the recipe's does."""
  base = {"cifar10": cifar10, "digits": digits}[name].get_config()
  config = experiment.configure(base, seed=0, seeds=1, steps=900)
  assert config.optimizer.warmup_fraction == pytest.approx(share)
  assert base.optimizer.warmup_fraction is None  # the base is left as it was
  schedule = schedules.learning_rate(config, 1171, 900)
  peak = round(share * 900)
  assert float(schedule(peak)) == pytest.approx(1e-3, rel=1e-6)
  assert float(schedule(peak - 1)) < float(schedule(peak)) > float(schedule(peak + 1))
  assert float(schedule(900)) == pytest.approx(1e-6, rel=1e-4)
  assert schedules.warmup_overrun(config, 1171, 900) is None
  # Unshortened, or with a share of its own, the config's warmup is left as it is.
  assert experiment.configure(base, seed=0, seeds=1, steps=None).optimizer.warmup_fraction is None
  base.optimizer.warmup_fraction = 0.3
  assert experiment.configure(base, seed=0, seeds=1, steps=9).optimizer.warmup_fraction == 0.3


def test_a_proxy_of_deits_schedule_keeps_its_whole_warmup_epochs():
  config = experiment.configure(imagenet.get_config(), seed=0, seeds=1, steps=900)
  assert config.optimizer.warmup_fraction is None and config.optimizer.warmup_epochs == 5


def test_a_stop_names_what_is_kept_and_how_to_go_on(tmp_path):
  rows = [experiment.Row(name, None) for name in ("mhsa", "lkca", "flatten")]
  fresh = experiment.Experiment(
    directory=str(tmp_path),
    table="tables/compare.md",
    flag="--workdir",
    settings={},
    rows=rows,
    render=lambda report: "",
  )
  assert experiment.stopped_message(fresh, rows[0], "SIGINT") == (
    f"stopped by SIGINT during mhsa ({tmp_path / 'mhsa'}); no row finished; rerun with "
    "--overwrite to start over"
  )
  assert experiment.stopped_message(fresh, rows[2], "SIGTERM") == (
    f"stopped by SIGTERM during flatten ({tmp_path / 'flatten'}); the rows before it (mhsa, "
    "lkca) are in tables/compare.md; rerun with --overwrite to start over"
  )
  resumable = dataclasses.replace(fresh, resume=True)
  assert experiment.stopped_message(resumable, rows[1], "SIGTERM") == (
    f"stopped by SIGTERM during lkca ({tmp_path / 'lkca'}); run the same command to resume"
  )
  # A signal in a row's last step: that row finished and is kept too.
  assert experiment.stopped_message(fresh, rows[0], "SIGINT", finished=True) == (
    f"stopped by SIGINT after mhsa finished ({tmp_path / 'mhsa'}); the rows up to it (mhsa) "
    "are in tables/compare.md; rerun with --overwrite to start over"
  )
  assert experiment.stopped_message(resumable, rows[1], "SIGTERM", finished=True) == (
    f"stopped by SIGTERM after lkca finished ({tmp_path / 'lkca'}); run the same command to resume"
  )
