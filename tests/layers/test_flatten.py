"""FLatten: parameter count, a float64 reference step by step, float32 islands under bf16."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import backend
from lkca_jax.layers import FocusedLinearAttention, flatten
from lkca_jax.models import count_params
from tests.helpers import U_BF16, U, assert_reordered

BATCH = 2


def max_rel_err(actual, expected) -> float:
  """max |a − e| / max |e|: relative to the scale of the whole tensor."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def flatten_params(dim, grid, heads, qkv_bias=True) -> int:
  """Closed form from `docs/method.md` ("Peer mixers"), term by term."""
  h, w = grid
  d = dim // heads
  qkv = 3 * dim * dim + (3 * dim if qkv_bias else 0)  # three Linear(D, D), biases by default
  position = h * w * dim  # P: (N, D)
  scale = dim  # s: (D,)
  dwc = 5 * 5 * d + d  # one 5×5 kernel per head channel + bias, shared by the heads
  out_proj = dim * dim + dim
  return qkv + position + scale + dwc + out_proj


@pytest.mark.parametrize(
  "dim, grid, heads, qkv_bias",
  [(12, (3, 5), 3, False), (12, (3, 5), 3, True), (114, (8, 8), 3, True), (176, (8, 8), 4, True)],
)
def test_parameter_count_formula(dim, grid, heads, qkv_bias):
  module = nnx.eval_shape(
    lambda: FocusedLinearAttention(dim, grid, num_heads=heads, qkv_bias=qkv_bias, rngs=nnx.Rngs(0))
  )
  assert count_params(module) == flatten_params(dim, grid, heads, qkv_bias)
  n, d = grid[0] * grid[1], dim // heads
  # The compact forms of the module docstring: with the biases, and 3D fewer without.
  assert flatten_params(dim, grid, heads, qkv_bias) == (
    4 * dim**2 + (n + 5) * dim + 26 * d - (0 if qkv_bias else 3 * dim)
  )


def test_initial_values():
  module = FocusedLinearAttention(16, (4, 6), num_heads=2, rngs=nnx.Rngs(0))
  # q/k/v biases by default, as in the authors' registered models; zero at init (the Linear rule,
  # and the authors' _init_weights too).
  for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
    assert proj.bias is not None and proj.bias[...].shape == (16,)
    assert not np.asarray(proj.bias[...]).any()
  no_bias = FocusedLinearAttention(16, (4, 6), num_heads=2, qkv_bias=False, rngs=nnx.Rngs(0))
  assert no_bias.q_proj.bias is None and no_bias.k_proj.bias is None and no_bias.v_proj.bias is None
  assert no_bias.out_proj.bias is not None
  assert module.position[...].shape == (24, 16) and not np.asarray(module.position[...]).any()
  assert module.scale[...].shape == (16,) and not np.asarray(module.scale[...]).any()
  kernel, bias = np.asarray(module.dwc_kernel[...]), np.asarray(module.dwc_bias[...])
  assert kernel.shape == (5, 5, 8) and bias.shape == (8,)
  # PyTorch's Conv2d default, U(±1/√25), fills the range.
  assert np.abs(kernel).max() <= 0.2 and np.abs(kernel).max() > 0.15 and np.abs(bias).max() <= 0.2


def focus_direct(x, p=3):
  """φ(x) = x^p · ‖x‖ / ‖x^p‖ over the last axis, literally."""
  norm = lambda t: np.linalg.norm(t, axis=-1, keepdims=True)
  return x**p * norm(x) / norm(x**p)


