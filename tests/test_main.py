"""main.py end to end in real subprocesses: resume after SIGTERM and SIGKILL (also mid-
evaluation and mid-checkpoint-write), eval, bad input."""

import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import FAST_COMPILE, FAST_STEPS
from tests.helpers import built_once, start_held

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150
# A small model that still learns visibly in 150 steps (no mixing, higher learning rate).
TINY = [
  "--config",
  "configs/digits.py",
  "--config.model_overrides.dim=64",
  "--config.model_overrides.depth=2",
  "--config.model_overrides.num_heads=4",
  "--config.num_devices=1",
  "--config.batch_size=32",
  f"--config.num_train_steps={STEPS}",
  "--config.checkpoint_every_steps=25",
  "--config.eval_every_steps=50",
  "--config.log_every_steps=25",
  "--config.optimizer.warmup_epochs=0",
  "--config.optimizer.learning_rate=3e-3",
  "--config.mixing.prob=0",
]


def main_cmd(workdir, *extra):
  return [sys.executable, "main.py", *TINY, f"--workdir={workdir}", *extra]


def main_env(codegen=FAST_STEPS) -> dict:
  """The environment of these runs: by default XLA's -O1, not the suite's -O0
  (tests/conftest.py), for the runs that take hundreds of steps of one program."""
  return dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(FAST_COMPILE, codegen))


