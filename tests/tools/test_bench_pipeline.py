"""The pipeline benchmark: its interleaving, its 'off' mode, and a real run on the fixture."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits, tinyimagenet
from lkca_jax import augment, train
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.tools import bench_pipeline as benchmark
from tests.helpers import cpu_model_name, prepared_fixture

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
  "count,block,order",
  [
    (4, 1, "ABBAABBA"),
    (4, 2, "AABBBBAA"),
    (3, 2, "AABBBA"),  # the last block is cut to what is left
  ],
)
def test_modes_alternate_in_abba_blocks(count, block, order):
  calls = []

  def runner(name):
    def run(index):
      calls.append((name, index))
      return float(len(calls))

    return run

  times = benchmark.interleaved_times({"A": runner("A"), "B": runner("B")}, count, block)
  assert "".join(name for name, _ in calls) == order
  assert [index for _, index in calls] == list(range(2 * count))  # one running index
  assert len(times["A"]) == len(times["B"]) == count
  assert times["A"] == [float(k + 1) for k, (name, _) in enumerate(calls) if name == "A"]


def test_off_mode_is_normalisation_of_the_same_images():
  config = digits.get_config()
  config.batch_size = 32
  run = train.Run.prepare(config)
  on = train.build_training(run, config).pipeline
  off_augment = benchmark.augment_off(on.augment)
  assert (
    off_augment.flip,
    off_augment.crop_padding,
    off_augment.autoaugment,
    off_augment.random_erasing,
  ) == (False, 0, None, 0.0)
  assert (off_augment.mean, off_augment.std) == (on.augment.mean, on.augment.std)
  off = benchmark.pipeline_with_augment(on, off_augment, jax.random.key(1))
  assert off.placement == on.placement and off.steps_per_epoch == on.steps_per_epoch
  order = np.asarray(off.epoch_order(0))
  batch = off.train_batch(order, 2)
  raw = np.asarray(on.train.images)[order[64:96]]
  np.testing.assert_array_equal(
    np.asarray(batch["image"]),
    np.asarray(augment.normalize(raw, config.dataset.mean, config.dataset.std)),
  )
  np.testing.assert_array_equal(
    np.asarray(batch["label"]), np.asarray(on.train.labels)[order[64:96]]
  )


def test_breakdown_turns_on_one_enabled_stage_at_a_time():
  full = pipeline_lib.augment_config(tinyimagenet.get_config())
  stages = benchmark.augment_stages(full)
  assert list(stages) == ["flip", "crop", "autoaugment", "normalize", "random_erasing"]
  on = {
    name: [stage.flip, stage.crop_padding, stage.autoaugment, stage.random_erasing]
    for name, stage in stages.items()
  }
  assert on == {
    "flip": [True, 0, None, 0.0],
    "crop": [False, 4, None, 0.0],
    "autoaugment": [False, 0, "imagenet", 0.0],
    "normalize": [False, 0, None, 0.0],
    "random_erasing": [False, 0, None, 0.25],
  }
  assert all(stage.mean == full.mean and stage.std == full.std for stage in stages.values())
  crop_only = benchmark.augment_stages(pipeline_lib.augment_config(digits.get_config()))
  assert list(crop_only) == ["crop", "normalize"] and crop_only["crop"].crop_padding == 1


def test_benchmark_on_the_fixture_writes_both_modes(tmp_path, tmp_path_factory):
  data_dir = prepared_fixture(tmp_path_factory, "array_record")
  out = tmp_path / "bench" / "pipeline.json"
  steps = 2
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "lkca_jax.tools.bench_pipeline",
      "--config",
      "configs/tinyimagenet.py",
      f"--config.dataset.data_dir={data_dir}",
      "--config.dataset.download=False",
      "--config.model_overrides.dim=32",
      "--config.model_overrides.depth=1",
      "--config.batch_size=16",
      f"--steps={steps}",
      "--nobreakdown",
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ratio on/off" in result.stdout
  results = json.loads(out.read_text())
  train_results = results["train"]
  for mode in ("on", "off"):
    assert len(train_results[mode]["step_ms"]) == steps and min(train_results[mode]["step_ms"]) > 0
    assert results["pipeline_batch_ms"][mode] > 0 and results["augment_batch_ms"][mode] > 0
  assert results["meets_target"] == (train_results["ratio"] >= 0.85)
  # 'off' is the same recipe with every per-image random stage switched off, nothing else.
  on, off = results["augment"]["on"], results["augment"]["off"]
  assert on["autoaugment"] == "imagenet" and off["autoaugment"] is None
  assert on["flip"] is True and off["flip"] is False
  assert on["crop_padding"] > 0 and off["crop_padding"] == 0
  assert off["random_erasing"] == 0.0
  changed = {key for key in on if on[key] != off[key]}
  assert changed <= {"flip", "crop_padding", "autoaugment", "random_erasing"}
  assert results["augment_stage_ms"] == {}  # --nobreakdown
  assert results["config"]["batch_size"] == 16 and results["config"]["params"] > 0
  assert results["machine"]["cpu_count"] == os.cpu_count()
  machine_line = [line for line in result.stdout.splitlines() if line.startswith("machine: ")]
  assert machine_line and machine_line[-1].startswith(f"machine: {cpu_model_name()} (")


def test_summary_of_known_step_times():
  # on: 0.1, 0.3, 0.2 s (median 0.2 s: 80 img/s at batch 16); off: 0.1 s each (160 img/s).
  # Paired off/on: 1, 1/3, 1/2 -> median 1/2. Additive: 100 / (100 + 50 - 10) = 5/7.
  summary = benchmark.summarize(
    {"on": [0.1, 0.3, 0.2], "off": [0.1, 0.1, 0.1]}, {"on": 50.0, "off": 10.0}, batch=16
  )
  assert summary["on"]["median_step_ms"] == pytest.approx(200.0)
  assert summary["on"]["images_per_second"] == pytest.approx(80.0)
  assert summary["off"]["images_per_second"] == pytest.approx(160.0)
  assert summary["on"]["step_ms"] == pytest.approx([100.0, 300.0, 200.0])
  assert summary["ratio"] == pytest.approx(0.5)
  assert summary["paired_ratio"] == pytest.approx(0.5)
  assert summary["additive_ratio"] == pytest.approx(5 / 7)
