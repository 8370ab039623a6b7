"""Faster forms of the same functions: exact GELU via erf, LKCA mixing as a batched matmul,
the CPU Linear in bfloat16 (its float32 products, its reverse-only backward)."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from lkca_jax import backend
from lkca_jax.layers import common, lkca
from tests.helpers import U_BF16, assert_reordered


def gelu_in(form: str):
  """`common.gelu_exact` traced anew in `form` (the forms are read when tracing)."""

  def gelu(x):
    with backend.forms(form):
      return jax.jit(lambda x: common.gelu_exact(x))(x)

  return gelu


def normal_density(x64):
  return np.exp(-(x64**2) / 2) / np.sqrt(2 * np.pi)


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_gelu_exact_is_the_erf_gelu_to_float32_round_off(form):
  x64 = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).standard_normal(4096)])
  x = jnp.asarray(x64, jnp.float32)
  x64 = np.asarray(x, np.float64)  # compare on the float32 inputs themselves
  reference = 0.5 * x64 * (1 + scipy.special.erf(x64 / np.sqrt(2)))
  gelu = gelu_in(form)
  out = np.asarray(gelu(x), np.float64)
  # Absolute error at the scale of x: erf's round-off near ±1 times |x|.
  assert np.max(np.abs(out - reference) / np.maximum(1, np.abs(x64))) < 2e-7
  np.testing.assert_allclose(
    out, np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6, rtol=1e-6
  )
  grad = np.asarray(jax.vmap(jax.grad(gelu))(x), np.float64)
  reference_grad = 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2))) + x64 * normal_density(x64)
  assert np.max(np.abs(grad - reference_grad)) < 1e-6


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_gelu_exact_takes_forward_mode_and_second_derivatives(form):
  """jvp's tangent is Φ(x) + x·φ(x) times the input's; forward over reverse gives the
  second derivative (x·Φ(x))'' = φ(x)·(2 − x²), through the CPU form's recomputation too.
  Each is a handful of float32 operations, each off by at most 2⁻²⁴ relative, on values
  below 1.2 in magnitude (float32 erf is within a few such roundings): 1e-6 absolute bounds
  them."""
  x64 = np.linspace(-6, 6, 601)
  x = jnp.asarray(x64, jnp.float32)
  x64 = np.asarray(x, np.float64)
  tangent = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, x64.size), jnp.float32)
  gelu = gelu_in(form)
  _, out_tangent = jax.jvp(gelu, (x,), (tangent,))
  first = 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2))) + x64 * normal_density(x64)
  np.testing.assert_allclose(out_tangent, first * np.asarray(tangent, np.float64), atol=1e-6)
  second = jax.vmap(jax.grad(jax.grad(gelu)))(x)
  np.testing.assert_allclose(second, normal_density(x64) * (2 - x64**2), atol=1e-6)


def test_gelu_exact_keeps_only_its_input_for_reverse_mode_on_the_cpu():
  """The CPU form recomputes erf in the backward pass: what reverse mode keeps from the
  forward pass is x itself. The plain form keeps its intermediates (XLA fuses them on a
  GPU or TPU)."""
  x = jnp.asarray(np.linspace(-3, 3, 4 * 96).reshape(4, 96), jnp.float32)
  kept = {}
  for form in ("cpu", "plain"):
    with backend.forms(form):
      _, backward = jax.vjp(common.gelu_exact, x)
    kept[form] = [a for a in jax.tree.leaves(backward) if np.size(a) > 1]
  assert len(kept["cpu"]) == 1
  np.testing.assert_array_equal(kept["cpu"][0], x)
  assert sum(np.size(a) for a in kept["plain"]) > x.size


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


def exact_dense_gradients(x, kernel, cotangent):
  """d_x, d_kernel, d_bias of x·kernel + bias in float64, each rounded once to bfloat16."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  rows = np.asarray(cotangent, np.float64).reshape(-1, kernel.shape[1])
  exact = (
    (rows @ kernel.T).reshape(x.shape),
    x.reshape(-1, kernel.shape[0]).T @ rows,
    rows.sum(0),
  )
  return [np.asarray(e.astype(jnp.bfloat16), np.float64) for e in exact]


