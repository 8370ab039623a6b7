"""Focused linear attention (FLatten, Han et al., ICCV 2023), `docs/method.md` "Peer mixers".

Follows the authors' `FocusedLinearAttention` (models/flatten_swin.py of
LeapLabTHU/FLatten-Transformer, after its May 2024 numerical-stability fix).
q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v: biases on by default, as every model the
authors register has them (their Swin config's QKV_BIAS = True; qkv_bias=True in their PVT,
PVTv2 and CSWin models); `qkv_bias=False` drops them. Then
  1. k += P, a learned (N, D) position table, init 0;
  2. q, k = ReLU(q) + 1e-6, ReLU(k) + 1e-6;
  3. q, k /= softplus(s), s a learned (D,) vector, init 0;
  4. focusing φ(x) = x³ · ‖x‖ / ‖x³‖ over all D channels;
  5. per head: kv = (kᵀ/√N)(v/√N), z = 1 / (q · mean_N(k) + 1e-6), out = (q · kv) · z;
  6. out += a 5×5 depthwise convolution of v over the token grid: one (5, 5, d)
     kernel and d biases, the same for every head, zero padding 2;
  7. out = out W_o + b_o.
Steps 1–5 run in float32 (matmuls at full float32 precision) whatever the
activation dtype, then cast back. That cast is this code's own guard for bfloat16
activations, not the authors': their code casts nothing (under its AMP option PyTorch's
autocast picks each op's dtype, the matmuls float16). Their fix for NaNs in float16 (the
May 2024 one) is the rescaling in step 5: kv from k/√N and v/√N, and z from the mean of
k over N, where their earlier code formed kᵀv and z from plain sums over the N tokens.
Parameters: 4D² + (N + 5)·D + 26·d (3D fewer with qkv_bias=False).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax.backend import by_backend
from lkca_jax.layers.common import (
  add_wide,
  as_grid,
  check_cost_sizes,
  check_tokens,
  head_dim,
  linear,
  promote_param,
  wide,
)

FOCUSING_POWER = 3
DWC_SIZE = 5
EPSILON = 1e-6
HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes inside the float32 steps


def dwc_init(key: jax.Array, shape) -> jax.Array:
  """PyTorch's Conv2d default, which the authors' depthwise conv keeps (they never
  re-initialise it): weight and bias uniform in ±1/√fan_in, fan_in = 5·5."""
  bound = 1.0 / DWC_SIZE
  return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def focus(x: jax.Array, power: int = FOCUSING_POWER) -> jax.Array:
  """φ(x) = x^p · ‖x‖ / ‖x^p‖ over the last axis, for x > 0.

  Computed on x / max(x): the ratio is scale-free, so this is the same
  function without x^p overflowing for large x (the authors' code used this
  form for p > 6 before their May 2024 fix; it now computes x^p as it is).
  """
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  powered = (x / jnp.max(x, axis=-1, keepdims=True)) ** power
  return powered * (norm / jnp.linalg.norm(powered, axis=-1, keepdims=True))


def normaliser(q: jax.Array, k: jax.Array) -> jax.Array:
  """Step 5's z (B, N, H) for (B, N, H, d) maps: 1 / (q · mean_N(k) + ε)."""
  return 1.0 / (jnp.einsum("bnhc,bhc->bnh", q, k.mean(axis=1), precision=HIGHEST) + EPSILON)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Step 5 on (B, N, H, d) float32 maps: (q · kv) · z with kv computed first."""
  n = q.shape[1]
  kv = jnp.einsum("bnhc,bnhe->bhce", k * n**-0.5, v * n**-0.5, precision=HIGHEST)
  return jnp.einsum("bnhc,bhce->bnhe", q, kv, precision=HIGHEST) * normaliser(q, k)[..., None]


def linear_attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """The (B, H, N, N) matrix W that step 5 applies to v, W_nm = (q_n · k_m) · z_n / N, which it
  never forms: non-negative, row n summing to S / (S + N·ε) for S = Σ_m q_n · k_m, which is
  well below 1 for a query that the ReLU zeroed."""
  n = q.shape[1]
  dots = jnp.einsum("bnhc,bmhc->bhnm", q, k, precision=HIGHEST)
  return dots * (normaliser(q, k).transpose(0, 2, 1)[..., None] / n)


def depthwise_correlate(maps: jax.Array, kernel: jax.Array) -> jax.Array:
  """Each channel of maps (B, h, w, D) cross-correlated with its (k, k) taps of kernel
  (k, k, D), zero padding (k−1)/2: `conv_general_dilated(feature_group_count=D)`, the
  convolution GPU and TPU compilers are built for; on the CPU `depthwise_correlate_cpu`
  (backend.by_backend)."""
  return by_backend(depthwise_correlate_cpu, _depthwise_conv, maps, kernel)


def _depthwise_conv(maps: jax.Array, kernel: jax.Array) -> jax.Array:
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
    maps,
    kernel[:, :, None, :],
    (1, 1),
    ((pad, pad), (pad, pad)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=maps.shape[-1],
  )


def depthwise_correlate_cpu(maps: jax.Array, kernel: jax.Array) -> jax.Array:
  """`depthwise_correlate` as the sum of the k² shifted slices of the padded maps times their
  taps, in float32 at least and rounded once to the maps' dtype: XLA:CPU fuses it, where its
  grouped convolution took 18–24× the forward time and 2.3–3.6× forward and backward, and
  the flatten_t and flatten_b train steps 2.3–2.5× theirs (docs/benchmarks.md, 2026-12-07e)."""
  _, h, w, _ = maps.shape
  size = kernel.shape[0]
  pad = size // 2
  compute = wide(maps.dtype)
  padded = jnp.pad(maps, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(compute)
  taps = kernel.astype(compute)
  terms = (padded[:, a : a + h, c : c + w] * taps[a, c] for a in range(size) for c in range(size))
  return functools.reduce(jnp.add, terms).astype(maps.dtype)


class FocusedLinearAttention(nnx.Module):
  """FLatten token mixer (global linear attention over the token grid).

  Args:
    dim: token width D (divisible by num_heads).
    grid: (h, w) patch grid; tokens row-major, N = h·w. Non-square grids work.
    num_heads: H; head dim d = D / H is the depthwise conv's channel count.
    qkv_bias: biases on W_q, W_k, W_v (default True, as the authors' models; see the module
      docstring).
  """

  needs_grid = True  # the position table and the depthwise conv read grid positions
  attention_kind = "FLatten linear-attention weights"  # what `attention_weights` gives
  # Same depth and MLP ratio as lkca_t / lkca_b, width shrunk to their parameter count.
  size_presets = {"t": "flatten_t", "b": "flatten_b"}
  config_options = {"qkv_bias": bool}
  no_weight_decay = ("position",)  # a position table (models.decays)

  @staticmethod
  def macs(num_tokens: int, dim: int, num_heads: int, *, qkv_bias: bool = True) -> int:
    """q, k, v, out projections (4·N·D²); kᵀv and q·kv (N·d² per head each, 2·N·D·d);
    q·mean_N(k) (N·D); the 5×5 depthwise conv of v (25·N·D). The only count that
    depends on the head dim d = D / H."""
    del qkv_bias  # biases are element-wise work
    check_cost_sizes(num_tokens, dim, num_heads, "FLatten")
    d = head_dim(dim, num_heads, "FLatten")
    return 4 * num_tokens * dim**2 + 2 * num_tokens * dim * d + (1 + DWC_SIZE**2) * num_tokens * dim

  def __init__(
    self,
    dim: int,
    grid=(8, 8),
    *,
    num_heads: int = 8,
    qkv_bias: bool = True,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    self.head_dim = head_dim(dim, num_heads, "FLatten")
    self.grid = as_grid(grid)
    self.num_heads = num_heads
    num_tokens = self.grid[0] * self.grid[1]
    self.q_proj = linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.k_proj = linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.position = nnx.Param(jnp.zeros((num_tokens, dim)))
    self.scale = nnx.Param(jnp.zeros((dim,)))
    self.dwc_kernel = nnx.Param(dwc_init(rngs.params(), (DWC_SIZE, DWC_SIZE, self.head_dim)))
    self.dwc_bias = nnx.Param(dwc_init(rngs.params(), (self.head_dim,)))
    self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)

  def depthwise_conv(self, v: jax.Array) -> jax.Array:
    """Step 6 on (B, N, D): the (5, 5, d) kernel tiled over heads is a D-channel depthwise conv."""
    b, n, dim = v.shape
    h, w = self.grid
    kernel = jnp.tile(promote_param(self.dwc_kernel[...], v), (1, 1, self.num_heads))
    bias = jnp.tile(promote_param(self.dwc_bias[...], v), self.num_heads)
    y = depthwise_correlate(v.reshape(b, h, w, dim), kernel)
    return add_wide(y.reshape(b, n, dim), bias)

  def focused(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Steps 1–4 for tokens x (B, N, D): the focused q and k and v as (B, N, H, d) float32
    heads, and v (B, N, D) as its projection gave it."""
    check_tokens(x, self.q_proj.in_features, self.grid, "FLatten")
    b, n, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    f32 = jnp.float32
    scale = jax.nn.softplus(self.scale[...].astype(f32))
    k = k.astype(f32) + self.position[...].astype(f32)
    q = focus((jax.nn.relu(q.astype(f32)) + EPSILON) / scale)
    k = focus((jax.nn.relu(k) + EPSILON) / scale)
    heads = (b, n, self.num_heads, self.head_dim)
    return q.reshape(heads), k.reshape(heads), v.astype(f32).reshape(heads), v

  def attention_weights(self, x: jax.Array) -> jax.Array:
    """The linear attention's weights (B, H, N, N) on v for tokens x (B, N, D), rows queries,
    in float32 (`linear_attention_weights`): the depthwise convolution aside."""
    q, k, _, _ = self.focused(x)
    return linear_attention_weights(q, k)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v_heads, v = self.focused(x)
    out = linear_attention(q, k, v_heads).reshape(v.shape).astype(v.dtype)
    return self.out_proj(out + self.depthwise_conv(v))
