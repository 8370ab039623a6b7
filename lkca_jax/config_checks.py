"""Every config key with its valid values, checked in one place before anything is built.

`RULES` maps each dotted key of configs/default.py to what it may hold (the
recipe values are in `docs/method.md`, "Training recipe" and "Presets");
`validate(config)` checks a whole config against it and raises `ConfigError`
with one line naming the key, the value and what is allowed. A key that the
table does not know (say, a typo in a config file) is an error too, so a new
config key needs a rule here; tests/test_config_checks.py enforces that.

Only what a value means on its own is checked here. What depends on the data
or the machine (dataset.classes against the class count, mean/std against the
channels, patch_size against the image size, batch_size against the device
count, whether the data is prepared) is checked by `train.Run.prepare` after
this, still before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lkca_jax import mixing, models, schedules
from lkca_jax.augment import POLICIES, randaugment
from lkca_jax.augment.transforms import ASPECT_SAMPLINGS, ERASING_FILLS
from lkca_jax.data import DATASETS
from lkca_jax.data.pipeline import EPOCH_LENGTHS, EPOCH_ORDERS, PLACEMENTS
from lkca_jax.data.stream import CROPS
from lkca_jax.layers import MIXERS
from lkca_jax.layers.lkca import KERNEL_MOVES


class ConfigError(ValueError):
  """A config that cannot run; the message names the fix."""


# Sets that live inside a function rather than as a constant elsewhere:
# models.ViT accepts these.
POOLS = ("auto", "cls", "mean")
NO_AUTOAUGMENT = "none"  # the string that switches AutoAugment off (unset does too)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key may hold.

  Attributes:
    allowed: the allowed values in words, completing "KEY must be ...".
    check: True for an allowed value (never called with None).
    bad: one value the rule rejects; the tests set every key to its `bad`.
    optional: None (an unset placeholder) is allowed and means "the default".
    names: what a registry's entries are called ("model preset"): the message then
      says "unknown model preset 'x'".
    choices: the allowed strings, where they are few: a near miss is named.
  """

  allowed: str
  check: Callable[[Any], bool]
  bad: Any
  optional: bool = False
  names: str | None = None
  choices: tuple[str, ...] = ()

  def error(self, key: str, value) -> str | None:
    """The one-line complaint about `value` at `key`, or None when it is allowed."""
    if value is None and self.optional:
      return None
    try:
      if value is not None and self.check(value):
        return None
    except (TypeError, ValueError):  # a value of the wrong kind altogether
      pass
    near = difflib.get_close_matches(value, self.choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    if self.names and isinstance(value, str):
      return f"{key}: unknown {self.names} {value!r}{hint}; {key} must be {self.allowed}"
    return f"{key} must be {self.allowed}, got {value!r}{hint}"


# --- rule builders -------------------------------------------------------------
def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unset(text: str, optional: bool) -> str:
  return f"{text}, or unset (None)" if optional else text


def integer(
  low: int, *, sentinel: int | None = None, meaning: str = "", optional: bool = False
) -> Rule:
  """A whole number >= low, or the documented `sentinel` (e.g. -1: "derive it")."""
  text = f"an integer >= {low}"
  if sentinel is not None:
    text += f", or {sentinel} ({meaning})"
  bad = low - 1 if low - 1 != sentinel else low - 2
  return Rule(
    _unset(text, optional), lambda v: _is_int(v) and (v >= low or v == sentinel), bad, optional
  )


def number(
  low: float,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
  optional: bool = False,
) -> Rule:
  """A finite number in the interval [low, high] (either end open as asked)."""
  if high is None:
    text = f"a number {'>' if low_open else '>='} {low:g}"
  else:
    text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

  def check(v):
    if not _is_number(v):
      return False
    above = v > low if low_open else v >= low
    below = high is None or (v < high if high_open else v <= high)
    return above and below

  bad = (high + 1.0) if high is not None else (low - 1.0)
  return Rule(_unset(text, optional), check, bad, optional)


def choice(
  values: Iterable[str],
  *,
  names: str | None = None,
  optional: bool = False,
  extra: Iterable[str] = (),
) -> Rule:
  """One of `values`, or of `extra` in any case (lower-case words such as "none")."""
  values, extra = sorted(values), tuple(extra)
  text = f"one of {values}"
  if extra:
    text += " or " + " / ".join(repr(e) for e in extra)
  return Rule(
    _unset(text, optional),
    lambda v: isinstance(v, str) and (v in values or v.lower() in extra),
    "bogus",
    optional,
    names,
    (*values, *extra),
  )


def boolean(optional: bool = False) -> Rule:
  return Rule(_unset("True or False", optional), lambda v: isinstance(v, bool), "yes", optional)


def string(optional: bool = True) -> Rule:
  return Rule(
    _unset("a non-empty string", optional), lambda v: isinstance(v, str) and bool(v), "", optional
  )


def numbers(
  allowed: str, check_each: Callable[[float], bool], *, length: int | None = None, bad: tuple = ()
) -> Rule:
  """A tuple (or list) of finite numbers, `length` of them if given, else at least one."""

  def check(v):
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
      return False
    v = tuple(v)
    if not v or (length is not None and len(v) != length):
      return False
    return all(_is_number(x) for x in v) and check_each(v)

  return Rule(allowed, check, bad)


def share_pair(bad: tuple) -> Rule:
  """(low, high) shares of a whole: 0 < low <= high <= 1."""
  return numbers(
    "a pair (low, high) with 0 < low <= high <= 1",
    lambda v: 0.0 < v[0] <= v[1] <= 1.0,
    length=2,
    bad=bad,
  )


def positive_pair(bad: tuple) -> Rule:
  """(low, high) with 0 < low <= high, e.g. a range of aspect ratios."""
  return numbers(
    "a pair (low, high) with 0 < low <= high", lambda v: 0.0 < v[0] <= v[1], length=2, bad=bad
  )


def mixer_pattern() -> Rule:
  """A mixer registry name, or a comma pattern of them repeated over depth ("lkca,mhsa")."""
  names = sorted(MIXERS)
  return Rule(
    _unset(f"a mixer name of {names} or a comma pattern of them, e.g. 'lkca,mhsa'", True),
    lambda v: isinstance(v, str) and all(p in MIXERS for p in v.split(",")),
    "lkca,bogus",
    optional=True,
    names="mixer",
  )


def mixer_option_rules() -> dict[str, Rule]:
  """One rule per option a registered mixer declares in `config_options`.

  A declared tuple of names is a choice among them; a type (int, float, bool)
  takes any value of it (integers >= 1); the mixer checks the rest itself.
  """
  kinds = {
    int: lambda: integer(1, optional=True),
    bool: lambda: boolean(optional=True),
    float: lambda: number(-math.inf, optional=True),
    str: lambda: string(),
  }
  rules = {}
  for name, cls in MIXERS.items():
    for option, kind in cls.config_options.items():
      key = f"model_overrides.mixer_options.{name}.{option}"
      rules[key] = choice(kind, optional=True) if isinstance(kind, tuple) else kinds[kind]()
  return rules


def augment_policy() -> Rule:
  """An AutoAugment policy, a RandAugment in timm's form, "none", or unset."""
  values = sorted(POLICIES)

  def check(v):
    if randaugment.is_spec(v):
      return randaugment.parse(v) is not None  # a bad one raises: the rule's message
    return isinstance(v, str) and (v in values or v.lower() == NO_AUTOAUGMENT)

  allowed = f"an AutoAugment policy {values}, a RandAugment {randaugment.SPEC_FORM}, or 'none'"
  return Rule(_unset(allowed, True), check, "rand-m9", True, None, (*values, NO_AUTOAUGMENT))


def dtypes() -> Rule:
  return choice(models.DTYPES)


def _probability() -> Rule:
  return number(0.0, 1.0)


# --- the table -----------------------------------------------------------------
def rules() -> dict[str, Rule]:
  """Every key of configs/default.py, in its order, with its rule."""
  return {**_run_and_model_rules(), **_data_rules(), **_training_rules()}


def _run_and_model_rules() -> dict[str, Rule]:
  """The run, the model and its mixers."""
  return {
    "seed": integer(0),
    "num_runs": integer(1),
    "sweep": Rule(
      "'' or KEY=V1,V2;KEY=V1,... over the keys " + ", ".join(SWEEPABLE),
      _parses_as_sweep,
      "bogus=1",
      optional=False,
    ),
    "model": choice(models.PRESETS, names="model preset"),
    "model_overrides.mixer": mixer_pattern(),
    "model_overrides.dim": integer(1, optional=True),
    "model_overrides.depth": integer(1, optional=True),
    "model_overrides.num_heads": integer(1, optional=True),
    "model_overrides.mlp_ratio": number(0.0, low_open=True, optional=True),
    "model_overrides.drop_path_rate": number(0.0, 1.0, high_open=True, optional=True),
    "model_overrides.drop_path_schedule": choice(models.DROP_PATH_SCHEDULES, optional=True),
    "model_overrides.pool": choice(POOLS, optional=True),
    "model_overrides.convention": choice(models.CONVENTIONS, optional=True),
    **mixer_option_rules(),
    "patch_size": integer(1, optional=True),  # unset: image size / 8
    "dtype": dtypes(),
    "init_from": string(),  # the path itself is checked in Run.prepare
    "init_from_kernels": choice(KERNEL_MOVES),
    "init_from_head": choice(models.HEAD_STARTS),
    "init_from_average": boolean(),
  }


def _data_rules() -> dict[str, Rule]:
  """The dataset and how it is read."""
  return {
    "dataset.name": choice(DATASETS, names="dataset"),
    "dataset.data_dir": string(),
    "dataset.manual_dir": string(),
    "dataset.download": boolean(),
    "dataset.placement": choice(PLACEMENTS),
    "dataset.stream_crop": choice(CROPS),
    "dataset.stream_crop_scale": share_pair(bad=(1.0, 0.08)),
    "dataset.stream_crop_ratio": positive_pair(bad=(0.0, 1.0)),
    "dataset.eval_crop_fraction": number(0.0, 1.0, low_open=True),
    "dataset.stream_workers": integer(0),
    "dataset.image_size": integer(1, optional=True),  # against the dataset: Run.prepare
    # The upper bound (the dataset's class count) is checked in Run.prepare.
    "dataset.classes": Rule(
      "0 (all classes) or an integer >= 2", lambda v: _is_int(v) and (v == 0 or v >= 2), 1
    ),
    "dataset.train_per_class": integer(0),  # 0: all
    # Per channel of [0, 1] images; the channel count is checked in Run.prepare.
    "dataset.mean": numbers(
      "a non-empty tuple of numbers in [0, 1], one per channel",
      lambda v: all(0.0 <= x <= 1.0 for x in v),
      bad=(),
    ),
    "dataset.std": numbers(
      "a non-empty tuple of numbers > 0, one per channel",
      lambda v: all(x > 0.0 for x in v),
      bad=(0.2, 0.0, 0.2),
    ),
  }


def _training_rules() -> dict[str, Rule]:
  """Augmentation, the optimizer, the schedule and the loop's cadence."""
  return {
    "augment.flip": boolean(),
    "augment.crop_padding": integer(0),  # 0: no crop
    "augment.autoaugment": augment_policy(),
    "augment.random_erasing": _probability(),
    "augment.erasing_area": share_pair(bad=(0.4, 0.02)),
    "augment.erasing_aspect": positive_pair(bad=(0.0, 3.3)),
    "augment.erasing_aspect_sampling": choice(ASPECT_SAMPLINGS),
    "augment.erasing_attempts": integer(1),
    "augment.erasing_fill": choice(ERASING_FILLS),
    "mixing.prob": _probability(),
    "mixing.cutmix_prob": _probability(),
    "mixing.cutmix_alpha": number(0.0, low_open=True),  # Beta(alpha, alpha) needs alpha > 0
    "mixing.mixup_alpha": number(0.0, low_open=True),
    "mixing.partner": choice(mixing.PARTNERS),
    "mixing.groups": integer(1),
    "label_smoothing": number(0.0, 1.0, high_open=True),  # 1 would erase the labels
    "optimizer.learning_rate": number(0.0, low_open=True),
    "optimizer.b1": number(0.0, 1.0, high_open=True),
    "optimizer.b2": number(0.0, 1.0, high_open=True),
    "optimizer.eps": number(0.0, low_open=True),
    "optimizer.weight_decay": number(0.0),
    "optimizer.warmup_epochs": number(0.0),  # a fraction of an epoch too
    "optimizer.warmup_fraction": number(0.0, 1.0, high_open=True, optional=True),
    "optimizer.schedule": choice(schedules.SCHEDULES),
    "optimizer.weight_decay_on": choice(models.WEIGHT_DECAY_ON),
    "optimizer.init_learning_rate": number(0.0),
    "optimizer.end_learning_rate": number(0.0),
    "ema_decay": number(0.0, 1.0, high_open=True),  # 0: no moving average
    "batch_size": integer(1),
    "microbatches": integer(1),
    "num_epochs": integer(1),
    "repeats": integer(1),
    "epoch_order": choice(EPOCH_ORDERS),
    "epoch_length": choice(EPOCH_LENGTHS),
    "num_train_steps": integer(1, sentinel=-1, meaning="num_epochs x steps per epoch"),
    "num_devices": integer(1, sentinel=0, meaning="every device"),
    "eval_every_steps": integer(1, sentinel=-1, meaning="once an epoch"),
    "log_every_steps": integer(1),
    "checkpoint_every_steps": integer(1),
    "keep_checkpoints": integer(1),
  }


# --- sweeps --------------------------------------------------------------------
# Scalars that the trainer passes to its step as traced per-run values: a sweep over them
# trains every value in one program. Other keys change shapes or the program itself.
SWEEPABLE = (
  "optimizer.learning_rate",
  "optimizer.weight_decay",
  "model_overrides.drop_path_rate",
  "label_smoothing",
  "mixing.prob",
  "mixing.cutmix_prob",
)


def parse_sweep(text: str) -> dict[str, tuple[float, ...]]:
  """`"KEY=V1,V2;KEY=V1"` → {KEY: (V1, V2), ...}, in the order given. Raises ConfigError.

  Every value must pass its key's own rule; a key may appear once.
  """
  sweep = {}
  table = rules()
  where = f"sweep={text!r}"
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    key, sep, values = (s.strip() for s in part.partition("="))
    if not sep or not values:
      raise ConfigError(
        f"{where}: {part!r} is not KEY=V1,V2,...; e.g. "
        "sweep='optimizer.learning_rate=1e-3,5e-4;label_smoothing=0.0,0.1'"
      )
    if key not in SWEEPABLE:
      what = "it changes shapes or the program" if key in table else "it is no config key"
      raise ConfigError(
        f"{where}: {key} cannot be swept ({what}); sweepable keys: {', '.join(SWEEPABLE)}"
      )
    if key in sweep:
      raise ConfigError(f"{where}: {key} is named twice; list all its values once")
    try:
      parsed = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise ConfigError(f"{where}: {key}={values} holds a value that is not a number") from None
    for value in parsed:
      message = table[key].error(key, value)
      if message:
        raise ConfigError(f"{where}: {message}")
    if len(set(parsed)) != len(parsed):
      raise ConfigError(f"{where}: {key}={values} repeats a value")
    sweep[key] = parsed
  return sweep


def _parses_as_sweep(value) -> bool:
  if not isinstance(value, str):
    return False
  try:
    parse_sweep(value)
  except ConfigError:
    return False
  return True


def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} for every leaf of a (nested) ConfigDict or mapping."""
  leaves = {}
  for key, value in config.items():
    if hasattr(value, "items") and not isinstance(value, (str, bytes)):
      leaves.update(flatten(value, f"{prefix}{key}."))
    else:
      leaves[f"{prefix}{key}"] = value
  return leaves


def validate(config) -> None:
  """Raises ConfigError for the first key (in table order) whose value is not allowed.

  Also for a key the table does not know and for a key the config lacks.
  """
  table = rules()
  values = flatten(config)
  unknown = [key for key in values if key not in table]
  if unknown:
    raise ConfigError(
      f"unknown config key {unknown[0]} (= {values[unknown[0]]!r}); "
      "the keys are those of configs/default.py"
    )
  for key, rule in table.items():
    if key not in values:
      raise ConfigError(
        f"the config lacks the key {key}; start the config from configs/default.py's get_config()"
      )
    if key == "sweep" and isinstance(values[key], str):
      parse_sweep(values[key])  # its own, more precise message
    message = rule.error(key, values[key])
    if message:
      raise ConfigError(message)
