"""ACmix: parameter count, the conv branch at init and with its fc bias, a float64 reference of
the whole mixer written after the authors' torch code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import backend
from lkca_jax.layers import ACmix
from lkca_jax.layers.acmix import grouped_conv3x3
from lkca_jax.models import count_params
from tests.helpers import U, assert_reordered

BATCH = 2


def max_rel_err(actual, expected) -> float:
  """max |a − e| / max |e|: relative to the scale of the whole tensor."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def acmix_params(dim, grid, heads) -> int:
  """Closed form from `docs/method.md` ("Peer mixers"), term by term."""
  h, w = grid
  qkv = 3 * dim * dim + 3 * dim  # Linear(D, 3D) with bias
  relative_bias = (2 * h - 1) * (2 * w - 1) * heads  # one table column per head
  out_proj = dim * dim + dim  # Linear(D, D) with bias, attention branch only
  fc = 3 * heads * 9 + 9  # 3H → 9 with bias (a 1×1 nn.Conv2d), shared over the d indices
  conv = dim * 9 * 3 * 3  # D outputs, 9 inputs per group, 3×3 taps, no bias
  rates = 2
  return qkv + relative_bias + out_proj + fc + conv + rates


@pytest.mark.parametrize("dim, grid, heads", [(12, (3, 5), 3), (112, (8, 8), 8), (176, (8, 8), 8)])
def test_parameter_count_formula(dim, grid, heads):
  module = nnx.eval_shape(lambda: ACmix(dim, grid, num_heads=heads, rngs=nnx.Rngs(0)))
  assert count_params(module) == acmix_params(dim, grid, heads)
  # The same in the compact form quoted in the module docstring.
  h, w = grid
  assert acmix_params(dim, grid, heads) == (
    4 * dim**2 + 85 * dim + ((2 * h - 1) * (2 * w - 1) + 27) * heads + 11
  )


