"""Token mixers and the blocks around them.

`MIXERS` is the registry the models read: a new mixer is one new file in
this package plus one line here. Every mixer is built as
`cls(dim, grid, *, num_heads, dtype, rngs, **options)`, maps (B, N, D) to
(B, N, D), and says with `needs_grid` whether it mixes by grid position (and
so must see exactly the h·w patch tokens, no class token).
"""
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

__all__ = ["ACmix", "FocusedLinearAttention", "LKCA", "MHSA", "MLP", "DropPath", "MIXERS",
           "layer_norm", "linear", "xavier_normal"]
