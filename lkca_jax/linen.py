"""LKCA and the ViT blocks inside a Flax Linen model, through `flax.nnx.bridge`.

`nnx.bridge.to_linen(NNXClass, *args, name=..., **kwargs)` is a Linen submodule: `init`
builds `NNXClass(*args, **kwargs, rngs=...)` from the Linen rngs and stores its
`nnx.Param` leaves in the "params" collection under the submodule's name, as plain arrays
(`params/blocks_0/mixer/kernel`); `apply` rebuilds the NNX module, loads those arrays into
it and runs it, so the computation is the NNX module's own. Call `apply` under `jax.jit`:
the rebuild's fresh initialisation is then dead code that XLA drops.

`LinenViT` is the pattern written out: patch embedding, position embedding, pooling and
head in Linen, every block `models.Block` (any registered mixer) through the bridge.
`linen_params_from_vit` moves an NNX `models.ViT`'s weights into its parameter tree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

from lkca_jax.layers import MIXERS, xavier_normal
from lkca_jax.layers.common import LAYER_NORM_EPSILON
from lkca_jax.models import Block, ViT, drop_path_scales


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) → (B, h·w, p·p·C), each patch flattened as (p1, p2, c) like `ViT.patchify`."""
  b, height, width, c = images.shape
  p = patch_size
  if height % p or width % p:
    raise ValueError(
      f"image size {height}x{width} is not divisible by patch size {p}; "
      "choose a patch size that divides both sides"
    )
  x = images.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (height // p) * (width // p), p * p * c)


class LinenViT(nn.Module):
  """A Linen ViT classifier whose blocks are lkca_jax's, one per entry of `mixers`.

  NHWC images (B, H, W, C) → logits (B, num_classes); the patch grid is read from the
  images' shape. Pooling is "mean" (the LKCA models) or "cls" (the MHSA baseline).
  `init` needs a "dropout" key besides "params" (each block's DropPath takes its
  stream when it is built); `train=True` with drop_path_rate > 0 needs one in `apply`.
  """

  num_classes: int
  patch_size: int
  dim: int
  mixers: Sequence[str] = ("lkca",)
  num_heads: int = 1
  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.1
  drop_path_schedule: str = "uniform"  # or "linear": models.drop_path_scales
  pool: str = "mean"
  mixer_options: Mapping[str, Any] = FrozenDict()  # {mixer name: its constructor options}
  dtype: Any = None

  def check_fields(self) -> None:
    """ValueError for a pool, mixer or mixer_options entry that no LinenViT could use."""
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
    unknown = sorted(set(self.mixers) - set(MIXERS))
    if unknown or not self.mixers:
      raise ValueError(
        f"mixers must be a non-empty sequence of registered mixers {sorted(MIXERS)}, "
        f"got {self.mixers!r}"
      )
    unused = sorted(set(self.mixer_options) - set(self.mixers))
    if unused:
      raise ValueError(
        f"mixer_options for {unused[0]!r}, which no layer uses (mixers: "
        f"{sorted(set(self.mixers))}); key mixer_options by mixer name"
      )

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self.check_fields()
    if self.is_initializing() and not self.has_rng("dropout"):
      raise ValueError(
        "LinenViT.init needs a dropout key: init({'params': key, 'dropout': key}, images)"
      )
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    if self.dtype is not None:
      images = images.astype(self.dtype)
    x = nn.Dense(self.dim, kernel_init=xavier_normal, dtype=self.dtype, name="patch_embed")(
      patchify(images, self.patch_size)
    )
    normal = jax.nn.initializers.normal(1.0)
    num_prefix = 1 if self.pool == "cls" else 0
    if num_prefix:
      cls = self.param("cls_token", normal, (1, 1, self.dim)).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    x = x + self.param("pos_embed", normal, (x.shape[1], self.dim)).astype(x.dtype)
    scales = drop_path_scales(self.drop_path_schedule, len(self.mixers))
    for i, mixer in enumerate(self.mixers):
      # Rate 0 (evaluation, or a block the schedule spares): DropPath is the identity.
      drop_path = self.drop_path_rate * scales[i] if train else 0.0
      block = nnx.bridge.to_linen(
        Block,
        self.dim,
        grid,
        mixer=mixer,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        drop_path_rate=drop_path,
        mixer_options=self.mixer_options,
        dtype=self.dtype,
        name=f"blocks_{i}",
      )
      # A fresh stream per step, drawn by Linen (which says so if no key was given).
      rngs = nnx.Rngs(dropout=self.make_rng("dropout")) if drop_path > 0 else None
      # The last block computes only the pooled token, as `ViT`'s does.
      pool = self.pool if i == len(self.mixers) - 1 else None
      x = block(x, num_prefix=num_prefix, rngs=rngs, pool=pool)
    pooled = x[:, 0] if num_prefix else x.mean(axis=1)
    # Two-pass variance, as lkca_jax's LayerNorm: exact when the mean is large.
    norm = nn.LayerNorm(
      epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, dtype=self.dtype, name="head_norm"
    )
    head = nn.Dense(self.num_classes, kernel_init=xavier_normal, dtype=self.dtype, name="head")
    return head(norm(pooled))


def linen_params_from_vit(vit: ViT) -> dict:
  """The "params" collection of the matching `LinenViT` holding an NNX `ViT`'s weights.

  The LinenViT must have the ViT's patch size, width, mixers, heads, MLP ratio, pool and
  mixer options; its `init` tree then has exactly these paths and shapes.
  """
  state = nnx.to_pure_dict(nnx.state(vit, nnx.Param))
  params = {
    "patch_embed": state["patch_embed"],
    "pos_embed": state["pos_embed"],
    "head_norm": state["head_norm"],
    "head": state["head"],
  }
  if vit.pool == "cls":
    params["cls_token"] = state["cls_token"]
  for i, block in state["blocks"].items():
    params[f"blocks_{i}"] = block
  return params
