"""Runs side by side: the scalars logged over runs and each run's record."""

import dataclasses

import numpy as np
import pytest

from lkca_jax import runs


def test_one_runs_scalars_keep_their_names_and_several_add_mean_and_std_of_the_living():
  assert runs.run_scalars([{"loss": 2.5}], "train_") == {"train_loss": 2.5}
  scalars = runs.run_scalars([{"top1": 0.5}, None, {"top1": 0.75}], "test_")
  assert scalars["run0/test_top1"] == 0.5 and scalars["run2/test_top1"] == 0.75
  assert not any(key.startswith("run1/") for key in scalars)  # dead: left out
  assert scalars["mean/test_top1"] == 0.625
  assert scalars["std/test_top1"] == pytest.approx(0.25 / np.sqrt(2))  # ddof 1, two values


def test_a_record_keeps_its_best_and_a_dead_run_gains_none():
  result = lambda top1: {"loss": 1.0, "top1": top1, "top5": 1.0}  # noqa: E731
  record = runs.RunRecord().evaluated(5, result(0.4)).evaluated(10, result(0.3))
  assert (record.best_top1, record.best_step) == (0.4, 5)
  assert [h["step"] for h in record.history] == [5, 10]
  dead = dataclasses.replace(record, died_at_step=7).evaluated(15, result(0.9))
  assert (dead.best_top1, dead.best_step, len(dead.history)) == (0.4, 5, 3)


def test_a_moving_averages_final_and_best_are_summarized_beside_the_parameters():
  """ema_decay's evaluations (ema_top1 …) give each run a final and best of their own, and
  each group their mean over seeds; a run without them gains no such keys."""
  specs = [runs.RunSpec(0, 0, {}, None), runs.RunSpec(1, 1, {}, None)]
  tested = lambda top1, ema: {"loss": 1.0, "top1": top1, "top5": 1.0, "ema_top1": ema}  # noqa: E731
  records = [
    runs.RunRecord().evaluated(5, tested(0.4, 0.5)).evaluated(10, tested(0.6, 0.45)),
    runs.RunRecord().evaluated(5, tested(0.3, 0.2)).evaluated(10, tested(0.5, 0.7)),
  ]
  first, second = runs.run_summaries(specs, records)
  assert (first["final_ema_top1"], first["best_ema_top1"]) == (0.45, 0.5)
  assert (second["final_ema_top1"], second["best_ema_top1"]) == (0.7, 0.7)
  assert (first["final_top1"], first["best_top1"]) == (0.6, 0.6)  # the parameters' own
  (group,) = runs.group_summaries([first, second])
  assert group["final_ema_top1_mean"] == pytest.approx(0.575)
  assert group["best_ema_top1_mean"] == pytest.approx(0.6)
  plain = runs.RunRecord().evaluated(5, {"loss": 1.0, "top1": 0.4, "top5": 1.0})
  (summary,) = runs.run_summaries(specs[:1], [plain])
  assert "final_ema_top1" not in summary
  assert "final_ema_top1_mean" not in runs.group_summaries([summary])[0]
