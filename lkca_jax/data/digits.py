"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale images, 10 classes, no download.

The split is fixed: a stratified 80/20 `train_test_split(random_state=0)`, so
train has 1,437 images and test 360. Pixel values 0..16 become uint8 by
round(v * 255 / 16), so 16 maps to 255.
"""

from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "test")


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 8, 8, 1), int32 labels (N,)) of "train" or "test"; fresh copies."""
  if split not in SPLITS:
    raise ValueError(f"digits has no split {split!r}: choose one of {list(SPLITS)}")
  images, labels = _splits()[split]
  return images.copy(), labels.copy()


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = train_test_split(
    np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
  )
  return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
