"""AutoAugment (Cubuk et al., 2019): its three learned policies, and applying them.

A policy is 25 sub-policies ((p1, op1, m1), (p2, op2, m2)). Per image one
sub-policy is drawn uniformly, then each of its two ops is applied, in order,
with its own probability (random.random() < p, as in the reference). The ops
and their magnitudes are the table ops.OPS (docs/method.md, "AutoAugment
policies").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lkca_jax.augment import ops


def _parse(text: str) -> tuple:
  """'0.1 Invert 7, 0.2 Contrast 6; ...' -> (((0.1, 'Invert', 7), (0.2, 'Contrast', 6)), ...)."""
  subpolicies = []
  for item in text.split(";"):
    pair = []
    for op in item.split(","):
      probability, name, magnitude = op.split()
      pair.append((float(probability), name, int(magnitude)))
    subpolicies.append(tuple(pair))
  return tuple(subpolicies)


# Transcribed from docs/method.md, "AutoAugment policies", in its order.
POLICIES = {
  "cifar10": _parse(
    "0.1 Invert 7, 0.2 Contrast 6; 0.7 Rotate 2, 0.3 TranslateX 9;"
    "0.8 Sharpness 1, 0.9 Sharpness 3; 0.5 ShearY 8, 0.7 TranslateY 9;"
    "0.5 AutoContrast 8, 0.9 Equalize 2; 0.2 ShearY 7, 0.3 Posterize 7;"
    "0.4 Color 3, 0.6 Brightness 7; 0.3 Sharpness 9, 0.7 Brightness 9;"
    "0.6 Equalize 5, 0.5 Equalize 1; 0.6 Contrast 7, 0.6 Sharpness 5;"
    "0.7 Color 7, 0.5 TranslateX 8; 0.3 Equalize 7, 0.4 AutoContrast 8;"
    "0.4 TranslateY 3, 0.2 Sharpness 6; 0.9 Brightness 6, 0.2 Color 8;"
    "0.5 Solarize 2, 0.0 Invert 3; 0.2 Equalize 0, 0.6 AutoContrast 0;"
    "0.2 Equalize 8, 0.6 Equalize 4; 0.9 Color 9, 0.6 Equalize 6;"
    "0.8 AutoContrast 4, 0.2 Solarize 8; 0.1 Brightness 3, 0.7 Color 0;"
    "0.4 Solarize 5, 0.9 AutoContrast 3; 0.9 TranslateY 9, 0.7 TranslateY 9;"
    "0.9 AutoContrast 2, 0.8 Solarize 3; 0.8 Equalize 8, 0.1 Invert 3;"
    "0.7 TranslateY 9, 0.9 AutoContrast 1"
  ),
  "svhn": _parse(
    "0.9 ShearX 4, 0.2 Invert 3; 0.9 ShearY 8, 0.7 Invert 5;"
    "0.6 Equalize 5, 0.6 Solarize 6; 0.9 Invert 3, 0.6 Equalize 3;"
    "0.6 Equalize 1, 0.9 Rotate 3; 0.9 ShearX 4, 0.8 AutoContrast 3;"
    "0.9 ShearY 8, 0.4 Invert 5; 0.9 ShearY 5, 0.2 Solarize 6;"
    "0.9 Invert 6, 0.8 AutoContrast 1; 0.6 Equalize 3, 0.9 Rotate 3;"
    "0.9 ShearX 4, 0.3 Solarize 3; 0.8 ShearY 8, 0.7 Invert 4;"
    "0.9 Equalize 5, 0.6 TranslateY 6; 0.9 Invert 4, 0.6 Equalize 7;"
    "0.3 Contrast 3, 0.8 Rotate 4; 0.8 Invert 5, 0.0 TranslateY 2;"
    "0.7 ShearY 6, 0.4 Solarize 8; 0.6 Invert 4, 0.8 Rotate 4;"
    "0.3 ShearY 7, 0.9 TranslateX 3; 0.1 ShearX 6, 0.6 Invert 5;"
    "0.7 Solarize 2, 0.6 TranslateY 7; 0.8 ShearY 4, 0.8 Invert 8;"
    "0.7 ShearX 9, 0.8 TranslateY 3; 0.8 ShearY 5, 0.7 AutoContrast 3;"
    "0.7 ShearX 2, 0.1 Invert 5"
  ),
  "imagenet": _parse(
    "0.4 Posterize 8, 0.6 Rotate 9; 0.6 Solarize 5, 0.6 AutoContrast 5;"
    "0.8 Equalize 8, 0.6 Equalize 3; 0.6 Posterize 7, 0.6 Posterize 6;"
    "0.4 Equalize 7, 0.2 Solarize 4; 0.4 Equalize 4, 0.8 Rotate 8;"
    "0.6 Solarize 3, 0.6 Equalize 7; 0.8 Posterize 5, 1.0 Equalize 2;"
    "0.2 Rotate 3, 0.6 Solarize 8; 0.6 Equalize 8, 0.4 Posterize 6;"
    "0.8 Rotate 8, 0.4 Color 0; 0.4 Rotate 9, 0.6 Equalize 2;"
    "0.0 Equalize 7, 0.8 Equalize 8; 0.6 Invert 4, 1.0 Equalize 8;"
    "0.6 Color 4, 1.0 Contrast 8; 0.8 Rotate 8, 1.0 Color 2;"
    "0.8 Color 8, 0.8 Solarize 7; 0.4 Sharpness 7, 0.6 Invert 8;"
    "0.6 ShearX 5, 1.0 Equalize 9; 0.4 Color 0, 0.6 Equalize 3;"
    "0.4 Equalize 7, 0.2 Solarize 4; 0.6 Solarize 5, 0.6 AutoContrast 5;"
    "0.6 Invert 4, 1.0 Equalize 8; 0.6 Color 4, 1.0 Contrast 8;"
    "0.8 Equalize 8, 0.6 Equalize 3"
  ),
}


@functools.cache
def policy_arrays(policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(probabilities f32, op indices i32, magnitudes i32), each (n, 2).

  `policy` is a name in POLICIES or a tuple of sub-policies in their format.
  """
  if isinstance(policy, str):
    if policy not in POLICIES:
      raise ValueError(f"unknown AutoAugment policy {policy!r}; use one of {sorted(POLICIES)}")
    policy = POLICIES[policy]
  probabilities, op_indices, magnitudes = [], [], []
  for subpolicy in policy:
    if len(subpolicy) != 2:
      raise ValueError(f"a sub-policy is two (p, op, m) triples, got {subpolicy}")
    for probability, name, magnitude in subpolicy:
      if name not in ops.OPS_BY_NAME:
        raise ValueError(f"unknown AutoAugment op {name!r}; use one of {ops.OP_NAMES}")
      if not (0.0 <= probability <= 1.0 and 0 <= magnitude < ops.NUM_MAGNITUDES):
        raise ValueError(f"need 0 <= p <= 1 and 0 <= m <= 9, got {(probability, name, magnitude)}")
    probabilities.append([p for p, _, _ in subpolicy])
    op_indices.append([ops.OP_NAMES.index(name) for _, name, _ in subpolicy])
    magnitudes.append([m for _, _, m in subpolicy])
  if not probabilities:
    raise ValueError("a policy needs at least one sub-policy")
  return (
    np.asarray(probabilities, np.float32),
    np.asarray(op_indices, np.int32),
    np.asarray(magnitudes, np.int32),
  )


