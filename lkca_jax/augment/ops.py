"""The 14 AutoAugment image operations on uint8 (H, W, C) images, as PIL does them, and the
bicubic rotate and translate and the solarize-add that timm's RandAugment adds.

Every op takes and returns uint8 (C = 3 or 1) and rounds where PIL rounds, so
the colour ops reproduce PIL's ImageOps / ImageEnhance and the geometric ops
PIL's Image.transform(AFFINE) inverse mapping: output pixel (x, y) reads the
input at (a(x+½) + b(y+½) + c, d(x+½) + e(y+½) + f), or the fill outside it.
Shears are bicubic (PIL's a = -1 kernel, edge taps clamped, result truncated);
AutoAugment's translate and rotate are nearest, as in the reference, which passes
no filter; RandAugment's are bicubic, as DeiT passes them.

The table OPS lists each op once (name, magnitude range, random sign or not,
function); the op names, apply_op's argument table and its switch branches
are all derived from it.

Each op is jitted (compiled once per image shape, inlined under an outer jit
or vmap; `fill` is static). No inexact product feeds an add: XLA fuses
a*b + c into one FMA inside a compiled program but not across programs, and
an FMA rounds differently. Factors are split into two 12-bit halves
(`split`), so every product is exact and eager, jit and vmap agree bit for
bit (on CPU this is tested; PIL itself rounds without FMA).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NUM_MAGNITUDES = 10
FILL = 128  # the reference's fillcolor (128, 128, 128)


def _check_image(image) -> jax.Array:
  image = jnp.asarray(image)
  if image.ndim != 3 or image.dtype != jnp.uint8:
    raise ValueError(
      f"expected a uint8 (H, W, C) image, got {image.dtype} "
      f"{image.shape}; convert with .astype(np.uint8)"
    )
  return image


def split(x):
  """x = hi + lo exactly, each with at most 12 significant bits.

  A 12-bit half times anything of at most 12 bits (pixel values, differences,
  half-integer coordinates below 2048) is exact in float32.
  """
  x = jnp.asarray(x, jnp.float32)
  bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
  hi = lax.bitcast_convert_type(bits, jnp.float32)
  return hi, x - hi


def _sum_of_products(pairs, start):
  """start + sum(a * b) for float32 factors a and small exact b, FMA-proof."""
  total = start
  for a, b in pairs:
    hi, lo = split(a)
    total = total + hi * b
    total = total + lo * b
  return total


def _to_uint8(values):
  """PIL's float to 8-bit store: clip to [0, 255], then truncate."""
  return jnp.clip(jnp.floor(values), 0, 255).astype(jnp.uint8)


def _fill_value(fill, channels):
  return jnp.broadcast_to(jnp.asarray(fill, jnp.uint8), (channels,))


def _centres(size):
  return jnp.arange(size, dtype=jnp.float32) + 0.5


# --- geometric ops -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames="fill")
def affine(image, matrix, fill=FILL):
  """PIL image.transform(size, AFFINE, matrix, NEAREST, fillcolor=fill).

  matrix = (a, b, c, d, e, f) maps output pixel centres to input coordinates;
  the input pixel is the one containing that point (floor), else `fill`.
  """
  image = _check_image(image)
  height, width, channels = image.shape
  a, b, c, d, e, f = (jnp.asarray(v, jnp.float32) for v in matrix)
  xs, ys = _centres(width)[None, :], _centres(height)[:, None]
  u = _sum_of_products(((a, xs), (b, ys)), c)
  v = _sum_of_products(((d, xs), (e, ys)), f)
  return _sample_nearest(image, u, v, fill)


def _sample_nearest(image, u, v, fill):
  height, width, channels = image.shape
  col = jnp.floor(u).astype(jnp.int32)
  row = jnp.floor(v).astype(jnp.int32)
  inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
  pixels = image[jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)]
  return jnp.where(inside[..., None], pixels, _fill_value(fill, channels))


