"""lkca_jax/backend.py: one model, the CPU forms lowered for the CPU and the plain ones elsewhere;
both forms equal, under every transform.

Tolerances are float32 round-off bounds: two orders of summing n products differ by at
most about 2·n·u of the summed magnitudes (u = 2⁻²⁴), taken here against the largest
magnitude of the result (`assert_round_off`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import backend
from lkca_jax.layers import LKCA, MHSA, layer_norm, linear
from lkca_jax.layers.common import dense, dense_cpu, normalize, normalize_cpu
from lkca_jax.layers.mhsa import attention_cpu, attention_plain

U = 2.0**-24  # float32 unit round-off


def assert_round_off(got, expected, terms: int):
  """|got − expected| ≤ 4·terms·u·max|expected|: both sides' bounds of 2·terms·u added."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape
  bound = 4 * terms * U * max(float(np.abs(expected).max()), 1e-30)
  assert float(np.abs(got - expected).max()) <= bound, (np.abs(got - expected).max(), bound)


def normal(shape, seed, offset=0.0):
  return jnp.asarray(offset + np.random.default_rng(seed).normal(size=shape), jnp.float32)


def check_forms_agree(cpu_fn, plain_fn, args, terms):
  """Value, reverse-mode and forward-mode derivatives of the two forms agree to round-off,
  and each form's jvp is the adjoint of its vjp: <J·t, c> = <t, Jᵀ·c>."""
  tangents = tuple(normal(a.shape, 10 + i) for i, a in enumerate(args))
  out = plain_fn(*args)
  cotangent = normal(out.shape, 99)
  results = []
  for fn in (cpu_fn, plain_fn):
    value, vjp = jax.vjp(fn, *args)
    _, jvp = jax.jvp(fn, args, tangents)
    grads = vjp(cotangent)
    forward = float(jnp.vdot(jvp, cotangent))
    pairs = list(zip(tangents, grads, strict=True))
    backward = sum(float(jnp.vdot(t, g)) for t, g in pairs)
    scale = sum(float(jnp.vdot(jnp.abs(t), jnp.abs(g))) for t, g in pairs)
    # Each side: the function's round-off (terms) plus its own inner product's (size).
    sums = terms + max(a.size for a in (*args, out))
    assert abs(forward - backward) <= 4 * sums * U * (scale + abs(forward)), (forward, backward)
    results.append((value, jvp, *grads))
  for got, expected in zip(*results, strict=True):
    assert_round_off(got, expected, terms)


