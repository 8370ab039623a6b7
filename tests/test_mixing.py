"""CutMix / Mixup: the mixed pixels, λ, how often each happens, and a batch mixed in groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lkca_jax.mixing import PARTNERS, beta, check_groups, cutmix_box, mix_batch, mix_group

ALWAYS = dict(prob=1.0, cutmix_alpha=1.0, mixup_alpha=1.0)


def _batch(n=16, size=12):
  images = jnp.arange(n, dtype=jnp.float32)[:, None, None, None] * jnp.ones((n, size, size, 3))
  return images, jnp.arange(n, dtype=jnp.int32)


def test_cutmix_pixels_and_lambda_follow_the_box():
  images, labels = _batch()
  for seed in range(20):
    out, ya, yb, lam = mix_group(jax.random.key(seed), images, labels, cutmix_prob=1.0, **ALWAYS)
    out, ya, yb, lam = map(np.asarray, (out, ya, yb, lam))
    np.testing.assert_array_equal(ya, np.arange(16))
    # Every image holds only its own value and its partner's (each image's value is its label).
    from_partner = out[..., 0] == yb[:, None, None]
    own = out[..., 0] == ya[:, None, None]
    assert np.all(from_partner | own)
    moved = np.where(ya != yb)[0]
    if moved.size:
      area = from_partner[moved[0]].mean()
      assert lam == pytest.approx(1.0 - area, abs=1e-6)
      # The pasted region is one axis-aligned rectangle.
      rows, cols = np.nonzero(from_partner[moved[0]])
      if rows.size:
        assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixup_is_the_convex_combination():
  images, labels = _batch()
  out, ya, yb, lam = mix_group(jax.random.key(3), images, labels, cutmix_prob=0.0, **ALWAYS)
  expected = lam * np.asarray(ya, np.float32) + (1 - lam) * np.asarray(yb, np.float32)
  np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], expected, rtol=1e-6)
  assert 0.0 < float(lam) < 1.0


def test_reversed_partners_are_the_batch_backwards():
  """timm's Mixup pairs image i with image B - 1 - i, for CutMix and Mixup alike; the
  middle image of an odd batch is its own partner."""
  images, labels = _batch(15)
  for cutmix_prob in (0.0, 1.0):
    out, ya, yb, lam = mix_group(
      jax.random.key(1), images, labels, cutmix_prob=cutmix_prob, partner="reversed", **ALWAYS
    )
    np.testing.assert_array_equal(yb, np.arange(15)[::-1])
    # Exact for CutMix; Mixup's λ·x + (1 − λ)·x is x within its four float32 roundings
    # (of 1 − λ, the two products and the sum): at most 3·2⁻²⁴·x in all.
    np.testing.assert_allclose(np.asarray(out)[7], np.asarray(images)[7], rtol=4 * 2.0**-24)
    assert float(lam) < 1.0


def test_the_partner_rule_changes_only_the_partners():
  """The same key gives the same decisions, λ and box under either rule, so switching the
  rule compares pairings alone."""
  images, labels = _batch()
  for seed in range(8):
    key = jax.random.key(seed)
    by_rule = {
      p: mix_group(
        key, images, labels, prob=0.5, cutmix_prob=0.5, cutmix_alpha=1.0, mixup_alpha=0.8, partner=p
      )
      for p in PARTNERS
    }
    (out_p, _, yb_p, lam_p), (out_r, _, yb_r, lam_r) = by_rule.values()
    assert float(lam_p) == float(lam_r)
    mixed_p, mixed_r = np.asarray(out_p) != np.asarray(images), np.asarray(out_r) != images
    moved_p, moved_r = np.asarray(yb_p) != labels, np.asarray(yb_r) != labels
    # Where an image's partner differs from itself, the mixed pixels are the same pixels.
    both = moved_p & moved_r
    np.testing.assert_array_equal(mixed_p[both], mixed_r[both])


def test_an_unknown_partner_rule_is_refused():
  images, labels = _batch()
  with pytest.raises(ValueError, match="permutation, reversed"):
    mix_group(jax.random.key(0), images, labels, cutmix_prob=0.5, partner="flip", **ALWAYS)


def test_each_group_of_rows_is_mixed_as_a_batch_of_its_own():
  """groups=G: rows g, g + G, … (what a distributed sampler deals process g) are one batch,
  mixed as `mix_group` mixes one with the key split(key, G)[g]: partners only within the
  group (reversed: row g + G·k with g + G·(n − 1 − k)), and its own decisions, λ and box."""
  images, labels = _batch(24)
  for cutmix_prob in (0.0, 1.0):
    key = jax.random.key(5)
    out, ya, yb, lam = mix_batch(
      key, images, labels, groups=4, cutmix_prob=cutmix_prob, partner="reversed", **ALWAYS
    )
    assert lam.shape == (24,)
    np.testing.assert_array_equal(ya, np.arange(24))
    rows = np.arange(24).reshape(6, 4)  # rows[k, g] = g + 4k
    np.testing.assert_array_equal(np.asarray(yb).reshape(6, 4), rows[::-1])
    for g, group_key in enumerate(jax.random.split(key, 4)):
      alone = mix_group(
        group_key,
        images[g::4],
        labels[g::4],
        cutmix_prob=cutmix_prob,
        partner="reversed",
        **ALWAYS,
      )
      np.testing.assert_array_equal(np.asarray(out)[g::4], alone[0])
      np.testing.assert_array_equal(np.asarray(lam)[g::4], float(alone[3]))
    assert len(np.unique(np.asarray(lam))) == 4  # four groups, four draws of λ


def test_one_group_is_the_whole_batch_mixed_once():
  images, labels = _batch()
  key = jax.random.key(2)
  out, ya, yb, lam = mix_batch(key, images, labels, cutmix_prob=0.5, **ALWAYS)
  alone = mix_group(key, images, labels, cutmix_prob=0.5, **ALWAYS)
  for got, want in zip((out, ya, yb), alone[:3], strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(lam, np.full(16, float(alone[3]), np.float32))


def test_groups_that_do_not_divide_the_batch_are_refused():
  with pytest.raises(ValueError, match="mixing.groups=5 does not divide the batch of 16"):
    check_groups(16, 5)
  images, labels = _batch()
  with pytest.raises(ValueError, match="set --config.mixing.groups to a divisor of 16"):
    mix_batch(jax.random.key(0), images, labels, groups=3, cutmix_prob=0.5, **ALWAYS)


def test_clean_batches_are_untouched():
  images, labels = _batch()
  out, ya, yb, lam = mix_group(
    jax.random.key(0), images, labels, prob=0.0, cutmix_prob=0.5, cutmix_alpha=1.0, mixup_alpha=1.0
  )
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(ya, yb)
  assert float(lam) == 1.0


def test_mixing_rates_match_the_recipe():
  """Half the batches are mixed; of those, half CutMix (a λ of pure box area) and half Mixup."""
  images, labels = _batch(8, 8)
  fn = jax.jit(
    jax.vmap(
      lambda k: mix_group(
        k, images, labels, prob=0.5, cutmix_prob=0.5, cutmix_alpha=1.0, mixup_alpha=1.0
      )
    )
  )
  n = 4000
  out, _, _, lam = fn(jax.random.split(jax.random.key(0), n))
  out, lam = np.asarray(out), np.asarray(lam)
  mixed = lam < 1.0
  # A mixed batch with λ = 1 is possible only for an empty CutMix box, which is rare.
  # 5 sigma of a binomial(4000, 0.5) is 0.04.
  assert abs(mixed.mean() - 0.5) < 0.045
  # Mixup makes non-integer pixel values; CutMix never does.
  is_mixup = np.any(out != np.round(out), axis=(1, 2, 3, 4))
  assert abs(is_mixup[mixed].mean() - 0.5) < 0.06
  # λ ~ Beta(1, 1) = U(0, 1) for Mixup.
  assert abs(np.mean(lam[is_mixup]) - 0.5) < 0.05


def test_cutmix_box_area_tracks_lambda_and_stays_inside():
  for seed, lam in enumerate([0.1, 0.5, 0.9]):
    y0, y1, x0, x1 = map(int, cutmix_box(jax.random.key(seed), 32, 32, jnp.float32(lam)))
    assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
  # Centred boxes (no clipping) cover ≈ (1 − λ) of the image.
  areas = []
  for seed in range(200):
    y0, y1, x0, x1 = map(int, cutmix_box(jax.random.key(seed), 64, 64, jnp.float32(0.75)))
    if y0 > 0 and x0 > 0 and y1 < 64 and x1 < 64:
      areas.append((y1 - y0) * (x1 - x0) / 64**2)
  assert areas and abs(np.mean(areas) - 0.25) < 0.02


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.8, 0.8), (2.0, 5.0), (30.0, 30.0)])
def test_beta_draws_follow_the_beta_distribution(a, b):
  """One-sample Kolmogorov-Smirnov test of 20,000 draws against SciPy's Beta(a, b): an exact
  sampler fails it with probability 1e-6. 0.8 takes the boost below shape 1 (Mixup's
  alpha in the paper's recipe), 1.0 the worst acceptance, 30 a narrow peak."""
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: beta(k, a, b)))(keys), np.float64)
  assert np.all((draws > 0) & (draws < 1))
  assert scipy.stats.kstest(draws, scipy.stats.beta(a, b).cdf).pvalue > 1e-6


def _has_loop_on_gpu(fn, *args) -> bool:
  # For the CPU, threefry itself lowers to a loop of fixed trip count; for a GPU, unrolled.
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  return "stablehlo.while" in exported.mlir_module()


def test_mixing_draws_with_no_loop_a_gpu_would_run_trip_by_trip():
  """A GPU reads a while loop's condition back to the host on every trip; jax.random.beta
  loops until its rejection test accepts, the mixing's draws do not."""
  key = jax.random.key(0)
  assert _has_loop_on_gpu(lambda k: jax.random.beta(k, 1.0, 1.0), key)  # what this test can see
  assert not _has_loop_on_gpu(lambda k: beta(k, 0.8, 0.8), key)
  images, labels = _batch()
  for groups in (1, 4):
    assert not _has_loop_on_gpu(
      lambda k, g=groups: mix_batch(k, images, labels, groups=g, cutmix_prob=0.5, **ALWAYS), key
    )
