"""Standard multi-head self-attention, as the ViT baseline of the reference uses it."""

from __future__ import annotations

import functools

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
    return self.out_proj(attention(self.qkv(x), self.num_heads, self.head_dim**-0.5))


def _batched_dot(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0,), (0,))))


def _heads(qkv: jax.Array, num_heads: int) -> jax.Array:
  """(B, N, 3·H·d) → (3, B·H, N, d), in one copy."""
  b, n, width = qkv.shape
  d = width // (3 * num_heads)
  return qkv.reshape(b, n, 3, num_heads, d).transpose(2, 0, 3, 1, 4).reshape(3, b * num_heads, n, d)


def _attention_forward(qkv, num_heads, scale):
  b, n, width = qkv.shape
  q, k, v = _heads(qkv, num_heads)
  # Scaling q rather than the logits: a scalar times the (N, N) logits reaches XLA:CPU's
  # matrix-product fusion as a constant broadcast to their full size, written out anew.
  q = q * jnp.asarray(scale, q.dtype)
  weights = jax.nn.softmax(_batched_dot(q, k, 2, 2).astype(jnp.float32), axis=-1)
  out = _batched_dot(weights.astype(v.dtype), v, 2, 1)
  residuals = (q, k, v, weights.astype(v.dtype), out)
  return out.reshape(b, num_heads, n, -1).transpose(0, 2, 1, 3).reshape(b, n, width // 3), residuals


def _attention_backward(num_heads, scale, residuals, d_out):
  q, k, v, weights, out = residuals
  b, n, inner = d_out.shape
  d = inner // num_heads
  barrier = jax.lax.optimization_barrier
  # d_out in the two layouts its products need: (B·H, N, d) and (B·H, d, N).
  d_out = d_out.reshape(b, n, num_heads, d)
  d_o = d_out.transpose(0, 2, 1, 3).reshape(b * num_heads, n, d)
  d_o_t = barrier(d_out.transpose(0, 2, 3, 1).reshape(b * num_heads, d, n))
  # The softmax gradient's row term Σ_m dW·W equals Σ_d dO·O: a sum over d, not over N.
  row = jnp.sum(d_o.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_weights = _batched_dot(d_o, v, 2, 2).astype(jnp.float32)
  d_logits = (weights.astype(jnp.float32) * (d_weights - row)).astype(q.dtype)
  # XLA:CPU folds a transposed operand into a product and then runs it as a slow strided
  # loop; with the (N, d) operands copied transposed behind barriers, every product is a
  # plain row-major one, and d_k, d_v come out transposed, (B·H, d, N).
  d_q = _batched_dot(d_logits, k, 2, 1) * jnp.asarray(scale, q.dtype)
  d_k_t = barrier(_batched_dot(barrier(jnp.swapaxes(q, 1, 2)), d_logits, 2, 1))
  d_v_t = barrier(_batched_dot(d_o_t, weights, 2, 1))
  # One pass writes all three back into qkv's (B, N, 3, H, d) layout.
  d_q = d_q.reshape(b, num_heads, n, d).transpose(0, 2, 1, 3)
  d_k = d_k_t.reshape(b, num_heads, d, n).transpose(0, 3, 1, 2)
  d_v = d_v_t.reshape(b, num_heads, d, n).transpose(0, 3, 1, 2)
  return (jnp.stack([d_q, d_k, d_v], axis=2).reshape(b, n, 3 * inner),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def attention(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  """softmax((scale·q)·kᵀ)·v per head for qkv (B, N, 3·H·d) laid out as (3, H, d) in its
  last axis; returns (B, N, H·d), heads concatenated. The softmax is in float32.

  Its gradient is written out by hand (`_attention_backward`) only to choose how XLA
  lays out the products and the head transposes; it is the gradient autodiff gives,
  to round-off (tests/layers/test_mhsa.py).
  """
  return _attention_forward(qkv, num_heads, scale)[0]


attention.defvjp(_attention_forward, _attention_backward)
