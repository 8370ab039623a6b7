"""RandAugment in timm's "increasing" form, named as timm names it: `rand-m9-mstd0.5-inc1`
is DeiT's (Cubuk et al. 2020; Touvron et al. 2021).

Per image, `num_ops` ops are drawn from the 15 of OPS, uniformly and with replacement, and
applied in turn, each with probability `probability` (timm's 0.5), at a magnitude m drawn
for that application from N(magnitude, magnitude_std), clipped to [0, magnitude_max]. Every
op grows stronger with m (f = m / 10):

  AutoContrast, Equalize, Invert      no argument
  Rotate                              ±30 f degrees
  PosterizeIncreasing                 keep 4 - int(4 f) bits
  SolarizeIncreasing                  invert from 256 - int(256 f)
  SolarizeAdd                         add int(110 f) below 128
  Color/Contrast/Brightness/SharpnessIncreasing   factor max(0.1, 1 ± 0.9 f)
  ShearX, ShearY                      ±0.3 f
  TranslateXRel, TranslateYRel        ±0.45 f of the width / height

± is a fair coin per application. The ops are `ops`' PIL-exact ones; the geometric ones
interpolate bicubically (DeiT trains with --train-interpolation bicubic, which timm passes
to RandAugment) and fill with `fill` (timm: the dataset's mean colour).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lkca_jax.augment import ops

LEVELS = 10.0  # timm's _LEVEL_DENOM: magnitude m is the fraction m / 10 of each op's range
SPEC_FORM = "rand-m<M>[-n<N>][-mstd<S>][-mmax<X>]-inc1, e.g. rand-m9-mstd0.5-inc1 (DeiT's)"


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """One RandAugment setting (hashable: a static argument of `apply`)."""

  magnitude: float
  num_ops: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = LEVELS
  probability: float = 0.5


def is_spec(text) -> bool:
  """Whether `text` names a RandAugment (starts "rand-"), as opposed to an AutoAugment policy."""
  return isinstance(text, str) and text.startswith("rand-")


def parse(spec: str) -> RandAugment:
  """timm's RandAugment string → RandAugment; ValueError naming the form for anything else.

  Sections after "rand": m (magnitude, default 10), n (ops per image, default 2), mstd
  (magnitude noise, default 0), mmax (upper clip, default 10), and inc1, which is required:
  only the increasing ops are offered."""
  parts = spec.split("-") if isinstance(spec, str) else []
  if not parts or parts[0] != "rand":
    raise ValueError(f"a RandAugment is {SPEC_FORM}; got {spec!r}")
  values = {}
  for part in parts[1:]:
    match = re.fullmatch(r"(m|n|mstd|mmax|inc)(\d+(?:\.\d+)?)", part)
    if match is None or match.group(1) in values:
      raise ValueError(f"RandAugment {spec!r}: bad section {part!r}; the form is {SPEC_FORM}")
    values[match.group(1)] = match.group(2)
  if values.pop("inc", None) != "1":
    raise ValueError(
      f"RandAugment {spec!r}: only timm's increasing ops are offered; end it with -inc1"
    )
  try:
    augment = RandAugment(
      magnitude=int(values.get("m", LEVELS)),
      num_ops=int(values.get("n", 2)),
      magnitude_std=float(values.get("mstd", 0.0)),
      magnitude_max=float(int(values.get("mmax", LEVELS))),
    )
  except ValueError:  # a decimal point where timm reads an integer
    raise ValueError(f"RandAugment {spec!r}: m, n and mmax are integers ({SPEC_FORM})") from None
  if augment.num_ops < 1 or augment.magnitude_max <= 0:
    raise ValueError(f"RandAugment {spec!r}: needs n >= 1 and mmax > 0")
  if augment.magnitude_std > 100:  # timm then draws m uniformly from [0, M]
    raise ValueError(
      f"RandAugment {spec!r}: timm's uniform magnitudes (mstd > 100) are not offered"
    )
  return augment


def mean_fill(mean) -> tuple[int, ...]:
  """timm's fill colour for a dataset mean in [0, 1]: each channel's round(255 mean)."""
  return tuple(min(255, round(255 * float(m))) for m in mean)


def _signed(value, negative):
  return jnp.where(negative, -value, value)


def _quotient(x, denominator: int):
  """x / denominator correctly rounded to float32, for a whole `denominator` below 2^12.

  XLA turns a division by a constant into a product with its rounded reciprocal, a unit in
  the last place off at times; of that product and its two neighbours this keeps the one
  whose exact product with the denominator is nearest x (each such product taken exactly
  in two 12-bit halves). For an exact x, the float32 of x / denominator: so whole
  magnitudes meet timm's float64 levels as PIL reads them (float32 factors, int() counts)."""
  approximate = x * (1.0 / denominator)
  candidates = jnp.stack(
    [jnp.nextafter(approximate, -jnp.inf), approximate, jnp.nextafter(approximate, jnp.inf)]
  )
  hi, lo = ops.split(candidates)
  residual = (x - hi * denominator) - lo * denominator
  return candidates[jnp.argmin(jnp.abs(residual))]


def _whole_part(m, numerator: int, denominator: int):
  """int(m · numerator / denominator), timm's int() of a level >= 0 (exact for a whole m:
  the quotient is then a whole number or at least 1 / denominator from one)."""
  return jnp.floor(_quotient(m * numerator, denominator)).astype(jnp.int32)


