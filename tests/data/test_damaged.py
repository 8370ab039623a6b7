"""A prepared dataset whose file is missing, cut short or corrupted: one error that names the
file and the command that prepares it again, and never training on part of a split.

The Tiny-ImageNet fixture zip is prepared once in each file format; each case copies
that and damages a real file of the copy: cuts it in half, inverts bytes inside an image,
deletes it, or rewrites it whole but with half its examples (a valid file TFDS would read
without complaint). Missing, cut and short files are found by the cheap check that runs
before the model is compiled (`check_available`); a changed byte only when the file is read
(Riegeli's hashes, TFRecord's CRCs), which is still before compiling.
"""

import functools
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lkca_jax import data
from tests.helpers import FIXTURE_FORMATS, ROOT, format_param, manual_dir_with, prepared_fixture

DAMAGES = ("cut", "flip", "delete", "short")
SPLITS = {"train": 48, "validation": 20}
JPEG = b"\xff\xd8\xff"  # every example's image is a JPEG: where to change bytes of one
FIX = "python -m lkca_jax.tools.prepare --dataset tiny_imagenet --data_dir {} --force"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The fixture zip's data_dir prepared in a given file format; copy it before damaging."""
  return functools.partial(prepared_fixture, tmp_path_factory)


def copy_of(prepared, file_format, tmp_path):
  data_dir = tmp_path / file_format
  shutil.copytree(prepared(file_format), data_dir)
  return data_dir


def split_file(data_dir, file_format, split="train"):
  folder = data_dir / "tiny_imagenet" / "1.0.0"
  (path,) = folder.glob(f"tiny_imagenet-{split}.{file_format}-*")
  return path


