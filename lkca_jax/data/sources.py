"""Where the images come from: the dataset registry and whole-split loading.

`DATASETS` maps a name to its `DatasetSpec`; a new dataset is one registry line
here (a TFDS catalog name), plus one new file when it needs its own builder or
loader. `load_split` decodes a whole split once into numpy arrays.

TFDS data is read only from `data_dir`: nothing is downloaded or prepared
unless `download=True`; without it, a missing dataset raises
`DatasetUnavailableError` naming the flags that fix it. With `manual_dir`
holding the official files, preparing reads them and never touches the
network; a download that cannot happen (unreachable host or proxy, unknown
name, refused connection, wrong checksum) is a `DatasetUnavailableError`
within seconds that names the files for `manual_dir`. TensorFlow and TFDS are
imported inside the functions that need them, so importing this module (and
the digits path) stays fast and TF-free. A split prepared as array_record (what
`prepare` writes by default) is read without TensorFlow (`records`): training
from it never imports TF, which then serves only to prepare. A tfrecord split is
decoded with tf.data.

A prepared split whose file is missing, cut short or corrupted is a
`DamagedDatasetError` naming the file and the command that prepares it again,
found before training is built where the check is cheap (each file's record
count against dataset_info.json) and otherwise while the split is read; no split
is ever used with fewer examples than its metadata lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import shlex
import socket
import threading
import urllib.parse
from collections.abc import Callable

import numpy as np

from lkca_jax import adapters
from lkca_jax.data import digits, records, synthetic

REACH_TIMEOUT_S = 5.0  # per host: DNS lookup plus TCP connect
DOWNLOAD_RETRIES = 2  # TFDS retries 10 times with backoff (3.5 min) before it gives up
MANUAL_DIR_FLAG = "--config.dataset.manual_dir"  # manual_dir as errors name it by default


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
  # The module whose import registers the TFDS builder (when outside the catalog) and that
  # prepares from files downloaded by hand: manual_dir_problem(manual_dir, tfds_name, flag) ->
  # str | None (flag: how the user gave manual_dir, as the message names it),
  # manual_builder(tfds_name, manual_dir, data_dir) -> builder | None.
  tfds_module: str | None = None
  manual_files: str = ""  # the official files to put in manual_dir, as said in errors
  manual_note: str = ""  # another way to give them, appended to manual_files in errors
  manual_only: bool = False  # no public download: preparing needs manual_dir
  # Images of many sizes (ImageNet): `image_size` is then the size they are brought to as a
  # whole split is decoded (`records.centre_crop`), and a run may choose another.
  varying_size: bool = False


DATASETS: dict[str, DatasetSpec] = {
  "cifar10": DatasetSpec(
    "cifar10",
    10,
    (32, 32),
    3,
    "train",
    "test",
    "cifar10",
    tfds_module="lkca_jax.data.cifar",
    manual_files="cifar-10-binary.tar.gz or cifar-10-python.tar.gz",
  ),
  "cifar100": DatasetSpec(
    "cifar100",
    100,
    (32, 32),
    3,
    "train",
    "test",
    "cifar100",
    tfds_module="lkca_jax.data.cifar",
    manual_files="cifar-100-binary.tar.gz or cifar-100-python.tar.gz",
  ),
  "svhn": DatasetSpec(
    "svhn",
    10,
    (32, 32),
    3,
    "train",
    "test",
    "svhn_cropped",
    tfds_module="lkca_jax.data.svhn",
    manual_files="train_32x32.mat and test_32x32.mat",
    manual_note=" (extra_32x32.mat too for the extra split)",
  ),
  "tiny_imagenet": DatasetSpec(
    "tiny_imagenet",
    200,
    (64, 64),
    3,
    "train",
    "validation",
    "tiny_imagenet",
    tfds_module="lkca_jax.data.tiny_imagenet",
    manual_files="tiny-imagenet-200.zip",
    manual_note=" (or the zip that $LKCA_TINY_IMAGENET_ZIP names)",
  ),
  "imagenet2012": DatasetSpec(
    "imagenet2012",
    1000,
    (224, 224),
    3,
    "train",
    "validation",
    "imagenet2012",
    tfds_module="lkca_jax.data.imagenet",
    manual_files="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    manual_note=" (from https://image-net.org/download-images, after registering)",
    manual_only=True,
    varying_size=True,
  ),
  "digits": DatasetSpec("digits", 10, (8, 8), 1, "train", "test", None, loader=digits.load),
  "synthetic_cifar": DatasetSpec(
    "synthetic_cifar", 10, (32, 32), 3, "train", "test", None, loader=synthetic.load
  ),
}


class DatasetUnavailableError(ValueError):
  """The dataset is not prepared where we look, and we may not download it."""


class DamagedDatasetError(DatasetUnavailableError):
  """A prepared dataset's file is missing, cut short or corrupted: it must be prepared again."""


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
  if _is_prepared(spec, builder):
    _check_files(spec, builder, (spec.train_split, spec.eval_split))
    return
  if not download:
    raise DatasetUnavailableError(_unavailable_message(spec, builder))
  _check_manual_dir(spec, manual_dir, MANUAL_DIR_FLAG)
  if _manual_builder(spec, manual_dir, data_dir) is None:  # it will download: can it?
    _check_downloads(spec, builder)


