"""A streaming input pipeline: grain reads each batch from the array_record files as it is due.

For datasets larger than memory (ImageNet-1k: 140 GB of JPEGs). Nothing is
loaded whole: the epoch order is the whole-split pipeline's own (`repeats`
shuffles of the training set drawn from the key and the epoch, `Pipeline._order`),
and each process reads, with grain, only the records of its own devices' rows
of each global batch (per-process shards: with P processes each reads a
disjoint 1/P of every epoch's order, and the global batch is their
concatenation). Host threads (or grain worker processes) parse each
`tf.train.Example` with protobuf, decode the JPEG with PIL and do the steps that
need the full-size image (a random-resized crop, or the resize to the training
size); uint8 batches then go to the devices, where the whole-split pipeline's
augmentation runs unchanged.

What a step reads is a pure function of (key, epoch, step): the order from
(key, epoch), each image's crop from (key, step, row), its augmentation from
(key, step). So the loader's position is the train state's step and nothing
else is saved: a run resumed at step s opens the stream at s and sees exactly
the batches it would have seen. When the stored images are the training size
and the crop is "resize", every batch equals the whole-split pipeline's
(tests/data/test_stream.py).

No TensorFlow: TFDS's own copy of the Example proto parses the records.
"""

from __future__ import annotations

import dataclasses
import io
import math

import jax
import numpy as np

from lkca_jax import adapters
from lkca_jax import augment as augment_lib
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.data import records, sources

# The per-image steps on the host before the uint8 batch goes to the devices.
# "resize": the shorter side to the training size, then the centre square (the whole
# image when it is square; nothing at all when it is already the training size).
# "random_resized": a random box of the area and aspect ranges, resized to the training size
# (the Inception / DeiT crop, drawn as torchvision draws it).
CROPS = ("resize", "random_resized")
CROP_ATTEMPTS = 10  # boxes tried before the fallback centre box (torchvision's count)
# Host threads decoding in this process (PIL releases the GIL while it decodes and resizes).
DEFAULT_THREADS = records.DECODE_THREADS
# Global batches each process keeps decoded ahead of the step that uses them.
BATCHES_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class HostCrop:
  """The host's per-image steps: decode, then crop/resize to `size` (see CROPS)."""

  size: tuple[int, int]  # (height, width) of the training images
  channels: int
  crop: str = "resize"
  scale: tuple[float, float] = (0.08, 1.0)  # random_resized: area share of the image
  ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized: width / height
  eval_fraction: float = 1.0  # evaluation: resize to size / fraction, centre crop

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"dataset.stream_crop must be one of {CROPS}, got {self.crop!r}")
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      raise ValueError(f"dataset.stream_crop_scale must be 0 < low <= high <= 1: {self.scale}")
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"dataset.stream_crop_ratio must be 0 < low <= high: {self.ratio}")
    if not 0 < self.eval_fraction <= 1:
      raise ValueError(f"dataset.eval_crop_fraction must be in (0, 1]: {self.eval_fraction}")


# --- one image --------------------------------------------------------------------
def parse_example(record: bytes, image_key: str, label_key: str) -> tuple[bytes, int]:
  """(encoded image, label) of a TFDS-serialized tf.train.Example, without TensorFlow."""
  feature = example_proto().FromString(record).features.feature
  return feature[image_key].bytes_list.value[0], int(feature[label_key].int64_list.value[0])


def example_proto(*_):
  """TFDS's tf.train.Example message class; importing it imports all of TFDS.

  `_batches` calls it before any reading thread starts, in this process and (as grain's
  worker_init_fn) in each worker: on Python 3.11, threads that import TFDS for the first
  time together can deadlock (etils' lazy modules hold a cached_property lock while they
  import), and a worker process once hung so.
  """
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  return tf_example_pb2.Example


