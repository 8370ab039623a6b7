"""A PNG grid of augmented training images, exactly as the trainer gets them at a step.

    python -m lkca_jax.tools.preview --config configs/tinyimagenet.py --out preview.png \\
        [--rows 4 --cols 8] [--step 0] [--config.KEY=VALUE ...]

The batch is `pipeline.train_batch(order, step)` of the pipeline that
`train.build_training` builds (same data key, order and per-image augmentation
as a training run of that config), before the train step's batch-level
CutMix / Mixup. Tiles are the first rows x cols images of the batch,
un-normalised with the config's mean and std, clipped to [0, 1] and upscaled
(nearest); erased boxes show in
the fill of `augment.erasing_fill`. Each tile has its class name under it
(Tiny-ImageNet: the first name of words.txt when the zip is at hand, else the
wnid). Bad input is reported in one line with exit code 2, as main.py does.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import zipfile

import numpy as np
from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS

TILE_TARGET = 128  # upscale tiles to about this many pixels...
MAX_SCALE = 8  # ...but at most 8x (8 px digits become 64 px)
GAP = 4  # pixels around and between tiles
FONT_SIZE = 11
LINE_HEIGHT = 14  # one line of label or caption text
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


# --- pixels ------------------------------------------------------------------
def to_display(images, mean, std) -> np.ndarray:
  """Normalised float (B, H, W, C) -> uint8 RGB (B, H, W, 3): x * std + mean, clipped to [0, 1]."""
  images = np.asarray(images, np.float32)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  pixels = np.round(np.clip(images * std + mean, 0.0, 1.0) * 255.0).astype(np.uint8)
  if pixels.shape[-1] == 1:  # grayscale (digits)
    pixels = np.repeat(pixels, 3, axis=-1)
  return pixels


def upscale(images: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscaling of (B, H, W, C) by an integer factor."""
  return np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)