def run_main(workdir, *extra, timeout=300, codegen=FAST_STEPS):
  return subprocess.run(
    main_cmd(workdir, *extra),
    cwd=ROOT,
    env=main_env(codegen),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def final_params(workdir):
  """The parameters of the latest checkpoint, read back from disk with orbax."""
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  return step, checkpoint_params(workdir, step)


def checkpoint_params(workdir, step: int):
  """The parameters of one checkpoint, read back from disk with orbax."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def assert_same_params(a, b):
  """Bit for bit: a resumed run is the same program on the same machine from the same state
  and batches, so resume is exact, not close."""
  leaves_a, leaves_b = jax_leaves(a), jax_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def uninterrupted_run(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted TINY run, made once in the session:
  these tests and tests/test_checkpoint.py only read it (copies are damaged there)."""

  def build(directory):
    result = run_main(str(directory))
    assert result.returncode == 0, result.stderr[-3000:]
    return str(directory), result

  return built_once(tmp_path_factory, "main_uninterrupted", build)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return uninterrupted_run(tmp_path_factory)


def test_uninterrupted_run_writes_summary_logs_and_checkpoints(uninterrupted):
  workdir, result = uninterrupted
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["step"] == STEPS and summary["total_steps"] == STEPS
  assert (summary["train_images"], summary["test_images"]) == (1437, 360)
  assert summary["steps_per_epoch"] == 3 * 1437 // 32
  # A rate is recorded; its value depends on the machine and its load, so the benchmarks
  # measure speed and no test asserts it.
  assert summary["train_images_per_second"] > 0 and summary["wall_seconds"] > 0
  # 10 classes, 360 test images: chance is 10% ± 1.6%; this setting reaches ~38%.
  assert 0.25 < summary["final_top1"] <= 1.0
  assert summary["best_top1"] >= summary["final_top1"]
  assert f"final top1 {summary['final_top1']:.4f}" in result.stdout
  # The trainer's own INFO lines, without jax's probe of the backends this machine lacks.
  assert "data: 1437 train / 360 test images" in result.stderr
  assert "Unable to initialize backend" not in result.stderr
  assert "does not end within" not in result.stderr  # no warmup: nothing to warn about
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  # latest 3 plus the best evaluated one; the final step always among them
  assert steps[-3:] == [100, 125, 150] and len(steps) <= 4
  assert summary["best_step"] in steps


def test_a_runs_config_read_back_evaluates_it_without_its_overrides(uninterrupted):
  """configs/workdir.py:W gives the run's own config (TINY's overrides, none retyped) and
  W as the workdir; an override still applies on top."""
  workdir, _ = uninterrupted
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  read_back = [sys.executable, "main.py", f"--config=configs/workdir.py:{workdir}", "--mode=eval"]
  result = subprocess.run(read_back, cwd=ROOT, env=main_env(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"eval {workdir}/checkpoints/{STEPS}: top1 {summary['final_top1']:.4f}" in result.stdout
  deeper = subprocess.run(
    [*read_back, "--config.model_overrides.depth=3"], cwd=ROOT, capture_output=True, text=True
  )
  assert deeper.returncode == 2
  assert "differs in model_overrides.depth: 2 there, 3 here" in deeper.stderr.splitlines()[-1]


def params_by_name(tree) -> dict:
  """{'blocks/0/mixer/kernel': array} of a parameter tree, as saved (…/value) or as nnx's."""
  import jax

  return {
    "/".join(str(key.key) for key in path if key.key != "value"): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def assert_same_named_params(model, saved):
  from flax import nnx

  loaded, saved = (
    params_by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
    params_by_name(saved),
  )
  assert loaded.keys() == saved.keys() and len(saved) > 0
  for name, value in saved.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_load_trained_gives_the_runs_model_with_its_checkpoints_parameters(uninterrupted):
  import jax.numpy as jnp

  from lkca_jax import augment, data, load_trained

  workdir, _ = uninterrupted
  step, saved = final_params(workdir)
  model = load_trained(workdir)
  assert_same_named_params(model, saved)
  images, labels = data.load_split("digits", "test")
  dataset = json.load(open(os.path.join(workdir, "config.json")))["dataset"]  # as docs/usage.md
  x = augment.normalize(jnp.asarray(images), dataset["mean"], dataset["std"])
  logits = model(x)
  np.testing.assert_array_equal(logits, model(x))  # eval mode: no stochastic depth
  # 10 classes, 360 test images: chance is 10% ± 1.6%; this run reaches ~38%.
  assert float(np.mean(np.argmax(logits, -1) == labels)) > 0.25
  earlier = min(s for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  model = load_trained(workdir, checkpoint=os.path.join(workdir, "checkpoints", earlier))
  assert_same_named_params(model, checkpoint_params(workdir, int(earlier)))
  with pytest.raises(ValueError, match=r"kept no moving average .*\(average=False\)"):
    load_trained(workdir, average=True)  # it trained with ema_decay 0


def test_eval_mode_reproduces_the_final_accuracy(uninterrupted):
  workdir, _ = uninterrupted
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  result = run_main(workdir, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"top1 {summary['final_top1']:.4f}" in result.stdout
  result = run_main(
    workdir, "--mode=eval", f"--checkpoint={workdir}/checkpoints/{summary['best_step']}"
  )
  assert f"top1 {summary['best_top1']:.4f}" in result.stdout


def start_and_hold(workdir, extra, hold):
  """Starts main.py held at `hold` (through tests/hold.py) and returns the process once
  it says it is held, with the stderr it wrote until then."""
  return start_held(hold, main_cmd(workdir, *extra), env=main_env())


def test_a_signal_after_the_last_step_lets_the_run_finish_its_last_checkpoint(tmp_path):
  """SIGINT (a second Ctrl-C, say) after the training loop, as the last checkpoint is
  written: the run ends as it would have, exit 0, that checkpoint whole, its summary
  written. It ended the process with 130 there, the last write cut short."""
  workdir = str(tmp_path / "run")
  extra = ["--config.num_train_steps=4", "--config.eval_every_steps=2"]
  proc, _ = start_and_hold(workdir, extra, "end:4")
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert (summary["step"], summary["stopped_by"]) == (4, None)
  assert final_params(workdir)[0] == 4 and "final top1" in out


def interrupt_twice_then_finish(workdir, extra, checkpoints):
  """SIGTERM while the save of step `checkpoints[0]` is in flight, resume, SIGKILL while
  the save of step `checkpoints[1]` is in flight, then resume to the end; returns
  (final step, final parameters). The holds make both signals land at those steps however
  fast the machine runs (waiting for a checkpoint to appear raced with the training).
  The last resume must take over the killed run's lock and set its unfinished write aside."""
  first, second = checkpoints
  proc, _ = start_and_hold(workdir, extra, f"save:{first}")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert f"stopped by SIGTERM at step {first + 1}" in out
  assert final_params(workdir)[0] == first + 1
  proc, before_hold = start_and_hold(workdir, extra, f"save:{second}")
  assert re.search(rf"resumed from \S+/{first + 1}\n", before_hold), before_hold[-3000:]
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  unfinished = [n for n in names if n.startswith(f"{second}.orbax-checkpoint-tmp")]
  assert unfinished and str(second) not in names, "the write is not in flight"
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL
  kept = final_params(workdir)[0]
  assert kept < second  # the save of `second` was cut mid-write: only the unfinished copy
  resumed = run_main(workdir, *extra)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(rf"resumed from \S+/checkpoints/{kept}\n", resumed.stderr), resumed.stderr[
    -3000:
  ]
  # The dead run's lock is taken over; its unfinished write is kept, out of orbax's sight.
  assert re.search(
    rf"took over the lock of a run that is gone \(.*process {proc.pid},", resumed.stderr
  )
  assert re.search(
    rf"checkpoints/{second}\.orbax-checkpoint-tmp\S* cannot be restored \(unfinished-write",
    resumed.stderr,
  )
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", f"{second}-unfinished-write"))
  return final_params(workdir)


def test_run_resumes_after_sigterm_then_sigkill_to_identical_parameters(uninterrupted, tmp_path):
  """One lineage, both signals: stopped by SIGTERM while the save of step 50 is in flight,
  resumed, killed while the save of step 100 is half written, resumed to the end; the
  parameters end where the uninterrupted run's did."""
  step, params = interrupt_twice_then_finish(str(tmp_path), [], (50, 100))
  full_step, full_params = final_params(uninterrupted[0])
  assert step == full_step == STEPS
  assert_same_params(params, full_params)


# --- several runs side by side: one process, a stacked state -------------------------
# The smallest model (these tests check the run axis and resuming, not learning): every
# launch of the lineage below trains three runs side by side.
RUNS = [
  "--config.num_runs=3",
  "--config.num_train_steps=75",
  "--config.model_overrides.dim=32",
  "--config.model_overrides.depth=1",
  "--config.model_overrides.num_heads=2",
]


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("runs"))
  result = run_main(workdir, *RUNS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_three_runs_write_per_run_summary_and_eval_mode_evaluates_each(uninterrupted_runs):
  workdir, result = uninterrupted_runs
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["num_runs"] == 3 and [r["seed"] for r in summary["runs"]] == [0, 1, 2]
  assert "final top1" in result.stdout and "over seeds [0, 1, 2]" in result.stdout
  evaluated = run_main(workdir, *RUNS, "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  for r in summary["runs"]:
    assert f"run {r['run']} (seed {r['seed']}): top1 {r['final_top1']:.4f}" in evaluated.stdout


def test_load_trained_gives_each_run_of_several(uninterrupted_runs):
  import jax

  from lkca_jax import load_trained

  workdir, _ = uninterrupted_runs
  _, saved = final_params(workdir)
  for k in range(3):
    run_k = jax.tree.map(lambda x, k=k: x[k], saved)
    assert_same_named_params(load_trained(workdir, run=k), run_k)
  with pytest.raises(ValueError, match=r"run=3: .* trained 3 run\(s\); pass run 0 … 2"):
    load_trained(workdir, run=3)


def test_three_runs_resume_after_sigterm_then_sigkill_to_identical_parameters(
  uninterrupted_runs, tmp_path
):
  """One lineage, both signals: stopped by SIGTERM at step 25, resumed, killed at step 50,
  resumed to the end; the stacked state ends where the uninterrupted runs did."""
  step, params = interrupt_twice_then_finish(str(tmp_path), RUNS, (25, 50))
  full_step, full_params = final_params(uninterrupted_runs[0])
  assert step == full_step == 75
  assert all(x.shape[0] == 3 for x in jax_leaves(params))  # the run axis
  assert_same_params(params, full_params)


# The awkward moments: SIGTERM while an asynchronous save is in flight and SIGKILL mid-write
# (the hold keeps the write unfinished) are the two signals of interrupt_twice_then_finish;
# SIGTERM mid-evaluation is below.
def test_sigterm_in_eval_resumes_to_identical_parameters_and_a_second_run_is_refused_meanwhile(
  uninterrupted, tmp_path
):
  """Held before evaluating step 50 (tests/hold.py): a second run on the same workdir is
  refused naming the first; then SIGTERM lands mid-evaluation, the run saves step 51 and
  stops cleanly, and a rerun resumes from 51 to the uninterrupted run's parameters."""
  workdir = str(tmp_path)
  first, _ = start_and_hold(workdir, [], "eval:50")
  try:
    second = run_main(workdir)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr[-2000:]
    assert lines[-1].startswith(f"error: --workdir={tmp_path} is in use by a run still going")
    assert f"process {first.pid}, started 20" in lines[-1] and os.uname().nodename in lines[-1]
  finally:
    first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM at step 51" in out
  assert {"25", "50", "51"} <= set(os.listdir(tmp_path / "checkpoints"))  # its work is all there
  resumed = run_main(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"resumed from \S+/checkpoints/51\n", resumed.stderr), resumed.stderr[-3000:]
  step, params = final_params(workdir)
  full_step, full_params = final_params(uninterrupted[0])
  assert step == full_step == STEPS
  assert_same_params(params, full_params)


def test_a_full_disk_stops_with_one_line_and_a_rerun_resumes_exactly(uninterrupted, tmp_path):
  """No file over 100 kB may be written once checkpoint 25 is complete (a real file-size
  limit, RLIMIT_FSIZE, set on the running process): checkpoint 50's arrays cannot be."""
  checkpoints = tmp_path / "checkpoints"
  proc, _ = start_and_hold(str(tmp_path), [], "eval:50")
  # The save of 25 may still be in flight at the hold on a loaded machine; orbax renames
  # it into place once it is complete.
  deadline = time.monotonic() + 120
  while not (checkpoints / "25").is_dir():
    assert time.monotonic() < deadline, os.listdir(checkpoints)
    time.sleep(0.05)
  before = {
    p.relative_to(checkpoints / "25"): p.read_bytes() for p in files_under(checkpoints / "25")
  }
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
  proc.send_signal(signal.SIGUSR1)  # release the hold
  out, err = proc.communicate(timeout=120)
  last = err.strip().splitlines()[-1]
  assert proc.returncode == 1, err[-3000:]
  assert last.startswith(f"error: writing a checkpoint in {tmp_path} failed ("), last
  assert f"the last complete checkpoint, {checkpoints}/25, is intact" in last
  after = {
    p.relative_to(checkpoints / "25"): p.read_bytes() for p in files_under(checkpoints / "25")
  }
  assert after == before and "50" not in os.listdir(checkpoints)
  resumed = run_main(str(tmp_path))  # room again
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"resumed from \S+/checkpoints/25\n", resumed.stderr), resumed.stderr[-3000:]
  step, params = final_params(str(tmp_path))
  full_step, full_params = final_params(uninterrupted[0])
  assert step == full_step == STEPS
  assert_same_params(params, full_params)


def files_under(path):
  return sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())


# Bad config values are tested in tests/test_config_checks.py, bad flags and
# config keys in tests/tools/test_cli.py; here: data that is not prepared.
BAD_INPUTS = [
  (
    [
      "--config.dataset.name=cifar10",
      "--config.dataset.mean=(0.5,0.5,0.5)",
      "--config.dataset.std=(0.5,0.5,0.5)",
      "--config.dataset.download=False",
    ],
    "--config.dataset.data_dir",
  ),
  (["--config.init_from=/nonexistent/run"], "init_from=/nonexistent/run: no such directory"),
  (["--config.init_from=/tmp"], "no checkpoint in /tmp"),
]


def test_bad_input_fails_fast_with_one_line_and_exit_2(tmp_path):
  procs = []
  for i, (flags, _) in enumerate(BAD_INPUTS):
    workdir = tmp_path / str(i)
    procs.append(
      subprocess.Popen(
        main_cmd(workdir, *flags, f"--config.dataset.data_dir={tmp_path / 'empty'}"),
        cwd=ROOT,
        env=main_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  for proc, (flags, message) in zip(procs, BAD_INPUTS, strict=True):
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (flags, err[-2000:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (flags, err[-2000:])
  # Nothing was trained or checkpointed.
  assert not any((tmp_path / str(i) / "checkpoints").exists() for i in range(len(BAD_INPUTS)))


@pytest.mark.parametrize("kind", ["a file", "no directory can be made"])
def test_an_unusable_workdir_is_one_line_and_exit_2(tmp_path, kind):
  if kind == "a file":
    workdir = tmp_path / "results.txt"
    workdir.write_text("kept")
  else:
    workdir = "/proc/lkca-run"
  result = run_main(workdir)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines[-1].startswith(f"error: --workdir={workdir} ") and "pass a directory" in lines[-1]
  assert "Traceback" not in result.stderr
  if kind == "a file":
    assert workdir.read_text() == "kept"


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  # A learning rate of 1e30 blows the weights up within a few steps.
  result = run_main(
    str(tmp_path),
    "--config.optimizer.learning_rate=1e30",
    "--config.optimizer.warmup_epochs=0",
    "--config.checkpoint_every_steps=1",
    "--config.log_every_steps=1",
    codegen=FAST_COMPILE,  # a few steps of a program of its own
  )
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert "loss became non-finite at step" in line
  bad_step = int(line.split("at step ")[1].split(";")[0])
  kept, params = final_params(str(tmp_path))
  assert kept < bad_step
  assert all(np.all(np.isfinite(x)) for x in jax_leaves(params))
  summary = json.load(open(tmp_path / "summary.json"))  # written, saying where and what
  assert summary["stopped_by"] == "non-finite loss" and summary["step"] == bad_step
  (run,) = summary["runs"]
  assert run["died_at_step"] == bad_step and run["died_with_loss"] in ("nan", "inf", "-inf")


def test_a_warmup_that_outlasts_the_run_is_one_warning_naming_the_fix(tmp_path):
  """digits' 1 warmup epoch (3 x 1,437 images / 32: 134 steps) in a run of 3 steps."""
  result = run_main(
    str(tmp_path),
    "--config.num_train_steps=3",
    "--config.optimizer.warmup_epochs=1",
    codegen=FAST_COMPILE,  # a few steps of a program of its own
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [x for x in result.stderr.splitlines() if "does not end within" in x]
  assert line.startswith("W") and "warmup_epochs=1: 134 steps" in line and "run's 3 steps" in line
  assert "--config.optimizer.warmup_fraction=0.111" in line  # 1 of digits' 9 epochs


def test_nonfinite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
  result = run_main(
    str(tmp_path),
    "--config.optimizer.learning_rate=1e30",
    "--config.optimizer.warmup_epochs=0",
    "--config.log_every_steps=1",
    codegen=FAST_COMPILE,  # a few steps of a program of its own
  )
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert "loss became non-finite at step" in line and "No checkpoint was saved before it" in line
  assert "None" not in line and not os.listdir(tmp_path / "checkpoints")


# --- init_from: fine-tuning at another image size --------------------------------
def moved_by_hand(small: dict, big_grid: tuple[int, int]) -> dict:
  """The digits model's parameters (raw orbax dict) moved from 4x4 patches to `big_grid` by
  the default moves: kernels as DEFAULT_KERNEL_MOVE, the position table resampled."""
  import jax.numpy as jnp

  from lkca_jax import resolution
  from lkca_jax.layers.lkca import DEFAULT_KERNEL_MOVE

  def move(path, x):
    names = [getattr(k, "key", None) for k in path]
    if "kernel" in names and "mixer" in names and names.index("kernel") == 3:
      return np.asarray(resolution.move_kernel(jnp.asarray(x), big_grid, DEFAULT_KERNEL_MOVE))
    if names[0] == "pos_embed":
      return np.asarray(resolution.resample_pos_embed(jnp.asarray(x), (4, 4), big_grid, 0))
    return x

  import jax

  return jax.tree_util.tree_map_with_path(move, small)


def test_init_from_fine_tunes_at_another_size_from_moved_weights_and_resume_wins(tmp_path):
  """4x4 images (digits downsampled), then 8x8 from that checkpoint: after one step at a
  learning rate of 1e-6 (no weight decay) every parameter is within 1e-6 of the moved ones,
  since Adam's first update is lr·g/(|g| + eps), at most lr (plus float32 rounding of p);
  and the optimizer's state is fresh: count 1, mu = (1 − b1)·g and nu = (1 − b2)·g², so
  mu² (1 − b2) = nu (1 − b1)² to a few rounding errors."""
  small, big = tmp_path / "small", tmp_path / "big"
  steps = ["--config.num_train_steps=5", "--config.eval_every_steps=5"]
  first = run_main(
    small, "--config.dataset.image_size=4", "--config.patch_size=1", *steps, codegen=FAST_COMPILE
  )
  assert first.returncode == 0, first.stderr[-3000:]
  fine_tune = [
    "--config.patch_size=1",
    f"--config.init_from={small}",
    "--config.optimizer.learning_rate=1e-6",
    "--config.optimizer.weight_decay=0",
  ]
  # Two steps, a checkpoint after each: step 1 is the first update from the moved weights;
  # the same program serves the resume below.
  fine_tune += ["--config.num_train_steps=2", "--config.checkpoint_every_steps=1"]
  second = run_main(big, *fine_tune, codegen=FAST_COMPILE)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"parameters from {small}/checkpoints/5" in second.stderr
  _, small_params = final_params(str(small))
  restored = ocp.StandardCheckpointer().restore(os.path.join(big, "checkpoints", "1", "state"))
  expected = jax_leaves(moved_by_hand(small_params, (8, 8)))
  for got, want in zip(jax_leaves(restored["params"]), expected, strict=True):
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), 1e-6 * (1 + 1e-3) + 2**-23 * np.abs(want))
  adam = restored["opt_state"][0]
  assert int(adam["count"]) == 1 and int(restored["step"]) == 1
  for mu, nu in zip(jax_leaves(adam["mu"]), jax_leaves(adam["nu"]), strict=True):
    np.testing.assert_allclose(mu**2 * (1 - 0.999), nu * (1 - 0.9) ** 2, rtol=1e-5, atol=1e-30)
  # As if stopped after step 1: a rerun resumes its own checkpoint, not init_from, and
  # takes step 2 to the same parameters.
  step, params_2 = final_params(str(big))
  assert step == 2
  shutil.rmtree(big / "checkpoints" / "2")
  third = run_main(big, *fine_tune, codegen=FAST_COMPILE)
  assert third.returncode == 0, third.stderr[-3000:]
  assert f"resumed from {big}/checkpoints/1" in third.stderr
  assert "parameters from" not in third.stderr
  assert json.load(open(big / "summary.json"))["step"] == 2
  assert_same_params(final_params(str(big))[1], params_2)


# --- the compilation cache --------------------------------------------------------
@pytest.mark.slow
def test_main_keeps_its_compiled_programs_in_a_cache_that_a_rerun_loads(tmp_path):
  """By default main.py keeps JAX's persistent compilation cache in $LKCA_JAX_CACHE_DIR/xla:
  a first run writes its programs there, and a second run of the same config in another
  workdir writes none, since a program compiled again would be written under its own key.
  `--compilation_cache=` writes none at all; $JAX_COMPILATION_CACHE_DIR takes the default's
  place. (The suite's own runs share one cache through that variable, unset here.)"""
  base = {k: v for k, v in main_env(FAST_COMPILE).items() if k != "JAX_COMPILATION_CACHE_DIR"}

  def run(workdir, cache, *flags, **env):
    result = subprocess.run(
      main_cmd(tmp_path / workdir, "--config.num_train_steps=2", *flags),
      cwd=ROOT,
      env={**base, "LKCA_JAX_CACHE_DIR": str(tmp_path / cache), **env},
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

  programs = tmp_path / "default" / "xla"
  run("first", "default")
  written = sorted(os.listdir(programs))
  assert any("single_run" in name for name in written), written  # the train step
  run("second", "default")
  assert sorted(os.listdir(programs)) == written
  run("off", "off", "--compilation_cache=")
  assert (tmp_path / "off").is_dir() and not (tmp_path / "off" / "xla").exists()
  run("env", "by_env", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env_cache"))
  assert any("single_run" in name for name in os.listdir(tmp_path / "env_cache"))
  assert not (tmp_path / "by_env" / "xla").exists()