def decode(data: bytes, channels: int):
  """A PIL image of `channels` channels (L or RGB: what TF's decode_*(channels=C) gives)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  image = Image.open(io.BytesIO(data))
  mode = {1: "L", 3: "RGB"}[channels]
  return image if image.mode == mode else image.convert(mode)


def random_box(rng: np.random.Generator, width: int, height: int, scale, ratio):
  """(left, top, right, bottom) of a random-resized crop, as torchvision draws it.

  Up to CROP_ATTEMPTS tries of an area share in `scale` and a log-uniform aspect in
  `ratio` that fits; else the largest centred box whose aspect is within `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(CROP_ATTEMPTS):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def resized_crop(image, box, out_w: int, out_h: int):
  """The box (left, top, right, bottom) cut out, then resized bicubically to (out_w, out_h):
  torchvision's resized_crop (RandomResizedCrop's last step), so that the filter sees only
  the box's pixels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  return image.crop(box).resize((out_w, out_h), Image.Resampling.BICUBIC)


def resize_then_centre_crop(image, out_w: int, out_h: int, fraction: float = 1.0):
  """torchvision's Resize(int(side / fraction), bicubic) then CenterCrop, as DeiT and timm
  evaluate (side: the output's longer one, the only one for a square output): the image's
  shorter side to that size, its longer one in proportion, truncated, and the centre
  (out_w, out_h) box at offsets rounded as CenterCrop rounds them."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  width, height = image.size
  short = int(max(out_w, out_h) / fraction)
  if width <= height:
    size = (short, int(short * height / width))
  else:
    size = (int(short * width / height), short)
  image = image.resize(size, Image.Resampling.BICUBIC)  # a copy where the size is the same
  left, top = (int(round((s - out) / 2.0)) for s, out in zip(size, (out_w, out_h), strict=True))
  return image.crop((left, top, left + out_w, top + out_h))


def crop_image(image, crop: HostCrop, rng: np.random.Generator | None) -> np.ndarray:
  """uint8 (H, W, C) at crop.size: for training (with `rng`) random-resized or resized as
  `crop.crop` says, for evaluation resized to size / `crop.eval_fraction`, then the centre."""
  out_h, out_w = crop.size
  if rng is not None and crop.crop == "random_resized":
    box = random_box(rng, *image.size, crop.scale, crop.ratio)
    image = resized_crop(image, box, out_w, out_h)
  else:
    fraction = 1.0 if rng is not None else crop.eval_fraction
    image = resize_then_centre_crop(image, out_w, out_h, fraction)
  return np.asarray(image).reshape(out_h, out_w, crop.channels)


def image_rng(seed_words, step: int, row: int) -> np.random.Generator:
  """The host randomness of one image: a pure function of the run's key, the step and the row."""
  return np.random.default_rng([*(int(w) for w in seed_words), step, row])


# --- grain elements ----------------------------------------------------------------
@dataclasses.dataclass
class _Reads:
  """The records one process reads from `first_step` on: element e is (run, step, row, record).

  Elements go step by step, within a step run by run, within a run the process's rows in
  order; only the record indices are stored (4 bytes an element), the rest is arithmetic.
  """

  records: np.ndarray  # (steps * runs * rows,) int32
  first_step: int
  runs: int
  rows: np.ndarray  # this process's rows of the global batch, ascending

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, e: int) -> tuple[int, int, int, int]:
    per_step = self.runs * len(self.rows)
    step, within = divmod(int(e), per_step)
    run, r = divmod(within, len(self.rows))
    return run, self.first_step + step, int(self.rows[r]), int(self.records[e])


@dataclasses.dataclass
class _Load:
  """grain map: an element (run, step, row, record) -> {"image", "label", "index"}."""

  source: object  # grain ArrayRecordDataSource
  split: records.SplitFiles
  crop: HostCrop
  seeds: np.ndarray | None  # (runs, words) of the training randomness; None: evaluation

  def __call__(self, element):
    run, step, row, index = element
    data, label = parse_example(self.source[index], self.split.image_key, self.split.label_key)
    rng = None if self.seeds is None else image_rng(self.seeds[run], step, row)
    with decode(data, self.crop.channels) as image:
      pixels = crop_image(image, self.crop, rng)
    return {"image": pixels, "label": np.int32(label), "index": np.int32(index)}


def _batches(reads: _Reads, load: _Load, per_batch: int, workers: int):
  """grain's iterator over the batches of `reads` (threads here, or `workers` processes)."""
  import grain  # pylint: disable=import-outside-toplevel

  example_proto()
  threads = max(DEFAULT_THREADS if workers == 0 else 2, 1)
  dataset = grain.MapDataset.source(reads).map(load).batch(per_batch, drop_remainder=True)
  # Whole batches are the elements, so workers and threads each make whole batches, in order.
  stream = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(BATCHES_AHEAD, threads))
  )
  if workers:
    adapters.grain_workers_ready()
    options = grain.MultiprocessingOptions(num_workers=workers)
    stream = stream.mp_prefetch(options, worker_init_fn=example_proto)
  return iter(stream)


def local_rows(sharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
  """The rows along `axis` that this process's devices hold of a global array of `shape`."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  return np.asarray(sorted(rows), np.int64)


def put_rows(local: np.ndarray, rows: np.ndarray, shape, sharding, axis: int) -> jax.Array:
  """The global array of `shape` from this process's `rows` (along `axis`) in `local`."""
  position = {int(row): i for i, row in enumerate(rows)}

  def part(index):
    start, stop, _ = index[axis].indices(shape[axis])
    cut = list(index)
    cut[axis] = slice(position[start], position[start] + stop - start)
    return local[tuple(cut)]

  return jax.make_array_from_callback(tuple(shape), sharding, part)


# --- the pipeline --------------------------------------------------------------------
@dataclasses.dataclass
class StreamedSplit:
  """A streamed split as the trainer sees a split: its size; nothing is in memory."""

  split: records.SplitFiles
  kept: np.ndarray  # record index of each example of the (subset) split
  on_device: bool = False

  @property
  def size(self) -> int:
    return len(self.kept)


class StreamPipeline(pipeline_lib.Pipeline):
  """`Pipeline`'s batches, read and decoded from array_record as they are due."""

  def __init__(
    self,
    mesh,
    train: StreamedSplit,
    test: StreamedSplit,
    *,
    crop: HostCrop,
    global_batch: int,
    repeats: int,
    augment: augment_lib.AugmentConfig,
    key: jax.Array,
    epoch_order: str = "independent",
    epoch_length: str = "repeats",
    workers: int = 0,
  ):
    self.train, self.test, self.crop, self.workers = train, test, crop, workers
    self.placement = "stream"
    self._setup(mesh, global_batch, repeats, augment, key, epoch_order, epoch_length)
    keys = self.augment_key if self.num_runs is not None else self.augment_key[None]
    self._seeds = np.asarray(jax.random.key_data(keys)).reshape(len(keys), -1)
    runs = self.num_runs or 1
    # The batch as (runs, batch, ...) here; a single run's is put without the run axis.
    self.train_rows = local_rows(self.train_sharding, self._train_shape(runs), self._batch_axis)
    self.eval_rows = local_rows(self.batch_sharding, (global_batch,), 0)
    self._stream = None  # (next step, epoch, grain iterator)
    self._last = (None, None)  # (step, batch): the batch asked for twice (compile, then train)
    self.last_read = None  # this process's record indices of the last step read (for tests)

  @property
  def _batch_axis(self) -> int:
    return 0 if self.num_runs is None else 1

  def _train_shape(self, runs: int, *rest) -> tuple[int, ...]:
    return (self.global_batch, *rest) if self.num_runs is None else (runs, self.global_batch, *rest)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (*self.crop.size, self.crop.channels)

  # --- training -------------------------------------------------------------
  def _open(self, order: np.ndarray, epoch: int, step: int):
    """grain's iterator over this process's records from global step `step` to the epoch's end."""
    order = order.reshape(-1, order.shape[-1])  # (runs, epoch length)
    first = step - epoch * self.steps_per_epoch
    positions = (
      np.arange(first, self.steps_per_epoch)[:, None, None] * self.global_batch
      + self.train_rows[None, None, :]
    )  # (steps, 1, rows)
    by_run = np.take_along_axis(order[None], positions.repeat(len(order), 1), axis=2)
    reads = _Reads(
      self.train.kept[by_run].reshape(-1).astype(np.int32), step, len(order), self.train_rows
    )
    load = _Load(self.train.split.source(), self.train.split, self.crop, self._seeds)
    return _batches(reads, load, len(order) * len(self.train_rows), self.workers)

  def _read(self, order, step: int) -> dict:
    """This process's uint8 rows of step `step`, from the open stream or a new one."""
    epoch = step // self.steps_per_epoch
    if self._stream is None or self._stream[:2] != (step, epoch):
      self.close()
      self._stream = (step, epoch, self._open(_local_copy(order), epoch, step))
    batch = next(self._stream[2])
    self._stream = (step + 1, epoch, self._stream[2])
    return batch

  def close(self) -> None:
    """Ends the open stream (its threads, or its worker processes and their shared memory)."""
    if self._stream is not None:
      self._stream[2].close()
      self._stream = None

  def train_batch(self, order, step: int) -> dict:
    """The augmented batch of global step `step`; the same as the whole-split pipeline's."""
    if self._last[0] == step:
      return self._last[1]
    local = self._read(order, step)
    self.last_read = local["index"]
    runs = self.num_runs or 1
    images = local["image"].reshape(runs, len(self.train_rows), *self.image_shape)
    labels = local["label"].reshape(runs, len(self.train_rows))
    if self.num_runs is None:
      images, labels = images[0], labels[0]
    axis, shape = self._batch_axis, self._train_shape(runs)
    batch = self._augment(
      put_rows(images, self.train_rows, (*shape, *self.image_shape), self.train_sharding, axis),
      put_rows(labels, self.train_rows, shape, self.train_sharding, axis),
      step,
    )
    self._last = (step, batch)
    return batch

  # --- evaluation -----------------------------------------------------------
  def eval_batches(self):
    """The whole test split in global batches, each process reading its rows; padding rows
    (the last image again) have mask False."""
    rows, batch = self.eval_rows, self.global_batch
    idx, mask = self._eval_indices(np.arange(self.eval_steps)[:, None], self.test.size, np)
    local = idx[:, rows].reshape(-1)
    reads = _Reads(self.test.kept[local].astype(np.int32), 0, 1, rows)
    load = _Load(self.test.split.source(), self.test.split, self.crop, None)
    stream = _batches(reads, load, len(rows), self.workers)
    try:
      for k in range(self.eval_steps):
        part = next(stream)
        yield {
          "image": self._normalize(
            put_rows(part["image"], rows, (batch, *self.image_shape), self.batch_sharding, 0)
          ),
          "label": put_rows(part["label"], rows, (batch,), self.batch_sharding, 0),
          "mask": put_rows(mask[k, rows], rows, (batch,), self.batch_sharding, 0),
        }
    finally:
      stream.close()


def _local_copy(order) -> np.ndarray:
  """A replicated (global) order as a numpy array of this process."""
  if isinstance(order, jax.Array) and not order.is_fully_addressable:
    order = order.addressable_data(0)
  return np.asarray(order)


def host_crop(config, spec) -> HostCrop:
  """The host's per-image steps that the run config asks for."""
  data = config.dataset
  return HostCrop(
    size=tuple(spec.image_size),
    channels=spec.channels,
    crop=data.stream_crop,
    scale=tuple(data.stream_crop_scale),
    ratio=tuple(data.stream_crop_ratio),
    eval_fraction=data.eval_crop_fraction,
  )


def why_stream(config, spec) -> str | None:
  """Why `spec`'s splits can only be streamed under this config, or None.

  Images stored at another size are not a reason: whole splits are brought to the training
  size as they load (resized, or centre-cropped when their sizes vary).
  """
  crop = host_crop(config, spec)
  if crop.crop != "resize":
    return f"dataset.stream_crop={crop.crop!r} is made on the host as images are read"
  if crop.eval_fraction != 1.0:
    return f"dataset.eval_crop_fraction={crop.eval_fraction} is made on the host as images are read"
  return None


def decoded_bytes(config, spec, files: dict) -> int:
  """Bytes of the decoded uint8 splits at the training size, the subset included (estimated
  from the class counts before any label is read)."""
  own = sources.get_spec(spec.name).num_classes
  per_class = config.dataset.train_per_class
  count = 0
  for split, info in files.items():
    n = info.num_examples * spec.num_classes // own
    if split == spec.train_split and per_class:
      n = min(n, per_class * spec.num_classes)
    count += n
  return count * int(np.prod(spec.image_size)) * spec.channels


def kept_records(split: records.SplitFiles, *, num_classes: int, dataset_classes: int, per_class=0):
  """The record indices of the (subset) split, in record order as `pipeline.subset` keeps them.

  The whole split needs nothing read; a subset reads every record's label once.
  """
  everything = np.arange(split.num_examples, dtype=np.int64)
  if num_classes == dataset_classes and not per_class:
    return everything
  source = split.source()
  labels = np.empty(split.num_examples, np.int32)
  for start in range(0, split.num_examples, 1024):
    keys = range(start, min(start + 1024, split.num_examples))
    for i, record in zip(keys, source.__getitems__(keys), strict=True):
      labels[i] = parse_example(record, split.image_key, split.label_key)[1]
  return pipeline_lib.subset(everything, labels, num_classes=num_classes, per_class=per_class)[0]


def from_config(config, spec, mesh, key, files: dict) -> StreamPipeline:
  """The streaming pipeline of `spec`'s prepared splits (`files`: split -> SplitFiles)."""
  data = config.dataset
  for info in files.values():
    problem = sources.stream_format_problem(spec, info, data.data_dir)
    if problem:
      raise sources.DatasetUnavailableError(problem)
  own = sources.get_spec(spec.name).num_classes
  train, test = files[spec.train_split], files[spec.eval_split]
  return StreamPipeline(
    mesh,
    StreamedSplit(
      train,
      kept_records(
        train, num_classes=spec.num_classes, dataset_classes=own, per_class=data.train_per_class
      ),
    ),
    StreamedSplit(test, kept_records(test, num_classes=spec.num_classes, dataset_classes=own)),
    crop=host_crop(config, spec),
    global_batch=config.batch_size,
    repeats=config.repeats,
    augment=pipeline_lib.augment_config(config),
    key=key,
    epoch_order=config.epoch_order,
    epoch_length=config.epoch_length,
    workers=data.stream_workers,
  )