@functools.partial(jax.jit, static_argnames="fill")
def translate_x(image, pixels, fill=FILL):
  """Content moves left by `pixels` (PIL matrix (1, 0, pixels, 0, 1, 0))."""
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


@functools.partial(jax.jit, static_argnames="fill")
def translate_y(image, pixels, fill=FILL):
  """Content moves up by `pixels` (PIL matrix (1, 0, 0, 0, 1, pixels))."""
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def _rotated_points(height: int, width: int, cos, sin):
  """PIL rotate's input points (u, v) (H, W) for output pixel centres, about the centre
  (cx, cy) = (W/2, H/2): u = cx + cos (x+½-cx) - sin (y+½-cy), v = cy + sin (x+½-cx) +
  cos (y+½-cy)."""
  cx, cy = width / 2, height / 2
  xs = (_centres(width) - cx)[None, :]  # exact: half-integers
  ys = (_centres(height) - cy)[:, None]
  u = _sum_of_products(((cos, xs), (-sin, ys)), jnp.float32(cx))
  v = _sum_of_products(((sin, xs), (cos, ys)), jnp.float32(cy))
  return u, v


@functools.partial(jax.jit, static_argnames="fill")
def rotate(image, cos, sin, fill=FILL):
  """PIL image.rotate (counter-clockwise, nearest) by the angle with this cos and sin,
  else `fill`. The trig is the caller's (apply_op's table does it in float64, as PIL)."""
  image = _check_image(image)
  height, width, _ = image.shape
  return _sample_nearest(image, *_rotated_points(height, width, cos, sin), fill)


@functools.partial(jax.jit, static_argnames="fill")
def rotate_bicubic(image, cos, sin, fill=FILL):
  """PIL image.rotate(resample=BICUBIC, fillcolor=fill), as `rotate` otherwise."""
  image = _check_image(image)
  height, width, _ = image.shape
  return _sample_bicubic(image, *_rotated_points(height, width, cos, sin), fill)


# PIL's bicubic transform filter (Geometry.c BICUBIC, a = -1) as weights of
# the taps at offsets -1, 0, 1, 2 from the fractional position d. The weights
# come from a 1/4096 table plus its first-order Taylor term, with d - grid
# point cut to 12 bits so that the correction products are exact: the same
# weights in every compilation, within 2e-7 of the exact polynomial.
_CUBIC_STEPS = 4096


