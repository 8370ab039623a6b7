"""Orbax checkpoints of the train state: the latest K plus the best by test top-1.

Each checkpoint holds two items: `state` (step, parameters, optimizer state)
and `meta` (JSON: epoch bookkeeping, best accuracy, eval history), so a
restarted run resumes its data order, random streams and best-so-far.
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "top1"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used with this run; the message names the fix."""


def absolute(path) -> epath.Path:
  """Resolves local paths; leaves cloud paths (gs://...) as they are."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.resolve()


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """Wraps an orbax CheckpointManager over `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = absolute(directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=asynchronous, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)

  def restore(self, step: int, like_state):
    """Restores `step` with the shapes, dtypes and shardings of `like_state`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match this model/config ({e}); "
          "resume with the config it was trained with, or start a fresh --workdir") from None
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve(path) -> tuple[epath.Path, int]:
  """`.../checkpoints/<step>` → (checkpoints directory, step), with a clear error."""
  path = absolute(path)
  if not (path.name.isdigit() and (path / "state").is_dir()):
    raise CheckpointError(f"{path} is not a checkpoint step directory (expected "
                          "<workdir>/checkpoints/<step> with a state/ folder)")
  return path.parent, int(path.name)
