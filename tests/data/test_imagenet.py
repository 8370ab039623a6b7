"""ImageNet-1k prepared by TFDS's own imagenet2012 builder from tars laid out as the official ones.

The tars (tests/data/official_archives.py) hold Tiny-ImageNet JPEGs under the
official names: 4 fixture classes plus the one PNG the official train tar
holds, and the first 10 validation files. They are prepared offline through
this project's `prepare`, with the network blocked, and the records are read
back byte for byte. The labels are ImageNet's: an index into the 1000 wnids
in sorted order, and for validation file k the k-th ground-truth label.
"""

import io

import numpy as np
import pytest
from PIL import Image

from configs import imagenet as imagenet_config
from lkca_jax import data, train
from lkca_jax.data import records
from tests.data import official_archives as archives
from tests.data.test_offline_archives import block_network
from tests.helpers import built_once, with_overrides

# The training wnids' places among the 1000 sorted ones (n02105855: Shetland sheepdog).
TRAIN_LABELS = {
  "n02124075": 285,
  "n02504458": 386,
  "n04067472": 758,
  "n04540053": 890,
  "n02105855": 230,
}
# ILSVRC2012_val_00000001 ... 00000010: sea snake, alp, Shetland sheepdog, soup bowl, cradle,
# garter snake, porcupine, bakery, mousetrap, Angora: the devkit's ground truth, as places
# among the sorted wnids (the devkit numbers classes otherwise).
VAL_LABELS = (65, 970, 230, 809, 516, 57, 334, 415, 674, 332)


def _prepare(folder):
  """(data_dir, {split: size}, what the tars hold), prepared with the network blocked."""
  manual = folder / "manual"
  manual.mkdir()
  written = archives.write_imagenet(manual)
  with pytest.MonkeyPatch.context() as patch:
    block_network(patch)
    sizes = data.prepare("imagenet2012", data_dir=folder / "tfds", manual_dir=manual)
  return folder / "tfds", sizes, written


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return built_once(tmp_path_factory, "imagenet2012", _prepare)


def stored(data_dir, split):
  """{file name: (label, image bytes)} of the prepared split's records."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.proto import tf_example_pb2

  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  info = builder.info.splits[split]
  out = {}
  for path, count in zip(info.filepaths, info.shard_lengths, strict=True):
    for record in records.read_array_record(path, count):
      feature = tf_example_pb2.Example.FromString(record).features.feature
      name = feature["file_name"].bytes_list.value[0].decode()
      out[name] = (feature["label"].int64_list.value[0], feature["image"].bytes_list.value[0])
  return out


def test_the_catalog_builder_prepares_every_image_with_its_imagenet_label(prepared):
  data_dir, sizes, written = prepared
  assert sizes == {"train": 49, "validation": 10}  # 4 classes x 12, the PNG; 10 val files
  train_records = stored(data_dir, "train")
  assert set(train_records) == set(written["train"])
  for name, (label, image) in train_records.items():
    assert label == TRAIN_LABELS[name.split("_")[0]], name
    if name != archives.IMAGENET_PNG:
      assert image == written["train"][name], name  # the JPEG bytes, untouched
  val_records = stored(data_dir, "validation")
  assert sorted(val_records) == sorted(written["validation"])
  for k, name in enumerate(sorted(val_records)):
    label, image = val_records[name]
    assert (label, image) == (VAL_LABELS[k], written["validation"][name]), name


def test_the_png_under_a_jpeg_name_is_stored_as_a_jpeg(prepared):
  data_dir, _, written = prepared
  label, image = stored(data_dir, "train")[archives.IMAGENET_PNG]
  assert written["train"][archives.IMAGENET_PNG][:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(io.BytesIO(image)) as decoded:
    assert (decoded.format, decoded.size) == ("JPEG", archives.IMAGENET_PNG_SIZE)
  assert label == TRAIN_LABELS["n02105855"]


def test_whole_splits_are_centre_cropped_to_the_asked_size(prepared):
  """At 56 px the shorter side goes to int(56 / 0.875) = 64: a 64x64 image is not resampled,
  and the crop is its centre, rows and columns 4..59; the 80x64 one's columns 12..67."""
  data_dir, _, _ = prepared
  for split in ("train", "validation"):
    images, labels = data.load_split("imagenet2012", split, data_dir=data_dir, image_size=56)
    in_order = stored(data_dir, split)  # the records' order, which load_split keeps
    assert images.shape == (len(in_order), 56, 56, 3)
    for image, label, (name, (stored_label, jpeg)) in zip(
      images, labels, in_order.items(), strict=True
    ):
      assert label == stored_label, name
      with Image.open(io.BytesIO(jpeg)) as source:
        pixels = np.asarray(source.convert("RGB"))
      columns = slice(12, 68) if name == archives.IMAGENET_PNG else slice(4, 60)
      np.testing.assert_array_equal(image, pixels[4:60, columns], err_msg=name)


