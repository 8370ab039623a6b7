"""The per-image training augmentation, and eval normalisation.

The steps run in the order of STAGES (docs/method.md, "Training recipe"):
horizontal flip (p 0.5) -> random crop after zero padding -> AutoAugment (or
RandAugment) -> scale to [0, 1] and normalise -> random erasing. Everything is keyed by one
jax PRNG key per image, so augment_image works eagerly, under jit and under
vmap, and augment_batch gives each image what augment_image gives it for the
same key (bit for bit on CPU; see augment_batch). The benchmark and the
preview read the stages from STAGES too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lkca_jax.augment import autoaugment as autoaugment_lib
from lkca_jax.augment import randaugment as randaugment_lib
from lkca_jax.backend import by_backend

# Random erasing as the reference trainer does it (docs/method.md#training-recipe):
# aspect ratio (height / width) uniform in [0.3, 1/0.3], up to 100 attempts to fit a box,
# the box filled with the dataset mean written into the normalised image. The other values
# are torchvision RandomErasing's (log-uniform aspect, 10 attempts) and a zero fill, and
# timm's "pixel" mode (DeiT's): N(0, 1) noise drawn for each pixel and channel.
ERASING_ATTEMPTS = 100
ERASING_ASPECT = (0.3, 1 / 0.3)
ASPECT_SAMPLINGS = ("uniform", "log_uniform")
ERASING_FILLS = ("mean", "zero", "pixel")


def _floats(name, values, length=None) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in values)
  except TypeError:
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
  if length is not None and len(values) != length:
    raise ValueError(f"{name} must have {length} numbers, got {values!r}")
  return values


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
  """What augment_image does; hashable, so it can be a static jit argument.

  The defaults switch every random step off (scale and normalise only);
  mean and std (per channel, of [0, 1] images) have no default.
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool = False
  crop_padding: int = 0  # 0: no crop
  # An AutoAugment policy ("cifar10", "svhn", "imagenet"), a RandAugment in timm's form
  # ("rand-m9-mstd0.5-inc1", randaugment.SPEC_FORM), or None.
  autoaugment: str | None = None
  random_erasing: float = 0.0  # probability; 0: off
  erasing_area: tuple[float, float] = (0.02, 0.4)  # fraction of the image
  erasing_aspect: tuple[float, float] = ERASING_ASPECT  # height / width
  erasing_aspect_sampling: str = "uniform"  # or "log_uniform" (torchvision)
  erasing_attempts: int = ERASING_ATTEMPTS  # tries to fit a box, then leave the image
  erasing_fill: str = "mean"  # the dataset mean, in the normalised image; "zero"; "pixel"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("mean", _floats("mean", self.mean))
    set_("std", _floats("std", self.std))
    if len(self.mean) != len(self.std) or not self.mean:
      raise ValueError(
        f"mean and std need one value per channel, got mean={self.mean}, std={self.std}"
      )
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std}")
    set_("flip", bool(self.flip))
    if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
      raise ValueError(f"crop_padding must be a whole number >= 0, got {self.crop_padding!r}")
    set_("crop_padding", int(self.crop_padding))
    if isinstance(self.autoaugment, str) and self.autoaugment.lower() == "none":
      set_("autoaugment", None)
    if randaugment_lib.is_spec(self.autoaugment):
      randaugment_lib.parse(self.autoaugment)  # ValueError naming the form
    elif self.autoaugment is not None and self.autoaugment not in autoaugment_lib.POLICIES:
      raise ValueError(
        f"autoaugment must be one of {sorted(autoaugment_lib.POLICIES)}, a RandAugment "
        f"{randaugment_lib.SPEC_FORM}, or None, got {self.autoaugment!r}"
      )
    set_("random_erasing", float(self.random_erasing))
    if not 0.0 <= self.random_erasing <= 1.0:
      raise ValueError(f"random_erasing is a probability in [0, 1], got {self.random_erasing}")
    set_("erasing_area", _floats("erasing_area", self.erasing_area, 2))
    low, high = self.erasing_area
    if not 0.0 < low <= high <= 1.0:
      raise ValueError(f"erasing_area needs 0 < low <= high <= 1, got {self.erasing_area}")
    set_("erasing_aspect", _floats("erasing_aspect", self.erasing_aspect, 2))
    low, high = self.erasing_aspect
    if not 0.0 < low <= high:
      raise ValueError(f"erasing_aspect needs 0 < low <= high, got {self.erasing_aspect}")
    if self.erasing_aspect_sampling not in ASPECT_SAMPLINGS:
      raise ValueError(
        f"erasing_aspect_sampling must be one of {ASPECT_SAMPLINGS}, got "
        f"{self.erasing_aspect_sampling!r}"
      )
    attempts = self.erasing_attempts
    if isinstance(attempts, bool) or int(attempts) != attempts or attempts < 1:
      raise ValueError(f"erasing_attempts must be a whole number >= 1, got {attempts!r}")
    set_("erasing_attempts", int(attempts))
    if self.erasing_fill not in ERASING_FILLS:
      raise ValueError(f"erasing_fill must be one of {ERASING_FILLS}, got {self.erasing_fill!r}")

  @property
  def policy_name(self) -> str:
    """What `autoaugment` names: "RandAugment" or "AutoAugment"."""
    return "RandAugment" if randaugment_lib.is_spec(self.autoaugment) else "AutoAugment"

  @classmethod
  def from_config(cls, config, **overrides) -> AugmentConfig:
    """From a ConfigDict (or mapping) with the field names as keys.

    Keyword overrides add or replace keys, e.g. the dataset's statistics:
    AugmentConfig.from_config(config.augment, mean=config.dataset.mean,
                              std=config.dataset.std)
    """
    values = dict(config.items() if hasattr(config, "items") else config)
    values.update(overrides)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown augment key(s) {unknown}; known keys are {sorted(known)}")
    missing = sorted({"mean", "std"} - set(values))
    if missing:
      raise ValueError(
        f"augment config lacks {missing}; pass them, e.g. "
        "from_config(config.augment, mean=..., std=...)"
      )
    return cls(**values)


