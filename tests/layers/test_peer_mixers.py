"""The mixer contract, for each peer mixer: clear construction errors, grid checks,
training inside any preset, and size-matched presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax.layers import MIXERS
from lkca_jax.models import PRESETS, count_params, create_model

BATCH = 2
PEERS = ["acmix", "flatten"]


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=5), r"divisible by num_heads \(5\)"),
    (dict(grid=(0, 4)), "grid must be positive"),
    (dict(grid=(4, 0)), "grid must be positive"),
])
def test_bad_construction_raises_value_error(name, kwargs, match):
  kwargs = {"grid": (4, 4), "num_heads": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    MIXERS[name](8, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("name", PEERS)
def test_wrong_token_count_raises_value_error(name):
  module = MIXERS[name](8, (3, 5), num_heads=2, rngs=nnx.Rngs(0))
  assert module.needs_grid
  with pytest.raises(ValueError, match=r"\(B, 15, D\).*3x5 grid.*class token excluded"):
    module(jnp.ones((BATCH, 16, 8)))


def logits_and_grads(model, images):
  """Logits and d(Σ logits²)/d(parameters), for one jitted call."""
  def loss(m):
    logits = m(images)
    return jnp.sum(logits ** 2), logits

  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


@pytest.mark.parametrize("name", PEERS)
def test_inside_create_model_every_parameter_gets_a_gradient(name):
  model = create_model("lkca_t", num_classes=10, image_size=16, rngs=nnx.Rngs(0),
                       mixer=name, dim=16, depth=1, num_heads=4)
  assert model.pool == "mean"
  assert all(isinstance(block.mixer, MIXERS[name]) for block in model.blocks)
  images = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, 16, 16, 3)), jnp.float32)
  model.eval()
  logits, grads = nnx.jit(logits_and_grads)(model, images)
  assert logits.shape == (BATCH, 10) and bool(jnp.isfinite(logits).all())
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("size, lkca_params", [("t", 1_027_611), ("b", 2_691_310)])
def test_presets_match_lkca_budget_and_give_logits(name, size, lkca_params):
  preset = f"{name}_{size}"

  def build(preset_name):
    return create_model(preset_name, num_classes=10, image_size=32, rngs=nnx.Rngs(0))

  assert PRESETS[preset].mixer == name and PRESETS[preset].mlp_ratio == 2.0
  assert PRESETS[preset].dim % PRESETS[preset].num_heads == 0
  model = build(preset)
  ours, theirs = count_params(model), count_params(nnx.eval_shape(lambda: build(f"lkca_{size}")))
  assert theirs == lkca_params
  assert abs(ours - theirs) / theirs < 0.03
  model.eval()
  images = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, 32, 32, 3)), jnp.float32)
  logits = nnx.jit(lambda m, x: m(x))(model, images)
  assert logits.shape == (BATCH, 10) and bool(jnp.isfinite(logits).all())
