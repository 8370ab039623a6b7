"""MHSA, in both forms (lkca_jax/backend.py), against an independent float64 numpy
softmax(q kᵀ / sqrt(d)) v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import backend
from lkca_jax.layers import MHSA
from lkca_jax.layers.mhsa import attention_cpu
from lkca_jax.models import count_params
from tests.helpers import U_BF16, U, assert_reordered, product_fusions


def numpy_weights(x, w_qkv, num_heads, head_dim):
  """Reference in float64: the softmax weights (B, H, N, N) and v (B, H, N, d), qkv split as
  (3, heads, head_dim) like the PyTorch chunk + rearrange."""
  b, n, _ = x.shape
  inner = num_heads * head_dim
  qkv = x @ w_qkv  # (B, N, 3·H·d), no bias
  q, k, v = (
    qkv[..., s * inner : (s + 1) * inner].reshape(b, n, num_heads, head_dim).transpose(0, 2, 1, 3)
    for s in range(3)
  )  # (B, H, N, d)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  logits -= logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits)
  return weights / weights.sum(axis=-1, keepdims=True), v


def numpy_mhsa(x, w_qkv, w_out, b_out, num_heads, head_dim):
  weights, v = numpy_weights(x, w_qkv, num_heads, head_dim)
  b, n, _ = x.shape
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, num_heads * head_dim)
  return out @ w_out + b_out


@pytest.mark.parametrize("form", ["cpu", "plain"])
@pytest.mark.parametrize(
  "dim, num_heads, head_dim, tokens",
  [
    (24, 4, None, 65),  # 8×8 grid plus a class token
    (16, 2, 5, 1),  # head_dim decoupled from dim / heads; a single token
  ],
)
def test_matches_numpy_reference(dim, num_heads, head_dim, tokens, form):
  module = MHSA(dim, num_heads=num_heads, head_dim=head_dim, rngs=nnx.Rngs(0))
  d = head_dim or dim // num_heads
  rng = np.random.default_rng(0)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)  # init is zero
  x = rng.normal(size=(3, tokens, dim)).astype(np.float32)
  expected = numpy_mhsa(
    x.astype(np.float64),
    *(
      np.asarray(a[...], np.float64)
      for a in (module.qkv.kernel, module.out_proj.kernel, module.out_proj.bias)
    ),
    num_heads,
    d,
  )
  with backend.forms(form):
    out = np.asarray(module(jnp.asarray(x)))
  assert out.dtype == np.float32 and out.shape == (3, tokens, dim)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_attention_weights_are_the_softmax_the_layer_applies(form):
  module = MHSA(8, num_heads=2, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(3, 36, 8)).astype(np.float32)
  weights = module.attention_weights(jnp.asarray(x))
  assert weights.shape == (3, 2, 36, 36) and weights.dtype == jnp.float32
  expected, _ = numpy_weights(x.astype(np.float64), np.asarray(module.qkv.kernel[...]), 2, 4)
  assert_reordered(weights, expected, 8 + 4 + 36)  # qkv (8 terms), logits (4), softmax (36)
  # Applied to v and projected, the layer's output in either form.
  v = module.qkv(jnp.asarray(x)).reshape(3, 36, 3, 2, 4)[:, :, 2]
  out = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(3, 36, 8)
  with backend.forms(form):
    mixed = module(jnp.asarray(x))
  # The chain: qkv (8 terms), logits (4), softmax and weights·v (36 each), out_proj (8).
  assert_reordered(module.out_proj(out), mixed, 8 + 4 + 2 * 36 + 8)


def test_heads_that_do_not_divide_the_width_are_refused_unless_head_dim_is_given():
  with pytest.raises(ValueError, match=r"MHSA needs dim \(24\) divisible by num_heads \(5\)"):
    MHSA(24, num_heads=5, rngs=nnx.Rngs(0))
  assert MHSA(24, num_heads=5, head_dim=4, rngs=nnx.Rngs(0)).qkv.kernel.shape == (24, 60)


@pytest.mark.parametrize("form", ["cpu", "plain"])
@pytest.mark.parametrize("count", [1, 4])
def test_mix_first_is_the_first_tokens_rows_of_the_reference(count, form):
  """Queries of the first `count` tokens against every token's keys and values: the float64
  reference's first rows, with head_dim decoupled from dim / heads."""
  module = MHSA(16, num_heads=2, head_dim=5, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(4)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x = rng.normal(size=(3, 9, 16)).astype(np.float32)
  weights = (module.qkv.kernel, module.out_proj.kernel, module.out_proj.bias)
  args = (np.asarray(a[...], np.float64) for a in weights)
  expected = numpy_mhsa(x.astype(np.float64), *args, 2, 5)[:, :count]
  with backend.forms(form):
    out = np.asarray(module.mix_first(jnp.asarray(x), count))
  assert out.dtype == np.float32 and out.shape == (3, count, 16)
  # Each float32 sum along the chain (the qkv product over D = 16, the keys N = 9, the output
  # product over H·d = 10) is within L·u of the same sum of absolute values; an error e in a
  # logit moves the weights by up to 2·e relatively. Twice that, for two summation orders.
  w_qkv, w_out, b_out = (np.abs(np.asarray(a[...], np.float64)) for a in weights)
  q = (np.abs(x[:, :count]) @ w_qkv)[..., :10]
  k, v = np.split((np.abs(x) @ w_qkv)[..., 10:], 2, axis=-1)
  logits = np.einsum("bnd,bmd->bnm", q, k).max(-1, keepdims=True) / np.sqrt(5)  # every head's
  # The weights sum to 1, so the weighted values are at most the largest value.
  scale = v.max(axis=1, keepdims=True) @ w_out * (1 + 2 * logits) + b_out
  bound = 2 * (16 + 9 + 10) * U * scale
  assert (np.abs(out - expected) <= bound).all(), np.abs(out - expected).max()


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_a_qkv_bias_is_added_to_queries_keys_and_values_in_both_paths(form):
  """qkv_bias=True (timm's, DeiT's): the module is the float64 reference with x·W_qkv + b,
  and mix_first its first rows, within the float32 bound of the bias-free test above."""
  module = MHSA(16, num_heads=2, qkv_bias=True, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(5)
  bias = rng.normal(size=48).astype(np.float32)
  module.qkv.bias[...] = jnp.asarray(bias)
  x = rng.normal(size=(2, 7, 16)).astype(np.float32)
  w_qkv, w_out, b_out = (
    np.asarray(a[...], np.float64)
    for a in (module.qkv.kernel, module.out_proj.kernel, module.out_proj.bias)
  )
  # x·W + b as x' · W' with a column of ones: the bias-free reference computes it.
  ones = np.ones((2, 7, 1))
  x_ones = np.concatenate([x.astype(np.float64), ones], axis=-1)
  w_ones = np.concatenate([w_qkv, bias[None].astype(np.float64)], axis=0)
  expected = numpy_mhsa(x_ones, w_ones, w_out, b_out, 2, 8)
  with backend.forms(form):
    out = np.asarray(module(jnp.asarray(x)))
    first = np.asarray(module.mix_first(jnp.asarray(x), 2))
  # The bound of the test above, with the bias as a 17th term of the qkv sums.
  qkv = np.abs(x_ones) @ np.abs(w_ones)
  q, k, v = np.split(qkv, 3, axis=-1)
  logits = np.einsum("bnd,bmd->bnm", q, k).max(-1, keepdims=True) / np.sqrt(8)
  bound = (
    2
    * (17 + 7 + 16)
    * U
    * (v.max(axis=1, keepdims=True) @ np.abs(w_out) * (1 + 2 * logits) + np.abs(b_out))
  )
  assert (np.abs(out - expected) <= bound).all(), np.abs(out - expected).max()
  assert (np.abs(first - expected[:, :2]) <= bound[:, :2]).all()
  assert np.abs(out - np.asarray(MHSA(16, num_heads=2, rngs=nnx.Rngs(3))(x))).max() > 1e-2


def test_structure_and_parameter_count():
  module = MHSA(192, num_heads=12, rngs=nnx.Rngs(0))
  assert module.head_dim == 16
  assert module.qkv.kernel[...].shape == (192, 576) and module.qkv.bias is None
  assert module.out_proj.kernel[...].shape == (192, 192)
  assert not np.asarray(module.out_proj.bias[...]).any()
  # The worked example of `docs/method.md` ("Presets"): qkv 110,592 + out 37,056.
  assert count_params(module) == 110_592 + 37_056


def test_attention_is_permutation_equivariant():
  """No position information inside MHSA: permuting tokens permutes the output."""
  module = MHSA(16, num_heads=4, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 16)), jnp.float32)
  perm = np.random.default_rng(2).permutation(9)
  # Permuting reorders the sums over tokens: qkv (16), logits (4), softmax and weights·v
  # (9 each), the output projection (16).
  assert_reordered(module(x[:, perm]), np.asarray(module(x))[:, perm], 16 + 4 + 2 * 9 + 16)


