"""Large Kernel Convolutional Attention (LKCA), arXiv 2401.05738.

One learnable (2h−1)×(2w−1) kernel mixes the h×w grid of value tokens. Read
as a convolution it is a cross-correlation with zero padding (h−1, w−1);
read as attention it is an N×N block-Toeplitz matrix A with
A[(i,j),(p,q)] = K[h−1+p−i, w−1+q−j] applied to V; read in the frequency
domain it is a product of the transforms of V and K on a periodic grid large
enough that no two offsets meet. The three views are the same function; `view`
picks which one XLA runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax.backend import by_backend
from lkca_jax.layers.common import (
  add_wide,
  as_grid,
  backward_by_hand,
  check_cost_sizes,
  check_tokens,
  head_dim,
  linear,
  project,
  promote_param,
  threaded,
  toeplitz_gathered,
  toeplitz_tiled,
  wide,
)

VIEWS = ("auto", "conv", "attention", "fft")
KERNEL_SHARING = ("layer", "head", "channel")
# How K starts. "zeros" is the reference (docs/method.md#lkca-operator): at init the
# mixer mixes no tokens and outputs b_o. The others are lkca_jax's extensions, each a
# fixed (2h−1, 2w−1) pattern copied to every kernel of the layer:
# "delta": 1 at the zero offset (A = I, every token keeps its own value);
# "gaussian": N(0, GAUSSIAN_INIT_STD²) noise, drawn per kernel;
# "decay": exp(−|offset| / DECAY_LENGTH) (Euclidean, in patches), taps summing to 1.
KERNEL_INITS = ("zeros", "delta", "gaussian", "decay")
GAUSSIAN_INIT_STD = 0.02  # the usual ViT std for a learned table
DECAY_LENGTH = 1.0
# How a trained kernel moves to another grid (lkca_jax.resolution): "pad" keeps each tap's
# offset in patches (zeros at new offsets), "resample" keeps it as a fraction of the image.
KERNEL_MOVES = ("pad", "resample")
# Measured (docs/results.md, "across resolutions": Tiny-ImageNet, 32 → 64 px, 3 seeds, two
# shapes): resample was ahead of pad, or level, for every seed evaluated untrained; after
# fine-tuning the two shapes disagree (mean difference 0.1 point), so untrained decides.
DEFAULT_KERNEL_MOVE = "resample"

# What "auto" picks (`resolve_view`), per backend, by the number of tokens N = h·w: the
# gathered matrix (N²·D multiply-adds in one dense matmul) up to a crossover, the FFT view
# (O(N log N · D)) from there on. The conv view spends (2h−1)(2w−1)·N·D ≈ 4·N²·D on
# mostly zero-padded taps and was never the fastest (forward+backward) at any grid
# measured, so auto never picks it.
# CPU: `python -m lkca_jax.tools.bench_views` (docs/benchmarks.md, 2026-12-03b, 2-core AMD
# EPYC, quiet), forward+backward per image, D 192, one shared kernel: attention wins at
# 16×16 at every level (block 4.5 vs 7.5 ms); at 32×32 the two are level within noise
# (mixer 15.8–17.4 ms fft vs 17.6–26.5 attention, block 30–32 vs 27–31); from 48×48 fft
# wins every level. So fft from the level point, 32×32 = 1024 tokens.
# Other backends ("default", as in `backend.by_backend`): one NVIDIA H200 (docs/benchmarks.md,
# 2026-12-04c, jax 0.11.2), same benchmark: attention wins through 48×48 at both levels
# measured (mixer 0.35 vs 0.62 ms fft, mixing step 0.18 vs 0.40), fft at 64×64 (mixer
# 0.43 vs 0.71 ms, and 40 MB against 108). So fft from 64×64 = 4096 tokens. Batch 1 at
# those grids leaves the GPU mostly idle, so the step between them is coarse; no TPU has
# been measured (it shares this value).
AUTO_FFT_MIN_TOKENS = {"cpu": 1024, "default": 4096}
# Whatever the crossover says, auto leaves the gathered form once its matrices (one per
# kernel) would hold more entries than this (depthwise sharing on a large grid): the
# matrix itself becomes the memory problem.
AUTO_MAX_MATRIX_ENTRIES = 1 << 26
# FFT lengths are rounded up to a product of these primes: XLA's FFTs (pocketfft on the
# CPU, cuFFT) run such lengths with their fast radix kernels and fall back to a much
# slower algorithm for a large prime factor (CPU, 192 maps: a 127² transform pair took
# 2.7x the time of a 128² one, 31² 8x that of 32²).
FFT_RADICES = (2, 3, 5, 7)
# When a layer-shared LKCA runs mix(x W_v) W_o as mix(x (W_v W_o)) (`LKCA.merge`): "auto"
# where a call's tokens outnumber the width, so the D×D×D product of the weights pays for
# itself; "always" where that product costs nothing per call (weights that are constants of
# the program, as in an exported artifact: XLA computes it once, when it compiles); "never".
MERGES = ("auto", "always", "never")


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


def init_kernel(
  kernel_init: str, shape: tuple[int, ...], key: jax.Array | None = None
) -> jax.Array:
  """A float32 kernel of `shape` (…, 2h−1, 2w−1) as `kernel_init` says (see KERNEL_INITS).

  Only "gaussian" reads `key`.
  """
  if kernel_init not in KERNEL_INITS:
    raise ValueError(f"kernel_init must be one of {KERNEL_INITS}, got {kernel_init!r}")
  if kernel_init == "gaussian":
    return GAUSSIAN_INIT_STD * jax.random.normal(key, shape, jnp.float32)
  rows, cols = shape[-2:]
  di = np.arange(rows) - (rows - 1) // 2  # offsets; the centre tap is the zero offset
  dj = np.arange(cols) - (cols - 1) // 2
  if kernel_init == "zeros":
    pattern = np.zeros((rows, cols))
  elif kernel_init == "delta":
    pattern = ((di[:, None] == 0) & (dj[None, :] == 0)).astype(np.float64)
  else:  # decay
    pattern = np.exp(-np.hypot(di[:, None], dj[None, :]) / DECAY_LENGTH)
    pattern /= pattern.sum()
  return jnp.asarray(np.broadcast_to(pattern, shape), jnp.float32)


def attention_matrix(kernel: jax.Array, grid) -> jax.Array:
  """The (…, N, N) block-Toeplitz matrix of a (…, 2h−1, 2w−1) kernel, A[(i,j),(p,q)] =
  K[h−1+p−i, w−1+q−j], tiled from its taps (`common.toeplitz_tiled`): no gather, so its
  gradient is a sum, where a gather's is a scatter-add, which a GPU runs as atomic adds (a
  float sum in no fixed order: a gradient that changes from run to run) and a TPU as a
  loop. The same values as `attention_matrix_cpu`, bit for bit."""
  return toeplitz_tiled(kernel, grid)


def attention_matrix_cpu(kernel: jax.Array, grid) -> jax.Array:
  """`attention_matrix` gathered (`common.toeplitz_gathered`), for XLA:CPU: there its
  gradient, a scatter-add it runs as a loop in a fixed order, took 0.05–0.66 of the tiled
  form's time (docs/benchmarks.md, 2026-12-07d)."""
  return toeplitz_gathered(kernel, grid)


