"""Linear and LayerNorm of layers/common.py: nnx's parameters, dtypes and known gradients.

Both forms of each agree to round-off under every transform: tests/layers/test_backend.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax.layers.common import layer_norm, linear, normalize_cpu, row_sums
from tests.helpers import assert_reordered


def test_row_sums_sums_each_array_over_the_last_axis():
  a = jnp.arange(12.0).reshape(3, 4)
  total, squares = row_sums(a, a * a)
  np.testing.assert_array_equal(np.asarray(total), [6.0, 22.0, 38.0])
  np.testing.assert_array_equal(np.asarray(squares), [14.0, 126.0, 366.0])


def test_cpu_layer_norm_gradient_takes_its_row_terms_as_products_with_scale():
  """Reverse mode computes the cotangent's two row terms, Σ_d scale·ct and
  Σ_d scale·normed·ct, as matrix-vector products with scale. As row sums over a product
  with scale they went to XLA:CPU's library kernel, which first writes scale and inv_std
  out at the full (rows, D) size. The one full-width reduction left is the forward
  statistics' single pass."""
  x, cotangent = jnp.zeros((4, 65, 192)), jnp.zeros((4, 65, 192))
  scale, bias = jnp.ones(192), jnp.zeros(192)
  loss = lambda x, c: jnp.sum(normalize_cpu(x, scale, bias, 1e-5) * c)
  lines = jax.jit(jax.grad(loss)).lower(x, cotangent).as_text().splitlines()
  full_width_sums = [line for line in lines if "stablehlo.reduce(" in line and "4x65x192" in line]
  products = [line for line in lines if "stablehlo.dot_general" in line]
  assert (
    len(full_width_sums) == 1 and "-> (tensor<4x65xf32>, tensor<4x65xf32>)" in full_width_sums[0]
  )
  assert len(products) == 2 and all("tensor<1x192xf32>" in line for line in products)


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
  # Sums of 12 terms (the product), 20 (the input gradient), 15 rows (the parameters').
  assert_reordered(ours(x), theirs(x), 12 + 1)
  assert_reordered(ours_dx, theirs_dx, 12 + 20)
  for name in ("kernel", "bias"):
    assert_reordered(ours_grads[name][...], theirs_grads[name][...], 12 + 15)


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
