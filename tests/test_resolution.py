"""Parameters moved between image sizes (lkca_jax.resolution)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import models, resolution
from lkca_jax.layers import LKCA
from lkca_jax.layers.lkca import attention_matrix, kernel_shape

U = 2.0**-24  # float32 unit round-off
OLD, NEW = (3, 4), (5, 7)  # non-square, and each side grows by a different amount


def random_kernel(key, dim, grid, heads, sharing):
  return jax.random.normal(jax.random.key(key), kernel_shape(dim, grid, heads, sharing))


@pytest.mark.parametrize("sharing", ["layer", "head", "channel"])
def test_a_centre_padded_kernel_is_the_old_operator_on_every_window_of_the_old_size(sharing):
  """A[(i,j),(p,q)] depends on the offset only: on any h×w window of the larger grid the
  padded kernel's matrix is the old one, entry for entry (a gather: no arithmetic)."""
  kernel = random_kernel(0, 4, OLD, 2, sharing)
  padded = resolution.centre_fit(kernel, NEW)
  assert padded.shape[-2:] == (2 * NEW[0] - 1, 2 * NEW[1] - 1)
  old_matrix = np.asarray(attention_matrix(kernel, OLD))
  new_matrix = np.asarray(attention_matrix(padded, NEW))
  for top in range(NEW[0] - OLD[0] + 1):
    for left in range(NEW[1] - OLD[1] + 1):
      rows, cols = np.meshgrid(np.arange(OLD[0]) + top, np.arange(OLD[1]) + left, indexing="ij")
      window = (rows * NEW[1] + cols).ravel()
      np.testing.assert_array_equal(new_matrix[..., window[:, None], window[None, :]], old_matrix)


@pytest.mark.parametrize("view", ["attention", "conv"])
def test_the_padded_mixer_agrees_with_the_old_one_on_tokens_inside_the_old_grid(view):
  """Tokens zero outside an h×w window (v = x W_v has no bias, so v is zero there too):
  inside the window the new mixer's output is the old one's. The mixing sums hold the
  same nonzero terms in another order, so they differ by at most 2·n·u·Σ|K·v| (n = h·w
  terms), which W_o carries as |Δ| @ |W_o|, plus W_o's own round-off of 2·D·u·|y| @ |W_o|
  (the two products may be blocked differently)."""
  dim, top, left = 8, 1, 2
  old = LKCA(dim, OLD, view=view, kernel_init="gaussian", rngs=nnx.Rngs(0))
  new = LKCA(dim, NEW, view=view, rngs=nnx.Rngs(1))
  for name in ("v_proj", "out_proj"):
    setattr(new, name, getattr(old, name))
  new.kernel[...] = resolution.centre_fit(old.kernel[...] * 10.0, NEW)
  old.kernel[...] = old.kernel[...] * 10.0
  x_old = jax.random.normal(jax.random.key(2), (2, OLD[0], OLD[1], dim))
  x_new = jnp.zeros((2, *NEW, dim)).at[:, top : top + OLD[0], left : left + OLD[1]].set(x_old)
  y_old = old(x_old.reshape(2, -1, dim))
  y_new = new(x_new.reshape(2, -1, dim)).reshape(2, *NEW, dim)
  y_new = y_new[:, top : top + OLD[0], left : left + OLD[1]].reshape(2, -1, dim)
  v = old.v_proj(x_old.reshape(2, -1, dim))
  terms = jnp.abs(attention_matrix(old.kernel[...], OLD)) @ jnp.abs(v)
  w_o = jnp.abs(old.out_proj.kernel[...])
  n = OLD[0] * OLD[1]
  bound = (2 * n * U * terms) @ w_o + 2 * dim * U * (jnp.abs(y_old) @ w_o) + 4 * U
  assert np.all(np.abs(np.asarray(y_new - y_old)) <= np.asarray(bound))


def test_crop_undoes_pad_and_pad_then_crop_keeps_the_shared_offsets():
  kernel = random_kernel(3, 4, NEW, 2, "head")
  np.testing.assert_array_equal(
    resolution.centre_fit(resolution.centre_fit(kernel, OLD), NEW)[
      ..., NEW[0] - OLD[0] : NEW[0] + OLD[0] - 1, NEW[1] - OLD[1] : NEW[1] + OLD[1] - 1
    ],
    resolution.centre_fit(kernel, OLD),
  )
  small = random_kernel(4, 4, OLD, 2, "head")
  np.testing.assert_array_equal(
    resolution.centre_fit(resolution.centre_fit(small, NEW), OLD), small
  )


