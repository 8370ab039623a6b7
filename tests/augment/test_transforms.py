"""The composed per-image augmentation and eval normalisation (docs/method.md).

Statistical checks use fixed keys and 5-sigma bounds (a correct sampler
fails with probability ~1e-6 per bound; an off-by-one range, a wrong
probability or a uniform-instead-of-log-uniform draw moves counts by tens
of sigmas). The erasing box is checked against its definition in the reference
(aspect uniform in [0.3, 1/0.3], so 3 boxes in 4 taller than wide; up to 100
attempts; the dataset mean written into the normalised image), and the
log-uniform option against a float64 numpy simulation of torchvision's
RandomErasing.get_params (10 attempts, then give up).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from lkca_jax import augment, backend
from lkca_jax.augment import autoaugment
from tests.helpers import fixture_images

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _load(count):
  """count 32x32 RGB crops of fixture JPEGs, and the grey JPEGs' crops."""
  rgb, grey = fixture_images()
  rgb = [image[16:48, 16:48] for image in rgb]
  grey = [image[16:48, 16:48] for image in grey]
  return np.stack(rgb[::7][:count]), np.stack(grey)


IMAGES, GREY = _load(8)
# The full recipe; one mean / std for all channels so that grey images (C = 1)
# share it (normalisation per channel is tested on its own below).
FULL = augment.AugmentConfig(
  mean=(0.45,), std=(0.25,), flip=True, crop_padding=4, autoaugment="cifar10", random_erasing=0.25
)
# The same with DeiT's RandAugment in AutoAugment's place.
FULL_RAND = dataclasses.replace(FULL, autoaugment="rand-m9-mstd0.5-inc1")


def _within_5_sigma(count, total, probability):
  sigma = math.sqrt(total * probability * (1 - probability))
  return abs(count - total * probability) <= 5 * sigma


@pytest.fixture(scope="module")
def augment_one():
  return jax.jit(augment.augment_image, static_argnames="cfg")  # compiled per shape


@pytest.fixture(scope="module")
def augment_many():
  return jax.jit(augment.augment_batch, static_argnames="cfg")


@pytest.mark.parametrize("cfg", [FULL, FULL_RAND], ids=["autoaugment", "randaugment"])
def test_eager_jit_and_vmap_agree_exactly(augment_one, augment_many, cfg):
  rng = jax.random.key(2024)
  keys = jax.random.split(rng, len(IMAGES))
  eager = np.stack([augment.augment_image(k, im, cfg) for k, im in zip(keys, IMAGES, strict=True)])
  jitted = np.stack([augment_one(k, im, cfg=cfg) for k, im in zip(keys, IMAGES, strict=True)])
  batched = np.asarray(augment_many(rng, IMAGES, cfg=cfg))
  with backend.forms("plain"):  # AutoAugment as GPUs and TPUs run it: one vmapped select
    selected = np.asarray(jax.jit(augment.augment_batch, static_argnames="cfg")(rng, IMAGES, cfg))
  assert eager.shape == batched.shape == (8, 32, 32, 3)
  assert eager.dtype == batched.dtype == np.float32
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(eager, batched)
  np.testing.assert_array_equal(eager, selected)
  clean = np.asarray(augment.normalize(IMAGES, cfg.mean, cfg.std))
  assert all(not np.array_equal(a, c) for a, c in zip(eager, clean, strict=True))  # all augmented
  assert len({a.tobytes() for a in eager}) == 8  # per-image keys differ


@pytest.mark.parametrize("cfg", [FULL, FULL_RAND], ids=["autoaugment", "randaugment"])
def test_each_platform_lowers_only_its_own_autoaugment_form(cfg):
  # The per-image loop where the batch is lowered for the CPU, the vmapped select for
  # GPUs and TPUs: the CPU form's name scope is in the first module only.
  def lowered(platform):
    fn = jax.jit(lambda rng, images: augment.augment_batch(rng, images, cfg))
    exported = jax.export.export(fn, platforms=[platform])
    return exported(jax.random.key(0), IMAGES).mlir_module()

  assert backend.CPU_SCOPE in lowered("cpu")
  for platform in ("cuda", "tpu"):
    assert backend.CPU_SCOPE not in lowered(platform)