@pytest.mark.parametrize("shape", [(4, 16, 24), (64, 24), (2, 3, 5, 24), (1, 16, 24), (16, 1, 24)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_bfloat16_reverse_only_dense_has_the_exact_gradients(shape, use_bias):
  # Small integers: every product and sum is exact in float32, so each gradient is its exact
  # value rounded once to bfloat16, as the custom_jvp form's is too.
  x, kernel = integers(shape, 7), integers((24, 20), 8)
  bias = integers((20,), 9) if use_bias else None
  cotangent = integers((*shape[:-1], 20), 10, high=4)
  expected = exact_dense_gradients(x, kernel, cotangent)
  for dense in (common.dense_cpu_reverse, common.dense_cpu):
    rows = x.reshape(-1, 24) if dense is common.dense_cpu else x
    y, vjp = jax.vjp(functools.partial(dense, precision=None), rows, kernel, bias)
    assert y.dtype == jnp.bfloat16
    grads = jax.jit(vjp)(cotangent.reshape(y.shape))
    assert [g.dtype for g in grads[:2]] == [jnp.bfloat16] * 2
    got = [np.asarray(g, np.float64) for g in grads if g is not None]
    assert len(got) == 2 + use_bias
    for g, e in zip(got, expected[: len(got)], strict=True):
      np.testing.assert_array_equal(g.reshape(e.shape), e)


def test_bfloat16_reverse_only_dense_holds_under_vmap():
  """Many runs side by side vmap the step: run k's gradients are those of run k alone."""
  runs, shape = 3, (2, 16, 24)
  x, kernel = integers((runs, *shape), 11), integers((runs, 24, 20), 12)
  bias, cotangent = integers((runs, 20), 13), integers((runs, *shape[:-1], 20), 14, high=4)

  def gradients(x, kernel, bias, cotangent):
    return jax.vjp(common.dense_cpu_reverse, x, kernel, bias)[1](cotangent)

  stacked = jax.jit(jax.vmap(gradients))(x, kernel, bias, cotangent)
  for run in range(runs):
    expected = exact_dense_gradients(x[run], kernel[run], cotangent[run])
    for got, e in zip(stacked, expected, strict=True):
      np.testing.assert_array_equal(np.asarray(got[run], np.float64), e)


def test_bfloat16_reverse_only_dense_takes_the_bfloat16_cotangent_into_float32_products():
  # XLA:CPU runs a product of bfloat16 operands with a float32 result on AMX; JAX's transpose
  # of the custom_jvp form's tangent gives its backward products the cotangent widened to
  # float32, and XLA:CPU widens the other operand to match.
  x, kernel, bias = integers((8, 16, 24), 15), integers((24, 20), 16), integers((20,), 17)

  def loss(dense):
    return lambda x, k, b: jnp.sum(jnp.sin(dense(x, k, b).astype(jnp.float32)))

  def products(dense):
    lowered = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2))).lower(x, kernel, bias)
    return re.findall(r"dot_general .*?: \((.*?)\) -> (\S+)", lowered.as_text())

  bf16_into_f32 = lambda found: sum("xf32" not in a and b.endswith("xf32>") for a, b in found)
  assert bf16_into_f32(products(common.dense_cpu_reverse)) == 3
  rows = lambda x, k, b: common.dense_cpu(x.reshape(-1, 24), k, b)
  assert bf16_into_f32(products(rows)) == 1  # the forward product only


@pytest.mark.parametrize("reverse_only", [False, True])
def test_bfloat16_cpu_mixing_is_exact_and_sums_its_kernel_gradient_unrounded(reverse_only):
  # Small integers: each image's (N, N) product and their sum over the batch are exact in
  # float32, so the output, v's gradient (each rounded once) and the kernel gradient are
  # known exactly; a bfloat16 product per image would round before the sum. In a
  # reverse-only trace the form is `mix_layer_reverse`, with the same values.
  grid, batch, dim = 8, 128, 32
  v, cotangent = (
    integers((batch, grid * grid, dim), 7, 4),
    integers((batch, grid * grid, dim), 8, 4),
  )
  kernel = jnp.asarray(integers((2 * grid - 1, 2 * grid - 1), 9, 4), jnp.float32)
  mix = lambda v, k: lkca.mix_attention_cpu(v, k, grid, "layer")
  with backend.reverse_mode_only() if reverse_only else contextlib.nullcontext():
    out, pullback = jax.vjp(mix, v, kernel)
    value_and_pullback = lambda v, k: (lambda y, f: (y, f(cotangent)))(*jax.vjp(mix, v, k))
    lowered = jax.jit(value_and_pullback).lower(v, kernel).as_text()
  assert out.dtype == jnp.bfloat16
  matrix = np.asarray(lkca.attention_matrix(kernel, grid), np.float64)
  v64, cotangent64 = np.asarray(v, np.float64), np.asarray(cotangent, np.float64)
  rounded = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(np.asarray(out, np.float64), rounded(matrix @ v64))
  d_v, d_kernel = pullback(cotangent)
  np.testing.assert_array_equal(
    np.asarray(d_v, np.float64), rounded(np.einsum("nm,bnd->bmd", matrix, cotangent64))
  )
  d_matrix = np.einsum("bnd,bmd->nm", cotangent64, v64)
  # d_matrix is at most 2¹⁶ in magnitude, and a kernel tap sums at most 64 of them: exact
  _, matrix_pullback = jax.vjp(lambda k: lkca.attention_matrix(k, grid), kernel)
  (expected,) = matrix_pullback(jnp.asarray(d_matrix, jnp.float32))
  np.testing.assert_array_equal(np.asarray(d_kernel), np.asarray(expected))
  products = re.findall(r"dot_general .*?: \((.*?)\) -> (\S+)", lowered)
  bf16_into_f32 = [a for a, b in products if "xf32" not in a and b.endswith("xf32>")]
  assert len(bf16_into_f32) == (3 if reverse_only else 0), products
