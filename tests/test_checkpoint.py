"""Damaged checkpoints: each kind is told apart, then, end to end, main.py resumes past it.

The first tests save a small state with `Checkpoints` and damage copies of it.
Then the end-to-end tests take tests/test_main.py's uninterrupted training on digits
(made once in the session; its checkpoints are the last three, 100, 125 and 150,
and its best): each damages a copy of it on disk the way a full disk, a crash or a
bad copy would, and runs main.py on it again in a subprocess (the same program, so
its compilation is cached).
"""

import os
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import checkpoint
from tests.test_main import STEPS, assert_same_params, final_params, run_main, uninterrupted_run


def run(workdir, *extra):
  return run_main(workdir, *extra)


def data_files(step_dir):
  """The array data files of a checkpoint: those in the OCDBT `d/` folders under state/."""
  return [
    os.path.join(root, name)
    for root, _, names in os.walk(step_dir / "state")
    if os.path.basename(root) == "d"
    for name in names
  ]


def truncate_data(step_dir):
  for path in data_files(step_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def cut_array_data(step_dir):
  """Cuts the arrays' chunk files (the data files of each process's OCDBT database; the
  index under state/d stays) to 100 bytes: the metadata still reads, the arrays do not."""
  for path in data_files(step_dir):
    if os.path.basename(os.path.dirname(os.path.dirname(path))).startswith("ocdbt.process_"):
      os.truncate(path, min(100, os.path.getsize(path)))


def delete_data(step_dir):
  for path in data_files(step_dir):
    os.remove(path)


def corrupt_tree_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"(\'step\',)": ')


def corrupt_meta_json(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"best_top1": 0.1, "hist')


def unfinished_write(step_dir):
  """What a crash mid-write leaves: orbax's temporary name, half the data, no commit marker."""
  tmp = step_dir.parent / f"{step_dir.name}.orbax-checkpoint-tmp"
  step_dir.rename(tmp)
  (tmp / "_CHECKPOINT_METADATA").unlink()
  for path in data_files(tmp)[::2]:
    os.remove(path)


# Through training, one damage of each path: the arrays (read), the JSON record (read after
# them) and a write cut short (set aside at start). Every kind is classified in SMALL_DAMAGE.
DAMAGE = [
  (truncate_data, "data-truncated"),
  (cut_array_data, "data-truncated"),  # found by the array reads, not the metadata's
  (corrupt_meta_json, "meta-corrupt"),
  (unfinished_write, "unfinished-write"),
]


def delete_tree_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def delete_meta_json(step_dir):
  (step_dir / "meta" / "metadata").unlink()


# --- Checkpoints on a small state --------------------------------------------------------
def small_state(scale=1.0):
  params = {"w": jnp.full((4, 5), scale), "b": jnp.arange(5, dtype=jnp.bfloat16)}
  return {
    "step": jnp.int32(3),
    "params": params,
    "opt": optax.adam(1e-3).init(params),  # holds an empty node
    "key": jax.random.key(7),
  }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A checkpoints directory with steps 1 and 2 of `small_state` (scales 1 and 2)."""
  directory = tmp_path_factory.mktemp("small") / "checkpoints"
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False)
  for step in (1, 2):
    checkpoints.save(step, small_state(step), {"best_top1": step / 10})
  checkpoints.close()
  return directory


def small_copy(small, tmp_path, damage=None, step=2):
  directory = tmp_path / "checkpoints"
  shutil.copytree(small, directory)
  if damage:
    damage(directory / str(step))
  return directory


SMALL_DAMAGE = [
  (truncate_data, "data-truncated"),
  (delete_data, "data-missing"),
  (corrupt_tree_metadata, "metadata-corrupt"),
  (delete_tree_metadata, "metadata-missing"),
  (corrupt_meta_json, "meta-corrupt"),
  (delete_meta_json, "meta-missing"),
]


@pytest.mark.parametrize("damage, reason", SMALL_DAMAGE, ids=[r for _, r in SMALL_DAMAGE])
def test_each_damage_is_named_from_orbax_errors(small, tmp_path, damage, reason):
  directory = small_copy(small, tmp_path, damage)
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False, read_only=True)
  with pytest.raises(checkpoint.DamagedCheckpointError) as info:
    checkpoints.restore(2, small_state())
  assert info.value.reason == reason, info.value
  assert info.value.path == directory / "2"
  assert "\n" not in str(info.value) and "tensorstore_spec" not in str(info.value)
  # The newest that restores is step 1, with its own values.
  step, state, meta = checkpoints.restore_latest(small_state())
  checkpoints.close()
  assert (step, meta) == (1, {"best_top1": 0.1})
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 5), 1.0))
  assert (
    jax.random.key_data(state["key"]).tolist() == jax.random.key_data(small_state()["key"]).tolist()
  )


class _FailsOnDelete:
  def __init__(self, message):
    self.message = message

  def __del__(self):
    raise RuntimeError(self.message)


def test_a_failing_restore_passes_the_callers_hook_all_but_orbaxs_abandoned_reads(small, tmp_path):
  """A failed read abandons orbax's other reads, whose reports come on no schedule (often
  during the next read); from its first read on, the library drops those reports alone:
  any other unraisable exception still reaches the hook the caller installed."""
  directory = small_copy(small, tmp_path, truncate_data)
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False, read_only=True)
  seen = []
  original = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    with pytest.raises(checkpoint.DamagedCheckpointError):
      checkpoints.restore(2, small_state())
    checkpoints.restore(1, small_state())
    _FailsOnDelete("Event loop is closed")  # as an abandoned read's callback reports
    _FailsOnDelete("the caller's own")
  finally:
    sys.unraisablehook = original
    checkpoints.close()
  assert [str(u.exc_value) for u in seen] == ["the caller's own"]


def random_state(shift=0.0):
  """Arrays that do not compress: their data files hold more than their metadata."""
  return {
    "params": {f"w{i}": shift + jax.random.normal(jax.random.key(i), (64, 64)) for i in range(4)}
  }


def test_a_failed_array_read_is_named_by_the_tensorstore_error_orbax_wraps(tmp_path):
  """orbax raises a failed array read as a plain Exception around the TensorStore error:
  the damage is named from that cause, in one short line."""
  directory = tmp_path / "checkpoints"
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False)
  for step in (1, 2):
    checkpoints.save(step, random_state(step), {"best_top1": step / 10})
  checkpoints.close()
  cut_array_data(directory / "2")
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False, read_only=True)
  with pytest.raises(checkpoint.DamagedCheckpointError) as info:
    checkpoints.restore(2, random_state())
  assert info.value.reason == "data-truncated", info.value
  assert info.value.detail.startswith("ValueError: OUT_OF_RANGE: "), info.value.detail
  assert "\n" not in str(info.value) and "TensorStore(" not in str(info.value)
  step, state, _ = checkpoints.restore_latest(random_state())
  checkpoints.close()
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w0"], random_state(1)["params"]["w0"])


def test_an_outage_under_orbaxs_wrapper_is_no_damage():
  """A TensorStore error that is not the files' fault stays none when orbax wraps it, as it
  wraps a failed array read: the checkpoint is never set aside for a network outage."""
  try:
    try:
      raise ValueError("UNAVAILABLE: connection reset by peer")
    except ValueError as outage:
      raise Exception("Encountered error while reading array index") from outage  # noqa: TRY002
  except Exception as wrapped:  # noqa: BLE001
    with pytest.raises(checkpoint.CheckpointError, match="not damage to its files") as info:
      checkpoint._damage(pathlib.Path("/x/checkpoints/2"), "data", wrapped)  # noqa: SLF001
  assert not isinstance(info.value, checkpoint.DamagedCheckpointError)
  assert "UNAVAILABLE" in str(info.value)


def test_writable_checkpoints_resume_and_set_damage_aside(small, tmp_path):
  directory = small_copy(small, tmp_path, truncate_data)
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False)
  step, state, _ = checkpoints.restore_latest(small_state())
  assert step == 1 and int(state["step"]) == 3
  assert sorted(os.listdir(directory)) == ["1"]
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["2-data-truncated"]
  with pytest.raises(ValueError, match="read_only"):
    checkpoints.restore(1, {"params": small_state()["params"]}, partial=True)
  checkpoints.close()


def test_another_model_is_a_mismatch_not_damage(small, tmp_path):
  directory = small_copy(small, tmp_path)
  other = small_state()
  other["params"]["w"] = jnp.zeros((4, 6))
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False, read_only=True)
  with pytest.raises(
    checkpoint.CheckpointError, match=r"params\.w is \(4, 5\) on disk, \(4, 6\)"
  ) as info:
    checkpoints.restore_latest(other)
  assert not isinstance(info.value, checkpoint.DamagedCheckpointError)
  other["params"]["extra"] = jnp.zeros(2)
  with pytest.raises(
    checkpoint.CheckpointError, match="1 arrays only in this model, e.g. params.extra"
  ):
    checkpoints.restore(2, other)
  checkpoints.close()


def test_saved_shapes_are_the_global_shapes_of_sharded_arrays(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  rows = 2 * len(jax.devices())
  sharded = jax.device_put(jnp.ones((rows, 3)), NamedSharding(mesh, P("d")))
  replicated = jax.device_put(jnp.ones((5, 3)), NamedSharding(mesh, P()))
  checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints", asynchronous=False)
  checkpoints.save(1, {"sharded": sharded, "replicated": replicated, "key": jax.random.key(0)}, {})
  assert checkpoints.saved_shapes(1) == {"sharded": (rows, 3), "replicated": (5, 3), "key": (2,)}
  like = {"sharded": sharded, "replicated": replicated, "key": jax.random.key(1)}
  state, _ = checkpoints.restore(1, like)
  assert state["sharded"].sharding == sharded.sharding
  with pytest.raises(checkpoint.CheckpointError, match="does not match"):
    bad = jax.device_put(jnp.ones((rows + len(jax.devices()), 3)), NamedSharding(mesh, P("d")))
    checkpoints.restore(1, {**like, "sharded": bad})
  checkpoints.close()


def test_replicated_and_sharded_arrays_on_eight_devices_restore_to_their_values(tmp_path):
  # A replicated array is written from one of its copies; a sharded one from every shard.
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  rows = 2 * len(jax.devices())
  values = {
    "sharded": jnp.arange(rows * 3.0).reshape(rows, 3),  # every shard different
    "replicated": jnp.arange(15.0).reshape(5, 3) - 7.5,
  }
  specs = {"sharded": P("d"), "replicated": P()}
  state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
  checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints", asynchronous=False)
  checkpoints.save(1, state, {})
  restored, _ = checkpoints.restore(1, jax.tree.map(jnp.zeros_like, state))
  checkpoints.close()
  for name, value in values.items():
    assert restored[name].sharding == state[name].sharding
    for shard in restored[name].addressable_shards:
      np.testing.assert_array_equal(shard.data, value[shard.index])


def test_an_unfinished_write_is_set_aside_on_start(small, tmp_path):
  directory = small_copy(small, tmp_path)
  unfinished_write(directory / "2")
  checkpoint.Checkpoints(directory, asynchronous=False).close()
  assert sorted(os.listdir(directory)) == ["1"]
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["2-unfinished-write"]


# --- read_checkpoint: the one way to read part of a run's state ---------------------------
def test_read_checkpoint_reads_the_newest_good_one_read_only(small, tmp_path, caplog):
  directory = small_copy(small, tmp_path, truncate_data)
  like = {"params": small_state()["params"]}
  restored = checkpoint.read_checkpoint(like, directory)
  assert (restored.path, restored.step, restored.meta) == (directory / "1", 1, {"best_top1": 0.1})
  assert sorted(restored.state) == ["params"]
  np.testing.assert_array_equal(restored.state["params"]["w"], np.full((4, 5), 1.0))
  assert any(
    "checkpoints/2 cannot be restored (data-truncated" in r.getMessage() for r in caplog.records
  )
  # Read-only: the damage is where it was, nothing was set aside.
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not (tmp_path / "checkpoints_damaged").exists()


def test_read_checkpoint_of_a_named_checkpoint(small, tmp_path):
  directory = small_copy(small, tmp_path, truncate_data)
  like = {"params": small_state()["params"]}
  restored = checkpoint.read_checkpoint(like, str(directory / "1"))
  assert (restored.path, restored.step) == (directory / "1", 1)
  with pytest.raises(checkpoint.DamagedCheckpointError, match="data-truncated"):
    checkpoint.read_checkpoint(like, directory / "2")
  with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint step directory"):
    checkpoint.read_checkpoint(like, directory / "7")


def test_read_checkpoint_without_checkpoints(tmp_path):
  like = {"params": small_state()["params"]}
  for directory in (tmp_path / "missing", tmp_path):
    with pytest.raises(
      checkpoint.CheckpointError, match=f"no checkpoint in {directory}; train first"
    ):
      checkpoint.read_checkpoint(like, directory)


def test_errors_that_are_not_the_files_fault_set_nothing_aside(tmp_path):
  path = tmp_path / "checkpoints" / "4"
  for error in (
    PermissionError(13, "Permission denied"),
    ValueError("UNAVAILABLE: Error reading gs://bucket/x: connection reset"),
  ):
    with pytest.raises(checkpoint.CheckpointError, match="not damage to its files") as info:
      checkpoint._damage(path, "data", error)
    assert not isinstance(info.value, checkpoint.DamagedCheckpointError)
  damage = checkpoint._damage(path, "data", ValueError("DATA_LOSS: Error reading x: bad crc"))
  assert (damage.reason, damage.detail) == ("data-corrupt", "ValueError: DATA_LOSS: bad crc")


# --- end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir, result = uninterrupted_run(tmp_path_factory)
  return pathlib.Path(workdir), result


def listing(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def damaged_copy(trained, tmp_path, damage, steps=(STEPS,)):
  workdir = tmp_path / "workdir"
  shutil.copytree(trained[0], workdir)
  for step in steps:
    damage(workdir / "checkpoints" / str(step))
  return workdir


def warnings_about_damage(stderr):
  return [line for line in stderr.splitlines() if "cannot be restored" in line]


def assert_no_traceback(stderr):
  """Nothing but log lines: no traceback, ours or orbax's for the reads it abandoned."""
  assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr[-3000:]


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", DAMAGE, ids=[r for _, r in DAMAGE])
def test_damaged_latest_checkpoint_is_set_aside_and_training_resumes(
  trained, tmp_path, damage, reason
):
  steps = listing(trained[0])
  latest, previous = steps[-1], steps[-2]
  workdir = damaged_copy(trained, tmp_path, damage, steps=(latest,))
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = warnings_about_damage(result.stderr)
  assert len(warnings) == 1, result.stderr[-3000:]
  assert re.search(rf"checkpoints/{latest}\S* cannot be restored \({reason}: ", warnings[0])
  assert warnings[0].endswith(f"set aside as {workdir}/checkpoints_damaged/{latest}-{reason}")
  assert re.search(rf"resumed from \S+/checkpoints/{previous}\n", result.stderr)
  assert_no_traceback(result.stderr)
  # Kept, out of orbax's sight; and the last step was saved again, as if nothing had happened.
  assert (workdir / "checkpoints_damaged" / f"{latest}-{reason}").is_dir()
  assert listing(workdir) == steps
  step, params = final_params(workdir)
  full_step, full_params = final_params(trained[0])
  assert step == full_step == STEPS
  assert_same_params(params, full_params)


@pytest.mark.slow
def test_no_restorable_checkpoint_is_one_error_line_and_exit_2(trained, tmp_path):
  steps = listing(trained[0])
  workdir = damaged_copy(trained, tmp_path, truncate_data, steps=steps)
  result = run(workdir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: no checkpoint in {workdir}/checkpoints can be restored")
  )
  assert len(warnings_about_damage(result.stderr)) == len(steps)
  assert_no_traceback(result.stderr)
  # Nothing is moved when there is nothing to fall back to: every retry says the same.
  assert listing(workdir) == steps
  assert not (workdir / "checkpoints_damaged").exists()


@pytest.mark.slow
@pytest.mark.parametrize("record", ["config.json", "no config.json"])
def test_checkpoint_of_another_config_is_an_error_not_damage(trained, tmp_path, record):
  workdir = damaged_copy(trained, tmp_path, lambda _: None, steps=())
  if record == "no config.json":  # checkpoints alone: the restore finds the mismatch
    (workdir / "config.json").unlink()
  result = run(workdir, "--config.model_overrides.depth=3")
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  if record == "config.json":  # found before anything is built, named key by key
    assert last.startswith(f"error: --workdir={workdir} holds checkpoints of a run with"), last
    assert "(model_overrides.depth: 2 there, 3 here)" in last
  else:
    assert last.startswith(
      f"error: checkpoint {workdir}/checkpoints/{STEPS} does not match this model/config"
    ), last
  assert not warnings_about_damage(result.stderr)
  assert listing(workdir) == listing(trained[0])
  assert not (workdir / "checkpoints_damaged").exists()


@pytest.mark.slow
@pytest.mark.parametrize("record", ["config.json", "no config.json"])
def test_evaluating_a_checkpoint_of_another_config_names_what_its_run_had(
  trained, tmp_path, record
):
  workdir = damaged_copy(trained, tmp_path, lambda _: None, steps=())
  if record == "no config.json":  # a checkpoint kept alone: only the shapes can be named
    (workdir / "config.json").unlink()
  # The seed and the drop-path rate differ too, and shape no parameter.
  result = run(
    workdir,
    "--mode=eval",
    "--config.model_overrides.depth=3",
    "--config.seed=5",
    "--config.model_overrides.drop_path_rate=0.3",
  )
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f"error: checkpoint {workdir}/checkpoints/{STEPS} does not match this model/config "
    "(16 arrays only in this model, e.g. params.blocks.2."
  ), last
  if record == "config.json":  # the keys that shape the model, those alone
    assert last.endswith(
      f"its run ({workdir}/config.json) differs in model_overrides.depth: 2 there, 3 here: "
      f"use that run's config (--config configs/workdir.py:{workdir})"
    ), last
  else:
    assert last.endswith("use the config it was trained with, or train in a fresh --workdir")
  assert listing(workdir) == listing(trained[0])


