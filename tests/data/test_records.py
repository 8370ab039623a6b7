"""The TF-free reader of array_record splits gives the TensorFlow path's arrays exactly.

The Tiny-ImageNet fixture zip is prepared in both file formats; the array_record
copy is read by `records` (no TensorFlow) and by the tf.data path, the tfrecord
copy by tf.data, and all three must agree pixel for pixel, label for label.
"""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from lkca_jax import data
from lkca_jax.data import sources
from tests.helpers import FIXTURE_FORMATS, format_param, manual_dir_with, prepared_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPLITS = {"train": 48, "validation": 20}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The fixture zip's data_dir prepared in a given file format."""
  return functools.partial(prepared_fixture, tmp_path_factory)


def test_prepare_writes_array_record_by_default(tmp_path):
  manual = manual_dir_with(tmp_path)
  data.prepare("tiny_imagenet", data_dir=tmp_path / "tfds", manual_dir=manual)
  files = sorted(p.name for p in (tmp_path / "tfds" / "tiny_imagenet" / "1.0.0").iterdir())
  assert any(".array_record-" in name for name in files), files


@pytest.mark.slow  # reads through TensorFlow (see `format_param`)
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_tf_free_arrays_equal_the_tensorflow_path(prepared, split):
  spec = data.get_spec("tiny_imagenet")
  images, labels = data.load_split("tiny_imagenet", split, data_dir=prepared("array_record"))
  assert images.shape == (SPLITS[split], 64, 64, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  # pylint: disable=protected-access
  builder = sources._builder(spec, prepared("array_record"))
  tf_images, tf_labels = sources._decode_split_tf(spec, builder, split)
  np.testing.assert_array_equal(images, tf_images)
  np.testing.assert_array_equal(labels, tf_labels)
  # The tfrecord copy (read through tf.data) holds the same examples in the same order.
  tfrecord_images, tfrecord_labels = data.load_split(
    "tiny_imagenet", split, data_dir=prepared("tfrecord")
  )
  np.testing.assert_array_equal(images, tfrecord_images)
  np.testing.assert_array_equal(labels, tfrecord_labels)


@pytest.mark.parametrize("file_format", [format_param(f) for f in FIXTURE_FORMATS])
def test_a_class_subset_is_the_full_split_filtered(prepared, file_format):
  """With `classes`, array_record decodes only those images: the same arrays as the full
  split's examples of labels below it, in order."""
  images, labels = data.load_split("tiny_imagenet", "train", data_dir=prepared("array_record"))
  keep = labels < 2
  assert 0 < keep.sum() < len(labels)
  some_images, some_labels = data.load_split(
    "tiny_imagenet", "train", data_dir=prepared(file_format), classes=2
  )
  np.testing.assert_array_equal(some_images, images[keep])
  np.testing.assert_array_equal(some_labels, labels[keep])


def test_reading_array_record_never_imports_tensorflow(prepared):
  data_dir = str(prepared("array_record"))
  code = (
    "import sys; from lkca_jax import data; "
    f"x, y = data.load_split('tiny_imagenet', 'train', data_dir={data_dir!r}); "
    "print(len(y), 'tensorflow' in sys.modules)"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["48", "False"]


@pytest.mark.parametrize("transpose", [False, True], ids=["landscape", "portrait"])
def test_centre_crop_keeps_the_centre_of_the_longer_side(transpose):
  """A 200x100 photo at 32 px: the shorter side goes to int(32 / 0.875) = 36, the longer to
  72, and columns 20..51 of 72 stay: 0.28..0.72 of the width, inside the green band 0.2..0.8
  by more than bicubic's reach (2 output pixels = 0.03 of the width)."""
  from PIL import Image

  from lkca_jax.data import records

  pixels = np.zeros((100, 200, 3), np.uint8)
  pixels[:, :40, 0] = 255  # red | green | blue
  pixels[:, 40:160, 1] = 255
  pixels[:, 160:, 2] = 255
  if transpose:
    pixels = pixels.transpose(1, 0, 2).copy()
  cropped = records.centre_crop(Image.fromarray(pixels), (32, 32))
  assert cropped.shape == (32, 32, 3) and cropped.dtype == np.uint8
  np.testing.assert_array_equal(cropped, np.broadcast_to([0, 255, 0], (32, 32, 3)))
