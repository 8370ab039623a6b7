"""Standard multi-head self-attention, as the ViT baseline of the reference uses it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax.layers.common import linear


class MHSA(nnx.Module):
  """qkv Linear(D, 3·H·d) without bias → softmax(q·kᵀ·d^−½)·v → Linear(H·d, D) with bias.

  Works on any number of tokens (a class token included); `grid` is accepted
  for a uniform mixer signature and unused.
  """

  needs_grid = False

  def __init__(self, dim: int, grid=None, *, num_heads: int = 8, head_dim: int | None = None,
               dtype=None, rngs: nnx.Rngs):
    del grid
    self.num_heads = num_heads
    self.head_dim = head_dim or dim // num_heads
    inner = self.num_heads * self.head_dim
    self.qkv = linear(dim, 3 * inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.out_proj = linear(inner, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * self.head_dim ** -0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    return self.out_proj(out.reshape(b, n, -1))
