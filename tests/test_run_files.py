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


# The keys of configs/default.py when runs first wrote config.json (2026-11-21, bd04407).
FIRST_KEYS = frozenset(
  """augment.autoaugment augment.crop_padding augment.erasing_area augment.erasing_aspect
  augment.flip augment.random_erasing batch_size checkpoint_every_steps dataset.classes
  dataset.data_dir dataset.download dataset.manual_dir dataset.mean dataset.name
  dataset.placement dataset.std dataset.train_per_class dtype eval_every_steps
  keep_checkpoints label_smoothing log_every_steps mixing.cutmix_alpha mixing.cutmix_prob
  mixing.mixup_alpha mixing.prob model model_overrides.depth model_overrides.dim
  model_overrides.drop_path_rate model_overrides.mixer
  model_overrides.mixer_options.lkca.kernel_sharing model_overrides.mixer_options.lkca.view
  model_overrides.mlp_ratio model_overrides.num_heads model_overrides.pool num_devices
  num_epochs num_train_steps optimizer.b1 optimizer.b2 optimizer.end_learning_rate
  optimizer.eps optimizer.init_learning_rate optimizer.learning_rate optimizer.warmup_epochs
  optimizer.weight_decay patch_size repeats seed""".split()
)


def flat_default() -> dict:
  from configs import default

  return run_files._flat(json.loads(default.get_config().to_json_best_effort()))


def test_every_later_key_reads_as_its_default_and_every_new_key_is_one():
  defaults = flat_default()
  unlisted = set(defaults) - FIRST_KEYS - set(run_files.LATER_KEYS)
  assert not unlisted, (
    f"configs/default.py has keys {sorted(unlisted)} that older config.json files lack: add "
    "each to run_files.LATER_KEYS with the value that does what runs without it did"
  )
  assert {k: defaults.get(k) for k in run_files.LATER_KEYS} == run_files.LATER_KEYS


def test_a_run_of_an_older_version_resumed_with_a_new_key_set_otherwise_is_refused(tmp_path):
  """Its config.json lacks optimizer.warmup_fraction and mixing.groups: it trained as their
  defaults do, so only another value of one of them is a change."""
  from configs import default

  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  older = json.loads(default.get_config().to_json_best_effort())
  del older["optimizer"]["warmup_fraction"], older["mixing"]["groups"]
  (tmp_path / "config.json").write_text(json.dumps(older))
  config = default.get_config()
  assert run_files.config_changes(tmp_path, config) == []
  config.optimizer.warmup_fraction = 0.1
  config.mixing.groups = 4
  assert run_files.config_changes(tmp_path, config) == [
    "mixing.groups: 1 there, 4 here",
    "optimizer.warmup_fraction: None there, 0.1 here",
  ]
