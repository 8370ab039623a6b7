"""Per-image training augmentation, in pure JAX (docs/method.md, "Training recipe").

cfg = AugmentConfig.from_config(config.augment, mean=..., std=...)
batch = augment_batch(key, images_uint8, cfg)   # float32 (B, H, W, C)
test = normalize(images_uint8, cfg.mean, cfg.std)
"""

from lkca_jax.augment import autoaugment, ops, randaugment
from lkca_jax.augment.autoaugment import POLICIES
from lkca_jax.augment.transforms import (
  STAGES,
  AugmentConfig,
  Stage,
  augment_batch,
  augment_image,
  augment_with_keys,
  enabled_stages,
  erasing_box,
  normalize,
  random_crop,
  random_erasing,
  random_flip,
  stages_off,
)

__all__ = [
  "STAGES",
  "AugmentConfig",
  "POLICIES",
  "Stage",
  "augment_batch",
  "augment_image",
  "augment_with_keys",
  "autoaugment",
  "enabled_stages",
  "erasing_box",
  "normalize",
  "ops",
  "random_crop",
  "random_erasing",
  "random_flip",
  "randaugment",
  "stages_off",
]
