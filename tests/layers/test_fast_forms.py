"""Faster forms of the same functions: exact GELU via erf, LKCA mixing as a batched matmul."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from lkca_jax.layers import common, lkca
from tests.helpers import U_BF16, assert_reordered


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


def test_gelu_exact_rounds_once_in_bfloat16():
  """Below float32 the GELU and its gradient are computed in float32 and rounded once:
  each value is within one bfloat16 rounding (2⁻⁸ relative) of the exact one, plus the
  float32 computation's own error (checked above: under 1e-6 at the scale of x and of the
  cotangent)."""
  x = jnp.asarray(np.linspace(-6, 6, 2001), jnp.bfloat16)
  cotangent = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, 2001), jnp.bfloat16)
  out, vjp = jax.vjp(common.gelu_exact, x)
  (grad,) = vjp(cotangent)
  assert out.dtype == grad.dtype == jnp.bfloat16
  x64, c64 = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
  reference = 0.5 * x64 * (1 + scipy.special.erf(x64 / np.sqrt(2)))
  reference_grad = c64 * (
    0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2)))
    + x64 * np.exp(-(x64**2) / 2) / np.sqrt(2 * np.pi)
  )
  float32_error = 1e-6 * np.maximum(1, np.abs(x64)) * np.maximum(1, c64)
  for got, want in ((out, reference), (grad, reference_grad)):
    error = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(error <= U_BF16 * np.abs(want) + float32_error), np.max(
      error / (np.abs(want) + float32_error)
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
  # An output sums n products; a kernel tap's gradient sums them over 4 images and 6 channels.
  assert_reordered(fast(v, kernel), einsum_form(v, kernel), n)
  for got, want in zip(
    jax.grad(loss(fast), argnums=(0, 1))(v, kernel),
    jax.grad(loss(einsum_form), argnums=(0, 1))(v, kernel),
    strict=True,
  ):
    assert_reordered(got, want, 4 * 6 * n)
  bf16 = lkca.mix_attention(v.astype(jnp.bfloat16), kernel, grid, "layer")
  assert bf16.dtype == jnp.bfloat16 and bf16.shape == v.shape


def integers(shape, seed, high=8):
  return jnp.asarray(np.random.default_rng(seed).integers(-high, high, shape), jnp.bfloat16)


def test_bfloat16_cpu_dense_takes_bfloat16_operands_into_one_float32_product():
  # Small integers: every product and partial sum is exact in float32, so the one rounding
  # to bfloat16 at the end is the only one, and the result is known exactly.
  x, kernel, bias = integers((64, 48), 0), integers((48, 40), 1), integers((40,), 2)
  exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  expected = (exact.astype(jnp.bfloat16) + np.asarray(bias)).astype(jnp.bfloat16)
  y = common.dense_cpu(x, kernel, bias)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(expected, np.float64))
  # The product itself multiplies the bfloat16 operands into float32, which XLA:CPU can run
  # on AMX; a bfloat16 result would make it widen both operands to a float32 product.
  lowered = jax.jit(common.dense_cpu).lower(x, kernel, bias).as_text()
  products = re.findall(r"dot_general .*?: \((.*?)\) -> (\S+)", lowered)
  assert products == [("tensor<64x48xbf16>, tensor<48x40xbf16>", "tensor<64x40xf32>")], products


def test_bfloat16_cpu_dense_sums_its_bias_gradient_over_rows_in_float32():
  # 4,096 rows: XLA:CPU would sum a bfloat16 column in a tree of strided windows, several
  # times slower than the float32 sum it hands to its reduction kernel.
  x, kernel, bias = integers((4096, 24), 3), integers((24, 16), 4), integers((16,), 5)
  cotangent = integers((4096, 16), 6, high=4)
  bias_gradient = jax.jit(
    lambda b: jax.vjp(lambda b: common.dense_cpu(x, kernel, b), b)[1](cotangent)[0]
  )
  exact = np.asarray(cotangent, np.float64).sum(0)  # integers below 2¹⁴: exact in float32
  np.testing.assert_array_equal(
    np.asarray(bias_gradient(bias), np.float64),
    np.asarray(exact.astype(jnp.bfloat16), np.float64),
  )
  assert "reduce-window" not in bias_gradient.lower(bias).compile().as_text()


def test_bfloat16_cpu_mixing_sums_its_kernel_gradient_over_unrounded_products():
  # Small integers: each image's (N, N) product and their sum over the batch are exact in
  # float32, so the kernel gradient is known exactly; a bfloat16 product per image would
  # round before the sum.
  grid, batch, dim = 8, 128, 32
  v, cotangent = (
    integers((batch, grid * grid, dim), 7, 4),
    integers((batch, grid * grid, dim), 8, 4),
  )
  kernel = jnp.asarray(integers((2 * grid - 1, 2 * grid - 1), 9, 4), jnp.float32)
  mix = lambda k: lkca.mix_attention_cpu(v, k, grid, "layer")
  out, pullback = jax.vjp(mix, kernel)
  assert out.dtype == jnp.bfloat16
  d_matrix = np.einsum(
    "bnd,bmd->nm", np.asarray(cotangent, np.float64), np.asarray(v, np.float64)
  )  # at most 2¹⁶ in magnitude, and the kernel taps sum at most 64 of them: exact in float32
  _, matrix_pullback = jax.vjp(lambda k: lkca.attention_matrix(k, grid), kernel)
  (expected,) = matrix_pullback(jnp.asarray(d_matrix, jnp.float32))
  np.testing.assert_array_equal(np.asarray(pullback(cotangent)[0]), np.asarray(expected))
