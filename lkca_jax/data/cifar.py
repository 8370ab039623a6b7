"""CIFAR-10 and CIFAR-100 through TFDS, prepared online or from an archive downloaded by hand.

Online, preparing is TFDS's own catalog builder (`cifar10`, `cifar100`). With
an official archive in the manual dir, `manual_builder` returns a subclass of
that catalog builder, with the same registered name, version, features and
splits, that reads the archive without extracting it. Either archive format
works:

  CIFAR-10:  cifar-10-binary.tar.gz  (cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin)
             cifar-10-python.tar.gz  (cifar-10-batches-py/data_batch_{1..5}, test_batch)
  CIFAR-100: cifar-100-binary.tar.gz (cifar-100-binary/train.bin, test.bin)
             cifar-100-python.tar.gz (cifar-100-python/train, test)

Examples get the keys and ids the catalog builder gives them (index within
the split, "train_00000"), and label names come from the archive's own label
files, so the prepared copy is interchangeable with one prepared online.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from lkca_jax.data.sources import DatasetUnavailableError

IMAGE_BYTES = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class ArchiveLayout:
  """Where one archive format keeps its splits and label names."""

  file_name: str
  folder: str
  train: tuple[str, ...]
  test: tuple[str, ...]
  labels: tuple[str, ...]  # binary: a names file per label key; python: the meta pickle
  pickled: bool


@dataclasses.dataclass(frozen=True)
class Variant:
  """One of CIFAR-10 / CIFAR-100: its label keys and archives."""

  tfds_name: str
  # Label keys in record order: TFDS's names, the python pickle's keys, the meta pickle's keys.
  label_keys: tuple[str, ...]
  pickle_label_keys: tuple[bytes, ...]
  pickle_name_keys: tuple[bytes, ...]
  layouts: tuple[ArchiveLayout, ...]

  @property
  def file_names(self) -> tuple[str, ...]:
    return tuple(layout.file_name for layout in self.layouts)


_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10 = Variant(
  "cifar10",
  ("label",),
  (b"labels",),
  (b"label_names",),
  (
    ArchiveLayout(
      "cifar-10-binary.tar.gz",
      "cifar-10-batches-bin",
      tuple(f"{b}.bin" for b in _BATCHES),
      ("test_batch.bin",),
      ("batches.meta.txt",),
      pickled=False,
    ),
    ArchiveLayout(
      "cifar-10-python.tar.gz",
      "cifar-10-batches-py",
      _BATCHES,
      ("test_batch",),
      ("batches.meta",),
      pickled=True,
    ),
  ),
)
CIFAR100 = Variant(
  "cifar100",
  ("coarse_label", "label"),
  (b"coarse_labels", b"fine_labels"),
  (b"coarse_label_names", b"fine_label_names"),
  (
    ArchiveLayout(
      "cifar-100-binary.tar.gz",
      "cifar-100-binary",
      ("train.bin",),
      ("test.bin",),
      ("coarse_label_names.txt", "fine_label_names.txt"),
      pickled=False,
    ),
    ArchiveLayout(
      "cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), ("meta",), pickled=True
    ),
  ),
)
VARIANTS = {variant.tfds_name: variant for variant in (CIFAR10, CIFAR100)}


def find_archive(variant: Variant, manual_dir) -> tuple[str, ArchiveLayout] | None:
  """(path, layout) of the first official archive in manual_dir, or None."""
  if manual_dir is None:
    return None
  for layout in variant.layouts:
    path = os.path.join(os.fspath(manual_dir), layout.file_name)
    if os.path.isfile(path):
      return path, layout
  return None


def manual_dir_problem(manual_dir, tfds_name: str, flag: str) -> str | None:
  """Why preparing from manual_dir (given as `flag`) cannot work, or None; checked before
  any download starts."""
  variant = VARIANTS[tfds_name]
  if find_archive(variant, manual_dir) is None:
    return (
      f"{flag}={manual_dir} holds no {' or '.join(variant.file_names)}: "
      f"put the official archive there, unextracted"
    )
  return None


def manual_builder(tfds_name: str, manual_dir, data_dir):
  """A builder that prepares from the archive in manual_dir, or None when there is none."""
  found = find_archive(VARIANTS[tfds_name], manual_dir)
  if found is None:
    return None
  builder_cls = {"cifar10": ManualCifar10, "cifar100": ManualCifar100}[tfds_name]
  return builder_cls(archive=found[0], layout=found[1], data_dir=data_dir)


class _SafeUnpickler(pickle.Unpickler):
  """Loads the CIFAR pickles (dicts, lists, numpy arrays) and refuses any other class."""

  # _codecs.encode: how Python 3 writes bytes into a protocol 2 pickle.
  _ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a CIFAR pickle")
    if module == "numpy.core.multiarray":  # the Python 2 era name; numpy 2 warns on it
      module = "numpy._core.multiarray"
    return super().find_class(module, name)


def _unpickle(data: bytes, where: str, keys: tuple[bytes, ...]) -> dict:
  """The pickled dict, which must hold `keys`."""
  try:
    # The official pickles come from Python 2: keys and strings are bytes.
    loaded = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise DatasetUnavailableError(
      f"{where} is not a CIFAR pickle ({e}): use the official, unmodified archive"
    ) from None
  missing = [key for key in keys if not isinstance(loaded, dict) or key not in loaded]
  if missing:
    raise DatasetUnavailableError(
      f"{where} lacks {b', '.join(missing).decode()}: use the official, unmodified archive"
    )
  return loaded


def _open(path: str) -> tarfile.TarFile:
  try:
    return tarfile.open(path, "r:gz")
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DatasetUnavailableError(
      f"{path} is not a readable .tar.gz ({e}): download the official archive again"
    ) from None


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
  """One file of the archive; a missing or damaged one says which archive to fetch again."""
  try:
    member = archive.extractfile(name)
    data = member.read() if member is not None else None
  except KeyError:
    data = None
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DatasetUnavailableError(
      f"{archive.name}: cannot read {name} ({e}): download the official archive again"
    ) from None
  if data is None:
    raise DatasetUnavailableError(
      f"{archive.name} has no file {name}: use the official, unmodified archive"
    )
  return data


def _label_names(
  archive: tarfile.TarFile, variant: Variant, layout: ArchiveLayout
) -> list[list[str]]:
  """Label names per label key (variant.label_keys order), from the archive's own files."""
  if layout.pickled:
    where = f"{archive.name}: {layout.folder}/{layout.labels[0]}"
    meta = _unpickle(
      _read_member(archive, f"{layout.folder}/{layout.labels[0]}"), where, variant.pickle_name_keys
    )
    return [[name.decode() for name in meta[key]] for key in variant.pickle_name_keys]
  return [
    [name for name in _read_member(archive, f"{layout.folder}/{file}").decode().split("\n") if name]
    for file in layout.labels
  ]


