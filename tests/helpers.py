"""Helpers shared by several test modules."""

import fcntl
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURE_ZIP = Path(__file__).parent / "data" / "tiny-imagenet-200-fixture.zip"
ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *, unset=(), **env) -> str:
  """Runs `code` in a fresh interpreter at the repository root, with the environment
  variables in `unset` removed and `env` added; asserts it succeeded and returns stdout."""
  environ = {k: v for k, v in os.environ.items() if k not in unset}
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=dict(environ, **env),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def built_once(tmp_path_factory, name: str, build):
  """`build(directory)`'s result, built once in the test session however many workers run.

  pytest-xdist builds a module fixture in every worker that runs one of its
  tests, and with `-n 2` a module's tests often land on both. Here the first
  worker builds into a folder of the session's that the workers share and
  pickles the result; the others wait for it, then read it. Only for fixtures
  whose tests read what was built and change nothing.
  """
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  directory, result_file = shared / name, shared / f"{name}.pickle"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if result_file.exists():
      return pickle.loads(result_file.read_bytes())
    shutil.rmtree(directory, ignore_errors=True)  # what a failed build left
    directory.mkdir()
    result = build(directory)
    result_file.write_bytes(pickle.dumps(result))
    return result


def with_overrides(config, overrides):
  """The config with dotted-key overrides applied, as `--config.KEY=VALUE` would (typed values)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def fixture_images():
  """Every JPEG of the fixture zip, in name order: (all as RGB arrays, the grey ones as 2-D)."""
  rgb, grey = [], []
  with zipfile.ZipFile(FIXTURE_ZIP) as archive:
    for name in sorted(n for n in archive.namelist() if n.endswith(".JPEG")):
      image = Image.open(io.BytesIO(archive.read(name)))
      image.load()
      if image.mode == "L":
        grey.append(np.asarray(image))
      rgb.append(np.asarray(image.convert("RGB")))
  return rgb, grey
