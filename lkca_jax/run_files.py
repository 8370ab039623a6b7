"""What a training run keeps in its workdir beside its checkpoints (config.json,
summary.json), read back: whether a config may resume the run, whether it finished, and
its config laid over the defaults for reuse."""

from __future__ import annotations

import copy
import json
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import distributed
from lkca_jax import workdir as workdir_lib
from lkca_jax.config_checks import ConfigError

# The files a run writes in its workdir beside checkpoints/.
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


# Config keys that leave what a run trains as it is: where its data and outputs live, how
# often it logs, evaluates and saves, and how many devices or microbatches share a step (a
# step on any count is the same step to round-off).
SAME_TRAINING = frozenset(
  {
    "checkpoint_every_steps",
    "dataset.data_dir",
    "dataset.download",
    "dataset.manual_dir",
    "dataset.placement",
    "dataset.stream_workers",
    "eval_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "microbatches",
    "num_devices",
  }
)
# Config keys a resumed run may change: those, and init_from, which seeds only a run's start.
# Any other change would train the rest of a run as another run under the first one's name.
RESUME_MAY_CHANGE = SAME_TRAINING | {
  "init_from",
  "init_from_average",
  "init_from_head",
  "init_from_kernels",
}


# The keys configs/default.py gained after runs began writing config.json (2026-11-21), each
# with the value that does what runs did before it: a config.json without one is read as
# holding that value, so resuming such a run with another is a change like any other. A key
# added to configs/default.py is added here too (tests/test_run_files.py says so).
LATER_KEYS = {
  "augment.erasing_aspect_sampling": "uniform",
  "augment.erasing_attempts": 100,
  "augment.erasing_fill": "mean",
  "dataset.eval_crop_fraction": 1.0,
  "dataset.image_size": None,
  "dataset.stream_crop": "resize",
  "dataset.stream_crop_ratio": [0.75, 4 / 3],
  "dataset.stream_crop_scale": [0.08, 1.0],
  "dataset.stream_workers": 0,
  "ema_decay": 0.0,
  "epoch_length": "repeats",
  "epoch_order": "independent",
  "init_from": None,
  "init_from_average": False,
  "init_from_head": "keep",
  "init_from_kernels": "resample",
  "microbatches": 1,
  "mixing.groups": 1,
  "mixing.partner": "permutation",
  "model_overrides.convention": None,
  "model_overrides.drop_path_schedule": None,
  "model_overrides.mixer_options.flatten.qkv_bias": None,
  "model_overrides.mixer_options.lkca.kernel_init": None,
  "model_overrides.mixer_options.mhsa.head_dim": None,
  "model_overrides.mixer_options.mhsa.qkv_bias": None,
  "num_runs": 1,
  "optimizer.schedule": "warmup_cosine",
  "optimizer.warmup_fraction": None,
  "optimizer.weight_decay_on": "all",
  "sweep": "",
}


def check_resumes_its_own_run(workdir: epath.Path, config) -> None:
  """Raises WorkdirError if `workdir` holds checkpoints of a run whose config (its
  config.json) differs from `config` outside RESUME_MAY_CHANGE. A key the file lacks counts
  as its LATER_KEYS value; other keys only one side has (a config of another version of
  this code) are not compared. Process 0 decides."""
  changes = config_changes(workdir, config) if jax.process_index() == 0 else []
  if distributed.process_zero_says(not changes):
    return
  shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
  raise workdir_lib.WorkdirError(
    f"--workdir={workdir} holds checkpoints of a run with another config "
    f"({shown or 'process 0 names them'}): resuming would train the rest of it as another "
    f"run. Resume with its config (--config {workdir_lib.READ_BACK_CONFIG}:{workdir}), or "
    "train in a fresh --workdir"
  )


def config_changes(workdir: epath.Path, config) -> list[str]:
  """'key: A there, B here' for each key outside RESUME_MAY_CHANGE that the config.json of
  the run checkpointed in `workdir` holds otherwise; [] where it holds no checkpoint."""
  checkpoints, saved_file = workdir / "checkpoints", workdir / CONFIG_FILE
  if not checkpoints.is_dir() or not saved_file.exists():
    return []
  if not any(p.name.isdigit() for p in checkpoints.iterdir()):
    return []
  try:
    saved = json.loads(saved_file.read_text())
  except (OSError, ValueError) as e:  # written atomically: not expected, and not worth a stop
    logging.warning("%s cannot be read (%s); resuming without comparing configs", saved_file, e)
    return []
  return _differences(saved, config)


def _differences(saved: dict, config) -> list[str]:
  """'key: A there, B here' for each key outside RESUME_MAY_CHANGE where the config saved
  as JSON (a key it lacks read as its LATER_KEYS value) and `config` differ; other keys
  only one of them has are not compared."""
  saved = {**LATER_KEYS, **_flat(saved)} if saved else {}
  return [
    f"{key}: {a!r} there, {b!r} here" for key, a, b in differences(saved, config, RESUME_MAY_CHANGE)
  ]


