"""Per-image training augmentation (spec sections 3 and 4), in pure JAX.

    cfg = AugmentConfig.from_config(config.augment, mean=..., std=...)
    batch = augment_batch(key, images_uint8, cfg)   # float32 (B, H, W, C)
    test = normalize(images_uint8, cfg.mean, cfg.std)
"""
from lkca_jax.augment import autoaugment, ops
from lkca_jax.augment.autoaugment import POLICIES
from lkca_jax.augment.transforms import (AugmentConfig, augment_batch, augment_image,
                                         augment_with_keys, erasing_box, normalize,
                                         random_crop, random_erasing, random_flip)

__all__ = ["AugmentConfig", "POLICIES", "augment_batch", "augment_image", "augment_with_keys",
           "autoaugment",
           "erasing_box", "normalize", "ops", "random_crop", "random_erasing",
           "random_flip"]
