"""Whole splits of an array_record-prepared TFDS dataset, decoded without TensorFlow.

TFDS stores each example as a serialized `tf.train.Example`. TFDS ships its own
copy of that proto, so the records parse with protobuf alone; the image bytes
(PNG or JPEG) decode with PIL. PIL and TensorFlow decode JPEGs with the same
libjpeg defaults (integer DCT, fancy upsampling), so the arrays equal those of
the TensorFlow path pixel for pixel (tests/data/test_records.py).
"""

from __future__ import annotations

import concurrent.futures
import io
import os

import numpy as np

# PIL releases the GIL while it decodes, so threads overlap the decoding.
DECODE_THREADS = min(8, os.cpu_count() or 1)
_MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode; what TF's decode_*(channels=C) gives


def decode_split(builder, split: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A split of an array_record builder as (uint8 images (N, *shape), int32 labels (N,))."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  image_key, label_key = builder.info.supervised_keys
  source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  records = source.__getitems__(range(len(source)))
  images = np.empty((len(records), *shape), np.uint8)
  labels = np.empty((len(records),), np.int32)
  mode = _MODES[shape[-1]]

  def decode_range(start: int, stop: int) -> None:
    for i in range(start, stop):
      feature = tf_example_pb2.Example.FromString(records[i]).features.feature
      images[i] = _decode_image(feature[image_key].bytes_list.value[0], mode, shape)
      labels[i] = feature[label_key].int64_list.value[0]

  chunk = -(-len(records) // DECODE_THREADS) if records else 1
  with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
    futures = [
      pool.submit(decode_range, start, min(start + chunk, len(records)))
      for start in range(0, len(records), chunk)
    ]
    for future in futures:
      future.result()  # re-raises a decoding error
  return images, labels


def _decode_image(data: bytes, mode: str, shape: tuple[int, int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as image:
    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
  if pixels.shape[:2] != shape[:2]:
    raise ValueError(
      f"an image is {pixels.shape[1]}x{pixels.shape[0]}, expected {shape[1]}x{shape[0]}"
    )
  return pixels.reshape(shape)
