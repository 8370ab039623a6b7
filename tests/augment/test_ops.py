"""The 14 AutoAugment ops against PIL (colour) and independent numpy code (geometry).

Real images: Tiny-ImageNet JPEGs from the test fixture (RGB and the two
grayscale ones). Tolerances, per op, and why:
- Color, Contrast, Sharpness, Brightness, Posterize, Solarize, Invert,
  Equalize: exact. PIL's blend (float32, truncate) and LUTs are integer or
  emulated bit for bit.
- AutoContrast: |diff| <= 1 on at most 1% of values. PIL computes
  int(v * scale + offset) in float64 and sometimes lands just below a whole
  number that the exact floor((v - lo) 255 / (hi - lo)) reaches.
- ShearX/Y (bicubic): |diff| <= 1 on at most 0.5% of values. Float32 versus
  PIL's float64; a value PIL gets as 21.99999999999998 truncates to 21.
  Pixels whose sample point lies within 1e-5 px of the image edge are left
  out: there float32 and float64 disagree on inside versus fill (magnitudes
  2 and 6 put the point exactly on the edge of a few rows).
- TranslateX/Y, Rotate (nearest) against the float64 numpy inverse mapping:
  exact. Against PIL itself, rotate may differ on 0.5% of pixels (PIL maps
  coordinates in 16.16 fixed point, which moves a few nearest-pixel choices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from lkca_jax.augment import autoaugment, ops
from tests.helpers import fixture_images


def _load_fixture():
  rgb, grey = fixture_images()
  # 6 RGB images across the four classes. Non-square crops (48 x 64) catch a
  # swapped height and width, and one shape everywhere keeps compiles few.
  return [image[:48] for image in rgb[::13]], [image[:48] for image in grey]


RGB, GREY = _load_fixture()


def _pil_rgb(function):
  return [np.asarray(function(Image.fromarray(image))) for image in RGB]


def _ours(function, images=RGB):
  return [np.asarray(function(jnp.asarray(image))) for image in images]


def _assert_equal(ours, theirs):
  for mine, expected in zip(ours, theirs, strict=True):
    np.testing.assert_array_equal(mine, expected)


def _assert_close(ours, theirs, max_fraction, skip=None):
  mine = np.stack(ours).astype(int)
  expected = np.stack(theirs).astype(int)
  assert mine.shape == expected.shape
  if skip is not None:  # (N, H, W) pixels not to compare
    assert np.mean(skip) < 0.002
    mine, expected = mine[~skip], expected[~skip]
  assert np.abs(mine - expected).max() <= 1
  assert np.mean(mine != expected) <= max_fraction


# --- colour ops against PIL ---------------------------------------------------

ENHANCERS = [
  (ops.color, ImageEnhance.Color),
  (ops.contrast, ImageEnhance.Contrast),
  (ops.sharpness, ImageEnhance.Sharpness),
  (ops.brightness, ImageEnhance.Brightness),
]
# 1 ± the reference's values 0, 0.3 and 0.9 (m = 0, 3, 9), in float64 as it does.
FACTORS = [1.0, 1.3, 0.7, 1.9, 1 - 0.9]


@pytest.mark.parametrize("ours, pil", ENHANCERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("factor", FACTORS)
def test_enhance_matches_pil_exactly(ours, pil, factor):
  _assert_equal(
    _ours(lambda image: ours(image, factor)), _pil_rgb(lambda image: pil(image).enhance(factor))
  )


@pytest.mark.parametrize("ours, pil", ENHANCERS, ids=lambda x: getattr(x, "__name__", ""))
def test_enhance_on_grey_matches_pil_mode_l(ours, pil):
  for image in GREY:
    expected = np.asarray(pil(Image.fromarray(image)).enhance(1.6))
    np.testing.assert_array_equal(np.asarray(ours(image[..., None], 1.6))[..., 0], expected)


@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4])
def test_posterize_matches_pil(bits):
  _assert_equal(
    _ours(lambda image: ops.posterize(image, bits)),
    _pil_rgb(lambda image: ImageOps.posterize(image, bits)),
  )


@pytest.mark.parametrize("threshold", np.linspace(256, 0, 10)[[0, 1, 4, 8, 9]])
def test_solarize_matches_pil(threshold):
  _assert_equal(
    _ours(lambda image: ops.solarize(image, threshold)),
    _pil_rgb(lambda image: ImageOps.solarize(image, threshold)),
  )


def test_invert_and_equalize_match_pil():
  _assert_equal(_ours(ops.invert), _pil_rgb(ImageOps.invert))
  _assert_equal(_ours(ops.equalize), _pil_rgb(ImageOps.equalize))


def test_autocontrast_matches_pil_within_one():
  ours = _ours(ops.autocontrast)
  _assert_close(ours, _pil_rgb(ImageOps.autocontrast), max_fraction=0.01)
  # Every channel really is stretched to the full range.
  assert all(
    image.min(axis=(0, 1)).max() == 0 and image.max(axis=(0, 1)).min() == 255 for image in ours
  )


def test_colour_ops_on_grey_match_pil_mode_l():
  for ours, pil in [
    (ops.equalize, ImageOps.equalize),
    (ops.invert, ImageOps.invert),
    (lambda im: ops.solarize(im, 128), lambda im: ImageOps.solarize(im, 128)),
    (lambda im: ops.posterize(im, 5), lambda im: ImageOps.posterize(im, 5)),
  ]:
    for image in GREY:
      expected = np.asarray(pil(Image.fromarray(image)))
      np.testing.assert_array_equal(np.asarray(ours(image[..., None]))[..., 0], expected)
  _assert_close(
    _ours(ops.autocontrast, [g[..., None] for g in GREY]),
    [np.asarray(ImageOps.autocontrast(Image.fromarray(g)))[..., None] for g in GREY],
    max_fraction=0.01,
  )


def test_equalize_and_autocontrast_leave_constant_channels_alone():
  image = np.full((32, 32, 3), 77, np.uint8)
  image[..., 2] = (np.arange(1024) // 16).reshape(32, 32)  # 0..63, 16 each
  for op, pil in ((ops.equalize, ImageOps.equalize), (ops.autocontrast, ImageOps.autocontrast)):
    out = np.asarray(op(image))
    np.testing.assert_array_equal(out, np.asarray(pil(Image.fromarray(image))))
    np.testing.assert_array_equal(out[..., :2], 77)
    np.testing.assert_array_equal(out[..., 2].ravel()[[0, -1]], [0, 255])


# --- geometric ops against an independent numpy inverse mapping -----------------


def reference_nearest(image, matrix, fill=128):
  """PIL AFFINE + NEAREST in float64: output (x, y) copies the input pixel that
  contains (a(x+½) + b(y+½) + c, d(x+½) + e(y+½) + f), else fill."""
  height, width = image.shape[:2]
  a, b, c, d, e, f = matrix
  y, x = np.mgrid[0:height, 0:width] + 0.5
  col = np.floor(a * x + b * y + c).astype(int)
  row = np.floor(d * x + e * y + f).astype(int)
  inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
  out = np.full_like(image, fill)
  out[inside] = image[row[inside], col[inside]]
  return out


def _cubic(v1, v2, v3, v4, d):
  # PIL Geometry.c BICUBIC, a = -1, Horner form.
  p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def bicubic_values(image, matrix):
  """PIL AFFINE + BICUBIC in float64 before clipping and truncation, (H, W, C), and which
  sample points lie inside [0, W) x [0, H): the point as above, 4x4 taps around it,
  edge-clamped, rows then the column."""
  height, width, _ = image.shape
  a, b, c, d, e, f = matrix
  y, x = np.mgrid[0:height, 0:width] + 0.5
  xin, yin = a * x + b * y + c, d * x + e * y + f
  inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
  x0, y0 = np.floor(xin - 0.5).astype(int), np.floor(yin - 0.5).astype(int)
  dx, dy = (xin - 0.5 - x0)[..., None], (yin - 0.5 - y0)[..., None]
  src = image.astype(np.float64)

  def tap(row_offset, col_offset):
    return src[np.clip(y0 + row_offset, 0, height - 1), np.clip(x0 + col_offset, 0, width - 1)]

  rows = [_cubic(*(tap(r, k) for k in (-1, 0, 1, 2)), dx) for r in (-1, 0, 1, 2)]
  return _cubic(*rows, dy), inside


def reference_bicubic(image, matrix, fill=128):
  """PIL AFFINE + BICUBIC in float64 (`bicubic_values`): out of [0, W) x [0, H) -> fill;
  else the value clipped to [0, 255] and truncated."""
  value, inside = bicubic_values(image, matrix)
  value = np.where(value < 0, 0, np.where(value >= 255, 255, np.trunc(np.clip(value, 0, 255))))
  return np.where(inside[..., None], value, fill).astype(np.uint8).reshape(image.shape)


# How far float32 may move a bicubic sample from PIL's float64 one, derived: the sample point
# by <= 2e-5 px (a few roundings of coordinates below 128, float32 trig), which moves the
# value by <= 2e-5 x 2 x 255 (the cubic's slope is at most 2 per unit of tap difference); the
# weights by 2e-7 each (ops._cubic_weights) over differences up to 255; the sums by a few
# half-ulps of 512. Under 0.011 in all, so only a value that close to a whole number can
# truncate to the next one.
POINT_ERROR, VALUE_ERROR = 2e-5, 0.011


def assert_bicubic_matches(ours, pil, image, matrix):
  """`ours` equals PIL's bicubic `pil` except by 1 where PIL's float64 value is within
  VALUE_ERROR of a whole number, and where the sample point is within POINT_ERROR of the
  image's edge (inside versus fill)."""
  value, _ = bicubic_values(image, matrix)
  diff = np.abs(ours.astype(int) - pil.astype(int))
  edge = np.broadcast_to(on_edge(image.shape, matrix, POINT_ERROR)[..., None], diff.shape)
  near_whole = np.abs(value - np.round(value)) <= VALUE_ERROR
  assert np.all((diff == 0) | edge | ((diff == 1) & near_whole))
  assert np.mean(edge) < 0.01  # few pixels left out


