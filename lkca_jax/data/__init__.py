"""Dataset sources: the registry and whole-split loading into numpy.

The Tiny-ImageNet TFDS builder lives in `lkca_jax.data.tiny_imagenet`; it is
imported (and so registered with TFDS) by the functions here that need it, not
by `import lkca_jax.data`, which stays free of TensorFlow and TFDS.
"""

from lkca_jax.data.sources import (
  DATASETS,
  DamagedDatasetError,
  DatasetSpec,
  DatasetUnavailableError,
  check_available,
  get_spec,
  load_split,
  prepare,
)

__all__ = [
  "DATASETS",
  "DamagedDatasetError",
  "DatasetSpec",
  "DatasetUnavailableError",
  "check_available",
  "get_spec",
  "load_split",
  "prepare",
]