def test_initial_values():
  module = ACmix(16, (4, 6), num_heads=4, rngs=nnx.Rngs(0))
  assert float(module.attention_rate[...]) == 0.5 and float(module.conv_rate[...]) == 0.5
  assert module.qkv.bias is not None and module.fc.bias is not None
  # The fc bias starts as PyTorch's Conv2d default, U(±1/√fan_in) with fan_in = 3H = 12: inside
  # the range, not zero (the Linear rule), and not a constant.
  fc_bias = np.asarray(module.fc.bias[...])
  assert fc_bias.shape == (9,) and np.abs(fc_bias).max() <= 12**-0.5
  assert fc_bias.std() > 0.05 * 12**-0.5
  kernel = np.asarray(module.conv_kernel[...])
  assert kernel.shape == (3, 3, 9, 16)  # HWIO: taps, 9 inputs per group, D outputs
  for i in range(9):
    expected = np.zeros((3, 3))
    expected[i // 3, i % 3] = 1.0
    for o in range(16):
      np.testing.assert_array_equal(kernel[:, :, i, o], expected)
  table = np.asarray(module.relative_bias[...])
  assert table.shape == (7 * 11, 4)
  # Truncated normal, std 0.02 before truncation at 2σ.
  assert np.abs(table).max() <= 0.04 and 0.01 < table.std() < 0.025


def test_fc_weight_starts_as_pytorch_conv2d_default():
  """U(±1/√(3H)), std 1/√(3·3H); not the recipe's xavier normal (std √(2/(3H + 9)), 2.4× more
  at H = 64, and unbounded). 3H·9 = 1,728 samples: the sample std of a uniform spreads by
  √((9/5 − 1)/n)/2 ≈ 1.1% (its kurtosis is 9/5); allowed 5 of those."""
  heads = 64
  kernel = np.asarray(ACmix(heads, (2, 2), num_heads=heads, rngs=nnx.Rngs(0)).fc.kernel[...])
  n, bound = kernel.size, (3 * heads) ** -0.5
  assert kernel.shape == (3 * heads, 9) and np.abs(kernel).max() <= bound
  assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 5 * np.sqrt(0.8 / n) / 2


def conv_of_qkv_maps(qkv, fc, fc_bias, grid, heads):
  """float64 3×3 cross-correlation (zero padding 1) of the 3H head maps,
  kernel[a, b, j] = fc[j, 3a + b], plus fc_bias[3a + b] wherever tap (a, b) lands inside the grid
  (the bias is added to the 9 maps before the conv's zero padding).

  qkv: (B, N, 3D) with channel s·D + head·d + c; returns (B, N, D) with
  channel c·H + o, the same value for every o (one-hot kernel at init).
  """
  h, w = grid
  b, n, dim3 = qkv.shape
  d = dim3 // 3 // heads
  maps = qkv.reshape(b, h, w, 3 * heads, d)
  padded = np.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  inside = np.pad(np.ones((h, w)), 1)[..., None]  # 1 on the grid, 0 on the padding
  out = np.zeros((b, h, w, d))
  for a in range(3):
    for bb in range(3):
      out += fc_bias[3 * a + bb] * inside[a : a + h, bb : bb + w]
      for j in range(3 * heads):
        out += fc[j, 3 * a + bb] * padded[:, a : a + h, bb : bb + w, j, :]
  return np.repeat(out[..., None], heads, axis=-1).reshape(b, n, d * heads)


def test_conv_branch_at_init_is_3x3_conv_of_qkv_maps():
  grid, heads, dim = (3, 5), 2, 8
  module = ACmix(dim, grid, num_heads=heads, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 15, dim)), jnp.float32)
  qkv = module.qkv(x)
  _, conv = module.branches(x)
  fc, fc_bias = (np.asarray(module.fc.kernel[...], np.float64), np.asarray(module.fc.bias[...]))
  expected = conv_of_qkv_maps(np.asarray(qkv, np.float64), fc, fc_bias, grid, heads)
  assert_reordered(conv, expected, 9 * 3 * heads + 1)  # 3x3 taps of the 3·heads maps, the bias
  # The result is a real spatial mix: dropping the shifts (centre tap only) changes it.
  centre_only = np.asarray(qkv, np.float64).reshape(BATCH, 15, 3 * heads, dim // heads)
  centre_only = np.repeat(
    (np.einsum("bnjc,j->bnc", centre_only, fc[:, 4]) + fc_bias.sum())[..., None], heads, axis=-1
  ).reshape(BATCH, 15, dim)
  assert max_rel_err(conv, centre_only) > 0.1


def test_conv_branch_fc_bias_within_float32_rounding_of_float64():
  """The conv branch with random fc weights, fc bias and conv kernel against the float64 torch-
  order reference, within a rigorous bound: each output is the fc sum (3H products and the bias,
  each term rounded at most 3H + 1 times) fed through the 81-term grouped conv (each term
  rounded at most 81 times), so |error| ≤ γ_(3H+82) · (the branch on absolute values), with
  γ_n = n·u / (1 − n·u), u = 2^−24. Dropping the bias misses by far more than that bound."""
  grid, heads, dim = (3, 5), 3, 12
  h, w = grid
  module = ACmix(dim, grid, num_heads=heads, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(6)
  fc = rng.normal(size=(3 * heads, 9)).astype(np.float32)
  fc_bias = rng.normal(size=9).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 9, dim)).astype(np.float32)
  qkv = rng.normal(size=(BATCH, h * w, 3 * dim)).astype(np.float32)
  module.fc.kernel[...], module.fc.bias[...] = jnp.asarray(fc), jnp.asarray(fc_bias)
  module.conv_kernel[...] = jnp.asarray(kernel)
  with jax.default_matmul_precision("highest"):  # float32 products on any backend
    out = np.asarray(module.convolution_branch(jnp.asarray(qkv)), np.float64)

  f64 = lambda a: np.asarray(a, np.float64)
  branch = lambda qkv, fc, fc_bias, kernel: reference_conv_branch(
    f64(qkv), f64(fc), f64(fc_bias), f64(kernel), grid, heads
  )
  exact = branch(qkv, fc, fc_bias, kernel)
  n, u = 3 * heads + 82, 2.0**-24
  bound = n * u / (1 - n * u) * branch(np.abs(qkv), np.abs(fc), np.abs(fc_bias), np.abs(kernel))
  assert np.all(np.abs(out - exact) <= bound)
  without_bias = branch(qkv, fc, np.zeros(9), kernel)
  assert np.abs(out - without_bias).max() > 100 * bound.max()


def test_grouped_conv_matches_lax_grouped_conv_with_gradients():
  """The slice-and-dot conv against the grouped conv it replaces: random maps and kernel,
  non-square grid."""
  b, h, w, d, heads = 2, 3, 5, 4, 3
  rng = np.random.default_rng(7)
  maps = jnp.asarray(rng.normal(size=(b, h, w, d, 9)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 9, d * heads)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(b, h, w, d * heads)), jnp.float32)

  def lax_grouped_conv(maps, kernel):  # the former formulation: channel c·9 + i, d groups
    return jax.lax.conv_general_dilated(
      maps.reshape(b, h, w, d * 9),
      kernel,
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=d,
    )

  def out_and_grads(conv):
    # A random cotangent so every output position and channel weighs differently in the gradients.
    loss = lambda m, k: jnp.sum(conv(m, k) * cotangent)
    return conv(maps, kernel), *jax.grad(loss, argnums=(0, 1))(maps, kernel)

  ours, expected = out_and_grads(grouped_conv3x3), out_and_grads(lax_grouped_conv)
  # An output sums 3x3 taps of 9 channels; a kernel tap's gradient sums over b·h·w positions.
  terms = {"output": 81, "d/d maps": 81, "d/d kernel": b * h * w}
  for name, a, e in zip(("output", "d/d maps", "d/d kernel"), ours, expected, strict=True):
    assert a.shape == e.shape, name
    assert_reordered(a, e, terms[name])


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def p(v):
  return np.asarray(v[...], np.float64)