def on_edge(shape, matrix, distance=1e-5):
  """Output pixels whose sample point is within `distance` px of the input's edge."""
  height, width = shape[:2]
  a, b, c, d, e, f = matrix
  y, x = np.mgrid[0:height, 0:width] + 0.5
  xin, yin = a * x + b * y + c, d * x + e * y + f
  near = lambda v, edge: np.abs(v - edge) < distance
  return near(xin, 0) | near(xin, width) | near(yin, 0) | near(yin, height)


def pil_rotation_matrix(degrees, width, height):
  """The matrix PIL's Image.rotate passes to transform (about the centre)."""
  angle = -np.deg2rad(degrees)
  a, b, d, e = np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle)
  cx, cy = width / 2, height / 2
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return a, b, c, d, e, f


def _rotate(image, degrees):
  """ops.rotate by `degrees`, the trig in float64 as apply_op's table does it."""
  radians = np.deg2rad(degrees)
  return ops.rotate(image, np.float32(np.cos(radians)), np.float32(np.sin(radians)))


def _pil_rotate_with_fill(image, degrees):
  # The reference's rotate_with_fill: rotate as RGBA, composite onto grey.
  rotated = image.convert("RGBA").rotate(degrees)
  return Image.composite(rotated, Image.new("RGBA", rotated.size, (128,) * 4), rotated).convert(
    image.mode
  )