def mix_attention(v: jax.Array, kernel: jax.Array, grid, sharing: str = "layer") -> jax.Array:
  """out = A @ v with A the kernel's matrix (`attention_matrix`). v: (B, N, D)."""
  return mix_by_matrix(v, attention_matrix(kernel.astype(v.dtype), grid), sharing)


def mix_by_matrix(v: jax.Array, a: jax.Array, sharing: str = "layer") -> jax.Array:
  """out = A @ v for the kernels' matrices `a`: (N, N) for one kernel a layer, (D, N, N) or
  (H, N, N) for one a channel or a head. v: (B, N, D)."""
  if sharing == "layer":
    # A broadcast over the batch, one (N×N)·(N×D) matmul per image: both operands are
    # row-major as they lie. The plain einsum "nm,bmd->bnd" made XLA:CPU transpose v to
    # (B·D, N) and the result back, forward and backward; this form skips the copies
    # (lkca_b train step, 2-core CPU: mixing fwd+bwd 8.9 → 6.5 ms per layer).
    return jax.lax.dot_general(
      jnp.broadcast_to(a, (v.shape[0], *a.shape)), v, (((2,), (1,)), ((0,), (0,)))
    )
  if sharing == "channel":
    return jnp.einsum("dnm,bmd->bnd", a, v)
  b, n, d = v.shape
  heads = a.shape[0]
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
    y = jax.lax.conv_general_dilated(
      x, kernel[:, :, None, None], (1, 1), pad, dimension_numbers=dims
    )
    return y.reshape(b, d, n).transpose(0, 2, 1)
  if sharing == "channel":
    y = jax.lax.conv_general_dilated(
      v.reshape(b, h, w, d),
      jnp.moveaxis(kernel, 0, -1)[:, :, None, :],
      (1, 1),
      pad,
      dimension_numbers=dims,
      feature_group_count=d,
    )
    return y.reshape(b, n, d)
  heads = kernel.shape[0]
  c = d // heads
  # Heads become grouped channels, the per-head channel index joins the batch.
  x = v.reshape(b, h, w, heads, c).transpose(0, 4, 1, 2, 3).reshape(b * c, h, w, heads)
  y = jax.lax.conv_general_dilated(
    x,
    jnp.moveaxis(kernel, 0, -1)[:, :, None, :],
    (1, 1),
    pad,
    dimension_numbers=dims,
    feature_group_count=heads,
  )
  return y.reshape(b, c, n, heads).transpose(0, 2, 3, 1).reshape(b, n, d)


