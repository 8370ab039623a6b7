"""Where the images come from: the dataset registry and whole-split loading.

`DATASETS` maps a name to its `DatasetSpec`; a new dataset is one registry line
here (a TFDS catalog name), plus one new file when it needs its own builder or
loader. `load_split` decodes a whole split once into numpy arrays.

TFDS data is read only from `data_dir`: nothing is downloaded or prepared
unless `download=True`; without it, a missing dataset raises
`DatasetUnavailableError` naming the flags that fix it. TensorFlow and TFDS are
imported inside the functions that need them, so importing this module (and
the digits path) stays fast and TF-free.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable

import numpy as np

from lkca_jax.data import digits

_TINY_IMAGENET_HINT = (
    " (from --config.dataset.manual_dir=DIR holding tiny-imagenet-200.zip, or from the zip that "
    "$LKCA_TINY_IMAGENET_ZIP names; with neither it downloads it from cs231n.stanford.edu)")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  num_classes: int
  image_size: tuple[int, int]
  channels: int
  train_split: str
  eval_split: str
  tfds_name: str | None  # None: not a TFDS dataset, `loader` reads it
  # For sources outside TFDS: loader(split) -> (uint8 images (N,H,W,C), int32 labels (N,)).
  loader: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None
  # For TFDS builders outside the catalog: the module whose import registers it.
  tfds_module: str | None = None
  source_hint: str = ""  # appended to the "not available" error: where raw files come from


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32), 3, "train", "test", "cifar10"),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32), 3, "train", "test", "cifar100"),
    "svhn": DatasetSpec("svhn", 10, (32, 32), 3, "train", "test", "svhn_cropped"),
    "tiny_imagenet": DatasetSpec("tiny_imagenet", 200, (64, 64), 3, "train", "validation",
                                 "tiny_imagenet", tfds_module="lkca_jax.data.tiny_imagenet",
                                 source_hint=_TINY_IMAGENET_HINT),
    "digits": DatasetSpec("digits", 10, (8, 8), 1, "train", "test", None, loader=digits.load),
}


class DatasetUnavailableError(ValueError):
  """The dataset is not prepared where we look, and we may not download it."""


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}: choose one of {sorted(DATASETS)}")
  return DATASETS[name]


def check_available(name: str, *, data_dir=None, manual_dir=None, download: bool = False) -> None:
  """Raises DatasetUnavailableError unless `load_split` can get the data; decodes nothing."""
  spec = get_spec(name)
  if spec.tfds_name is None:
    return
  builder = _builder(spec, data_dir)
  if _is_prepared(builder):
    return
  if not download:
    raise DatasetUnavailableError(_unavailable_message(spec, builder))
  _check_manual_dir(spec, manual_dir)


def load_split(name: str, split: str, *, data_dir=None, manual_dir=None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images (N, H, W, C), int32 labels (N,)), decoded once.

  Prepares a TFDS dataset first (tfrecord) when it is missing and download=True.
  """
  spec = get_spec(name)
  if spec.tfds_name is None:
    return spec.loader(split)
  builder = _builder(spec, data_dir)
  if not _is_prepared(builder):
    if not download:
      raise DatasetUnavailableError(_unavailable_message(spec, builder))
    prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    builder = _builder(spec, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}: choose one of {sorted(builder.info.splits)}")
  return _decode_split(spec, builder, split)


def prepare(name: str, *, data_dir=None, manual_dir=None, file_format: str = "tfrecord") -> dict[str, int]:
  """Downloads (if needed) and prepares a TFDS dataset in data_dir; returns {split: size}."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  spec = get_spec(name)
  if spec.tfds_name is None:
    raise ValueError(f"{name} is not a TFDS dataset and needs no preparing: load it with load_split")
  _check_manual_dir(spec, manual_dir)
  builder = _builder(spec, data_dir)
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=config, file_format=file_format)
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def _builder(spec: DatasetSpec, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if spec.tfds_module:
    importlib.import_module(spec.tfds_module)  # registers the builder with TFDS
  return tfds.builder(spec.tfds_name, data_dir=os.fspath(data_dir) if data_dir else None)


def _is_prepared(builder) -> bool:
  # Looking for dataset_info.json first keeps TFDS from warning about missing folders.
  return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def _unavailable_message(spec: DatasetSpec, builder) -> str:
  return (f"dataset {spec.name} (TFDS {spec.tfds_name} {builder.version}) is not prepared in "
          f"{builder.data_dir_root} and downloading is off: pass --config.dataset.data_dir=DIR where it is "
          f"prepared, or --config.dataset.download=True to prepare it there{spec.source_hint}")


def _check_manual_dir(spec: DatasetSpec, manual_dir) -> None:
  """A manual_dir that lacks the files is a mistake: say so instead of downloading.

  A builder module may define `manual_dir_problem(manual_dir) -> str | None`.
  """
  if spec.tfds_module is None or manual_dir is None:
    return
  check = getattr(importlib.import_module(spec.tfds_module), "manual_dir_problem", None)
  problem = check(manual_dir) if check else None
  if problem:
    raise DatasetUnavailableError(problem)


def _decode_split(spec: DatasetSpec, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes with tf.data in parallel into preallocated arrays (no second copy)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  info = builder.info
  image_key, label_key = info.supervised_keys
  decoders = {image_key: tfds.decode.SkipDecoding()}
  if info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    # as_dataset cannot read array_record: take the raw records, parse them in tf.data.
    source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    records = source.__getitems__(range(len(source)))
    # tf.constant first (from_tensor_slices on a list of 100k bytes takes seconds), then
    # parse whole batches: TFDS stores the image as bytes and the label as int64.
    keys = {image_key: tf.io.FixedLenFeature([], tf.string),
            label_key: tf.io.FixedLenFeature([], tf.int64)}
    examples = (tf.data.Dataset.from_tensor_slices(tf.constant(records)).batch(1024)
                .map(lambda batch: tf.io.parse_example(batch, keys)).unbatch())
  else:
    examples = builder.as_dataset(split, decoders=decoders, shuffle_files=False,
                                  read_config=tfds.ReadConfig(try_autocache=False))

  shape = (*spec.image_size, spec.channels)
  decode = _image_decoder(info.features[image_key].encoding_format, spec.channels)

  def to_pair(example):
    image = tf.ensure_shape(decode(example[image_key]), shape)
    return image, tf.cast(example[label_key], tf.int32)

  batches = examples.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE).batch(2048).prefetch(2)
  count = info.splits[split].num_examples
  images = np.empty((count, *shape), np.uint8)
  labels = np.empty((count,), np.int32)
  start = 0
  for image_batch, label_batch in tfds.as_numpy(batches):
    images[start:start + len(label_batch)] = image_batch
    labels[start:start + len(label_batch)] = label_batch
    start += len(label_batch)
  if start != count:
    raise ValueError(f"{spec.name}/{split}: read {start} examples but the dataset info says {count}; "
                     f"prepare it again in a fresh --config.dataset.data_dir")
  return images, labels


def _image_decoder(encoding_format: str | None, channels: int):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if encoding_format == "jpeg":
    # INTEGER_ACCURATE is libjpeg's default, so pixels match PIL's decode of the same bytes.
    return lambda data: tf.io.decode_jpeg(data, channels=channels, dct_method="INTEGER_ACCURATE")
  if encoding_format == "png":
    return lambda data: tf.io.decode_png(data, channels=channels)
  return lambda data: tf.io.decode_image(data, channels=channels, expand_animations=False)
