"""CIFAR-100 with the reference recipe.

python main.py --config configs/cifar100.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "cifar100"
  config.dataset.mean = (0.5070, 0.4865, 0.4409)
  config.dataset.std = (0.2673, 0.2564, 0.2762)
  return config
