"""Training from a prepared dataset runs with TensorFlow never imported.

TF is needed to prepare datasets, not to train (in a GPU process it would also
take GPU memory from JAX): a short `main.py` run on the Tiny-ImageNet fixture,
prepared as array_record, must write its TensorBoard events and summary.json
with no `tensorflow` module ever loaded.
"""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tests.helpers import FIXTURE_RUN, FIXTURE_RUN_STEPS, prepared_fixture

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs main.py as `python main.py` would, then reports every TensorFlow module loaded.
WRAPPER = """\
import atexit, os, runpy, sys
atexit.register(lambda: print("tensorflow modules:",
                              sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")))
sys.path[0] = os.getcwd()
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_training_from_array_record_never_imports_tensorflow(tmp_path_factory, tmp_path):
  data_dir = prepared_fixture(tmp_path_factory, "array_record")
  wrapper, workdir = tmp_path / "run_main.py", tmp_path / "workdir"
  wrapper.write_text(WRAPPER)
  result = subprocess.run(
    [
      sys.executable,
      str(wrapper),
      *FIXTURE_RUN,
      f"--workdir={workdir}",
      f"--config.dataset.data_dir={data_dir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "tensorflow modules: []", result.stdout

  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == FIXTURE_RUN_STEPS and summary["dataset"] == "tiny_imagenet"
  assert (summary["train_images"], summary["test_images"]) == (48, 20)
  (events_file,) = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  events = event_accumulator.EventAccumulator(
    str(workdir / events_file), size_guidance={event_accumulator.TENSORS: 0}
  )
  events.Reload()

  def scalars(tag):
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]

  assert [step for step, _ in scalars("train_loss")] == list(range(1, FIXTURE_RUN_STEPS + 1))
  ((step, top1),) = scalars("test_top1")
  assert step == FIXTURE_RUN_STEPS and abs(top1 - summary["final_top1"]) < 1e-6
  assert "_hparams_/session_start_info" in events.Tags()["tensors"]