def _records(archive: tarfile.TarFile, variant: Variant, layout: ArchiveLayout, file: str):
  """(labels (N, keys) uint8, images (N, 32, 32, 3) uint8) of one batch file."""
  data = _read_member(archive, f"{layout.folder}/{file}")
  count = len(variant.label_keys)
  if layout.pickled:
    batch = _unpickle(
      data, f"{archive.name}: {layout.folder}/{file}", (b"data", *variant.pickle_label_keys)
    )
    flat = np.asarray(batch[b"data"], np.uint8).reshape(-1, IMAGE_BYTES)
    labels = np.stack([np.asarray(batch[key], np.int64) for key in variant.pickle_label_keys], 1)
  else:
    if len(data) % (count + IMAGE_BYTES):
      raise DatasetUnavailableError(
        f"{archive.name}: {file} is not a whole number of {count + IMAGE_BYTES}-byte records: "
        "use the official, unmodified archive"
      )
    rows = np.frombuffer(data, np.uint8).reshape(-1, count + IMAGE_BYTES)
    labels, flat = rows[:, :count].astype(np.int64), rows[:, count:]
  if len(labels) != len(flat):
    raise DatasetUnavailableError(
      f"{archive.name}: {file} has {len(flat)} images but {len(labels)} labels"
    )
  return labels, flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored CHW


class _ManualCifarMixin:
  """Feeds the catalog builder's splits from a local archive instead of the download."""

  variant: Variant

  def __init__(self, *, archive: str, layout: ArchiveLayout, **kwargs):
    self._archive = archive
    self._layout = layout
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    with _open(self._archive) as archive:
      names = _label_names(archive, self.variant, self._layout)
    for key, key_names in zip(self.variant.label_keys, names, strict=True):
      if len(key_names) != self.info.features[key].num_classes:
        raise DatasetUnavailableError(
          f"{self._archive} names {len(key_names)} classes for {key!r}, not "
          f"{self.info.features[key].num_classes}: use the official, unmodified archive"
        )
      self.info.features[key].names = key_names  # as the catalog builder does from the download
    return {
      tfds.Split.TRAIN: self._generate_from_archive("train_", self._layout.train),
      tfds.Split.TEST: self._generate_from_archive("test_", self._layout.test),
    }

  def _generate_from_archive(self, split_prefix: str, files: tuple[str, ...]):
    index = 0  # the catalog's keys and ids: the running index within the split
    with _open(self._archive) as archive:
      for file in files:
        labels, images = _records(archive, self.variant, self._layout, file)
        for label_row, image in zip(labels, images, strict=True):
          record = dict(zip(self.variant.label_keys, label_row.tolist(), strict=True))
          record["id"] = f"{split_prefix}{index:05d}"
          record["image"] = image
          yield index, record
          index += 1


class ManualCifar10(_ManualCifarMixin, tfds_cifar.Cifar10, skip_registration=True):
  """TFDS `cifar10` 3.0.2, prepared from cifar-10-{binary,python}.tar.gz."""

  name = "cifar10"
  variant = CIFAR10
  # The catalog's folder: its checksums and metadata, not ours.
  code_path = tfds_cifar.Cifar10.code_path


class ManualCifar100(_ManualCifarMixin, tfds_cifar.Cifar100, skip_registration=True):
  """TFDS `cifar100` 3.0.2, prepared from cifar-100-{binary,python}.tar.gz."""

  name = "cifar100"
  variant = CIFAR100
  code_path = tfds_cifar.Cifar100.code_path
