"""SVHN (svhn_cropped, train split only) with the reference recipe.

python main.py --config configs/svhn.py --config.model=lkca_t
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "svhn"
  config.dataset.mean = (0.4377, 0.4438, 0.4728)
  config.dataset.std = (0.1980, 0.2010, 0.1970)
  config.augment.autoaugment = "svhn"
  return config
