"""lkca_jax: Large Kernel Convolutional Attention (arXiv 2401.05738) in JAX / Flax NNX."""

from lkca_jax import host_memory, xla_flags

# Both before anything below can start a jax backend and its threads.
xla_flags.apply()
host_memory.apply()


from lkca_jax.layers import LKCA, MHSA, MIXERS  # noqa: E402
from lkca_jax.models import PRESETS, count_params, create_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LKCA", "MHSA", "MIXERS", "PRESETS", "count_params", "create_model"]
