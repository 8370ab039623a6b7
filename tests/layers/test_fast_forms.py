"""Faster forms of the same functions: exact GELU via erf, LKCA mixing as a batched matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from lkca_jax.layers import common, lkca


def test_gelu_exact_is_the_erf_gelu_to_float32_round_off():
  x64 = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).standard_normal(4096)])
  x = jnp.asarray(x64, jnp.float32)
  x64 = np.asarray(x, np.float64)  # compare on the float32 inputs themselves
  reference = 0.5 * x64 * (1 + scipy.special.erf(x64 / np.sqrt(2)))
  out = np.asarray(common.gelu_exact(x), np.float64)
  # Absolute error at the scale of x: erf's round-off near ±1 times |x|.
  assert np.max(np.abs(out - reference) / np.maximum(1, np.abs(x64))) < 2e-7
  np.testing.assert_allclose(
    out, np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6, rtol=1e-6
  )
  grad = np.asarray(jax.vmap(jax.grad(common.gelu_exact))(x), np.float64)
  reference_grad = 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2))) + x64 * np.exp(
    -(x64**2) / 2
  ) / np.sqrt(2 * np.pi)
  assert np.max(np.abs(grad - reference_grad)) < 1e-6


def test_gelu_exact_keeps_bfloat16():
  x = jnp.linspace(-4, 4, 64, dtype=jnp.bfloat16)
  out = common.gelu_exact(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(jax.nn.gelu(x.astype(jnp.float32), approximate=False)),
    atol=3e-2,
  )


@pytest.mark.parametrize("grid", [(8, 8), (3, 5)])
def test_layer_mixing_equals_the_plain_einsum_with_gradients(grid):
  rng = np.random.default_rng(1)
  n = grid[0] * grid[1]
  v = jnp.asarray(rng.standard_normal((4, n, 6)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((2 * grid[0] - 1, 2 * grid[1] - 1)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((4, n, 6)), jnp.float32)

  def einsum_form(v, kernel):
    return jnp.einsum("nm,bmd->bnd", lkca.attention_matrix(kernel, grid), v)

  def loss(mix):
    return lambda v, kernel: jnp.sum(mix(v, kernel) * r)

  fast = lambda v, kernel: lkca.mix_attention(v, kernel, grid, "layer")
  np.testing.assert_allclose(fast(v, kernel), einsum_form(v, kernel), rtol=1e-5, atol=1e-5)
  for got, want in zip(
    jax.grad(loss(fast), argnums=(0, 1))(v, kernel),
    jax.grad(loss(einsum_form), argnums=(0, 1))(v, kernel),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  bf16 = lkca.mix_attention(v.astype(jnp.bfloat16), kernel, grid, "layer")
  assert bf16.dtype == jnp.bfloat16 and bf16.shape == v.shape