def _statistics(values, channels, name) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.shape[0] not in (1, channels):
    raise ValueError(
      f"{name} has {values.size} values for {channels}-channel images; give 1 or {channels}"
    )
  return values


def normalize(images, mean, std):
  """uint8 (..., C) -> float32 (x / 255 - mean) / std, per channel.

  mean and std are constants (one value, or one per channel).
  """
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(
      f"normalize expects uint8 images, got {images.dtype}; convert with .astype(np.uint8)"
    )
  channels = images.shape[-1]
  offset = (255 * _statistics(mean, channels, "mean")).astype(np.float32)
  scale = (255 * _statistics(std, channels, "std")).astype(np.float32)
  # (x - 255 mean) / (255 std): no product feeds an add, so no FMA rounding.
  return (images.astype(jnp.float32) - offset) / scale


def random_flip(rng, image):
  """Mirrors left-right with probability 0.5."""
  return jnp.where(jax.random.bernoulli(rng), image[:, ::-1], image)


def random_crop(rng, image, padding):
  """torchvision RandomCrop(size, padding): zero-pad, then a uniform window."""
  if padding == 0:
    return image
  height, width, channels = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(rng, (2,), 0, 2 * padding + 1)
  return lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def erasing_box(
  rng,
  height,
  width,
  probability,
  area=(0.02, 0.4),
  aspect=ERASING_ASPECT,
  *,
  sampling="uniform",
  attempts=ERASING_ATTEMPTS,
):
  """The reference's RandomErasing box, all attempts drawn at once.

  Returns (erase, top, left, box_height, box_width). An attempt draws an area
  fraction uniformly in `area` and an aspect (height / width) in `aspect`,
  uniformly (sampling="uniform", the reference) or log-uniformly ("log_uniform",
  torchvision); box height round(sqrt(area * aspect)), width round(sqrt(area /
  aspect)). The first of `attempts` whose box fits strictly inside is used, with
  a uniform position. erase is False with probability 1 - p or if none fits.
  """
  if sampling not in ASPECT_SAMPLINGS:
    raise ValueError(f"sampling must be one of {ASPECT_SAMPLINGS}, got {sampling!r}")
  # One uniform draw for everything (cheaper to compile than five): the areas
  # (pixels), the aspects (or their logs), then apply / top / left in [0, 1).
  warp = math.log if sampling == "log_uniform" else float
  low = [area[0] * height * width] * attempts + [warp(aspect[0])] * attempts + [0.0] * 3
  high = [area[1] * height * width] * attempts + [warp(aspect[1])] * attempts + [1.0] * 3
  draws = jax.random.uniform(
    rng, (2 * attempts + 3,), minval=jnp.asarray(low), maxval=jnp.asarray(high)
  )
  target, ratio = draws[:attempts], draws[attempts : 2 * attempts]
  if sampling == "log_uniform":
    ratio = jnp.exp(ratio)
  box_heights = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  box_widths = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (box_heights < height) & (box_widths < width)
  first = jnp.argmax(fits)
  box_height, box_width = box_heights[first], box_widths[first]
  apply, top, left = draws[2 * attempts :]
  erase = (apply < probability) & jnp.any(fits)
  top = jnp.minimum(
    jnp.floor(top * (height - box_height + 1)).astype(jnp.int32), height - box_height
  )  # uniform in 0 .. H - h
  left = jnp.minimum(jnp.floor(left * (width - box_width + 1)).astype(jnp.int32), width - box_width)
  return erase, top, left, box_height, box_width


