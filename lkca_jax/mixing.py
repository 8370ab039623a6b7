"""Batch-level CutMix / Mixup as the reference trainer applies them.

Per batch: with probability `prob` the batch is mixed, else left clean; a
mixed batch is CutMix or Mixup with equal chance (by default). Each image's
partner is its image in a random permutation of the batch (the reference's)
or in the batch reversed (timm's `Mixup`, as DeiT trains): `PARTNERS`. The
loss is then λ·CE(y_a) + (1 − λ)·CE(y_b); for CutMix λ is recomputed from the
clipped box.

With `groups` = G > 1 the batch is mixed as G processes of a data-parallel
PyTorch trainer mix theirs: rows g, g + G, g + 2G, … (the rows a distributed
sampler deals process g) are one group, which draws its own decisions, λ and box
and pairs its rows among themselves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Candidates each Gamma draw of `beta` tries at once. Marsaglia and Tsang's test accepts a
# candidate with probability above 0.95 at every shape >= 1 (smaller shapes are boosted to
# one above), so all of them fail with probability below 0.05**16 < 2e-21.
GAMMA_CANDIDATES = 16

# How each image's partner is chosen: image permutation[i], or image B - 1 - i.
PARTNERS = ("permutation", "reversed")


def log_gamma(key, alpha: float):
  """log of a Gamma(alpha, 1) draw (alpha > 0, a Python float), with no data-dependent loop.

  Marsaglia and Tsang's method with its rejection loop unrolled into GAMMA_CANDIDATES
  candidates drawn at once: the first accepted one is distributed exactly as the loop's
  result. `jax.random.gamma` loops until it accepts, and a GPU runs each trip of such a
  loop as a round trip to the host. Should every candidate fail (probability below 2e-21),
  the draw is the proposal's centre. Shapes below 1 use G(a) = G(a + 1)·U^(1/a), in logs
  so that a small U cannot underflow.
  """
  shape = alpha + 1.0 if alpha < 1.0 else alpha
  d = shape - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  k_x, k_u, k_boost = jax.random.split(key, 3)
  x = jax.random.normal(k_x, (GAMMA_CANDIDATES,))
  u = 1.0 - jax.random.uniform(k_u, (GAMMA_CANDIDATES,))  # in (0, 1]: its log is finite
  v = (1.0 + c * x) ** 3
  positive = v > 0
  v = jnp.where(positive, v, 1.0)  # a candidate with v <= 0 is rejected: its log is not needed
  log_v = jnp.log(v)
  accept = positive & (jnp.log(u) < 0.5 * x * x + d - d * v + d * log_v)
  log_v = jnp.where(jnp.any(accept), log_v[jnp.argmax(accept)], 0.0)
  log_g = math.log(d) + log_v
  if alpha < 1.0:
    log_g = log_g + jnp.log(1.0 - jax.random.uniform(k_boost)) / alpha
  return log_g


def beta(key, a: float, b: float):
  """A Beta(a, b) draw as X / (X + Y) of two Gamma draws (`log_gamma`): no loop either."""
  k_a, k_b = jax.random.split(key)
  return jax.nn.sigmoid(log_gamma(k_a, a) - log_gamma(k_b, b))


def cutmix_box(key, height: int, width: int, lam):
  """Box (y0, y1, x0, x1) of area ≈ (1 − λ)·H·W centred uniformly, clipped to the image."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def partner_indices(key, size: int, partner: str = "permutation") -> jax.Array:
  """Index of each of a batch's `size` images' partner, chosen as `partner` (`PARTNERS`)
  says; `key` draws the permutation."""
  if partner == "permutation":
    return jax.random.permutation(key, size)
  if partner == "reversed":
    return jnp.arange(size - 1, -1, -1)
  raise ValueError(f"partner={partner!r}; choose one of {', '.join(PARTNERS)}")


def check_groups(batch_size: int, groups: int) -> None:
  """ValueError unless `groups` (>= 1) divides the batch into groups of equal size."""
  if groups < 1 or batch_size % groups:
    raise ValueError(
      f"mixing.groups={groups} does not divide the batch of {batch_size} into equal groups; "
      f"set --config.mixing.groups to a divisor of {batch_size}"
    )


def mix_batch(key, images, labels, *, groups: int = 1, **options):
  """Returns (images, labels_a, labels_b, lam), lam one value per image (1 where clean).

  `options` are `mix_group`'s. With `groups` = G > 1, rows g, g + G, … are mixed as one
  batch of their own (`mix_group`) with the key `split(key, G)[g]`."""
  size = images.shape[0]
  if groups == 1:
    images, labels_a, labels_b, lam = mix_group(key, images, labels, **options)
    return images, labels_a, labels_b, jnp.broadcast_to(lam, (size,))
  check_groups(size, groups)

  def grouped(x):  # (B, ...) -> (G, B / G, ...), group g = rows g::G
    return jnp.swapaxes(x.reshape(size // groups, groups, *x.shape[1:]), 0, 1)

  def ungrouped(x):
    return jnp.swapaxes(x, 0, 1).reshape(size, *x.shape[2:])

  keys = jax.random.split(key, groups)
  mixed = jax.vmap(lambda k, x, y: mix_group(k, x, y, **options))(
    keys, grouped(images), grouped(labels)
  )
  images, labels_a, labels_b, lam = mixed
  return ungrouped(images), ungrouped(labels_a), ungrouped(labels_b), jnp.tile(lam, size // groups)


def mix_group(
  key,
  images,
  labels,
  *,
  prob: float,
  cutmix_prob: float,
  cutmix_alpha: float,
  mixup_alpha: float,
  partner: str = "permutation",
):
  """One batch mixed with one set of draws: (images, labels_a, labels_b, lam), lam a scalar,
  1 for a clean batch. `partner` chooses each image's partner (`PARTNERS`); the other draws
  do not depend on it."""
  k_mix, k_kind, k_perm, k_cut_lam, k_mix_lam, k_box = jax.random.split(key, 6)
  _, height, width, _ = images.shape
  partners = partner_indices(k_perm, images.shape[0], partner)
  other, labels_b = images[partners], labels[partners]

  lam_cut = beta(k_cut_lam, cutmix_alpha, cutmix_alpha)
  y0, y1, x0, x1 = cutmix_box(k_box, height, width, lam_cut)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cutmixed = jnp.where(inside[None, :, :, None], other, images)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)

  lam_mix = beta(k_mix_lam, mixup_alpha, mixup_alpha)
  mixed_up = lam_mix * images + (1.0 - lam_mix) * other

  do_mix = jax.random.uniform(k_mix) < prob
  use_cutmix = jax.random.uniform(k_kind) < cutmix_prob
  mixed = jnp.where(use_cutmix, cutmixed, mixed_up)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  images = jnp.where(do_mix, mixed, images).astype(images.dtype)
  lam = jnp.where(do_mix, lam, 1.0).astype(jnp.float32)
  return images, labels, jnp.where(do_mix, labels_b, labels), lam
