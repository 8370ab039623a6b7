"""Large Kernel Convolutional Attention (LKCA), arXiv 2401.05738.

One learnable (2h−1)×(2w−1) kernel mixes the h×w grid of value tokens. Read
as a convolution it is a cross-correlation with zero padding (h−1, w−1);
read as attention it is an N×N block-Toeplitz matrix A with
A[(i,j),(p,q)] = K[h−1+p−i, w−1+q−j] applied to V. Both views are the same
function; `view` picks which one XLA runs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax.layers.common import as_grid, check_tokens, head_dim, linear, promote_param

VIEWS = ("auto", "conv", "attention")
KERNEL_SHARING = ("layer", "head", "channel")

# "auto" resolves to the gathered-matrix form on every backend: it spends
# N²·D multiply-adds in one dense matmul, while the convolution form spends
# (2h−1)(2w−1)·N·D ≈ 4·N²·D on mostly zero-padded taps of a 1-channel
# convolution that maps poorly onto matrix units. Measured on the 2-core CPU
# (README, `python -m lkca_jax.tools.bench_mixers`, batch 128, 8×8, D 192): the mixing step
# is 6–8x faster as attention than as conv, the whole mixer about 2x. Past
# this many gathered entries the matrix itself becomes the memory problem,
# and auto falls back to the convolution.
AUTO_MAX_MATRIX_ENTRIES = 1 << 26


@functools.lru_cache(maxsize=None)
def toeplitz_index(h: int, w: int) -> np.ndarray:
  """Flat kernel index of every A entry: idx[(i,j),(p,q)] = (h−1+p−i)(2w−1) + (w−1+q−j)."""
  i, j = np.divmod(np.arange(h * w), w)
  di = (h - 1) + i[None, :] - i[:, None]  # rows: query (i,j); cols: key (p,q)
  dj = (w - 1) + j[None, :] - j[:, None]
  return (di * (2 * w - 1) + dj).astype(np.int32)


def kernel_shape(dim: int, grid, num_heads: int, sharing: str) -> tuple[int, ...]:
  h, w = as_grid(grid)
  spatial = (2 * h - 1, 2 * w - 1)
  if sharing == "layer":
    return spatial
  if sharing == "head":
    return (num_heads, *spatial)
  if sharing == "channel":
    return (dim, *spatial)
  raise ValueError(f"kernel_sharing must be one of {KERNEL_SHARING}, got {sharing!r}")


def attention_matrix(kernel: jax.Array, grid) -> jax.Array:
  """Gathers the (…, N, N) block-Toeplitz matrix from a (…, 2h−1, 2w−1) kernel."""
  h, w = as_grid(grid)
  flat = kernel.reshape(*kernel.shape[:-2], -1)
  return flat[..., toeplitz_index(h, w)]


def mix_attention(v: jax.Array, kernel: jax.Array, grid, sharing: str = "layer") -> jax.Array:
  """out = A @ v with A gathered from the kernel. v: (B, N, D)."""
  a = attention_matrix(kernel.astype(v.dtype), grid)
  if sharing == "layer":
    return jnp.einsum("nm,bmd->bnd", a, v)
  if sharing == "channel":
    return jnp.einsum("dnm,bmd->bnd", a, v)
  b, n, d = v.shape
  heads = kernel.shape[0]
  out = jnp.einsum("hnm,bmhc->bnhc", a, v.reshape(b, n, heads, d // heads))
  return out.reshape(b, n, d)


def mix_conv(v: jax.Array, kernel: jax.Array, grid, sharing: str = "layer") -> jax.Array:
  """The same mixing as a cross-correlation by `jax.lax.conv_general_dilated`."""
  h, w = as_grid(grid)
  b, n, d = v.shape
  kernel = kernel.astype(v.dtype)
  pad = ((h - 1, h - 1), (w - 1, w - 1))
  dims = ("NHWC", "HWIO", "NHWC")
  if sharing == "layer":
    # Fold channels into the batch: one single-channel correlation per map.
    x = v.reshape(b, h, w, d).transpose(0, 3, 1, 2).reshape(b * d, h, w, 1)
    y = jax.lax.conv_general_dilated(x, kernel[:, :, None, None], (1, 1), pad,
                                     dimension_numbers=dims)
    return y.reshape(b, d, n).transpose(0, 2, 1)
  if sharing == "channel":
    y = jax.lax.conv_general_dilated(v.reshape(b, h, w, d), jnp.moveaxis(kernel, 0, -1)[:, :, None, :],
                                     (1, 1), pad, dimension_numbers=dims,
                                     feature_group_count=d)
    return y.reshape(b, n, d)
  heads = kernel.shape[0]
  c = d // heads
  # Heads become grouped channels, the per-head channel index joins the batch.
  x = v.reshape(b, h, w, heads, c).transpose(0, 4, 1, 2, 3).reshape(b * c, h, w, heads)
  y = jax.lax.conv_general_dilated(x, jnp.moveaxis(kernel, 0, -1)[:, :, None, :], (1, 1), pad,
                                   dimension_numbers=dims, feature_group_count=heads)
  return y.reshape(b, c, n, heads).transpose(0, 2, 3, 1).reshape(b, n, d)


def resolve_view(view: str, dim: int, grid, num_heads: int, sharing: str) -> str:
  if view not in VIEWS:
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
  if view != "auto":
    return view
  h, w = as_grid(grid)
  copies = int(np.prod(kernel_shape(dim, grid, num_heads, sharing)[:-2], dtype=np.int64))
  return "attention" if copies * (h * w) ** 2 <= AUTO_MAX_MATRIX_ENTRIES else "conv"


class LKCA(nnx.Module):
  """LKCA token mixer: v = x W_v (no bias) → large-kernel mixing → W_o (bias).

  Args:
    dim: token width D.
    grid: (h, w) patch grid; tokens are laid out row-major, N = h·w.
    num_heads: heads for `kernel_sharing="head"` (D must divide evenly).
    view: "conv", "attention" or "auto" (see AUTO_MAX_MATRIX_ENTRIES).
    kernel_sharing: "layer" (the reference: one kernel for every channel),
      "head" (one per head) or "channel" (depthwise, one per channel).
  """

  needs_grid = True  # mixes by position, so it sees only the h·w patch tokens

  def __init__(self, dim: int, grid=(8, 8), *, num_heads: int = 1, view: str = "auto",
               kernel_sharing: str = "layer", dtype=None, rngs: nnx.Rngs):
    self.grid = as_grid(grid)
    if kernel_sharing == "head":
      head_dim(dim, num_heads, "LKCA with kernel_sharing='head'")
    self.kernel_sharing = kernel_sharing
    self.view = resolve_view(view, dim, self.grid, num_heads, kernel_sharing)
    self.v_proj = linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.kernel = nnx.Param(jnp.zeros(kernel_shape(dim, self.grid, num_heads, kernel_sharing)))
    self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)

  def attention_matrix(self) -> jax.Array:
    return attention_matrix(self.kernel[...], self.grid)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_tokens(x, self.grid, "LKCA")
    v = self.v_proj(x)
    mix = mix_conv if self.view == "conv" else mix_attention
    out = mix(v, promote_param(self.kernel[...], v), self.grid, self.kernel_sharing)
    return self.out_proj(out)