def default_scale(image_size: int) -> int:
  return max(1, min(MAX_SCALE, TILE_TARGET // image_size))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where things are in the grid: tiles of `tile` px, a label strip under each."""

  rows: int
  cols: int
  tile: int

  @property
  def cell_height(self) -> int:
    return self.tile + LINE_HEIGHT

  @property
  def width(self) -> int:
    return self.cols * self.tile + (self.cols + 1) * GAP

  @property
  def grid_height(self) -> int:
    return self.rows * self.cell_height + (self.rows + 1) * GAP

  def tile_origin(self, row: int, col: int) -> tuple[int, int]:
    """(top, left) of tile (row, col); its label strip is the LINE_HEIGHT rows below it."""
    return GAP + row * (self.cell_height + GAP), GAP + col * (self.tile + GAP)


# --- names -------------------------------------------------------------------
def class_names(config, spec) -> list[str]:
  """Display names of the labels 0 .. spec.num_classes - 1.

  TFDS datasets: the label feature's names (Tiny-ImageNet's wnids become the
  first name in the zip's words.txt when the zip is at hand); others: the
  label number (digits).
  """
  if spec.tfds_name is None:
    return [str(label) for label in range(spec.num_classes)]
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if spec.tfds_module:
    importlib.import_module(spec.tfds_module)
  builder = tfds.builder(spec.tfds_name, data_dir=config.dataset.data_dir)
  label_key = builder.info.supervised_keys[1]
  names = list(builder.info.features[label_key].names)[: spec.num_classes]
  if spec.name == "tiny_imagenet":
    words = tiny_imagenet_words(config.dataset.manual_dir)
    names = [words.get(name, name) for name in names]
  return names


def tiny_imagenet_words(manual_dir=None) -> dict[str, str]:
  """wnid -> first human-readable name from the zip's words.txt; {} without a zip."""
  from lkca_jax.data import tiny_imagenet  # pylint: disable=import-outside-toplevel

  path = tiny_imagenet.find_zip(manual_dir)
  if path is None:
    return {}
  with zipfile.ZipFile(path) as archive:
    try:
      text = archive.read("tiny-imagenet-200/words.txt").decode()
    except KeyError:
      return {}
  words = {}
  for line in text.splitlines():
    wnid, _, names = line.partition("\t")
    if names:
      words[wnid] = names.split(",")[0].strip()
  return words


# --- drawing -----------------------------------------------------------------
def _font():
  from PIL import ImageFont  # pylint: disable=import-outside-toplevel

  try:
    return ImageFont.load_default(size=FONT_SIZE)  # needs FreeType
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
  """`text`, cut with '..' so it is at most `width` pixels wide."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "..", font=font) > width:
    text = text[:-1]
  return text + ".."


def caption_lines(caption: str, font, width: int) -> list[str]:
  """`caption` wrapped at word boundaries into lines at most `width` pixels wide."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  lines = []
  for word in caption.split():
    if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
      lines[-1] = f"{lines[-1]} {word}"
    else:
      lines.append(word)
  return lines


def render_grid(tiles: np.ndarray, labels: list[str], layout: Layout, caption: str = ""):
  """A PIL image: uint8 tiles (rows * cols, tile, tile, 3) with labels, caption below."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  font = _font()
  lines = caption_lines(caption, font, layout.width - 2 * GAP) if caption else []
  height = layout.grid_height + len(lines) * LINE_HEIGHT + (GAP if lines else 0)
  canvas = Image.new("RGB", (layout.width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for index, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
    top, left = layout.tile_origin(*divmod(index, layout.cols))
    canvas.paste(Image.fromarray(tile), (left, top))
    draw.text(
      (left, top + layout.tile + 1),
      _fit(draw, label, font, layout.tile),
      fill=TEXT_COLOUR,
      font=font,
    )
  for k, line in enumerate(lines):
    draw.text((GAP, layout.grid_height + k * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=font)
  return canvas


def describe_augmentation(augment) -> str:
  """The enabled random stages of augment.STAGES, in the order they run."""
  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel

  notes = {
    "random_erasing": (
      "erased boxes hold the dataset means in the normalised image: a light grey here"
      if augment.erasing_fill == "mean"
      else "erased boxes show as the mean colour: zero after normalisation"
    )
  }
  parts = []
  for stage in augment_lib.enabled_stages(augment):
    if stage.switch is None:  # normalisation: every image, shown undone
      continue
    note = notes.get(stage.name)
    parts.append(stage.describe(augment) + (f" ({note})" if note else ""))
  return ", ".join(parts) if parts else "no per-image augmentation (normalise only)"


# --- the batch ---------------------------------------------------------------
def preview_batch(run, config, step: int):
  """(the trainer's pipeline, its augmented batch at global `step` as numpy)."""
  from lkca_jax import runs  # pylint: disable=import-outside-toplevel

  pipeline = run.load_data(runs.run_keys(config.seed)[0])  # the data only: no model state
  order = pipeline.epoch_order(step // pipeline.steps_per_epoch)
  batch = pipeline.train_batch(order, step)
  return pipeline, {key: np.asarray(value) for key, value in batch.items()}


def write_preview(config, out: str, *, rows: int, cols: int, step: int, run=None) -> dict:
  """Writes the PNG; returns what it shows (for the caller's message)."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  count = rows * cols
  if count > config.batch_size:
    raise train.ConfigError(
      f"--rows x --cols = {count} tiles but a batch has only "
      f"{config.batch_size} images; lower --rows/--cols"
    )
  run = run or train.Run.prepare(config)
  names = class_names(config, run.spec)
  pipeline, batch = preview_batch(run, config, step)
  height = pipeline.image_shape[0]
  scale = default_scale(height)
  layout = Layout(rows, cols, height * scale)
  tiles = upscale(
    to_display(batch["image"][:count], config.dataset.mean, config.dataset.std), scale
  )
  labels = [names[int(label)] for label in batch["label"][:count]]
  epoch = step // pipeline.steps_per_epoch
  caption = (
    f"{config.dataset.name} training batch at step {step} (epoch {epoch}), images "
    f"0-{count - 1} of {config.batch_size}, from pipeline.train_batch: "
    f"{describe_augmentation(pipeline.augment)}. Shown un-normalised, before the "
    "train step's batch-level CutMix/Mixup."
  )
  image = render_grid(tiles, labels, layout, caption)
  png = io.BytesIO()
  image.save(png, format="PNG", optimize=True)
  cli.write_atomic(out, png.getvalue())
  return {"out": out, "size": image.size, "tile": layout.tile, "epoch": epoch}


# --- command line ------------------------------------------------------------
def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
  )
  cli.define_output_file("out", "preview.png", "Where the PNG goes.")
  flags.DEFINE_integer("rows", 4, "Rows of tiles.")
  flags.DEFINE_integer("cols", 8, "Columns of tiles.")
  flags.DEFINE_integer("step", 0, "Global training step whose batch is shown.")


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  if FLAGS.rows < 1 or FLAGS.cols < 1:
    cli.fail(f"--rows and --cols must be at least 1, got {FLAGS.rows} x {FLAGS.cols}")
  if FLAGS.step < 0:
    cli.fail(f"--step must be >= 0, got {FLAGS.step}")
  if not FLAGS.out.lower().endswith(".png"):
    cli.fail(f"--out must name a .png file, got {FLAGS.out!r}")
  cli.output_file(FLAGS.out, "--out")
  from lkca_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  try:
    shown = write_preview(
      FLAGS.config, FLAGS.out, rows=FLAGS.rows, cols=FLAGS.cols, step=FLAGS.step
    )
  except (train.ConfigError, data_lib.DatasetUnavailableError) as e:
    cli.fail(str(e))
  except OSError as e:
    cli.fail(f"could not write {FLAGS.out}: {e.strerror or e}")
  width, height = shown["size"]
  print(
    f"wrote {shown['out']} ({width}x{height} px, {FLAGS.rows}x{FLAGS.cols} tiles of "
    f"{shown['tile']} px): step {FLAGS.step}, epoch {shown['epoch']}"
  )


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
