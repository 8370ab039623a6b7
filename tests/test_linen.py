"""linen.py: LKCA and the ViT blocks in a Linen model through `flax.nnx.bridge`.

A bridged module runs the NNX module's own operations on the same arrays, so its values
and tangents are compared bit for bit. LinenViT's own head LayerNorm (Linen's two-pass
form) differs from lkca_jax's CPU one-pass form by round-off, bounded as in
tests/layers/test_backend.py: 4·terms·u of the largest magnitude, u = 2⁻²⁴.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lkca_jax.layers import LKCA, MIXERS
from lkca_jax.linen import LinenViT, linen_params_from_vit
from lkca_jax.models import Block, ViT, count_params

README = Path(__file__).resolve().parent.parent / "README.md"
U = 2.0**-24  # float32 unit round-off
DIM, HEADS = 16, 2
GRID = (3, 5)  # not square: a swapped h and w changes the kernel's shape


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def keys(seed=0):
  return {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}


def check_bridged_equals_nnx(module, bridged, x):
  """Values and forward-mode tangents (in the parameters and the input) of the bridged
  module, given the NNX module's weights, equal the NNX module's exactly."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  tangent = jax.tree.map(lambda p: normal(p.shape, p.size), pure)
  dx = normal(x.shape, 7)

  def nnx_fn(pure, x):
    state = nnx.clone(params)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state, rest)(x)

  linen_fn = lambda pure, x: bridged.apply({"params": pure}, x)

  @jax.jit  # both in one program, compiled once; XLA may merge them only if equal
  def both(p, x):
    return [jax.jvp(fn, (p, x), (tangent, dx)) for fn in (linen_fn, nnx_fn)]

  got, expected = both(pure, x)
  assert float(jnp.abs(expected[1]).max()) > 0  # the tangent is no symbolic zero
  for g, e in zip(got, expected, strict=True):
    np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
  "view, sharing", [("conv", "head"), ("attention", "layer"), ("attention", "channel")]
)
def test_bridged_lkca_is_the_nnx_lkca(view, sharing):
  options = dict(num_heads=HEADS, view=view, kernel_sharing=sharing, kernel_init="gaussian")
  module = LKCA(DIM, GRID, rngs=nnx.Rngs(0), **options)
  bridged = nnx.bridge.to_linen(LKCA, DIM, GRID, **options)
  x = normal((2, GRID[0] * GRID[1], DIM), 1)
  params = jax.eval_shape(bridged.init, jax.random.key(0), x)["params"]
  assert params["kernel"].shape == module.kernel.shape
  check_bridged_equals_nnx(module, bridged, x)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_bridged_block_is_the_nnx_block_for_every_mixer(mixer):
  args = dict(
    mixer=mixer,
    num_heads=HEADS,
    mlp_ratio=2.0,
    drop_path_rate=0.0,
    mixer_options={},
    dtype=None,
  )
  module = Block(DIM, GRID, rngs=nnx.Rngs(0), **args)
  bridged = nnx.bridge.to_linen(Block, DIM, GRID, **args)
  check_bridged_equals_nnx(module, bridged, normal((2, GRID[0] * GRID[1], DIM), 1))


def vit_pair(pool):
  """A LinenViT and an NNX ViT of one shape on (12, 20) RGB images, patch 4 → GRID."""
  shape = dict(num_classes=4, patch_size=4, dim=DIM, num_heads=HEADS, pool=pool)
  linen = LinenViT(mixers=MIXER_PATTERN, **shape)
  vit = ViT(image_size=(12, 20), channels=3, depth=2, mixer=list(MIXER_PATTERN), **shape,
            rngs=nnx.Rngs(3))  # fmt: skip
  return linen, vit


MIXER_PATTERN = ("lkca", "mhsa")


