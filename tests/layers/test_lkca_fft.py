"""LKCA's FFT view: the same zero-padded cross-correlation as the conv view and a float64
SciPy reference (values and gradients, float32 and bfloat16, every kernel sharing, odd and
even, square and non-square grids); the transform size that is just enough; transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from flax import nnx

from lkca_jax.backend import forms
from lkca_jax.layers import LKCA, lkca
from tests.layers.test_lkca import (
  BATCH,
  DIM,
  HEADS,
  channel_kernels,
  output_and_grads,
  random_inputs,
  scipy_reference,
)

# Odd and even sides, square and not, a one-row grid.
GRIDS = [(4, 4), (5, 5), (3, 5), (4, 7), (1, 6)]
SHARINGS = ["layer", "head", "channel"]
U_FLOAT32 = 2.0**-24  # unit round-off
U_BFLOAT16 = 2.0**-8


def maps(a, grid) -> np.ndarray:
  """(B, N, D) tokens as (B, D, h·w) float64 channel maps, flattened."""
  return np.asarray(a, np.float64).transpose(0, 2, 1)


def norms(a) -> tuple[np.ndarray, np.ndarray]:
  """(‖·‖₁, ‖·‖₂) over the last axis."""
  return np.abs(a).sum(-1), np.sqrt((a * a).sum(-1))


def fft_error_bounds(v, kernel, r, grid, sharing, shape, u=U_FLOAT32):
  """Bounds on max |computed − exact| of (output, grad v, grad kernel) of `mix_fft`.

  One correlation of a map x with a kernel k through three length-n DFTs (n = Lh·Lw), each
  with relative norm-wise error ε = 6·u·log₂ n (Higham, Accuracy and Stability of Numerical
  Algorithms, Thm. 24.2, accurate twiddles; the complex products add a few u, folded in).
  With ‖F x‖₂ = √n‖x‖₂, ‖F k‖_∞ ≤ ‖k‖₁ and the inverse's 1/n, every error term is at most
  ε·(‖x‖₂‖k‖₁ + ‖x‖₁‖k‖₂), three of them; max|error| ≤ ‖error‖₂. grad v is the same
  correlation of r with k; the gradient of a shared kernel sums one correlation of v with
  r per map it mixes (plus u·maps for that sum, far below).
  """
  eps = 6 * u * math.log2(shape[0] * shape[1])
  v_maps, r_maps = maps(v, grid), maps(r, grid)
  k1, k2 = norms(channel_kernels(np.asarray(kernel, np.float64), sharing).reshape(DIM, -1))
  v1, v2 = norms(v_maps)
  r1, r2 = norms(r_maps)
  out = 3 * eps * np.max(v2 * k1 + v1 * k2)
  grad_v = 3 * eps * np.max(r2 * k1 + r1 * k2)
  per_map = 3 * (eps + BATCH * DIM * u) * (v2 * r1 + v1 * r2)  # (B, D)
  groups = {"layer": 1, "head": HEADS, "channel": DIM}[sharing]
  grad_k = per_map.reshape(BATCH, groups, DIM // groups).sum(axis=(0, 2)).max()
  return out, grad_v, grad_k


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_fft_view_matches_scipy_and_conv_view(grid, sharing):
  v, kernel, r = random_inputs(grid, sharing, seed=5)
  fft = output_and_grads(lkca.mix_fft, v, kernel, r, grid, sharing)
  conv = output_and_grads(lkca.mix_conv, v, kernel, r, grid, sharing)
  reference = scipy_reference(v, kernel, r, grid, sharing)
  # Σ|terms| of every output entry: the same correlations on absolute values.
  magnitude = scipy_reference(*(np.abs(a) for a in (v, kernel, r)), grid, sharing)
  bounds = fft_error_bounds(v, kernel, r, grid, sharing, lkca.fft_shape(grid))
  # The conv view sums directly: |error| ≤ γ_m·Σ|terms|, m ≤ B·N·D terms in any sum.
  terms = BATCH * grid[0] * grid[1] * DIM
  for name, f, c, ref, mag, bound in zip(
    ("output", "grad v", "grad kernel"), fft, conv, reference, magnitude, bounds, strict=True
  ):
    assert f.dtype == jnp.float32 and f.shape == ref.shape, name
    err = np.abs(np.asarray(f, np.float64) - ref)
    assert err.max() <= bound, f"{name}: fft vs float64 scipy {err.max():.3g} > {bound:.3g}"
    # The bound is no blanket: it is within 10⁴ of the largest value (about 10⁻³ relative).
    assert bound < 1e-3 * np.abs(ref).max(), name
    conv_bound = terms * U_FLOAT32 * mag
    fft_vs_conv = np.abs(np.asarray(f, np.float64) - np.asarray(c, np.float64))
    assert np.all(fft_vs_conv <= bound + conv_bound), f"{name}: fft vs conv"


def round_to_bfloat16(*arrays):
  return tuple(np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in arrays)


@pytest.mark.parametrize(
  "grid, sharing", [((4, 4), "layer"), ((3, 5), "head"), ((5, 5), "channel"), ((4, 7), "layer")]
)
def test_bfloat16_inputs_get_the_float32_result_rounded_once(grid, sharing):
  """bf16 v, kernel and cotangent: transforms in float32, one rounding to bf16 at the end.

  So each entry is the float32 result rounded (|error| ≤ u_bf16·|value|), and the
  difference from the float64 reference on the same (bf16) inputs is at most that plus the
  float32 bound of fft_error_bounds.
  """
  v, kernel, r = round_to_bfloat16(*random_inputs(grid, sharing, seed=6))
  as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (v, kernel, r)]
  low = output_and_grads(lkca.mix_fft, *as_bf16, grid, sharing)
  full = output_and_grads(lkca.mix_fft, v, kernel, r, grid, sharing)
  reference = scipy_reference(v, kernel, r, grid, sharing)
  bounds = fft_error_bounds(v, kernel, r, grid, sharing, lkca.fft_shape(grid))
  for name, lo, fu, ref, bound in zip(
    ("output", "grad v", "grad kernel"), low, full, reference, bounds, strict=True
  ):
    assert lo.dtype == jnp.bfloat16, name
    lo, fu = np.asarray(lo, np.float64), np.asarray(fu, np.float64)
    assert np.all(np.abs(lo - fu) <= U_BFLOAT16 * np.abs(fu)), f"{name}: not one rounding"
    err = np.abs(lo - ref)
    assert np.all(err <= bound + U_BFLOAT16 * np.abs(ref)), f"{name}: bf16 vs float64 scipy"


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (4, 7)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_smallest_transform_is_exact_and_one_smaller_wraps(grid):
  """min_fft_shape (2h−1, 2w−1) is enough and tight: one less on either axis wraps.

  On a period L the offsets −(h−1) … h−1 of token pairs stay distinct only if L ≥ 2h−1; at
  L = 2h−2 offsets h−1 and −(h−1) meet, and the output takes a wrong tap's weight.
  """
  h, w = grid
  v, kernel, r = random_inputs(grid, "layer", seed=7)
  reference = scipy_reference(v, kernel, r, grid, "layer")[0]
  x = jnp.asarray(maps(v, grid).reshape(BATCH, DIM, h, w), jnp.float32)

  def error(shape):
    correlate = jax.jit(lkca.circular_correlate, static_argnums=2)
    out = np.asarray(correlate(x, jnp.asarray(kernel), shape), np.float64)
    return np.abs(out.reshape(BATCH, DIM, h * w).transpose(0, 2, 1) - reference).max()

  smallest = lkca.min_fft_shape(grid)
  assert smallest == (2 * h - 1, 2 * w - 1)
  bound = fft_error_bounds(v, kernel, r, grid, "layer", smallest)[0]
  assert error(smallest) <= bound
  scale = np.abs(reference).max()
  assert error((smallest[0] - 1, smallest[1])) > 0.05 * scale  # rows wrap
  assert error((smallest[0], smallest[1] - 1)) > 0.05 * scale  # columns wrap
  # Through mix_fft itself: the smallest shape gives the reference, a smaller one is refused.
  mix = jax.jit(lkca.mix_fft, static_argnames=("grid", "shape"))
  out = mix(jnp.asarray(v), jnp.asarray(kernel), grid=grid, shape=smallest)
  assert np.abs(np.asarray(out, np.float64) - reference).max() <= bound
  with pytest.raises(ValueError, match=r"too small .* at least \(\d+, \d+\)"):
    lkca.mix_fft(jnp.asarray(v), jnp.asarray(kernel), grid, shape=(smallest[0] - 1, smallest[1]))


def test_wrapped_output_is_the_aliased_correlation():
  """What a too-small period computes: on L = 2h−2 rows, offset h−1 also lands on −(h−1).

  Folding the kernel by hand (the tap of offset −(h−1) added to that of h−1, and back)
  and correlating with zero padding gives exactly the wrapped result: the wrap is the
  aliasing the bound predicts, not some other defect.
  """
  grid = (4, 1)  # one column: the kernel is a (7, 1) column of row offsets −3 … 3
  h = grid[0]
  v, kernel, _ = random_inputs(grid, "layer", seed=8)
  x = jnp.asarray(maps(v, grid).reshape(BATCH, DIM, h, 1), jnp.float32)
  correlate = jax.jit(lkca.circular_correlate, static_argnums=2)
  wrapped = np.asarray(correlate(x, jnp.asarray(kernel), (2 * h - 2, 1)))
  k = np.asarray(kernel, np.float64)[:, 0]  # index a ↔ offset a − (h−1)
  folded = k.copy()
  folded[0] += k[-1]  # offset −(h−1) ≡ h−1 (mod 2h−2)
  folded[-1] += k[0]
  x64 = np.asarray(x, np.float64)[..., 0]
  expected = np.stack(
    [[scipy.signal.correlate(m, folded, mode="same") for m in image] for image in x64]
  )
  np.testing.assert_allclose(wrapped[..., 0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def is_smooth(n: int) -> bool:
  for p in (2, 3, 5, 7):
    while n % p == 0:
      n //= p
  return n == 1


def test_transform_lengths_are_the_smallest_fast_ones():
  # 2h−1 for the grids of the benchmark: 15, 31 (prime), 63 = 3²·7, 95 = 5·19, 127 (prime).
  assert [lkca.fft_shape((s, s))[0] for s in (8, 16, 32, 48, 64)] == [15, 32, 63, 96, 128]
  assert lkca.fft_shape((3, 6)) == (5, 12)  # 11 is prime
  for n in range(1, 300):
    length = lkca.smooth_length(n)
    assert length >= n and is_smooth(length)
    assert not any(is_smooth(m) for m in range(n, length))


def test_jvp_vmap_hessian_match_the_attention_view():
  """Every transform of the FFT view equals the same transform of the attention view."""
  grid, sharing = (3, 5), "head"
  v, kernel, r = (jnp.asarray(a) for a in random_inputs(grid, sharing, seed=9))
  dv, dk, _ = (jnp.asarray(a) for a in random_inputs(grid, sharing, seed=10))
  tol = 1e-5  # a few float32 bounds of fft_error_bounds at these sizes (about 1e-6 each)

  def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()

  def mixed(mix):
    return lambda v, k: mix(v, k, grid, sharing)

  fft, attention = mixed(lkca.mix_fft), mixed(lkca.mix_attention)
  jvp = jax.jit(lambda f, *a: jax.jvp(f, a[:2], a[2:]), static_argnums=0)
  for a, b in zip(jvp(fft, v, kernel, dv, dk), jvp(attention, v, kernel, dv, dk), strict=True):
    close(a, b)
  batched = lambda mix: jax.jit(jax.vmap(lambda k: mix(v, k)))(jnp.stack([kernel, dk]))  # noqa: E731
  close(batched(fft), batched(attention))
  # A loss quadratic in the kernel: its Hessian is exact in both, and not zero.
  loss = lambda mix: lambda k: jnp.sum(mix(v, k) * r) ** 2  # noqa: E731
  h_fft = jax.jit(jax.hessian(loss(fft)))(kernel)
  h_attention = jax.jit(jax.hessian(loss(attention)))(kernel)
  assert h_fft.shape == (*kernel.shape, *kernel.shape)
  close(h_fft, h_attention)


def test_module_in_fft_view_equals_conv_view_in_value_and_gradient():
  grid = (4, 6)
  x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 24, DIM)), jnp.float32)
  modules = {view: LKCA(DIM, grid, view=view, rngs=nnx.Rngs(0)) for view in ("fft", "conv")}
  kernel = jnp.asarray(np.random.default_rng(12).normal(size=(7, 11)), jnp.float32)
  for module in modules.values():
    module.kernel[...] = kernel
  assert modules["fft"].cpu_view == modules["fft"].default_view == "fft"
  value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2)))
  (loss_fft, g_fft), (loss_conv, g_conv) = (value_and_grad(modules[v]) for v in ("fft", "conv"))
  # 1e-5: a few float32 bounds of fft_error_bounds at these sizes (about 1e-6 each).
  assert abs(float(loss_fft) - float(loss_conv)) <= 1e-5 * float(loss_conv)
  for name in ("kernel", "v_proj", "out_proj"):
    for a, b in zip(jax.tree.leaves(g_fft[name]), jax.tree.leaves(g_conv[name]), strict=True):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name


def test_setting_view_on_a_built_module_switches_the_view_it_runs():
  grid = (4, 6)
  x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 24, DIM)), jnp.float32)
  module = LKCA(DIM, grid, view="attention", rngs=nnx.Rngs(0))
  module.kernel[...] = jnp.asarray(np.random.default_rng(15).normal(size=(7, 11)), jnp.float32)
  before = module(x)
  module.view = "fft"
  assert module.cpu_view == module.default_view == "fft"
  assert "fft" in str(jax.make_jaxpr(lambda x: module(x))(x))
  # 1e-5: a few float32 bounds of fft_error_bounds at these sizes (about 1e-6 each).
  after = np.asarray(module(x), np.float64)
  assert np.abs(after - np.asarray(before, np.float64)).max() <= 1e-5 * np.abs(after).max()
  module.view = "attentoin"
  with pytest.raises(ValueError, match="view must be one of"):
    module(x)


@pytest.mark.parametrize("cpu, default", [("fft", "attention"), ("attention", "fft")])
def test_auto_runs_the_view_of_the_platform_it_is_lowered_for(cpu, default, monkeypatch):
  """An auto module whose CPU and other-platform views differ holds both; the call lowers
  the one `backend.by_backend` picks (pinned here with `forms`). The crossovers are set
  here so that the two differ on a 4×4 grid, whatever the measured ones are."""
  grid, n = (4, 4), 16
  crossovers = {view: n if view == "fft" else n + 1 for view in ("fft", "attention")}
  monkeypatch.setitem(lkca.AUTO_FFT_MIN_TOKENS, "cpu", crossovers[cpu])
  monkeypatch.setitem(lkca.AUTO_FFT_MIN_TOKENS, "default", crossovers[default])
  module = LKCA(DIM, grid, rngs=nnx.Rngs(0))
  assert module.view == "auto"
  assert (module.cpu_view, module.default_view) == (cpu, default)
  expected = {"cpu": cpu, "default": default}
  module.kernel[...] = jnp.asarray(
    np.random.default_rng(13).normal(size=module.kernel[...].shape), jnp.float32
  )
  x = jnp.asarray(np.random.default_rng(14).normal(size=(1, n, DIM)), jnp.float32)
  graphdef, state = nnx.split(module)
  texts, outputs = {}, {}
  for form in ("cpu", "plain", "auto"):
    with forms(form):
      lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x)
    texts[form] = lowered.as_text()
    outputs[form] = np.asarray(lowered.compile()(state, x), np.float64)
  # The FFT view lowers to stablehlo.fft, the gathered matrix to none.
  assert ("stablehlo.fft" in texts["cpu"]) == (expected["cpu"] == "fft")
  assert ("stablehlo.fft" in texts["plain"]) == (expected["default"] == "fft")
  # Unpinned, on this CPU, the CPU view runs: bit for bit the pinned CPU program's result.
  np.testing.assert_array_equal(outputs["auto"], outputs["cpu"])
  scale = np.abs(outputs["cpu"]).max()
  assert np.abs(outputs["plain"] - outputs["cpu"]).max() <= 1e-5 * scale  # the same function
