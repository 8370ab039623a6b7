"""The per-image training augmentation of spec section 3, and eval normalisation.

Order: horizontal flip (p 0.5) -> random crop after zero padding ->
AutoAugment -> scale to [0, 1] -> normalise -> random erasing. Everything is
keyed by one jax PRNG key per image, so augment_image works eagerly, under jit
and under vmap (augment_batch) with the same result for the same key.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lkca_jax.augment import autoaugment as autoaugment_lib

ERASING_ATTEMPTS = 10  # torchvision RandomErasing: then give up on the image


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
  autoaugment: str | None = None  # "cifar10", "svhn", "imagenet" or None
  random_erasing: float = 0.0  # probability; 0: off
  erasing_area: tuple[float, float] = (0.02, 0.4)  # fraction of the image
  erasing_aspect: tuple[float, float] = (0.3, 3.3)  # height / width, log-uniform

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("mean", _floats("mean", self.mean))
    set_("std", _floats("std", self.std))
    if len(self.mean) != len(self.std) or not self.mean:
      raise ValueError(f"mean and std need one value per channel, got "
                       f"mean={self.mean}, std={self.std}")
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std}")
    set_("flip", bool(self.flip))
    if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
      raise ValueError(f"crop_padding must be a whole number >= 0, got {self.crop_padding!r}")
    set_("crop_padding", int(self.crop_padding))
    if isinstance(self.autoaugment, str) and self.autoaugment.lower() == "none":
      set_("autoaugment", None)
    if self.autoaugment is not None and self.autoaugment not in autoaugment_lib.POLICIES:
      raise ValueError(f"autoaugment must be one of {sorted(autoaugment_lib.POLICIES)} "
                       f"or None, got {self.autoaugment!r}")
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

  @classmethod
  def from_config(cls, config, **overrides) -> "AugmentConfig":
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
      raise ValueError(f"augment config lacks {missing}; pass them, e.g. "
                       "from_config(config.augment, mean=..., std=...)")
    return cls(**values)


def _statistics(values, channels, name) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.shape[0] not in (1, channels):
    raise ValueError(f"{name} has {values.size} values for {channels}-channel "
                     f"images; give 1 or {channels}")
  return values


def normalize(images, mean, std):
  """uint8 (..., C) -> float32 (x / 255 - mean) / std, per channel.

  mean and std are constants (one value, or one per channel).
  """
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize expects uint8 images, got {images.dtype}; "
                     "convert with .astype(np.uint8)")
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


def erasing_box(rng, height, width, probability, area=(0.02, 0.4),
                aspect=(0.3, 3.3)):
  """torchvision RandomErasing.get_params, all 10 attempts drawn at once.

  Returns (erase, top, left, box_height, box_width). An attempt draws an area
  fraction uniformly in `area` and an aspect (height / width) log-uniformly in
  `aspect`; the first whose rounded box fits strictly inside is used, with a
  uniform position. erase is False with probability 1 - p or if none fits.
  """
  # One uniform draw for everything (cheaper to compile than five):
  # 10 areas (pixels), 10 log aspects, then apply / top / left in [0, 1).
  attempts = ERASING_ATTEMPTS
  low = [area[0] * height * width] * attempts + [math.log(aspect[0])] * attempts + [0.0] * 3
  high = [area[1] * height * width] * attempts + [math.log(aspect[1])] * attempts + [1.0] * 3
  draws = jax.random.uniform(rng, (2 * attempts + 3,), minval=jnp.asarray(low),
                             maxval=jnp.asarray(high))
  target, ratio = draws[:attempts], jnp.exp(draws[attempts:2 * attempts])
  box_heights = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  box_widths = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (box_heights < height) & (box_widths < width)
  first = jnp.argmax(fits)
  box_height, box_width = box_heights[first], box_widths[first]
  apply, top, left = draws[2 * attempts:]
  erase = (apply < probability) & jnp.any(fits)
  top = jnp.minimum(jnp.floor(top * (height - box_height + 1)).astype(jnp.int32),
                    height - box_height)  # uniform in 0 .. H - h
  left = jnp.minimum(jnp.floor(left * (width - box_width + 1)).astype(jnp.int32),
                     width - box_width)
  return erase, top, left, box_height, box_width


def random_erasing(rng, image, probability, area=(0.02, 0.4), aspect=(0.3, 3.3)):
  """Zeroes a random box of a normalised float (H, W, C) image, with probability p.

  Zero after normalisation is the clean form of the reference's fill with the
  dataset mean (spec section 3).
  """
  height, width, _ = image.shape
  erase, top, left, box_height, box_width = erasing_box(
      rng, height, width, probability, area, aspect)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = ((rows >= top) & (rows < top + box_height)
            & (cols >= left) & (cols < left + box_width) & erase)
  return jnp.where(inside[..., None], jnp.zeros((), image.dtype), image)


def augment_image(rng, image, cfg: AugmentConfig):
  """One uint8 (H, W, C) image (C = 3 or 1) -> float32 (H, W, C), spec order."""
  image = jnp.asarray(image)
  if image.ndim != 3 or image.dtype != jnp.uint8:
    raise ValueError(f"augment_image expects one uint8 (H, W, C) image, got "
                     f"{image.dtype} {image.shape}; use augment_batch for (B, H, W, C)")
  # Always four keys, so a step's randomness does not depend on which are on.
  flip_key, crop_key, policy_key, erase_key = jax.random.split(rng, 4)
  if cfg.flip:
    image = random_flip(flip_key, image)
  image = random_crop(crop_key, image, cfg.crop_padding)
  if cfg.autoaugment is not None:
    image = autoaugment_lib.apply_policy(policy_key, image, cfg.autoaugment)
  normalised = normalize(image, cfg.mean, cfg.std)
  if cfg.random_erasing > 0:
    normalised = random_erasing(erase_key, normalised, cfg.random_erasing,
                                cfg.erasing_area, cfg.erasing_aspect)
  return normalised


def augment_batch(rng, images, cfg: AugmentConfig):
  """uint8 (B, H, W, C) -> float32; image i uses key i of split(rng, B).

  Equal, bit for bit, to vmap(augment_image) over the keys. AutoAugment runs
  under lax.map instead of vmap: vmap turns its lax.switch over the 14 ops into
  a select that computes every op for every image (twice, one per sub-policy
  op); in a loop each image runs only the op it drew.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"augment_batch expects uint8 (B, H, W, C) images, got {images.shape}")
  return augment_with_keys(jax.random.split(rng, images.shape[0]), images, cfg)