def reference_bias(table, grid):
  """(H, N, N): Swin's relative position bias, the table's row of each query − key offset."""
  h, w = grid
  bias = np.zeros((table.shape[1], h * w, h * w), table.dtype)
  for i in range(h):
    for j in range(w):
      for pp in range(h):
        for qq in range(w):
          bias[:, i * w + j, pp * w + qq] = table[(i - pp + h - 1) * (2 * w - 1) + (j - qq + w - 1)]
  return bias


def reference_weights(module, x, grid):
  """float64 attention-branch softmax (B, H, N, N) and v (B, H, N, d), after the authors'
  PyTorch code, with Swin's relative position bias (query − key offsets)."""
  h, w = grid
  heads = module.num_heads
  x = np.asarray(x, np.float64)
  b, n, dim = x.shape
  d = dim // heads
  qkv = x @ p(module.qkv.kernel) + p(module.qkv.bias)
  q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
  bias = reference_bias(p(module.relative_bias), grid)
  split = lambda t: t.reshape(b, n, heads, d).transpose(0, 2, 1, 3)  # (B, H, N, d)
  return softmax(split(q) @ split(k).transpose(0, 1, 3, 2) * d**-0.5 + bias), split(v)


def reference_acmix(module, x, grid):
  """float64 ACmix written after the authors' PyTorch code (NCHW, torch weight layouts)."""
  x = np.asarray(x, np.float64)
  b, n, dim = x.shape
  qkv = x @ p(module.qkv.kernel) + p(module.qkv.bias)
  weights, v = reference_weights(module, x, grid)
  attention = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
  attention = attention @ p(module.out_proj.kernel) + p(module.out_proj.bias)

  conv = reference_conv_branch(
    qkv, p(module.fc.kernel), p(module.fc.bias), p(module.conv_kernel), grid, module.num_heads
  )
  return p(module.attention_rate) * attention + p(module.conv_rate) * conv


def reference_conv_branch(qkv, fc, fc_bias, conv_kernel, grid, heads):
  """float64 convolution branch as the authors' torch code runs it: cat the q/k/v views
  (B, H, d, hw) on dim 1, 1×1 fc conv 3H → 9 with bias, permute to (B, d, 9, hw), view as 9d
  channels, grouped conv (groups d, zero padding 1, no bias).

  qkv: (B, N, 3D); fc: (3H, 9) and conv_kernel: (3, 3, 9, D) in our layouts. Linear in qkv for
  fixed weights, so on absolute values it gives the magnitudes a rounding bound scales with.
  """
  h, w = grid
  b, n, dim3 = qkv.shape
  dim = dim3 // 3
  d = dim // heads
  nchw = lambda t: t.transpose(0, 2, 1).reshape(b, heads, d, n)
  f_all = np.concatenate([nchw(qkv[..., s * dim : (s + 1) * dim]) for s in range(3)], axis=1)
  fc_torch = fc.T  # (9, 3H): the 1×1 conv's weight
  f_conv = np.einsum("ij,bjcn->bicn", fc_torch, f_all) + fc_bias[None, :, None, None]
  f_conv = f_conv.transpose(0, 2, 1, 3).reshape(b, 9 * d, h, w)  # (B, 9, d, N) → 9d channels
  conv_torch = conv_kernel.transpose(3, 2, 0, 1)  # (D out, 9 in per group, 3, 3)
  padded = np.pad(f_conv, ((0, 0), (0, 0), (1, 1), (1, 1)))
  conv = np.zeros((b, dim, h, w))
  outputs_per_group = dim // d
  for o in range(dim):
    group = o // outputs_per_group
    for i in range(9):
      for a in range(3):
        for bb in range(3):
          conv[:, o] += conv_torch[o, i, a, bb] * padded[:, group * 9 + i, a : a + h, bb : bb + w]
  return conv.reshape(b, dim, n).transpose(0, 2, 1)


