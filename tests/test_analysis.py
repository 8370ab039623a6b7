"""lkca_jax.analysis on models whose answers are known in advance.

A single-tap LKCA kernel at offset (a, b) makes each query attend to exactly
one key, (a, b) patches away; zero kernels (LKCA at init) mix nothing; zero
qkv weights make MHSA attend uniformly. Grids are non-square so that a row /
column mix-up shows.
"""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import analysis, models
from tests.helpers import assert_reordered, chain_terms

IMAGE = (10, 14)  # patch 2: a 5 x 7 grid
PATCH = 2
GRID = (5, 7)


def make_model(preset="lkca_t", **overrides):
  options = dict(dim=8, depth=1, num_heads=2)
  options.update(overrides)
  model = models.create_model(
    preset,
    num_classes=3,
    image_size=IMAGE,
    channels=2,
    patch_size=PATCH,
    rngs=nnx.Rngs(0),
    **options,
  )
  model.eval()
  return model


def images(count=6, seed=0):
  return np.random.default_rng(seed).normal(size=(count, *IMAGE, 2)).astype(np.float32)


def single_tap(shape, offset, value=1.0):
  """A (…, 2h−1, 2w−1) kernel that is `value` at key offset (Δrow, Δcol) = offset, else 0."""
  kernel = np.zeros(shape, np.float32)
  kernel[..., GRID[0] - 1 + offset[0], GRID[1] - 1 + offset[1]] = value
  return kernel


def brute_force_mean_distance(grid):
  cells = list(itertools.product(range(grid[0]), range(grid[1])))
  pairs = list(itertools.product(cells, cells))
  return sum(math.dist(p, q) for p, q in pairs) / len(pairs)


