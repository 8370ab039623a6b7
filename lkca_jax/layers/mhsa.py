"""Standard multi-head self-attention, as the ViT baseline of the reference uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax.layers.common import check_cost_sizes, linear


class MHSA(nnx.Module):
  """qkv Linear(D, 3·H·d) without bias → softmax(q·kᵀ·d^−½)·v → Linear(H·d, D) with bias.

  Works on any number of tokens (a class token included); `grid` is accepted
  for a uniform mixer signature and unused.
  """

  needs_grid = False
  size_presets = {"t": "vit_1m", "b": "vit"}  # the paper's ViTs at lkca_t / lkca_b's budget
  config_options = {"head_dim": int}

  @staticmethod
  def macs(num_tokens: int, dim: int, num_heads: int, *, head_dim: int | None = None) -> int:
    """qkv and output projections (4·N·D² when H·d = D), then q·kᵀ and weights·v (2·N²·D)."""
    check_cost_sizes(num_tokens, dim, num_heads, "MHSA")
    inner = num_heads * (head_dim or dim // num_heads)
    return 4 * num_tokens * dim * inner + 2 * num_tokens**2 * inner

  def __init__(
    self,
    dim: int,
    grid=None,
    *,
    num_heads: int = 8,
    head_dim: int | None = None,
    dtype=None,
    rngs: nnx.Rngs,
  ):
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
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * self.head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    return self.out_proj(out.reshape(b, n, -1))
