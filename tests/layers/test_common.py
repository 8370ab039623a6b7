"""The LayerNorm arithmetic of layers/common.py: its hand-written gradient against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax.layers.common import layer_norm, normalize, row_sums


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
