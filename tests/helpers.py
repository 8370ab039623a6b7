"""Helpers shared by several test modules."""

import io
import os
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
