"""benchmarks/tiny_imagenet_subset.py: the first K classes of a Tiny-ImageNet zip, read back
through the real builder, and its refusals.

The fixture zip holds labels 0, 1, 2 and 199 (12 train and 5 validation images each).
"""

import os
import subprocess
import sys
import zipfile

import numpy as np

from lkca_jax import data
from tests.helpers import FIXTURE_ZIP

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "tiny_imagenet_subset.py")
ROOT = "tiny-imagenet-200/"


def run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_the_subset_prepares_and_loads_as_the_first_classes(tmp_path):
  manual = tmp_path / "manual"  # not made here: the command makes it
  subset_zip = manual / "tiny-imagenet-200.zip"
  result = run("--zip", FIXTURE_ZIP, "--classes", "2", "--out", str(subset_zip))
  assert result.returncode == 0, result.stdout + result.stderr
  assert "34 images of the first 2 classes" in result.stdout
  with zipfile.ZipFile(subset_zip) as subset, zipfile.ZipFile(FIXTURE_ZIP) as source:
    # Labels keep their official indices: the whole wnids.txt travels.
    assert subset.read(ROOT + "wnids.txt") == source.read(ROOT + "wnids.txt")
    wnids = source.read(ROOT + "wnids.txt").decode().split()[:2]
    lines = subset.read(ROOT + "val/val_annotations.txt").decode().split("\n")
    assert {line.split("\t")[1] for line in lines if line} == set(wnids)
    for name in subset.namelist():
      if name.endswith(".JPEG"):
        assert subset.read(name) == source.read(name), name  # byte for byte
    assert all(info.compress_type == zipfile.ZIP_STORED for info in subset.infolist())
  sizes = data.prepare("tiny_imagenet", data_dir=tmp_path / "tfds", manual_dir=manual)
  assert sizes == {"train": 24, "validation": 10}
  images, labels = data.load_split("tiny_imagenet", "train", data_dir=tmp_path / "tfds")
  assert images.shape == (24, 64, 64, 3)
  assert np.bincount(labels).tolist() == [12, 12]


def test_bad_inputs_are_one_error_line(tmp_path):
  not_zip = tmp_path / "a.txt"
  not_zip.write_text("not a zip")
  out = str(tmp_path / "out.zip")
  for args, says in (
    (("--zip", str(not_zip), "--out", out), "is not a zip file"),
    (("--zip", FIXTURE_ZIP, "--classes", "0", "--out", out), "--classes=0: choose 1..200"),
    (("--zip", FIXTURE_ZIP, "--classes", "201", "--out", out), "--classes=201: choose 1..200"),
    (("--zip", FIXTURE_ZIP, "--out", str(tmp_path)), "is a directory"),
    (("--zip", FIXTURE_ZIP, "--classes", "0", "--out", str(tmp_path / "no" / "o.zip")), "1..200"),
  ):
    result = run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # nothing written
