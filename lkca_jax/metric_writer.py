"""TensorBoard event files and console logs for the trainer, without TensorFlow.

clu's default writer writes through `tf.summary`, and `import clu.metric_writers`
(so also `clu.periodic_actions`) imports that TF writer on the spot. This module
imports clu's writers through `adapters.clu_metric_writers`, which leaves
TensorFlow out; `clu.periodic_actions` imported after it is TF-free too.

`EventFileWriter` writes the summaries `tf.summary` would (the same plugin
metadata and tensors, so TensorBoard shows them alike) with TensorBoard's own
protos and record format. TensorBoard's `EventFileWriter` cannot be used: it
opens files through `tensorboard.compat.tf`, which imports TensorFlow whenever
it is installed.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from lkca_jax import adapters

clu_writers = adapters.clu_metric_writers()  # first: clu's package imports TF-free

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from etils import epath  # noqa: E402
from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.plugins.histogram import summary_v2 as histogram_summary  # noqa: E402
from tensorboard.plugins.hparams import summary_v2 as hparams_summary  # noqa: E402
from tensorboard.plugins.image import metadata as image_metadata  # noqa: E402
from tensorboard.plugins.scalar import summary_v2 as scalar_summary  # noqa: E402
from tensorboard.plugins.text import summary_v2 as text_summary  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402


def flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested hyperparameters as {"a.b": value}; None as "", as TensorBoard takes no None."""
  flat = {}
  for key, value in hparams.items():
    name = f"{prefix}{key}"
    if isinstance(value, (list, tuple)):
      value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, Mapping) or hasattr(value, "items"):  # ConfigDicts too
      flat.update(flat_hparams(value, f"{name}."))
    else:
      flat[name] = "" if value is None else value
  return flat


class EventFileWriter(clu_writers.MetricWriter):
  """A clu MetricWriter that appends TensorBoard events to a new file in `logdir`."""

  def __init__(self, logdir):
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    # The name TensorBoard looks for; host and pid keep concurrent or resumed runs apart.
    self.path = directory / (
      f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    )
    self._file = self.path.open("wb")
    self._records = RecordWriter(self._file)
    self._lock = threading.Lock()  # async writers call from their own thread
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    with self._lock:
      self._records.write(event.SerializeToString())

  def _write_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def _write_values(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._write_summary(step, summary_pb2.Summary(value=values))

  def write_summaries(
    self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
  ):
    self._write_values(
      step,
      [
        summary_pb2.Summary.Value(
          tag=key,
          tensor=tensor_util.make_tensor_proto(np.asarray(value)),
          metadata=(metadata or {}).get(key),
        )
        for key, value in values.items()
      ],
    )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = []
    for key, value in scalars.items():
      values.extend(scalar_summary.scalar_pb(key, np.asarray(value)).value)
    self._write_values(step, values)

  def write_images(self, step: int, images: Mapping[str, Any]):
    """uint8 images, or floats in [0, 1]; (H, W, C) or (N, H, W, C), C of 1, 3 or 4."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    values = []
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        value = value[None]
      if value.dtype != np.uint8:  # as tf.image.convert_image_dtype(saturate=True) does
        value = np.clip(value.astype(np.float64) * 255.5, 0, 255).astype(np.uint8)
      encoded = []
      for image in value:
        out = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
        encoded.append(out.getvalue())
      # tf.summary.image's layout: [width, height, png, png, ...] as strings.
      tensor = [str(value.shape[2]).encode(), str(value.shape[1]).encode(), *encoded]
      values.append(
        summary_pb2.Summary.Value(
          tag=key,
          tensor=tensor_util.make_tensor_proto(tensor),
          metadata=image_metadata.create_summary_metadata(display_name=None, description=None),
        )
      )
    self._write_values(step, values)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.log_first_n(logging.WARNING, "EventFileWriter does not write videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    logging.log_first_n(logging.WARNING, "EventFileWriter does not write audio.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    values = []
    for key, value in texts.items():
      values.extend(text_summary.text_pb(key, value).value)
    self._write_values(step, values)

  def write_histograms(
    self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
  ):
    values = []
    for key, value in arrays.items():
      buckets = (num_buckets or {}).get(key)
      values.extend(histogram_summary.histogram_pb(key, np.asarray(value), buckets).value)
    self._write_values(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]):
    # TensorBoard's HParams dashboard reads this; clu's TF writer writes the same summary.
    self._write_summary(0, hparams_summary.hparams_pb(flat_hparams(hparams)))

  def flush(self):
    with self._lock:
      self._records.flush()

  def close(self):
    with self._lock:
      self._records.close()


def create_default_writer(
  logdir=None, *, just_logging: bool = False, asynchronous: bool = True
) -> clu_writers.MetricWriter:
  """clu's `create_default_writer` (console log + event files), without TensorFlow."""
  writers = [clu_writers.LoggingWriter()]
  if not just_logging and logdir is not None:
    writers.append(EventFileWriter(logdir))
  if asynchronous:
    return clu_writers.AsyncMultiWriter(writers)
  return clu_writers.MultiWriter(writers)