WIDE = RGB
SHEARS = [0.3, -0.3, 0.1, -2 / 30]  # the reference's m = 9 and m = 3, m = 2 values
SHIFTS = [150 / 331, -150 / 331, 150 / 331 * 3 / 9]  # fractions of the size


@pytest.mark.parametrize("factor", SHEARS)
def test_shear_x_matches_numpy_and_pil(factor):
  matrix = (1, factor, 0, 0, 1, 0)
  ours = _ours(lambda image: ops.shear_x(image, factor), WIDE)
  skip = np.stack([on_edge(im.shape, matrix) for im in WIDE])
  _assert_close(ours, [reference_bicubic(im, matrix) for im in WIDE], 0.005, skip)
  pil = [
    np.asarray(
      Image.fromarray(im).transform(
        im.shape[1::-1], Image.AFFINE, matrix, Image.BICUBIC, fillcolor=(128, 128, 128)
      )
    )
    for im in WIDE
  ]
  _assert_close(ours, pil, 0.005, skip)
  assert np.mean(np.stack(ours) == 128) < 0.5  # not just fill


@pytest.mark.parametrize("factor", SHEARS)
def test_shear_y_matches_numpy(factor):
  matrix = (1, 0, 0, factor, 1, 0)
  skip = np.stack([on_edge(im.shape, matrix) for im in WIDE])
  _assert_close(
    _ours(lambda image: ops.shear_y(image, factor), WIDE),
    [reference_bicubic(im, matrix) for im in WIDE],
    0.005,
    skip,
  )