def test_focus_matches_direct_formula_and_survives_large_values():
  x = np.abs(np.random.default_rng(0).normal(size=(4, 7, 24))) + 1e-6
  # Powers, two norms over 24 channels and a quotient: 2·24 + 4 roundings at most.
  assert_reordered(flatten.focus(jnp.asarray(x, jnp.float32)), focus_direct(x), 52)
  # At 1e7 the literal form overflows float32 (‖x³‖² ~ 1e42); φ is 1-homogeneous, φ(c·x) = c·φ(x).
  big = jnp.asarray(x * 1e7, jnp.float32)
  with np.errstate(over="ignore"):
    literal = focus_direct(np.asarray(big))  # ‖x³‖ = inf, so φ collapses to 0
  assert max_rel_err(literal, focus_direct(x) * 1e7) > 0.5
  out = flatten.focus(big)
  assert bool(jnp.isfinite(out).all())
  assert_reordered(out, focus_direct(x) * 1e7, 52)


def p(v):
  return np.asarray(v[...], np.float64)


def project(lin, t):
  return t @ p(lin.kernel) + (p(lin.bias) if lin.bias is not None else 0.0)


def reference_heads(module, x):
  """Steps 1–4 in float64: q, k, v as (B, H, N, d)."""
  heads = module.num_heads
  x = np.asarray(x, np.float64)
  b, n, dim = x.shape
  q, k, v = project(module.q_proj, x), project(module.k_proj, x), project(module.v_proj, x)
  k = k + p(module.position)  # 1
  q, k = np.maximum(q, 0) + 1e-6, np.maximum(k, 0) + 1e-6  # 2
  softplus = np.log1p(np.exp(p(module.scale)))
  q, k = q / softplus, k / softplus  # 3
  q, k = focus_direct(q), focus_direct(k)  # 4: norms over all D channels
  split = lambda t: t.reshape(b, n, heads, dim // heads).transpose(0, 2, 1, 3)
  return split(q), split(k), split(v)


def reference_flatten(module, x, grid):
  """float64 FLatten following `docs/method.md` ("Peer mixers") step by step."""
  h, w = grid
  heads = module.num_heads
  b, n, dim = x.shape
  d = dim // heads
  q, k, vh = reference_heads(module, x)  # 5: (B, H, N, d)
  kv = (k.transpose(0, 1, 3, 2) / np.sqrt(n)) @ (vh / np.sqrt(n))
  z = 1.0 / (q @ k.mean(axis=2)[..., None] + 1e-6)
  out = (q @ kv) * z
  # 6: 5×5 cross-correlation, zero padding 2, of each head's d-channel map, same kernel per head.
  kernel, bias = p(module.dwc_kernel), p(module.dwc_bias)
  maps = np.pad(vh.reshape(b, heads, h, w, d), ((0, 0), (0, 0), (2, 2), (2, 2), (0, 0)))
  dwc = np.zeros((b, heads, h, w, d)) + bias
  for a in range(5):
    for bb in range(5):
      dwc += kernel[a, bb] * maps[:, :, a : a + h, bb : bb + w, :]
  out = out + dwc.reshape(b, heads, n, d)
  out = out.transpose(0, 2, 1, 3).reshape(b, n, dim)
  return project(module.out_proj, out)  # 7


def randomise(module, rng):
  """Moves P, s and every bias off their init (zeros) so each step's layout is exercised."""
  n, dim = module.position[...].shape
  module.position[...] = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
  module.scale[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  for proj in (module.q_proj, module.k_proj, module.v_proj):
    if proj.bias is not None:
      proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)


@pytest.mark.parametrize(
  "grid, qkv_bias",
  [((3, 5), True), ((3, 5), False), ((8, 8), True)],
  ids=["3x5", "3x5-no_qkv_bias", "8x8"],
)
def test_matches_float64_reference_step_by_step(grid, qkv_bias):
  h, w = grid
  dim, heads = 12, 3
  module = FocusedLinearAttention(dim, grid, num_heads=heads, qkv_bias=qkv_bias, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  randomise(module, rng)
  x = rng.normal(size=(BATCH, h * w, dim)).astype(np.float32)
  out = module(jnp.asarray(x))
  assert out.shape == (BATCH, h * w, dim) and out.dtype == jnp.float32
  # The chain: qkv (dim), the focus's norms (head dim), kᵀv and the normaliser (h·w each),
  # q against them (head dim), the 5x5 depthwise conv, the output projection (dim).
  assert_reordered(out, reference_flatten(module, x, grid), 2 * dim + 3 * 4 + 2 * h * w + 25)


def test_attention_weights_are_the_matrix_the_linear_attention_applies():
  grid, dim, heads = (3, 5), 12, 3
  module = FocusedLinearAttention(dim, grid, num_heads=heads, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  randomise(module, rng)
  x = rng.normal(size=(BATCH, 15, dim)).astype(np.float32)
  weights = module.attention_weights(jnp.asarray(x))
  assert weights.shape == (BATCH, heads, 15, 15) and weights.dtype == jnp.float32
  # Formed in float64 from the reference's own q and k: row n is q_n·k_m over
  # Σ_m' q_n·k_m' + N·ε, so a query that ReLU zeroed (q ≈ ε) weighs less than 1 in all.
  q, k, _ = reference_heads(module, x)
  dots = q @ k.transpose(0, 1, 3, 2)
  expected = dots / (dots.sum(axis=-1, keepdims=True) + 15 * 1e-6)
  assert (np.asarray(weights) >= 0).all()
  # The chain: q and k each off by their projection's dim terms, tripled by the focusing
  # cube, and by its norms over dim; then q·k (head dim) and the row's sum (15).
  assert_reordered(weights, expected, 2 * (3 * dim + dim) + 4 + 15)
  # Applied to v, plus the depthwise conv, then projected: the module's output.
  v32 = module.v_proj(jnp.asarray(x))
  mixed = jnp.einsum("bhnm,bmhd->bnhd", weights, v32.reshape(BATCH, 15, heads, 4))
  out = module.out_proj(mixed.reshape(BATCH, 15, dim) + module.depthwise_conv(v32))
  assert_reordered(out, module(jnp.asarray(x)), 2 * dim + 8 + 2 * 15 + 25)


def equations(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, custom_jvp, …) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from equations(sub)


def test_bfloat16_activations_stay_finite_with_float32_focusing():
  grid, dim, heads = (4, 4), 16, 2
  module = FocusedLinearAttention(dim, grid, num_heads=heads, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  reference = FocusedLinearAttention(dim, grid, num_heads=heads, rngs=nnx.Rngs(3))
  randomise(module, np.random.default_rng(4))
  randomise(reference, np.random.default_rng(4))
  # Large activations: q, k reach ~1e3, so x³ ~ 1e9 and ‖x³‖² ~ 1e19 before normalising.
  x = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, 16, dim)) * 100, jnp.float32)
  out = module(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
  expected = reference(x)
  assert bool(jnp.isfinite(expected).all())
  # bf16 keeps an 8-bit mantissa in the projections and the dwc; the focusing amplifies it (x³).
  assert max_rel_err(out.astype(jnp.float32), expected) < 5e-2

  with backend.forms("plain"):  # one Linear form, not both branches of by_backend
    eqns = list(equations(jax.make_jaxpr(module)(x.astype(jnp.bfloat16)).jaxpr))
  powers = [e for e in eqns if e.primitive.name == "integer_pow"]
  assert len(powers) == 2  # focusing of q and of k
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in powers)
  matmuls = [e.outvars[0].aval.dtype for e in eqns if e.primitive.name == "dot_general"]
  # q, k, v and output projections in bf16; kv, q·mean(k) and q·kv in float32.
  assert sorted(map(str, matmuls)) == ["bfloat16"] * 4 + ["float32"] * 3


def test_heads_that_do_not_divide_the_width_are_refused():
  with pytest.raises(ValueError, match=r"FLatten needs dim \(8\) divisible by num_heads \(5\)"):
    FocusedLinearAttention(8, (4, 4), num_heads=5, rngs=nnx.Rngs(0))


def correlate64(maps, kernel):
  """float64 depthwise cross-correlation, zero padding (k−1)/2, as a sum over the k² taps."""
  b, h, w, d = maps.shape
  size = kernel.shape[0]
  pad = size // 2
  padded = np.pad(maps, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return sum(
    padded[:, a : a + h, c : c + w] * kernel[a, c] for a in range(size) for c in range(size)
  )


def kernel_gradient64(maps, cotangent, size):
  """float64 gradient of sum(cotangent · correlation) with respect to the (k, k, D) taps."""
  _, h, w, _ = maps.shape
  pad = size // 2
  padded = np.pad(maps, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return np.stack(
    [
      np.stack([(padded[:, a : a + h, c : c + w] * cotangent).sum((0, 1, 2)) for c in range(size)])
      for a in range(size)
    ]
  )


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_the_depthwise_convolution_and_its_gradients_in_either_form(form):
  """On the CPU a sum of shifted slices, elsewhere `conv_general_dilated`: both within
  float32 round-off of a float64 reference, output and both gradients. Bounds: an output or a
  maps gradient sums 25 products, a tap's gradient B·h·w (γ_n of the sums of magnitudes)."""
  rng = np.random.default_rng(5)
  maps, kernel = rng.normal(size=(3, 6, 7, 4)), rng.normal(size=(5, 5, 4))
  cotangent = rng.normal(size=(3, 6, 7, 4))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  with backend.forms(form):
    out, pullback = jax.vjp(flatten.depthwise_correlate, f32(maps), f32(kernel))
    d_maps, d_kernel = pullback(f32(cotangent))
  # The maps' gradient is the correlation of the cotangent with the taps turned around.
  flipped = kernel[::-1, ::-1]
  expected = {
    "output": (correlate64(maps, kernel), correlate64(abs(maps), abs(kernel)), 25),
    "d maps": (correlate64(cotangent, flipped), correlate64(abs(cotangent), abs(flipped)), 25),
    "d kernel": (
      kernel_gradient64(maps, cotangent, 5),
      kernel_gradient64(abs(maps), abs(cotangent), 5),
      3 * 6 * 7,
    ),
  }
  for (name, (exact, magnitude, terms)), got in zip(
    expected.items(), (out, d_maps, d_kernel), strict=True
  ):
    gamma = terms * U / (1 - terms * U)
    error = np.abs(np.asarray(got, np.float64) - exact)
    assert np.all(error <= gamma * magnitude), name


def test_the_cpu_depthwise_convolution_rounds_a_float32_sum_once_in_bfloat16():
  rng = np.random.default_rng(6)
  maps, kernel = rng.normal(size=(2, 5, 5, 8)), rng.normal(size=(5, 5, 8))
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  out = flatten.depthwise_correlate_cpu(bf16(maps), bf16(kernel))
  assert out.dtype == jnp.bfloat16
  maps64, kernel64 = (np.asarray(bf16(a), np.float64) for a in (maps, kernel))
  exact = correlate64(maps64, kernel64)
  sum_error = 25 * U / (1 - 25 * U) * correlate64(abs(maps64), abs(kernel64))
  # One rounding to bfloat16 of a float32 sum within sum_error of the exact one.
  error = np.abs(np.asarray(out, np.float64) - exact)
  assert np.all(error <= U_BF16 * (np.abs(exact) + sum_error) + sum_error)


def test_only_gpu_and_tpu_run_the_depthwise_convolution_as_a_convolution():
  """XLA:CPU's grouped convolution is slow (docs/benchmarks.md, 2026-12-07e); GPU and TPU keep
  the convolution their compilers are built for (cuDNN's on a GPU)."""
  module = FocusedLinearAttention(8, (4, 4), num_heads=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(module)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))))
  x = jnp.ones((2, 16, 8), jnp.float32)
  lowered = {
    platform: jax.export.export(grad, platforms=[platform])(params, x).mlir_module()
    for platform in ("cpu", "cuda", "tpu")
  }
  assert "stablehlo.convolution" not in lowered["cpu"]
  for platform in ("cuda", "tpu"):
    assert "stablehlo.convolution" in lowered[platform]
