"""The Tiny-ImageNet TFDS builder, prepared from the fixture zip (and the real zip when given).

Labels and pixels are checked against the zip itself, read with zipfile + PIL:
each decoded image is matched to its source JPEG by content, so the checks do
not depend on the order TFDS stores examples in. RGB JPEGs are stored byte for
byte and decode exactly as PIL decodes them; grayscale ones are re-encoded as
RGB JPEG (quality 100), so they may differ from PIL's decode by 1 level.
"""

import io
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from lkca_jax import data
from tests.helpers import (
  FIXTURE_FORMATS,
  FIXTURE_ZIP,
  format_param,
  manual_dir_with,
  prepared_fixture,
  tfds_builder,
)

ROOT = "tiny-imagenet-200/"
GRAY_TOLERANCE = 1  # max |level| difference after re-encoding a grayscale JPEG as RGB


def read_wnids(archive):
  return archive.read(ROOT + "wnids.txt").decode().split()


def val_annotations(archive):
  lines = archive.read(ROOT + "val/val_annotations.txt").decode().splitlines()
  return [tuple(line.split("\t")[:2]) for line in lines if line.strip()]


def pil_decode(archive, member):
  with Image.open(io.BytesIO(archive.read(member))) as image:
    return image.mode, np.asarray(image.convert("RGB"))


def find_row(images, reference, tolerance):
  """Index of the one image in `images` within `tolerance` of `reference`."""
  reference = reference.astype(np.int16)

  def close(candidates, rows_of_pixels):
    diff = np.abs(images[candidates, :rows_of_pixels].astype(np.int16) - reference[:rows_of_pixels])
    return candidates[diff.reshape(len(candidates), -1).max(axis=1) <= tolerance]

  # First pixel row only, then whole images: cheap even on the 1.2 GB train split.
  rows = close(close(np.arange(len(images)), 1), images.shape[1])
  assert len(rows) == 1, f"{len(rows)} matching images"
  return rows[0]


def test_embedded_wnids_equal_the_official_file():
  from lkca_jax.data import tiny_imagenet

  with zipfile.ZipFile(FIXTURE_ZIP) as archive:  # the fixture keeps the full wnids.txt
    assert list(tiny_imagenet.WNIDS) == read_wnids(archive)
  assert len(set(tiny_imagenet.WNIDS)) == 200


def test_builder_is_registered_and_describes_itself_offline(tmp_path):
  from lkca_jax.data import tiny_imagenet

  builder = tfds_builder("tiny_imagenet", data_dir=tmp_path)
  assert isinstance(builder, tiny_imagenet.TinyImagenet)
  assert str(builder.version) == "1.0.0"
  features = builder.info.features
  assert features["label"].names == list(tiny_imagenet.WNIDS)
  assert features["image"].shape == (64, 64, 3) and features["image"].encoding_format == "jpeg"
  assert "file_name" in features
  assert not builder.is_prepared()


@pytest.fixture(scope="module", params=[format_param(f) for f in FIXTURE_FORMATS])
def fixture_dataset(request, tmp_path_factory):
  """The fixture zip prepared through the real builder: (format, data_dir)."""
  data_dir = prepared_fixture(tmp_path_factory, request.param)
  files = os.listdir(data_dir / "tiny_imagenet" / "1.0.0")
  assert any(f".{request.param}-" in name for name in files), files
  return request.param, data_dir


