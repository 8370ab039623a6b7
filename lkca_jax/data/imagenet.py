"""ImageNet-1k (ILSVRC 2012) through TFDS's catalog builder `imagenet2012`, from the official tars.

ImageNet has no public download: after registering at image-net.org, put the two
official archives, unextracted, in one folder and pass it as manual_dir:

  ILSVRC2012_img_train.tar  (138 GiB: one tar per synset, n01440764.tar ..., of JPEGs)
  ILSVRC2012_img_val.tar    (6.3 GiB: 50,000 JPEGs ILSVRC2012_val_00000001.JPEG ...)

The catalog builder reads them itself (no network) and stores the JPEG bytes as
they are, at their own sizes, apart from its fixes to 22 CMYK JPEGs and one PNG
(re-encoded as RGB JPEGs). Labels index the 1000 wnids in sorted order (TFDS's
bundled labels.txt); validation labels come from TFDS's bundled
validation_labels.txt, line k for the k-th file name in sorted order, so the
validation tar must be the official one, whole.
"""

from __future__ import annotations

import os

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
FILES = (TRAIN_TAR, VAL_TAR)
REGISTER_URL = "https://image-net.org/download-images"


def manual_dir_problem(manual_dir, tfds_name: str, flag: str) -> str | None:
  """Why preparing from manual_dir (given as `flag`) cannot work, or None; checked before
  anything is read."""
  del tfds_name
  if manual_dir is None:
    return (
      f"ImageNet has no public download: register at {REGISTER_URL}, download {TRAIN_TAR} "
      f"and {VAL_TAR}, and pass {flag}=DIR for the folder that holds them"
    )
  missing = [name for name in FILES if not os.path.isfile(os.path.join(manual_dir, name))]
  if missing:
    return (
      f"{flag}={manual_dir} holds no {' and no '.join(missing)}: put the "
      f"official archives there, unextracted (from {REGISTER_URL})"
    )
  return None


def manual_builder(tfds_name: str, manual_dir, data_dir):
  """The catalog builder itself: it reads the tars from the download config's manual_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  del manual_dir  # passed to download_and_prepare by `sources.prepare`
  return tfds.builder(tfds_name, data_dir=os.fspath(data_dir) if data_dir else None)
