"""SVHN (cropped digits) through TFDS, prepared online or from files downloaded by hand.

Online, preparing is TFDS's own catalog builder `svhn_cropped`. With the
official `train_32x32.mat` and `test_32x32.mat` in the manual dir,
`manual_builder` returns a subclass of that catalog builder (same registered
name, version and features) whose splits read those files with the catalog's
own example generator. `extra_32x32.mat` (1.3 GB, 531,131 images the
training here does not use) adds the `extra` split when it is there too;
without it the prepared copy has train and test only.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.datasets.svhn_cropped import svhn_cropped_dataset_builder as tfds_svhn

from lkca_jax.data.sources import DatasetUnavailableError

REQUIRED = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
OPTIONAL = {"extra": "extra_32x32.mat"}


def _files(manual_dir) -> dict[str, str]:
  """{split: path} of the .mat files present in manual_dir."""
  if manual_dir is None:
    return {}
  paths = {
    split: os.path.join(os.fspath(manual_dir), name)
    for split, name in {**REQUIRED, **OPTIONAL}.items()
  }
  return {split: path for split, path in paths.items() if os.path.isfile(path)}


def manual_dir_problem(manual_dir, tfds_name: str, flag: str) -> str | None:
  """Why preparing from manual_dir (given as `flag`) cannot work, or None; checked before
  any download starts."""
  del tfds_name
  missing = [name for split, name in REQUIRED.items() if split not in _files(manual_dir)]
  if missing:
    return (
      f"{flag}={manual_dir} holds no {' and no '.join(missing)}: put "
      f"the official {' and '.join(REQUIRED.values())} there"
    )
  return None


def manual_builder(tfds_name: str, manual_dir, data_dir):
  """A builder that prepares from the .mat files in manual_dir, or None when there are none."""
  del tfds_name
  files = _files(manual_dir)
  if not all(split in files for split in REQUIRED):
    return None
  return ManualSvhnCropped(files=files, data_dir=data_dir)


def _check_mat(path: str) -> None:
  """X (32, 32, 3, N) and y (N, 1) by the file's headers, before the catalog loads it whole."""
  from scipy import io as scipy_io  # pylint: disable=import-outside-toplevel

  try:
    shapes = {name: shape for name, shape, _ in scipy_io.whosmat(path)}
  except Exception as e:  # scipy raises IndexError, ValueError... on a file that is not MATLAB's
    raise DatasetUnavailableError(
      f"{path} is not a MATLAB file ({e}): use the official {os.path.basename(path)}"
    ) from None
  x, y = shapes.get("X"), shapes.get("y")
  if x is None or y is None or tuple(x[:3]) != (32, 32, 3) or tuple(y) != (x[3], 1):
    raise DatasetUnavailableError(
      f"{path} holds {shapes}, not X (32, 32, 3, N) and y (N, 1): "
      f"use the official {os.path.basename(path)}"
    )


class ManualSvhnCropped(tfds_svhn.Builder, skip_registration=True):
  """TFDS `svhn_cropped` 3.1.0, prepared from the official .mat files."""

  name = "svhn_cropped"
  # The catalog's folder: its checksums, README and citation, not ours.
  code_path = tfds_svhn.Builder.code_path
  pkg_dir_path = tfds_svhn.Builder._get_pkg_dir_path()  # pylint: disable=protected-access

  def __init__(self, *, files: dict[str, str], **kwargs):
    self._files = files
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    for path in self._files.values():
      _check_mat(path)
    if "extra" not in self._files:
      logging.warning(
        "svhn_cropped: no %s in the manual dir, so the prepared copy has no "
        "'extra' split (training uses train and test)",
        OPTIONAL["extra"],
      )
    return [
      tfds.core.SplitGenerator(name=split, gen_kwargs=dict(split_prefix=f"{split}_", filepath=path))
      for split, path in self._files.items()
    ]