def patch_mask(row, col):
  mask = np.zeros(IMAGE, bool)
  mask[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = True
  return mask


@nnx.jit
def blocks_and_forward(model, x):
  """run_blocks (with attention), ViT.classify of its tokens, and the model's own forward pass.

  One compiled program instead of two eager passes of many small ops; XLA may merge the two
  passes only where they compute the same thing.
  """
  tokens, num_prefix, weights = analysis.run_blocks(model, x, attention=True)
  return tokens, num_prefix, weights, model.classify(tokens), model(x)


@pytest.mark.parametrize("preset", ["lkca_t", "vit_1m", "acmix_t", "flatten_t"])
def test_run_blocks_then_pooling_is_the_models_forward_pass(preset):
  model = make_model(preset, depth=2)
  tokens, num_prefix, weights, logits, forward = blocks_and_forward(model, jnp.asarray(images()))
  assert num_prefix == (1 if preset == "vit_1m" else 0)
  assert tokens.shape == (6, num_prefix + 35, 8)
  assert_reordered(logits, forward, chain_terms(model))
  assert sorted(weights) == ([] if preset == "lkca_t" else [0, 1])
  assert all(w.shape == (6, 2, 35, 35) for w in weights.values())  # patch tokens only


def test_with_a_class_token_each_mixers_weights_cover_the_patch_tokens_it_mixes():
  # MHSA mixes the class token too: its patch rows lose the class token's share. The grid
  # mixers see the patch tokens alone, so their softmax rows keep all of it.
  model = make_model("vit_1m", depth=3, mixer=["mhsa", "acmix", "flatten"], pool="cls")
  *_, weights, _, _ = blocks_and_forward(model, jnp.asarray(images()))
  sums = {i: np.asarray(w, np.float64).sum(axis=-1) for i, w in weights.items()}
  assert sorted(sums) == [0, 1, 2] and all(s.shape == (6, 2, 35) for s in sums.values())
  assert sums[0].max() < 1 - 1e-3
  assert_reordered(sums[1], np.ones_like(sums[1]), 2 * 35)
  assert (sums[2] <= 1 + 2 * 35 * 2.0**-24).all()
  distances = analysis.attention_distances(model, images(2))
  assert [distances[i]["mixer"] for i in range(3)] == ["mhsa", "acmix", "flatten"]
  assert all(len(distances[i]["per_unit"]) == 2 for i in range(3))


@pytest.mark.parametrize("offset", [(2, -1), (0, 3), (-1, 0)])
def test_single_tap_kernel_has_the_taps_distance(offset):
  model = make_model()
  mixer = model.blocks[0].mixer
  mixer.kernel[...] = jnp.asarray(single_tap(mixer.kernel[...].shape, offset, -0.7))
  expected = math.hypot(*offset)
  per_query = analysis.attention_distance_per_query(analysis.lkca_attention(model)[0], GRID)
  rows, cols = np.divmod(np.arange(35), 7)
  inside = (
    (0 <= rows + offset[0])
    & (rows + offset[0] < 5)
    & (0 <= cols + offset[1])
    & (cols + offset[1] < 7)
  )
  np.testing.assert_allclose(per_query[inside], expected, rtol=1e-12)
  assert np.isnan(per_query[~inside]).all()  # its one key is off the grid
  result = analysis.attention_distances(model)
  assert list(result) == [0] and result[0]["mixer"] == "lkca"
  assert result[0]["mean"] == pytest.approx(expected)


def test_per_head_kernels_give_per_head_distances():
  model = make_model(mixer_options={"lkca": {"kernel_sharing": "head"}})
  mixer = model.blocks[0].mixer
  kernel = np.concatenate([single_tap((1, 9, 13), (1, 1)), single_tap((1, 9, 13), (0, -3))])
  mixer.kernel[...] = jnp.asarray(kernel)
  result = analysis.attention_distances(model)[0]
  np.testing.assert_allclose(result["per_unit"], [math.sqrt(2), 3.0])
  assert result["mean"] == pytest.approx((math.sqrt(2) + 3) / 2)


def test_lkca_kernels_and_attention_views_are_the_parameters():
  model = make_model("lkca_t", depth=2)
  kernel = np.random.default_rng(2).normal(size=(9, 13)).astype(np.float32)
  model.blocks[1].mixer.kernel[...] = jnp.asarray(kernel)
  kernels = analysis.lkca_kernels(model)
  assert sorted(kernels) == [0, 1] and not kernels[0].any()
  np.testing.assert_array_equal(kernels[1], kernel)
  view = analysis.lkca_attention(model)[1]
  assert view.shape == (35, 35)
  # A[(i,j),(p,q)] = K[h−1+p−i, w−1+q−j]: query (1, 2), key (3, 0).
  assert view[1 * 7 + 2, 3 * 7 + 0] == kernel[4 + 2, 6 - 2]


def test_single_tap_erf_sits_where_the_tap_points():
  model = make_model()
  mixer = model.blocks[0].mixer
  offset = (1, -2)
  mixer.kernel[...] = jnp.asarray(single_tap(mixer.kernel[...].shape, offset, 1.5))
  erf = analysis.effective_receptive_field(model, images(5))
  assert erf.shape == IMAGE
  row, col = analysis.centre_token(GRID)
  assert (row, col) == (2, 3)
  centre, tapped = patch_mask(row, col), patch_mask(row + offset[0], col + offset[1])
  assert not erf[~(centre | tapped)].any()
  assert erf[centre].min() > 0 and erf[tapped].min() > 0


def test_zero_kernel_lkca_at_init_sees_only_the_centre_patch():
  model = make_model(depth=2)  # LKCA kernels start at zero
  erf = analysis.effective_receptive_field(model, images(4))
  centre = patch_mask(*analysis.centre_token(GRID))
  assert not erf[~centre].any() and erf[centre].min() > 0
  squares = analysis.erf_squares(erf, PATCH)
  assert list(squares) == list(analysis.ERF_THRESHOLDS)
  for square in squares.values():
    assert square["side"] == PATCH and square["fraction"] == pytest.approx(1.0)
    assert square["area_fraction"] == pytest.approx(PATCH**2 / (IMAGE[0] * IMAGE[1]))


def test_mhsa_erf_at_init_reaches_every_patch():
  erf = analysis.effective_receptive_field(make_model("vit_1m"), images(3))
  assert erf.min() > 0


def test_uniform_mhsa_attention_has_the_grids_mean_pairwise_distance():
  model = make_model("vit_1m", depth=2)
  for block in model.blocks:
    block.mixer.qkv.kernel[...] = jnp.zeros_like(block.mixer.qkv.kernel[...])
  attention = analysis.mean_attention_weights(model, images(5), batch_size=2)
  assert sorted(attention) == [0, 1]
  for weights in attention.values():
    assert weights.shape == (2, 35, 35)
    np.testing.assert_allclose(weights, 1 / 36, rtol=1e-6)  # class token dropped
  expected = brute_force_mean_distance(GRID)
  assert analysis.uniform_attention_distance(GRID) == pytest.approx(expected)
  result = analysis.attention_distances(model, attention=attention)
  for layer in result.values():
    assert layer["mixer"] == "mhsa"
    np.testing.assert_allclose(layer["per_unit"], expected)
  # From images directly, the same.
  assert analysis.attention_distances(model, images(2))[1]["mean"] == pytest.approx(expected)


def test_mean_attention_is_an_average_over_images():
  model = make_model("vit_1m")
  x = images(5)
  both = analysis.mean_attention_weights(model, x, batch_size=3)[0]  # batches of 3 and 2
  *_, weights, _, _ = blocks_and_forward(model, jnp.asarray(x))
  each = np.asarray(weights[0])  # per image, class token dropped
  np.testing.assert_allclose(both, each.mean(axis=0), atol=1e-6)
  one = analysis.mean_attention_weights(model, x[:1])[0]
  np.testing.assert_allclose(one, each[0], atol=1e-6)


def brute_force_square(erf, top, left, p, t):
  """Smallest k with the clipped square [top−k, top+p+k) × [left−k, left+p+k) holding ≥ t."""
  for k in itertools.count():
    inside = erf[max(top - k, 0) : top + p + k, max(left - k, 0) : left + p + k].sum()
    if inside >= t * erf.sum():
      return p + 2 * k


@pytest.mark.parametrize("shape,p", [((9, 9), 1), ((8, 8), 1), ((12, 16), 4)])
def test_erf_squares_match_brute_force_and_grow_with_t(shape, p):
  rng = np.random.default_rng(3)
  for erf in (np.ones(shape), rng.random(shape) ** 4):
    squares = analysis.erf_squares(erf, p)
    row, col = analysis.centre_token((shape[0] // p, shape[1] // p))
    sides = [squares[t]["side"] for t in analysis.ERF_THRESHOLDS]
    assert sides == [
      brute_force_square(erf, row * p, col * p, p, t) for t in analysis.ERF_THRESHOLDS
    ]
    assert sides == sorted(sides)
    for t in analysis.ERF_THRESHOLDS:
      assert squares[t]["fraction"] >= t
  # Uniform 9 x 9, centre pixel: squares 1, 3, 5, ... hold s² / 81.
  sides = [v["side"] for v in analysis.erf_squares(np.ones((9, 9)), 1).values()]
  assert sides == [5, 5, 7, 9]  # 25/81 ≥ .2, .3; 49/81 ≥ .5; 81/81 ≥ .99


def test_erf_squares_of_an_empty_map_are_none():
  assert all(v is None for v in analysis.erf_squares(np.zeros((4, 4)), 1).values())