def min_fft_shape(grid) -> tuple[int, int]:
  """(2h−1, 2w−1): the smallest periodic grid on which the offsets −(h−1) … h−1 (and
  −(w−1) … w−1) of every pair of tokens stay distinct, so the periodic (circular)
  correlation equals the zero-padded one (`circular_correlate`)."""
  h, w = as_grid(grid)
  return 2 * h - 1, 2 * w - 1


def smooth_length(n: int) -> int:
  """The smallest length ≥ n whose prime factors are all FFT_RADICES."""
  length = n
  while True:
    rest = length
    for p in FFT_RADICES:
      while rest % p == 0:
        rest //= p
    if rest == 1:
      return length
    length += 1


def fft_shape(grid) -> tuple[int, int]:
  """The transform size `mix_fft` uses: min_fft_shape rounded up to fast FFT lengths."""
  return tuple(smooth_length(n) for n in min_fft_shape(grid))


def _fold(kernel: jax.Array, axis: int, length: int) -> jax.Array:
  """Puts the taps of offsets −c … c (c = (size−1)/2, the centre tap the zero offset) of one
  kernel axis at their index modulo `length`: offset d at d mod length, taps that meet
  summed (they meet only when length < 2c+1)."""
  size = kernel.shape[axis]
  centre = (size - 1) // 2
  periods = -(-size // length)  # ceil: the folds needed to cover every tap
  pad = [(0, 0)] * kernel.ndim
  pad[axis] = (0, periods * length - size)
  stacked = jnp.pad(kernel, pad)
  shape = (*kernel.shape[:axis], periods, length, *kernel.shape[axis + 1 :])
  folded = stacked.reshape(shape).sum(axis=axis)  # tap a now at a mod length
  return jnp.roll(folded, -centre, axis=axis)  # offset d = a − centre at d mod length


def circular_correlate(maps: jax.Array, kernel: jax.Array, shape) -> jax.Array:
  """out[..., i, j] = Σ_{p,q} K[h−1+p−i, w−1+q−j] · maps[..., p, q] on a `shape` periodic grid.

  maps: (..., h, w); kernel: (..., 2h−1, 2w−1), broadcasting against maps' leading axes.
  Circular cross-correlation by the DFT: with k̃ the kernel folded onto the periodic grid
  (`_fold`), out = irfft2(rfft2(maps) · conj(rfft2(k̃)))[:h, :w]. It equals the zero-padded
  correlation exactly when shape ≥ min_fft_shape (h×w maps): smaller sizes alias offsets d
  and d ± length, which the tests show. Not checked here; `mix_fft` checks.
  """
  h, w = maps.shape[-2:]
  k = _fold(_fold(kernel, kernel.ndim - 2, shape[0]), kernel.ndim - 1, shape[1])
  spectrum = jnp.fft.rfft2(maps, s=shape) * jnp.conj(jnp.fft.rfft2(k))
  return jnp.fft.irfft2(spectrum, s=shape)[..., :h, :w]


def mix_fft(
  v: jax.Array, kernel: jax.Array, grid, sharing: str = "layer", *, shape=None
) -> jax.Array:
  """The same mixing as a product in the frequency domain (`circular_correlate`).

  O(N log N · D) instead of O(N² · D). `shape` is the transform size: default `fft_shape`;
  anything below min_fft_shape(grid) would wrap offsets around and is refused. The
  transforms run in float32 at least (jnp.fft has no bfloat16); the result is cast back
  to v's dtype, so bfloat16 inputs get the float32 result rounded once (relative error
  ≤ 2⁻⁸ per entry on top of the float32 transforms' round-off).
  """
  h, w = as_grid(grid)
  b, n, d = v.shape
  shape = fft_shape(grid) if shape is None else tuple(shape)
  smallest = min_fft_shape(grid)
  if shape[0] < smallest[0] or shape[1] < smallest[1]:
    raise ValueError(
      f"FFT shape {shape} is too small for a {h}x{w} grid: at least {smallest} keeps the "
      "periodic correlation from wrapping around"
    )
  compute = wide(v.dtype)
  kernel = kernel.astype(compute)
  maps = v.astype(compute).reshape(b, h, w, d).transpose(0, 3, 1, 2)  # (B, D, h, w)
  if sharing == "head":
    heads = kernel.shape[0]
    maps = maps.reshape(b, heads, d // heads, h, w)
    kernel = kernel[:, None]  # (H, 1, 2h−1, 2w−1): one kernel per head's channels
  out = circular_correlate(maps, kernel, shape)  # "layer": (2h−1, 2w−1); "channel": (D, …)
  return out.reshape(b, d, n).transpose(0, 2, 1).astype(v.dtype)


def mix_attention_cpu(v: jax.Array, kernel: jax.Array, grid, sharing: str = "layer") -> jax.Array:
  """`mix_attention` for XLA:CPU: the matrix gathered (`attention_matrix_cpu`); with one
  kernel per layer, its batched product (one (N, N) matrix times each image's (N, D)
  values) is fused with a row sum (`threaded`), which puts it on every thread (lkca_t and
  lkca_b train steps, 2-core CPU: 1.01–1.03×). Below float32 the product runs in float32, as
  XLA:CPU would widen it anyway, so that the kernel gradient's sum over the batch adds
  unrounded products. In a reverse-only trace below float32 it is `mix_layer_reverse`
  (backend.reverse_mode_only)."""
  if sharing != "layer":
    return mix_by_matrix(v, attention_matrix_cpu(kernel.astype(v.dtype), grid), sharing)
  a = attention_matrix_cpu(kernel.astype(wide(v.dtype)), grid)
  if backward_by_hand(v.dtype):
    return mix_layer_reverse(v, a)
  return threaded(mix_by_matrix(v.astype(a.dtype), a)).astype(v.dtype)


@jax.custom_vjp
def mix_layer_reverse(v: jax.Array, matrix: jax.Array) -> jax.Array:
  """matrix · v_b for every image b, v (B, N, D) below float32 and the (N, N) matrix in
  float32, for traces that only reverse mode differentiates. Every product, forward and
  backward, takes bfloat16 operands (the matrix rounded once) with a float32 result, which
  XLA:CPU runs on AMX where the CPU has it; the output and v's gradient are rounded once,
  the matrix's gradient is the float32 sum over the batch (docs/benchmarks.md,
  2026-12-05g). A `custom_vjp`: `jvp` cannot go through it."""
  return _mix_layer_reverse_forward(v, matrix)[0]


def _mix_layer_reverse_forward(v, matrix):
  compute = matrix.dtype
  out = jnp.einsum("nm,bmd->bnd", matrix.astype(v.dtype), v, preferred_element_type=compute)
  return out.astype(v.dtype), (v, matrix)


def _mix_layer_reverse_backward(residuals, d_out):
  v, matrix = residuals
  compute = matrix.dtype
  d_v = jnp.einsum("nm,bnd->bmd", matrix.astype(v.dtype), d_out, preferred_element_type=compute)
  d_matrix = jnp.einsum("bnd,bmd->nm", d_out, v, preferred_element_type=compute)
  return d_v.astype(v.dtype), d_matrix


mix_layer_reverse.defvjp(_mix_layer_reverse_forward, _mix_layer_reverse_backward)


MIXES = {"conv": mix_conv, "attention": mix_attention, "fft": mix_fft}
CPU_MIXES = {**MIXES, "attention": mix_attention_cpu}
AUTO_PLATFORMS = tuple(AUTO_FFT_MIN_TOKENS)


def resolve_view(
  view: str, dim: int, grid, num_heads: int, sharing: str, platform: str = "cpu"
) -> str:
  """The view that runs for `view` on `platform` ("cpu", or "default": every other backend).

  A concrete view is itself; "auto" is the measured choice (AUTO_FFT_MIN_TOKENS,
  AUTO_MAX_MATRIX_ENTRIES).
  """
  if view not in VIEWS:
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
  if platform not in AUTO_PLATFORMS:
    raise ValueError(f"platform must be one of {AUTO_PLATFORMS}, got {platform!r}")
  if view != "auto":
    return view
  h, w = as_grid(grid)
  copies = int(np.prod(kernel_shape(dim, grid, num_heads, sharing)[:-2], dtype=np.int64))
  if h * w >= AUTO_FFT_MIN_TOKENS[platform] or copies * (h * w) ** 2 > AUTO_MAX_MATRIX_ENTRIES:
    return "fft"
  return "attention"


def least_tokens(x: jax.Array) -> int:
  """The fewest tokens x (…, D) can hold: a symbolic dimension (`jax.export` shape
  polymorphism) counts as 1, its least value, so the choice it feeds is one decision for
  every size."""
  return int(np.prod([d if isinstance(d, int) else 1 for d in x.shape[:-1]], dtype=np.int64))


class LKCA(nnx.Module):
  """LKCA token mixer: v = x W_v (no bias) → large-kernel mixing → W_o (bias). With one
  kernel for every channel (layer sharing, the reference) it runs as mix(x (W_v W_o)) + b_o.

  Args:
    dim: token width D.
    grid: (h, w) patch grid; tokens are laid out row-major, N = h·w.
    num_heads: heads for `kernel_sharing="head"` (D must divide evenly).
    view: "conv", "attention", "fft" or "auto": the measured fastest per backend and grid
      (`resolve_view`; AUTO_FFT_MIN_TOKENS). Resolved at each call, for the CPU
      (`cpu_view`) and for every other backend (`default_view`); the call runs the one
      of the platform it is lowered for (`backend.by_backend`). Setting `view` on a
      built module switches views; the parameters are the same for all.
    kernel_sharing: "layer" (the reference: one kernel for every channel),
      "head" (one per head) or "channel" (depthwise, one per channel).
    kernel_init: "zeros" (the reference), "delta", "gaussian" or "decay" (see
      KERNEL_INITS); the same parameters either way.

  `merge` ("auto"; MERGES), set on a built module, says when layer sharing runs the two
  projections as one product (`_merged`).
  """

  needs_grid = True  # mixes by position, so it sees only the h·w patch tokens
  size_presets = {"t": "lkca_t", "b": "lkca_b"}
  config_options = {"view": VIEWS, "kernel_sharing": KERNEL_SHARING, "kernel_init": KERNEL_INITS}

  @staticmethod
  def macs(
    num_tokens: int,
    dim: int,
    num_heads: int,
    *,
    view: str = "auto",
    kernel_sharing: str = "layer",
    kernel_init: str = "zeros",
  ) -> int:
    """W_v and W_o (2·N·D²), then the direct N×N mixing of every channel (N²·D).

    The direct (attention-view) cost whatever `view` and `kernel_sharing`: the
    conv view runs the same function on (2h−1)(2w−1) mostly zero-padded taps, the
    fft view in O(N log N · D) transforms.
    """
    del view, kernel_sharing, kernel_init  # the count of the function, not of one schedule
    check_cost_sizes(num_tokens, dim, num_heads, "LKCA")
    return 2 * num_tokens * dim**2 + num_tokens**2 * dim

  def __init__(
    self,
    dim: int,
    grid=(8, 8),
    *,
    num_heads: int = 1,
    view: str = "auto",
    kernel_sharing: str = "layer",
    kernel_init: str = "zeros",
    dtype=None,
    rngs: nnx.Rngs,
  ):
    self.grid = as_grid(grid)
    if kernel_sharing == "head":
      head_dim(dim, num_heads, "LKCA with kernel_sharing='head'")
    self.kernel_sharing = kernel_sharing
    self.num_heads = num_heads
    self.view = view  # read at each call: setting it on a built module switches views
    self.merge = "auto"  # read at each call, as `view`
    resolve_view(view, dim, self.grid, num_heads, kernel_sharing)  # a bad name fails here
    shape = kernel_shape(dim, self.grid, num_heads, kernel_sharing)
    if kernel_init not in KERNEL_INITS:
      raise ValueError(f"kernel_init must be one of {KERNEL_INITS}, got {kernel_init!r}")
    self.v_proj = linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
    # Drawn after the projections, so they are the same for every kernel_init at one seed.
    key = rngs.params() if kernel_init == "gaussian" else None
    self.kernel = nnx.Param(init_kernel(kernel_init, shape, key))

  @property
  def cpu_view(self) -> str:
    """The view `view` runs as on the CPU."""
    return self._resolved("cpu")

  @property
  def default_view(self) -> str:
    """The view `view` runs as on every other backend."""
    return self._resolved("default")

  def _resolved(self, platform: str) -> str:
    dim = self.v_proj.in_features
    return resolve_view(self.view, dim, self.grid, self.num_heads, self.kernel_sharing, platform)

  def attention_matrix(self) -> jax.Array:
    return attention_matrix(self.kernel[...], self.grid)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_tokens(x, self.v_proj.in_features, self.grid, "LKCA")
    if self.kernel_sharing == "layer" and self._merges(least_tokens(x), x.shape[-1]):
      return self._merged(x)
    return self.out_proj(self._mixed(self.v_proj(x)))

  def _merges(self, tokens: int, dim: int) -> bool:
    if self.merge not in MERGES:
      raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
    return self.merge == "always" or (self.merge == "auto" and tokens > dim)

  def _merged(self, x: jax.Array) -> jax.Array:
    """mix(x W_v) W_o + b_o computed as mix(x (W_v W_o)) + b_o. One kernel mixes every
    channel alike, so the mixing commutes with W_o: each of the T tokens then takes one
    D×D product instead of two, forward and in both gradients, for one D×D×D product of
    the weights; fewer multiply-adds when T > D, as in any training batch
    (docs/benchmarks.md, 2026-12-04f). The same function up to round-off, and the same
    parameters."""
    out_proj = self.out_proj
    merged = jnp.dot(self.v_proj.kernel[...], out_proj.kernel[...], precision=out_proj.precision)
    x, merged, bias = out_proj.promote_dtype((x, merged, out_proj.bias[...]), dtype=out_proj.dtype)
    return add_wide(self._mixed(project(x, merged, None, out_proj.precision)), bias)

  def _mixed(self, v: jax.Array) -> jax.Array:
    """The kernel's mixing of the tokens v (B, N, D), in the view of the lowering backend."""
    kernel = promote_param(self.kernel[...], v)
    cpu_mix, default_mix = CPU_MIXES[self.cpu_view], MIXES[self.default_view]
    if cpu_mix is default_mix:  # one function everywhere: nothing to choose
      return self._mix(cpu_mix)(v, kernel)
    return by_backend(self._mix(cpu_mix), self._mix(default_mix), v, kernel)

  def _mix(self, mix):
    return lambda v, kernel: mix(v, kernel, self.grid, self.kernel_sharing)