@pytest.mark.slow  # compiles a whole model
def test_the_parameters_live_in_the_linen_tree():
  linen, vit = vit_pair("mean")
  variables = jax.eval_shape(lambda k: linen.init(k, jnp.zeros((2, 12, 20, 3))), keys())
  assert set(variables) == {"params"}
  shapes = {
    "/".join(map(str, path)): leaf.shape
    for path, leaf in nnx.traversals.flatten_mapping(variables["params"]).items()
  }
  lkca = {k: v for k, v in shapes.items() if k.startswith("blocks_0/mixer/")}
  assert lkca == {
    "blocks_0/mixer/kernel": (2 * GRID[0] - 1, 2 * GRID[1] - 1),
    "blocks_0/mixer/v_proj/kernel": (DIM, DIM),
    "blocks_0/mixer/out_proj/kernel": (DIM, DIM),
    "blocks_0/mixer/out_proj/bias": (DIM,),
  }
  assert shapes["blocks_1/mixer/qkv/kernel"] == (DIM, 3 * DIM)
  assert shapes["pos_embed"] == (GRID[0] * GRID[1], DIM)
  assert shapes["patch_embed/kernel"] == (4 * 4 * 3, DIM)
  assert {k.split("/")[0] for k in shapes} == {
    "patch_embed", "pos_embed", "blocks_0", "blocks_1", "head_norm", "head"
  }  # fmt: skip
  assert sum(int(np.prod(s)) for s in shapes.values()) == count_params(vit)
  # The NNX ViT's weights fill exactly that tree.
  moved = linen_params_from_vit(vit)
  assert jax.tree.map(jnp.shape, moved) == jax.tree.map(jnp.shape, variables["params"])