def test_without_the_official_tars_preparing_says_how_to_get_them(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match="has no public download.*manual_dir"):
    data.check_available("imagenet2012", data_dir=tmp_path, download=True)
  with pytest.raises(data.DatasetUnavailableError, match="has no public download"):
    data.prepare("imagenet2012", data_dir=tmp_path)
  (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
  with pytest.raises(
    data.DatasetUnavailableError, match="holds no ILSVRC2012_img_train.tar: put the official"
  ):
    data.prepare("imagenet2012", data_dir=tmp_path / "tfds", manual_dir=tmp_path)
  with pytest.raises(data.DatasetUnavailableError, match="img_train.tar and ILSVRC") as e:
    data.check_available("imagenet2012", data_dir=tmp_path / "tfds", download=False)
  assert "downloads" not in str(e.value)


def test_the_registry_names_the_files_the_catalog_builder_reads():
  import tensorflow_datasets as tfds

  from lkca_jax.data import imagenet

  assert data.DATASETS["imagenet2012"].manual_files == " and ".join(imagenet.FILES)
  instructions = tfds.builder_cls("imagenet2012").MANUAL_DOWNLOAD_INSTRUCTIONS
  assert all(name in instructions for name in imagenet.FILES)


def test_a_tfrecord_copy_is_refused_with_the_command_that_prepares_it_again(prepared, tmp_path):
  data_dir, _, _ = prepared
  manual = data_dir.parent / "manual"
  data.prepare("imagenet2012", data_dir=tmp_path, manual_dir=manual, file_format="tfrecord")
  with pytest.raises(data.DatasetUnavailableError, match="only read from array_record.*--force"):
    data.load_split("imagenet2012", "validation", data_dir=tmp_path)


def small_imagenet_run(data_dir, steps: int):
  """configs/imagenet.py (the DeiT recipe, bfloat16) on a small lkca_s16 at 32x32."""
  return with_overrides(
    imagenet_config.get_config(),
    {
      "dataset.data_dir": str(data_dir),
      "dataset.download": False,
      "dataset.image_size": 32,
      "patch_size": 8,  # a 4x4 grid
      "model_overrides.dim": 32,
      "model_overrides.depth": 1,
      "model_overrides.num_heads": 2,
      "batch_size": 8,
      "num_devices": 1,
      "num_train_steps": steps,
      "log_every_steps": 1,
    },
  )


@pytest.mark.slow
def test_the_imagenet_config_trains_from_the_prepared_tars(prepared, tmp_path):
  data_dir, _, _ = prepared
  run = train.Run.prepare(small_imagenet_run(data_dir, steps=3))
  assert run.spec.image_size == (32, 32) and run.spec.num_classes == 1000
  assert run.model.grid == (4, 4)
  summary = train.train_and_evaluate(run.config, str(tmp_path), run=run)
  assert (summary["step"], summary["dataset"], summary["stopped_by"]) == (3, "imagenet2012", None)
  assert (summary["train_images"], summary["test_images"]) == (49, 10)
  assert summary["steps_per_epoch"] == 49 // 8  # DeiT's epoch: as many samples as images
  (record,) = summary["runs"]
  assert record["died_at_step"] is None  # every loss was finite
  assert round(10 * record["final_top1"], 6) in range(11)  # evaluated on the 10 val images