@functools.partial(jax.jit, static_argnames="policy")
def sample_subpolicy(rng, policy):
  """Draws what AutoAugment does to one image.

  Returns (index of the sub-policy, (2,) bool: which of its ops are applied,
  (2,) keys for the ops' random signs).
  """
  probabilities, _, _ = policy_arrays(policy)
  count = probabilities.shape[0]
  draw_key, sign_key = jax.random.split(rng)
  pick, *chances = jax.random.uniform(draw_key, (3,))  # one draw: cheap to compile
  index = jnp.minimum(jnp.floor(pick * count).astype(jnp.int32), count - 1)
  applied = jnp.stack(chances) < jnp.asarray(probabilities)[index]
  return index, applied, jax.random.split(sign_key, 2)


@functools.partial(jax.jit, static_argnames="policy")
def apply_policy(rng, image, policy):
  """One uniformly drawn sub-policy applied to a uint8 (H, W, C) image.

  `policy` (static) is a name in POLICIES or a tuple of sub-policies.
  """
  _, op_indices, magnitudes = policy_arrays(policy)
  index, applied, sign_keys = sample_subpolicy(rng, policy)
  op_indices = jnp.where(applied, jnp.asarray(op_indices)[index], ops.IDENTITY)

  def apply_one(image, op):  # a scan, so the switch over all ops compiles once
    op_index, magnitude, sign_key = op
    return ops.apply_op(sign_key, image, op_index, magnitude), None

  image, _ = jax.lax.scan(apply_one, image, (op_indices, jnp.asarray(magnitudes)[index], sign_keys))
  return image