# timm's level of each op, the arguments its function takes after the image, from the
# magnitude m (0 … magnitude_max), the sign drawn, and the image's height and width: for a
# whole m, the float32 of timm's value (the rotation's cos and sin: of float32 radians).
def _none(m, negative, height, width):
  return ()


def _degrees(m, negative, height, width):
  radians = jnp.deg2rad(_signed(m * 3.0, negative))  # (m / 10) 30 degrees
  return jnp.cos(radians), jnp.sin(radians)


def _bits(m, negative, height, width):
  return (4 - _whole_part(m, 4, 10),)


def _threshold(m, negative, height, width):
  return (256 - _whole_part(m, 256, 10),)


def _addition(m, negative, height, width):
  return (_whole_part(m, 110, 10),)


def _factor(m, negative, height, width):  # 1 ± 0.9 (m / 10); 1: the image as it is
  return (jnp.maximum(0.1, _quotient(100.0 + _signed(9.0 * m, negative), 100)),)


def _shear(m, negative, height, width):  # 0.3 (m / 10)
  return (_signed(_quotient(3.0 * m, 100), negative),)


def _pixels_x(m, negative, height, width):  # 0.45 (m / 10) of the width
  return (_signed(_quotient(45.0 * width * m, 1000), negative),)


def _pixels_y(m, negative, height, width):
  return (_signed(_quotient(45.0 * height * m, 1000), negative),)


@dataclasses.dataclass(frozen=True)
class Op:
  """One of timm's ops: its name, the `ops` function that does it, and its level."""

  name: str
  fn: Callable[..., jax.Array]  # fn(image, *level, [fill])
  level: Callable[..., tuple]  # level(m, negative, height, width)
  geometric: bool = False  # fn takes the fill colour


# The 15 ops of timm's _RAND_INCREASING_TRANSFORMS, in its order. An op's index here is its
# branch in `apply_op`'s switch.
OPS = (
  Op("AutoContrast", ops.autocontrast, _none),
  Op("Equalize", ops.equalize, _none),
  Op("Invert", ops.invert, _none),
  Op("Rotate", ops.rotate_bicubic, _degrees, geometric=True),
  Op("PosterizeIncreasing", ops.posterize, _bits),
  Op("SolarizeIncreasing", ops.solarize, _threshold),
  Op("SolarizeAdd", ops.solarize_add, _addition),
  Op("ColorIncreasing", ops.color, _factor),
  Op("ContrastIncreasing", ops.contrast, _factor),
  Op("BrightnessIncreasing", ops.brightness, _factor),
  Op("SharpnessIncreasing", ops.sharpness, _factor),
  Op("ShearX", ops.shear_x, _shear, geometric=True),
  Op("ShearY", ops.shear_y, _shear, geometric=True),
  Op("TranslateXRel", ops.translate_x_bicubic, _pixels_x, geometric=True),
  Op("TranslateYRel", ops.translate_y_bicubic, _pixels_y, geometric=True),
)
OP_NAMES = tuple(op.name for op in OPS)
IDENTITY = len(OPS)  # the switch's extra branch: an op not applied


def _branch(op: Op, fill: tuple[int, ...]):
  def branch(image, m, negative):
    level = op.level(m, negative, *image.shape[:2])
    return op.fn(image, *level, fill) if op.geometric else op.fn(image, *level)

  return branch


@functools.cache
def _branches(fill: tuple[int, ...]):
  keep = lambda image, m, negative: image  # noqa: E731
  return tuple(_branch(op, fill) for op in OPS) + (keep,)


def draw(rng, augment: RandAugment):
  """What RandAugment does to one image: (op indices (num_ops,) into OPS, IDENTITY where
  the op is not applied; magnitudes (num_ops,); signs (num_ops,) bool, True: negative)."""
  choice_key, apply_key, magnitude_key, sign_key = jax.random.split(rng, 4)
  count = augment.num_ops
  indices = jax.random.randint(choice_key, (count,), 0, len(OPS))
  applied = jax.random.uniform(apply_key, (count,)) < augment.probability
  noise = augment.magnitude_std * jax.random.normal(magnitude_key, (count,))
  magnitude = jnp.clip(augment.magnitude + noise, 0.0, augment.magnitude_max)
  negative = jax.random.uniform(sign_key, (count,)) > 0.5
  return jnp.where(applied, indices, IDENTITY), magnitude, negative


@functools.partial(jax.jit, static_argnames="fill")
def apply_op(image, index, magnitude, negative, fill: tuple[int, ...] = (ops.FILL,) * 3):
  """Op `index` of OPS (IDENTITY: none) on one uint8 (H, W, C) image at `magnitude`, its
  sign negative where `negative`; `fill` (static) has one value per channel."""
  image = jnp.asarray(image)  # every branch is traced, and each op checks it
  magnitude = jnp.asarray(magnitude, jnp.float32)
  return lax.switch(index, _branches(fill[: image.shape[-1]]), image, magnitude, negative)


@functools.partial(jax.jit, static_argnames=("augment", "fill"))
def apply(rng, image, augment: RandAugment, fill: tuple[int, ...] = (ops.FILL,) * 3):
  """RandAugment on one uint8 (H, W, C) image (`draw`, then its ops in turn); `fill`
  (static) has one value per channel."""
  indices, magnitudes, negative = draw(rng, augment)

  def one_op(image, op):  # a scan, so the switch over all ops compiles once
    return apply_op(image, *op, fill), None

  image, _ = lax.scan(one_op, jnp.asarray(image), (indices, magnitudes, negative))
  return image
