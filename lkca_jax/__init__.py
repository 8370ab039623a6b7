"""lkca_jax: Large Kernel Convolutional Attention (arXiv 2401.05738) in JAX / Flax NNX.

Importing it changes no process-wide state (malloc, XLA flags, logging): the commands
that own a process make those choices (`lkca_jax.tools.cli.run`). Nor does it import jax:
the names below load their module on first use, so a command answers `--help` at once.
"""

import importlib as _importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
  "LKCA": "lkca_jax.layers",
  "MHSA": "lkca_jax.layers",
  "MIXERS": "lkca_jax.layers",
  "PRESETS": "lkca_jax.models",
  "count_params": "lkca_jax.models",
  "create_model": "lkca_jax.models",
  "load_trained": "lkca_jax.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'lkca_jax' has no attribute {name!r}")
  value = getattr(_importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_EXPORTS})
