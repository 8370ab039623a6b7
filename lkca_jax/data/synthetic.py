"""`synthetic_cifar`: deterministic random CIFAR-shaped data, for benchmarks without TFDS.

Images are uniform random uint8 (32, 32, 3), labels uniform over 10 classes,
drawn from a fixed seed per split, so every call returns the same arrays on
every machine (numpy's PCG64 stream is platform-independent). The content is
noise: good for timing the trainer (`python -m lkca_jax.tools.bench_step`) on a
machine without TensorFlow, not for accuracy.
"""

from __future__ import annotations

import functools

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 5_000, "test": 1_000}
_SEEDS = {"train": 0, "test": 1}


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 32, 32, 3), int32 labels (N,)) of "train" or "test"; fresh copies."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"synthetic_cifar has no split {split!r}: choose one of {list(SPLIT_SIZES)}")
  images, labels = _split(split)
  return images.copy(), labels.copy()


@functools.cache
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(_SEEDS[split])
  count = SPLIT_SIZES[split]
  images = rng.integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, count, dtype=np.int32)
  return images, labels
