"""Linear and LayerNorm of layers/common.py: their hand-written gradients against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax.layers.common import dense, layer_norm, linear, normalize, row_sums


def plain_layer_norm(x, scale, bias, epsilon=1e-5):
  """Two-pass LayerNorm written with jnp, differentiated by JAX itself."""
  centered = x - x.mean(-1, keepdims=True)
  variance = (centered * centered).mean(-1, keepdims=True)
  return centered * jax.lax.rsqrt(variance + epsilon) * scale + bias


def random_inputs(shape, seed, offset=0.0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(offset + rng.normal(size=shape), jnp.float32)
  scale = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x, scale, bias, cotangent


@pytest.mark.parametrize("shape", [(4, 9, 24), (2, 65, 192), (3, 1)])
def test_normalize_value_and_gradient_are_autodiffs(shape):
  x, scale, bias, cotangent = random_inputs(shape, seed=shape[-1])
  out, vjp = jax.vjp(lambda *a: normalize(*a, 1e-5), x, scale, bias)
  expected_out, expected_vjp = jax.vjp(plain_layer_norm, x, scale, bias)
  # float32 round-off: the one-pass variance of a row shifted by its first value is off by
  # about eps · (1 + (first − mean)² / var), a few 1e-7 of the value, as the two-pass one is.
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(expected_out), atol=1e-5 * float(np.abs(expected_out).max())
  )
  for got, expected in zip(vjp(cotangent), expected_vjp(cotangent), strict=True):
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(expected), atol=1e-5 * float(np.abs(expected).max())
    )


def test_normalize_gradient_far_from_zero_matches_float64():
  """Rows around 300 with unit spread: the shifted statistics lose nothing there."""
  x, scale, bias, cotangent = random_inputs((6, 40), seed=1, offset=300.0)
  _, vjp = jax.vjp(lambda *a: normalize(*a, 1e-5), x, scale, bias)
  d_x = np.asarray(vjp(cotangent)[0], np.float64)
  x64, g64, c64 = (np.asarray(a, np.float64) for a in (x, scale, cotangent))
  centered = x64 - x64.mean(-1, keepdims=True)
  inv_std = 1 / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5)
  normed, d_normed = centered * inv_std, c64 * g64
  expected = inv_std * (
    d_normed
    - d_normed.mean(-1, keepdims=True)
    - normed * (d_normed * normed).mean(-1, keepdims=True)
  )
  np.testing.assert_allclose(d_x, expected, atol=1e-4 * np.abs(expected).max())


def test_row_sums_sums_each_array_over_the_last_axis():
  a = jnp.arange(12.0).reshape(3, 4)
  total, squares = row_sums(a, a * a)
  np.testing.assert_array_equal(np.asarray(total), [6.0, 22.0, 38.0])
  np.testing.assert_array_equal(np.asarray(squares), [14.0, 126.0, 366.0])


def test_normalize_gradient_under_vmap_is_each_slices():
  x, scale, bias, _ = random_inputs((3, 5, 16), seed=2)
  loss = lambda x, s, b: jnp.sum(normalize(x, s, b, 1e-5) ** 3)
  stacked = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(
    x, jnp.stack([scale] * 3), jnp.stack([bias] * 3)
  )
  for run in range(3):
    alone = jax.grad(loss, argnums=(0, 1, 2))(x[run], scale, bias)
    for got, expected in zip(stacked, alone, strict=True):
      np.testing.assert_allclose(np.asarray(got[run]), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_bfloat16_layer_norm_gradients_keep_their_dtypes():
  norm = layer_norm(32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 32)), jnp.bfloat16)

  def loss(norm, x):
    return jnp.sum(norm(x).astype(jnp.float32) ** 2)

  grads, d_x = nnx.grad(loss, argnums=(0, 1))(norm, x)
  assert d_x.dtype == jnp.bfloat16
  assert grads["scale"][...].dtype == jnp.float32 and grads["bias"][...].dtype == jnp.float32
  # With scale 1 and bias 0, d/d scale_j of Σ y² is 2 Σ_rows normed_j²; each of the 14 rows
  # has Σ_j normed_j² = 32 (unit variance), so these 32 gradients average 2 · 14.
  np.testing.assert_allclose(float(np.mean(grads["scale"][...])), 2 * 14, rtol=3e-2)


# (rows, in, out): wider out than in (qkv, fc1), narrower (fc2), a single row.
@pytest.mark.parametrize("rows, fan_in, fan_out", [(40, 6, 18), (33, 12, 5), (1, 4, 4)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_value_and_gradient_are_autodiffs(rows, fan_in, fan_out, use_bias):
  rng = np.random.default_rng(rows + fan_in)
  x, kernel, bias, cotangent = (
    jnp.asarray(rng.normal(size=shape), jnp.float32)
    for shape in ((rows, fan_in), (fan_in, fan_out), (fan_out,), (rows, fan_out))
  )
  bias = bias if use_bias else None
  plain = lambda x, kernel, bias: x @ kernel + (0.0 if bias is None else bias)
  out, vjp = jax.vjp(dense, x, kernel, bias)
  expected_out, expected_vjp = jax.vjp(plain, x, kernel, bias)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), rtol=1e-6, atol=1e-5)
  got, expected = vjp(cotangent), expected_vjp(cotangent)
  assert (got[2] is None) == (not use_bias)
  for g, e in zip(got, expected, strict=True):
    if e is not None:
      assert g.shape == e.shape
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_linear_is_nnx_linear_with_the_same_parameters():
  """Same parameter names, shapes and init as `nnx.Linear`; the same output and gradients
  on (B, N, D) tokens."""
  ours = linear(12, 20, rngs=nnx.Rngs(0))
  theirs = nnx.Linear(12, 20, rngs=nnx.Rngs(0))
  theirs.kernel[...] = ours.kernel[...]
  theirs.bias[...] = jnp.arange(20.0) / 7  # a bias that is not zero, so its gradient shows
  ours.bias[...] = theirs.bias[...]
  ours_state, theirs_state = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
  assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 12)), jnp.float32)
  loss = lambda model, x: jnp.sum(jnp.sin(model(x)))
  (ours_grads, ours_dx), (theirs_grads, theirs_dx) = (
    nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, theirs)
  )
  np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_dx), np.asarray(theirs_dx), rtol=1e-5, atol=1e-6)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
      np.asarray(ours_grads[name][...]), np.asarray(theirs_grads[name][...]), rtol=1e-5, atol=1e-5
    )


def test_dense_gradient_under_vmap_is_each_slices():
  rng = np.random.default_rng(7)
  x, kernel, bias = (
    jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((3, 8, 5), (3, 5, 9), (3, 9))
  )
  loss = lambda x, kernel, bias: jnp.sum(dense(x, kernel, bias) ** 2)
  stacked = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)
  for run in range(3):
    alone = jax.grad(loss, argnums=(0, 1, 2))(x[run], kernel[run], bias[run])
    for got, expected in zip(stacked, alone, strict=True):
      np.testing.assert_allclose(np.asarray(got[run]), np.asarray(expected), rtol=1e-6, atol=1e-5)


def test_bfloat16_linear_gradients_keep_their_dtypes():
  layer = linear(16, 24, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 16)), jnp.bfloat16)
  loss = lambda layer, x: jnp.sum(layer(x).astype(jnp.float32))
  grads, d_x = nnx.grad(loss, argnums=(0, 1))(layer, x)
  assert layer(x).dtype == jnp.bfloat16 and d_x.dtype == jnp.bfloat16
  assert grads["kernel"][...].dtype == jnp.float32 and grads["bias"][...].dtype == jnp.float32
  # d/d kernel of Σ (x·W + b) is each input's column sum over the 14 rows; d/d bias is 14.
  column_sums = np.asarray(x, np.float32).reshape(14, 16).sum(0)
  d_kernel = np.asarray(grads["kernel"][...])
  np.testing.assert_allclose(d_kernel[:, 0], column_sums, rtol=2e-2, atol=5e-2)
  np.testing.assert_array_equal(np.asarray(grads["bias"][...]), np.full(24, 14.0))
