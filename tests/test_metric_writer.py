"""The TF-free TensorBoard writer: what it writes reads back with TensorBoard's own reader."""

import glob
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from lkca_jax import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(logdir):
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  accumulator = event_accumulator.EventAccumulator(
    path, size_guidance={event_accumulator.TENSORS: 0}
  )  # 0: keep every event
  accumulator.Reload()
  return accumulator


def values(accumulator, tag):
  return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]


def test_scalars_read_back_with_their_steps_and_values(tmp_path):
  writer = metric_writer.create_default_writer(tmp_path)
  writer.write_hparams({"model": "lkca_t", "params": 21513, "optimizer": {"lr": 1e-3}})
  writer.write_scalars(5, {"train_loss": np.float32(2.5), "train_top1": 0.25})
  writer.write_scalars(10, {"train_loss": np.asarray(1.5), "test_top1": 0.125})
  writer.write_texts(10, {"note": "hello"})
  writer.flush()
  writer.close()
  events = read_events(tmp_path)
  assert [(s, v.item()) for s, v in values(events, "train_loss")] == [(5, 2.5), (10, 1.5)]
  assert [(s, v.item()) for s, v in values(events, "train_top1")] == [(5, 0.25)]
  assert [(s, v.item()) for s, v in values(events, "test_top1")] == [(10, 0.125)]

  # The same plugins tf.summary writes for: TensorBoard's dashboards find them.
  def plugin(tag):
    return events.SummaryMetadata(tag).plugin_data.plugin_name

  assert plugin("train_loss") == "scalars" and plugin("note") == "text"
  assert plugin("_hparams_/session_start_info") == "hparams"
  assert values(events, "note")[0][1].item() == b"hello"
  # Nested hyperparameters arrive flat, under dotted names.
  start = hparams_metadata.parse_session_start_info_plugin_data(
    events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
  )
  hparams = {name: value for name, value in start.hparams.items()}
  assert sorted(hparams) == ["model", "optimizer.lr", "params"]
  assert hparams["model"].string_value == "lkca_t" and hparams["params"].number_value == 21513
  assert hparams["optimizer.lr"].number_value == pytest.approx(1e-3)


def test_flat_hparams_as_tensorboard_takes_them():
  nested = {"a": {"b": 1, "c": [2, None]}, "d": None, "e": "x"}
  assert metric_writer.flat_hparams(nested) == {
    "a.b": 1,
    "a.c.0": 2,
    "a.c.1": "",
    "d": "",
    "e": "x",
  }


def test_images_histograms_and_raw_tensors(tmp_path):
  writer = metric_writer.EventFileWriter(tmp_path)
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  writer.write_images(1, {"image": image, "grey": np.full((2, 4, 5, 1), 0.5, np.float32)})
  writer.write_histograms(2, {"weights": np.arange(10.0)}, num_buckets={"weights": 5})
  writer.write_summaries(3, {"raw": np.arange(3)})
  writer.close()
  events = read_events(tmp_path)
  ((_, encoded),) = values(events, "image")
  assert encoded[:2].tolist() == [b"5", b"4"] and len(encoded) == 3  # width, height, 1 png
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded[2]))), image)
  assert len(values(events, "grey")[0][1]) == 4
  ((step, histogram),) = values(events, "weights")
  assert step == 2 and histogram.shape == (5, 3) and histogram[:, 2].sum() == 10
  np.testing.assert_array_equal(values(events, "raw")[0][1], np.arange(3))


def test_writer_and_clu_progress_never_import_tensorflow(tmp_path):
  code = (
    "import sys; from lkca_jax import metric_writer; from clu import periodic_actions; "
    f"w = metric_writer.create_default_writer({str(tmp_path)!r}); "
    "w.write_scalars(1, {'loss': 1.0}); "
    "periodic_actions.ReportProgress(num_train_steps=2, writer=w, every_steps=1)(1); "
    "w.close(); print('tensorflow' in sys.modules)"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["False"]
