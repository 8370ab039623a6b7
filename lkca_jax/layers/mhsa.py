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
    b, n, _ = x.shape
    h, d = self.num_heads, self.head_dim
    # (B, N, 3, H, d) → (3, B·H, N, d): one batch axis for the core's products.
    qkv = self.qkv(x).reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4).reshape(3, b * h, n, d)
    out = attend(qkv[0], qkv[1], qkv[2], d**-0.5)
    return self.out_proj(out.reshape(b, h, n, d).transpose(0, 2, 1, 3).reshape(b, n, h * d))


def _batched_dot(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0,), (0,))))


def _attend_forward(q, k, v, scale):
  logits = _batched_dot(q, k, 2, 2) * jnp.asarray(scale, q.dtype)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return _batched_dot(weights, v, 2, 1), (q, k, v, weights)


def _attend_backward(scale, residuals, d_out):
  q, k, v, weights = residuals
  d_weights = _batched_dot(d_out, v, 2, 2).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  d_logits = w * (d_weights - jnp.sum(d_weights * w, axis=-1, keepdims=True))
  d_logits = (d_logits * scale).astype(q.dtype)
  # XLA:CPU folds a transposed operand into the product and then runs it as a slow
  # strided loop; the barriers keep the small (N, d) transposes as copies, so all
  # four products are plain row-major ones (vit step, 2-core CPU: about −35 % in the core).
  barrier = jax.lax.optimization_barrier
  d_q = _batched_dot(d_logits, k, 2, 1)
  d_k = barrier(_batched_dot(barrier(jnp.swapaxes(q, 1, 2)), d_logits, 2, 1))
  d_v = barrier(_batched_dot(barrier(jnp.swapaxes(d_out, 1, 2)), weights, 2, 1))
  return d_q, jnp.swapaxes(d_k, 1, 2), jnp.swapaxes(d_v, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q·kᵀ·scale)·v over (B, N, d) arrays, the softmax in float32.

  Its gradient is written out by hand (`_attend_backward`) only to choose how
  XLA lays out the products; it is the gradient autodiff gives, to round-off
  (tests/layers/test_mhsa.py).
  """
  return _attend_forward(q, k, v, scale)[0]


attend.defvjp(_attend_forward, _attend_backward)
