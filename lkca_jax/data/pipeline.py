"""A device-resident input pipeline: uint8 arrays on the accelerators, batches made inside jit.

The datasets of the paper fit in accelerator memory as uint8 (Tiny-ImageNet
train is 1.2 GB), so each split is placed once on every device, *replicated*:
then any device can gather any image without cross-device traffic, and a
batch is a gather plus the per-image augmentations, compiled as one program.
When the split does not fit (placement "host", or "auto" on a small device)
images stay in host memory and only the uint8 batch crosses to the devices;
the batches are identical either way. Data larger than host memory is streamed
from its files (placement "stream", `lkca_jax.data.stream`), with the same
batches again; `choose_placement` is the one rule of what fits where.

The pipeline's whole state is (epoch, step, key): the epoch order is drawn
from fold_in(key, epoch) alone (`repeats` independent shuffles of the training
set back to back, as the reference; or one shuffle of `repeats` stacked copies),
and each batch's augmentation key is derived from the global step. A resumed
run therefore sees exactly the batches it would have seen.

Given a stack of K keys (runs trained side by side), every training array gains
a leading run axis: run k's orders and batches are those of a pipeline with
key k alone (the same functions, vmapped over the keys); evaluation batches
are shared.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import augment as augment_lib
from lkca_jax.data import sources

DATA_AXIS = "data"
# Keep the replicated dataset under this share of one device's memory.
DEVICE_MEMORY_FRACTION = 0.25
# Keep whole splits in host memory under this share of it; larger ones are streamed.
HOST_MEMORY_FRACTION = 0.5
# Where the data lives (choose_placement): every device, host memory, read as it is due, or
# the first of these that fits.
PLACEMENTS = ("auto", "device", "host", "stream")
# How an epoch's `repeats` passes are ordered (docs/method.md#training-recipe):
# "independent" (the reference) shuffles each pass on its own, so no image repeats
# within a pass; "joint" shuffles the stacked copies at once, so an image can land
# twice in one batch; "adjacent" shuffles the images once and puts each one's `repeats`
# copies next to each other, so they share a step (DeiT's RASampler: repeated
# augmentation as Hoffer et al. 2020 meant it, several augmentations of an image in a batch).
EPOCH_ORDERS = ("independent", "joint", "adjacent")
# How long an epoch is: "repeats" takes the whole order, `repeats` passes over the images;
# "images" takes only its first N samples (whole batches), as many as there are images, as
# DeiT's RASampler does: an epoch then holds about N / repeats images, `repeats` copies each.
EPOCH_LENGTHS = ("repeats", "images")


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh with a `data` axis over the first `num_devices` devices (0: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
        f"num_devices={num_devices} but only {len(devices)} device(s) are "
        "visible; lower --config.num_devices"
      )
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_global_batch(global_batch: int, num_devices: int, microbatches: int = 1) -> None:
  """ValueError unless the batch splits evenly over the devices, and each device's share
  evenly into `microbatches` slices."""
  if global_batch % num_devices:
    raise ValueError(
      f"global batch {global_batch} is not divisible by {num_devices} devices; "
      "set --config.batch_size to a multiple of the device count"
    )
  per_device = global_batch // num_devices
  if per_device % microbatches:
    raise ValueError(
      f"microbatches={microbatches} does not divide each device's {per_device} images of "
      f"the global batch {global_batch} ({num_devices} device(s)); set --config.microbatches "
      f"to a divisor of {per_device}"
    )


def check_epoch(repeats: int, epoch_order: str, epoch_length: str) -> None:
  """ValueError unless the order and length are known, and unless every pass of the order
  can be reached: the first N samples of independent passes are the first pass alone."""
  if epoch_order not in EPOCH_ORDERS:
    raise ValueError(f"epoch_order must be one of {EPOCH_ORDERS}, got {epoch_order!r}")
  if epoch_length not in EPOCH_LENGTHS:
    raise ValueError(f"epoch_length must be one of {EPOCH_LENGTHS}, got {epoch_length!r}")
  if epoch_length == "images" and epoch_order == "independent" and repeats > 1:
    raise ValueError(
      f'epoch_length="images" with epoch_order="independent" trains the first of the '
      f"{repeats} passes only; set --config.epoch_order=adjacent (or joint) to repeat "
      "images within the epoch, or --config.repeats=1"
    )


def steps_per_epoch(
  num_images: int, global_batch: int, repeats: int, epoch_length: str = "repeats"
) -> int:
  """Whole global batches in one epoch (see EPOCH_LENGTHS); ValueError if there are none."""
  samples = num_images * (repeats if epoch_length == "repeats" else 1)
  if samples < global_batch:
    raise ValueError(
      f"an epoch of {samples} samples ({num_images} training images, epoch_length="
      f"{epoch_length!r}, repeats={repeats}) makes no full batch of {global_batch}; lower "
      "--config.batch_size"
    )
  return samples // global_batch


def subset(images: np.ndarray, labels: np.ndarray, *, num_classes: int, per_class: int = 0):
  """Keeps labels < num_classes and, if per_class, the first per_class images of each."""
  keep = labels < num_classes
  if per_class:
    rank = np.zeros_like(labels)
    for c in np.unique(labels):
      where = np.flatnonzero(labels == c)
      rank[where] = np.arange(where.size)
    keep &= rank < per_class
  return images[keep], labels[keep]


RESIZE_CHUNK = 1024  # images resized at once: bounded float32 memory on large splits


def resize_images(images: np.ndarray, size) -> np.ndarray:
  """uint8 (N, H, W, C) images resized to `size` = (h, w): antialiased bilinear
  (`jax.image.resize`, as torchvision's default Resize), rounded to uint8. Images already
  of that size are returned as they are."""
  size = tuple(size)
  if images.shape[1:3] == size:
    return images
  out = np.empty((len(images), *size, images.shape[-1]), np.uint8)
  for start in range(0, len(images), RESIZE_CHUNK):
    chunk = jnp.asarray(images[start : start + RESIZE_CHUNK], jnp.float32)
    resized = jax.image.resize(chunk, (len(chunk), *size, chunk.shape[-1]), "linear")
    out[start : start + len(chunk)] = np.clip(np.rint(np.asarray(resized)), 0, 255)
  return out


def augment_config(config) -> augment_lib.AugmentConfig:
  """The per-image augmentation of a run config, with its dataset's statistics."""
  return augment_lib.AugmentConfig.from_config(
    config.augment, mean=config.dataset.mean, std=config.dataset.std
  )


def check_placement(config, spec: sources.DatasetSpec) -> str | None:
  """ValueError where the config's placement or host crop cannot be had for `spec`'s
  dataset (checked before anything is built); else why it can only be streamed, or None."""
  from lkca_jax.data import stream  # pylint: disable=import-outside-toplevel

  placement, stream_only = config.dataset.placement, stream.why_stream(config, spec)
  if spec.tfds_name is None and placement == "stream":
    raise ValueError(
      f"dataset {spec.name} is not a TFDS dataset and has no files to stream: set "
      "--config.dataset.placement to auto, device or host"
    )
  if spec.tfds_name is None and stream_only:
    raise ValueError(
      f"dataset {spec.name} is not a TFDS dataset and loads whole, but {stream_only}: "
      "leave that key at its default for this dataset"
    )
  _check_stream_only(placement, stream_only)
  return stream_only


def from_config(config, spec: sources.DatasetSpec, mesh: Mesh, key: jax.Array) -> Pipeline:
  """Loads `spec`'s splits as the run config says (subsets, placement) into a Pipeline.

  `spec.num_classes` may be below the dataset's own (config.dataset.classes):
  then only the first classes are kept. Images are brought to `spec.image_size`
  (config.dataset.image_size) when they are of another size. A TFDS dataset is placed by
  its metadata (`choose_placement`) before anything is decoded; streamed, it is a
  StreamPipeline.
  """
  data = config.dataset
  kwargs = dict(data_dir=data.data_dir, manual_dir=data.manual_dir, download=data.download)
  stream_only = check_placement(config, spec)
  placement = data.placement
  if spec.tfds_name is not None:
    from lkca_jax.data import stream  # pylint: disable=import-outside-toplevel

    files = {
      s: sources.split_files(spec.name, s, **kwargs) for s in (spec.train_split, spec.eval_split)
    }
    placement = choose_placement(
      placement, stream.decoded_bytes(config, spec, files), stream_only=stream_only
    )
    if placement == "stream":
      return stream.from_config(config, spec, mesh, key, files)
  train = subset(
    *sources.load_split(
      spec.name,
      spec.train_split,
      **kwargs,
      image_size=spec.image_size[0],
      classes=spec.num_classes,
    ),
    num_classes=spec.num_classes,
    per_class=data.train_per_class,
  )
  test = subset(
    *sources.load_split(
      spec.name,
      spec.eval_split,
      **kwargs,
      image_size=spec.image_size[0],
      classes=spec.num_classes,
    ),
    num_classes=spec.num_classes,
  )
  train, test = ((resize_images(x, spec.image_size), y) for x, y in (train, test))
  return Pipeline(
    mesh,
    train,
    test,
    global_batch=config.batch_size,
    repeats=config.repeats,
    augment=augment_config(config),
    key=key,
    placement=placement,
    epoch_order=config.epoch_order,
    epoch_length=config.epoch_length,
  )


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Host array → global jax.Array; works the same on one host and across hosts."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, sharding: NamedSharding):
  """`put` for every leaf of a pytree of arrays, PRNG keys included.

  Unlike jax.device_put, this also reaches the devices of other processes
  (each process supplies its own devices' copies).
  """

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(
        put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
      )
    return put(x, sharding)

  return jax.tree.map(one, tree)


def host_memory_bytes() -> int | None:
  """This machine's physical memory, or None where the OS does not say."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _check_stream_only(placement: str, stream_only: str | None) -> None:
  if stream_only and placement in ("device", "host"):
    raise ValueError(
      f"dataset.placement={placement!r} loads whole splits, but {stream_only}: "
      "set --config.dataset.placement=stream (or auto)"
    )


def choose_placement(
  placement: str, nbytes: int, *, stream_only: str | None = None, streamable: bool = True
) -> str:
  """Where the data lives; the one rule of what fits.

  "auto": "device" when the decoded splits (`nbytes` of uint8) fit in
  DEVICE_MEMORY_FRACTION of one device's memory (on CPU backends, device memory is
  host memory), else "host" when they fit in HOST_MEMORY_FRACTION of the host's,
  else "stream". `stream_only` says why the splits cannot be loaded whole (images
  not of the training size, a crop only the host can make): then "auto" streams and
  "device" or "host" is a ValueError. Splits already in memory (`streamable` False)
  stay there: "auto" is then "device" or "host", and "stream" a ValueError.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"dataset.placement must be one of {PLACEMENTS}, got {placement!r}")
  if not streamable:
    if placement == "stream":
      raise ValueError(
        "dataset.placement='stream' reads a TFDS dataset prepared as array_record; "
        "these splits are already in memory: use 'auto', 'device' or 'host'"
      )
    chosen = choose_placement(placement, nbytes)
    return "host" if chosen == "stream" else chosen
  _check_stream_only(placement, stream_only)
  if placement != "auto":
    return placement
  if stream_only:
    return "stream"
  host = host_memory_bytes()
  fits_host = host is None or nbytes <= HOST_MEMORY_FRACTION * host
  stats = jax.local_devices()[0].memory_stats() or {}  # another process's device has none
  limit = stats.get("bytes_limit")
  if limit is None:  # CPU backends: device memory is host memory
    return "device" if fits_host else "stream"
  if nbytes <= DEVICE_MEMORY_FRACTION * limit:
    return "device"
  return "host" if fits_host else "stream"


