"""lkca_jax.tools.resolution_transfer: which rows a model gets, how the table reads, a stage
stopped by a signal then resumed, and a signal in a stage's last step.

The whole experiment at its real sizes is run by hand (docs/results.md, "Across
resolutions"); every stage it calls is tested on its own (tests/test_main.py: init_from in
training and evaluation; tests/test_resolution.py: the moves)."""

import json
import os
import signal
import subprocess
import sys
import types

import pytest

from configs import tinyimagenet
from lkca_jax import schedules
from lkca_jax.tools import resolution_transfer as tool
from tests.helpers import start_held

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
  "dataset": "tiny_imagenet",
  "classes": 20,
  "seeds": 3,
  "low": 32,
  "high": 64,
  "patch_size": 8,
  "low_steps": 300,
  "finetune_steps": 100,
  "batch_size": 64,
  "finetune_learning_rate": 5e-4,
  "config_file": "configs/tinyimagenet.py",
  "config_changes": {"augment.random_erasing": 0.0},
}


def test_lkca_models_get_a_row_per_kernel_move_and_others_one():
  assert tool.kernel_moves("lkca_t") == ("pad", "resample")
  assert tool.kernel_moves("vit_1m") == ("-",)


def test_the_table_gives_mean_and_sample_std_in_percent_and_marks_missing_stages():
  rows = [
    {"model": "lkca_t", "kernels": "pad", "low": [0.17, 0.18, 0.16], "moved": [0.2, 0.2, 0.2]},
    {"model": "vit_1m", "kernels": "-", "low": [0.25]},
  ]
  table = tool.render({"settings": SETTINGS, "rows": rows})
  lines = table.splitlines()
  assert "4² grid) → 64×64 px (8² grid)" in lines[0] and "400 from scratch at 64" in lines[0]
  assert lines[0].endswith(
    "fine-tuning at a peak learning rate of 0.0005. Config `configs/tinyimagenet.py`, set on "
    "the command line: `augment.random_erasing`=0.0."
  )
  # mean 17.00, sample std (ddof 1) of 17, 18, 16 = 1.00; a single value has no std
  assert "| lkca_t | pad | 17.00 ± 1.00 | 20.00 ± 0.00 | … | … |" in lines
  assert "| vit_1m | - | 25.00 | … | … | … |" in lines


def test_a_seed_that_died_is_left_out_of_its_cell_and_counted():
  rows = [
    {"model": "lkca_t", "kernels": "pad", "low": [0.5, None, 0.7], "moved": [None, None, None]}
  ]
  table = tool.render({"settings": {**SETTINGS, "classes": 0}, "rows": rows})
  lines = table.splitlines()
  # mean 60.00, sample std of 50 and 70 = 14.14, over the 2 of 3 seeds that finished
  assert "| lkca_t | pad | 60.00 ± 14.14 (2/3) | – (0/3) | … | … |" in lines
  assert lines[0].startswith("tiny_imagenet; patch 8: ")  # every class: no subset named


def test_top1s_reads_training_summaries_and_evaluations():
  assert tool.top1s({"runs": [{"final_top1": 0.5, "top1": 0.1}]}) == [0.5]
  assert tool.top1s({"runs": [{"top1": 0.25}, {"top1": 0.75}]}) == [0.25, 0.75]


def test_a_model_named_twice_is_one_line_and_exit_2(tmp_path):
  command = [
    sys.executable,
    "-m",
    "lkca_jax.tools.resolution_transfer",
    "--config=configs/digits.py",
  ]
  command += ["--models=lkca_t,vit_1m,lkca_t", f"--workdir={tmp_path}", f"--out={tmp_path}/t.md"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
    "error: --models lkca_t,vit_1m,lkca_t names a model twice; list each once"
  ]


