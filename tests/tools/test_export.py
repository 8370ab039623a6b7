"""The export command in real processes, on a tiny digits run of two seeds trained by main.py.

The artifacts are called in a fresh interpreter that imports jax and numpy only. Their
logits are checked against `load_trained`'s model on the same normalised test images (the
same sums compiled apart: the round-off bound of reordered sums), and their top-1 against
the accuracy the run's own evaluation recorded in summary.json.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lkca_jax import augment, load_trained
from lkca_jax.data import digits
from tests.helpers import ROOT, U, assert_reordered, built_once, chain_terms

pytestmark = pytest.mark.slow  # trains and starts processes: make test, not make check

STEPS = 10
RUN = [
  "main.py",
  "--config=configs/digits.py",
  "--config.model_overrides.depth=2",
  "--config.model_overrides.dim=32",
  "--config.model_overrides.num_heads=2",
  "--config.num_devices=1",
  "--config.batch_size=32",
  f"--config.num_train_steps={STEPS}",
  f"--config.eval_every_steps={STEPS}",
  "--config.num_runs=2",
  "--config.ema_decay=0.5",  # a moving average to export with --average
]
# Reads two artifacts, calls each on the saved images, saves the logits and prints the
# packages of lkca_jax's own stack that it imported.
STANDALONE = """
import sys
import numpy as np
from jax import export

images, out, *artifacts = sys.argv[1:]
x = np.load(images)
logits = {}
for k, path in enumerate(artifacts):
  with open(path, "rb") as f:
    logits[f"artifact{k}"] = np.asarray(export.deserialize(f.read()).call(x))
np.savez(out, **logits)
stack = ("lkca_jax", "flax", "optax", "orbax", "ml_collections", "tensorflow")
print(sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in stack}))
"""


def command(*args):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
  )


def export(*args):
  return command("-m", "lkca_jax.tools.export", *args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, {name: (artifact, stdout)}): the run's default export (run 0, every platform)
  and run 1's moving average for the CPU alone, at a path of its own."""
  return built_once(tmp_path_factory, "export_exported", train_and_export)


def train_and_export(tmp):
  workdir = tmp / "run"
  result = command(*RUN, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  average = tmp / "out" / "run1_average.jax"
  cases = {
    "default": (workdir / "export" / "model.jax", []),
    "run 1 average": (average, ["--run=1", "--average", "--platforms=cpu", f"--out={average}"]),
  }
  outputs = {}
  for name, (path, flags) in cases.items():
    result = export(f"--workdir={workdir}", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[name] = (path, result.stdout)
  return workdir, outputs


def test_the_artifacts_run_without_lkca_jax_and_classify_as_the_run_does(exported, tmp_path):
  workdir, outputs = exported
  images, labels = digits.load("test")
  np.save(tmp_path / "images.npy", images)
  artifacts = [str(outputs[name][0]) for name in ("default", "run 1 average")]
  result = command(
    "-c", STANDALONE, str(tmp_path / "images.npy"), str(tmp_path / "logits.npz"), *artifacts
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["[]"], result.stdout  # no lkca_jax
  logits = np.load(tmp_path / "logits.npz")
  config = json.loads((workdir / "config.json").read_text())
  normalised = augment.normalize(images, config["dataset"]["mean"], config["dataset"]["std"])
  for k, model in enumerate((load_trained(workdir), load_trained(workdir, run=1, average=True))):
    expected = np.asarray(model(normalised))
    assert_reordered(logits[f"artifact{k}"], expected, chain_terms(model))

  # Run 0's top-1 on the test split is the one its evaluation recorded, but for an image whose
  # two highest logits are within the round-off bound of each other: each logit of either
  # computation is within terms·u (of the largest) of the exact one, so a gap moves by 4 of that.
  got, expected = logits["artifact0"], np.asarray(load_trained(workdir)(normalised))
  bound = 4 * chain_terms(load_trained(workdir)) * U * float(np.abs(expected).max())
  top2 = np.sort(got, axis=1)[:, -2:]
  close = top2[:, 1] - top2[:, 0] <= bound
  correct = got.argmax(axis=1) == labels
  recorded = json.loads((workdir / "summary.json").read_text())["runs"][0]["final_top1"]
  assert (correct & ~close).sum() <= round(recorded * len(labels)) <= (correct | close).sum()


def test_the_description_says_what_the_artifact_holds(exported):
  workdir, outputs = exported
  config = json.loads((workdir / "config.json").read_text())
  for name, run, average, platforms in (
    ("default", 0, False, ["cpu", "cuda", "tpu"]),
    ("run 1 average", 1, True, ["cpu"]),
  ):
    path, stdout = outputs[name]
    described = json.loads(path.with_name(path.name + ".json").read_text())
    assert described["checkpoint"] == str(workdir / "checkpoints" / str(STEPS))
    assert (described["step"], described["run"], described["average"]) == (STEPS, run, average)
    assert described["platforms"] == platforms
    assert described["input"] == {"shape": ["batch", 8, 8, 1], "dtype": "uint8"}
    assert described["output"] == {"shape": ["batch", 10], "dtype": "float32"}
    assert (described["mean"], described["std"]) == (
      config["dataset"]["mean"],
      config["dataset"]["std"],
    )
    assert (described["model"], described["dataset"], described["classes"]) == (
      "lkca_t",
      "digits",
      10,
    )
    assert described["model_overrides"] == {"depth": 2, "dim": 32, "num_heads": 2}
    assert stdout.startswith(f"wrote {path} (") and ", ".join(platforms) in stdout
    assert described["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# The first four are found before --out is looked at: nothing is made. A run or checkpoint
# that is not there is found when the checkpoints are read, after --out's directory is made.
@pytest.mark.parametrize(
  "flags, named, out_dir_made",
  [
    (["--platforms=cpu,gpu"], "--platforms", False),
    (["--batch=0"], "--batch", False),
    (["--workdir={workdir}/checkpoints"], "config.json", False),
    (["--workdir="], "--workdir is missing", False),
    (["--run=2"], "run=2", True),
    (["--checkpoint={workdir}/checkpoints/7"], "checkpoints/7", True),
  ],
  ids=[
    "unknown platform",
    "batch 0",
    "no workdir",
    "empty",
    "a run not trained",
    "no such checkpoint",
  ],
)
def test_bad_input_is_one_error_line_and_writes_no_file(
  exported, tmp_path, flags, named, out_dir_made
):
  workdir, _ = exported
  out = tmp_path / "out" / "model.jax"
  flags = [flag.format(workdir=workdir) for flag in flags]
  has_workdir = any(flag.startswith("--workdir") for flag in flags)
  result = export(*([] if has_workdir else [f"--workdir={workdir}"]), *flags, f"--out={out}")
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines[-1].startswith("error: ") and named in lines[-1], lines[-1]
  assert "Traceback" not in result.stderr and result.stdout == ""
  assert out.parent.exists() == out_dir_made
  assert [name for _, _, names in os.walk(tmp_path) for name in names] == []
