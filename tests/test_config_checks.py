"""Config validation: one table of rules, every key covered, every bad value one `error:` line.

The bad config-value cases of main.py live here (flag parsing shared by every
command stays in tests/tools/test_cli.py; unprepared data in tests/test_main.py).
"""

import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys
import tempfile

import pytest

import configs
from lkca_jax import config_checks, train
from lkca_jax.layers.lkca import KERNEL_SHARING, VIEWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = config_checks.rules()
CONFIG_NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def load(name):
  module = importlib.import_module(f"configs.{name}")
  if name == "workdir":  # a run's config read back: digits', as a run saves it
    with tempfile.TemporaryDirectory() as directory:
      (pathlib.Path(directory) / "config.json").write_text(load("digits").to_json_best_effort())
      return module.get_config(directory)
  return module.get_config()


def set_key(config, key, value):
  """Sets a dotted key, even to a value of another type (as a config file could)."""
  *path, last = key.split(".")
  target = config
  for part in path:
    target = target[part]
  with target.ignore_type():
    target[last] = value
  return config


# --- in process ----------------------------------------------------------------
@pytest.mark.parametrize("key", list(RULES))
def test_each_rule_rejects_its_bad_value_in_one_line_naming_the_key(key):
  config = set_key(load("default"), key, RULES[key].bad)
  with pytest.raises(train.ConfigError) as error:
    config_checks.validate(config)
  message = str(error.value)
  assert key in message and repr(RULES[key].bad) in message, message
  assert "\n" not in message


CHOICE_KEYS = [key for key, rule in RULES.items() if rule.choices]


def test_the_keys_with_named_choices_are_found():
  assert {"model", "dataset.name", "dataset.placement", "augment.autoaugment"} <= set(CHOICE_KEYS)


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_near_miss_of_a_choice_is_named_and_a_far_one_is_not(key):
  meant = RULES[key].choices[-1]
  for typo, hint in ((meant + "x", f"(did you mean {meant!r}?)"), ("qqqqqqqq", None)):
    with pytest.raises(train.ConfigError) as error:
      config_checks.validate(set_key(load("default"), key, typo))
    message = str(error.value)
    assert repr(typo) in message, message
    assert (hint in message) if hint else "did you mean" not in message, message


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_the_table_covers_every_key_of_every_config(name):
  keys = set(config_checks.flatten(load(name)))
  assert not keys - set(RULES), f"keys without a rule in config_checks.rules(): {keys - set(RULES)}"
  assert not set(RULES) - keys, f"rules for keys configs/{name}.py lacks: {set(RULES) - keys}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_validates_as_is(name):
  config_checks.validate(load(name))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_field_is_typed_so_the_command_line_can_set_it(name):
  # A bare None field refuses `--config.KEY=VALUE`; a placeholder(type) takes it.
  config = load(name)
  for key in config_checks.flatten(config):
    *path, last = key.split(".")
    parent = config
    for part in path:
      parent = parent[part]
    assert parent.get_type(last) is not type(None), f"configs/{name}.py: {key} is a bare None"


def test_unknown_and_missing_keys_are_caught():
  config = load("default")
  config.unlock()
  config.dataset.colour = "grey"  # a typo or stale key in a config file
  with pytest.raises(train.ConfigError, match=r"unknown config key dataset\.colour"):
    config_checks.validate(config)
  config = load("default")
  config.unlock()
  del config.optimizer["eps"]
  with pytest.raises(train.ConfigError, match=r"lacks the key optimizer\.eps"):
    config_checks.validate(config)


def test_sentinels_and_unset_values_are_allowed():
  config = load("default")
  for key, value in [
    ("num_train_steps", -1),
    ("eval_every_steps", -1),
    ("num_devices", 0),
    ("dataset.classes", 0),
    ("dataset.train_per_class", 0),
    ("augment.autoaugment", "none"),
    ("augment.autoaugment", "None"),
    ("augment.autoaugment", None),
    ("model_overrides.mixer", "lkca,mhsa"),
    ("label_smoothing", 0.0),
  ]:
    config_checks.validate(set_key(config, key, value))


def test_mixer_options_take_the_sets_the_mixer_defines():
  for key, allowed in [
    ("model_overrides.mixer_options.lkca.view", VIEWS),
    ("model_overrides.mixer_options.lkca.kernel_sharing", KERNEL_SHARING),
  ]:
    for value in allowed:
      assert RULES[key].error(key, value) is None
    assert RULES[key].error(key, "bogus") is not None


