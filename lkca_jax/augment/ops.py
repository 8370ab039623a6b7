"""The 14 AutoAugment image operations on uint8 (H, W, C) images, as PIL does them.

Every op takes and returns uint8 (C = 3 or 1) and rounds where PIL rounds, so
the colour ops reproduce PIL's ImageOps / ImageEnhance and the geometric ops
PIL's Image.transform(AFFINE) inverse mapping: output pixel (x, y) reads the
input at (a(x+½) + b(y+½) + c, d(x+½) + e(y+½) + f), or the fill outside it.
Shears are bicubic (PIL's a = -1 kernel, edge taps clamped, result truncated);
translate and rotate are nearest, as in the reference, which passes no filter.

Each op is jitted (compiled once per image shape, inlined under an outer jit
or vmap; `fill` is static). No inexact product feeds an add: XLA fuses
a*b + c into one FMA inside a compiled program but not across programs, and
an FMA rounds differently. Factors are split into two 12-bit halves
(`_split`), so every product is exact and eager, jit and vmap agree bit for
bit (on CPU this is tested; PIL itself rounds without FMA).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

OP_NAMES = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Color",
            "Contrast", "Sharpness", "Brightness", "Posterize", "Solarize",
            "AutoContrast", "Equalize", "Invert")
NUM_OPS = len(OP_NAMES)
IDENTITY = NUM_OPS  # apply_op's extra branch: leave the image as it is
NUM_MAGNITUDES = 10
FILL = 128  # the reference's fillcolor (128, 128, 128)

# Spec section 4: magnitude index m = 0..9 picks linspace(lo, hi, 10)[m].
_RANGES = {
    "ShearX": (0.0, 0.3), "ShearY": (0.0, 0.3),
    "TranslateX": (0.0, 150 / 331), "TranslateY": (0.0, 150 / 331),
    "Rotate": (0.0, 30.0),
    "Color": (0.0, 0.9), "Contrast": (0.0, 0.9),
    "Sharpness": (0.0, 0.9), "Brightness": (0.0, 0.9),
    "Posterize": (8.0, 4.0), "Solarize": (256.0, 0.0),
    "AutoContrast": (0.0, 0.0), "Equalize": (0.0, 0.0), "Invert": (0.0, 0.0),
}
MAGNITUDES = {name: np.linspace(lo, hi, NUM_MAGNITUDES)
              for name, (lo, hi) in _RANGES.items()}
MAGNITUDES["Posterize"] = np.round(MAGNITUDES["Posterize"])  # whole bits
# Ops whose value gets a random sign (Rotate has none in the reference).
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY",
                        "Color", "Contrast", "Sharpness", "Brightness"})


def _check_image(image) -> jax.Array:
  image = jnp.asarray(image)
  if image.ndim != 3 or image.dtype != jnp.uint8:
    raise ValueError(f"expected a uint8 (H, W, C) image, got {image.dtype} "
                     f"{image.shape}; convert with .astype(np.uint8)")
  return image


def _split(x):
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
    hi, lo = _split(a)
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


@functools.partial(jax.jit, static_argnames="fill")
def _rotate_cos_sin(image, cos, sin, fill):
  # PIL's rotate about (W/2, H/2): u = cx + cos (x+½-cx) - sin (y+½-cy), ...
  image = _check_image(image)
  height, width, _ = image.shape
  cx, cy = width / 2, height / 2
  xs = (_centres(width) - cx)[None, :]  # exact: half-integers
  ys = (_centres(height) - cy)[:, None]
  u = _sum_of_products(((cos, xs), (-sin, ys)), jnp.float32(cx))
  v = _sum_of_products(((sin, xs), (cos, ys)), jnp.float32(cy))
  return _sample_nearest(image, u, v, fill)


def rotate(image, degrees, fill=FILL):
  """PIL image.rotate(degrees) (counter-clockwise, nearest) with fill outside.

  With a Python number the trig is done in numpy, exactly as apply_op's
  table; a traced angle uses jnp.cos / jnp.sin.
  """
  if isinstance(degrees, (int, float, np.number)):  # exact trig when concrete
    radians = np.deg2rad(float(degrees))
    cos, sin = np.float32(np.cos(radians)), np.float32(np.sin(radians))
  else:
    radians = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
  return _rotate_cos_sin(image, cos, sin, fill)


# PIL's bicubic transform filter (Geometry.c BICUBIC, a = -1) as weights of
# the taps at offsets -1, 0, 1, 2 from the fractional position d. The weights
# come from a 1/4096 table plus its first-order Taylor term, with d - grid
# point cut to 12 bits so that the correction products are exact: the same
# weights in every compilation, within 2e-7 of the exact polynomial.
_CUBIC_STEPS = 4096


@functools.lru_cache(maxsize=None)
def _cubic_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  d = (np.arange(_CUBIC_STEPS, dtype=np.float64) / _CUBIC_STEPS)[:, None]
  weights = np.concatenate([-d + 2 * d**2 - d**3, 1 - 2 * d**2 + d**3,
                            d + d**2 - d**3, -d**2 + d**3], axis=-1)
  slopes = np.concatenate([-1 + 4 * d - 3 * d**2, -4 * d + 3 * d**2,
                           1 + 2 * d - 3 * d**2, -2 * d + 3 * d**2], axis=-1)
  slopes = slopes.astype(np.float32)
  slopes_hi = (slopes.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
  return weights.astype(np.float32), slopes_hi, slopes - slopes_hi


def _cubic_weights(fraction):
  """(..., 4) tap weights for fractions in [0, 1)."""
  scaled = fraction * _CUBIC_STEPS  # exact: a power of two
  step = jnp.floor(scaled)
  rest = jnp.floor((scaled - step) * 4096) / (4096 * _CUBIC_STEPS)  # 12 bits
  weights, slopes_hi, slopes_lo = (jnp.asarray(t)[step.astype(jnp.int32)]
                                   for t in _cubic_tables())
  rest = rest[..., None]
  return (weights + slopes_hi * rest) + slopes_lo * rest


@functools.partial(jax.jit, static_argnames="fill")
def shear_x(image, factor, fill=FILL):
  """PIL transform(AFFINE, (1, factor, 0, 0, 1, 0), BICUBIC, fillcolor=fill).

  Row y shifts by s = factor (y+½) (rows are sampled at their centres, so the
  interpolation is along x only, with the same fraction for the whole row).
  """
  image = _check_image(image)
  height, width, channels = image.shape
  hi, lo = _split(factor)
  ys = _centres(height)
  shift = hi * ys + lo * ys  # one rounding of the exact product
  whole = jnp.floor(shift)
  fraction = shift - whole  # exact
  w_hi, w_lo = _split(_cubic_weights(fraction))  # (H, 4) each
  base = jnp.arange(width)[None, :] + whole.astype(jnp.int32)[:, None]
  rows = jnp.arange(height)[:, None]
  taps = [image[rows, jnp.clip(base + offset, 0, width - 1)].astype(jnp.float32)
          for offset in (-1, 0, 1, 2)]
  # centre + sum of w * (tap - centre): exact where the taps are equal, as in
  # PIL's Horner form, and every product is exact; fixed summation order.
  total = taps[1]
  for tap in (0, 2, 3):
    difference = taps[tap] - taps[1]
    total = total + (w_hi[:, None, tap, None] * difference
                     + w_lo[:, None, tap, None] * difference)
  position = _centres(width)[None, :] + shift[:, None]
  inside = (position >= 0) & (position < width)
  return jnp.where(inside[..., None], _to_uint8(total),
                   _fill_value(fill, channels))


@functools.partial(jax.jit, static_argnames="fill")
def shear_y(image, factor, fill=FILL):
  """PIL transform(AFFINE, (1, 0, 0, factor, 1, 0), BICUBIC, fillcolor=fill)."""
  image = _check_image(image)
  return jnp.swapaxes(shear_x(jnp.swapaxes(image, 0, 1), factor, fill), 0, 1)


# --- colour ops --------------------------------------------------------------


def _grey(image):
  """PIL convert("L") as int32 (H, W, 1): ITU-R 601-2 luma in 16-bit fixed point."""
  if image.shape[-1] == 1:
    return image.astype(jnp.int32)
  if image.shape[-1] != 3:
    raise ValueError(f"colour ops need C = 3 or 1, got shape {image.shape}")
  rgb = image.astype(jnp.int32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
          + 0x8000) >> 16
  return luma[..., None]


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): float32, then clip, truncate."""
  degenerate = degenerate.astype(jnp.float32)
  difference = image.astype(jnp.float32) - degenerate
  hi, lo = _split(factor)
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
      total = total + pixels[dy:height - 2 + dy, dx:width - 2 + dx]
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
  counts = jnp.zeros((channels, 256), jnp.int32).at[
      jnp.arange(channels)[None, :], pixels].add(1)
  top = jnp.max(pixels, axis=0)  # the last non-empty bin
  last_count = counts[jnp.arange(channels), top]
  step = ((pixels.shape[0] - last_count) // 255)[:, None]
  before = jnp.cumsum(counts, axis=1) - counts  # pixels below each value
  safe_step = jnp.maximum(step, 1)
  equalized = (safe_step // 2 + before) // safe_step
  values = jnp.arange(256, dtype=jnp.int32)[None, :]
  return _lookup(image, jnp.where(step > 0, equalized, values))


# --- one op by index ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def parameter_table(height: int, width: int) -> np.ndarray:
  """(2 signs, NUM_OPS + 1, 10 magnitudes, 2) float32 op arguments.

  Sign index 0 is +, 1 is -. Computed in float64 as the reference does:
  shear factor, translation in pixels (of the width for X, the height for Y),
  (cos, sin) of the rotation, enhance factor 1 ± value, posterize bits,
  solarize threshold; zeros for ops without an argument and for IDENTITY.
  """
  table = np.zeros((2, NUM_OPS + 1, NUM_MAGNITUDES, 2), np.float64)
  for sign_index, sign in enumerate((1.0, -1.0)):
    for op, name in enumerate(OP_NAMES):
      value = MAGNITUDES[name] * (sign if name in SIGNED_OPS else 1.0)
      if name in ("ShearX", "ShearY", "Posterize", "Solarize"):
        table[sign_index, op, :, 0] = value
      elif name == "TranslateX":
        table[sign_index, op, :, 0] = value * width
      elif name == "TranslateY":
        table[sign_index, op, :, 0] = value * height
      elif name == "Rotate":
        table[sign_index, op, :, 0] = np.cos(np.deg2rad(value))
        table[sign_index, op, :, 1] = np.sin(np.deg2rad(value))
      elif name in ("Color", "Contrast", "Sharpness", "Brightness"):
        table[sign_index, op, :, 0] = 1.0 + value
  return table.astype(np.float32)


_BRANCHES = (
    lambda image, arg: shear_x(image, arg[0]),
    lambda image, arg: shear_y(image, arg[0]),
    lambda image, arg: translate_x(image, arg[0]),
    lambda image, arg: translate_y(image, arg[0]),
    lambda image, arg: _rotate_cos_sin(image, arg[0], arg[1], FILL),
    lambda image, arg: color(image, arg[0]),
    lambda image, arg: contrast(image, arg[0]),
    lambda image, arg: sharpness(image, arg[0]),
    lambda image, arg: brightness(image, arg[0]),
    lambda image, arg: posterize(image, arg[0].astype(jnp.int32)),
    lambda image, arg: solarize(image, arg[0]),
    lambda image, arg: autocontrast(image),
    lambda image, arg: equalize(image),
    lambda image, arg: invert(image),
    lambda image, arg: image,  # IDENTITY
)


@jax.jit
def apply_op(key, image, op_index, magnitude_index):
  """Op `op_index` (into OP_NAMES; IDENTITY = no-op) at magnitude 0..9.

  `key` draws the random sign of signed ops (+ or - with equal chance).
  One lax.switch over all ops, so it compiles once whatever the indices.
  """
  image = _check_image(image)
  height, width, _ = image.shape
  negative = jax.random.bernoulli(key).astype(jnp.int32)
  table = jnp.asarray(parameter_table(height, width))
  arg = table[negative, op_index, magnitude_index]
  return lax.switch(op_index, _BRANCHES, image, arg)