@functools.cache
def _cubic_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  d = (np.arange(_CUBIC_STEPS, dtype=np.float64) / _CUBIC_STEPS)[:, None]
  weights = np.concatenate(
    [-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3, d + d**2 - d**3, -(d**2) + d**3], axis=-1
  )
  slopes = np.concatenate(
    [-1 + 4 * d - 3 * d**2, -4 * d + 3 * d**2, 1 + 2 * d - 3 * d**2, -2 * d + 3 * d**2], axis=-1
  )
  slopes = slopes.astype(np.float32)
  slopes_hi = (slopes.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
  return weights.astype(np.float32), slopes_hi, slopes - slopes_hi


def _cubic_weights(fraction):
  """(..., 4) tap weights for fractions in [0, 1)."""
  scaled = fraction * _CUBIC_STEPS  # exact: a power of two
  step = jnp.floor(scaled)
  rest = jnp.floor((scaled - step) * 4096) / (4096 * _CUBIC_STEPS)  # 12 bits
  weights, slopes_hi, slopes_lo = (jnp.asarray(t)[step.astype(jnp.int32)] for t in _cubic_tables())
  rest = rest[..., None]
  return (weights + slopes_hi * rest) + slopes_lo * rest


def _cubic_along_x(image, rows, whole, fraction):
  """PIL's bicubic along x of rows `rows` at columns whole + fraction (edge-clamped taps),
  float32 (..., C): the centre tap plus each weight times its tap's difference to it, exact
  where the taps are equal, as in PIL's Horner form. The differences are small integers and
  the weights are cut into 12-bit halves, so every product is exact; fixed summation order."""
  width = image.shape[1]
  taps = [
    image[rows, jnp.clip(whole + offset, 0, width - 1)].astype(jnp.float32)
    for offset in (-1, 0, 1, 2)
  ]
  w_hi, w_lo = split(_cubic_weights(fraction)[..., None, :])
  total = taps[1]
  for tap in (0, 2, 3):
    difference = taps[tap] - taps[1]
    total = total + (w_hi[..., tap] * difference + w_lo[..., tap] * difference)
  return total


def _cubic_along_y(values, fraction):
  """PIL's bicubic over four row results `values` (float32 (..., C) each) at `fraction`, as
  `_cubic_along_x`; the differences are cut into 12-bit halves too, so that every product is
  exact and no FMA can change the sum."""
  w_hi, w_lo = split(_cubic_weights(fraction)[..., None, :])
  total = values[1]
  for tap in (0, 2, 3):
    d_hi, d_lo = split(values[tap] - values[1])
    w = (w_hi[..., tap], w_lo[..., tap])
    total = total + ((w[0] * d_hi + w[0] * d_lo) + (w[1] * d_hi + w[1] * d_lo))
  return total


def _rows_bicubic(image, shift, fill):
  """Each row y sampled at its pixel centres moved by shift[y] along x, with PIL's BICUBIC
  filter (rows are sampled at their centres, so along x only), else `fill`."""
  height, width, channels = image.shape
  whole = jnp.floor(shift)
  fraction = shift - whole  # exact
  base = jnp.arange(width)[None, :] + whole.astype(jnp.int32)[:, None]
  rows = jnp.arange(height)[:, None]
  total = _cubic_along_x(image, rows, base, fraction[:, None])
  position = _centres(width)[None, :] + shift[:, None]
  inside = (position >= 0) & (position < width)
  return jnp.where(inside[..., None], _to_uint8(total), _fill_value(fill, channels))


def _sample_bicubic(image, u, v, fill):
  """PIL's BICUBIC filter (Geometry.c) at input points (u, v), each (H, W): 4 x 4
  edge-clamped taps, rows then the column, clipped and truncated; outside [0, W) x [0, H),
  `fill`."""
  height, width, channels = image.shape
  x, y = u - 0.5, v - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  whole = x0.astype(jnp.int32)
  rows = [jnp.clip(y0.astype(jnp.int32) + offset, 0, height - 1) for offset in (-1, 0, 1, 2)]
  values = [_cubic_along_x(image, row, whole, x - x0) for row in rows]  # (H, W, C) each
  total = _cubic_along_y(values, y - y0)
  inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
  return jnp.where(inside[..., None], _to_uint8(total), _fill_value(fill, channels))


@functools.partial(jax.jit, static_argnames="fill")
def shear_x(image, factor, fill=FILL):
  """PIL transform(AFFINE, (1, factor, 0, 0, 1, 0), BICUBIC, fillcolor=fill).

  Row y shifts by s = factor (y+½), one rounding of the exact product.
  """
  image = _check_image(image)
  hi, lo = split(factor)
  ys = _centres(image.shape[0])
  return _rows_bicubic(image, hi * ys + lo * ys, fill)


@functools.partial(jax.jit, static_argnames="fill")
def shear_y(image, factor, fill=FILL):
  """PIL transform(AFFINE, (1, 0, 0, factor, 1, 0), BICUBIC, fillcolor=fill)."""
  image = _check_image(image)
  return jnp.swapaxes(shear_x(jnp.swapaxes(image, 0, 1), factor, fill), 0, 1)


@functools.partial(jax.jit, static_argnames="fill")
def translate_x_bicubic(image, pixels, fill=FILL):
  """PIL transform(AFFINE, (1, 0, pixels, 0, 1, 0), BICUBIC, fillcolor=fill): content
  moves left by `pixels`, a fraction of a pixel interpolated."""
  image = _check_image(image)
  shift = jnp.broadcast_to(jnp.asarray(pixels, jnp.float32), image.shape[:1])
  return _rows_bicubic(image, shift, fill)


@functools.partial(jax.jit, static_argnames="fill")
def translate_y_bicubic(image, pixels, fill=FILL):
  """PIL transform(AFFINE, (1, 0, 0, 0, 1, pixels), BICUBIC, fillcolor=fill)."""
  image = _check_image(image)
  return jnp.swapaxes(translate_x_bicubic(jnp.swapaxes(image, 0, 1), pixels, fill), 0, 1)


# --- colour ops --------------------------------------------------------------


def _grey(image):
  """PIL convert("L") as int32 (H, W, 1): ITU-R 601-2 luma in 16-bit fixed point."""
  if image.shape[-1] == 1:
    return image.astype(jnp.int32)
  if image.shape[-1] != 3:
    raise ValueError(f"colour ops need C = 3 or 1, got shape {image.shape}")
  rgb = image.astype(jnp.int32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return luma[..., None]


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): float32, then clip, truncate."""
  degenerate = degenerate.astype(jnp.float32)
  difference = image.astype(jnp.float32) - degenerate
  hi, lo = split(factor)
  product = hi * difference + lo * difference  # = fl(factor * difference)
  return _to_uint8(degenerate + product)


@jax.jit
def color(image, factor):
  """ImageEnhance.Color(image).enhance(factor); identity on grey images."""
  image = _check_image(image)
  return _blend(_grey(image), image, factor)


@jax.jit
def contrast(image, factor):
  """ImageEnhance.Contrast: blend with the rounded mean grey level."""
  image = _check_image(image)
  grey = _grey(image)
  count = grey.size
  mean = (2 * jnp.sum(grey) + count) // (2 * count)  # int(mean + 0.5)
  return _blend(jnp.broadcast_to(mean, image.shape), image, factor)


@jax.jit
def brightness(image, factor):
  """ImageEnhance.Brightness: blend with black."""
  image = _check_image(image)
  return _blend(jnp.zeros_like(image), image, factor)


def _smooth(image):
  """ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, /13, rounded).

  Border pixels are copied, as PIL's 3x3 filter does. The sum is integer, so
  round(sum / 13) is exact: sum/13 + ½ is never a whole number.
  """
  height, width, _ = image.shape
  pixels = image.astype(jnp.int32)
  total = 4 * pixels[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total = total + pixels[dy : height - 2 + dy, dx : width - 2 + dx]
  inner = ((2 * total + 13) // 26).astype(jnp.uint8)
  return image.at[1:-1, 1:-1].set(inner)


@jax.jit
def sharpness(image, factor):
  """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
  image = _check_image(image)
  if image.shape[0] < 3 or image.shape[1] < 3:
    return _blend(image, image, factor)  # PIL copies images this small
  return _blend(_smooth(image), image, factor)


