"""Damaged checkpoints, end to end: main.py warns, sets the damage aside and resumes.

One real short training on digits writes checkpoints 4, 8 and 12; each test
damages a copy of it on disk the way a full disk, a crash or a bad copy would,
and runs main.py on it again in a subprocess.
"""

import os
import re
import shutil

import pytest

from tests.test_main import assert_same_params, final_params, run_main

STEPS = 12
SHORT = [
  f"--config.num_train_steps={STEPS}",
  "--config.checkpoint_every_steps=4",
  "--config.eval_every_steps=4",
  "--config.log_every_steps=4",
]


def run(workdir, *extra):
  return run_main(workdir, *SHORT, *extra)


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


DAMAGE = [
  (truncate_data, "data-truncated"),
  (delete_data, "data-missing"),
  (corrupt_tree_metadata, "metadata-corrupt"),
  (corrupt_meta_json, "meta-corrupt"),
  (unfinished_write, "unfinished-write"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["4", "8", "12"]
  return workdir, result


def damaged_copy(trained, tmp_path, damage, steps=(STEPS,)):
  workdir = tmp_path / "workdir"
  shutil.copytree(trained[0], workdir)
  for step in steps:
    damage(workdir / "checkpoints" / str(step))
  return workdir


def warnings_about_damage(stderr):
  return [line for line in stderr.splitlines() if "cannot be restored" in line]


def assert_no_traceback_through_our_code(stderr):
  # orbax may log the failed read of the damaged file itself (timing decides whether its
  # async read reports before it is abandoned); no traceback may pass through our code.
  frames = re.findall(r'File "([^"]+)"', stderr)
  ours = [f for f in frames if "/lkca_jax/" in f or f.endswith("main.py")]
  assert not ours, stderr[-3000:]


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("damage, reason", DAMAGE, ids=[r for _, r in DAMAGE])
def test_damaged_latest_checkpoint_is_set_aside_and_training_resumes(
  trained, tmp_path, damage, reason
):
  workdir = damaged_copy(trained, tmp_path, damage)
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = warnings_about_damage(result.stderr)
  assert len(warnings) == 1, result.stderr[-3000:]
  assert re.search(rf"checkpoints/12\S* cannot be restored \({reason}: ", warnings[0])
  assert warnings[0].endswith(f"set aside as {workdir}/checkpoints_damaged/12-{reason}")
  assert re.search(r"resumed from \S+/checkpoints/8\n", result.stderr)
  assert_no_traceback_through_our_code(result.stderr)
  # Kept, out of orbax's sight; and step 12 was saved again, as if nothing had happened.
  assert (workdir / "checkpoints_damaged" / f"12-{reason}").is_dir()
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["4", "8", "12"]
  step, params = final_params(workdir)
  full_step, full_params = final_params(trained[0])
  assert step == full_step == STEPS
  assert_same_params(params, full_params)


def test_no_restorable_checkpoint_is_one_error_line_and_exit_2(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, truncate_data, steps=(4, 8, 12))
  result = run(workdir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: no checkpoint in {workdir}/checkpoints can be restored")
  )
  assert len(warnings_about_damage(result.stderr)) == 3
  assert_no_traceback_through_our_code(result.stderr)
  # Nothing is moved when there is nothing to fall back to: every retry says the same.
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["4", "8", "12"]
  assert not (workdir / "checkpoints_damaged").exists()


def test_checkpoint_of_another_config_is_an_error_not_damage(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, lambda _: None, steps=())
  result = run(workdir, "--config.model_overrides.depth=3")
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f"error: checkpoint {workdir}/checkpoints/12 does not match this model/config"
  ), last
  assert not warnings_about_damage(result.stderr)
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["4", "8", "12"]
  assert not (workdir / "checkpoints_damaged").exists()


def test_eval_falls_back_past_a_damaged_checkpoint_and_an_explicit_one_is_an_error(
  trained, tmp_path
):
  workdir = damaged_copy(trained, tmp_path, truncate_data)
  top1_at_8 = re.search(r"step 8: test top1 (\S+)", trained[1].stderr).group(1)
  result = run(workdir, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = warnings_about_damage(result.stderr)
  assert len(warnings) == 1 and re.search(
    r"checkpoints/12 cannot be restored \(data-truncated: .*\); skipped$", warnings[0]
  )
  assert f"eval {workdir}/checkpoints/8: top1 {top1_at_8} " in result.stdout
  # Evaluation changes nothing in the workdir: a run may be training there.
  assert (workdir / "checkpoints" / "12").is_dir()
  assert not (workdir / "checkpoints_damaged").exists()

  result = run(workdir, "--mode=eval", f"--checkpoint={workdir}/checkpoints/12")
  assert result.returncode == 2, result.stderr[-3000:]
  assert error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(f"error: checkpoint {workdir}/checkpoints/12 is damaged (data-truncated: ")
  )