@dataclasses.dataclass
class Split:
  """One split's uint8 images (N, H, W, C) and int32 labels, on device or host."""

  images: jax.Array | np.ndarray
  labels: jax.Array | np.ndarray
  on_device: bool

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])


class Pipeline:
  """Produces sharded training and evaluation batches for one dataset."""

  def __init__(
    self,
    mesh: Mesh,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    global_batch: int,
    repeats: int,
    augment: augment_lib.AugmentConfig,
    key: jax.Array,
    placement: str = "auto",
    epoch_order: str = "independent",
    epoch_length: str = "repeats",
  ):
    check_global_batch(global_batch, mesh.devices.size)
    nbytes = np.asarray(train[0]).nbytes + np.asarray(test[0]).nbytes
    self.placement = choose_placement(placement, nbytes, streamable=False)
    on_device = None if self.placement != "device" else NamedSharding(mesh, P())
    self.train = self._place(*train, on_device)
    self.test = self._place(*test, on_device)
    self._setup(mesh, global_batch, repeats, augment, key, epoch_order, epoch_length)

  def _setup(self, mesh, global_batch, repeats, augment, key, epoch_order, epoch_length) -> None:
    """What every placement shares: sizes, keys, shardings, the jitted order and augmentation.

    Needs `self.train` and `self.test` (their sizes).
    """
    check_global_batch(global_batch, mesh.devices.size)
    check_epoch(repeats, epoch_order, epoch_length)
    self.order = epoch_order
    self.epoch_length = epoch_length
    self.mesh = mesh
    self.global_batch = global_batch
    self.repeats = repeats
    self.augment = augment
    # One key: one run. A stack of K keys: K runs, each with its own order and augmentation.
    self.num_runs = None if key.ndim == 0 else key.shape[0]
    keys = jax.random.split(key) if key.ndim == 0 else jax.vmap(jax.random.split)(key).T
    self.order_key, self.augment_key = keys
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    # What train batches are placed as: (K, batch, ...) with a run axis.
    self.train_sharding = (
      self.batch_sharding if self.num_runs is None else NamedSharding(mesh, P(None, DATA_AXIS))
    )
    self.steps_per_epoch = steps_per_epoch(self.train.size, global_batch, repeats, epoch_length)
    self.eval_steps = -(-self.test.size // global_batch)
    batch, order, gather, augment = (
      self.batch_sharding,
      self._order,
      self._gather_and_augment,
      self._augment_images,
    )
    if self.num_runs is not None:  # the same functions, over the run axis of the keys
      order = jax.vmap(order, in_axes=(0, None))
      gather = jax.vmap(gather, in_axes=(0, None, None, 0, None, None))
      augment = jax.vmap(augment, in_axes=(0, 0, 0, None))
    self._epoch_order = jax.jit(
      functools.partial(order, self.order_key), out_shardings=self.replicated
    )
    self._gather_augment = jax.jit(
      functools.partial(gather, self.augment_key), out_shardings=self.train_sharding
    )
    self._augment = jax.jit(
      functools.partial(augment, self.augment_key), out_shardings=self.train_sharding
    )
    self._gather_eval = jax.jit(self._gather_and_normalize, out_shardings=batch)
    self._normalize = jax.jit(self._normalize_images, out_shardings=batch)

  @staticmethod
  def _place(images, labels, replicated: NamedSharding | None) -> Split:
    """On every device when given their `replicated` sharding, else in host memory."""
    images = np.asarray(images, np.uint8)
    labels = np.asarray(labels, np.int32)
    if replicated is not None:
      return Split(put(images, replicated), put(labels, replicated), True)
    return Split(images, labels, False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])

  def close(self) -> None:
    """Ends what reads the data in the background: nothing here (see StreamPipeline)."""

  # --- training -------------------------------------------------------------
  def _order(self, order_key, epoch):
    key = jax.random.fold_in(order_key, epoch)  # a pure function of (key, epoch)
    if self.order == "joint":
      copies = jnp.tile(jnp.arange(self.train.size, dtype=jnp.int32), self.repeats)
      return jax.random.permutation(key, copies)
    if self.order == "adjacent":
      shuffled = jax.random.permutation(key, self.train.size).astype(jnp.int32)
      return jnp.repeat(shuffled, self.repeats)
    passes = jax.vmap(lambda k: jax.random.permutation(k, self.train.size))(
      jax.random.split(key, self.repeats)
    )
    return passes.reshape(-1).astype(jnp.int32)

  def epoch_order(self, epoch: int) -> jax.Array:
    """The order of one epoch: `repeats` passes over the training set (see EPOCH_ORDERS), of
    which the epoch trains the first `steps_per_epoch` batches (see EPOCH_LENGTHS)."""
    return self._epoch_order(epoch)

  def _augment_images(self, augment_key, images, labels, step):
    # Same keys as augment_batch(fold_in(key, step), images); shard_map keeps each
    # device on its own slice of the batch (AutoAugment loops over images on CPU,
    # and a loop over a sharded axis would otherwise gather the whole batch).
    keys = jax.random.split(jax.random.fold_in(augment_key, step), images.shape[0])
    augment = jax.shard_map(
      lambda k, x: augment_lib.augment_with_keys(k, x, self.augment),
      mesh=self.mesh,
      in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
      out_specs=P(DATA_AXIS),
    )
    return {"image": augment(keys, images), "label": labels}

  def _gather_and_augment(self, augment_key, images, labels, order, step_in_epoch, step):
    idx = jax.lax.dynamic_slice(order, (step_in_epoch * self.global_batch,), (self.global_batch,))
    idx = jax.lax.with_sharding_constraint(idx, self.batch_sharding)
    return self._augment_images(augment_key, images[idx], labels[idx], step)

  def train_batch(self, order: jax.Array, step: int) -> dict:
    """The augmented batch of global step `step`, given its epoch's `order` (of every run)."""
    step_in_epoch = step % self.steps_per_epoch
    if self.train.on_device:
      return self._gather_augment(self.train.images, self.train.labels, order, step_in_epoch, step)
    start = step_in_epoch * self.global_batch
    idx = np.asarray(order[..., start : start + self.global_batch])
    return self._augment(
      put(self.train.images[idx], self.train_sharding),
      put(self.train.labels[idx], self.train_sharding),
      step,
    )

  # --- evaluation -----------------------------------------------------------
  def _normalize_images(self, images):
    return augment_lib.normalize(images, self.augment.mean, self.augment.std)

  def _eval_indices(self, eval_step, size, xp):
    idx = eval_step * self.global_batch + xp.arange(self.global_batch)
    return xp.minimum(idx, size - 1), idx < size

  def _gather_and_normalize(self, images, labels, eval_step):
    idx, mask = self._eval_indices(eval_step, labels.shape[0], jnp)
    return {"image": self._normalize_images(images[idx]), "label": labels[idx], "mask": mask}

  def eval_batches(self):
    """The whole test split in global batches; padding rows have mask False."""
    for k in range(self.eval_steps):
      if self.test.on_device:
        yield self._gather_eval(self.test.images, self.test.labels, k)
        continue
      idx, mask = self._eval_indices(k, self.test.size, np)
      yield {
        "image": self._normalize(put(self.test.images[idx], self.batch_sharding)),
        "label": put(self.test.labels[idx], self.batch_sharding),
        "mask": put(mask, self.batch_sharding),
      }
