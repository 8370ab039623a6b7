"""init_from: a run that starts from another run's checkpoint, its parameters (or, with
init_from_average, their moving average) moved to this model's image size
(resolution.move_params) and, with a new head, to its classes."""

from __future__ import annotations

import jax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import resolution, runs, steps
from lkca_jax.config_checks import ConfigError
from lkca_jax.data import pipeline as pipeline_lib


def init_from_source(path) -> tuple[epath.Path, int]:
  """--config.init_from → (checkpoints directory, step): a workdir or its checkpoints
  directory (the newest checkpoint), or a step directory. Raises ConfigError."""
  where = f"init_from={path}"
  path = checkpoint_lib.absolute(path)
  if path.name.isdigit():
    try:
      return checkpoint_lib.resolve(path)
    except checkpoint_lib.CheckpointError as e:
      raise ConfigError(f"{where}: {e}") from None
  directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  if not directory.is_dir():
    raise ConfigError(
      f"{where}: no such directory; pass a workdir, its checkpoints/ or a checkpoint step "
      "directory <workdir>/checkpoints/<step>"
    )
  checkpoints = checkpoint_lib.Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    step = checkpoints.latest_step()
  finally:
    checkpoints.close()
  if step is None:
    raise ConfigError(f"{where}: no checkpoint in {directory}; train there first")
  return directory, step


def _saved_params(config, directory, step, model) -> tuple[nnx.State, int | None]:
  """(shapes of the checkpoint's parameters, or with init_from_average of their moving
  average, as one run's nnx.State; its run count or None). Raises CheckpointError where
  init_from_average finds no average there."""
  field = steps.AVERAGE_NAME if config.init_from_average else "params"
  if config.init_from_average and not checkpoint_lib.holds_arrays_under(directory, step, field):
    raise checkpoint_lib.CheckpointError(
      f"{directory / str(step)} kept no moving average of its parameters (trained with "
      "ema_decay 0): start from its parameters (init_from_average=False)"
    )
  saved = checkpoint_lib.saved_like(directory, step, field, nnx.state(model, nnx.Param))
  count = checkpoint_lib.saved_runs(directory, step)
  if count is not None:
    saved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), saved)
  return saved, count


def check_init_from(config, model) -> None:
  """ConfigError unless `config.init_from` names a checkpoint whose parameters move to
  `model` (shapes only: nothing is read but metadata)."""
  if not config.init_from:
    return
  where = f"init_from={config.init_from}"
  directory, step = init_from_source(config.init_from)
  try:
    saved, saved_runs = _saved_params(config, directory, step, model)
    jax.eval_shape(lambda p: _moved(config, p, model), saved)
  except (checkpoint_lib.CheckpointError, resolution.MoveError) as e:
    raise ConfigError(f"{where}: {e}") from None
  num_runs = len(runs.run_specs(config))
  if saved_runs not in (None, num_runs):
    raise ConfigError(
      f"{where}: the checkpoint holds {saved_runs} runs, this config trains {num_runs}; train as "
      "many runs (each starts from its own), or start from a single run's checkpoint"
    )


def moved_params(config, model, mesh) -> nnx.State:
  """The parameters of `config.init_from` (their moving average with init_from_average)
  moved to `model`'s grid (resolution.move_params), each run's (stacked along the run axis
  with several), replicated on `mesh`."""
  directory, step = init_from_source(config.init_from)
  saved, saved_runs = _saved_params(config, directory, step, model)
  replicated = NamedSharding(mesh, P())
  lead = () if saved_runs is None else (saved_runs,)
  saved = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype, sharding=replicated), saved
  )
  if config.init_from_average:
    restored = checkpoint_lib.read_under(steps.AVERAGE_NAME, saved, directory / str(step))
    params = restored.state
  else:
    restored = checkpoint_lib.read_checkpoint({"params": saved}, directory / str(step))
    params = restored.state["params"]
  count = len(runs.run_specs(config))
  each = [params if saved_runs is None else steps.run_of(params, k) for k in range(count)]
  moved = [_moved(config, p, model) for p in each]
  logging.info(
    "%s from %s, moved to a %dx%d grid (kernels: %s; head: %s)",
    "parameters' moving average" if config.init_from_average else "parameters",
    restored.path,
    *model.grid,
    config.init_from_kernels,
    config.init_from_head,
  )
  return pipeline_lib.put_tree(steps.as_runs(moved), replicated)


def _moved(config, params, model) -> nnx.State:
  return resolution.move_params(
    params, model, kernels=config.init_from_kernels, head=config.init_from_head
  )


def initialised_from(config, model, mesh, state: steps.TrainState) -> steps.TrainState:
  """`state` with the parameters of `config.init_from` (moved_params); the optimizer state
  and step stay fresh, and so does a new classifier (init_from_head="new"): each run's
  own, as its seed drew it. A moving average of the parameters (ema_decay) starts at them."""
  params = steps.variable_values(moved_params(config, model, mesh))
  if config.init_from_head == "new":
    params = jax.tree_util.tree_map_with_path(
      lambda path, moved, own: own if path[0].key == "head" else moved, params, state.params
    )
  opt_state = steps.average_restarted(state.opt_state, params)
  return state.replace(params=params, opt_state=opt_state)