def test_config_error_is_one_class():
  assert train.ConfigError is config_checks.ConfigError
  assert issubclass(train.ConfigError, ValueError)


# --- through main.py -----------------------------------------------------------
DIGITS = ["--config", "configs/digits.py"]
REJECTED = [
  # One of each path to the error line; every rule's own message is tested in-process above.
  (["--config.batch_size=0"], "batch_size must be an integer >= 1, got 0"),
  (["--mode=eval", "--config.num_epochs=0"], "num_epochs must be an integer >= 1"),
  (["--config.model=vit_99m"], "unknown model preset 'vit_99m'"),
  # Checked in Run.prepare against the dataset and devices, still before anything runs.
  (["--config.patch_size=3"], "not divisible by patch size"),
  (["--config.num_devices=0", "--config.batch_size=60"], "not divisible by 8 devices"),
  (["--config.batch_size=64", "--config.microbatches=3"], "microbatches=3 does not divide"),
  (["--config.epoch_length=images"], 'epoch_length="images" with epoch_order="independent"'),
  (["--config.mixing.groups=3"], "mixing.groups=3 does not divide the batch of 64"),
  (["--config.dataset.placement=stream"], "dataset digits is not a TFDS dataset and has no files"),
  (
    ["--config.dataset.stream_crop=random_resized"],
    "dataset digits is not a TFDS dataset and loads whole, but dataset.stream_crop=",
  ),
  (
    ["--config.optimizer.schedule=deit_epochs", "--config.optimizer.warmup_epochs=0.5"],
    "warms up for whole epochs",
  ),
]


def _main(args, workdir):
  return subprocess.Popen(
    [sys.executable, "main.py", *DIGITS, *args, f"--workdir={workdir}"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _error_line(proc, args):
  _, err = proc.communicate(timeout=300)
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, (args, err[-2000:])
  assert "Traceback" not in err, (args, err[-2000:])
  assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (args, err[-2000:])
  return errors[0]


@pytest.mark.slow
def test_bad_values_exit_2_with_one_error_line_and_write_nothing(tmp_path):
  # The accepted case: AutoAugment switched on for digits passes every check and
  # reaches the checkpoint lookup of --mode eval, which finds none.
  cases = REJECTED + [(["--mode=eval", "--config.augment.autoaugment=cifar10"], "no checkpoint in")]
  # In parallel: each process spends most of its time importing JAX.
  procs = [_main(args, tmp_path / str(i)) for i, (args, _) in enumerate(cases)]
  for i, (proc, (args, message)) in enumerate(zip(procs, cases, strict=True)):
    line = _error_line(proc, args)
    assert message in line, (args, line)
    assert not (tmp_path / str(i)).exists(), (args, os.listdir(tmp_path / str(i)))


@pytest.mark.slow
def test_a_batch_the_loaded_subset_cannot_fill_is_one_error_line_before_compiling(tmp_path):
  # Known once the data is in: 2 images a class of 10, 3 repeats, make 60 samples an epoch.
  args = ["--config.dataset.train_per_class=2", "--config.batch_size=64", "--config.num_devices=1"]
  line = _error_line(_main(args, tmp_path), args)
  assert line == (
    "error: an epoch of 60 samples (20 training images, epoch_length='repeats', repeats=3) "
    "makes no full batch of 64; lower --config.batch_size"
  )
  assert [p.name for p in tmp_path.iterdir()] == ["lock"]  # no config.json, no checkpoint
  assert (tmp_path / "lock").read_text() == ""  # released


# ml_collections loads a config file with the loader's load_module, deprecated in Python 3.11.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_the_imagenet_learning_rate_follows_the_batch_size_given_as_a_flag():
  """DeiT scales its rate by the global batch (5e-4 per 512); a batch set on the command line
  must carry its rate along, and a rate set there wins."""
  from absl import flags
  from ml_collections import config_flags

  def parsed(*overrides):
    argv = ["main.py", f"--config={ROOT}/configs/imagenet.py", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config

  assert parsed().optimizer.learning_rate == 1e-3  # batch 1024
  smaller = parsed("--config.batch_size=256")
  assert smaller.optimizer.learning_rate == 2.5e-4
  assert '"learning_rate": 0.00025' in smaller.to_json_best_effort()  # as config.json saves it
  config_checks.validate(smaller)
  assert parsed("--config.batch_size=256", "--config.optimizer.learning_rate=3e-4").optimizer[
    "learning_rate"
  ] == pytest.approx(3e-4, rel=0)