def damage(path, how: str, file_format: str) -> None:
  if how == "cut":
    os.truncate(path, path.stat().st_size // 2)
  elif how == "flip":
    content = bytearray(path.read_bytes())
    at = content.find(JPEG, len(content) // 4) + 64  # inside an image past the first quarter
    assert at > 64
    content[at : at + 16] = bytes(b ^ 0xFF for b in content[at : at + 16])
    path.write_bytes(bytes(content))
  elif how == "delete":
    path.unlink()
  elif how == "short":
    rewrite_with_half(path, file_format)
  else:
    raise ValueError(how)


def rewrite_with_half(path, file_format: str) -> None:
  """The same file, valid, with only its first half of the examples (written by the format's
  own writer)."""
  if file_format == "array_record":
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(str(path))
    options, found = reader.writer_options_string(), reader.read_all()
    reader.close()
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for record in found[: len(found) // 2]:
      writer.write(record)
    writer.close()
  else:
    import tensorflow as tf

    found = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    with tf.io.TFRecordWriter(str(path)) as writer:
      for record in found[: len(found) // 2]:
        writer.write(record)


def assert_names_file_and_fix(message: str, path, data_dir) -> None:
  assert "\n" not in message
  assert str(path) in message, message
  assert FIX.format(data_dir) in message, message


CASES = [format_param(*case) for case in itertools.product(FIXTURE_FORMATS, DAMAGES)]


@pytest.mark.parametrize(("file_format", "how"), CASES)
def test_a_damaged_split_file_is_named_with_the_fix(prepared, tmp_path, file_format, how):
  data_dir = copy_of(prepared, file_format, tmp_path)
  path = split_file(data_dir, file_format)
  damage(path, how, file_format)
  if how == "flip":  # the file still holds its examples by count: found while reading
    data.check_available("tiny_imagenet", data_dir=data_dir)
  else:
    with pytest.raises(data.DamagedDatasetError) as early:
      data.check_available("tiny_imagenet", data_dir=data_dir)
    assert_names_file_and_fix(str(early.value), path, data_dir)
  with pytest.raises(data.DamagedDatasetError) as info:
    data.load_split("tiny_imagenet", "train", data_dir=data_dir)
  assert_names_file_and_fix(str(info.value), path, data_dir)
  # main.py and the tools turn DatasetUnavailableError into one `error:` line.
  assert isinstance(info.value, data.DatasetUnavailableError)
  # The other split is whole and still loads.
  assert len(data.load_split("tiny_imagenet", "validation", data_dir=data_dir)[1]) == 20


def test_a_short_file_says_how_many_examples_it_holds(prepared, tmp_path):
  data_dir = copy_of(prepared, "array_record", tmp_path)
  path = split_file(data_dir, "array_record")
  damage(path, "short", "array_record")
  with pytest.raises(data.DamagedDatasetError, match="holds 24 examples, not the 48"):
    data.load_split("tiny_imagenet", "train", data_dir=data_dir)


def test_a_damaged_eval_split_is_found_before_training(prepared, tmp_path):
  data_dir = copy_of(prepared, "array_record", tmp_path)
  path = split_file(data_dir, "array_record", "validation")
  damage(path, "cut", "array_record")
  with pytest.raises(data.DamagedDatasetError) as info:
    data.check_available("tiny_imagenet", data_dir=data_dir)
  assert_names_file_and_fix(str(info.value), path, data_dir)


@pytest.mark.parametrize("download", [False, True])
def test_a_folder_without_its_dataset_info_is_damaged_not_unprepared(prepared, tmp_path, download):
  # TFDS would reuse the folder as it is when asked to prepare it (download=True).
  data_dir = copy_of(prepared, "array_record", tmp_path)
  info_path = data_dir / "tiny_imagenet" / "1.0.0" / "dataset_info.json"
  info_path.unlink()
  for call in (data.check_available, data.load_split):
    args = ("tiny_imagenet", "train") if call is data.load_split else ("tiny_imagenet",)
    with pytest.raises(data.DamagedDatasetError) as info:
      call(*args, data_dir=data_dir, download=download)
    assert_names_file_and_fix(str(info.value), info_path, data_dir)
    assert "is missing" in str(info.value)


def test_an_unreadable_dataset_info_names_the_folder_to_delete(prepared, tmp_path):
  data_dir = copy_of(prepared, "array_record", tmp_path)
  info_path = data_dir / "tiny_imagenet" / "1.0.0" / "dataset_info.json"
  info_path.write_text(info_path.read_text()[:40])
  with pytest.raises(data.DamagedDatasetError) as info:
    data.check_available("tiny_imagenet", data_dir=data_dir)
  message = str(info.value)
  assert "\n" not in message and "dataset_info.json" in message
  assert "delete that folder and prepare it again: python -m lkca_jax.tools.prepare" in message
  assert str(data_dir / "tiny_imagenet") in message
  assert "Failed to load JSON" in message and "builder_kwargs" not in message


def test_prepare_checks_what_it_keeps_and_force_prepares_again(prepared, tmp_path):
  data_dir = copy_of(prepared, "array_record", tmp_path)
  want_images, want_labels = data.load_split("tiny_imagenet", "train", data_dir=data_dir)
  path = split_file(data_dir, "array_record")
  damage(path, "cut", "array_record")
  manual = manual_dir_with(tmp_path)
  with pytest.raises(data.DamagedDatasetError) as info:  # TFDS alone would keep the cut file
    data.prepare("tiny_imagenet", data_dir=data_dir, manual_dir=manual)
  assert_names_file_and_fix(str(info.value), path, data_dir)
  assert data.prepare("tiny_imagenet", data_dir=data_dir, manual_dir=manual, force=True) == SPLITS
  images, labels = data.load_split("tiny_imagenet", "train", data_dir=data_dir)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)


# --- the commands, as real processes ------------------------------------------------------
def run(*args, timeout=300, env=None):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
  )


@pytest.mark.slow
def test_prepare_command_refuses_a_damaged_dataset_and_force_repairs_it(prepared, tmp_path):
  data_dir = copy_of(prepared, "tfrecord", tmp_path)
  path = split_file(data_dir, "tfrecord")
  damage(path, "cut", "tfrecord")
  manual = manual_dir_with(tmp_path)
  command = ["-m", "lkca_jax.tools.prepare", "--dataset", "tiny_imagenet"]
  command += ["--data_dir", str(data_dir), "--manual_dir", str(manual)]
  result = run(*command)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert lines[-1].startswith("error: "), result.stderr[-3000:]
  assert_names_file_and_fix(lines[-1], path, data_dir)
  result = run(*command, "--force")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train 48, validation 20" in result.stdout
  assert not path.exists()  # prepared again as array_record, the default
  assert len(data.load_split("tiny_imagenet", "train", data_dir=data_dir)[1]) == 48


# main.py meets a DamagedDatasetError in one of two places, whatever the file format or
# damage: Run.prepare (check_available: a missing, cut or short file) or Run.load_data
# (load_split: a changed byte). One case each; every format and damage's own error is
# tested above, in-process. The tfrecord case also has TensorFlow loaded when it fails.
MAIN_CASES = [
  ("array_record", "cut"),  # found by check_available (Run.prepare)
  ("tfrecord", "flip"),  # found while the split is read (Run.load_data)
]


@pytest.mark.slow
@pytest.mark.parametrize(
  ("file_format", "how"), MAIN_CASES, ids=[f"{f}-{h}" for f, h in MAIN_CASES]
)
def test_main_stops_with_one_error_line_before_training(prepared, tmp_path, file_format, how):
  data_dir = copy_of(prepared, file_format, tmp_path)
  path = split_file(data_dir, file_format)
  damage(path, how, file_format)
  workdir, temporary = tmp_path / "workdir", tmp_path / "tmp"
  temporary.mkdir()
  result = run(
    "main.py",
    "--config",
    "configs/tinyimagenet.py",
    f"--config.dataset.data_dir={data_dir}",
    "--config.model=lkca_t",  # the smallest model, as the other main.py runs on the fixture
    "--config.model_overrides.dim=32",
    "--config.model_overrides.depth=1",
    "--config.model_overrides.num_heads=2",
    "--config.num_devices=1",
    "--config.batch_size=16",
    f"--workdir={workdir}",
    env={**os.environ, "TMPDIR": str(temporary)},
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-3000:]
  assert lines[-1].startswith("error: dataset tiny_imagenet: the prepared file "), lines[-1]
  assert_names_file_and_fix(lines[-1], path, data_dir)
  assert "Traceback" not in result.stderr
  assert not (workdir / "checkpoints").exists()
  # The error line ends the process at once (no exit handlers), so it leaves nothing whose
  # removal waits for one: no source files of tf.data functions converted by AutoGraph.
  assert sorted(p.name for p in temporary.iterdir()) == []
