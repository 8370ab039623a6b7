"""The pure step's pieces: the gradient norm, weight decay, the batch mixing's options, the
parameters' moving average."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lkca_jax import steps
from tests.helpers import leaves_by_path, tiny_digits


def test_the_gradient_norm_is_every_leafs_norm_together_in_one_reduction():
  """Small integers, so every float32 sum of their squares is exact and the norm is the
  correctly rounded square root: equal bit for bit to the float64 norm rounded once."""
  tree = {
    "w": jnp.arange(-6, 6, dtype=jnp.float32).reshape(3, 4),
    "b": jnp.arange(5, dtype=jnp.bfloat16),  # a bfloat16 leaf is widened, not rounded to
    "s": jnp.float32(7),
  }
  exact = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in tree.values()))
  assert float(jax.jit(steps.global_norm)(tree)) == np.float32(exact)
  runs = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)  # as the runs step vmaps it
  np.testing.assert_array_equal(jax.vmap(steps.global_norm)(runs), np.float32([exact, 2 * exact]))
  # One reduction for the whole tree, where a sum per leaf is a kernel per leaf on a GPU.
  assert jax.jit(steps.global_norm).lower(tree).as_text().count("stablehlo.reduce") == 1
  assert jax.jit(optax.tree.norm).lower(tree).as_text().count("stablehlo.reduce") == 3


@pytest.mark.parametrize("name", ["vit_1m", "lkca_t", "acmix_t", "flatten_t"])
def test_weight_decay_on_the_weights_spares_vectors_tokens_and_position_tables(name):
  """With a zero gradient Adam's step is exactly 0 (its moments stay 0), so AdamW's update is
  the decay alone, −lr·wd·p: on every matrix and kernel with "weights"; never on biases,
  norms, scalars, the class token or a position table (timm's rule, DeiT's recipe); on
  every parameter with "all", the reference."""
  from lkca_jax.models import create_model

  model = create_model(
    name,
    num_classes=3,
    image_size=8,
    patch_size=2,
    channels=1,
    depth=1,
    dim=16,
    num_heads=4,
    rngs=nnx.Rngs(0),
    # LKCA's kernel starts at zero, whose decay is zero too: a start that shows it.
    **({"mixer_options": {"lkca": {"kernel_init": "gaussian"}}} if name == "lkca_t" else {}),
  )
  params = steps.variable_values(nnx.state(model, nnx.Param))
  zeros = jax.tree.map(jnp.zeros_like, params)
  lr = 0.5  # a power of 2: −lr·(wd·p) is exact after the product's one rounding

  def updates(weight_decay_on):
    config = tiny_digits(**{"optimizer.weight_decay_on": weight_decay_on})
    mask = steps.weight_decay_mask(config, model)
    tx = steps.create_optimizer(config, lambda step: lr, decay_mask=mask)
    wd = np.float32(config.optimizer.weight_decay)
    return leaves_by_path(tx.update(zeros, tx.init(params), params)[0]), wd

  by_name, wd = updates("weights")
  decayed = {path for path, u in by_name.items() if np.any(u)}
  for path, p in leaves_by_path(params).items():
    if path in decayed:
      np.testing.assert_array_equal(by_name[path], -lr * (wd * p.astype(np.float32)), path)
      assert p.ndim >= 2, path
  spared = set(by_name) - decayed
  assert "['head']['kernel']" in decayed and "['blocks'][0]['mlp']['fc1']['kernel']" in decayed
  # A matrix spared by name: the position table; vectors by their shape.
  assert {"['pos_embed']", "['head']['bias']", "['blocks'][0]['norm1']['scale']"} <= spared
  own_table = {
    "vit_1m": "['cls_token']",
    "acmix_t": "['blocks'][0]['mixer']['relative_bias']",
    "flatten_t": "['blocks'][0]['mixer']['position']",
    "lkca_t": None,
  }[name]
  assert own_table is None or own_table in spared, spared
  if name == "lkca_t":
    assert "['blocks'][0]['mixer']['kernel']" in decayed  # the learned kernel is a weight
  every, _ = updates("all")
  assert all(np.any(every[path]) for path, p in leaves_by_path(params).items() if np.any(p))


def test_the_step_pairs_images_as_the_config_says():
  """`mixing.partner` reaches the step: from the same state, key and batch, every batch
  mixed, the two pairing rules give different losses (and each the same on a rerun)."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  losses = {}
  for partner in ("permutation", "reversed", "permutation"):
    config = tiny_digits(**{"mixing.prob": 1.0, "mixing.partner": partner})
    t = train.build_training(train.Run.prepare(config), config)
    _, metrics = t.step(t.state, 0)
    losses.setdefault(partner, set()).add(float(metrics["loss"][0]))
  assert len(losses["permutation"]) == 1 and losses["permutation"] != losses["reversed"]


def test_each_image_is_weighed_by_its_own_groups_lambda_also_in_slices():
  """`mixing.groups` reaches the step (4 groups: another loss than 1), and each image's
  loss takes its own group's λ: computed in 2 slices (rows m::2, each holding rows of every
  group) the step's loss is the whole batch's up to the order of its sum. 32 non-negative
  terms summed in another order differ by at most 2·31 roundings of the total: < 64·2⁻²⁴."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  def loss(groups, microbatches):
    config = tiny_digits(
      microbatches=microbatches,
      **{"mixing.prob": 1.0, "mixing.groups": groups, "model_overrides.drop_path_rate": 0.0},
    )
    t = train.build_training(train.Run.prepare(config), config)
    return float(t.step(t.state, 0)[1]["loss"][0])

  whole, sliced = loss(4, 1), loss(4, 2)
  assert abs(whole - sliced) <= 64 * 2.0**-24 * whole, (whole, sliced)
  assert loss(1, 1) != whole


def test_the_moving_average_follows_the_parameters_and_changes_nothing_of_the_training():
  """With ema_decay the trained parameters and AdamW's moments are bit for bit those of
  the run without, and the average is ½·average + ½·parameters after each step from the
  initial parameters on. With decay ½ both products are exact, so the sum's one rounding
  is the recurrence's own: bit for bit as well."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  def trained(ema_decay):
    config = tiny_digits(ema_decay=ema_decay, **{"model_overrides.drop_path_rate": 0.1})
    t = train.build_training(train.Run.prepare(config), config)
    state, trajectory = t.state, [jax.device_get(t.state.params)]
    for step in range(3):
      state, _ = t.step(state, step)
      trajectory.append(jax.device_get(state.params))
    return jax.device_get(state), trajectory

  plain, trajectory = trained(0.0)
  averaged, _ = trained(0.5)
  assert steps.average_of(plain.opt_state) is None
  expected = trajectory[0]
  for params in trajectory[1:]:
    expected = jax.tree.map(
      lambda a, p: np.float32(0.5) * a + np.float32(0.5) * p, expected, params
    )
  average = steps.average_of(averaged.opt_state)
  for path, value in leaves_by_path(expected).items():
    np.testing.assert_array_equal(leaves_by_path(average)[path], value, path)
  assert not np.array_equal(  # it moved with the parameters, and lags them
    leaves_by_path(average)["['head']['kernel']"],
    leaves_by_path(trajectory[-1])["['head']['kernel']"],
  )
  np.testing.assert_equal(
    jax.tree.leaves((averaged.params, averaged.opt_state[0])),
    jax.tree.leaves((plain.params, plain.opt_state)),
  )