@pytest.mark.slow
def test_eval_falls_back_past_damaged_checkpoints_and_an_explicit_one_is_an_error(
  trained, tmp_path
):
  # The newest checkpoint below the last that training evaluated (and logged) is the one to
  # fall back to; every one after it is damaged.
  evaluated = [int(s) for s in re.findall(r"step (\d+): test top1", trained[1].stderr)]
  fallback = max(s for s in listing(trained[0]) if s in evaluated and s < STEPS)
  damaged = [s for s in listing(trained[0]) if s > fallback]
  workdir = damaged_copy(trained, tmp_path, truncate_data, steps=damaged)
  top1 = re.search(rf"step {fallback}: test top1 (\S+)", trained[1].stderr).group(1)
  result = run(workdir, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = warnings_about_damage(result.stderr)
  assert len(warnings) == len(damaged), result.stderr[-3000:]
  for step, warning in zip(sorted(damaged, reverse=True), warnings, strict=True):
    assert re.search(
      rf"checkpoints/{step} cannot be restored \(data-truncated: .*\); skipped$", warning
    ), warning
  assert f"eval {workdir}/checkpoints/{fallback}: top1 {top1} " in result.stdout
  # Evaluation changes nothing in the workdir: a run may be training there.
  assert all((workdir / "checkpoints" / str(step)).is_dir() for step in damaged)
  assert not (workdir / "checkpoints_damaged").exists()

  result = run(workdir, "--mode=eval", f"--checkpoint={workdir}/checkpoints/{STEPS}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} is damaged (data-truncated: ")
  )
