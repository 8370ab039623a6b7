"""A run's files read back: a finished summary, and its config.json laid over the defaults
(configs/workdir.py)."""

import json

import pytest

from lkca_jax import run_files
from lkca_jax.config_checks import ConfigError


def test_only_a_summary_that_reached_its_last_step_counts_as_finished(tmp_path):
  done = tmp_path / "done"
  done.mkdir()
  (done / "summary.json").write_text(json.dumps({"step": 5, "total_steps": 5, "stopped_by": None}))
  stopped = tmp_path / "stopped"
  stopped.mkdir()
  (stopped / "summary.json").write_text(
    json.dumps({"step": 3, "total_steps": 5, "stopped_by": "SIGTERM"})
  )
  assert run_files.finished_summary(str(done))["step"] == 5
  assert run_files.finished_summary(str(stopped)) is None
  assert run_files.finished_summary(str(tmp_path / "missing")) is None


def test_a_saved_config_is_laid_over_the_defaults_with_their_types(tmp_path):
  from configs import default, digits

  trained = digits.get_config()
  trained.model_overrides.depth = 3
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  config = run_files.saved_config(tmp_path, default.get_config())
  assert json.loads(config.to_json_best_effort()) == json.loads(trained.to_json_best_effort())
  # Unset there (digits has no AutoAugment): unset here, and still a str to override.
  assert config.augment.autoaugment is None and default.get_config().augment.autoaugment
  config.augment.autoaugment = "svhn"
  with pytest.raises(TypeError):
    config.augment.autoaugment = 3
  assert config.dataset.mean == (0.3054,)  # JSON's list, a tuple again


@pytest.mark.parametrize(
  "saved, message",
  [
    (
      {"model": "vit", "no_such_key": 1, "dataset": {"old_key": 2}},
      r"lacks \(no_such_key, dataset.old_key\)",
    ),
    ({"batch_size": "many"}, r"batch_size='many' does not fit this config"),
    (None, r"is not a training workdir \(no config.json\)"),
  ],
)
def test_a_saved_config_that_cannot_be_laid_over_is_one_error(tmp_path, saved, message):
  from configs import default

  if saved is not None:
    (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=message):
    run_files.saved_config(tmp_path, default.get_config())
