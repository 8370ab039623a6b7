"""AutoAugment policies (docs/method.md, "AutoAugment policies") and sub-policy sampling.

Statistical checks use fixed keys and 5-sigma bounds: a correct sampler fails
with probability ~1e-6 per bound (the result is deterministic for these keys
anyway), while a wrong probability, a skewed choice or a swapped order moves
the counts by tens of sigmas.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lkca_jax.augment import POLICIES, autoaugment, ops

# The reference's tables (docs/method.md, "AutoAugment policies"), transcribed
# as (p1, op1, m1, p2, op2, m2) in their order.
TABLES = {
  "cifar10": [
    (0.1, "Invert", 7, 0.2, "Contrast", 6),
    (0.7, "Rotate", 2, 0.3, "TranslateX", 9),
    (0.8, "Sharpness", 1, 0.9, "Sharpness", 3),
    (0.5, "ShearY", 8, 0.7, "TranslateY", 9),
    (0.5, "AutoContrast", 8, 0.9, "Equalize", 2),
    (0.2, "ShearY", 7, 0.3, "Posterize", 7),
    (0.4, "Color", 3, 0.6, "Brightness", 7),
    (0.3, "Sharpness", 9, 0.7, "Brightness", 9),
    (0.6, "Equalize", 5, 0.5, "Equalize", 1),
    (0.6, "Contrast", 7, 0.6, "Sharpness", 5),
    (0.7, "Color", 7, 0.5, "TranslateX", 8),
    (0.3, "Equalize", 7, 0.4, "AutoContrast", 8),
    (0.4, "TranslateY", 3, 0.2, "Sharpness", 6),
    (0.9, "Brightness", 6, 0.2, "Color", 8),
    (0.5, "Solarize", 2, 0.0, "Invert", 3),
    (0.2, "Equalize", 0, 0.6, "AutoContrast", 0),
    (0.2, "Equalize", 8, 0.6, "Equalize", 4),
    (0.9, "Color", 9, 0.6, "Equalize", 6),
    (0.8, "AutoContrast", 4, 0.2, "Solarize", 8),
    (0.1, "Brightness", 3, 0.7, "Color", 0),
    (0.4, "Solarize", 5, 0.9, "AutoContrast", 3),
    (0.9, "TranslateY", 9, 0.7, "TranslateY", 9),
    (0.9, "AutoContrast", 2, 0.8, "Solarize", 3),
    (0.8, "Equalize", 8, 0.1, "Invert", 3),
    (0.7, "TranslateY", 9, 0.9, "AutoContrast", 1),
  ],
  "svhn": [
    (0.9, "ShearX", 4, 0.2, "Invert", 3),
    (0.9, "ShearY", 8, 0.7, "Invert", 5),
    (0.6, "Equalize", 5, 0.6, "Solarize", 6),
    (0.9, "Invert", 3, 0.6, "Equalize", 3),
    (0.6, "Equalize", 1, 0.9, "Rotate", 3),
    (0.9, "ShearX", 4, 0.8, "AutoContrast", 3),
    (0.9, "ShearY", 8, 0.4, "Invert", 5),
    (0.9, "ShearY", 5, 0.2, "Solarize", 6),
    (0.9, "Invert", 6, 0.8, "AutoContrast", 1),
    (0.6, "Equalize", 3, 0.9, "Rotate", 3),
    (0.9, "ShearX", 4, 0.3, "Solarize", 3),
    (0.8, "ShearY", 8, 0.7, "Invert", 4),
    (0.9, "Equalize", 5, 0.6, "TranslateY", 6),
    (0.9, "Invert", 4, 0.6, "Equalize", 7),
    (0.3, "Contrast", 3, 0.8, "Rotate", 4),
    (0.8, "Invert", 5, 0.0, "TranslateY", 2),
    (0.7, "ShearY", 6, 0.4, "Solarize", 8),
    (0.6, "Invert", 4, 0.8, "Rotate", 4),
    (0.3, "ShearY", 7, 0.9, "TranslateX", 3),
    (0.1, "ShearX", 6, 0.6, "Invert", 5),
    (0.7, "Solarize", 2, 0.6, "TranslateY", 7),
    (0.8, "ShearY", 4, 0.8, "Invert", 8),
    (0.7, "ShearX", 9, 0.8, "TranslateY", 3),
    (0.8, "ShearY", 5, 0.7, "AutoContrast", 3),
    (0.7, "ShearX", 2, 0.1, "Invert", 5),
  ],
  "imagenet": [
    (0.4, "Posterize", 8, 0.6, "Rotate", 9),
    (0.6, "Solarize", 5, 0.6, "AutoContrast", 5),
    (0.8, "Equalize", 8, 0.6, "Equalize", 3),
    (0.6, "Posterize", 7, 0.6, "Posterize", 6),
    (0.4, "Equalize", 7, 0.2, "Solarize", 4),
    (0.4, "Equalize", 4, 0.8, "Rotate", 8),
    (0.6, "Solarize", 3, 0.6, "Equalize", 7),
    (0.8, "Posterize", 5, 1.0, "Equalize", 2),
    (0.2, "Rotate", 3, 0.6, "Solarize", 8),
    (0.6, "Equalize", 8, 0.4, "Posterize", 6),
    (0.8, "Rotate", 8, 0.4, "Color", 0),
    (0.4, "Rotate", 9, 0.6, "Equalize", 2),
    (0.0, "Equalize", 7, 0.8, "Equalize", 8),
    (0.6, "Invert", 4, 1.0, "Equalize", 8),
    (0.6, "Color", 4, 1.0, "Contrast", 8),
    (0.8, "Rotate", 8, 1.0, "Color", 2),
    (0.8, "Color", 8, 0.8, "Solarize", 7),
    (0.4, "Sharpness", 7, 0.6, "Invert", 8),
    (0.6, "ShearX", 5, 1.0, "Equalize", 9),
    (0.4, "Color", 0, 0.6, "Equalize", 3),
    (0.4, "Equalize", 7, 0.2, "Solarize", 4),
    (0.6, "Solarize", 5, 0.6, "AutoContrast", 5),
    (0.6, "Invert", 4, 1.0, "Equalize", 8),
    (0.6, "Color", 4, 1.0, "Contrast", 8),
    (0.8, "Equalize", 8, 0.6, "Equalize", 3),
  ],
}


def _within_5_sigma(count, total, probability):
  sigma = np.sqrt(total * probability * (1 - probability))
  return abs(count - total * probability) <= 5 * sigma


def test_policies_equal_the_reference_tables():
  assert sorted(POLICIES) == ["cifar10", "imagenet", "svhn"]
  for name, rows in TABLES.items():
    assert len(POLICIES[name]) == 25 and len(rows) == 25
    flat = [first + second for first, second in POLICIES[name]]
    assert flat == rows, name


def test_policy_ops_exist_and_values_are_in_range():
  used = set()
  for name in POLICIES:
    probabilities, op_indices, magnitudes = autoaugment.policy_arrays(name)
    assert probabilities.shape == op_indices.shape == magnitudes.shape == (25, 2)
    for subpolicy, ops_row in zip(POLICIES[name], op_indices, strict=True):
      assert [ops.OP_NAMES[i] for i in ops_row] == [op for _, op, _ in subpolicy]
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert magnitudes.min() >= 0 and magnitudes.max() <= 9
    used |= {op for subpolicy in POLICIES[name] for _, op, _ in subpolicy}
  assert used == set(ops.OP_NAMES)  # all 14 ops appear in some policy


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_subpolicy_choice_is_uniform_and_ops_apply_with_their_probability(name):
  draws = 25_000
  keys = jax.random.split(jax.random.key(11), draws)
  sample = jax.jit(jax.vmap(functools.partial(autoaugment.sample_subpolicy, policy=name)))
  index, applied, _ = sample(keys)
  index, applied = np.asarray(index), np.asarray(applied)
  probabilities, _, _ = autoaugment.policy_arrays(name)
  counts = np.bincount(index, minlength=25)
  assert len(counts) == 25
  assert all(_within_5_sigma(count, draws, 1 / 25) for count in counts), counts
  for row in range(25):
    chosen = applied[index == row]
    for slot in range(2):
      p = probabilities[row, slot]
      hits = chosen[:, slot].sum()
      if p in (0.0, 1.0):
        assert hits == p * len(chosen)  # never / always
      else:
        assert _within_5_sigma(hits, len(chosen), p), (row, slot, hits, len(chosen), p)


def test_two_ops_apply_in_order_with_independent_probabilities():
  # A constant image of 10 tells every outcome apart: Invert -> 245,
  # Posterize 4 bits -> 0, both in order -> 240 (the other order gives 255),
  # and the second sub-policy's Posterize 6 bits -> 8.
  policy = (
    ((0.3, "Invert", 0), (0.6, "Posterize", 9)),
    ((1.0, "Posterize", 5), (0.0, "Invert", 0)),
  )
  draws = 8_000
  image = jnp.full((4, 4, 3), 10, jnp.uint8)
  keys = jax.random.split(jax.random.key(5), draws)
  apply = jax.jit(jax.vmap(lambda key: autoaugment.apply_policy(key, image, policy)))
  out = np.asarray(apply(keys))
  assert (out == out[:, :1, :1, :1]).all()  # each result is constant
  values = out[:, 0, 0, 0]
  expected = {
    10: 0.5 * 0.7 * 0.4,
    245: 0.5 * 0.3 * 0.4,
    0: 0.5 * 0.7 * 0.6,
    240: 0.5 * 0.3 * 0.6,
    8: 0.5,
  }
  assert set(np.unique(values)) == set(expected)
  for value, probability in expected.items():
    assert _within_5_sigma(np.sum(values == value), draws, probability), value


def test_bad_policies_are_rejected():
  with pytest.raises(ValueError, match="cifar10"):
    autoaugment.policy_arrays("cifar100")
  with pytest.raises(ValueError, match="Shear"):
    autoaugment.policy_arrays((((0.5, "Shear", 3), (0.5, "Invert", 0)),))
  with pytest.raises(ValueError, match="m <= 9"):
    autoaugment.policy_arrays((((0.5, "ShearX", 10), (0.5, "Invert", 0)),))
