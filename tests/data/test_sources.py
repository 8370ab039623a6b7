"""The dataset registry, digits, and the offline behaviour of load_split / check_available."""

import dataclasses
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lkca_jax import data


@pytest.fixture
def no_network(monkeypatch):
  """Any Python-level connection or DNS lookup fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def test_registry_matches_the_published_sources():
  # TFDS cifar10, cifar100, svhn_cropped (train / test); our Tiny-ImageNet builder.
  expected = {
    "cifar10": ("cifar10", 10, (32, 32), "test"),
    "cifar100": ("cifar100", 100, (32, 32), "test"),
    "svhn": ("svhn_cropped", 10, (32, 32), "test"),
    "tiny_imagenet": ("tiny_imagenet", 200, (64, 64), "validation"),
  }
  for name, (tfds_name, classes, size, eval_split) in expected.items():
    spec = data.DATASETS[name]
    assert (
      spec.name,
      spec.tfds_name,
      spec.num_classes,
      spec.image_size,
      spec.channels,
      spec.train_split,
      spec.eval_split,
    ) == (name, tfds_name, classes, size, 3, "train", eval_split)
  digits = data.DATASETS["digits"]
  assert (digits.tfds_name, digits.num_classes, digits.image_size, digits.channels) == (
    None,
    10,
    (8, 8),
    1,
  )
  with pytest.raises(dataclasses.FrozenInstanceError):
    digits.num_classes = 3


def test_unknown_dataset_lists_the_registered_names():
  with pytest.raises(ValueError, match="choose one of .*cifar10.*digits.*tiny_imagenet"):
    data.load_split("imagenet21k", "train")
  with pytest.raises(ValueError, match="choose one of"):
    data.check_available("mnist", data_dir=None, manual_dir=None, download=False)


def test_import_is_tf_free():
  code = (
    "import sys, lkca_jax.data; "
    "print(sorted(m for m in sys.modules "
    "if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_digits_split_sizes_stratified_and_deterministic():
  from sklearn.datasets import load_digits

  full = load_digits()
  x_train, y_train = data.load_split("digits", "train")
  x_test, y_test = data.load_split("digits", "test")
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32 and y_test.dtype == np.int32
  assert x_train.max() == 255 and x_train.min() == 0 and x_test.max() == 255
  # Stratified: each class's test share is 20% of that class, within one image.
  for c in range(10):
    total = int((full.target == c).sum())
    assert abs(int((y_test == c).sum()) - 0.2 * total) <= 1
    assert int((y_train == c).sum()) + int((y_test == c).sum()) == total
  # Deterministic across calls, and callers get their own copies.
  again_x, again_y = data.load_split("digits", "train")
  np.testing.assert_array_equal(again_x, x_train)
  np.testing.assert_array_equal(again_y, y_train)
  again_x[:] = 7
  np.testing.assert_array_equal(data.load_split("digits", "train")[0], x_train)


def test_digits_are_the_sklearn_images_scaled_to_uint8():
  from sklearn.datasets import load_digits

  full = load_digits()
  table = np.array([round(v * 255 / 16) for v in range(17)], np.uint8)
  assert table[16] == 255 and table[8] == 128  # 127.5 rounds to even
  scaled = table[full.images.astype(int)]
  x = np.concatenate([data.load_split("digits", s)[0][..., 0] for s in ("train", "test")])
  y = np.concatenate([data.load_split("digits", s)[1] for s in ("train", "test")])

  # train + test is exactly the full set, image with its label, in some order.
  def rows(images, labels):
    flat = np.concatenate(
      [images.reshape(len(images), -1), labels[:, None].astype(np.uint8)], axis=1
    )
    return flat[np.lexsort(flat.T[::-1])]

  np.testing.assert_array_equal(rows(x, y), rows(scaled, full.target))


def test_digits_unknown_split():
  with pytest.raises(ValueError, match="choose one of"):
    data.load_split("digits", "validation")


def test_unprepared_tfds_dataset_fails_fast_offline(tmp_path, no_network):
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_split("cifar10", "train", data_dir=tmp_path, download=False)
  assert time.perf_counter() - start < 10
  message = str(info.value)
  assert "\n" not in message
  assert "cifar10" in message and str(tmp_path) in message
  assert "--config.dataset.data_dir" in message and "--config.dataset.download=True" in message
  assert isinstance(info.value, ValueError)
  # Nothing was written where we looked.
  assert list(tmp_path.iterdir()) == []


def test_check_available_is_cheap_and_names_the_tiny_imagenet_fixes(
  tmp_path, no_network, monkeypatch
):
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_available("tiny_imagenet", data_dir=tmp_path, manual_dir=None, download=False)
  assert time.perf_counter() - start < 10
  message = str(info.value)
  for fix in (
    "--config.dataset.data_dir",
    "--config.dataset.manual_dir",
    "--config.dataset.download=True",
    "LKCA_TINY_IMAGENET_ZIP",
    "tiny-imagenet-200.zip",
  ):
    assert fix in message
  # Non-TFDS sources are always available (with download=True, a TFDS dataset's download
  # host is tried: tests/data/test_offline_archives.py).
  data.check_available("digits", data_dir=tmp_path, manual_dir=None, download=False)


def test_a_zip_variable_that_names_no_file_is_refused_naming_it(tmp_path, no_network, monkeypatch):
  monkeypatch.setenv("LKCA_TINY_IMAGENET_ZIP", str(tmp_path / "moved.zip"))
  expected = (
    f"dataset tiny_imagenet: LKCA_TINY_IMAGENET_ZIP={tmp_path / 'moved.zip'} is not a file; "
    "point it at tiny-imagenet-200.zip or unset it"
  )
  for call in (data.check_available, data.load_split):
    args = ("tiny_imagenet",) if call is data.check_available else ("tiny_imagenet", "train")
    with pytest.raises(data.DatasetUnavailableError) as info:
      call(*args, data_dir=tmp_path / "tfds", download=True)
    assert str(info.value) == expected


def test_manual_dir_without_the_zip_is_refused_before_any_download(
  tmp_path, no_network, monkeypatch
):
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "something-else.zip").write_bytes(b"")
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_available("tiny_imagenet", data_dir=tmp_path, manual_dir=manual, download=True)
  # Named as the training commands take it (the prepare command names its own flag).
  assert f"--config.dataset.manual_dir={manual} holds no tiny-imagenet-200.zip" in str(info.value)
  with pytest.raises(data.DatasetUnavailableError, match="LKCA_TINY_IMAGENET_ZIP"):
    data.load_split("tiny_imagenet", "train", data_dir=tmp_path, manual_dir=manual, download=True)