def test_shear_moves_rows_by_factor_times_row_centre():
  # A column ramp 10 x sheared by 1.0: output (y, x) samples the input at
  # x + ½ + (y + ½), half-way between pixel centres x + y and x + y + 1, and
  # the cubic is exact on a ramp: 10 (x + y) + 5 while inside, then fill.
  ramp = np.tile(np.arange(16, dtype=np.uint8) * 10, (4, 1))[..., None]
  out = np.asarray(ops.shear_x(ramp, 1.0))[..., 0]
  np.testing.assert_array_equal(out[2, :11], (np.arange(11) + 2) * 10 + 5)
  np.testing.assert_array_equal(out[2, 13:], 128)


@pytest.mark.parametrize("fraction", SHIFTS)
def test_translate_matches_numpy_and_pil(fraction):
  for image in WIDE:
    height, width = image.shape[:2]
    tx = (1, 0, fraction * width, 0, 1, 0)
    ty = (1, 0, 0, 0, 1, fraction * height)
    for op, matrix, shift in (
      (ops.translate_x, tx, fraction * width),
      (ops.translate_y, ty, fraction * height),
    ):
      ours = np.asarray(op(image, shift))
      np.testing.assert_array_equal(ours, reference_nearest(image, matrix))
      pil = Image.fromarray(image).transform(
        (width, height), Image.AFFINE, matrix, fillcolor=(128, 128, 128)
      )
      np.testing.assert_array_equal(ours, np.asarray(pil))


@pytest.mark.parametrize("degrees", [30.0, 10.0, 10 / 3, -20.0])
def test_rotate_matches_numpy_and_pil(degrees):
  for image in WIDE:
    height, width = image.shape[:2]
    ours = np.asarray(_rotate(image, degrees))
    np.testing.assert_array_equal(
      ours, reference_nearest(image, pil_rotation_matrix(degrees, width, height))
    )
    pil = np.asarray(_pil_rotate_with_fill(Image.fromarray(image), degrees))
    assert np.mean(np.any(ours != pil, axis=-1)) <= 0.005


def test_rotate_is_counter_clockwise():
  image = np.zeros((9, 9, 1), np.uint8)
  image[4, 7] = 255  # right of the centre
  out = np.asarray(_rotate(image, 90.0))[..., 0]
  assert out[1, 4] == 255 and out.sum() == 255  # now above the centre
  assert np.asarray(_rotate(image, 45.0))[0, 0, 0] == 128  # outside: fill