def test_bfloat16_module_returns_bfloat16_close_to_float32():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 10, 32)), jnp.float32)
  out32 = MHSA(32, num_heads=4, rngs=nnx.Rngs(0))(x)
  out16 = MHSA(32, num_heads=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  out16, out32 = np.asarray(out16, np.float32), np.asarray(out32)
  err = np.abs(out16 - out32).max() / np.abs(out32).max()
  assert err < 2e-2  # a few bf16 roundings (8-bit mantissa); measured 0.4%


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_form_fuses_every_product_with_a_row_sum_on_the_cpu(dtype):
  """The CPU form's speed rests on XLA:CPU fusing each batched product of the attention
  core, forward and backward, with a reduction over rows (YNNPACK then runs it on every
  thread; alone it runs on one). Below float32 the core runs in float32, so the same
  holds there. A jaxlib that fuses otherwise fails here, by name."""
  qkv = jnp.zeros((32, 65, 3 * 8 * 17), dtype)  # vit_1m's layer at batch 32
  cotangent = jnp.zeros((32, 65, 8 * 17), dtype)
  loss = lambda x, c: jnp.sum((attention_cpu(x, 8, 17**-0.5) * c).astype(jnp.float32))
  fusions = product_fusions(jax.value_and_grad(loss), qkv, cotangent)
  # Two products forward (q·kᵀ, W·v), four backward (dq, dk, dv, dO·vᵀ).
  assert len(fusions) == 6 and "unfused" not in fusions, sorted(fusions)
  assert all("reduce" in ops for ops in fusions.values()), fusions


def test_cpu_form_assembles_the_qkv_gradient_as_a_concatenation():
  """Reverse mode puts the gradients of q, k and v together into qkv's layout by
  concatenating them. Taken apart by indexing, each part was padded to full size and the
  three added: more memory traffic in every MHSA layer's backward."""
  qkv = jnp.zeros((32, 65, 3 * 8 * 17), jnp.float32)
  cotangent = jnp.zeros((32, 65, 8 * 17), jnp.float32)
  loss = lambda x, c: jnp.sum(attention_cpu(x, 8, 17**-0.5) * c)
  text = jax.jit(jax.grad(loss)).lower(qkv, cotangent).as_text()
  assert "stablehlo.pad" not in text and "stablehlo.concatenate" in text


def test_cpu_form_rounds_once_in_bfloat16():
  """In bfloat16 the CPU form's output and its gradient are the float32 computation on the
  same values, rounded once: within 2⁻⁸ (one bfloat16 rounding) of it, plus 2⁻¹⁶ of the
  largest entry for the float32 round-off of both (sums of under 256 terms)."""
  rng = np.random.default_rng(4)
  qkv = jnp.asarray(rng.standard_normal((4, 65, 3 * 8 * 17)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal((4, 65, 8 * 17)), jnp.bfloat16)
  core = lambda x: attention_cpu(x, 8, 17**-0.5)
  out16, vjp16 = jax.vjp(core, qkv)
  out32, vjp32 = jax.vjp(core, qkv.astype(jnp.float32))
  (grad16,), (grad32,) = vjp16(cotangent), vjp32(cotangent.astype(jnp.float32))
  assert out16.dtype == grad16.dtype == jnp.bfloat16
  for got, want in ((out16, out32), (grad16, grad32)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = U_BF16 * np.abs(want) + 2.0**-16 * np.abs(want).max()
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
