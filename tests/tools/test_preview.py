"""The preview command in real subprocesses: its PNG shows the trainer's own augmented batch.

Expected tiles are recomputed in-process from the pipeline that
`train.build_training` builds for the same config, un-normalised as the
preview documents (x * std + mean, clipped to [0, 1], rounded to 8 bits).
"""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from configs import digits, tinyimagenet
from lkca_jax import augment, data, train
from lkca_jax.tools import preview
from tests.helpers import FIXTURE_ZIP as FIXTURE
from tests.helpers import with_overrides

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHITE = np.array([255, 255, 255])


def as_flags(overrides):
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def trainer_batch(config, step):
  """(augmented batch, raw uint8 images of that batch) from the trainer's own pipeline."""
  pipeline = train.build_training(train.Run.prepare(config), config).pipeline
  order = np.asarray(pipeline.epoch_order(step // pipeline.steps_per_epoch))
  batch = pipeline.train_batch(order, step)
  start = (step % pipeline.steps_per_epoch) * config.batch_size
  raw = np.asarray(pipeline.train.images)[order[start : start + config.batch_size]]
  return {key: np.asarray(value) for key, value in batch.items()}, raw


def expected_tiles(images, mean, std, scale):
  pixels = np.clip(images * np.float32(std) + np.float32(mean), 0.0, 1.0)
  pixels = np.round(pixels * 255.0).astype(np.uint8)
  pixels = np.broadcast_to(pixels, (*pixels.shape[:3], 3))  # grey -> RGB
  return pixels.repeat(scale, axis=1).repeat(scale, axis=2)


def read_tiles(path, rows, cols, tile):
  """(tiles (rows * cols, tile, tile, 3), label strips) cut out of the PNG."""
  image = np.asarray(Image.open(path).convert("RGB"))
  layout = preview.Layout(rows, cols, tile)
  tiles, strips = [], []
  for index in range(rows * cols):
    top, left = layout.tile_origin(*divmod(index, cols))
    tiles.append(image[top : top + tile, left : left + tile])
    strips.append(image[top + tile : top + tile + preview.LINE_HEIGHT, left : left + tile])
    # The tile is framed by background: the cut is where the tile really is.
    assert (image[top - 1, left : left + tile] == WHITE).all()
    assert (image[top : top + tile, left - 1] == WHITE).all()
  return image, np.stack(tiles), strips


def check_preview(out, config, expected, rows, cols, tile, min_changed):
  image, tiles, strips = read_tiles(out, rows, cols, tile)
  assert image.shape[1] == cols * tile + (cols + 1) * preview.GAP
  assert image.shape[0] > rows * (tile + preview.LINE_HEIGHT)  # + gaps and the caption
  batch, raw = expected
  scale = tile // raw.shape[1]
  want = expected_tiles(
    batch["image"][: rows * cols], config.dataset.mean, config.dataset.std, scale
  )
  np.testing.assert_array_equal(tiles, want)
  # Augmentation is visible: most tiles are not the raw image.
  raw_tiles = np.broadcast_to(raw[: rows * cols], (rows * cols, *raw.shape[1:3], 3))
  raw_tiles = raw_tiles.repeat(scale, axis=1).repeat(scale, axis=2)
  difference = np.abs(tiles.astype(int) - raw_tiles).mean(axis=(1, 2, 3))
  assert (difference > 2).sum() >= min_changed, difference
  for strip in strips:  # every tile has a label drawn under it
    assert (strip.min(axis=-1) < 128).sum() >= 5


def test_to_display_inverts_normalisation():
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  mean, std = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
  np.testing.assert_array_equal(
    preview.to_display(augment.normalize(raw, mean, std), mean, std), raw
  )
  # Pixels at zero after normalisation (erasing_fill="zero") show as the mean colour.
  erased = preview.to_display(np.zeros((1, 1, 1, 3), np.float32), mean, std)[0, 0, 0]
  np.testing.assert_array_equal(erased, np.round(np.asarray(mean) * 255))


@pytest.fixture(scope="module")
def tiny_imagenet_dirs(tmp_path_factory):
  """(data_dir, manual_dir): the fixture zip prepared with the real builder."""
  tmp = tmp_path_factory.mktemp("preview_tiny_imagenet")
  manual = tmp / "manual"
  manual.mkdir()
  os.symlink(FIXTURE, manual / "tiny-imagenet-200.zip")
  sizes = data.prepare("tiny_imagenet", data_dir=tmp / "tfds", manual_dir=manual)
  assert sizes == {"train": 48, "validation": 20}
  return tmp / "tfds", manual


@pytest.fixture(scope="module")
def previews(tmp_path_factory, tiny_imagenet_dirs):
  """Both preview commands (2 x 4 tiles), started at once.

  name -> (process, PNG path, config as the command sees it, step).
  """
  tmp = tmp_path_factory.mktemp("previews")
  data_dir, manual = tiny_imagenet_dirs
  small = {"batch_size": 16, "model_overrides.dim": 32, "model_overrides.depth": 1}  # the
  # model does not touch the batch; a small one is quicker to build
  runs = {
    "digits": (digits, small, 3),
    "tiny_imagenet": (
      tinyimagenet,
      {
        **small,
        "dataset.download": False,
        "dataset.data_dir": str(data_dir),
        "dataset.manual_dir": str(manual),
      },
      10,
    ),
  }
  started = {}
  for name, (module, overrides, step) in runs.items():
    out = tmp / f"{name}.png"
    proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "lkca_jax.tools.preview",
        "--config",
        f"configs/{os.path.basename(module.__file__)}",
        f"--out={out}",
        "--rows=2",
        "--cols=4",
        f"--step={step}",
        *as_flags(overrides),
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    started[name] = (proc, out, with_overrides(module.get_config(), overrides), step)
  yield started
  for proc, *_ in started.values():
    if proc.poll() is None:
      proc.kill()


def finished(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


def test_digits_preview_is_the_trainers_batch(previews):
  proc, out, config, step = previews["digits"]
  expected = trainer_batch(config, step)  # while the command runs
  assert "2x4 tiles of 64 px" in finished(proc)
  # 8 px digits at 8x; pad-1 crops move 8 of 9 images, so a few may stay put.
  check_preview(out, config, expected, 2, 4, 64, min_changed=5)


def test_tiny_imagenet_preview_is_the_trainers_batch(previews):
  proc, out, config, step = previews["tiny_imagenet"]
  expected = trainer_batch(config, step)
  # 64 px images at 2x; step 10 is in epoch 1 (3 x 48 images make 9 batches of 16).
  assert "2x4 tiles of 128 px): step 10, epoch 1" in finished(proc)
  # Flip, crop, AutoAugment and erasing: practically every tile changes.
  check_preview(out, config, expected, 2, 4, 128, min_changed=7)


def test_tiny_imagenet_labels_are_words_from_the_zip(tiny_imagenet_dirs, monkeypatch):
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  data_dir, manual = tiny_imagenet_dirs
  with zipfile.ZipFile(FIXTURE) as archive:
    wnids = archive.read("tiny-imagenet-200/wnids.txt").decode().split()
    lines = archive.read("tiny-imagenet-200/words.txt").decode().splitlines()
  words = dict(line.split("\t") for line in lines)
  config = tinyimagenet.get_config()
  config.dataset.data_dir = str(data_dir)
  config.dataset.manual_dir = str(manual)
  spec = data.get_spec("tiny_imagenet")
  names = preview.class_names(config, spec)
  assert len(names) == 200
  assert names[0] == words[wnids[0]].split(",")[0] == "Egyptian cat"
  assert names[199] == words[wnids[199]].split(",")[0]
  config.dataset.manual_dir = None  # no zip at hand: the wnids
  assert preview.class_names(config, spec)[:2] == wnids[:2]


def test_digits_label_names():
  # (CIFAR names come from a prepared dataset's info; unprepared, TFDS knows only 0..9.)
  names = preview.class_names(digits.get_config(), data.get_spec("digits"))
  assert names == [str(d) for d in range(10)]


# The preview's own flags; config values and shared flags are tested once for every
# command in tests/test_config_checks.py and tests/tools/test_cli.py.
BAD_INPUTS = [
  (["--rows=0"], "--rows and --cols must be at least 1"),
  (["--rows=9", "--cols=8"], "72 tiles but a batch has only 64 images"),
]


def test_bad_input_exits_2_with_one_line(tmp_path):
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "lkca_jax.tools.preview",
        "--config",
        "configs/digits.py",
        f"--out={tmp_path / f'{i}.png'}",
        *flags,
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, (flags, _) in enumerate(BAD_INPUTS)
  ]
  for i, (proc, (flags, message)) in enumerate(zip(procs, BAD_INPUTS, strict=True)):
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (flags, err[-2000:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (flags, lines[-1])
    assert not (tmp_path / f"{i}.png").exists()
