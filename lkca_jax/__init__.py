"""lkca_jax: Large Kernel Convolutional Attention (arXiv 2401.05738) in JAX / Flax NNX.

Importing it changes no process-wide state (malloc, XLA flags, logging): the commands
that own a process make those choices (`lkca_jax.tools.cli.run`).
"""

from lkca_jax.layers import LKCA, MHSA, MIXERS
from lkca_jax.models import PRESETS, count_params, create_model

__version__ = "0.1.0"
__all__ = ["LKCA", "MHSA", "MIXERS", "PRESETS", "count_params", "create_model"]
