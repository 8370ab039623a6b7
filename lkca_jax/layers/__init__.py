"""Token mixers and the blocks around them.

`MIXERS` is the registry the models read: a new mixer is one new file in
this package plus one line here, and the class carries everything that
describes it:

- constructor `cls(dim, grid, *, num_heads, dtype, rngs, **options)`, mapping
  (B, N, D) to (B, N, D); its other keyword arguments are its options, which
  `models` checks by name against the signature;
- `needs_grid`: whether it mixes by grid position (and so must see exactly
  the h·w patch tokens, no class token);
- `macs(num_tokens, dim, num_heads, **options) -> int`, a static method: the
  multiply-adds on one image of `num_tokens` tokens (what the mixer sees: h·w
  for grid mixers, plus the class token for others), taking the constructor's
  options. Counted: every product of a Linear, matmul or convolution. Not
  counted: element-wise work (softmax, scaling, biases, activations, norms,
  mixing rates), as the MHSA row 4ND² + 2N²D of the cost table in
  `docs/method.md` ("Peer mixers") leaves out the softmax. Raises
  ValueError for sizes no module could have;
- `size_presets`: {size: preset name} of its `models.PRESETS` entries at the
  parameter budget of lkca_t ("t") and lkca_b ("b"), for `tools.compare`;
- `config_options`: {option: type, or a tuple of the allowed names} of the
  options that `configs/default.py` exposes as
  `--config.model_overrides.mixer_options.<mixer>.<option>` and
  `config_checks` validates.
- optional, for a mixer that mixes every token (`needs_grid` False):
  `mix_first(x, count)`, equal to `self(x)[:, :count]` but computing only those
  rows. The last block of a class-token model calls it (`models.Block`); without
  it that block runs the mixer on every token and keeps the first rows.

`tests/layers/test_mixer_contract.py` checks all of it for every entry.
"""

import inspect

from lkca_jax.layers.acmix import ACmix
from lkca_jax.layers.common import MLP, DropPath, layer_norm, linear, xavier_normal
from lkca_jax.layers.flatten import FocusedLinearAttention
from lkca_jax.layers.lkca import LKCA
from lkca_jax.layers.mhsa import MHSA

MIXERS = {
  "mhsa": MHSA,
  "lkca": LKCA,
  "acmix": ACmix,
  "flatten": FocusedLinearAttention,
}

# What the models pass every mixer; any other constructor argument is an option.
MIXER_ARGS = ("dim", "grid", "num_heads", "dtype", "rngs")


def option_names(cls) -> list[str] | None:
  """The options `cls`'s constructor accepts, sorted; None if it takes **kwargs (any name)."""
  params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None
  return sorted(
    p.name
    for p in params
    if p.name not in MIXER_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  )


__all__ = [
  "ACmix",
  "FocusedLinearAttention",
  "LKCA",
  "MHSA",
  "MLP",
  "DropPath",
  "MIXERS",
  "MIXER_ARGS",
  "layer_norm",
  "linear",
  "option_names",
  "xavier_normal",
]