def random_erasing(
  rng,
  image,
  probability,
  area=(0.02, 0.4),
  aspect=ERASING_ASPECT,
  *,
  fill=0.0,
  sampling="uniform",
  attempts=ERASING_ATTEMPTS,
):
  """Fills a random box of a normalised float (H, W, C) image with `fill`, with probability p.

  `fill` is one value or one per channel, or "pixel": N(0, 1) noise per pixel and channel
  (timm's mode="pixel", drawn with `fold_in(rng, 1)`). The reference writes the dataset
  mean (the values of [0, 1] images) into the normalised image (AugmentConfig's
  erasing_fill="mean"); 0 there is the mean colour, a different augmentation
  (docs/method.md#training-recipe).
  """
  height, width, channels = image.shape
  erase, top, left, box_height, box_width = erasing_box(
    rng, height, width, probability, area, aspect, sampling=sampling, attempts=attempts
  )
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (
    (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width) & erase
  )
  if isinstance(fill, str) and fill == "pixel":
    values = jax.random.normal(jax.random.fold_in(rng, 1), image.shape, image.dtype)
  else:
    values = jnp.asarray(np.broadcast_to(np.asarray(fill, np.float32), (channels,)), image.dtype)
  return jnp.where(inside[..., None], values, image)


# --- the stages, in order -------------------------------------------------------


def _flip(key, image, cfg):
  del cfg
  return random_flip(key, image)


def _crop(key, image, cfg):
  return random_crop(key, image, cfg.crop_padding)


def _autoaugment(key, image, cfg):
  if randaugment_lib.is_spec(cfg.autoaugment):
    augment = randaugment_lib.parse(cfg.autoaugment)
    return randaugment_lib.apply(key, image, augment, randaugment_lib.mean_fill(cfg.mean))
  return autoaugment_lib.apply_policy(key, image, cfg.autoaugment)


def _autoaugment_batch(keys, images, cfg):
  """AutoAugment or RandAugment over a batch in the form of the platform it is lowered for
  (by_backend)."""

  def per_image_loop(keys, images):
    # On the CPU: vmap would turn the policy's lax.switch into a select that computes all
    # its ops (14, or RandAugment's 15) for every image, twice; in a loop each image runs
    # only the ops it drew.
    return lax.map(lambda args: _autoaugment(*args, cfg), (keys, images))

  def batched_select(keys, images):
    # Elsewhere: a loop of B small kernels is launch-bound on GPUs and TPUs; the select
    # does 28x (RandAugment: 30x) the arithmetic in a few large kernels (not yet timed on
    # one: benchmarks/gpu_check.sh's autoaugment and randaugment parts).
    return jax.vmap(lambda key, image: _autoaugment(key, image, cfg))(keys, images)

  return by_backend(per_image_loop, batched_select, keys, images)


def _normalize(key, images, cfg):
  del key  # elementwise: the same for one image and for a batch
  return normalize(images, cfg.mean, cfg.std)


