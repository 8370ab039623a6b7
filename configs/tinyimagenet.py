"""Tiny-ImageNet (64x64, 200 classes, patch 8) with the reference recipe.

Online, TFDS downloads the official zip. Offline, point at the folder that
holds tiny-imagenet-200.zip:
    python main.py --config configs/tinyimagenet.py \\
        --config.dataset.manual_dir=/path/to/folder/with/zip
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "tiny_imagenet"
  config.dataset.mean = (0.4802, 0.4481, 0.3975)
  config.dataset.std = (0.2770, 0.2691, 0.2821)
  config.augment.autoaugment = "imagenet"
  return config
