"""scikit-learn's digits split, kept in a cache file after its first load."""

import json
import os

import numpy as np

from tests.helpers import run_python

# Loads both splits in a fresh interpreter; prints whether scikit-learn was imported and
# the arrays' bytes, so two interpreters can be compared exactly.
LOAD = """
import hashlib, json, sys
from lkca_jax.data import digits
out = {"sklearn": "sklearn" in sys.modules}
for split in digits.SPLITS:
  images, labels = digits.load(split)
  out[split] = [images.shape, str(images.dtype), labels.shape, str(labels.dtype),
                hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()]
out["sklearn"] = out["sklearn"] or "sklearn" in sys.modules
print(json.dumps(out))
"""


def load_in_fresh_interpreter(cache_dir) -> dict:
  return json.loads(run_python(LOAD, LKCA_JAX_CACHE_DIR=str(cache_dir)).splitlines()[-1])


def test_the_first_load_keeps_the_split_and_later_loads_read_it_without_sklearn(tmp_path):
  first = load_in_fresh_interpreter(tmp_path)
  assert first["sklearn"] is True
  assert first["train"][:4] == [[1437, 8, 8, 1], "uint8", [1437], "int32"]
  assert first["test"][:4] == [[360, 8, 8, 1], "uint8", [360], "int32"]
  (kept,) = os.listdir(tmp_path)
  assert kept.startswith("digits-split-sklearn-") and kept.endswith(".npz")
  second = load_in_fresh_interpreter(tmp_path)
  assert second["sklearn"] is False
  assert second["train"] == first["train"] and second["test"] == first["test"]


def test_an_unreadable_cache_file_is_made_again(tmp_path):
  made = load_in_fresh_interpreter(tmp_path)
  (kept,) = os.listdir(tmp_path)
  (tmp_path / kept).write_bytes(b"not an npz")
  again = load_in_fresh_interpreter(tmp_path)
  assert again["sklearn"] is True and again["train"] == made["train"]
  with np.load(tmp_path / kept) as arrays:  # written over with the real split
    assert arrays["test_images"].shape == (360, 8, 8, 1)


def test_a_cache_that_cannot_be_written_still_gives_the_split(tmp_path):
  blocked = tmp_path / "a file, not a directory"
  blocked.write_text("")
  loaded = load_in_fresh_interpreter(blocked)
  assert loaded["sklearn"] is True and loaded["train"][0] == [1437, 8, 8, 1]