MEAN_FILL = (124, 116, 104)  # timm's fill for ImageNet's mean, which RandAugment uses


@pytest.mark.parametrize("degrees", [27.0, -13.5, 10 / 3])
def test_bicubic_rotate_matches_pil(degrees):
  radians = np.deg2rad(degrees)
  cos, sin = np.float32(np.cos(radians)), np.float32(np.sin(radians))
  matrix = pil_rotation_matrix(degrees, 64, 48)
  for image in WIDE:
    ours = np.asarray(ops.rotate_bicubic(image, cos, sin, MEAN_FILL))
    pil = Image.fromarray(image).rotate(degrees, resample=Image.BICUBIC, fillcolor=MEAN_FILL)
    np.testing.assert_array_equal(np.asarray(pil), reference_bicubic(image, matrix, MEAN_FILL))
    assert_bicubic_matches(ours, np.asarray(pil), image, matrix)
    assert np.mean(np.all(ours == MEAN_FILL, axis=-1)) < 0.3  # not just fill


@pytest.mark.parametrize("fraction", [150 / 331, -0.3, 0.1])
def test_bicubic_translate_matches_pil(fraction):
  for image in WIDE:
    height, width = image.shape[:2]
    for op, matrix, shift in (
      (ops.translate_x_bicubic, (1, 0, fraction * width, 0, 1, 0), fraction * width),
      (ops.translate_y_bicubic, (1, 0, 0, 0, 1, fraction * height), fraction * height),
    ):
      pil = Image.fromarray(image).transform(
        (width, height), Image.AFFINE, matrix, Image.BICUBIC, fillcolor=MEAN_FILL
      )
      assert_bicubic_matches(
        np.asarray(op(image, shift, MEAN_FILL)), np.asarray(pil), image, matrix
      )


@pytest.mark.parametrize("addition", [0, 37, 99, 110])
def test_solarize_add_matches_a_pil_point_table(addition):
  table = [min(255, i + addition) if i < 128 else i for i in range(256)]
  _assert_equal(
    _ours(lambda image: ops.solarize_add(image, addition)),
    _pil_rgb(lambda im: im.point(table * 3)),
  )
  grey = GREY[0][..., None]
  pil = np.asarray(Image.fromarray(GREY[0]).point(table))
  np.testing.assert_array_equal(np.asarray(ops.solarize_add(grey, addition))[..., 0], pil)


def test_geometric_ops_on_grey_images():
  for grey in GREY:
    image = grey[..., None]
    np.testing.assert_array_equal(
      np.asarray(_rotate(image, 20.0)), reference_nearest(image, pil_rotation_matrix(20.0, 64, 48))
    )
    np.testing.assert_array_equal(
      np.asarray(ops.translate_x(image, -9.7)), reference_nearest(image, (1, 0, -9.7, 0, 1, 0))
    )
    _assert_close(
      [np.asarray(ops.shear_y(image, -0.3))],
      [reference_bicubic(image, (1, 0, 0, -0.3, 1, 0))],
      0.005,
    )


# --- apply_op: the magnitude table, the random sign, one switch -----------------


def _keys(count):
  return list(jax.random.split(jax.random.key(7), count))


