"""ACmix (Pan et al., CVPR 2022): self-attention and convolution on one shared q/k/v.

Follows the authors' Swin version (`WindowAttention_acmix`, Swin-Transformer/models/
swin_transformer_acmix.py in LeapLabTHU/ACmix), with global attention over the grid.
One Linear(D, 3D) with bias gives q, k, v (channel s·D + head·d + c, s = q/k/v,
as that code reshapes it). Two branches reuse them:

- attention: global multi-head self-attention over the h×w grid with q scaled
  by d^−½ and a learned Swin-style relative position bias, then its own
  output Linear(D, D).
- convolution: the 3H head maps (q heads, then k heads, then v heads) are
  mixed by one 3H → 9 map with 9 biases (the authors' 1×1 `fc` conv, bias on
  as nn.Conv2d has it by default, weight and bias initialised as PyTorch's Conv2d,
  U(±1/√(3H))) that is the same for every channel index
  c < d, giving 9 maps per c; those are laid out as channel c·9 + i and go
  through a grouped 3×3 convolution (d groups, 9 inputs and H outputs per
  group, zero padding 1, no bias: the authors' `reset_parameters` sets the
  conv's bias to None), so output channel c·H + o comes from the 9 maps of
  channel index c (PyTorch group order, as the authors' code).
  The kernel starts as one-hot shifts (input i is 1 at tap (i // 3, i % 3)),
  so at init the branch is a 3×3 convolution of the q/k/v maps whose tap
  (a, b) weights are the 3H → 9 map's column 3a + b, plus that column's
  bias wherever the tap falls inside the grid (the zero padding comes after
  the bias).

output = attention_rate · attention + conv_rate · convolution (both init 0.5).
Parameters: 4D² + 85D + ((2h−1)(2w−1) + 27)·H + 11.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax.backend import by_backend
from lkca_jax.layers.common import (
  Linear,
  as_grid,
  check_cost_sizes,
  check_tokens,
  head_dim,
  linear,
  promote_param,
  toeplitz_tiled,
)
from lkca_jax.layers.mhsa import MHSA

CONV_SIZE = 3
CONV_TAPS = CONV_SIZE * CONV_SIZE  # k² = 9 shifted maps per head-channel index
# Swin and the authors' ACmix-Swin initialise the bias table with trunc_normal_(std=.02).
relative_bias_init = jax.nn.initializers.truncated_normal(0.02)


def conv_default_init(fan_in: int):
  """PyTorch's Conv2d default init, for the weight (kaiming_uniform with a = √5) and the bias
  alike: uniform in ±1/√fan_in. The authors' `fc` keeps it: Swin's `_init_weights`
  re-initialises only Linear and LayerNorm layers, and ACmix's `reset_parameters` only the
  rates and the grouped conv. (FLatten's depthwise conv is kept at this default the same way.)"""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@functools.cache
def relative_position_index(h: int, w: int) -> np.ndarray:
  """Bias-table row of every (query (i,j), key (p,q)) pair, in Swin's order:
  (i−p+h−1)(2w−1) + (j−q+w−1)."""
  i, j = np.divmod(np.arange(h * w), w)
  di = i[:, None] - i[None, :] + (h - 1)  # rows: query; cols: key
  dj = j[:, None] - j[None, :] + (w - 1)
  return (di * (2 * w - 1) + dj).astype(np.int32)


def relative_bias_tiled(table: jax.Array, grid) -> jax.Array:
  """The (H, N, N) matrix of a ((2h−1)(2w−1), H) table of offsets query − key
  (`relative_position_index`), tiled: the table per head, its offsets reversed to key −
  query, is the taps of a block-Toeplitz matrix (`common.toeplitz_tiled`)."""
  h, w = grid
  taps = table.T.reshape(-1, 2 * h - 1, 2 * w - 1)[:, ::-1, ::-1]
  return toeplitz_tiled(taps, grid)


def one_hot_shift_kernel(dim: int) -> np.ndarray:
  """(3, 3, 9, D) HWIO kernel: input i of every group is 1 at tap (i // 3, i % 3), for every
  output."""
  taps = np.zeros((CONV_SIZE, CONV_SIZE, CONV_TAPS), np.float32)
  for i in range(CONV_TAPS):
    taps[i // CONV_SIZE, i % CONV_SIZE, i] = 1.0
  return np.repeat(taps[..., None], dim, axis=-1)


def grouped_conv3x3(maps: jax.Array, kernel: jax.Array) -> jax.Array:
  """The grouped 3×3 convolution (zero padding 1, d groups) as a sum over 9 shifted slices.

  maps: (B, h, w, d, 9), group c holding inputs c·9 + i; kernel: (3, 3, 9, D) HWIO
  with output channel c·H + o in group c. Returns (B, h, w, D). Equal to
  conv_general_dilated(feature_group_count=d), whose kernel gradient is ~100× slower
  on XLA CPU; slices and small per-group dots are fast forward and backward
  (and faster than stacking the 9 slices into one einsum).
  """
  b, h, w, d, inputs = maps.shape
  padded = jnp.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  # (a, b, input i, group c, output o)
  per_group = kernel.reshape(CONV_SIZE, CONV_SIZE, inputs, d, -1)
  # Cross-correlation: output (y, x) reads input (y + a − 1, x + b − 1) at tap (a, b).
  out = sum(
    jnp.einsum("byxci,ico->byxco", padded[:, a : a + h, bb : bb + w], per_group[a, bb])
    for a in range(CONV_SIZE)
    for bb in range(CONV_SIZE)
  )
  return out.reshape(b, h, w, -1)


class ACmix(nnx.Module):
  """ACmix token mixer with global attention over the token grid.

  Args:
    dim: token width D (divisible by num_heads).
    grid: (h, w) patch grid; tokens row-major, N = h·w. Non-square grids work.
    num_heads: H; head dim d = D / H is also the number of conv groups.
  """

  needs_grid = True  # the relative bias and the 3×3 convolution read grid positions
  attention_kind = "ACmix attention-branch softmax"  # what `attention_weights` gives
  # Same depth and MLP ratio as lkca_t / lkca_b, width shrunk to their parameter count.
  size_presets = {"t": "acmix_t", "b": "acmix_b"}
  config_options = {}
  no_weight_decay = ("relative_bias",)  # a position table (models.decays)

  @staticmethod
  def macs(num_tokens: int, dim: int, num_heads: int) -> int:
    """MHSA's count, plus the conv branch: the 3H → 9 map (27·N·D) and the grouped 3×3
    convolution, 9 inputs × 9 taps per output (81·N·D)."""
    check_cost_sizes(num_tokens, dim, num_heads, "ACmix")
    head_dim(dim, num_heads, "ACmix")
    conv_branch = (3 * CONV_TAPS + CONV_TAPS * CONV_TAPS) * num_tokens * dim
    return MHSA.macs(num_tokens, dim, num_heads) + conv_branch

  def __init__(self, dim: int, grid=(8, 8), *, num_heads: int = 8, dtype=None, rngs: nnx.Rngs):
    self.head_dim = head_dim(dim, num_heads, "ACmix")
    self.grid = as_grid(grid)
    self.num_heads = num_heads
    h, w = self.grid
    self.qkv = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.relative_bias = nnx.Param(
      relative_bias_init(rngs.params(), ((2 * h - 1) * (2 * w - 1), num_heads))
    )
    self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
    # The authors' fc is a 1×1 nn.Conv2d(3H, 9) with its default bias and init (fan_in 3H), not
    # a Linear, so the recipe's xavier-normal Linear init does not apply to it.
    self.fc = Linear(
      3 * num_heads,
      CONV_TAPS,
      kernel_init=conv_default_init(3 * num_heads),
      bias_init=conv_default_init(3 * num_heads),
      dtype=dtype,
      rngs=rngs,
    )
    self.conv_kernel = nnx.Param(jnp.asarray(one_hot_shift_kernel(dim)))
    self.attention_rate = nnx.Param(jnp.asarray(0.5, jnp.float32))
    self.conv_rate = nnx.Param(jnp.asarray(0.5, jnp.float32))

  def relative_bias_matrix(self) -> jax.Array:
    """(H, N, N) bias added to the attention logits: the table's row of each query's offset
    from its key, per head. Gathered on the CPU; tiled elsewhere, as LKCA's matrix is, so
    that the table's gradient is a sum, not a scatter-add (atomic adds on a GPU)."""
    table = self.relative_bias[...]
    return by_backend(
      lambda t: t[relative_position_index(*self.grid)].transpose(2, 0, 1),
      lambda t: relative_bias_tiled(t, self.grid),
      table,
    )

  def _heads(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, N, 3D) → q, k, v, each (B, N, H, d)."""
    b, n, _ = qkv.shape
    return jnp.unstack(qkv.reshape(b, n, 3, self.num_heads, self.head_dim), axis=2)

  def _softmax(self, q: jax.Array, k: jax.Array) -> jax.Array:
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) * self.head_dim**-0.5
    logits = logits + self.relative_bias_matrix().astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)

  def attention_weights(self, x: jax.Array) -> jax.Array:
    """The attention branch's softmax weights (B, H, N, N) for tokens x (B, N, D), rows
    queries, in float32: the convolution branch and the two rates aside."""
    check_tokens(x, self.qkv.in_features, self.grid, "ACmix")
    q, k, _ = self._heads(self.qkv(x))
    return self._softmax(q, k)

  def attention_branch(self, qkv: jax.Array) -> jax.Array:
    b, n, _ = qkv.shape
    q, k, v = self._heads(qkv)
    weights = self._softmax(q, k).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    return self.out_proj(out.reshape(b, n, -1))

  def convolution_branch(self, qkv: jax.Array) -> jax.Array:
    b, n, dim3 = qkv.shape
    h, w = self.grid
    d = self.head_dim
    head_maps = qkv.reshape(b, h, w, 3 * self.num_heads, d)
    # Mixing the 3H maps along the last axis shares the weights over the d channel indices.
    shifted = self.fc(jnp.swapaxes(head_maps, -1, -2))  # (b, h, w, d, 9)
    y = grouped_conv3x3(shifted, promote_param(self.conv_kernel[...], shifted))
    return y.reshape(b, n, dim3 // 3)

  def branches(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(attention, convolution) outputs before the two rates."""
    check_tokens(x, self.qkv.in_features, self.grid, "ACmix")
    qkv = self.qkv(x)
    return self.attention_branch(qkv), self.convolution_branch(qkv)

  def __call__(self, x: jax.Array) -> jax.Array:
    attention, convolution = self.branches(x)
    return (
      promote_param(self.attention_rate[...], attention) * attention
      + promote_param(self.conv_rate[...], convolution) * convolution
    )