def differences(reference: dict, config, ignore=frozenset()) -> list[tuple[str, Any, Any]]:
  """(key, its value in `reference`, in `config`) for each dotted key outside `ignore` that
  both hold with unequal values, in key order; `reference` is a config as JSON, nested or
  flat. Values compare as JSON gives them (tuples as lists)."""
  reference = _flat(reference)
  here = _flat(json.loads(config.to_json_best_effort()))
  return [
    (key, reference[key], here[key])
    for key in sorted(reference.keys() & here.keys())
    if reference[key] != here[key] and key not in ignore
  ]


# The config keys (and groups of keys) that decide the parameters' names and shapes; the
# other model_overrides (drop_path_rate, drop_path_schedule) and the recipe do not.
SHAPE_KEYS = (
  "model",
  "model_overrides.mixer",
  "model_overrides.dim",
  "model_overrides.depth",
  "model_overrides.num_heads",
  "model_overrides.mlp_ratio",
  "model_overrides.pool",
  "model_overrides.mixer_options",
  "model_overrides.convention",  # "deit" gives MHSA a qkv bias
  "patch_size",
  "dataset.name",
  "dataset.classes",
  "dataset.image_size",
  "num_runs",
  "sweep",
)


def _shapes_params(change: str) -> bool:
  """Whether a 'key: A there, B here' of `_differences` is of a key in SHAPE_KEYS."""
  key = change.split(":", 1)[0]
  return any(key == shaping or key.startswith(f"{shaping}.") for shaping in SHAPE_KEYS)


def read_trained(config, like, source) -> checkpoint_lib.Restored:
  """`checkpoint_lib.read_checkpoint`, read-only; a checkpoint of other shapes than `config`'s
  model is a CheckpointError that names the keys of SHAPE_KEYS its run's config.json holds
  otherwise (where that file is beside its checkpoints)."""
  try:
    return checkpoint_lib.read_checkpoint(like, source)
  except checkpoint_lib.OtherShapesError as e:
    saved_file = e.path.parent.parent / CONFIG_FILE
    try:
      saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):  # a checkpoint kept without its run's files
      saved = {}
    changes = [c for c in _differences(saved, config) if _shapes_params(c)]
    if not changes:
      raise
    raise checkpoint_lib.CheckpointError(
      f"checkpoint {e.path} does not match this model/config ({e.mismatch}); its run "
      f"({saved_file}) differs in {'; '.join(changes)}: use that run's config "
      f"(--config {workdir_lib.READ_BACK_CONFIG}:{e.path.parent.parent})"
    ) from None


def finished_summary(workdir) -> dict | None:
  """The summary.json in `workdir` of a training that reached its last step, else None."""
  try:
    summary = json.loads((epath.Path(workdir) / SUMMARY_FILE).read_text())
  except (OSError, ValueError):
    return None
  if not summary or summary.get("stopped_by") or summary.get("step") != summary.get("total_steps"):
    return None
  return summary


def summary_of_this_run(workdir: epath.Path, config, step: int) -> dict | None:
  """The finished summary in `workdir` of this config's run at `step`: what a command run
  again after the run finished reports (its train images/s and wall time are the ones
  measured while it trained, where this process measured none)."""
  summary = finished_summary(workdir)
  if summary is None or summary["step"] != step:
    return None
  return None if _differences(summary.get("config", {}), config) else summary


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def saved_config(workdir, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a `main.py` run saved in `workdir` (its config.json), laid over a copy of
  `base`: each saved value typed as `base` types it (an unset one keeps its type, so it can
  still be overridden); keys the file lacks keep `base`'s values. Raises ConfigError for a
  missing or unreadable file, a value that does not fit, or a key `base` lacks (a run of
  another version of lkca_jax, whose settings could not all be applied)."""
  path = epath.Path(workdir) / CONFIG_FILE
  config = copy.deepcopy(base)
  unknown = _lay_over(config, saved_config_json(workdir), path)
  if unknown:
    raise ConfigError(
      f"{path} holds keys this version's config lacks ({', '.join(unknown)}): a run of "
      "another version of lkca_jax"
    )
  return config


def saved_config_json(workdir) -> dict:
  """The config.json a `main.py` run wrote in `workdir`; ConfigError if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not epath.Path(workdir).is_dir():
    raise ConfigError(f"{workdir} is not a directory")
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise ConfigError(f"{workdir} is not a training workdir (no {CONFIG_FILE})") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({e})") from None


def _lay_over(config, saved: dict, path, prefix: str = "") -> list[str]:
  """Sets each saved value on `config`, key by key; returns the keys `config` lacks."""
  unknown = []
  for key, value in saved.items():
    if key not in config:
      unknown.append(prefix + key)
    elif isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
      unknown += _lay_over(config[key], value, path, f"{prefix}{key}.")
    elif value is None:
      if config[key] is not None:
        config[key] = ml_collections.config_dict.placeholder(type(config[key]))
    else:
      try:
        config[key] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
      except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(
          f"{path}: {prefix}{key}={value!r} does not fit this config ({e})"
        ) from None
  return unknown