def test_magnitude_values_follow_the_reference():
  table = ops.parameter_table(48, 64)  # (sign, op, m, 2)
  index = ops.OP_NAMES.index
  np.testing.assert_allclose(table[0, index("ShearX"), :, 0], np.arange(10) * 0.3 / 9, atol=1e-7)
  np.testing.assert_allclose(table[1, index("ShearY"), 9, 0], -0.3)
  np.testing.assert_allclose(table[1, index("TranslateX"), 9, 0], -150 / 331 * 64, rtol=1e-6)
  np.testing.assert_allclose(table[0, index("TranslateY"), 9, 0], 150 / 331 * 48, rtol=1e-6)
  for sign in (0, 1):  # Rotate has no random sign: 30 degrees either way
    np.testing.assert_allclose(table[sign, index("Rotate"), 9], [np.cos(np.pi / 6), 0.5], rtol=1e-6)
  for name in ("Color", "Contrast", "Sharpness", "Brightness"):
    np.testing.assert_allclose(table[0, index(name), :, 0], 1 + np.arange(10) * 0.1, rtol=1e-6)
    np.testing.assert_allclose(table[1, index(name), :, 0], 1 - np.arange(10) * 0.1, atol=1e-6)
  np.testing.assert_array_equal(
    table[:, index("Posterize"), :, 0], [[8, 8, 7, 7, 6, 6, 5, 5, 4, 4]] * 2
  )
  np.testing.assert_allclose(
    table[1, index("Solarize"), :, 0], 256 - np.arange(10) * 256 / 9, atol=1e-4
  )


SIGNED = {
  "ShearX": lambda im, v: ops.shear_x(im, v),
  "ShearY": lambda im, v: ops.shear_y(im, v),
  "TranslateX": lambda im, v: ops.translate_x(im, v * 64),
  "TranslateY": lambda im, v: ops.translate_y(im, v * 48),
  "Color": lambda im, v: ops.color(im, 1 + v),
  "Contrast": lambda im, v: ops.contrast(im, 1 + v),
  "Sharpness": lambda im, v: ops.sharpness(im, 1 + v),
  "Brightness": lambda im, v: ops.brightness(im, 1 + v),
}
VALUE_AT_7 = {
  "ShearX": 0.3 * 7 / 9,
  "ShearY": 0.3 * 7 / 9,
  "TranslateX": 150 / 331 * 7 / 9,
  "TranslateY": 150 / 331 * 7 / 9,
  "Color": 0.7,
  "Contrast": 0.7,
  "Sharpness": 0.7,
  "Brightness": 0.7,
}


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_apply_op_uses_a_random_sign(name):
  image = WIDE[1]
  value = VALUE_AT_7[name]
  plus = np.asarray(SIGNED[name](image, value))
  minus = np.asarray(SIGNED[name](image, -value))
  assert not np.array_equal(plus, minus)
  outcomes = []
  for key in _keys(12):
    out = np.asarray(ops.apply_op(key, image, ops.OP_NAMES.index(name), 7))
    matches = [np.array_equal(out, plus), np.array_equal(out, minus)]
    assert any(matches), "apply_op result is neither +value nor -value"
    outcomes.append(matches[0])
  assert 0 < sum(outcomes) < 12  # both signs occur (chance of failing: 2 / 2**12)


def test_apply_op_unsigned_ops_and_identity():
  image = WIDE[2]
  expected = {
    "Rotate": _rotate(image, 30 * 4 / 9),
    "Posterize": ops.posterize(image, 6),
    "Solarize": ops.solarize(image, 256 - 4 * 256 / 9),
    "AutoContrast": ops.autocontrast(image),
    "Equalize": ops.equalize(image),
    "Invert": ops.invert(image),
  }
  for key in _keys(3):
    for name, want in expected.items():
      got = ops.apply_op(key, image, ops.OP_NAMES.index(name), 4)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    np.testing.assert_array_equal(np.asarray(ops.apply_op(key, image, ops.IDENTITY, 9)), image)


def test_apply_op_on_grey_images():
  image = GREY[0][..., None]
  equalized = np.asarray(ImageOps.equalize(Image.fromarray(image[..., 0])))[..., None]
  rotated = reference_nearest(image, pil_rotation_matrix(30 * 5 / 9, 64, 48))
  for name, want in {
    "Contrast": ops.contrast(image, 1.3),
    "Color": image,
    "Equalize": equalized,
    "Rotate": rotated,
  }.items():
    magnitude = 3 if name != "Rotate" else 5
    outs = [
      np.asarray(ops.apply_op(key, image, ops.OP_NAMES.index(name), magnitude)) for key in _keys(4)
    ]
    assert any(np.array_equal(out, np.asarray(want)) for out in outs), name
    assert all(out.shape == (48, 64, 1) and out.dtype == np.uint8 for out in outs)