@pytest.mark.parametrize("rows, fan_in, fan_out", [(40, 6, 18), (33, 12, 5), (1, 4, 4)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_forms_agree(rows, fan_in, fan_out, use_bias):
  x, kernel, bias = normal((rows, fan_in), 1), normal((fan_in, fan_out), 2), normal((fan_out,), 3)
  if use_bias:
    check_forms_agree(
      lambda x, k, b: dense_cpu(x, k, b), lambda x, k, b: dense(x, k, b), (x, kernel, bias), rows
    )
  else:
    check_forms_agree(
      lambda x, k: dense_cpu(x, k, None), lambda x, k: dense(x, k, None), (x, kernel), rows
    )


@pytest.mark.parametrize(
  "shape, offset", [((4, 9, 24), 0.0), ((2, 65, 192), 0.0), ((6, 40), 300.0)]
)
def test_normalize_forms_agree_and_are_exact_far_from_zero(shape, offset):
  x, scale, bias = normal(shape, 1, offset), normal(shape[-1:], 2), normal(shape[-1:], 3)
  cpu = lambda *a: normalize_cpu(*a, 1e-5)
  plain = lambda *a: normalize(*a, 1e-5)
  # Rows of `terms` values; the statistics of rows around 300 with unit spread lose
  # nothing: both are checked against float64 below, not only against each other.
  check_forms_agree(cpu, plain, (x, scale, bias), terms=4 * shape[-1])
  x64 = np.asarray(x, np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
  expected = expected * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
  for form in (cpu, plain):
    assert_round_off(form(x, scale, bias), expected, terms=4 * shape[-1])


# (batch, tokens, heads, head dim): odd sizes, vit's layer (65 tokens, 12 heads of 16),
# vit_1m's head dim 17 (a scale that is no power of two), a single token.
@pytest.mark.parametrize("b, n, h, d", [(3, 7, 2, 5), (2, 65, 12, 16), (2, 9, 8, 17), (4, 1, 1, 3)])
def test_attention_forms_agree(b, n, h, d):
  qkv = 2 * normal((b, n, 3 * h * d), n)
  check_forms_agree(
    lambda x: attention_cpu(x, h, d**-0.5),
    lambda x: attention_plain(x, h, d**-0.5),
    (qkv,),
    terms=4 * (n + d),  # products over d, softmax sums over n, products over n
  )


def lowered_text(fn, *args, platforms=None) -> str:
  """The module `fn` lowers to, traced afresh (the forms are read when tracing)."""
  fresh = jax.jit(lambda *a: fn(*a))
  if platforms is None:
    return fresh.lower(*args).as_text(debug_info=True)
  return jax.export.export(fresh, platforms=platforms)(*args).mlir_module()


@pytest.mark.parametrize(
  "make",
  [
    lambda: linear(8, 12, rngs=nnx.Rngs(0)),
    lambda: layer_norm(8, rngs=nnx.Rngs(0)),
    lambda: MHSA(8, num_heads=2, rngs=nnx.Rngs(0)),
  ],
  ids=["Linear", "LayerNorm", "MHSA"],
)
def test_each_platform_lowers_only_its_own_form(make):
  module = make()
  x = normal((2, 5, 8), 0)
  loss = lambda x: jnp.sum(jnp.sin(module(x)))
  grad = jax.grad(loss)
  assert backend.CPU_SCOPE in lowered_text(grad, x)  # this CPU
  for platform in ("cuda", "tpu"):
    text = lowered_text(grad, x, platforms=[platform])
    assert backend.CPU_SCOPE not in text and "optimization_barrier" not in text
  with backend.forms("plain"):
    assert backend.CPU_SCOPE not in lowered_text(grad, x)
  with backend.forms("cpu"):
    assert backend.CPU_SCOPE in lowered_text(grad, x, platforms=["cuda"])


def test_reverse_mode_only_leaves_float32_programs_as_they_are():
  """Only products below float32 take a hand-written backward pass in a reverse-only trace;
  the mark holds inside its `with` block only."""
  layer = linear(8, 12, rngs=nnx.Rngs(0))
  x = normal((2, 5, 8), 0)
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(layer(x))))
  module = lambda: jax.jit(lambda x: grad(x)).lower(x).as_text()  # traced afresh; no locations
  outside = module()
  with backend.reverse_mode_only():
    assert backend.in_reverse_mode_only()
    assert module() == outside
  assert not backend.in_reverse_mode_only()


def test_reverse_mode_only_is_for_reverse_mode_in_bfloat16_and_jvp_works_outside_it():
  """Below float32 the mark gives the CPU Linear a `custom_vjp`: reverse mode gives the same
  gradient (exact here: small integers), forward mode refuses it, and works again after."""
  layer = linear(8, 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).integers(-4, 4, (2, 5, 8)), jnp.bfloat16)
  layer.kernel[...] = jnp.asarray(np.random.default_rng(1).integers(-4, 4, (8, 12)), jnp.float32)
  loss = lambda x: jnp.sum(layer(x).astype(jnp.float32) ** 2)
  outside = jax.grad(loss)(x)
  with backend.reverse_mode_only():
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x)), np.asarray(outside))
    with pytest.raises(TypeError, match="custom_vjp"):
      jax.jvp(layer, (x,), (x,))
  assert jax.jvp(layer, (x,), (x,))[1].dtype == jnp.bfloat16


def test_reverse_mode_only_changes_no_plain_form():
  """GPU and TPU run the plain forms: under the mark they keep forward mode, in bfloat16,
  for the Linear, LKCA's mixing and MHSA alike."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 8)), jnp.bfloat16)
  modules = [
    linear(8, 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    LKCA(
      8, grid=(4, 4), view="attention", kernel_init="gaussian", dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    ),
    MHSA(8, num_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
  ]
  for module in modules:
    with backend.forms("plain"):
      expected = jax.jvp(module, (x,), (x,))
      with backend.reverse_mode_only():
        marked = jax.jvp(module, (x,), (x,))
    for got, want in zip(marked, expected, strict=True):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with backend.reverse_mode_only(), backend.forms("cpu"), pytest.raises(TypeError):
      jax.jvp(module, (x,), (x,))


def test_unknown_forms_are_refused():
  with pytest.raises(ValueError, match="forms must be one of"):
    with backend.forms("gpu"):
      pass


def test_forms_hold_under_vmap():
  """Many runs side by side vmap the step: slice k of the CPU attention's gradient is run k's
  (the plain forms are JAX's own functions)."""
  qkv = normal((3, 2, 9, 3 * 2 * 4), 4)
  loss = lambda x: jnp.sum(attention_cpu(x, 2, 0.5) ** 2)
  stacked = jax.vmap(jax.grad(loss))(qkv)
  for run in range(3):
    assert_round_off(stacked[run], jax.grad(loss)(qkv[run]), terms=4 * 13)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_bfloat16_gradients_keep_their_dtypes(form):
  layer = linear(16, 24, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  norm = layer_norm(24, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  attn = MHSA(24, num_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = normal((2, 7, 16), 3).astype(jnp.bfloat16)

  def loss(layers, x):
    layer, norm, attn = layers
    return jnp.sum(attn(norm(layer(x))).astype(jnp.float32) ** 2)

  with backend.forms(form):
    grads, d_x = nnx.grad(loss, argnums=(0, 1))((layer, norm, attn), x)
    _, jvp = jax.jvp(lambda x: attn(norm(layer(x))), (x,), (jnp.ones_like(x),))
  assert d_x.dtype == jnp.bfloat16 and jvp.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
