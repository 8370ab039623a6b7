"""Orbax checkpoints of the train state: the latest K plus the best by test top-1.

Each checkpoint `<directory>/<step>` holds two items: `state` (step, parameters,
optimizer state, RNG stream counters) and `meta` (JSON: the best test top-1 so
far, its step, and every evaluation's metrics), so a restarted run resumes its
data order, random streams and best-so-far.

A checkpoint that cannot be read back (truncated or missing files, corrupt
metadata, a write cut short) is damaged: `restore_latest` warns, moves it to
`<directory>_damaged/<step>-<reason>`, where orbax neither lists nor deletes it,
and falls back to the newest one that restores. A checkpoint of another model
or config is not damage but a `CheckpointError`.

`read_checkpoint` reads part of a run's state (the parameters, to evaluate or
analyse) read-only, from a given checkpoint or the newest one that restores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from lkca_jax import adapters

BEST_METRIC = "top1"
# TensorStore statuses that say nothing about the files (access, network, memory).
_NOT_DAMAGE = frozenset(
  {"PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
)
_DAMAGE_KIND = {"NOT_FOUND": "missing", "OUT_OF_RANGE": "truncated"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be used with this run; the message names the fix."""


class OtherShapesError(CheckpointError):
  """A checkpoint whose arrays have other names or shapes than the model's: another config."""

  def __init__(self, path, mismatch: str):
    super().__init__(
      f"checkpoint {path} does not match this model/config ({mismatch}); "
      "use the config it was trained with, or train in a fresh --workdir"
    )
    self.path, self.mismatch = path, mismatch


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read back."""

  def __init__(self, path, reason: str, detail: str):
    super().__init__(f"checkpoint {path} is damaged ({reason}: {detail})")
    self.path, self.reason, self.detail = path, reason, detail


def absolute(path) -> epath.Path:
  """Resolves local paths; leaves cloud paths (gs://...) as they are."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.resolve()


def _name(keypath) -> str:
  """An array's name in a checkpoint: its key path, dotted ("params.head.kernel.value")."""
  return ".".join(ocp.tree.str_keypath(keypath))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _detail(error: BaseException) -> str:
  """One short line for `error`: its TensorStore cause's, where it has one."""
  error = adapters.tensorstore_error(error) or error
  lines = str(error).strip().splitlines()
  text = adapters.tensorstore_summary(error) or (lines[0] if lines else "")
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= 300 else text[:297] + "..."


def _damage(path, part: str, error: Exception) -> DamagedCheckpointError:
  """Classifies an error reading `part` ("data", "metadata" or "meta") of checkpoint `path`.

  Raises CheckpointError for errors that are not the files' fault, so that a
  checkpoint is never set aside for, say, a network outage.
  """
  cause = adapters.tensorstore_error(error)  # orbax wraps a failed array read's
  status = adapters.tensorstore_status(cause) if cause is not None else None
  if isinstance(error, (PermissionError, TimeoutError, ConnectionError)) or status in _NOT_DAMAGE:
    raise CheckpointError(
      f"cannot read checkpoint {path} ({_detail(error)}); not damage to "
      "its files: fix the cause (access, network, memory) and retry"
    ) from None
  kind = "missing" if isinstance(error, FileNotFoundError) else _DAMAGE_KIND.get(status, "corrupt")
  return DamagedCheckpointError(path, f"{part}-{kind}", _detail(error))


def _warn(damage: DamagedCheckpointError, outcome: str) -> None:
  logging.warning(
    "checkpoint %s cannot be restored (%s: %s); %s",
    damage.path,
    damage.reason,
    damage.detail,
    outcome,
  )


def _shape_mismatch(saved: dict[str, tuple], like_state, partial: bool = False) -> str | None:
  """How the saved state's array names and shapes differ from `like_state`'s, if they do.

  With `partial`, arrays on disk that `like_state` leaves out are fine.
  """
  wanted = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(like_state)[0]:
    shape = tuple(leaf.shape)
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # saved as raw key data
      shape = jax.eval_shape(jax.random.key_data, leaf).shape
    wanted[_name(keypath)] = shape
  if saved.keys() != wanted.keys() and not (partial and wanted.keys() <= saved.keys()):
    parts = [
      f"{len(names)} arrays only {where}, e.g. {names[0]}"
      for names, where in (
        ([] if partial else sorted(saved.keys() - wanted.keys()), "on disk"),
        (sorted(wanted.keys() - saved.keys()), "in this model"),
      )
      if names
    ]
    return "; ".join(parts)
  for name, shape in wanted.items():
    if saved[name] is not None and saved[name] != shape:
      return f"{name} is {saved[name]} on disk, {shape} in this model"
  return None


def _one_local_replica(tree):
  """Each array that this process holds whole on every device, as its copy on one device.

  orbax writes a replicated array "replica-parallel": each replica writes a slice of it,
  cut by one eager slice op per replica. Within one process that buys nothing (the
  same host writes every slice) and costs a dispatch per array and device; a small
  model's save on 8 devices took several times its write. Arrays spread over several
  processes are left to orbax, whose replica-parallel write shares them out.
  """

  def one(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated and x.is_fully_addressable:
      return x.addressable_shards[0].data
    return x

  return jax.tree.map(one, tree)


class Checkpoints:
  """Wraps an orbax CheckpointManager over `directory`.

  With `read_only` (evaluation) nothing in `directory` is written, deleted or
  moved, so it is safe next to a run that is training there; only read-only
  instances restore part of a state (`partial`).
  """

  def __init__(
    self, directory: str, *, keep: int = 3, asynchronous: bool = True, read_only: bool = False
  ):
    self.directory = absolute(directory)
    self.damaged_directory = self.directory.parent / f"{self.directory.name}_damaged"
    self.read_only = read_only
    if not read_only:  # before orbax deletes them as it starts
      self._set_aside_unfinished_writes()
    policy = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else policy,
      enable_async_checkpointing=asynchronous,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
    )
    # The standard handler writes (and checks) plain array trees; the PyTree one it
    # wraps, reading the same files, also restores part of a tree.
    state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": state_handler, "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    state = _one_local_replica(state)
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )

  def _saved_tree(self, step: int):
    """The state saved at `step` as orbax's metadata tree (plain dicts and lists).

    Raises DamagedCheckpointError if the metadata, or the arrays' own, cannot be read.
    """
    path = self.directory / str(step)
    try:
      adapters.quiet_abandoned_reads()  # a failed read abandons the others
      tree = self.manager.metadata(step).item_metadata["state"]
    except Exception as e:  # noqa: BLE001 - classified: damage or not
      # TensorStore errors come from the array files; the others from the tree's.
      raise _damage(path, "data" if adapters.tensorstore_error(e) else "metadata", e) from None
    if tree is None:  # what orbax answers when the tree metadata file is missing
      raise DamagedCheckpointError(path, "metadata-missing", "state/ has no tree metadata")
    return tree

  def saved_shapes(self, step: int) -> dict[str, tuple | None]:
    """{array name: global shape} of the state saved at `step`, from orbax's metadata.

    Raises DamagedCheckpointError if the metadata, or the arrays' own, cannot be read.
    """
    leaves = jax.tree_util.tree_flatten_with_path(self._saved_tree(step))[0]
    return {_name(keypath): getattr(leaf, "shape", None) for keypath, leaf in leaves}

  def restore_under(self, step: int, prefix: str, like):
    """(`like` filled with the arrays saved at `step` under the dotted name `prefix`, meta).

    `like` holds ShapeDtypeStructs with shardings, named below `prefix` as `saved_like`
    names them. The state's field that holds them is read whole, in the layout it was
    saved with (an optimizer state of any settings), and only `like`'s arrays are kept.
    Read-only instances only, like every partial restore.
    """
    field = prefix.split(".")[0]
    sharding = jax.tree.leaves(like)[0].sharding
    template = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      self._saved_tree(step)[field],
    )
    state, meta = self.restore(step, {field: template}, partial=True)
    found = dict((_name(k), x) for k, x in jax.tree_util.tree_flatten_with_path(state)[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path({prefix: like})
    return jax.tree_util.tree_unflatten(treedef, [found[_name(k)] for k, _ in leaves])[prefix], meta

  def restore(self, step: int, like_state, *, partial: bool = False):
    """Restores `step` with the shapes, dtypes and shardings of `like_state`.

    With `partial` (read-only instances), `like_state` is a dict of some of the
    state's fields (say {"params": ..., "rest": ...} to evaluate), and only those
    are read. Raises DamagedCheckpointError if its files cannot be read back, and
    CheckpointError if it holds another model or config.
    """
    if partial and not self.read_only:
      raise ValueError("partial restores need Checkpoints(..., read_only=True)")
    path = self.directory / str(step)
    mismatch = _shape_mismatch(self.saved_shapes(step), like_state, partial)
    if mismatch:
      raise OtherShapesError(path, mismatch)
    if self.read_only:
      state_args = ocp.args.PyTreeRestore(
        item=_abstract(like_state),
        partial_restore=partial,
        restore_args=ocp.checkpoint_utils.construct_restore_args(like_state),
      )
    else:
      state_args = ocp.args.StandardRestore(_abstract(like_state))
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(state=state_args))["state"]
    except Exception as e:  # noqa: BLE001 - the metadata matched: the data is at fault
      raise _damage(path, "data", e) from None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except Exception as e:  # noqa: BLE001
      raise _damage(path, "meta", e) from None
    if not isinstance(meta, dict):
      raise DamagedCheckpointError(path, "meta-corrupt", f"meta is a {type(meta).__name__}")
    return state, meta

  def restore_latest(self, like_state, *, partial: bool = False):
    """(step, state, meta) of the newest checkpoint that restores, or None if there are none.

    Damaged checkpoints on the way get one warning each and, unless read-only,
    are set aside. Raises CheckpointError on a model/config mismatch, or if
    there are checkpoints but none restores (then all are left where they are).
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, like_state, partial=partial)
      except DamagedCheckpointError as e:
        damaged.append(e)
        continue
      except CheckpointError:
        for e in damaged:
          _warn(e, "kept in place")
        raise
      for e in damaged:
        if self.read_only:
          outcome = "skipped"
        elif jax.process_index() == 0:
          outcome = f"set aside as {self._move_aside(e)}"
        else:
          outcome = "set aside by process 0"
        _warn(e, outcome)
      if damaged and not self.read_only:
        if jax.process_count() > 1:  # all found the same damage; wait until it is moved
          ocp.multihost.sync_global_processes("lkca_damaged_set_aside")
        self.manager.reload()  # forget the moved steps, so their numbers can be saved again
      return step, state, meta
    if damaged:
      for e in damaged:
        _warn(e, "kept in place")
      listed = ", ".join(f"{e.path.name}: {e.reason}" for e in damaged)
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored ({listed}); "
        "move them away to start over, or use another --workdir"
      )
    return None

  def _move_aside(self, damage: DamagedCheckpointError) -> epath.Path:
    """Moves a damaged checkpoint out of orbax's sight, never deleting it; returns where to."""
    step = ocp.path.step.step_from_checkpoint_name(damage.path.name)
    target, n = self.damaged_directory / f"{step}-{damage.reason}", 1
    while target.exists():  # the same step may be damaged again after a re-save
      n += 1
      target = self.damaged_directory / f"{step}-{damage.reason}-{n}"
    self.damaged_directory.mkdir(parents=True, exist_ok=True)
    damage.path.rename(target)
    return target

  def _set_aside_unfinished_writes(self) -> None:
    """Moves checkpoints orbax never finalized aside (process 0), then all go on."""
    if jax.process_index() == 0 and self.directory.is_dir():
      for name in sorted(ocp.path.step.tmp_checkpoints(self.directory)):
        try:
          ocp.path.step.step_from_checkpoint_name(name)
        except ValueError:
          continue  # not a step's
        damage = DamagedCheckpointError(
          self.directory / name, "unfinished-write", "the write stopped before orbax finalized it"
        )
        _warn(damage, f"set aside as {self._move_aside(damage)}")
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("lkca_unfinished_writes_set_aside")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def holds_checkpoint(source) -> bool:
  """Whether `source` is a checkpoint step directory, or a checkpoints directory holding one."""
  directory = absolute(source)
  if directory.name.isdigit():
    return True  # named as one: reading it says what is wrong with it
  if not directory.is_dir():
    return False
  checkpoints = Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    return checkpoints.latest_step() is not None
  finally:
    checkpoints.close()


def resolve(path) -> tuple[epath.Path, int]:
  """`.../checkpoints/<step>` → (checkpoints directory, step), with a clear error."""
  path = absolute(path)
  if not (path.name.isdigit() and (path / "state").is_dir()):
    raise CheckpointError(
      f"{path} is not a checkpoint step directory (expected "
      "<workdir>/checkpoints/<step> with a state/ folder)"
    )
  return path.parent, int(path.name)


def _saved_shapes(directory, step: int) -> dict[str, tuple | None]:
  checkpoints = Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    return checkpoints.saved_shapes(step)
  finally:
    checkpoints.close()


def holds_arrays_under(directory, step: int, prefix: str) -> bool:
  """Whether checkpoint `directory/step` saved any array under the dotted name `prefix`
  (as `saved_like` names them: "opt_state.1.average")."""
  return any(name.startswith(f"{prefix}.") for name in _saved_shapes(directory, step))


def saved_runs(directory, step: int) -> int | None:
  """How many runs side by side checkpoint `directory/step` holds; None: a single run's."""
  shape = _saved_shapes(directory, step).get("step")
  return shape[0] if shape else None


def saved_like(directory, step: int, field: str, like):
  """`like`, a tree of the state's field `field` (or of the part of it under a dotted name,
  "opt_state.1.average"), as ShapeDtypeStructs of the shapes the checkpoint saved it with:
  for `read_checkpoint` (`read_under`) of a state of other shapes (another image size).
  Raises CheckpointError when the checkpoint's arrays have other names."""
  saved = _saved_shapes(directory, step)
  leaves, treedef = jax.tree_util.tree_flatten_with_path({field: like})
  names = [_name(keypath) for keypath, _ in leaves]
  missing = [name for name in names if saved.get(name) is None]
  extra = sorted({name for name in saved if name.startswith(f"{field}.")} - set(names))
  if missing or extra:
    example = f"{missing[0]} is not on disk" if missing else f"{extra[0]} is only on disk"
    raise CheckpointError(
      f"checkpoint {absolute(directory) / str(step)} holds another model ({example}); build "
      "the model with the checkpoint's preset and overrides, changing only the image size"
    )
  structs = [
    jax.ShapeDtypeStruct(saved[name], leaf.dtype)
    for name, (_, leaf) in zip(names, leaves, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, structs)[field]


class Restored(NamedTuple):
  path: epath.Path  # the checkpoint read: <checkpoints directory>/<step>
  step: int
  state: dict  # the fields asked for, as `like` has them
  meta: dict  # what was saved with it (best top-1, evaluation history)


def read_under(prefix: str, like, checkpoint) -> Restored:
  """`like` (ShapeDtypeStructs with shardings, as `saved_like(..., prefix, ...)` gives them)
  filled with the arrays that `checkpoint`, a step directory, saved under the dotted name
  `prefix` (say "opt_state.1.average"), read-only (`Checkpoints.restore_under`)."""
  directory, step = resolve(absolute(checkpoint))
  checkpoints = Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    state, meta = checkpoints.restore_under(step, prefix, like)
  finally:
    checkpoints.close()
  return Restored(directory / str(step), step, state, meta)


def read_checkpoint(like: Mapping[str, Any], source) -> Restored:
  """Reads some fields of a run's state, read-only, from a checkpoint or the newest good one.

  `like` holds the fields wanted (say {"params": ..., "rest": ...}) with their
  shapes, dtypes and shardings; nothing else (no optimizer state) is read.
  `source` is a checkpoint, `<workdir>/checkpoints/<step>`, or a checkpoints
  directory, whose newest checkpoint that restores is read: damaged ones are
  skipped with a warning each. Nothing in the directory is written, moved or
  deleted, so a run may be training there.
  Raises CheckpointError if there is no checkpoint or it holds another model or
  config, DamagedCheckpointError if the checkpoint named is damaged.
  """
  source = absolute(source)
  if source.name.isdigit():
    directory, step = resolve(source)
  else:
    directory, step = source, None
  missing = CheckpointError(f"no checkpoint in {directory}; train first or pass --checkpoint PATH")
  if not directory.is_dir():
    raise missing
  like = dict(like)
  checkpoints = Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    if step is None:
      restored = checkpoints.restore_latest(like, partial=True)
      if restored is None:
        raise missing
      step, state, meta = restored
    else:
      state, meta = checkpoints.restore(step, like, partial=True)
  finally:
    checkpoints.close()
  return Restored(directory / str(step), step, state, meta)
