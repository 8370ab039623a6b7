"""LKCA: the conv and attention views, an independent float64 reference, init (the
reference zero kernel and the kernel_init options), view choice. The FFT view:
test_lkca_fft.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from flax import nnx

from lkca_jax import backend
from lkca_jax.layers import LKCA, common, lkca
from lkca_jax.models import count_params
from tests.helpers import U_BF16, U, product_fusions

GRIDS = [(8, 8), (4, 4), (3, 5), (16, 16)]
SHARINGS = ["layer", "head", "channel"]
BATCH, DIM, HEADS = 2, 8, 2


def assert_within_round_off(actual, expected, magnitude, terms: int, sides: int = 1) -> None:
  """|actual − expected| ≤ sides·γ_terms·magnitude elementwise, γ_n = n·u/(1 − n·u): a float32
  sum of `terms` products is within γ_terms·Σ|terms| of the exact value (`magnitude`, the
  same computation on absolute values in float64); `sides=2` for two float32 evaluations."""
  gamma = terms * U / (1 - terms * U)
  err = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
  excess = err - sides * gamma * np.asarray(magnitude, np.float64)
  assert excess.max() <= 0, f"off by {float(err.max()):.3g}, beyond the bound by {excess.max():.3g}"


def max_rel_err(actual, expected) -> float:
  """max |a − e| / max |e|: relative to the scale of the whole tensor."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_inputs(grid, sharing, seed=0):
  """Tokens v (B, N, D), a NON-zero kernel, and a cotangent r for loss = sum(r · out)."""
  h, w = grid
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(BATCH, h * w, DIM)).astype(np.float32)
  kernel = rng.normal(size=lkca.kernel_shape(DIM, grid, HEADS, sharing)).astype(np.float32)
  r = rng.normal(size=(BATCH, h * w, DIM)).astype(np.float32)
  return v, kernel, r


