"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale images, 10 classes, no download.

The split is fixed: a stratified 80/20 `train_test_split(random_state=0)`, so
train has 1,437 images and test 360. Pixel values 0..16 become uint8 by
round(v * 255 / 16), so 16 maps to 255.

The split is kept in a cache file after its first load: importing scikit-learn
takes longer than a short run's training, and every run would pay it again.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import os
import zipfile

import numpy as np

from lkca_jax.files import cache_dir, write_atomic

SPLITS = ("train", "test")


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 8, 8, 1), int32 labels (N,)) of "train" or "test"; fresh copies."""
  if split not in SPLITS:
    raise ValueError(f"digits has no split {split!r}: choose one of {list(SPLITS)}")
  images, labels = _splits()[split]
  return images.copy(), labels.copy()


def cache_file() -> str:
  """The split's cache file in `files.cache_dir()`, named by the scikit-learn version that
  made it."""
  version = importlib.metadata.version("scikit-learn")
  return os.path.join(cache_dir(), f"digits-split-sklearn-{version}.npz")


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  path = cache_file()
  try:
    with np.load(path) as kept:
      return {s: (kept[f"{s}_images"], kept[f"{s}_labels"]) for s in SPLITS}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    pass  # no cache yet, or an unreadable one: made again below and written over it
  splits = _split_with_sklearn()
  buffer = io.BytesIO()
  arrays = {}
  for s in SPLITS:
    arrays[f"{s}_images"], arrays[f"{s}_labels"] = splits[s]
  np.savez(buffer, **arrays)
  try:
    write_atomic(path, buffer.getvalue())
  except OSError:
    pass  # a read-only home: the split is right, it is only made again next time
  return splits


def _split_with_sklearn() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = train_test_split(
    np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
  )
  return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