# --- the op table: one entry per op, everything else derived from it -----------

# Written out here, apart from ops.OPS: the function each op name must run.
FUNCTIONS = {
  "ShearX": ops.shear_x,
  "ShearY": ops.shear_y,
  "TranslateX": ops.translate_x,
  "TranslateY": ops.translate_y,
  "Rotate": ops.rotate,
  "Color": ops.color,
  "Contrast": ops.contrast,
  "Sharpness": ops.sharpness,
  "Brightness": ops.brightness,
  "Posterize": ops.posterize,
  "Solarize": ops.solarize,
  "AutoContrast": ops.autocontrast,
  "Equalize": ops.equalize,
  "Invert": ops.invert,
}


def test_every_policy_op_is_a_table_entry():
  assert ops.OP_NAMES == tuple(op.name for op in ops.OPS)
  assert sorted(ops.OP_NAMES) == sorted(FUNCTIONS) and ops.IDENTITY == len(ops.OPS) == 14
  assert {op.name for op in ops.OPS if op.signed} == set(SIGNED)  # Rotate: no sign
  for name, policy in autoaugment.POLICIES.items():
    _, op_indices, _ = autoaugment.policy_arrays(name)
    for subpolicy, row in zip(policy, op_indices, strict=True):
      assert [ops.OPS[i].name for i in row] == [op for _, op, _ in subpolicy]
      assert all(op in ops.OPS_BY_NAME for _, op, _ in subpolicy)


@pytest.mark.parametrize("magnitude", [2, 7])  # at 9, Solarize (threshold 0) is Invert
def test_each_switch_branch_runs_its_own_op(magnitude):
  # apply_op at an op's index must equal that op's function called directly
  # with its table arguments; the 14 results all differ on this image, so a
  # branch or table entry moved to another index fails here.
  image = WIDE[4]
  height, width, _ = image.shape
  table = ops.parameter_table(height, width)
  key = jax.random.key(magnitude)
  negative = int(jax.random.bernoulli(key))  # the sign apply_op draws from this key
  results = {}
  for index, op in enumerate(ops.OPS):
    assert op.fn is FUNCTIONS[op.name], op.name
    arguments = table[negative, index, magnitude, : op.arity]
    np.testing.assert_array_equal(table[negative, index, magnitude, op.arity :], 0)
    expected = np.asarray(FUNCTIONS[op.name](image, *arguments))
    got = np.asarray(ops.apply_op(key, image, index, magnitude))
    np.testing.assert_array_equal(got, expected, err_msg=op.name)
    results[op.name] = got.tobytes()
  assert len(set(results.values())) == len(ops.OPS)


def test_ops_agree_eagerly_and_under_jit():
  # No product feeds an add, so XLA's FMA fusion under jit changes nothing.
  image = jnp.asarray(RGB[3])
  for op, arg in [
    (ops.shear_x, -0.2333),
    (ops.shear_y, 0.3),
    (ops.translate_x, 7.3),
    (ops.color, 1.9),
    (ops.contrast, 0.2),
    (ops.sharpness, 1.8),
    (ops.brightness, 1.3),
  ]:
    eager = op(image, arg)
    jitted = jax.jit(op)(image, jnp.float32(arg))
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted), err_msg=op.__name__)
  rotate = lambda im: _rotate(im, 23.3)  # a concrete angle: trig in numpy
  np.testing.assert_array_equal(np.asarray(rotate(image)), np.asarray(jax.jit(rotate)(image)))


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="uint8"):
    ops.invert(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    ops.equalize(np.zeros((4, 4), np.uint8))