def test_a_move_to_the_same_grid_is_the_identity():
  kernel = random_kernel(5, 4, OLD, 2, "channel")
  for how in resolution.KERNEL_MOVES:
    np.testing.assert_array_equal(resolution.move_kernel(kernel, OLD, how), kernel)
  table = jax.random.normal(jax.random.key(6), (1 + 12, 8))
  np.testing.assert_array_equal(resolution.resample_pos_embed(table, OLD, OLD, 1), table)


def test_a_resampled_kernel_keeps_each_offset_as_a_fraction_of_the_image():
  """A kernel linear in the offset, K(d) = 1 + 0.1·d_r − 0.2·d_c, doubled in each side:
  bilinear interpolation reproduces a linear function exactly away from the edges, so an
  interior tap at offset d' is K(d'/2)/4 (the 1/4: each old token is 4 new ones), to the
  round-off of a few float32 operations on values of order 1."""
  old, new = (4, 5), (8, 10)
  rows = np.arange(2 * old[0] - 1) - (old[0] - 1)
  cols = np.arange(2 * old[1] - 1) - (old[1] - 1)
  kernel = jnp.asarray(1 + 0.1 * rows[:, None] - 0.2 * cols[None, :], jnp.float32)
  moved = np.asarray(resolution.resample_kernel(kernel, new))
  assert moved.shape == (2 * new[0] - 1, 2 * new[1] - 1)
  d_r = (np.arange(moved.shape[0]) - (new[0] - 1))[:, None]
  d_c = (np.arange(moved.shape[1]) - (new[1] - 1))[None, :]
  expected = (1 + 0.1 * d_r / 2 - 0.2 * d_c / 2) / 4
  inner = (slice(2, -2), slice(2, -2))  # taps whose interpolation reads no edge
  np.testing.assert_allclose(moved[inner], expected[inner], rtol=0, atol=16 * U * 3)


def test_a_resampled_position_table_keeps_its_prefix_and_a_constant_grid():
  """The cubic weights of each output sum to 1 (renormalised at the edges), so a constant
  grid stays constant to a few round-offs; the class row is kept as it is."""
  dim = 6
  cls = jax.random.normal(jax.random.key(7), (1, dim))
  grid = jnp.broadcast_to(jnp.arange(dim, dtype=jnp.float32), (OLD[0] * OLD[1], dim))
  moved = resolution.resample_pos_embed(jnp.concatenate([cls, grid]), OLD, NEW, 1)
  assert moved.shape == (1 + NEW[0] * NEW[1], dim)
  np.testing.assert_array_equal(moved[0], cls[0])
  np.testing.assert_allclose(
    moved[1:], np.broadcast_to(np.arange(dim), (35, dim)), atol=8 * U * dim
  )


def tiny(name, image_size, seed=0, *, patch_size=2, channels=1, num_classes=3, **overrides):
  options = dict(depth=1, dim=16, num_heads=4) | overrides
  return models.create_model(
    name,
    num_classes=num_classes,
    image_size=image_size,
    patch_size=patch_size,
    channels=channels,
    rngs=nnx.Rngs(seed),
    **options,
  )


@pytest.mark.parametrize("name", ["lkca_t", "vit_1m", "acmix_t", "flatten_t"])
def test_every_other_parameter_is_copied_and_the_moved_model_runs(name):
  old = tiny(name, 8, seed=0)
  new = tiny(name, (12, 16), seed=1)
  moving = resolution.grid_params(new)
  assert moving  # each of these models has a grid-shaped parameter
  source = dict(nnx.to_flat_state(nnx.state(old, nnx.Param)))
  for kernels in resolution.KERNEL_MOVES:
    moved = resolution.move_params(nnx.state(old, nnx.Param), new, kernels=kernels)
    for path, leaf in nnx.to_flat_state(moved):
      if path not in moving:
        np.testing.assert_array_equal(leaf[...], source[path][...], err_msg=str(path))
  nnx.update(new, moved)
  assert np.all(np.isfinite(new(jnp.ones((1, 12, 16, 1)))))


def test_a_model_moved_to_its_own_size_computes_the_same_function():
  old = tiny("vit_1m", 8, seed=0)  # its class token: the position table's prefix
  new = tiny("vit_1m", 8, seed=1)
  images = jax.random.normal(jax.random.key(8), (2, 8, 8, 1))
  nnx.update(new, resolution.move_params(nnx.state(old, nnx.Param), new))
  old.eval(), new.eval()
  np.testing.assert_array_equal(new(images), old(images))