def load_split(
  name: str,
  split: str,
  *,
  data_dir=None,
  manual_dir=None,
  download: bool = False,
  image_size: int | None = None,
  classes: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (uint8 images (N, H, W, C), int32 labels (N,)), decoded once.

  With `classes` > 0 only the examples of labels below it are returned (array_record
  decodes only their images: 20 of Tiny-ImageNet's 200 classes load ~10x faster).
  Prepares a TFDS dataset first (array_record) when it is missing and download=True.
  Images of varying sizes are brought to image_size x image_size (None: the dataset's own)
  by `records.centre_crop`; a dataset of one image size is decoded at it, whatever image_size.
  """
  spec = get_spec(name)
  if image_size is not None and spec.varying_size:
    spec = dataclasses.replace(spec, image_size=(image_size, image_size))
  if spec.tfds_name is None:
    return _of_classes(*spec.loader(split), classes)
  builder = _prepared_builder(spec, split, data_dir, manual_dir, download)
  return _decode_split(spec, builder, split, classes)


def split_files(
  name: str, split: str, *, data_dir=None, manual_dir=None, download: bool = False
) -> records.SplitFiles:
  """Where a prepared split's files are and what they hold; reads only the metadata and
  the files' footers (`_check_files`). Prepares the dataset first as `load_split` does."""
  spec = get_spec(name)
  if spec.tfds_name is None:
    raise ValueError(f"dataset {name} is not a TFDS dataset: it has no files to stream")
  builder = _prepared_builder(spec, split, data_dir, manual_dir, download)
  info = builder.info
  image_key, label_key = info.supervised_keys
  return records.SplitFiles(
    paths=tuple(os.fspath(path) for path in info.splits[split].filepaths),
    num_examples=info.splits[split].num_examples,
    file_format=_file_format(builder),
    image_key=image_key,
    label_key=label_key,
    image_shape=tuple(info.features[image_key].shape),
  )


def stream_format_problem(spec: DatasetSpec, files: records.SplitFiles, data_dir) -> str | None:
  """Why the split cannot be streamed (its file format), naming the fix; None if it can."""
  if files.file_format == "array_record":
    return None
  return (
    f"dataset {spec.name} is stored as {files.file_format}, and streaming reads array_record: "
    f"prepare it again: {reprepare_command(spec, data_dir)}"
  )


def _prepared_builder(spec: DatasetSpec, split: str, data_dir, manual_dir, download: bool):
  """The builder of the prepared dataset (prepared first when download=True), its split's
  files checked."""
  builder = _builder(spec, data_dir)
  if not _is_prepared(spec, builder):
    if not download:
      raise DatasetUnavailableError(_unavailable_message(spec, builder))
    prepare(spec.name, data_dir=data_dir, manual_dir=manual_dir)
    builder = _builder(spec, data_dir)
  if split not in builder.info.splits:
    raise ValueError(
      f"{spec.name} has no split {split!r}: choose one of {sorted(builder.info.splits)}"
    )
  _check_files(spec, builder, (split,))
  return builder


def _of_classes(images: np.ndarray, labels: np.ndarray, classes: int):
  if not classes:
    return images, labels
  keep = labels < classes
  return images[keep], labels[keep]


def prepare(
  name: str,
  *,
  data_dir=None,
  manual_dir=None,
  file_format: str = "array_record",
  force: bool = False,
  manual_dir_flag: str = MANUAL_DIR_FLAG,
) -> dict[str, int]:
  """Prepares a TFDS dataset in data_dir from manual_dir, or by downloading; returns {split: size}.

  A dataset already prepared there is kept (and its files checked) unless `force`: then
  its version's folder is deleted first and prepared anew. Errors about manual_dir name it
  as `manual_dir_flag` (the prepare command: its --manual_dir).
  Raises DatasetUnavailableError, within seconds, when a needed download cannot happen,
  and DamagedDatasetError when a prepared file is missing, cut short or corrupted.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  spec = get_spec(name)
  if spec.tfds_name is None:
    raise ValueError(
      f"{name} is not a TFDS dataset and needs no preparing: load it with load_split"
    )
  _check_manual_dir(spec, manual_dir, manual_dir_flag)
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  data_dir = os.fspath(data_dir) if data_dir else None
  if force:
    _delete_prepared(spec, data_dir)
  builder = _manual_builder(spec, manual_dir, data_dir)
  if builder is not None:  # local files: no network at all
    builder.download_and_prepare(download_config=config, file_format=file_format)
  else:  # the catalog's (or our registered) builder downloads as it always does
    builder = _builder(spec, data_dir)
    _download_and_prepare(spec, builder, config, file_format)
  builder = _builder(spec, data_dir)  # what is on disk now, also when TFDS kept it
  _is_prepared(spec, builder)  # raises when a kept folder lacks its dataset_info.json
  _check_files(spec, builder, tuple(builder.info.splits))
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def _delete_prepared(spec: DatasetSpec, data_dir) -> None:
  """Deletes the prepared folder of the dataset's version in data_dir, if there is one.

  Ourselves, not TFDS's download_mode: a builder that found the folder has read its
  dataset_info.json and then refuses to prepare another file format.
  """
  folder = _builder(spec, data_dir).data_path
  if folder.exists():
    folder.rmtree()


def _manual_builder(spec: DatasetSpec, manual_dir, data_dir):
  if spec.tfds_module is None:
    return None
  make = getattr(importlib.import_module(spec.tfds_module), "manual_builder", None)
  if make is None:
    return None
  with adapters.tfds_without_bucket_metadata():
    return make(spec.tfds_name, manual_dir, data_dir)


def _builder(spec: DatasetSpec, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from google.protobuf import json_format  # pylint: disable=import-outside-toplevel

  if spec.tfds_module:
    importlib.import_module(spec.tfds_module)  # registers the builder with TFDS
  try:
    with adapters.tfds_without_bucket_metadata():
      return tfds.builder(spec.tfds_name, data_dir=os.fspath(data_dir) if data_dir else None)
  except json_format.Error as e:  # TFDS reads a prepared dataset_info.json as it builds
    where = (
      os.path.join(os.fspath(data_dir), spec.tfds_name)
      if data_dir
      else f"{spec.tfds_name} in TFDS's data dir"
    )
    # The JSON parser's own words, without what TFDS wraps around them.
    reason = re.sub(r'^Failed to construct dataset "[^"]*", builder_kwargs "[^"]*": ', "", str(e))
    raise DamagedDatasetError(
      f"dataset {spec.name}: the dataset_info.json in its prepared folder {where} cannot be "
      f"read ({_one_line(reason)}); delete that folder and prepare it again: "
      f"{reprepare_command(spec, data_dir, force=False)}"
    ) from None


def _is_prepared(spec: DatasetSpec, builder) -> bool:
  """Whether the builder's version is prepared; DamagedDatasetError if its folder lacks its info.

  TFDS writes a version's folder whole and then renames it into place, so a folder without
  dataset_info.json was damaged after (and TFDS would reuse it as it is).
  """
  # Looking for dataset_info.json first keeps TFDS from warning about missing folders.
  info_path = builder.data_path / "dataset_info.json"
  if info_path.exists():
    return builder.is_prepared()
  if builder.data_path.exists():
    raise _damaged(spec, builder, info_path, "is missing")
  return False


# --- damaged files --------------------------------------------------------------
def reprepare_command(spec: DatasetSpec, data_dir, force: bool = True) -> str:
  """The command that prepares the dataset again in data_dir, as error messages give it."""
  where = f" --data_dir {shlex.quote(os.fspath(data_dir))}" if data_dir else ""
  return (
    f"python -m lkca_jax.tools.prepare --dataset {spec.name}{where}{' --force' if force else ''}"
    f" (add --manual_dir DIR holding {spec.manual_files}{spec.manual_note} to prepare it offline)"
  )


def _damaged(spec: DatasetSpec, builder, path, reason: str) -> DamagedDatasetError:
  return DamagedDatasetError(
    f"dataset {spec.name}: the prepared file {os.fspath(path)} {reason}; prepare it again: "
    f"{reprepare_command(spec, builder.data_dir_root)}"
  )


@contextlib.contextmanager
def _naming_the_fix(spec: DatasetSpec, builder):
  """Within: a damaged file (records.DamagedFileError) is a DamagedDatasetError with the fix."""
  try:
    yield
  except records.DamagedFileError as e:
    raise _damaged(spec, builder, e.path, e.reason) from None


def _file_format(builder) -> str:
  return builder.info.file_format.value if builder.info.file_format else "tfrecord"


def _check_files(spec: DatasetSpec, builder, splits) -> None:
  """Each file of the splits is there and holds the examples dataset_info.json lists for it.

  Cheap (array_record: each file's footer; tfrecord: its record headers), so it runs before
  anything is compiled; a file changed inside is found while it is read (`_decode_split`).
  """
  file_format = _file_format(builder)
  if file_format not in ("array_record", "tfrecord"):
    return  # _decode_split refuses it
  with _naming_the_fix(spec, builder):
    for split in splits:
      info = builder.info.splits[split]
      for path, expected in zip(info.filepaths, info.shard_lengths, strict=True):
        if "://" in os.fspath(path):
          continue  # a remote file: too costly to walk, read by TensorFlow (which checks)
        count = records.count_records(path, file_format)
        if count != expected:
          raise records.DamagedFileError(
            path, f"holds {count} examples, not the {expected} dataset_info.json lists for it"
          )


def _one_line(error: BaseException, limit: int = 300) -> str:
  return " ".join(str(error).split())[:limit]


def _unavailable_message(spec: DatasetSpec, builder) -> str:
  otherwise = "" if spec.manual_only else "; with no files there it downloads them"
  return (
    f"dataset {spec.name} (TFDS {spec.tfds_name} {builder.version}) is not prepared in "
    f"{builder.data_dir_root} and downloading is off: pass --config.dataset.data_dir=DIR "
    f"where it is prepared, or --config.dataset.download=True to prepare it there (from "
    f"{MANUAL_DIR_FLAG}=DIR holding {spec.manual_files}{spec.manual_note}{otherwise})"
  )


def _offline_hint(spec: DatasetSpec) -> str:
  return (
    f"to prepare it offline, put {spec.manual_files}{spec.manual_note} in a folder DIR "
    f"and pass {MANUAL_DIR_FLAG}=DIR (python -m lkca_jax.tools.prepare: --manual_dir DIR)"
  )


def _check_manual_dir(spec: DatasetSpec, manual_dir, flag: str) -> None:
  """A manual_dir that lacks the files is a mistake: say so (naming it as `flag`) instead of
  downloading. So is no manual_dir for a dataset that cannot be downloaded.
  """
  if spec.tfds_module is None or (manual_dir is None and not spec.manual_only):
    return
  check = getattr(importlib.import_module(spec.tfds_module), "manual_dir_problem", None)
  problem = check(manual_dir, spec.tfds_name, flag) if check else None
  if problem:
    raise DatasetUnavailableError(f"dataset {spec.name}: {problem}")


# --- downloads that cannot happen fail fast ------------------------------------
def _download_and_prepare(spec: DatasetSpec, builder, config, file_format: str) -> None:
  """builder.download_and_prepare, with every download failure one DatasetUnavailableError."""
  import requests  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  _check_downloads(spec, builder)
  try:
    with adapters.tfds_http_retries(DOWNLOAD_RETRIES):
      builder.download_and_prepare(download_config=config, file_format=file_format)
  except adapters.tfds_checksum_error() as e:
    url = adapters.tfds_checksum_error_url(e) or "a file"
    raise DatasetUnavailableError(
      f"dataset {spec.name}: the download of {url} has the wrong checksum (not the official "
      f"file: a proxy or login page may have answered instead); {_offline_hint(spec)}"
    ) from None
  except (requests.RequestException, tfds.download.DownloadError) as e:
    reason = " ".join(str(e).split())[:300]
    raise DatasetUnavailableError(
      f"dataset {spec.name} download failed: {reason}; {_offline_hint(spec)}"
    ) from None


def _check_downloads(spec: DatasetSpec, builder) -> None:
  """Raises DatasetUnavailableError, within seconds, when a pending download cannot start."""
  for url in _pending_downloads(spec, builder):
    problem = unreachable(url)
    if problem:
      raise DatasetUnavailableError(
        f"dataset {spec.name} cannot be downloaded: {problem}; {_offline_hint(spec)}"
      )


def _pending_downloads(spec: DatasetSpec, builder) -> list[str]:
  """The URLs preparing will fetch: all the builder's, less those TFDS already has locally."""
  url_infos = type(builder).url_infos or {}
  urls = list(url_infos) or list(
    getattr(importlib.import_module(spec.tfds_module), "URLS", ()) if spec.tfds_module else ()
  )
  download_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads")
  pending = []
  for url in urls:
    info = url_infos.get(url)
    names = adapters.tfds_cached_names(url, info.checksum if info else None)
    # Where TFDS's download manager looks: its cache (per dataset, or flat) and downloads/manual.
    candidates = [
      os.path.join(download_dir, folder, name) for folder in (builder.name, "") for name in names
    ]
    if info and info.filename:
      candidates.append(os.path.join(download_dir, "manual", info.filename))
    if not any(os.path.exists(path) for path in candidates):
      pending.append(url)
  return pending


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
  """Why a download of url cannot start (its host, or the proxy requests would use), or None.

  Looks the host up and opens a TCP connection, giving up after `timeout` seconds:
  DNS lookups have no timeout of their own, so the attempt runs in a thread.
  """
  import requests  # pylint: disable=import-outside-toplevel

  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
  via = ""
  proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
  if proxy:
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    via = f" through the proxy {proxy_parts.hostname}:{proxy_parts.port or 80}"
    host, port = proxy_parts.hostname, proxy_parts.port or 80
  outcome: list[BaseException | None] = []

  def attempt():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome.append(None)
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append(e)

  thread = threading.Thread(target=attempt, daemon=True)  # daemon: a hung lookup never blocks exit
  thread.start()
  thread.join(timeout + 0.5)
  target = f"{url}{via}"
  if not outcome:
    return f"{target}: no answer from {host}:{port} within {timeout:.0f} s"
  error = outcome[0]
  if error is None:
    return None
  if isinstance(error, socket.gaierror):
    return f"{target}: the name {host} does not resolve ({error.strerror or error})"
  if isinstance(error, ConnectionRefusedError):
    return f"{target}: {host}:{port} refused the connection"
  if isinstance(error, (socket.timeout, TimeoutError)):
    return f"{target}: no answer from {host}:{port} within {timeout:.0f} s"
  if isinstance(error, OSError):
    return f"{target}: cannot connect to {host}:{port} ({error.strerror or error})"
  raise error


def _decode_split(
  spec: DatasetSpec, builder, split: str, classes: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """array_record: decoded without TensorFlow; tfrecord: with tf.data. With `classes`, the
  examples of labels below it."""
  file_format = _file_format(builder)
  if file_format == "array_record":
    shape = (*spec.image_size, spec.channels)
    with _naming_the_fix(spec, builder):
      images, labels, count = records.decode_split(
        builder, split, shape, crop=spec.varying_size, classes=classes
      )
    _check_count(spec, builder, split, count)
    return images, labels
  if spec.varying_size:  # only the array_record path brings images to one size
    raise DatasetUnavailableError(
      f"dataset {spec.name} is stored as {file_format}, and its images of many sizes are only "
      f"read from array_record; prepare it again: {reprepare_command(spec, builder.data_dir_root)}"
    )
  if file_format != "tfrecord":
    raise DatasetUnavailableError(
      f"dataset {spec.name} is stored as {file_format}, and only array_record and tfrecord "
      f"are read; prepare it again: {reprepare_command(spec, builder.data_dir_root)}"
    )
  return _of_classes(*_decode_split_tf(spec, builder, split), classes)


def _check_count(spec: DatasetSpec, builder, split: str, count: int) -> None:
  """The whole split was read: never train on part of it."""
  expected = builder.info.splits[split].num_examples
  if count != expected:
    raise DamagedDatasetError(
      f"dataset {spec.name}: read {count} examples of its {split} split, not the {expected} "
      f"dataset_info.json in {builder.data_path} lists; prepare it again: "
      f"{reprepare_command(spec, builder.data_dir_root)}"
    )


def _decode_split_tf(spec: DatasetSpec, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes with tf.data in parallel, file by file, into preallocated arrays (no second copy).

  A file TensorFlow finds missing, cut short or corrupted (its CRCs) is a DamagedDatasetError.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  info = builder.info.splits[split]
  shape = (*spec.image_size, spec.channels)
  images = np.empty((info.num_examples, *shape), np.uint8)
  labels = np.empty((info.num_examples,), np.int32)
  start = 0
  for path, expected in zip(info.filepaths, info.shard_lengths, strict=True):
    try:
      with _naming_the_fix(spec, builder):
        batches = _tf_batches(spec, builder, path, expected)
      for image_batch, label_batch in tfds.as_numpy(batches):
        stop = start + len(label_batch)
        if stop > len(labels):
          raise _damaged(spec, builder, path, "holds more examples than dataset_info.json lists")
        images[start:stop], labels[start:stop] = image_batch, label_batch
        start = stop
    except (tf.errors.DataLossError, tf.errors.NotFoundError) as e:
      raise _damaged(spec, builder, path, f"is cut short or corrupted ({_tf_reason(e)})") from None
  _check_count(spec, builder, split, start)
  return images, labels


def _tf_batches(spec: DatasetSpec, builder, path, expected: int):
  """Batches of (image, label) of one split file, as a tf.data pipeline."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  info = builder.info
  image_key, label_key = info.supervised_keys
  if _file_format(builder) == "array_record":  # tf.data cannot read it: take the raw records
    # tf.constant first: from_tensor_slices on a list of 100k bytes takes seconds.
    examples = tf.data.Dataset.from_tensor_slices(
      tf.constant(records.read_array_record(path, expected))
    )
  else:
    examples = tf.data.TFRecordDataset(os.fspath(path))
  # TFDS stores the image as bytes and the label as int64: parse whole batches.
  keys = {
    image_key: tf.io.FixedLenFeature([], tf.string),
    label_key: tf.io.FixedLenFeature([], tf.int64),
  }
  shape = (*spec.image_size, spec.channels)
  decode = _image_decoder(info.features[image_key].encoding_format, spec.channels)

  # Plain graph functions: AutoGraph would write their converted source to the temporary
  # directory, removed only by an exit handler that an error line's prompt exit skips.
  @tf.autograph.experimental.do_not_convert
  def parse(batch):
    return tf.io.parse_example(batch, keys)

  @tf.autograph.experimental.do_not_convert
  def to_pair(example):
    image = tf.ensure_shape(decode(example[image_key]), shape)
    return image, tf.cast(example[label_key], tf.int32)

  return (
    examples.batch(1024)
    .map(parse)
    .unbatch()
    .map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)
    .batch(2048)
    .prefetch(2)
  )


def _tf_reason(error) -> str:
  """TensorFlow's message without its op and function names."""
  message = re.sub(r"\{\{.*?\}\}", "", error.message)
  return _one_line(re.sub(r"\[Op:.*", "", message)) or type(error).__name__


def _image_decoder(encoding_format: str | None, channels: int):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if encoding_format == "jpeg":
    # INTEGER_ACCURATE is libjpeg's default, so pixels match PIL's decode of the same bytes.
    return lambda data: tf.io.decode_jpeg(data, channels=channels, dct_method="INTEGER_ACCURATE")
  if encoding_format == "png":
    return lambda data: tf.io.decode_png(data, channels=channels)
  return lambda data: tf.io.decode_image(data, channels=channels, expand_animations=False)
