"""RandAugment as timm's `rand-…-inc1` (DeiT's): each of its 15 ops at its level against
timm's op done with PIL, the draws' distributions, the ops applied in turn, its string.

timm's level functions (timm/data/auto_augment.py) are written out below in float64 from
their published form; the comparison tolerances are those of tests/augment/test_ops.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from configs import imagenet
from lkca_jax import config_checks
from lkca_jax.augment import AugmentConfig, augment_batch, randaugment
from tests.augment.test_ops import WIDE, assert_bicubic_matches, pil_rotation_matrix

FILL = (124, 116, 104)  # timm's fill for ImageNet's mean colour
ENHANCERS = {
  "ColorIncreasing": ImageEnhance.Color,
  "ContrastIncreasing": ImageEnhance.Contrast,
  "BrightnessIncreasing": ImageEnhance.Brightness,
  "SharpnessIncreasing": ImageEnhance.Sharpness,
}
AFFINE = {  # timm's PIL matrix of each op at level v on a (width, height) image
  "ShearX": lambda v, w, h: (1, v, 0, 0, 1, 0),
  "ShearY": lambda v, w, h: (1, 0, 0, v, 1, 0),
  "TranslateXRel": lambda v, w, h: (1, 0, v * w, 0, 1, 0),
  "TranslateYRel": lambda v, w, h: (1, 0, 0, 0, 1, v * h),
}
SIGNED_RANGE = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3}
SIGNED_RANGE |= {"TranslateXRel": 0.45, "TranslateYRel": 0.45}


def _point(image, table):
  return image.point(table * len(image.getbands()))


def timm_op(name: str, image: Image.Image, m: float, negative: bool) -> Image.Image:
  """timm's op `name` at magnitude m (its increasing level functions, float64), with PIL."""
  f = m / 10.0
  sign = -1.0 if negative else 1.0
  if name in ("AutoContrast", "Equalize", "Invert"):
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
            "Invert": ImageOps.invert}[name](image)  # fmt: skip
  if name == "PosterizeIncreasing":  # bits 4 - int(4 f); 0 bits: black (recent PIL refuses 0)
    mask = ~(2 ** (8 - (4 - int(f * 4))) - 1) & 255
    return _point(image, [i & mask for i in range(256)])
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(image, 256 - int(f * 256))
  if name == "SolarizeAdd":
    add = int(f * 110)
    return _point(image, [min(255, i + add) if i < 128 else i for i in range(256)])
  if name in ENHANCERS:
    return ENHANCERS[name](image).enhance(max(0.1, 1.0 + sign * f * 0.9))
  value = sign * f * SIGNED_RANGE[name]
  if name == "Rotate":
    return image.rotate(value, resample=Image.BICUBIC, fillcolor=FILL)
  matrix = AFFINE[name](value, *image.size)
  return image.transform(image.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=FILL)


def timm_matrix(name, image, m, negative):
  """The PIL AFFINE matrix of timm's geometric op (Rotate's as PIL's rotate builds it)."""
  height, width = image.shape[:2]
  value = (-1.0 if negative else 1.0) * m / 10.0 * SIGNED_RANGE[name]
  if name == "Rotate":
    return pil_rotation_matrix(value, width, height)
  return AFFINE[name](value, width, height)


@pytest.mark.parametrize("name", randaugment.OP_NAMES)
def test_each_op_is_timms_op_at_its_level(name):
  """Whole magnitudes 0 … 10, both signs: the colour ops equal PIL's exactly (AutoContrast
  within 1 on at most 1% of values, PIL's own rounding: test_ops); the geometric ones
  within float32's truncation bound (test_ops.assert_bicubic_matches)."""
  index = randaugment.OP_NAMES.index(name)
  geometric = name in SIGNED_RANGE
  for m in (0, 3, 5, 7, 9, 10):
    for negative in (False, True):
      for image in WIDE:
        ours = np.asarray(randaugment.apply_op(image, index, m, negative, FILL))
        theirs = np.asarray(timm_op(name, Image.fromarray(image), m, negative))
        if geometric:
          assert_bicubic_matches(ours, theirs, image, timm_matrix(name, image, m, negative))
        elif name == "AutoContrast":
          diff = np.abs(ours.astype(int) - theirs)
          assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01
        else:
          np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} m={m} {negative=}")


def test_an_op_not_applied_leaves_the_image():
  image = WIDE[0]
  out = randaugment.apply_op(image, randaugment.IDENTITY, 9.0, False, FILL)
  np.testing.assert_array_equal(np.asarray(out), image)


def _draws(spec: str, count: int):
  keys = jax.random.split(jax.random.key(11), count)
  indices, magnitudes, negative = jax.vmap(lambda k: randaugment.draw(k, randaugment.parse(spec)))(
    keys
  )
  return np.asarray(indices), np.asarray(magnitudes), np.asarray(negative)