def channel_kernels(kernel, sharing) -> np.ndarray:
  """Expands any kernel sharing to one (2h−1, 2w−1) kernel per channel: (D, 2h−1, 2w−1)."""
  if sharing == "layer":
    return np.broadcast_to(kernel, (DIM, *kernel.shape))
  if sharing == "head":  # channel c belongs to head c // (D / heads)
    return np.repeat(kernel, DIM // HEADS, axis=0)
  return kernel


def scipy_reference(v, kernel, r, grid, sharing):
  """float64 output and gradients (w.r.t. v and kernel) of loss = sum(r · out), by scipy.

  Forward: zero-padded cross-correlation. With a (2h−1, 2w−1) kernel on an
  h×w map, "same" mode keeps the centred h×w window of the full correlation,
  which is exactly zero padding (h−1, w−1) (checked against "valid" on the
  explicitly padded map below).
  dL/dv = convolve2d(r, K, "same") (the adjoint of correlation is convolution);
  dL/dK = correlate2d(padded v, r, "valid").
  """
  h, w = grid
  v, kernel, r = (np.asarray(a, np.float64) for a in (v, kernel, r))
  per_channel = channel_kernels(kernel, sharing)
  out = np.zeros_like(v)
  grad_v = np.zeros_like(v)
  grad_k = np.zeros_like(per_channel)
  for b in range(v.shape[0]):
    for c in range(DIM):
      v_map, r_map, k = v[b, :, c].reshape(h, w), r[b, :, c].reshape(h, w), per_channel[c]
      padded = np.pad(v_map, ((h - 1, h - 1), (w - 1, w - 1)))
      same = scipy.signal.correlate2d(v_map, k, mode="same")
      np.testing.assert_allclose(
        same, scipy.signal.correlate2d(padded, k, mode="valid"), atol=1e-12
      )
      out[b, :, c] = same.reshape(-1)
      grad_v[b, :, c] = scipy.signal.convolve2d(r_map, k, mode="same").reshape(-1)
      grad_k[c] += scipy.signal.correlate2d(padded, r_map, mode="valid")
  # Fold the per-channel kernel gradients back onto the shared parameter.
  if sharing == "layer":
    grad_k = grad_k.sum(axis=0)
  elif sharing == "head":
    grad_k = grad_k.reshape(HEADS, DIM // HEADS, *grad_k.shape[1:]).sum(axis=1)
  return out, grad_v, grad_k


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def output_and_grads(mix, v, kernel, r, grid, sharing):
  def loss(v, kernel):
    out = mix(v, kernel, grid, sharing)
    return jnp.sum(out * r), out

  (_, out), (grad_v, grad_k) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(v, kernel)
  return out, grad_v, grad_k


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_conv_and_attention_views_agree_with_scipy_reference(grid, sharing):
  v, kernel, r = random_inputs(grid, sharing)
  conv = output_and_grads(lkca.mix_conv, v, kernel, r, grid, sharing)
  attention = output_and_grads(lkca.mix_attention, v, kernel, r, grid, sharing)
  reference = scipy_reference(v, kernel, r, grid, sharing)
  magnitudes = scipy_reference(np.abs(v), np.abs(kernel), np.abs(r), grid, sharing)
  # Each output and input-gradient entry sums at most h·w products; a kernel tap's gradient
  # sums them over the batch and the channels that share the tap.
  n = grid[0] * grid[1]
  sharers = {"layer": DIM, "head": DIM // HEADS, "channel": 1}[sharing]
  terms = (n, n, BATCH * n * sharers)
  for name, c, a, ref, mag, count in zip(
    ("output", "grad v", "grad kernel"), conv, attention, reference, magnitudes, terms, strict=True
  ):
    assert c.dtype == a.dtype == jnp.float32
    assert c.shape == a.shape == ref.shape, name
    assert_within_round_off(c, ref, mag, count)
    assert_within_round_off(a, ref, mag, count)
    assert_within_round_off(c, a, mag, count, sides=2)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_cpu_attention_mixing_is_the_gathered_matrix_mixing_value_for_value(sharing):
  """Its row sum (layer sharing) adds zeros: output and both gradients equal bit for bit
  those of the gathered matrix times v, and are within round-off of the plain form's."""
  grid = (8, 8)
  v, kernel, r = random_inputs(grid, sharing)

  def gathered(v, kernel, grid, sharing):
    return lkca.mix_by_matrix(v, lkca.attention_matrix_cpu(kernel, grid), sharing)

  cpu = output_and_grads(lkca.mix_attention_cpu, v, kernel, r, grid, sharing)
  by_gather = output_and_grads(gathered, v, kernel, r, grid, sharing)
  for got, expected in zip(cpu, by_gather, strict=True):
    np.testing.assert_array_equal(got, expected)
  magnitudes = scipy_reference(np.abs(v), np.abs(kernel), np.abs(r), grid, sharing)
  plain = output_and_grads(lkca.mix_attention, v, kernel, r, grid, sharing)
  terms = BATCH * 64 * DIM  # the most a kernel tap's gradient sums
  for got, expected, magnitude in zip(cpu, plain, magnitudes, strict=True):
    assert_within_round_off(got, expected, magnitude, terms, sides=2)


def test_cpu_attention_mixing_fuses_its_product_with_a_row_sum_on_the_cpu():
  """One (N, N) matrix times each image's values runs on every thread of XLA:CPU only
  when fused with a row sum (docs/benchmarks.md, 2026-12-04d); lkca_t's width, batch 128."""
  kernel = jnp.zeros((15, 15), jnp.float32)
  v = jnp.zeros((128, 64, 136), jnp.float32)
  fusions = product_fusions(lambda v, k: lkca.mix_attention_cpu(v, k, (8, 8)), v, kernel)
  assert len(fusions) == 1 and "reduce" in next(iter(fusions.values())), fusions


def test_true_convolution_matches_only_with_flipped_kernel():
  grid = (3, 5)
  v, kernel, _ = random_inputs(grid, "layer", seed=1)
  out = np.asarray(lkca.mix_attention(v, kernel, grid, "layer"))
  maps = v.astype(np.float64).transpose(0, 2, 1).reshape(BATCH, DIM, *grid)

  def convolve(k, maps=maps):
    return (
      np.stack(
        [[scipy.signal.convolve2d(m, k, mode="same") for m in per_image] for per_image in maps]
      )
      .reshape(BATCH, DIM, -1)
      .transpose(0, 2, 1)
    )

  assert max_rel_err(out, convolve(kernel)) > 0.1
  flipped = kernel[::-1, ::-1]
  assert_within_round_off(out, convolve(flipped), convolve(np.abs(flipped), np.abs(maps)), 15)


MATRIX_FORMS = {"tiled": lkca.attention_matrix, "gathered": lkca.attention_matrix_cpu}


@pytest.mark.parametrize("form", MATRIX_FORMS)
@pytest.mark.parametrize("grid", [(3, 4), (1, 1), (1, 5), (4, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_attention_matrix_entries_by_explicit_loops(grid, form):
  h, w = grid
  kernel = np.arange((2 * h - 1) * (2 * w - 1), dtype=np.float32).reshape(2 * h - 1, 2 * w - 1)
  a = np.asarray(MATRIX_FORMS[form](jnp.asarray(kernel), (h, w)))
  assert a.shape == (h * w, h * w)
  for i in range(h):
    for j in range(w):
      for p in range(h):
        for q in range(w):
          assert a[i * w + j, p * w + q] == kernel[h - 1 + p - i, w - 1 + q - j]
      # Row (i, j) is the flattened window K[h−1−i : 2h−1−i, w−1−j : 2w−1−j].
      window = kernel[h - 1 - i : 2 * h - 1 - i, w - 1 - j : 2 * w - 1 - j]
      np.testing.assert_array_equal(a[i * w + j], window.reshape(-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("leading", [(), (3,), (2, 3)], ids=str)
def test_both_matrix_forms_copy_the_same_taps_and_sum_the_same_gradient(leading, dtype):
  """Every entry is a copy of one tap, so the two forms agree bit for bit in any dtype and
  for any leading kernel axes (heads, channels); a tap's gradient is the sum of the
  cotangent over the entries that copy it (the diagonals of its offset), at most N of them,
  in float32 for these float32 kernels."""
  grid = (5, 7)
  n = 35
  rng = np.random.default_rng(3)
  kernel = jnp.asarray(rng.normal(size=(*leading, 9, 13)), dtype)
  tiled, gathered = (np.asarray(f(kernel, grid)) for f in MATRIX_FORMS.values())
  assert tiled.dtype == gathered.dtype == dtype and tiled.shape == (*leading, n, n)
  np.testing.assert_array_equal(tiled, gathered)

  kernel = kernel.astype(jnp.float32)
  cotangent = rng.normal(size=(*leading, n, n))
  index = common.toeplitz_index(*grid)  # the flat tap each entry copies
  expected = np.zeros((*leading, 9 * 13))
  np.add.at(expected, (..., index), cotangent)  # float64: the exact sums to round-off
  magnitude = np.zeros_like(expected)
  np.add.at(magnitude, (..., index), np.abs(cotangent))
  for form in MATRIX_FORMS.values():
    _, pullback = jax.vjp(lambda k, form=form: form(k, grid), kernel)
    (got,) = pullback(jnp.asarray(cotangent, jnp.float32))
    # The cotangent rounded to float32 (one u) and summed (n terms).
    assert_within_round_off(got.reshape(expected.shape), expected, magnitude, n + 1)


def test_only_the_cpu_gathers_the_matrix_and_scatters_its_gradient():
  """A gather's gradient is a scatter-add: atomic adds in no fixed order on a GPU (a kernel
  gradient that changes from run to run), a loop on a TPU. GPU and TPU take the tiled
  matrix, whose gradient is a sum; XLA:CPU keeps the gather, whose scatter is faster there."""
  module = LKCA(8, (4, 4), view="attention", rngs=nnx.Rngs(0))
  x = jnp.ones((2, 16, 8), jnp.float32)
  graphdef, params = nnx.split(module)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))))
  lowered = {
    platform: jax.export.export(grad, platforms=[platform])(params, x).mlir_module()
    for platform in ("cpu", "cuda", "tpu")
  }
  assert "stablehlo.gather" in lowered["cpu"] and "stablehlo.scatter" in lowered["cpu"]
  for platform in ("cuda", "tpu"):
    assert "stablehlo.gather" not in lowered[platform]
    assert "stablehlo.scatter" not in lowered[platform]


# (batch, width) on a 3×5 grid: 30 tokens above the width 8, where the layer-shared module
# merges its projections, and 15 tokens below the width 16, where it runs them one by one.
TOKENS_AND_WIDTH = [(2, 8), (1, 16)]


@pytest.mark.parametrize("batch, dim", TOKENS_AND_WIDTH)
@pytest.mark.parametrize("view", ["conv", "attention", "fft"])
def test_module_is_projection_mixing_projection(view, batch, dim):
  """LKCA(x) = mix(x W_v) W_o + b_o, no bias on W_v, the same in every view."""
  grid = (3, 5)
  module = LKCA(dim, grid, view=view, rngs=nnx.Rngs(0))
  assert module.view == view
  assert module.v_proj.bias is None
  rng = np.random.default_rng(2)
  module.kernel[...] = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  x = rng.normal(size=(batch, 15, dim)).astype(np.float32)
  assert_module_within_round_off(module(jnp.asarray(x)), module, x, grid)


def assert_module_within_round_off(out, module, x, grid) -> None:
  """`out` is a layer-shared module's float64 value within float32 round-off: γ of the chain's
  terms (W_v's D, the mixing's h·w, W_o's D, the bias) times its magnitudes, plus in the
  FFT view the DFTs' norm-wise error (tests/layers/test_lkca_fft.py) carried through |W_o|."""
  dim, n = x.shape[-1], grid[0] * grid[1]
  expected, magnitude = float64_lkca(module, x, grid), float64_lkca(module, x, grid, absolute=True)
  gamma = (2 * dim + n + 1) * U / (1 - (2 * dim + n + 1) * U)
  slack = gamma * magnitude
  if module.view == "fft":
    v = (np.asarray(x, np.float64) @ np.asarray(module.v_proj.kernel[...], np.float64)).transpose(
      0, 2, 1
    )
    kernel = np.asarray(module.kernel[...], np.float64).reshape(-1)
    shape = lkca.fft_shape(grid)
    eps = 6 * U * np.log2(shape[0] * shape[1])
    mixing = (
      3
      * eps
      * np.max(
        np.sqrt((v * v).sum(-1)) * np.abs(kernel).sum() + np.abs(v).sum(-1) * np.linalg.norm(kernel)
      )
    )
    slack = slack + mixing * np.abs(np.asarray(module.out_proj.kernel[...], np.float64)).sum(0)
  err = np.abs(np.asarray(out, np.float64) - expected)
  assert (err <= slack).all(), f"off by {float(err.max()):.3g}, beyond by {(err - slack).max():.3g}"


def float64_lkca(module, x, grid, *, absolute=False) -> np.ndarray:
  """mix(x W_v) W_o + b_o of a layer-shared module in float64, the mixing by scipy; with
  `absolute`, of every input's and parameter's absolute value (the sums' magnitudes)."""

  def f64(a):
    a = np.asarray(a, np.float64)
    return np.abs(a) if absolute else a

  wv, wo, bo = (
    f64(p[...]) for p in (module.v_proj.kernel, module.out_proj.kernel, module.out_proj.bias)
  )
  v = f64(x) @ wv
  mixed = np.zeros_like(v)
  kernel = f64(module.kernel[...])
  for b in range(v.shape[0]):
    for c in range(v.shape[-1]):
      mixed[b, :, c] = scipy.signal.correlate2d(
        v[b, :, c].reshape(grid), kernel, mode="same"
      ).reshape(-1)
  return mixed @ wo + bo


def test_module_exports_with_a_symbolic_batch():
  """`jax.export` with the batch left symbolic: the choice of schedule must not compare a
  symbolic size (it counts the batch as 1), and the export computes the same function."""
  grid, dim = (3, 5), 16  # 15 tokens an image, below the width: one image runs as written
  module = LKCA(dim, grid, view="attention", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(8)
  module.kernel[...] = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  graphdef, state = nnx.split(module)
  (batch,) = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)))(
    state, jax.ShapeDtypeStruct((batch, 15, dim), jnp.float32)
  )
  assert str(exported.in_avals[-1]) == "float32[b,15,16]"
  x = rng.normal(size=(4, 15, dim)).astype(np.float32)
  assert_module_within_round_off(exported.call(state, jnp.asarray(x)), module, x, grid)


def literal_lkca(params, x, grid):
  """mix(x W_v) W_o + b_o as written, from a parameter dict (attention view)."""
  v = x @ params["v"]
  mixed = jnp.einsum("nm,bmd->bnd", lkca.attention_matrix(params["kernel"], grid), v)
  return mixed @ params["o"] + params["b"]


def module_params(module) -> dict:
  return {
    "v": module.v_proj.kernel[...],
    "o": module.out_proj.kernel[...],
    "b": module.out_proj.bias[...],
    "kernel": module.kernel[...],
  }


def module_with(params, dim, grid, merge="auto"):
  module = LKCA(dim, grid, view="attention", rngs=nnx.Rngs(0))
  module.merge = merge
  module.v_proj.kernel[...], module.out_proj.kernel[...] = params["v"], params["o"]
  module.out_proj.bias[...], module.kernel[...] = params["b"], params["kernel"]
  return module


@pytest.mark.parametrize("form", ["cpu", "plain"])
@pytest.mark.parametrize("batch, dim", TOKENS_AND_WIDTH)
def test_module_gradients_and_tangents_are_those_of_the_literal_form(batch, dim, form):
  """Every parameter's gradient, and the jvp along every parameter at once, equal those of
  mix(x W_v) W_o + b_o as written, whichever way the module schedules its products.

  Bound: each entry is a sum of products along chains of at most L = T·D + 2·D + N
  additions (the kernel gradient sums over every token and channel; then two widths and
  the mixing), so each schedule is within L·u of the same sum over absolute values, which
  the literal form on absolute parameters, input and cotangent gives (no cancellation
  there), and the two within twice that."""
  grid = (3, 5)
  rng = np.random.default_rng(6)
  module = LKCA(dim, grid, view="attention", rngs=nnx.Rngs(0))
  params = module_params(module)
  params = {
    **params,
    "b": jnp.asarray(rng.normal(size=dim), jnp.float32),
    "kernel": jnp.asarray(rng.normal(size=(5, 9)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(batch, 15, dim)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(batch, 15, dim)), jnp.float32)
  tangent = {k: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for k, p in params.items()}
  loss = lambda f: lambda p, x, r: jnp.sum(f(p, x) * r)
  by_module = lambda p, x: module_with(p, dim, grid)(x)
  by_literal = lambda p, x: literal_lkca(p, x, grid)

  with backend.forms(form):
    grads = jax.jit(jax.grad(loss(by_module)))(params, x, r)
    _, jvp = jax.jit(lambda p, t: jax.jvp(lambda p: by_module(p, x), (p,), (t,)))(params, tangent)
  expected_grads = jax.jit(jax.grad(loss(by_literal)))(params, x, r)
  _, expected_jvp = jax.jvp(lambda p: by_literal(p, x), (params,), (tangent,))

  absolute = lambda tree: jax.tree.map(jnp.abs, tree)
  grad_scale = jax.grad(loss(by_literal))(absolute(params), jnp.abs(x), jnp.abs(r))
  _, jvp_scale = jax.jvp(
    lambda p: by_literal(p, jnp.abs(x)), (absolute(params),), (absolute(tangent),)
  )
  u, terms = 2.0**-24, batch * 15 * dim + 2 * dim + 15
  for key in params:
    error = np.abs(np.asarray(grads[key]) - np.asarray(expected_grads[key]))
    assert np.all(error <= 2 * terms * u * np.asarray(grad_scale[key])), key
  error = np.abs(np.asarray(jvp) - np.asarray(expected_jvp))
  assert np.all(error <= 2 * terms * u * np.asarray(jvp_scale))


@pytest.mark.parametrize("merge", lkca.MERGES)
@pytest.mark.parametrize("batch, dim", TOKENS_AND_WIDTH)
def test_layer_shared_module_spends_one_width_squared_product_per_token_when_it_pays(
  batch, dim, merge
):
  """XLA's flop count of the lowered module against the literal form's: merged, one T·D·D
  product fewer for one D·D·D product of the weights; "auto" merges where the tokens T
  outnumber the width D, "always" and "never" whatever the count."""
  grid = (3, 5)
  module = LKCA(dim, grid, view="attention", rngs=nnx.Rngs(0))
  params = module_params(module)
  x = jax.ShapeDtypeStruct((batch, 15, dim), jnp.float32)

  def flops(fn):
    with backend.forms("plain"):
      cost = jax.jit(fn).lower(params, x).cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  saved = flops(lambda p, x: literal_lkca(p, x, grid)) - flops(
    lambda p, x: module_with(p, dim, grid, merge)(x)
  )
  tokens = batch * 15
  merged = merge == "always" or (merge == "auto" and tokens > dim)
  assert saved == (2 * tokens * dim**2 - 2 * dim**3 if merged else 0)


@pytest.mark.parametrize("merge", ["always", "never"])
@pytest.mark.parametrize("batch, dim", TOKENS_AND_WIDTH)
def test_either_schedule_is_the_module_at_any_token_count(batch, dim, merge):
  grid = (3, 5)
  rng = np.random.default_rng(9)
  module = LKCA(dim, grid, view="attention", rngs=nnx.Rngs(0))
  module.merge = merge
  module.kernel[...] = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  module.out_proj.bias[...] = jnp.asarray(rng.normal(size=dim), jnp.float32)
  x = rng.normal(size=(batch, 15, dim)).astype(np.float32)
  assert_module_within_round_off(module(jnp.asarray(x)), module, x, grid)


def test_an_unknown_merge_is_refused_by_name():
  module = LKCA(8, (3, 5), rngs=nnx.Rngs(0))
  module.merge = "sometimes"
  with pytest.raises(ValueError, match="merge must be one of"):
    module(jnp.ones((1, 15, 8)))


def test_parameter_count_formula():
  for dim, grid in [(12, (3, 5)), (192, (8, 8))]:
    h, w = grid
    module = nnx.eval_shape(lambda dim=dim, grid=grid: LKCA(dim, grid, rngs=nnx.Rngs(0)))
    assert count_params(module) == 2 * dim**2 + dim + (2 * h - 1) * (2 * w - 1)
  assert count_params(LKCA(192, (8, 8), rngs=nnx.Rngs(0))) == 74_145  # 2·192² + 192 + 15·15


@pytest.mark.parametrize(
  "sharing, shape", [("layer", (15, 15)), ("head", (4, 15, 15)), ("channel", (16, 15, 15))]
)
def test_kernel_initialised_to_zero(sharing, shape):
  module = LKCA(16, (8, 8), num_heads=4, kernel_sharing=sharing, rngs=nnx.Rngs(0))
  kernel = np.asarray(module.kernel[...])
  assert kernel.shape == shape
  assert not kernel.any()
  # A zero kernel mixes nothing: the output is the (zero) output bias.
  x = jnp.ones((2, 64, 16))
  np.testing.assert_array_equal(np.asarray(module(x)), 0.0)


@pytest.mark.parametrize("kernel_init", lkca.KERNEL_INITS)
def test_kernel_init_changes_only_the_kernel(kernel_init):
  # Same parameter count, and (at one seed) the same projections as the reference init.
  reference = LKCA(16, (8, 8), num_heads=4, kernel_sharing="head", rngs=nnx.Rngs(0))
  module = LKCA(
    16, (8, 8), num_heads=4, kernel_sharing="head", kernel_init=kernel_init, rngs=nnx.Rngs(0)
  )
  assert count_params(module) == count_params(reference)
  for name in ("v_proj", "out_proj"):
    jax.tree.map(
      np.testing.assert_array_equal,
      nnx.state(getattr(module, name)),
      nnx.state(getattr(reference, name)),
    )
  kernel = np.asarray(module.kernel[...])
  assert kernel.shape == (4, 15, 15) and kernel.dtype == np.float32
  assert np.isfinite(kernel).all() and (kernel_init == "zeros") == (not kernel.any())


def test_delta_init_makes_the_attention_matrix_the_identity():
  module = LKCA(DIM, (3, 5), kernel_init="delta", rngs=nnx.Rngs(0))
  kernel = np.asarray(module.kernel[...])
  assert kernel[2, 4] == 1 and kernel.sum() == 1  # the centre tap is the zero offset
  np.testing.assert_array_equal(np.asarray(module.attention_matrix()), np.eye(15))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 15, DIM)), jnp.float32)
  # Each token keeps its own value: out = x W_v W_o + b_o.
  expected = module.out_proj(module.v_proj(x))
  np.testing.assert_allclose(np.asarray(module(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_decay_init_is_a_normalised_distance_decaying_prior():
  module = LKCA(DIM, (8, 8), kernel_init="decay", rngs=nnx.Rngs(0))
  kernel = np.asarray(module.kernel[...], np.float64)
  assert kernel.sum() == pytest.approx(1.0, rel=1e-6)
  di, dj = np.meshgrid(np.arange(15) - 7, np.arange(15) - 7, indexing="ij")
  distance = np.hypot(di, dj)
  expected = np.exp(-distance / lkca.DECAY_LENGTH)
  np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-6)
  assert kernel.argmax() == 7 * 15 + 7  # strongest on the token itself
  np.testing.assert_array_equal(kernel, kernel[::-1, ::-1])  # symmetric in the offset
  np.testing.assert_array_equal(kernel, kernel.T)
  # Strictly decreasing with distance.
  order = np.argsort(distance.ravel(), kind="stable")
  values, dists = kernel.ravel()[order], distance.ravel()[order]
  assert (np.diff(values)[np.diff(dists) > 1e-9] < 0).all()


def test_gaussian_init_is_small_noise_drawn_per_kernel():
  module = LKCA(
    64, (8, 8), num_heads=4, kernel_sharing="channel", kernel_init="gaussian", rngs=nnx.Rngs(0)
  )
  kernel = np.asarray(module.kernel[...])
  assert kernel.shape == (64, 15, 15)
  # 14,400 N(0, 0.02²) draws: the sample std within 3% and the mean within 5 standard errors.
  assert kernel.std() == pytest.approx(lkca.GAUSSIAN_INIT_STD, rel=0.03)
  assert abs(kernel.mean()) < 5 * lkca.GAUSSIAN_INIT_STD / np.sqrt(kernel.size)
  assert not np.array_equal(kernel[0], kernel[1])  # each channel its own draw
  again = LKCA(
    64, (8, 8), num_heads=4, kernel_sharing="channel", kernel_init="gaussian", rngs=nnx.Rngs(0)
  )
  np.testing.assert_array_equal(np.asarray(again.kernel[...]), kernel)  # seeded
  other = LKCA(64, (8, 8), kernel_init="gaussian", rngs=nnx.Rngs(1))
  assert not np.array_equal(np.asarray(other.kernel[...]), kernel[0])


def test_kernel_init_reaches_the_model_through_mixer_options():
  from lkca_jax.models import create_model

  model = create_model(
    "lkca_t",
    num_classes=10,
    image_size=16,
    rngs=nnx.Rngs(0),
    dim=16,
    depth=2,
    mixer_options={"lkca": {"kernel_init": "delta"}},
  )
  for block in model.blocks:
    np.testing.assert_array_equal(np.asarray(block.mixer.attention_matrix()), np.eye(64))


def test_auto_view_resolves_per_platform_by_token_count():
  module = LKCA(DIM, (8, 8), rngs=nnx.Rngs(0))
  assert module.view == "auto"
  assert module.cpu_view == module.default_view == "attention"  # 64 tokens: below both
  for platform, tokens in lkca.AUTO_FFT_MIN_TOKENS.items():
    # A one-row grid of exactly the crossover's token count, and one token fewer.
    assert lkca.resolve_view("auto", 192, (1, tokens - 1), 12, "layer", platform) == "attention"
    assert lkca.resolve_view("auto", 192, (1, tokens), 12, "layer", platform) == "fft"
    for view in ("conv", "attention", "fft"):
      assert lkca.resolve_view(view, 192, (1, tokens), 12, "layer", platform) == view
  with pytest.raises(ValueError, match="platform must be one of"):
    lkca.resolve_view("auto", 192, (8, 8), 12, "layer", "gpu")


def test_auto_view_leaves_the_matrix_when_too_big():
  limit = lkca.AUTO_MAX_MATRIX_ENTRIES
  for platform, tokens in lkca.AUTO_FFT_MIN_TOKENS.items():
    grid, n = (1, tokens - 1), tokens - 1  # below the crossover: attention by speed
    dim = limit // n**2 + 1  # one matrix per channel: dim·N² entries, just over the limit
    assert dim * n**2 > limit >= (dim - 1) * n**2
    assert lkca.resolve_view("auto", dim, grid, 1, "channel", platform) == "fft"
    assert lkca.resolve_view("auto", dim - 1, grid, 1, "channel", platform) == "attention"
    assert lkca.resolve_view("auto", dim, grid, 1, "layer", platform) == "attention"


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(view="dense"), r"view must be one of \('auto', 'conv', 'attention', 'fft'\)"),
    (dict(kernel_sharing="pixel"), "kernel_sharing must be one of"),
    (dict(kernel_sharing="head", num_heads=3), "divisible by num_heads"),
    (dict(kernel_init="ones"), "kernel_init must be one of"),
    (dict(grid=(0, 4)), "grid must be positive"),
  ],
)
def test_bad_construction_raises_value_error(kwargs, match):
  kwargs = {"grid": (4, 4), **kwargs}
  with pytest.raises(ValueError, match=match):
    LKCA(DIM, rngs=nnx.Rngs(0), **kwargs)