def nnx_stages(vit, linen_stages, images):
  """The NNX ViT's stage outputs, each stage fed the Linen model's previous stage."""
  num_prefix = int(vit.pool == "cls")
  out = {"patch_embed": vit.patch_embed(vit.patchify(images))}
  x = linen_stages["patch_embed"]
  if num_prefix:
    cls = jnp.broadcast_to(vit.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
  x = x + vit.pos_embed[...]
  for i, block in enumerate(vit.blocks):
    pool = vit.pool if i == len(vit.blocks) - 1 else None  # the last computes the pooled token
    out[f"blocks_{i}"] = block(x, num_prefix=num_prefix, pool=pool)
    x = linen_stages[f"blocks_{i}"]
  out["head_norm"] = vit.head_norm(x[:, 0] if num_prefix else x.mean(axis=1))
  out["head"] = vit.head(linen_stages["head_norm"])
  return out


@pytest.mark.slow  # compiles a whole model
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_linen_vit_with_moved_weights_computes_the_nnx_vit(pool):
  """Stage by stage, each fed the Linen model's previous stage: each bridged block is the
  NNX block exactly; Linen's patch Dense and head are the same sums of products, maybe in
  another order (4·terms·u, terms = the fan-in); its head LayerNorm is another algorithm
  for the same function (terms = 4·D, as tests/layers/test_backend.py)."""
  linen, vit = vit_pair(pool)
  vit.eval()
  graphdef, state = nnx.split(vit)
  images = normal((3, 12, 20, 3), 5)

  @jax.jit
  def both(params, state, images):
    _, captured = linen.apply({"params": params}, images, capture_intermediates=True)
    captured = dict(captured["intermediates"])
    del captured["__call__"]  # the logits: "head"'s output
    stages = {k: v["__call__"][0] for k, v in captured.items()}
    return stages, nnx_stages(nnx.merge(graphdef, state), stages, images)

  got, expected = both(linen_params_from_vit(vit), state, images)
  for i in range(len(vit.blocks)):
    np.testing.assert_array_equal(got[f"blocks_{i}"], expected[f"blocks_{i}"])
  terms = {"patch_embed": 4 * 4 * 3, "head_norm": 4 * DIM, "head": DIM}
  for name, n in terms.items():
    err = float(jnp.abs(got[name] - expected[name]).max())
    assert err <= 4 * n * U * float(jnp.abs(expected[name]).max()), (name, err)


@pytest.mark.slow  # trains
def test_a_few_jitted_optax_steps_train_it():
  linen = LinenViT(num_classes=3, patch_size=2, dim=DIM, mixers=("lkca",), drop_path_rate=0.1)
  images, labels = normal((8, 8, 8, 3), 1), jnp.arange(8) % 3
  params = jax.jit(lambda k: linen.init(k, images))(keys())["params"]
  optimizer = optax.adam(1e-2)

  def loss_fn(params, train, key):
    logits = linen.apply({"params": params}, images, train=train, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(loss_fn)(params, True, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  trained = params
  for k in jax.random.split(jax.random.key(2), 8):
    trained, opt_state = step(trained, opt_state, k)
  eval_loss = jax.jit(lambda p: loss_fn(p, False, jax.random.key(0)))
  assert float(eval_loss(trained)) < 0.7 * float(eval_loss(params))
  # The LKCA kernel starts at zeros (the reference) and is trained through the bridge.
  assert not np.any(params["blocks_0"]["mixer"]["kernel"])
  assert np.all(np.abs(trained["blocks_0"]["mixer"]["kernel"]) > 0)


@pytest.mark.parametrize("schedule, first_block_drops", [("uniform", True), ("linear", False)])
def test_the_drop_path_schedule_spares_the_first_block_when_linear(schedule, first_block_drops):
  """Linear (timm's spacing): the first of two blocks drops nothing, its training output is
  its evaluation output exactly; the last drops at the full rate. Uniform: both drop."""
  linen = LinenViT(
    num_classes=3,
    patch_size=2,
    dim=DIM,
    mixers=("lkca", "lkca"),
    drop_path_rate=0.5,
    drop_path_schedule=schedule,
  )
  images = normal((64, 4, 4, 3), 1)
  params = linen.init(keys(), images)["params"]

  def blocks(train):
    _, captured = linen.apply(
      {"params": params},
      images,
      train=train,
      rngs={"dropout": jax.random.key(5)},
      capture_intermediates=True,
    )
    return [np.asarray(captured["intermediates"][f"blocks_{i}"]["__call__"][0]) for i in (0, 1)]

  (train0, train1), (eval0, eval1) = blocks(True), blocks(False)
  assert (not np.array_equal(train0, eval0)) == first_block_drops
  assert not np.array_equal(train1, eval1)  # the last block drops at 0.5 either way


def test_bad_use_is_one_clear_error():
  linen = LinenViT(num_classes=2, patch_size=4, dim=DIM)
  images = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="needs a dropout key"):
    linen.init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="not divisible by patch size 4"):
    linen.init(keys(), jnp.zeros((1, 8, 10, 3)))
  bad_fields = [
    (dict(pool="max"), "pool must be"),
    (dict(mixers=("lkca", "conv")), "registered mixers"),
    (dict(mixers="lkca"), "registered mixers"),  # a string, not a sequence of names
    (dict(mixer_options={"mhsa": {}}), "mixer_options for 'mhsa', which no layer uses"),
    (dict(drop_path_schedule="ramp"), "drop_path_schedule must be one of"),
  ]
  for fields, message in bad_fields:
    with pytest.raises(ValueError, match=message):
      LinenViT(num_classes=2, patch_size=4, dim=DIM, **fields).init(keys(), images)


def test_the_readme_snippet_runs_and_holds():
  section = README.read_text().split("## Use LKCA in a Linen model\n")[1].split("\n## ")[0]
  namespace = {}
  exec(section.split("```python\n")[1].split("```")[0], namespace)
  x = normal((2, 64, 192), 1)
  variables = jax.eval_shape(namespace["Mixer"]().init, jax.random.key(0), x)
  assert variables["params"]["lkca"]["kernel"].shape == (15, 15)  # as the text says