@pytest.mark.parametrize("cfg", [FULL, FULL_RAND], ids=["autoaugment", "randaugment"])
def test_grey_images_go_through_the_same_steps(augment_one, cfg):
  # Every step commutes with copying one channel to three (Color is then the
  # identity, Contrast's grey level the value itself), so channel 0 of the
  # RGB result must equal the grey result for the same key.
  for index, key in enumerate(jax.random.split(jax.random.key(9), 6)):
    grey = GREY[index % len(GREY)][..., None]
    out = np.asarray(augment_one(key, grey, cfg=cfg))
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    rgb = np.asarray(augment_one(key, np.repeat(grey, 3, axis=-1), cfg=cfg))
    np.testing.assert_array_equal(out[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_steps_run_in_the_recipe_order():
  cfg = dataclasses.replace(FULL, random_erasing=1.0)
  for key in jax.random.split(jax.random.key(4), 3):
    flip_key, crop_key, policy_key, erase_key = jax.random.split(key, 4)
    image = augment.random_flip(flip_key, IMAGES[1])
    image = augment.random_crop(crop_key, image, 4)
    image = autoaugment.apply_policy(policy_key, image, "cifar10")
    expected = augment.random_erasing(
      erase_key,
      augment.normalize(image, cfg.mean, cfg.std),
      1.0,
      cfg.erasing_area,
      cfg.erasing_aspect,
      fill=cfg.mean,
    )
    np.testing.assert_array_equal(
      np.asarray(augment.augment_image(key, IMAGES[1], cfg)), np.asarray(expected)
    )


RECIPE_ORDER = ["flip", "crop", "autoaugment", "normalize", "random_erasing"]


def test_stages_are_listed_once_in_the_recipe_order():
  assert [stage.name for stage in augment.STAGES] == RECIPE_ORDER
  assert [stage.name for stage in augment.enabled_stages(FULL)] == RECIPE_ORDER
  off = augment.stages_off(FULL)
  assert (off.flip, off.crop_padding, off.autoaugment, off.random_erasing) == (False, 0, None, 0.0)
  assert (off.mean, off.std, off.erasing_area) == (FULL.mean, FULL.std, FULL.erasing_area)
  assert [stage.name for stage in augment.enabled_stages(off)] == ["normalize"]
  assert [stage.describe(FULL) for stage in augment.STAGES] == [
    "random flip",
    "pad-4 random crop",
    "AutoAugment (cifar10)",
    "normalise",
    "random erasing p=0.25",
  ]


@pytest.mark.parametrize("name", ["flip", "crop", "random_erasing"])
def test_each_stage_alone_runs_the_same_in_batch_and_per_image(name):
  # The batch path runs a stage on its own key slot, as augment_image does.
  stage = next(stage for stage in augment.STAGES if stage.name == name)
  cfg = stage.alone(FULL)
  assert [s.name for s in augment.enabled_stages(cfg)] == (
    ["normalize", name] if name == "random_erasing" else [name, "normalize"]
  )
  rng = jax.random.key(31)
  keys = jax.random.split(rng, len(IMAGES))
  single = np.stack([augment.augment_image(k, im, cfg) for k, im in zip(keys, IMAGES, strict=True)])
  np.testing.assert_array_equal(single, np.asarray(augment.augment_batch(rng, IMAGES, cfg)))
  clean = np.asarray(augment.normalize(IMAGES, cfg.mean, cfg.std))
  assert not np.array_equal(single, clean)  # the stage did something


def test_no_augmentation_is_normalisation():
  cfg = augment.AugmentConfig(mean=CIFAR_MEAN, std=CIFAR_STD)
  out = augment.augment_image(jax.random.key(0), IMAGES[0], cfg)
  np.testing.assert_array_equal(
    np.asarray(out), np.asarray(augment.normalize(IMAGES[0], CIFAR_MEAN, CIFAR_STD))
  )


def test_normalize_is_per_channel_and_standardises_a_known_image():
  images = IMAGES.astype(np.float64) / 255
  mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
  out = np.asarray(augment.normalize(IMAGES, tuple(mean), tuple(std)))
  assert out.shape == IMAGES.shape and out.dtype == np.float32
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-5)
  expected = (images - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
  np.testing.assert_allclose(augment.normalize(IMAGES, CIFAR_MEAN, CIFAR_STD), expected, atol=1e-5)
  # Half black, half white: x / 255 has mean 0.5 and std 0.5 exactly.
  two_tone = np.zeros((2, 4, 4, 3), np.uint8)
  two_tone[:, :2] = 255
  out = np.asarray(augment.normalize(two_tone, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
  np.testing.assert_array_equal(np.unique(out), [-1.0, 1.0])
  with pytest.raises(ValueError, match="uint8"):
    augment.normalize(images, CIFAR_MEAN, CIFAR_STD)
  with pytest.raises(ValueError, match="give 1 or 3"):
    augment.normalize(IMAGES, (0.5, 0.5), (0.5, 0.5))


def test_flip_happens_half_the_time():
  cfg = augment.AugmentConfig(mean=(0.0,), std=(1 / 255,), flip=True)
  image = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  draws = 20_000
  out = np.asarray(
    jax.jit(augment.augment_batch, static_argnames="cfg")(
      jax.random.key(1), np.broadcast_to(image, (draws, 2, 3, 1)), cfg=cfg
    )
  )
  flipped = (out == image[:, ::-1]).all(axis=(1, 2, 3))
  kept = (out == image).all(axis=(1, 2, 3))
  assert (flipped ^ kept).all()
  assert _within_5_sigma(flipped.sum(), draws, 0.5)


def test_crop_offsets_are_uniform_over_the_zero_padding():
  cfg = augment.AugmentConfig(mean=(0.0,), std=(1 / 255,), crop_padding=4)
  image = (np.arange(64, dtype=np.uint8) + 1).reshape(8, 8, 1)  # no zeros
  draws = 9_000
  out = np.asarray(
    jax.jit(augment.augment_batch, static_argnames="cfg")(
      jax.random.key(2), np.broadcast_to(image, (draws, 8, 8, 1)), cfg=cfg
    )
  )
  out = np.rint(out[..., 0]).astype(int)
  # Any non-zero output pixel (i, j) holding image[r, c] gives the window's
  # offset (r - i + 4, c - j + 4) in the padded image; then every crop must
  # be exactly that zero-padded window.
  first = (out.reshape(draws, -1) > 0).argmax(axis=1)
  i, j = np.divmod(first, 8)
  r, c = np.divmod(out.reshape(draws, -1)[np.arange(draws), first] - 1, 8)
  top, left = r - i + 4, c - j + 4
  padded = np.pad(image[..., 0], 4).astype(int)
  rows = top[:, None, None] + np.arange(8)[None, :, None]
  cols = left[:, None, None] + np.arange(8)[None, None, :]
  np.testing.assert_array_equal(out, padded[rows, cols])
  for offsets in (top, left):
    counts = np.bincount(offsets, minlength=9)
    assert len(counts) == 9  # offsets 0..8: shifts of -4..4 pixels
    assert all(_within_5_sigma(c, draws, 1 / 9) for c in counts), counts


def _torchvision_boxes(rng, count, height, width, area, aspect):
  """float64 numpy version of RandomErasing.get_params: (h, w) of the first of
  10 attempts that fits strictly inside, or (0, 0) when none does."""
  target = height * width * rng.uniform(*area, size=(count, 10))
  ratio = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), size=(count, 10)))
  h = np.round(np.sqrt(target * ratio)).astype(int)  # round half to even, as round()
  w = np.round(np.sqrt(target / ratio)).astype(int)
  fits = (h < height) & (w < width)
  first = fits.argmax(axis=1)
  rows = np.arange(count)
  return np.where(fits.any(axis=1)[:, None], np.stack([h[rows, first], w[rows, first]], axis=1), 0)


def test_log_uniform_erasing_box_matches_torchvision_random_erasing():
  # The old behaviour, kept as options: log-uniform aspect in [0.3, 3.3], 10 attempts.
  height = width = 224
  area, aspect, probability, draws = (0.02, 0.4), (0.3, 3.3), 0.25, 40_000
  box = jax.jit(
    jax.vmap(
      lambda k: augment.erasing_box(
        k, height, width, probability, area, aspect, sampling="log_uniform", attempts=10
      )
    )
  )
  erase, top, left, h, w = map(np.asarray, box(jax.random.split(jax.random.key(3), draws)))
  assert _within_5_sigma(erase.sum(), draws, probability)
  h, w, top, left = h[erase], w[erase], top[erase], left[erase]
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  assert (h >= 1).all() and (h < height).all() and (w < width).all()
  fraction = h * w / (height * width)
  log_aspect = np.log(h / w)
  # Rounding h and w moves the area by at most (h + w) / 2 + 1/4 pixels.
  slack = (h + w + 0.5) / 2 / (height * width)
  assert (fraction >= area[0] - slack).all() and (fraction <= area[1] + slack).all()
  assert (np.abs(log_aspect) <= math.log(3.3) + 0.1).all()

  # Below 1/3.3 every attempt fits, so there the area is exactly uniform.
  small = fraction[fraction < 0.3]
  counts = np.histogram(small, bins=14, range=(0.02, 0.3))[0]
  assert all(_within_5_sigma(c, len(small), 1 / 14) for c in counts), counts
  # Everywhere, both marginals match the torchvision simulation.
  reference = _torchvision_boxes(np.random.default_rng(0), 200_000, height, width, area, aspect)
  reference = reference[reference[:, 0] > 0]
  ref_fraction = reference[:, 0] * reference[:, 1] / (height * width)
  ref_log_aspect = np.log(reference[:, 0] / reference[:, 1])
  for ours, theirs, edges in (
    (fraction, ref_fraction, np.linspace(0.0, 0.42, 15)),
    (log_aspect, ref_log_aspect, np.linspace(-1.3, 1.3, 14)),
  ):
    _assert_histograms_agree(ours, theirs, edges)
  # Log-uniform on a range symmetric in log: tall and wide equally likely.
  taller = int((h > w).sum())
  assert _within_5_sigma(taller, int((h != w).sum()), 0.5)


def _assert_histograms_agree(ours, theirs, edges):
  expected = np.histogram(theirs, edges)[0] / len(theirs)
  counts = np.histogram(ours, edges)[0]
  assert counts.sum() == len(ours)
  for count, p in zip(counts, expected, strict=True):
    # 5 sigma of our count, plus 5 sigma of the reference's estimate of p.
    sigma = math.sqrt(len(ours) * p * (1 - p)) + len(ours) * math.sqrt(p * (1 - p) / len(theirs))
    assert abs(count - len(ours) * p) <= 5 * sigma + 1, (count, p)


def _reference_boxes(rng, count, height, width, area, aspect, attempts=100):
  """float64 numpy version of the reference trainer's RandomErasing: aspect uniform in
  `aspect`, the first of `attempts` boxes that fits strictly inside, else (0, 0)."""
  target = height * width * rng.uniform(*area, size=(count, attempts))
  ratio = rng.uniform(*aspect, size=(count, attempts))
  h = np.round(np.sqrt(target * ratio)).astype(int)
  w = np.round(np.sqrt(target / ratio)).astype(int)
  fits = (h < height) & (w < width)
  first = fits.argmax(axis=1)
  rows = np.arange(count)
  return np.where(fits.any(axis=1)[:, None], np.stack([h[rows, first], w[rows, first]], axis=1), 0)


def test_erasing_box_by_default_is_the_reference_one():
  # Uniform aspect in [0.3, 1/0.3], up to 100 attempts; a 32x32 image, as on CIFAR.
  height = width = 32
  area, probability, draws = (0.02, 0.4), 0.25, 40_000
  box = jax.jit(jax.vmap(lambda k: augment.erasing_box(k, height, width, probability, area)))
  erase, top, left, h, w = map(np.asarray, box(jax.random.split(jax.random.key(13), draws)))
  assert _within_5_sigma(erase.sum(), draws, probability)  # a fitting box is always found
  h, w, top, left = h[erase], w[erase], top[erase], left[erase]
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  assert (h >= 1).all() and (w >= 1).all() and (h < height).all() and (w < width).all()
  # Area fractions inside the range, up to rounding of h and w (< (h + w) / 2 + 1/4 pixels).
  fraction = h * w / (height * width)
  slack = (h + w + 0.5) / 2 / (height * width)
  assert (fraction >= area[0] - slack).all() and (fraction <= area[1] + slack).all()
  # Aspect inside [0.3, 1/0.3], up to rounding: h and w are each within 0.5 of the exact box.
  assert ((h + 0.5) / (w - 0.5) >= 0.3).all() and ((h - 0.5) / (w + 0.5) <= 1 / 0.3).all()
  # Uniform aspect: P(ratio > 1) = (1/0.3 - 1) / (1/0.3 - 0.3) = 0.769 before fitting and
  # rounding; the exact share under both comes from the simulation. Counted over boxes that
  # are not square, within a binomial 5 sigma.
  reference = _reference_boxes(
    np.random.default_rng(1), 200_000, height, width, area, (0.3, 1 / 0.3)
  )
  reference = reference[reference[:, 0] > 0]
  uneven = h != w
  ref_uneven = reference[:, 0] != reference[:, 1]
  share = float((reference[ref_uneven, 0] > reference[ref_uneven, 1]).mean())
  assert 0.74 < share < 0.8  # about three boxes in four are taller than wide
  taller = int((h[uneven] > w[uneven]).sum())
  assert _within_5_sigma(taller, int(uneven.sum()), share), (taller / uneven.sum(), share)
  # The whole distribution of (area, aspect) matches the reference simulation.
  ref_fraction = reference[:, 0] * reference[:, 1] / (height * width)
  _assert_histograms_agree(fraction, ref_fraction, np.linspace(0.0, 0.45, 10))
  _assert_histograms_agree(
    np.log(h / w), np.log(reference[:, 0] / reference[:, 1]), np.linspace(-1.4, 1.4, 12)
  )


def test_erasing_attempts_limit_how_often_a_box_is_found():
  # Large boxes on an 8x8 image often do not fit strictly inside (h and w must be <= 7): the
  # share of images erased follows the reference simulation with 1, 10 and 100 attempts.
  area, draws = (0.3, 0.9), 8_000
  keys = jax.random.split(jax.random.key(5), draws)
  found = []
  for attempts in (1, 10, 100):
    box = jax.jit(
      jax.vmap(lambda k, a=attempts: augment.erasing_box(k, 8, 8, 1.0, area, attempts=a))
    )
    found.append(int(np.asarray(box(keys)[0]).sum()))
    reference = _reference_boxes(
      np.random.default_rng(attempts), 100_000, 8, 8, area, (0.3, 1 / 0.3), attempts=attempts
    )
    p = float((reference[:, 0] > 0).mean())
    assert abs(found[-1] - draws * p) <= 5 * math.sqrt(draws * p * (1 - p)) + draws * 0.01
  assert found[0] < found[1] < found[2]


def test_random_erasing_fills_exactly_its_box():
  image = jnp.asarray(augment.normalize(IMAGES[2], CIFAR_MEAN, CIFAR_STD)) + 10.0  # no zeros
  for key in jax.random.split(jax.random.key(8), 5):
    erase, top, left, h, w = map(int, augment.erasing_box(key, 32, 32, 1.0))
    assert erase
    for fill, value in ((0.0, 0.0), (CIFAR_MEAN, np.float32(CIFAR_MEAN))):
      out = np.asarray(augment.random_erasing(key, image, 1.0, fill=fill))
      expected = np.asarray(image).copy()
      expected[top : top + h, left : left + w] = value
      np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(augment.random_erasing(jax.random.key(0), image, 0.0), image)


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_erasing_fill_writes_the_dataset_mean_into_the_normalised_image(fill):
  # The reference writes the mean values of [0, 1] images into the normalised image
  # (a lighter grey than the mean colour, which normalises to 0); "zero" writes 0.
  cfg = augment.stages_off(augment.AugmentConfig(mean=CIFAR_MEAN, std=CIFAR_STD))
  cfg = dataclasses.replace(cfg, random_erasing=1.0, erasing_fill=fill)
  image = IMAGES[3]
  clean = np.asarray(augment.normalize(image, CIFAR_MEAN, CIFAR_STD))
  for key in jax.random.split(jax.random.key(21), 4):
    out = np.asarray(augment.augment_image(key, image, cfg))
    erase_key = jax.random.split(key, augment.transforms.NUM_KEYS)[-1]  # the last keyed stage
    _, top, left, h, w = map(int, augment.erasing_box(erase_key, 32, 32, 1.0))
    box = np.zeros((32, 32), bool)
    box[top : top + h, left : left + w] = True
    expected = np.float32(CIFAR_MEAN) if fill == "mean" else np.zeros(3, np.float32)
    np.testing.assert_array_equal(out[box], np.broadcast_to(expected, (box.sum(), 3)))
    np.testing.assert_array_equal(out[~box], clean[~box])


def test_pixel_erasing_fills_its_box_with_standard_normal_noise():
  """timm's mode="pixel" (DeiT's): every value in the box drawn from N(0, 1) on its own, in
  the normalised image; outside the box the image is untouched."""
  cfg = augment.stages_off(augment.AugmentConfig(mean=CIFAR_MEAN, std=CIFAR_STD))
  cfg = dataclasses.replace(cfg, random_erasing=1.0, erasing_fill="pixel", erasing_area=(0.3, 0.4))
  image = IMAGES[5]
  clean = np.asarray(augment.normalize(image, CIFAR_MEAN, CIFAR_STD))
  noise = []
  for key in jax.random.split(jax.random.key(22), 8):
    out = np.asarray(augment.augment_image(key, image, cfg))
    erase_key = jax.random.split(key, augment.transforms.NUM_KEYS)[-1]
    _, top, left, h, w = map(int, augment.erasing_box(erase_key, 32, 32, 1.0, (0.3, 0.4)))
    box = np.zeros((32, 32), bool)
    box[top : top + h, left : left + w] = True
    np.testing.assert_array_equal(out[~box], clean[~box])
    noise.append(out[box].ravel())
  noise = np.concatenate(noise)
  # A value for each: float32 normals from 23 random bits repeat in ~n^2 / 2^24 pairs (~4).
  assert noise.size > 7000 and len(np.unique(noise)) > 0.99 * noise.size
  assert stats.kstest(noise, "norm").pvalue > 1e-4


def test_config_from_the_project_config():
  from configs import default

  config = default.get_config()
  cfg = augment.AugmentConfig.from_config(
    config.augment, mean=config.dataset.mean, std=config.dataset.std
  )
  assert cfg == augment.AugmentConfig(
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
    flip=True,
    crop_padding=4,
    autoaugment="cifar10",
    random_erasing=0.25,
    erasing_area=(0.02, 0.4),
    erasing_aspect=(0.3, 1 / 0.3),
    erasing_aspect_sampling="uniform",
    erasing_attempts=100,
    erasing_fill="mean",
  )
  # The reference erasing is also AugmentConfig's own default.
  assert cfg == augment.AugmentConfig(
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
    flip=True,
    crop_padding=4,
    autoaugment="cifar10",
    random_erasing=0.25,
  )
  hash(cfg)  # usable as a static jit argument


def test_bad_configs_are_rejected():
  good = ml_collections.ConfigDict(
    {
      "flip": True,
      "crop_padding": 4,
      "autoaugment": "svhn",
      "random_erasing": 0.25,
      "mean": [0.5] * 3,
      "std": [0.2] * 3,
    }
  )
  assert augment.AugmentConfig.from_config(good).mean == (0.5, 0.5, 0.5)
  assert augment.AugmentConfig.from_config(good, autoaugment=None).autoaugment is None
  with pytest.raises(ValueError, match="fliip"):
    augment.AugmentConfig.from_config(good, fliip=True)
  with pytest.raises(ValueError, match="mean"):
    augment.AugmentConfig.from_config({"flip": True})
  with pytest.raises(ValueError, match="cifar10"):
    augment.AugmentConfig.from_config(good, autoaugment="cifar100")
  for bad in (
    {"random_erasing": 1.5},
    {"erasing_area": (0.4, 0.02)},
    {"crop_padding": -1},
    {"std": (0.0, 0.1, 0.1)},
    {"mean": (0.5, 0.5)},
    {"erasing_aspect_sampling": "log"},
    {"erasing_attempts": 0},
    {"erasing_attempts": 2.5},
    {"erasing_fill": "grey"},
  ):
    with pytest.raises(ValueError):
      augment.AugmentConfig.from_config(good, **bad)
  with pytest.raises(ValueError, match="augment_batch"):
    augment.augment_image(jax.random.key(0), IMAGES, FULL)
