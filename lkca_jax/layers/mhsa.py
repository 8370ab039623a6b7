"""Standard multi-head self-attention, as the ViT baseline of the reference uses it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax.backend import by_backend
from lkca_jax.layers import common
from lkca_jax.layers.common import check_cost_sizes, check_tokens, linear, project, threaded, wide


class MHSA(nnx.Module):
  """qkv Linear(D, 3·H·d) without bias → softmax(q·kᵀ·d^−½)·v → Linear(H·d, D) with bias.

  `qkv_bias=True` gives the qkv Linear a bias (timm's `qkv_bias`, which DeiT sets). Without
  `head_dim`, d = D / H, and H must divide D. Works on any number of tokens (a class token
  included); `grid` is accepted for a uniform mixer signature and unused.
  """

  needs_grid = False
  attention_kind = "MHSA softmax"  # what `attention_weights` gives, as the analysis names it
  size_presets = {"t": "vit_1m", "b": "vit"}  # the paper's ViTs at lkca_t / lkca_b's budget
  config_options = {"head_dim": int, "qkv_bias": bool}

  @staticmethod
  def macs(
    num_tokens: int, dim: int, num_heads: int, *, head_dim: int | None = None, qkv_bias=False
  ) -> int:
    """qkv and output projections (4·N·D² when H·d = D), then q·kᵀ and weights·v (2·N²·D)."""
    del qkv_bias  # biases are element-wise work
    check_cost_sizes(num_tokens, dim, num_heads, "MHSA")
    inner = num_heads * (head_dim or common.head_dim(dim, num_heads, "MHSA"))
    return 4 * num_tokens * dim * inner + 2 * num_tokens**2 * inner

  def __init__(
    self,
    dim: int,
    grid=None,
    *,
    num_heads: int = 8,
    head_dim: int | None = None,
    qkv_bias: bool = False,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    del grid
    self.num_heads = num_heads
    self.head_dim = head_dim or common.head_dim(dim, num_heads, "MHSA")
    inner = self.num_heads * self.head_dim
    self.qkv = linear(dim, 3 * inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.out_proj = linear(inner, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_tokens(x, self.qkv.in_features, None, "MHSA")
    return self.out_proj(attention(self.qkv(x), self.num_heads, self.head_dim**-0.5))

  def attention_weights(self, x: jax.Array) -> jax.Array:
    """The softmax weights (B, H, T, T) this layer applies to the values of tokens x
    (B, T, D), rows queries, in float32."""
    check_tokens(x, self.qkv.in_features, None, "MHSA")
    b, n, _ = x.shape
    q, k, _ = jnp.unstack(self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim), axis=2)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) * self.head_dim**-0.5
    return jax.nn.softmax(logits, axis=-1)

  def mix_first(self, x: jax.Array, count: int) -> jax.Array:
    """`self(x)[:, :count]`, computed for those tokens only: their queries against the keys
    and values of every token of x (a class-token model's last layer needs only its row)."""
    check_tokens(x, self.qkv.in_features, None, "MHSA")
    inner = self.num_heads * self.head_dim
    qkv = self.qkv
    bias = None if qkv.bias is None else qkv.bias[...]
    x, kernel, bias = qkv.promote_dtype((x, qkv.kernel[...], bias), dtype=qkv.dtype)
    q_bias, kv_bias = (None, None) if bias is None else (bias[:inner], bias[inner:])
    q = project(x[:, :count], kernel[:, :inner], q_bias, qkv.precision)
    kv = project(x, kernel[:, inner:], kv_bias, qkv.precision)
    return self.out_proj(attention_of_queries(q, kv, self.num_heads, self.head_dim**-0.5))


def attention(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  """softmax((scale·q)·kᵀ)·v per head for qkv (B, N, 3·H·d) laid out as (3, H, d) in its
  last axis; returns (B, N, H·d), heads concatenated. The softmax is in float32.

  `jax.nn.dot_product_attention` off the CPU (the implementation JAX picks: XLA's, through
  jax 0.10), `attention_cpu` on it (backend.by_backend)."""
  return by_backend(
    lambda qkv: attention_cpu(qkv, num_heads, scale),
    lambda qkv: attention_plain(qkv, num_heads, scale),
    qkv,
  )


def attention_plain(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  inner = qkv.shape[-1] // 3
  return attention_of_queries(qkv[..., :inner], qkv[..., inner:], num_heads, scale)


def attention_of_queries(q: jax.Array, kv: jax.Array, num_heads: int, scale: float):
  """`attention` for queries q (B, M, H·d) against kv (B, N, 2·H·d) laid out as (2, H, d),
  on every backend as `jax.nn.dot_product_attention` (its softmax in float32)."""
  b, m, inner = q.shape
  k, v = jnp.unstack(kv.reshape(b, kv.shape[1], 2, num_heads, inner // num_heads), axis=2)
  q = q.reshape(b, m, num_heads, inner // num_heads)
  return jax.nn.dot_product_attention(q, k, v, scale=scale).reshape(b, m, inner)


def _batched_dot(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0,), (0,))))


def _split(qkv: jax.Array, num_heads: int) -> jax.Array:
  """(B, N, 3·H·d) → (B, N, 3, H, d), a view."""
  b, n, width = qkv.shape
  return qkv.reshape(b, n, 3, num_heads, width // (3 * num_heads))


def _heads(qkv: jax.Array, num_heads: int) -> jax.Array:
  """(B, N, 3·H·d) → (3, B·H, N, d), in one copy."""
  x = _split(qkv, num_heads)
  b, n, _, h, d = x.shape
  return x.transpose(2, 0, 3, 1, 4).reshape(3, b * h, n, d)


def _tangent_heads(d_qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(B, N, 3·H·d) → d_q (B·H, N, d) and d_kᵀ, d_vᵀ (B·H, d, N), taken apart by `lax.split`
  rather than indexing: reverse mode then assembles qkv's gradient as one concatenation,
  where indexing's transpose pads each part to full size and adds the three (the `vit` and
  `vit_1m` float32 steps 1.03–1.07× faster, docs/benchmarks.md, 2026-12-05e)."""
  x = _split(d_qkv, num_heads)
  b, n, _, h, d = x.shape
  q, kv = jax.lax.split(x, (1, 2), axis=2)
  d_q = q.reshape(b, n, h, d).transpose(0, 2, 1, 3).reshape(b * h, n, d)
  d_kt, d_vt = jax.lax.split(kv.transpose(2, 0, 3, 4, 1), (1, 1), axis=0)
  return d_q, d_kt.reshape(b * h, d, n), d_vt.reshape(b * h, d, n)


def _scaled_q_transposed(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  """scale·q as (B·H, d, N), copied from qkv itself: a copy of its own, which XLA cannot
  fold into a product as a transposed operand."""
  x = _split(qkv, num_heads)
  b, n, _, h, d = x.shape
  return (x[:, :, 0].transpose(0, 2, 3, 1) * jnp.asarray(scale, qkv.dtype)).reshape(b * h, d, n)


def _merge_heads(out: jax.Array, batch: int, num_heads: int) -> jax.Array:
  """(B·H, N, d) → (B, N, H·d)."""
  _, n, d = out.shape
  return out.reshape(batch, num_heads, n, d).transpose(0, 2, 1, 3).reshape(batch, n, num_heads * d)


def _merge_heads_transposed(out_t: jax.Array, batch: int, num_heads: int) -> jax.Array:
  """(B·H, d, N) → (B, N, H·d)."""
  _, d, n = out_t.shape
  return (
    out_t.reshape(batch, num_heads, d, n).transpose(0, 3, 1, 2).reshape(batch, n, num_heads * d)
  )


def _attention_primal(qkv, num_heads, scale):
  q, k, v = _heads(qkv, num_heads)
  # Scaling q rather than the logits: a scalar times the (N, N) logits reaches XLA:CPU's
  # matrix-product fusion as a constant broadcast to their full size, written out anew.
  q = q * jnp.asarray(scale, q.dtype)
  weights = jax.nn.softmax(_batched_dot(q, k, 2, 2).astype(jnp.float32), axis=-1)
  out = threaded(_batched_dot(weights.astype(v.dtype), v, 2, 1))
  return out, (q, k, v, weights)


def attention_cpu(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  """`attention` as batched products over (B·H, N, d) heads, each fused with a row sum
  (`threaded`) so that it runs on every thread, its derivative given as a tangent rule
  whose transpose computes the softmax gradient's row term Σ_m dW·W as the equal
  Σ_d dO·O: a sum over d, not over N (docs/benchmarks.md).

  Below float32 it runs in float32 and rounds its output once, as `mix_attention_cpu`
  does: XLA:CPU widens such products anyway, and reverse mode then assembles the gradient
  into qkv's layout in float32 and rounds it once, where in bfloat16 it rounded at every
  step (the `vit` bfloat16 step 1.29× faster, docs/benchmarks.md, 2026-12-05e)."""
  return _attention_cpu_wide(qkv.astype(wide(qkv.dtype)), num_heads, scale).astype(qkv.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _attention_cpu_wide(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
  return _merge_heads(_attention_primal(qkv, num_heads, scale)[0], qkv.shape[0], num_heads)


@_attention_cpu_wide.defjvp
def _attention_cpu_jvp(num_heads, scale, primals, tangents):
  (qkv,), (d_qkv,) = primals, tangents
  out, (q, k, v, weights) = _attention_primal(qkv, num_heads, scale)
  # Every product is laid out so that the one reverse mode makes of it has its (N, N)
  # operand on the right in its own layout: keys and values enter transposed, q·d_kᵀ is
  # formed from qᵀ and W·d_v as (d_vᵀ·Wᵀ)ᵀ, so that dkᵀ = qᵀ·dL and dvᵀ = dOᵀ·W. Each
  # tangent a product takes is `threaded`, so those products use every thread.
  d_q, d_kt, d_vt = _tangent_heads(d_qkv, num_heads)
  d_q = threaded(d_q * jnp.asarray(scale, q.dtype))
  q_t = _scaled_q_transposed(qkv, num_heads, scale)
  d_logits = _batched_dot(d_q, k, 2, 2) + _batched_dot(q_t, threaded(d_kt), 1, 1)
  # The softmax tangent W∘(dL − Σ_m W∘dL) times v, with (W∘(Σ_m W∘dL))·v = (Σ_m W∘dL)·O.
  weighted = weights * d_logits.astype(jnp.float32)
  row = jnp.sum(weighted, axis=-1, keepdims=True).astype(out.dtype)
  d_out = _batched_dot(threaded(weighted.astype(v.dtype)), v, 2, 1) - row * out
  d_out_from_v = _batched_dot(threaded(d_vt), weights.astype(v.dtype), 2, 2)  # (B·H, d, N)
  batch = qkv.shape[0]
  d_out = _merge_heads(d_out, batch, num_heads) + _merge_heads_transposed(
    d_out_from_v, batch, num_heads
  )
  return _merge_heads(out, batch, num_heads), d_out
