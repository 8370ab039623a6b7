"""Helpers shared by several test modules."""

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURE_ZIP = Path(__file__).parent / "data" / "tiny-imagenet-200-fixture.zip"


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