@jax.jit
def posterize(image, bits):
  """ImageOps.posterize: keep the top `bits` bits of each value."""
  image = _check_image(image)
  shift = 8 - jnp.asarray(bits, jnp.int32)
  mask = (jnp.left_shift(jnp.int32(0xFF), shift) & 0xFF).astype(jnp.uint8)
  return image & mask


@jax.jit
def solarize(image, threshold):
  """ImageOps.solarize: invert every value >= threshold."""
  image = _check_image(image)
  below = image.astype(jnp.float32) < jnp.asarray(threshold, jnp.float32)
  return jnp.where(below, image, 255 - image)


@functools.partial(jax.jit, static_argnames="threshold")
def solarize_add(image, addition, threshold=128):
  """timm's solarize_add: `addition` added to every value below `threshold`, capped at 255
  (a PIL point table)."""
  image = _check_image(image)
  values = image.astype(jnp.int32)
  added = jnp.minimum(values + jnp.asarray(addition, jnp.int32), 255)
  return jnp.where(values < threshold, added, values).astype(jnp.uint8)


@jax.jit
def invert(image):
  """ImageOps.invert."""
  return 255 - _check_image(image)


def _lookup(image, tables):
  """Applies one 256-entry table per channel; tables is (C, 256) int32."""
  channels = image.shape[-1]
  tables = jnp.clip(tables, 0, 255).astype(jnp.uint8)  # PIL clips LUTs
  return tables[jnp.arange(channels), image.astype(jnp.int32)]


