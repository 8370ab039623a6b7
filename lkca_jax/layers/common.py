"""Building blocks shared by every model: init, Linear, LayerNorm, MLP, DropPath, and the
block-Toeplitz matrix of a kernel of relative offsets (LKCA's, ACmix's position bias).

The reference initialises every Linear with xavier/glorot *normal* (not
truncated) weights and zero biases, and uses LayerNorm with epsilon 1e-5
(PyTorch's default), so those are fixed here once.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from lkca_jax.backend import by_backend, in_reverse_mode_only

xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
LAYER_NORM_EPSILON = 1e-5


def linear(
  in_features: int, out_features: int, *, use_bias: bool = True, dtype=None, rngs: nnx.Rngs
) -> Linear:
  return Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    kernel_init=xavier_normal,
    bias_init=jax.nn.initializers.zeros,
    dtype=dtype,
    rngs=rngs,
  )


class Linear(nnx.Linear):
  """`nnx.Linear` over the last axis, its parameters and init unchanged; on the CPU its
  product runs as `dense_cpu` (backend.by_backend), elsewhere as nnx.Linear's."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None or self.preferred_element_type is not None:
      return super().__call__(inputs, out_sharding)
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    return project(x, kernel, bias, self.precision)


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision=None):
  """x · kernel + bias over the last axis of x, as `Linear` runs it: `dense_cpu` where the
  computation is lowered for the CPU (`dense_cpu_reverse` below float32 in a reverse-only
  trace, backend.reverse_mode_only), `dense` elsewhere (backend.by_backend)."""

  def dense_on_cpu(x, kernel, bias):
    if backward_by_hand(x.dtype):
      return dense_cpu_reverse(x, kernel, bias, precision)
    rows = x.reshape(-1, x.shape[-1])
    return dense_cpu(rows, kernel, bias, precision).reshape(*x.shape[:-1], kernel.shape[-1])

  dense_plain = lambda x, kernel, bias: dense(x, kernel, bias, precision)
  return by_backend(dense_on_cpu, dense_plain, x, kernel, bias)


def wide(dtype) -> jnp.dtype:
  """The dtype that computation below float32 runs in: float32 at least."""
  return jnp.promote_types(dtype, jnp.float32)


def backward_by_hand(dtype) -> bool:
  """Whether a CPU form computing in `dtype` takes its hand-written backward pass (a
  `custom_vjp`): below float32, in a trace that only reverse mode differentiates
  (backend.reverse_mode_only)."""
  return in_reverse_mode_only() and wide(dtype) != dtype


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision=None) -> jax.Array:
  """x · kernel + bias over the last axis of x: nnx.Linear's arithmetic."""
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return y if bias is None else y + bias