def randomised(grid, dim, heads):
  """An ACmix with every parameter moved off its init, so each one's layout is exercised."""
  h, w = grid
  module = ACmix(dim, grid, num_heads=heads, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(3)
  module.conv_kernel[...] = jnp.asarray(rng.normal(size=(3, 3, 9, dim)), jnp.float32)
  module.relative_bias[...] = jnp.asarray(
    rng.normal(size=((2 * h - 1) * (2 * w - 1), heads)), jnp.float32
  )
  module.qkv.bias[...] = jnp.asarray(rng.normal(size=3 * dim), jnp.float32)
  module.fc.bias[...] = jnp.asarray(rng.normal(size=9), jnp.float32)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  module.attention_rate[...] = jnp.asarray(0.7, jnp.float32)
  module.conv_rate[...] = jnp.asarray(-0.3, jnp.float32)
  return module, rng.normal(size=(BATCH, h * w, dim)).astype(np.float32)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_full_forward_matches_float64_reference(grid):
  h, w = grid
  dim, heads = 12, 3
  module, x = randomised(grid, dim, heads)
  out = module(jnp.asarray(x))
  assert out.shape == (BATCH, h * w, dim) and out.dtype == jnp.float32
  # The chain: qkv (dim), the logits (head dim), softmax and weights·v (h·w each), the
  # conv branch's fc and 3x3 taps (9 + 81), the output projection (dim).
  assert_reordered(out, reference_acmix(module, x, grid), 2 * dim + 4 + 2 * h * w + 90)


def test_attention_weights_are_the_softmax_the_attention_branch_applies():
  grid, dim, heads = (3, 5), 12, 3
  module, x = randomised(grid, dim, heads)
  weights = module.attention_weights(jnp.asarray(x))
  assert weights.shape == (BATCH, heads, 15, 15) and weights.dtype == jnp.float32
  # The chain: qkv (dim), the logits (head dim), the softmax's sum (15 tokens).
  assert_reordered(weights, reference_weights(module, x, grid)[0], dim + 4 + 15)
  # Applied to v and projected, they give the branch's output: weights·v adds 15 terms.
  qkv = module.qkv(jnp.asarray(x))
  v = qkv[..., 2 * dim :].reshape(BATCH, 15, heads, 4)
  mixed = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(BATCH, 15, dim)
  assert_reordered(module.out_proj(mixed), module.attention_branch(qkv), dim + 4 + 2 * 15 + dim)


def test_bfloat16_activations_stay_bfloat16():
  grid = (4, 4)
  module = ACmix(8, grid, num_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  reference = ACmix(8, grid, num_heads=2, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(BATCH, 16, 8)), jnp.float32)
  out = module(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert max_rel_err(out.astype(jnp.float32), reference(x)) < 3e-2


def test_heads_that_do_not_divide_the_width_are_refused():
  with pytest.raises(ValueError, match=r"ACmix needs dim \(8\) divisible by num_heads \(5\)"):
    ACmix(8, (4, 4), num_heads=5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("form", ["cpu", "plain"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 3)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_the_position_bias_copies_the_table_and_sums_its_gradient_in_either_form(grid, form):
  """The CPU gathers the bias matrix, GPU and TPU tile it (`backend.forms` picks either
  here): the same entries, and a table row's gradient is the float64 sum of the cotangent
  over the entries that copy it (at most N), to float32 round-off."""
  h, w = grid
  module, _ = randomised(grid, 12, 3)
  table = np.asarray(module.relative_bias[...])
  with backend.forms(form):
    np.testing.assert_array_equal(module.relative_bias_matrix(), reference_bias(table, grid))
    cotangent = np.random.default_rng(4).normal(size=(3, h * w, h * w))
    graphdef, params = nnx.split(module)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).relative_bias_matrix() * cotangent)
    got = np.asarray(jax.grad(loss)(params)["relative_bias"][...], np.float64)
  expected, magnitude = np.zeros(table.shape), np.zeros(table.shape)
  index = np.asarray(reference_bias(np.arange(len(table))[:, None], grid))[0]  # each entry's row
  for row in range(len(table)):
    expected[row] = cotangent[:, index == row].sum(axis=1)
    magnitude[row] = np.abs(cotangent[:, index == row]).sum(axis=1)
  terms = h * w + 1  # the cotangent rounded to float32, then summed: γ_terms of the magnitude
  gamma = terms * U / (1 - terms * U)
  assert np.all(np.abs(got - expected) <= gamma * magnitude)


def test_only_the_cpu_gathers_the_position_bias_and_scatters_its_gradient():
  """A scatter-add runs as atomic adds on a GPU (a sum in no fixed order) and as a loop on a
  TPU: their ACmix takes the tiled bias matrix, whose gradient is a sum."""
  module, x = randomised((3, 5), 12, 3)
  graphdef, params = nnx.split(module)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))))
  lowered = {
    platform: jax.export.export(grad, platforms=[platform])(params, jnp.asarray(x)).mlir_module()
    for platform in ("cpu", "cuda", "tpu")
  }
  assert "stablehlo.gather" in lowered["cpu"] and "stablehlo.scatter" in lowered["cpu"]
  for platform in ("cuda", "tpu"):
    assert "stablehlo.gather" not in lowered[platform]
    assert "stablehlo.scatter" not in lowered[platform]