@pytest.mark.parametrize(
  "target,expected",
  [
    (dict(depth=2), "parameters only in the new model"),
    (dict(dim=24), "only the image size may change"),
  ],
)
def test_another_model_is_refused_in_one_line(target, expected):
  with pytest.raises(resolution.MoveError, match=expected) as caught:
    resolution.move_params(nnx.state(tiny("lkca_t", 8), nnx.Param), tiny("lkca_t", 12, **target))
  assert "\n" not in str(caught.value)


def test_another_patch_size_or_move_is_refused_naming_the_fix():
  source = nnx.state(tiny("lkca_t", 8), nnx.Param)
  other_patch = tiny("lkca_t", 12, patch_size=3)
  with pytest.raises(
    resolution.MoveError, match=r"the checkpoint's patches are 2x2, this model's 3x3: .*=2 "
  ):
    resolution.move_params(source, other_patch)
  other_channels = tiny("lkca_t", 12, channels=3)  # 2·2·3 inputs a patch: 4 is no 3·p²
  with pytest.raises(resolution.MoveError, match=r"its patches hold 4 values .*, this model's 12"):
    resolution.move_params(source, other_channels)
  with pytest.raises(resolution.MoveError, match="kernels must be one of"):
    resolution.move_params(source, tiny("lkca_t", 12), kernels="stretch")


@pytest.mark.parametrize("name", ["lkca_t", "vit_1m"])
def test_a_new_head_is_the_new_models_own_and_the_rest_moves_as_with_the_old_head(name):
  """Another class count: the classifier cannot move; head="new" keeps the target's own (as
  initialised) and moves every other parameter as a target with the old classes gets it."""
  source = nnx.state(tiny(name, 8, seed=0), nnx.Param)
  target = tiny(name, 12, seed=1, num_classes=5)
  with pytest.raises(resolution.MoveError, match=r"head\.\w+ is .*init_from_head=new") as caught:
    resolution.move_params(source, target)
  assert "\n" not in str(caught.value)
  moved = dict(nnx.to_flat_state(resolution.move_params(source, target, head="new")))
  kept = dict(nnx.to_flat_state(resolution.move_params(source, tiny(name, 12, seed=1))))
  own = dict(nnx.to_flat_state(nnx.state(target, nnx.Param)))
  assert moved.keys() == kept.keys() == own.keys()
  for path, leaf in moved.items():
    expected = own[path] if path[0] == "head" else kept[path]
    np.testing.assert_array_equal(leaf[...], expected[...], err_msg=str(path))
  assert moved[("head", "kernel")].shape == (16, 5)
  with pytest.raises(resolution.MoveError, match="head must be one of"):
    resolution.move_params(source, target, head="random")


def test_a_grid_shaped_parameter_without_a_move_is_refused_naming_the_mixer(monkeypatch):
  from lkca_jax.layers import FocusedLinearAttention

  monkeypatch.delitem(resolution.MOVES, (FocusedLinearAttention, "position"))
  with pytest.raises(resolution.MoveError, match="FocusedLinearAttention's position depends on"):
    resolution.move_params(nnx.state(tiny("flatten_t", 8), nnx.Param), tiny("flatten_t", 12))


@pytest.mark.parametrize("how", ["pad", "resample"])
def test_a_kernel_move_is_linear_and_the_same_under_jit_vmap_and_grad(how):
  """Both moves are linear maps of the kernel: jit and vmap give the eager values (to the
  round-off of a few float32 operations on values of order 1), and the gradient of
  ⟨w, move(k)⟩ is the transposed map applied to w, whose inner product with k is ⟨w, move(k)⟩
  (Euler's identity for a linear function)."""
  kernels = jax.random.normal(jax.random.key(9), (3, 2, 2 * OLD[0] - 1, 2 * OLD[1] - 1))
  move = lambda k: resolution.move_kernel(k, NEW, how)  # noqa: E731
  eager = jnp.stack([move(k) for k in kernels])
  np.testing.assert_allclose(jax.jit(move)(kernels[0]), eager[0], atol=16 * U)
  np.testing.assert_allclose(jax.vmap(move)(kernels), eager, atol=16 * U)
  w = jax.random.normal(jax.random.key(10), eager.shape[1:])
  grad = jax.grad(lambda k: jnp.sum(w * move(k)))(kernels[0])
  # Two sums of n terms, each term the product of ≤ 4 interpolation weights and values:
  # |Δ| ≤ 8·n·u·Σ|w·move(k)|, loose but derived.
  bound = 8 * eager[0].size * U * jnp.sum(jnp.abs(w * eager[0]))
  assert abs(jnp.sum(grad * kernels[0]) - jnp.sum(w * eager[0])) <= bound