def test_bfloat16_activations_stay_bfloat16():
  grid = (4, 4)
  module = LKCA(DIM, grid, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  module.kernel[...] = jnp.asarray(np.random.default_rng(3).normal(size=(7, 7)), jnp.float32)
  reference = LKCA(DIM, grid, rngs=nnx.Rngs(0))
  reference.kernel[...] = module.kernel[...]
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, DIM)), jnp.float32)
  out = module(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert module.kernel[...].dtype == jnp.float32  # parameters stay float32
  # bf16 has an 8-bit mantissa (~0.4% per rounding); a few roundings per output: measured 0.4%.
  assert max_rel_err(out.astype(jnp.float32), reference(x)) < 2e-2


def test_bfloat16_bias_gradient_is_the_float32_sum_rounded_once():
  """The output bias's gradient sums the cotangent over every token of the batch: in
  bfloat16 that sum is taken in float32 and rounded once (2⁻⁸ relative), where partial sums
  rounded to bfloat16 drift by percents over 8,192 rows. Small integers keep the float32
  sum exact, so the bound is the one rounding."""
  module = LKCA(16, (8, 8), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # 64 tokens > 16: merged
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(128, 64, 16)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.integers(-3, 4, size=(128, 64, 16)), jnp.bfloat16)
  graphdef, params = nnx.split(module)
  loss = lambda params: jnp.sum((nnx.merge(graphdef, params)(x) * cotangent).astype(jnp.float32))
  grad = np.asarray(jax.grad(loss)(params)["out_proj"]["bias"][...], np.float64)
  exact = np.asarray(cotangent, np.float64).sum(axis=(0, 1))
  assert np.all(np.abs(grad - exact) <= U_BF16 * np.abs(exact)), np.c_[grad, exact]