def _erase(key, image, cfg):
  fill = {"mean": cfg.mean, "zero": 0.0, "pixel": "pixel"}[cfg.erasing_fill]
  return random_erasing(
    key,
    image,
    cfg.random_erasing,
    cfg.erasing_area,
    cfg.erasing_aspect,
    fill=fill,
    sampling=cfg.erasing_aspect_sampling,
    attempts=cfg.erasing_attempts,
  )


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the per-image augmentation.

  apply(key, image, cfg) does it to one image; apply_batch(keys, images, cfg)
  to a batch with one key per image (default: vmap of apply). `switch` is the
  AugmentConfig field that turns the step on and `off` that field's value when
  it is off; a stage without a switch always runs. A keyed stage gets its own
  key of every image's key, whether it is on or not, so one step's randomness
  does not depend on which others are on; a keyless one gets None.
  """

  name: str
  apply: Callable[..., jax.Array]
  _: dataclasses.KW_ONLY
  switch: str | None = None
  off: Any = None
  keyed: bool = True
  apply_batch: Callable[..., jax.Array] | None = None
  description: str = ""  # str.format template of `cfg`, for display

  def enabled(self, cfg: AugmentConfig) -> bool:
    return self.switch is None or getattr(cfg, self.switch) != self.off

  def alone(self, cfg: AugmentConfig) -> AugmentConfig:
    """cfg with only this stage (and those without a switch) on."""
    off = stages_off(cfg)
    if self.switch is None:
      return off
    return dataclasses.replace(off, **{self.switch: getattr(cfg, self.switch)})

  def describe(self, cfg: AugmentConfig) -> str:
    return self.description.format(cfg=cfg)

  def run(self, key, images, cfg: AugmentConfig, batched: bool):
    if not batched:
      return self.apply(key, images, cfg)
    if self.apply_batch is not None:
      return self.apply_batch(key, images, cfg)
    return jax.vmap(lambda k, image: self.apply(k, image, cfg))(key, images)


STAGES = (
  Stage("flip", _flip, switch="flip", off=False, description="random flip"),
  Stage(
    "crop", _crop, switch="crop_padding", off=0, description="pad-{cfg.crop_padding} random crop"
  ),
  Stage(
    "autoaugment",
    _autoaugment,
    switch="autoaugment",
    off=None,
    apply_batch=_autoaugment_batch,
    description="{cfg.policy_name} ({cfg.autoaugment})",
  ),
  Stage("normalize", _normalize, keyed=False, apply_batch=_normalize, description="normalise"),
  Stage(
    "random_erasing",
    _erase,
    switch="random_erasing",
    off=0.0,
    description="random erasing p={cfg.random_erasing:g}",
  ),
)
NUM_KEYS = sum(stage.keyed for stage in STAGES)  # keys split from each image's key


def enabled_stages(cfg: AugmentConfig) -> tuple[Stage, ...]:
  """The stages that cfg turns on, in the order they run."""
  return tuple(stage for stage in STAGES if stage.enabled(cfg))


def stages_off(cfg: AugmentConfig) -> AugmentConfig:
  """cfg with every switchable stage off: normalisation only."""
  return dataclasses.replace(
    cfg, **{stage.switch: stage.off for stage in STAGES if stage.switch is not None}
  )


def _apply_stages(stage_keys, images, cfg: AugmentConfig, batched: bool):
  """The enabled STAGES in order; stage_keys[k] is the k-th keyed stage's key (or keys)."""
  keys = iter(stage_keys)
  for stage in STAGES:
    key = next(keys) if stage.keyed else None
    if stage.enabled(cfg):
      images = stage.run(key, images, cfg, batched)
  return images


def augment_image(rng, image, cfg: AugmentConfig):
  """One uint8 (H, W, C) image (C = 3 or 1) -> float32 (H, W, C), through STAGES."""
  image = jnp.asarray(image)
  if image.ndim != 3 or image.dtype != jnp.uint8:
    raise ValueError(
      f"augment_image expects one uint8 (H, W, C) image, got "
      f"{image.dtype} {image.shape}; use augment_batch for (B, H, W, C)"
    )
  return _apply_stages(jax.random.split(rng, NUM_KEYS), image, cfg, batched=False)


def augment_batch(rng, images, cfg: AugmentConfig):
  """uint8 (B, H, W, C) -> float32; image i uses key i of split(rng, B).

  Runs STAGES as augment_image does, each over the whole batch: normalisation
  at once, the other stages vmapped, except AutoAugment (or RandAugment), whose
  lax.switch over its 14 (15) ops vmap turns into a select that computes every op for
  every image (twice, once per op drawn). So where it is lowered for the CPU it runs
  under lax.map, each image running only the ops it drew; for GPUs and TPUs it
  is vmapped (a loop of small kernels is launch-bound there), chosen by
  `lkca_jax.backend.by_backend`. Both forms equal augment_image with the same keys
  bit for bit on the CPU (tested, the vmapped one under `backend.forms("plain")`).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"augment_batch expects uint8 (B, H, W, C) images, got {images.shape}")
  return augment_with_keys(jax.random.split(rng, images.shape[0]), images, cfg)


def augment_with_keys(keys, images, cfg: AugmentConfig):
  """augment_batch with the per-image keys given: image i uses keys[i] (for shard_map)."""
  # The same NUM_KEYS keys per image as augment_image, stage-major.
  stage_keys = jnp.moveaxis(jax.vmap(lambda key: jax.random.split(key, NUM_KEYS))(keys), 1, 0)
  return _apply_stages(stage_keys, images, cfg, batched=True)