def test_fixture_splits_shapes_and_label_counts(fixture_dataset):
  _, data_dir = fixture_dataset
  expected_per_class = {"train": 12, "validation": 5}
  for split, per_class in expected_per_class.items():
    images, labels = data.load_split("tiny_imagenet", split, data_dir=data_dir)
    assert images.shape == (4 * per_class, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (4 * per_class,) and labels.dtype == np.int32
    values, counts = np.unique(labels, return_counts=True)
    assert values.tolist() == [0, 1, 2, 199] and counts.tolist() == [per_class] * 4


def test_fixture_pixels_and_labels_match_the_zip(fixture_dataset):
  _, data_dir = fixture_dataset
  with zipfile.ZipFile(FIXTURE_ZIP) as archive:
    wnids = read_wnids(archive)
    # validation: every image of val_annotations.txt, with its annotated wnid's index.
    images, labels = data.load_split("tiny_imagenet", "validation", data_dir=data_dir)
    gray_seen = 0
    for file_name, wnid in val_annotations(archive):
      mode, reference = pil_decode(archive, ROOT + "val/images/" + file_name)
      row = find_row(images, reference, GRAY_TOLERANCE if mode == "L" else 0)
      assert labels[row] == wnids.index(wnid)
      if mode == "L":
        gray_seen += 1
        assert (images[row, ..., 0] == images[row, ..., 1]).all()
        assert (images[row, ..., 0] == images[row, ..., 2]).all()
    assert gray_seen == 1  # val_116.JPEG
    # train: label is the index of the folder's wnid.
    images, labels = data.load_split("tiny_imagenet", "train", data_dir=data_dir)
    members = [
      m for m in archive.namelist() if m.startswith(ROOT + "train/") and m.endswith(".JPEG")
    ]
    assert len(members) == 48
    gray_seen = 0
    for member in members:
      mode, reference = pil_decode(archive, member)
      row = find_row(images, reference, GRAY_TOLERANCE if mode == "L" else 0)
      assert labels[row] == wnids.index(member.split("/")[2])
      if mode == "L":
        gray_seen += 1
        assert np.ptp(images[row].astype(int), axis=-1).max() == 0  # 3 equal channels
    assert gray_seen == 1  # n04540053_142.JPEG


def test_known_val_file_label(fixture_dataset):
  """val_1.JPEG is annotated n04067472, the 2nd line of wnids.txt: label 1."""
  _, data_dir = fixture_dataset
  with zipfile.ZipFile(FIXTURE_ZIP) as archive:
    assert dict(val_annotations(archive))["val_1.JPEG"] == "n04067472"
    assert read_wnids(archive).index("n04067472") == 1
    _, reference = pil_decode(archive, ROOT + "val/images/val_1.JPEG")
  images, labels = data.load_split("tiny_imagenet", "validation", data_dir=data_dir)
  assert labels[find_row(images, reference, 0)] == 1


def test_prepared_data_loads_with_no_network(fixture_dataset, monkeypatch):
  import socket

  def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  _, data_dir = fixture_dataset
  data.check_available("tiny_imagenet", data_dir=data_dir, manual_dir=None, download=False)
  images, labels = data.load_split("tiny_imagenet", "validation", data_dir=data_dir, download=False)
  assert len(images) == len(labels) == 20
  with pytest.raises(ValueError, match="no split 'test'"):
    data.load_split("tiny_imagenet", "test", data_dir=data_dir)


def test_download_true_prepares_from_the_manual_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  manual = manual_dir_with(tmp_path)
  with pytest.raises(data.DatasetUnavailableError):
    data.load_split("tiny_imagenet", "validation", data_dir=tmp_path / "tfds", manual_dir=manual)
  images, labels = data.load_split(
    "tiny_imagenet", "validation", data_dir=tmp_path / "tfds", manual_dir=manual, download=True
  )
  assert images.shape == (20, 64, 64, 3) and sorted(set(labels.tolist())) == [0, 1, 2, 199]


FULL_ZIP = os.environ.get("LKCA_TINY_IMAGENET_ZIP")


def stored_examples(data_dir, split):
  """(file name, label, image bytes) of every record of a prepared split, in record order."""
  from tensorflow_datasets.proto import tf_example_pb2

  from lkca_jax.data import records

  info = tfds_builder("tiny_imagenet", data_dir=data_dir).info.splits[split]
  out = []
  for path, count in zip(info.filepaths, info.shard_lengths, strict=True):
    for record in records.read_array_record(path, count):
      feature = tf_example_pb2.Example.FromString(record).features.feature
      name = feature["file_name"].bytes_list.value[0].decode()
      out.append((name, feature["label"].int64_list.value[0], feature["image"].bytes_list.value[0]))
  return out


@pytest.mark.slow  # every image of the real zip: half a minute
@pytest.mark.skipif(
  not FULL_ZIP or not os.path.isfile(FULL_ZIP),
  reason="set LKCA_TINY_IMAGENET_ZIP to the real tiny-imagenet-200.zip",
)
def test_full_zip(tmp_path):
  """Every record of the real zip prepared: its file, label and image bytes against the zip.

  Each record is checked without decoding all 110,000 images: its JPEG header (RGB,
  64x64: what the loader decodes to) and its bytes, equal to the zip member's unless that
  is grayscale. Pixels are compared where they can change (all grayscale images) and,
  through `load_split`, for every image of two classes.
  """
  # manual_dir=None: the builder reads $LKCA_TINY_IMAGENET_ZIP.
  sizes = data.prepare("tiny_imagenet", data_dir=tmp_path, manual_dir=None)
  assert sizes == {"train": 100_000, "validation": 10_000}

  with zipfile.ZipFile(FULL_ZIP) as archive:
    from lkca_jax.data import tiny_imagenet

    wnids = read_wnids(archive)
    assert wnids == list(tiny_imagenet.WNIDS)
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    # {file name: (wnid, zip member)}: train from the folders, validation from the annotations.
    truth = {
      "train": {
        member.split("/")[-1]: (member.split("/")[2], member)
        for member in archive.namelist()
        if member.startswith(ROOT + "train/") and member.endswith(".JPEG")
      },
      "validation": {
        name: (wnid, ROOT + "val/images/" + name) for name, wnid in val_annotations(archive)
      },
    }
    grey = 0
    for split, per_class in (("train", 500), ("validation", 50)):
      examples = stored_examples(tmp_path, split)
      assert sorted(name for name, _, _ in examples) == sorted(truth[split])  # each file once
      labels = np.asarray([label for _, label, _ in examples])
      assert np.bincount(labels, minlength=200).tolist() == [per_class] * 200
      for name, label, image in examples:
        wnid, member = truth[split][name]
        assert label == label_of[wnid], name
        with Image.open(io.BytesIO(image)) as stored:
          assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (64, 64)), name
        source = archive.read(member)
        if image != source:  # re-encoded: only a grayscale JPEG, within 1 level, grey
          grey += 1
          mode, reference = pil_decode(archive, member)
          assert mode == "L", name
          pixels = np.asarray(Image.open(io.BytesIO(image)))
          assert np.ptp(pixels.astype(int), axis=-1).max() == 0, name
          assert np.abs(pixels.astype(int) - reference).max() <= GRAY_TOLERANCE, name
      # The loader: every image of classes 0 and 1, in record order, as PIL decodes its record.
      images, loaded = data.load_split("tiny_imagenet", split, data_dir=tmp_path, classes=2)
      kept = np.flatnonzero(labels < 2)
      assert len(kept) == 2 * per_class
      np.testing.assert_array_equal(loaded, labels[kept])
      for image, k in zip(images, kept, strict=True):
        with Image.open(io.BytesIO(examples[k][2])) as stored:
          np.testing.assert_array_equal(image, np.asarray(stored), err_msg=examples[k][0])
    assert grey == 1989  # the zip's grayscale JPEGs; every other image is stored as it was
  shutil.rmtree(tmp_path, ignore_errors=True)