def test_a_stage_workdir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
  # Found when the first stage starts training, after the flags and configs were checked.
  stage = tmp_path / "workdir" / "vit_1m" / "low"
  stage.parent.mkdir(parents=True)
  stage.write_text("not a directory")
  command = [
    sys.executable,
    "-m",
    "lkca_jax.tools.resolution_transfer",
    "--config=configs/digits.py",
    "--low=8",
    "--high=16",
    "--patch_size=2",
    "--models=vit_1m",
    "--seeds=1",
    "--low_steps=1",
    "--finetune_steps=1",
    f"--workdir={tmp_path / 'workdir'}",
    f"--out={tmp_path / 'transfer.md'}",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and f"{stage} is a file, not a directory" in line
  assert not (tmp_path / "transfer.md").exists()


def test_a_stage_from_scratch_warms_up_for_the_recipes_share_and_a_fine_tuning_not_at_all(
  monkeypatch,
):
  """Tiny-ImageNet's 10 warmup epochs would outlast a 300-step stage; its tenth does not."""
  monkeypatch.setattr(
    tool, "FLAGS", types.SimpleNamespace(seeds=3, patch_size=8, finetune_learning_rate=5e-4)
  )
  base = tinyimagenet.get_config()
  low = tool.stage_config(base, "lkca_t", 32, 300)
  assert (low.num_runs, low.num_train_steps, low.patch_size) == (3, 300, 8)
  assert low.optimizer.warmup_fraction == 0.1
  assert schedules.warmup_overrun(low, 468, 300) is None
  schedule = schedules.learning_rate(low, 468, 300)
  assert float(schedule(30)) == pytest.approx(1e-3) and float(schedule(300)) < 1e-5
  tuned = tool.stage_config(base, "lkca_t", 64, 100, init_from="low", kernels="resample")
  assert tuned.optimizer.warmup_fraction is None and tuned.optimizer.warmup_epochs == 0
  assert float(schedules.learning_rate(tuned, 468, 100)(0)) == pytest.approx(5e-4)
  assert base.optimizer.warmup_fraction is None and base.num_runs == 1


def tiny_transfer(workdir, out, *, low_steps: int) -> list[str]:
  """The flags of a resolution transfer of one tiny vit_1m on digits, 8 → 16 px."""
  return [
    "--config=configs/digits.py",
    "--config.model_overrides.dim=16",
    "--config.model_overrides.depth=1",
    "--config.model_overrides.num_heads=2",
    "--config.batch_size=16",
    "--config.num_devices=1",
    "--low=8",
    "--high=16",
    "--patch_size=2",
    "--models=vit_1m",
    "--seeds=1",
    f"--low_steps={low_steps}",
    "--finetune_steps=2",
    f"--workdir={workdir}",
    f"--out={out}",
  ]


@pytest.mark.slow
def test_a_signal_in_a_stages_last_step_stops_the_command_after_that_stage(tmp_path):
  """SIGTERM while the first stage evaluates its last step, after the trainer's last look
  for a signal: that stage finishes and is in the report, and no later stage starts."""
  workdir, out = tmp_path / "workdir", tmp_path / "transfer.md"
  args = tiny_transfer(workdir, out, low_steps=4)
  command = [sys.executable, "-m", "lkca_jax.tools.resolution_transfer", *args]
  proc, seen = start_held("eval:4", command)
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  lines = [line for line in (seen + rest).splitlines() if line.strip()]
  assert proc.returncode == 1, lines[-20:]
  low = workdir / "vit_1m" / "low"
  assert lines[-1] == (
    f"stopped by SIGTERM after {low} finished; it and the stages before it are in {out}; "
    "run the same command to resume"
  )
  summary = json.loads((low / "summary.json").read_text())
  assert (summary["step"], summary["stopped_by"]) == (4, None)
  (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
  assert row["low"] == [summary["runs"][0]["final_top1"]] and "moved" not in row
  assert sorted(os.listdir(workdir / "vit_1m")) == ["low"]


# The command run with a thread that sends SIGTERM once the first stage's training loop
# listens for it (its handler installed): the stop lands mid-stage however fast the machine.
STOP_IN_FIRST_STAGE = """
import runpy, os, signal, sys, threading, time
from lkca_jax import train

def listening():
  return isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), train.StopSignal)

def stop_once_listening():
  while not listening():
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop_once_listening, daemon=True).start()
sys.argv = ["resolution_transfer", *sys.argv[1:]]
runpy.run_module("lkca_jax.tools.resolution_transfer", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_stage_stopped_by_sigterm_is_one_line_and_the_same_command_resumes_it(tmp_path):
  workdir, out = tmp_path / "workdir", tmp_path / "transfer.md"
  args = tiny_transfer(workdir, out, low_steps=100)
  stopped = subprocess.run(
    [sys.executable, "-c", STOP_IN_FIRST_STAGE, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  low = workdir / "vit_1m" / "low"
  lines = [line for line in stopped.stderr.splitlines() if line.strip()]
  assert stopped.returncode == 1, stopped.stderr[-3000:]
  assert "Traceback" not in stopped.stderr
  step = json.loads((low / "summary.json").read_text())["step"]
  assert 1 <= step < 100
  assert lines[-1] == (
    f"stopped by SIGTERM at step {step} of {low}; the stages before it are in {out}; run the "
    "same command to resume"
  )
  command = [sys.executable, "-m", "lkca_jax.tools.resolution_transfer", *args, "--verbosity=0"]
  resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {low / 'checkpoints'}/{step}\n" in resumed.stderr
  (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
  assert all(len(row[stage]) == 1 for stage in ("low", "moved", "finetune", "scratch"))
