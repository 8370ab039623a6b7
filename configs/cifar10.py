"""CIFAR-10 with the reference recipe.

python main.py --config configs/cifar10.py --config.model=vit
"""

from configs import default


def get_config():
  return default.get_config()  # the recipe's own default is CIFAR-10