@jax.jit
def autocontrast(image):
  """ImageOps.autocontrast (cutoff 0), per channel.

  PIL computes int(v * 255/(hi-lo) - lo * 255/(hi-lo)) in float64; this is the
  exact floor((v - lo) 255 / (hi - lo)). Where that ratio is a whole number
  PIL's rounding sometimes lands one below it (0.4% of (lo, hi, v) triples).
  """
  image = _check_image(image)
  pixels = image.astype(jnp.int32)
  lo = jnp.min(pixels, axis=(0, 1))[:, None]  # (C, 1)
  hi = jnp.max(pixels, axis=(0, 1))[:, None]
  values = jnp.arange(256, dtype=jnp.int32)[None, :]
  spread = jnp.maximum(hi - lo, 1)
  stretched = (values - lo) * 255 // spread
  return _lookup(image, jnp.where(hi > lo, stretched, values))


@jax.jit
def equalize(image):
  """ImageOps.equalize, per channel (integer arithmetic, exact)."""
  image = _check_image(image)
  channels = image.shape[-1]
  pixels = image.astype(jnp.int32).reshape(-1, channels)
  counts = jnp.zeros((channels, 256), jnp.int32).at[jnp.arange(channels)[None, :], pixels].add(1)
  top = jnp.max(pixels, axis=0)  # the last non-empty bin
  last_count = counts[jnp.arange(channels), top]
  step = ((pixels.shape[0] - last_count) // 255)[:, None]
  before = jnp.cumsum(counts, axis=1) - counts  # pixels below each value
  safe_step = jnp.maximum(step, 1)
  equalized = (safe_step // 2 + before) // safe_step
  values = jnp.arange(256, dtype=jnp.int32)[None, :]
  return _lookup(image, jnp.where(step > 0, equalized, values))


# --- the op table --------------------------------------------------------------


def _no_arguments(value, height, width):
  del value, height, width
  return ()


def _as_is(value, height, width):
  del height, width
  return (value,)


def _enhance_factor(value, height, width):
  del height, width
  return (1.0 + value,)  # 1 ± value: 1 leaves the image as it is


def _rotation(degrees, height, width):
  del height, width
  radians = np.deg2rad(degrees)
  return np.cos(radians), np.sin(radians)


@dataclasses.dataclass(frozen=True)
class Op:
  """One AutoAugment op and everything apply_op needs to know about it.

  Magnitude index m = 0..9 picks value linspace(*magnitude_range, 10)[m], in
  float64 as the reference, negated at random when `signed`. `arguments(value,
  height, width)` turns the (10,) values into fn's arguments after the image,
  each a (10,) array, so fn(image, *arguments) is the op at each magnitude.
  """

  name: str
  magnitude_range: tuple[float, float]  # the values at m = 0 and m = 9
  signed: bool
  fn: Callable[..., jax.Array]
  arguments: Callable[..., tuple] = _no_arguments

  @property
  def arity(self) -> int:
    """How many arguments fn takes after the image."""
    return len(self.arguments(np.zeros(NUM_MAGNITUDES), 1, 1))

  def argument_values(self, negative: bool, height: int, width: int) -> np.ndarray:
    """(10 magnitudes, arity) float64 arguments; `negative` picks the sign of signed ops."""
    sign = -1.0 if negative and self.signed else 1.0
    value = np.linspace(*self.magnitude_range, NUM_MAGNITUDES) * sign
    arguments = self.arguments(value, height, width)
    if not arguments:
      return np.zeros((NUM_MAGNITUDES, 0))
    return np.stack(arguments, axis=-1)


# docs/method.md, "AutoAugment policies": the ops, their magnitude ranges and
# which get a random sign (Rotate has none in the reference). An op's index in
# this table is its index in apply_op's switch and in the policies' arrays.
OPS = (
  Op("ShearX", (0.0, 0.3), True, shear_x, _as_is),
  Op("ShearY", (0.0, 0.3), True, shear_y, _as_is),
  # Pixels: the fraction of the width for X, of the height for Y.
  Op("TranslateX", (0.0, 150 / 331), True, translate_x, lambda v, h, w: (v * w,)),
  Op("TranslateY", (0.0, 150 / 331), True, translate_y, lambda v, h, w: (v * h,)),
  Op("Rotate", (0.0, 30.0), False, rotate, _rotation),
  Op("Color", (0.0, 0.9), True, color, _enhance_factor),
  Op("Contrast", (0.0, 0.9), True, contrast, _enhance_factor),
  Op("Sharpness", (0.0, 0.9), True, sharpness, _enhance_factor),
  Op("Brightness", (0.0, 0.9), True, brightness, _enhance_factor),
  Op("Posterize", (8.0, 4.0), False, posterize, lambda v, h, w: (np.round(v),)),  # whole bits
  Op("Solarize", (256.0, 0.0), False, solarize, _as_is),
  Op("AutoContrast", (0.0, 0.0), False, autocontrast),
  Op("Equalize", (0.0, 0.0), False, equalize),
  Op("Invert", (0.0, 0.0), False, invert),
)
OPS_BY_NAME = {op.name: op for op in OPS}
if len(OPS_BY_NAME) != len(OPS):
  raise ValueError(f"duplicate op names in {[op.name for op in OPS]}")
OP_NAMES = tuple(OPS_BY_NAME)
NUM_OPS = len(OPS)
IDENTITY = NUM_OPS  # apply_op's extra branch: leave the image as it is
NUM_ARGUMENTS = max(op.arity for op in OPS)


# --- one op by index ---------------------------------------------------------


@functools.cache
def parameter_table(height: int, width: int) -> np.ndarray:
  """(2 signs, NUM_OPS + 1, 10 magnitudes, NUM_ARGUMENTS) float32 op arguments.

  Sign index 0 is +, 1 is -. Row i holds OPS[i].argument_values (computed in
  float64 as the reference does), zero-padded; IDENTITY's row is zeros.
  """
  table = np.zeros((2, NUM_OPS + 1, NUM_MAGNITUDES, NUM_ARGUMENTS), np.float64)
  for negative in (0, 1):
    for index, op in enumerate(OPS):
      table[negative, index, :, : op.arity] = op.argument_values(bool(negative), height, width)
  return table.astype(np.float32)


def _branch(op: Op):
  arity = op.arity
  return lambda image, arg: op.fn(image, *(arg[i] for i in range(arity)))


# Derived from OPS, so branch i is always OPS[i]; the last one is IDENTITY.
_BRANCHES = tuple(_branch(op) for op in OPS) + (lambda image, arg: image,)


@jax.jit
def apply_op(key, image, op_index, magnitude_index):
  """Op `op_index` (into OPS; IDENTITY = no-op) at magnitude 0..9.

  `key` draws the random sign of signed ops (+ or - with equal chance).
  One lax.switch over all ops, so it compiles once whatever the indices.
  """
  image = _check_image(image)
  height, width, _ = image.shape
  negative = jax.random.bernoulli(key).astype(jnp.int32)
  table = jnp.asarray(parameter_table(height, width))
  arg = table[negative, op_index, magnitude_index]
  return lax.switch(op_index, _BRANCHES, image, arg)