def augment_with_keys(keys, images, cfg: AugmentConfig):
  """augment_batch with the per-image keys given: image i uses keys[i] (for shard_map)."""
  # The same four keys per image as augment_image.
  flip_keys, crop_keys, policy_keys, erase_keys = jnp.moveaxis(
      jax.vmap(lambda key: jax.random.split(key, 4))(keys), 1, 0)
  if cfg.flip:
    images = jax.vmap(random_flip)(flip_keys, images)
  images = jax.vmap(lambda key, image: random_crop(key, image, cfg.crop_padding))(
      crop_keys, images)
  if cfg.autoaugment is not None:
    policy = lambda key, image: autoaugment_lib.apply_policy(key, image, cfg.autoaugment)
    if jax.default_backend() == "cpu":
      images = lax.map(lambda args: policy(*args), (policy_keys, images))
    else:
      # A loop of B small kernels is launch-bound on GPUs/TPUs; the batched
      # select does 28x the arithmetic but in a few large kernels (not yet
      # measured on an accelerator here).
      images = jax.vmap(policy)(policy_keys, images)
  normalised = normalize(images, cfg.mean, cfg.std)
  if cfg.random_erasing > 0:
    normalised = jax.vmap(lambda key, image: random_erasing(
        key, image, cfg.random_erasing, cfg.erasing_area, cfg.erasing_aspect))(erase_keys, normalised)
  return normalised
