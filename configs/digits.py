"""The embedded default: scikit-learn's handwritten digits, on any CPU in minutes.

1,797 real 8x8 grayscale images (a fixed stratified 80/20 split), patch 1,
so the grid is 8x8 and the LKCA kernel 15x15, as on CIFAR. The recipe is the
reference one, shortened, with augmentations that respect digits (no flip,
no AutoAugment).
    python main.py --config configs/digits.py            # `make train`
    python main.py --config configs/digits.py --config.model=vit_1m
"""

from ml_collections.config_dict import placeholder

from configs import default


def get_config():
  config = default.get_config()
  config.model = "lkca_t"
  config.patch_size = 1
  config.dataset.name = "digits"
  # Per-channel statistics of the train split, on [0, 1].
  config.dataset.mean = (0.3054,)
  config.dataset.std = (0.3760,)
  config.augment.flip = False
  config.augment.crop_padding = 1
  config.augment.autoaugment = placeholder(str)  # unset: off; --config.augment.autoaugment=svhn
  config.augment.random_erasing = 0.0
  # 9 epochs x 67 steps (3 x 1,437 images / 64): about 4 minutes on 2 CPU cores.
  config.batch_size = 64
  config.num_epochs = 9
  config.optimizer.warmup_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