def _within_5_sigma(count, total, probability):
  return abs(count - total * probability) <= 5 * math.sqrt(total * probability * (1 - probability))


def test_draws_follow_timms_distributions():
  """Two ops an image, each of the 15 with chance 1/15 and with replacement (both the same
  one in 1/15 of images), each applied with chance 0.5, its magnitude N(9, 0.5) clipped to
  [0, 10], its sign a fair coin: counts within 5 sigma, the magnitudes by Kolmogorov-Smirnov
  against the clipped normal."""
  count = 20000
  indices, magnitudes, negative = _draws("rand-m9-mstd0.5-inc1", count)
  assert indices.shape == magnitudes.shape == negative.shape == (count, 2)
  applied = indices != randaugment.IDENTITY
  assert _within_5_sigma(applied.sum(), 2 * count, 0.5)
  # Which op a draw picked shows where it was applied.
  picked = indices[applied]
  for op in range(len(randaugment.OPS)):
    assert _within_5_sigma(np.sum(picked == op), picked.size, 1 / 15), randaugment.OP_NAMES[op]
  both = applied.all(axis=1)
  assert _within_5_sigma(np.sum(indices[both, 0] == indices[both, 1]), both.sum(), 1 / 15)
  assert _within_5_sigma(negative.sum(), 2 * count, 0.5)
  m = magnitudes.ravel()
  assert m.max() == 10.0 and m.min() >= 0.0
  assert _within_5_sigma(np.sum(m == 10.0), m.size, stats.norm.sf(2.0))  # 9 + 2 sigma
  below = m[m < 10.0]
  clipped_normal = lambda x: stats.norm.cdf(x, 9, 0.5) / stats.norm.cdf(10.0, 9, 0.5)  # noqa: E731
  assert stats.kstest(below, clipped_normal).pvalue > 1e-4


def test_a_fixed_magnitude_is_used_as_given_and_mmax_clips():
  _, magnitudes, _ = _draws("rand-m7-n3-inc1", 100)
  assert magnitudes.shape == (100, 3) and np.all(magnitudes == 7.0)
  _, magnitudes, _ = _draws("rand-m9-mstd5-mmax12-inc1", 2000)
  assert magnitudes.max() == 12.0 and magnitudes.min() == 0.0


def test_an_image_goes_through_its_drawn_ops_in_turn():
  augment = randaugment.parse("rand-m9-mstd0.5-inc1")
  image = WIDE[1]
  for key in jax.random.split(jax.random.key(3), 6):
    expected = image
    for op in zip(*randaugment.draw(key, augment), strict=True):
      expected = randaugment.apply_op(expected, *op, FILL)
    got = randaugment.apply(key, image, augment, FILL)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_deits_string_is_timms_setting():
  assert randaugment.parse("rand-m9-mstd0.5-inc1") == randaugment.RandAugment(
    magnitude=9, num_ops=2, magnitude_std=0.5, magnitude_max=10.0, probability=0.5
  )
  assert randaugment.parse("rand-n3-mmax12-m7-inc1") == randaugment.RandAugment(
    magnitude=7, num_ops=3, magnitude_max=12.0
  )
  assert randaugment.parse("rand-inc1").magnitude == 10  # timm's default magnitude
  assert randaugment.mean_fill((0.485, 0.456, 0.406)) == FILL


@pytest.mark.parametrize(
  "spec, message",
  [
    ("rand-m9", "end it with -inc1"),  # timm's other ops: not offered
    ("rand-m9-inc0", "end it with -inc1"),
    ("rand-m9.5-inc1", "m, n and mmax are integers"),
    ("rand-w0-m9-inc1", "bad section 'w0'"),  # timm's op weights: not offered
    ("rand-m9-m8-inc1", "bad section 'm8'"),
    ("rand-m9-n0-inc1", "needs n >= 1"),
    ("rand-m9-mstd101-inc1", "uniform magnitudes"),
    ("augmix-m9", "a RandAugment is rand-m<M>"),
  ],
)
def test_a_string_this_cannot_follow_is_refused_naming_the_form(spec, message):
  with pytest.raises(ValueError, match=message):
    randaugment.parse(spec)


def test_the_imagenet_config_runs_deits_randaugment_and_a_bad_one_is_one_error():
  config = imagenet.get_config()
  config_checks.validate(config)
  cfg = AugmentConfig.from_config(config.augment, mean=config.dataset.mean, std=config.dataset.std)
  assert cfg.policy_name == "RandAugment" and cfg.autoaugment == "rand-m9-mstd0.5-inc1"
  images = jnp.asarray(np.stack(WIDE[:2]))
  assert augment_batch(jax.random.key(0), images, cfg).shape == (2, 48, 64, 3)
  config.augment.autoaugment = "rand-m9-inc0"
  with pytest.raises(config_checks.ConfigError, match=r"augment.autoaugment must be .*rand-m<M>"):
    config_checks.validate(config)