def dense_wide(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision=None):
  """`dense` with the product returned in float32 at least, then rounded to x's dtype where
  `dense` rounds it too (the same values up to the order of summation). XLA:CPU runs a
  bfloat16 product with a float32 result on AMX where the CPU has it, but widens one with
  a bfloat16 result to a float32 product (docs/benchmarks.md, 2026-12-04e)."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y = jax.lax.dot_general(
    x, kernel, dims, precision=precision, preferred_element_type=wide(x.dtype)
  )
  y = y.astype(x.dtype)
  return y if bias is None else y + bias


def add_wide(y: jax.Array, addend: jax.Array) -> jax.Array:
  """y + addend (a bias, an embedding: broadcast over y's leading axes) added in float32 at
  least and rounded to y's dtype once: the same values as adding in y's dtype where the
  addend has it too (two bfloat16 numbers sum exactly in float32), one rounding fewer where
  it is wider. Reverse mode then sums the addend's gradient over the broadcast axes in
  float32; in bfloat16 XLA:CPU summed it as a tree of rounded partial sums, 3 % off and 7×
  slower on 8,192 rows (docs/benchmarks.md, 2026-12-05e)."""
  compute = wide(y.dtype)
  return (y.astype(compute) + addend.astype(compute)).astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def dense_cpu(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision=None):
  """`dense_wide` for a (M, K) x, with a tangent rule whose transpose, the weight gradient,
  copies d_y transposed rather than x: XLA:CPU otherwise often copies x, recomputing its
  producer (a LayerNorm, a GELU) inside a strided transpose (docs/benchmarks.md)."""
  return dense_wide(x, kernel, bias, precision)


def _dense_cpu_jvp(precision, primals, tangents):
  x, kernel, bias = primals
  d_x, d_kernel, d_bias = tangents
  y = dense_wide(x, kernel, bias, precision)
  terms = []  # a tangent that is a symbolic zero contributes no product
  if not isinstance(d_x, SymbolicZero):
    terms.append(jnp.dot(d_x, kernel, precision=precision))
  if not isinstance(d_kernel, SymbolicZero):
    # x·dW written as (dWᵀ·xᵀ)ᵀ: transposed for reverse mode it is (d_yᵀ·x)ᵀ.
    rows = (((1,), (1,)), ((), ()))
    terms.append(jax.lax.dot_general(d_kernel.T, x, rows, precision=precision).T)
  if bias is not None and not isinstance(d_bias, SymbolicZero):
    # Broadcast in float32 at least: reverse mode sums it over the rows, which XLA:CPU
    # does for bfloat16 as a tree of strided windows with rounded partial sums, several
    # times slower and off by a percent at 4,096 rows.
    terms.append(jnp.broadcast_to(d_bias.astype(wide(y.dtype)), y.shape).astype(y.dtype))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


dense_cpu.defjvp(_dense_cpu_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_cpu_reverse(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision=None):
  """`dense_wide` below float32 with its own backward pass, for traces that only reverse
  mode differentiates (backend.reverse_mode_only: the trainer's gradient). Both backward
  products take the bfloat16 cotangent with a float32 result, which XLA:CPU runs on AMX
  where the CPU has it; the transpose of `dense_cpu`'s tangent rule gives them the
  float32 cotangent, which XLA:CPU widens to float32 products (docs/benchmarks.md,
  2026-12-05g). A `custom_vjp`: `jvp`, `jacfwd` and `hessian` cannot go through it."""
  return dense_wide(x, kernel, bias, precision)


def _dense_cpu_reverse_forward(x, kernel, bias, precision):
  return dense_wide(x, kernel, bias, precision), (x, kernel, bias)


def _dense_cpu_reverse_backward(precision, residuals, d_y):
  x, kernel, bias = residuals
  rows = d_y.ndim - 1
  compute = wide(d_y.dtype)
  d_x = jax.lax.dot_general(
    d_y, kernel, (((rows,), (1,)), ((), ())), precision=precision, preferred_element_type=compute
  )
  d_kernel = jax.lax.dot_general(
    features_first(x),
    d_y.reshape(-1, d_y.shape[-1]),
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=compute,
  )
  d_bias = None if bias is None else d_y.astype(compute).sum(tuple(range(rows))).astype(bias.dtype)
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias


dense_cpu_reverse.defvjp(_dense_cpu_reverse_forward, _dense_cpu_reverse_backward)


def features_first(x: jax.Array) -> jax.Array:
  """x (..., K) as (K, rows), written out in that layout where x has two leading axes or
  more: XLA:CPU folds a two-axis transpose into the product that reads it, which then
  contracts its operands' leading axes, a form it runs 3-4× slower in bfloat16."""
  return jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis, its parameters and init unchanged, with exact
  statistics in float32 at least and the output in the module's dtype. On the CPU it runs
  as `normalize_cpu` (backend.by_backend), elsewhere as `normalize`."""

  def __call__(self, x: jax.Array, *, mask=None) -> jax.Array:
    if mask is not None:
      raise ValueError("lkca_jax's LayerNorm takes no mask; normalise every token")
    y = by_backend(
      lambda x, scale, bias: normalize_cpu(x, scale, bias, self.epsilon),
      lambda x, scale, bias: normalize(x, scale, bias, self.epsilon),
      x.astype(wide(x.dtype)),
      self.scale[...],
      self.bias[...],
    )
    return y.astype(self.dtype or x.dtype)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x − mean) / sqrt(var + epsilon) · scale + bias over the last axis of float x, the
  variance from the centred values (exact far from zero)."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(var + epsilon) * scale.astype(x.dtype) + bias.astype(x.dtype)


def row_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Sums over the last axis of same-shaped arrays, all in one reduction.

  One multi-operand `lax.reduce` reads each row once, and XLA:CPU runs it as its own
  loop; a plain sum per statistic is handed to a library kernel that needs every
  broadcast operand written out in full first.
  """
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  add = lambda acc, value: tuple(p + q for p, q in zip(acc, value, strict=True))
  return jax.lax.reduce(arrays, zeros, add, (arrays[0].ndim - 1,))


def _normed_one_pass(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """((x − mean)·inv_std, inv_std) with both statistics from one pass (`row_sums`).

  Shifting each row by its own first value keeps E[s²] − E[s]² exact far from zero."""
  n = x.shape[-1]
  shifted = x - x[..., :1]
  total, squares = row_sums(shifted, shifted * shifted)
  mean = total / n
  inv_std = jax.lax.rsqrt(jnp.maximum(squares / n - mean * mean, 0.0) + epsilon)[..., None]
  return (shifted - mean[..., None]) * inv_std, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def normalize_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """`normalize` with both statistics from one pass over each row, which on the 2-core CPU
  makes the train step faster than one reduction per statistic (docs/benchmarks.md).

  A multi-operand reduction has no transpose in JAX, so the derivative is given as a
  tangent rule in plain sums and products, which JAX linearises and transposes."""
  normed, _ = _normed_one_pass(x, epsilon)
  return normed * scale.astype(x.dtype) + bias.astype(x.dtype)


def _outer(column: jax.Array, row: jax.Array) -> jax.Array:
  """column (..., 1) times row (D,) as a product over a contraction of length one."""
  return jax.lax.dot_general(column, row[None, :], (((column.ndim - 1,), (0,)), ((), ())))


@normalize_cpu.defjvp
def _normalize_cpu_jvp(epsilon, primals, tangents):
  x, scale, bias = primals
  d_x, d_scale, d_bias = tangents
  normed, inv_std = _normed_one_pass(x, epsilon)
  scale = scale.astype(x.dtype)
  n = x.shape[-1]
  # d_y = scale·inv_std·(d_x − mean(d_x) − normed·mean(normed·d_x)), with the two row
  # terms written as outer products with scale. Reverse mode then takes Σ_d scale·ct and
  # Σ_d scale·normed·ct as matrix-vector products with scale; as sums, XLA:CPU hands them
  # to a library kernel that needs scale and inv_std written out at full size first
  # (every preset's float32 step 1.02–1.05× faster, docs/benchmarks.md, 2026-12-05f).
  mean_term = jnp.sum(d_x, axis=-1, keepdims=True) * (-inv_std / n)
  normed_term = jnp.sum(normed * d_x, axis=-1, keepdims=True) * (-inv_std / n)
  d_y = (inv_std * d_x) * scale + _outer(mean_term, scale) + normed * _outer(normed_term, scale)
  y = normed * scale + bias.astype(x.dtype)
  return y, d_y + normed * d_scale.astype(x.dtype) + d_bias.astype(x.dtype)


def threaded(y: jax.Array) -> jax.Array:
  """y, value for value (y + 0·Σ_rows y; a row holding ±inf turns NaN), for XLA:CPU: there
  a batched product of small matrices runs on one thread unless its fusion also reduces
  over rows, which YNNPACK schedules over every thread. Applied to a product's result, it
  fuses that row sum with the product; applied to a tangent, with the product that
  transposes it in reverse mode (docs/benchmarks.md, 2026-12-04d). For CPU forms only
  (backend.by_backend), which run their products in float32 at least: XLA:CPU widens a
  bfloat16 product outside any such fusion."""
  return y + 0 * jnp.sum(y, axis=-1, keepdims=True)


def layer_norm(
  dim: int, *, epsilon: float = LAYER_NORM_EPSILON, dtype=None, rngs: nnx.Rngs
) -> LayerNorm:
  return LayerNorm(dim, epsilon=epsilon, dtype=dtype, rngs=rngs)


class DropPath(nnx.Dropout):
  """Stochastic depth: drops a whole residual branch per sample.

  This is `nnx.Dropout` with the mask broadcast over every axis but the
  batch, so kept samples are scaled by 1 / (1 - rate) exactly as in the
  reference, and `model.train()` / `model.eval()` switch it like dropout.
  Inputs are (B, N, D).
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
    super().__init__(rate, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, inputs, *, rngs=None, rate=None):
    """With `rate` (a traced scalar in [0, 1), e.g. one run's of many) it replaces
    `self.rate`; a key is then drawn even at rate 0, so every rate uses the same keys."""
    if rate is None:
      return super().__call__(inputs, rngs=rngs)
    if self.deterministic:
      return inputs
    key = rngs[self.rng_collection]() if isinstance(rngs, nnx.Rngs) else rngs()
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, p=keep, shape=(inputs.shape[0], 1, 1))
    mask = jnp.broadcast_to(mask, inputs.shape)
    return jax.lax.select(mask, inputs / keep.astype(inputs.dtype), jnp.zeros_like(inputs))


class MLP(nnx.Module):
  """Linear(D, r·D) → exact (erf) GELU → Linear(r·D, D); no dropout."""

  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.fc1 = linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu_exact(self.fc1(x)))

  def mean_output(self, x: jax.Array) -> jax.Array:
    """`self(x).mean(axis=-2, keepdims=True)`: fc2 is affine, so it maps the mean of its
    inputs once instead of every token's."""
    return self.fc2(gelu_exact(self.fc1(x)).mean(axis=-2, keepdims=True))


def gelu_exact(x: jax.Array) -> jax.Array:
  """The exact GELU x·Φ(x) = ½·x·(1 + erf(x/√2)), PyTorch's `nn.GELU()` formula.

  `jax.nn.gelu(approximate=False)` writes Φ with erfc, which XLA:CPU expands
  into an exp plus a rational approximation with selects; erf is one cheaper
  polynomial (8192×420 float32, 2-core CPU: forward + backward 6.3 → 4.3 ms).
  The two agree to float32 round-off of x (|Δ| ≤ ~1e-7·|x|).

  Below float32 it is computed in float32 and rounded once, as LayerNorm is: rounding after
  each of its operations costs accuracy, and on the CPU, where XLA keeps every such
  rounding, time (docs/benchmarks.md, 2026-12-05e).

  On the CPU (backend.by_backend) reverse mode keeps only x and recomputes erf in the
  backward pass (`jax.checkpoint`), where XLA:CPU wrote erf out in a pass of its own and
  read it back twice: every preset's compiled step needs 10–21 % less memory, and on an AMD
  EPYC, where glibc's malloc is left as it is (host_memory), runs 1.02–1.06× faster
  (docs/benchmarks.md, 2026-12-05l). GPU and TPU compilers fuse either way.
  """
  return by_backend(_gelu_recomputed, _gelu, x)


def _gelu(x: jax.Array) -> jax.Array:
  x_wide = x.astype(wide(x.dtype))
  y = 0.5 * x_wide * (1.0 + jax.lax.erf(x_wide * np.asarray(1 / np.sqrt(2), x_wide.dtype)))
  return y.astype(x.dtype)


_gelu_recomputed = jax.checkpoint(_gelu)


def as_grid(grid, name: str = "grid") -> tuple[int, int]:
  """An int or (h, w) pair of positive integers as an (h, w) tuple; else a ValueError
  naming `name`."""
  pair = (grid, grid) if isinstance(grid, numbers.Integral) else grid
  try:
    h, w = pair
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an int or an (h, w) pair, got {grid!r}") from None
  if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (h, w)):
    raise ValueError(f"{name} must be whole numbers, got {grid!r}")
  if h < 1 or w < 1:
    raise ValueError(f"{name} must be positive, got {(h, w)}")
  return int(h), int(w)


@functools.cache
def toeplitz_index(h: int, w: int) -> np.ndarray:
  """The flat tap of a (2h−1, 2w−1) kernel that entry [(i,j),(p,q)] of its (N, N) block-
  Toeplitz matrix copies: (h−1+p−i)(2w−1) + (w−1+q−j), rows (i,j), columns (p,q)."""
  i, j = np.divmod(np.arange(h * w), w)
  di = (h - 1) + i[None, :] - i[:, None]  # rows: query (i,j); cols: key (p,q)
  dj = (w - 1) + j[None, :] - j[:, None]
  return (di * (2 * w - 1) + dj).astype(np.int32)


def toeplitz_gathered(taps: jax.Array, grid) -> jax.Array:
  """The (…, N, N) matrix M[(i,j),(p,q)] = taps[…, h−1+p−i, w−1+q−j] of (…, 2h−1, 2w−1)
  taps, as one gather (`toeplitz_index`); its gradient is a scatter-add."""
  h, w = as_grid(grid)
  return taps.reshape(*taps.shape[:-2], -1)[..., toeplitz_index(h, w)]


def toeplitz_tiled(taps: jax.Array, grid) -> jax.Array:
  """`toeplitz_gathered`'s matrix, bit for bit, by padding, tiling and slicing each axis of
  the taps (`_toeplitz_axis`): no gather, so its gradient is a sum over the tiles."""
  h, w = as_grid(grid)
  moved = jnp.moveaxis(taps, (-2, -1), (0, 1))  # (2h−1, 2w−1, …)
  blocks = _toeplitz_axis(_toeplitz_axis(moved, 1, w), 0, h)  # (h, h, w, w, …): i, p, j, q
  leading = tuple(range(4, blocks.ndim))
  matrix = jnp.transpose(blocks, (*leading, 0, 2, 1, 3))  # (…, i, j, p, q)
  return matrix.reshape(*taps.shape[:-2], h * w, h * w)


def _toeplitz_axis(taps: jax.Array, axis: int, n: int) -> jax.Array:
  """Axis `axis` of `taps`, of length 2n−1, as two axes (i, p) of length n:
  out[…, i, p, …] = taps[…, n−1+p−i, …]. The taps padded to length 2n and laid end to end n
  times, read in rows of 2n−1, shift by one more in each row (row i, place c: tap c−i), so
  places n−1 … 2n−2 of row i are row i of the Toeplitz matrix."""
  taps = jnp.moveaxis(taps, axis, 0)
  rest = taps.shape[1:]
  padded = jnp.pad(taps, [(0, 1)] + [(0, 0)] * len(rest))
  laid = jnp.broadcast_to(padded, (n, *padded.shape)).reshape(2 * n * n, *rest)
  rows = laid[: n * (2 * n - 1)].reshape(n, 2 * n - 1, *rest)
  return jnp.moveaxis(rows[:, n - 1 :], (0, 1), (axis, axis + 1))


def head_dim(dim: int, num_heads: int, owner: str) -> int:
  """D / H, or a ValueError naming `owner` when the heads do not divide the width."""
  if num_heads < 1 or dim % num_heads:
    raise ValueError(
      f"{owner} needs dim ({dim}) divisible by num_heads ({num_heads}); "
      "pick a head count that divides dim"
    )
  return dim // num_heads


def check_cost_sizes(num_tokens: int, dim: int, num_heads: int, owner: str) -> None:
  """The ValueError every mixer's `macs` raises for sizes no module could have."""
  if num_tokens < 1 or dim < 1 or num_heads < 1:
    raise ValueError(
      f"{owner}.macs needs positive sizes; got num_tokens={num_tokens}, "
      f"dim={dim}, num_heads={num_heads}"
    )


def check_tokens(x: jax.Array, dim: int, grid: tuple[int, int] | None, name: str) -> None:
  """Refuses tokens of another shape than (B, N, dim), N = h·w of `grid` where it has one:
  one line naming the shape expected and what to change."""
  count = "N" if grid is None else grid[0] * grid[1]
  expected = f"{name} expects tokens of shape (B, {count}, {dim})"
  if x.ndim != 3:
    raise ValueError(f"{expected}, got {x.shape}: give it (batch, tokens, channels).")
  if x.shape[-1] != dim:
    raise ValueError(
      f"{expected}, got {x.shape}: build the mixer with dim={x.shape[-1]} for these tokens."
    )
  if grid is not None and x.shape[1] != count:
    raise ValueError(
      f"{expected} for its {grid[0]}x{grid[1]} grid, got {x.shape}; build the mixer with "
      "the grid of the patch tokens (class token excluded)."
    )


def promote_param(value: jax.Array, x: jax.Array) -> jax.Array:
  """Casts a parameter to the activation dtype so bf16 activations stay bf16."""
  return jnp.asarray(value, dtype=x.dtype)
