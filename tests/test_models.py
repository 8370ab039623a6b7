"""The pre-norm ViT family: preset parameter counts, init, stochastic depth, pooling, inputs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from lkca_jax.layers import LKCA, MHSA, MIXERS, DropPath, layer_norm, linear
from lkca_jax.models import PRESETS, count_params, create_model
from tests.helpers import assert_reordered, chain_terms

# `docs/method.md` ("Presets"), typed in from the table: (CIFAR-10, CIFAR-100, Tiny-ImageNet).
PUBLISHED_PARAM_COUNTS = {
  "vit_05m": (479_890, 490_780, 520_160),
  "vit_1m": (1_060_674, 1_073_004, 1_106_288),
  "vit_2m": (1_955_010, 1_973_100, 2_022_000),
  "vit": (2_692_426, 2_709_796, 2_756_744),
  "vit_4m": (3_951_298, 3_975_148, 4_039_664),
  "vit_8m": (7_852_114, 7_880_284, 7_956_512),
  "lkca_05m": (500_710, 509_800, 534_300),
  "lkca_t": (1_027_611, 1_039_941, 1_073_225),
  "lkca_2m": (2_030_515, 2_047_885, 2_094_833),
  "lkca_b": (2_691_310, 2_710_300, 2_761_640),
  "lkca_4m": (4_048_939, 4_071_169, 4_131_293),
  "lkca_8m": (7_941_106, 7_968_736, 8_043_500),
  "lkca_l": (12_528_190, 12_560_680, 12_648_620),
}
DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32), "tiny_imagenet": (200, 64)}
# `docs/method.md` ("Peer presets"), typed in from the table; not published counts, but the ones
# the docs state, each derived term by term in `peer_param_count` below.
PEER_PARAM_COUNTS = {
  "acmix_t": (1_028_157, 1_038_327, 1_065_755),
  "acmix_b": (2_682_280, 2_698_210, 2_741_254),
  "flatten_t": (1_036_840, 1_047_190, 1_075_106),
  "flatten_b": (2_645_290, 2_661_220, 2_704_264),
}

# A small model for behaviour tests: the lkca_05m preset at width 16, depth 2.
SMALL = dict(dim=16, depth=2)
BATCH = 4  # one batch size wherever it does not matter: eager ops compile once per shape


def small_model(name="lkca_05m", *, image_size=16, num_classes=5, seed=0, **overrides):
  return create_model(
    name,
    num_classes=num_classes,
    image_size=image_size,
    rngs=nnx.Rngs(seed),
    **{**SMALL, **overrides},
  )


def images(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def randomise_lkca_kernels(model, seed=0):
  """The LKCA init is zero, which would hide the mixing; give every kernel random values."""
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    if isinstance(block.mixer, LKCA):
      kernel = block.mixer.kernel
      kernel[...] = jnp.asarray(0.1 * rng.normal(size=kernel[...].shape), jnp.float32)


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --- parameter counts -------------------------------------------------------------------


def test_presets_cover_the_published_table():
  assert set(PUBLISHED_PARAM_COUNTS) <= set(PRESETS)  # other presets (peer mixers) may exist


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_preset_parameter_counts_match_the_published_ones(name):
  for (num_classes, size), expected in zip(
    DATASETS.values(), PUBLISHED_PARAM_COUNTS[name], strict=True
  ):
    model = nnx.eval_shape(
      lambda num_classes=num_classes, size=size: create_model(
        name, num_classes=num_classes, image_size=size, rngs=nnx.Rngs(0)
      )
    )
    assert model.grid == (8, 8)  # patch 4 at 32×32, patch 8 at 64×64
    assert count_params(model) == expected, (name, num_classes, size)


def peer_param_count(name, num_classes, image_size) -> int:
  """A peer preset's count from the closed forms of `docs/method.md` ("Presets", "Peer mixers"):
  patch p²·3·D + D, position N·D, head LayerNorm 2D and Linear D·C + C; per block two
  LayerNorms 4D, the MLP 2·r·D² + r·D + D and the mixer."""
  preset = PRESETS[name]
  dim, heads, r = preset.dim, preset.num_heads, int(preset.mlp_ratio)
  patch, n, (h, w) = image_size // 8, 64, (8, 8)
  mixer = {
    # Linear(D, 3D) + Linear(D, D), bias table, fc 3H → 9 with 9 biases, 3×3 conv, two rates.
    "acmix": 4 * dim**2 + 85 * dim + ((2 * h - 1) * (2 * w - 1) + 27) * heads + 9 + 2,
    # q, k, v, out Linear(D, D), all four with bias, P, s, the 5×5 depthwise conv of d channels.
    "flatten": 4 * dim**2 + 4 * dim + (n + 1) * dim + 26 * (dim // heads),
  }[preset.mixer]
  block = 4 * dim + (2 * r * dim**2 + r * dim + dim) + mixer
  shared = patch * patch * 3 * dim + dim + n * dim + 2 * dim + dim * num_classes + num_classes
  return shared + preset.depth * block


@pytest.mark.parametrize("name", sorted(PEER_PARAM_COUNTS))
def test_peer_preset_parameter_counts_match_the_derived_ones(name):
  for (num_classes, size), expected in zip(DATASETS.values(), PEER_PARAM_COUNTS[name], strict=True):
    model = nnx.eval_shape(
      lambda num_classes=num_classes, size=size: create_model(
        name, num_classes=num_classes, image_size=size, rngs=nnx.Rngs(0)
      )
    )
    assert model.grid == (8, 8) and model.pool == "mean"  # no class token
    assert count_params(model) == peer_param_count(name, num_classes, size) == expected


# ImageNet-1k presets at 224×224, 1000 classes (`docs/method.md`, "ImageNet presets"):
# vit_s16 is DeiT-S, whose published count is 22,050,664 (timm's deit_small_patch16_224).
IMAGENET_PARAM_COUNTS = {"vit_s16": 22_050_664, "lkca_s16": 18_505_876}


def imagenet_param_count(name) -> int:
  """Term by term for D = 384, depth 12, MLP 4×, 16×16 patches over 224×224 (a 14×14 grid)."""
  d, depth, hidden, classes = 384, 12, 4 * 384, 1000
  h = w = 224 // 16
  patch_embed = 16 * 16 * 3 * d + d  # Linear(3·p², D) with bias
  mlp = (d * hidden + hidden) + (hidden * d + d)
  norms = 2 * (2 * d)  # two LayerNorms, scale and bias
  if name == "vit_s16":
    mixer = (d * 3 * d + 3 * d) + (d * d + d)  # qkv and output, both with bias (DeiT's)
    tokens = h * w + 1  # the class token's position too
    prefix = d  # the class token
  else:
    mixer = 2 * d * d + d + (2 * h - 1) * (2 * w - 1)  # W_v, W_o + b_o, one 27×27 kernel
    tokens, prefix = h * w, 0
  head = 2 * d + d * classes + classes  # LayerNorm, Linear(D, classes)
  return patch_embed + prefix + tokens * d + depth * (norms + mixer + mlp) + head


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAM_COUNTS))
def test_imagenet_preset_parameter_counts(name):
  model = nnx.eval_shape(
    lambda: create_model(name, num_classes=1000, image_size=224, rngs=nnx.Rngs(0))
  )
  assert model.grid == (14, 14) and model.patch_size == 16  # the preset's own patch size
  assert count_params(model) == imagenet_param_count(name) == IMAGENET_PARAM_COUNTS[name]


def test_an_explicit_patch_size_replaces_the_presets():
  model = nnx.eval_shape(
    lambda: create_model("vit_s16", num_classes=10, image_size=32, patch_size=4, rngs=nnx.Rngs(0))
  )
  assert model.grid == (8, 8)


def test_vit_worked_check_per_component():
  model = nnx.eval_shape(
    lambda: create_model("vit", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
  )
  block = model.blocks[0]
  count = lambda module: count_params(module)  # noqa: E731
  assert count(block.norm1) + count(block.norm2) == 768
  assert count(block.mixer.qkv) == 110_592 and count(block.mixer.out_proj) == 37_056
  assert count(block.mlp) == 148_032
  assert count(block) == 296_448 and len(model.blocks) == 9
  assert count(model.patch_embed) == 9_408
  assert model.pos_embed.shape == (65, 192)  # 12,480 = (64 + 1) · 192
  assert model.cls_token.shape == (1, 1, 192)
  assert count(model.head_norm) == 384 and count(model.head) == 1_930
  assert 9 * 296_448 + 9_408 + 12_480 + 192 + 384 + 1_930 == count(model) == 2_692_426


def test_lkca_mixer_count_formula_in_a_preset():
  model = nnx.eval_shape(
    lambda: create_model("lkca_2m", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
  )
  d, (h, w) = 192, model.grid
  for block in model.blocks:
    assert isinstance(block.mixer, LKCA)
    assert count_params(block.mixer) == 2 * d * d + d + (2 * h - 1) * (2 * w - 1)


# --- init -------------------------------------------------------------------------------


def test_linear_init_is_untruncated_xavier_normal_with_zero_bias():
  layer = linear(600, 400, rngs=nnx.Rngs(0))
  kernel = np.asarray(layer.kernel[...])
  std = np.sqrt(2 / (600 + 400))
  assert abs(kernel.std() / std - 1) < 0.01  # 240k samples: std of the estimate ≈ 0.15%
  assert abs(kernel.mean()) < 0.01 * std
  # A normal puts 4.55% of its mass beyond 2 std; a truncated normal puts none there.
  beyond = np.mean(np.abs(kernel) > 2 * std)
  assert 0.04 < beyond < 0.051
  assert np.abs(kernel).max() > 4 * std
  assert not np.asarray(layer.bias[...]).any()


def test_model_init():
  model = small_model("vit_05m")
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear):
      fan_in, fan_out = module.kernel[...].shape
      std = np.sqrt(2 / (fan_in + fan_out))
      # The sample std of n normals has relative spread ≈ 1/sqrt(2n): allow 5 of those.
      tolerance = 5 / np.sqrt(2 * fan_in * fan_out)
      assert abs(np.asarray(module.kernel[...]).std() / std - 1) < tolerance, path
      if module.bias is not None:
        assert not np.asarray(module.bias[...]).any(), path
    if isinstance(module, nnx.LayerNorm):
      assert module.epsilon == 1e-5, path
      np.testing.assert_array_equal(np.asarray(module.scale[...]), 1.0)
      np.testing.assert_array_equal(np.asarray(module.bias[...]), 0.0)
  # Position embedding and class token: N(0, 1), not 0.02. (64 + 1) · 16 = 1,040 samples:
  # the std and mean estimates spread by ≈ 0.022 and 0.031.
  pos = np.asarray(model.pos_embed[...])
  assert pos.shape == (65, 16) and abs(pos.std() - 1) < 0.1 and abs(pos.mean()) < 0.12
  assert 0.3 < np.abs(np.asarray(model.cls_token[...])).mean() < 1.3  # E|N(0,1)| ≈ 0.80
  lkca_model = small_model("lkca_05m")
  for block in lkca_model.blocks:
    assert not np.asarray(block.mixer.kernel[...]).any()


def test_the_deit_convention_builds_and_initialises_as_timm():
  """vit_s16 (DeiT-S) as timm's VisionTransformer, here at 32×32 (a 2×2 grid, so quick): every
  Linear weight, the position table and the class token N(0, 0.02²) as trunc_normal_(std=
  0.02) draws them (its ±2 bounds are 100 std away: a normal's tails, unlike jax's ±2 std
  truncation), Linear biases 0 (qkv's included), the patch embedding U(±1/√768) as PyTorch's
  Conv2d, LayerNorms (1, 0) at epsilon 1e-6. Kolmogorov-Smirnov tests of 20,000 draws each
  fail for a right sampler with probability 1e-6."""
  model = create_model("vit_s16", num_classes=1000, image_size=32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  sample = lambda x: rng.choice(np.asarray(x).ravel(), 20_000, replace=False)
  kernels = [
    np.asarray(m.kernel[...]).ravel()
    for _, m in nnx.iter_graph(model)
    if isinstance(m, nnx.Linear) and m is not model.patch_embed
  ]
  assert len(kernels) == 12 * 4 + 1  # qkv, out, two MLP Linears a block; the head
  normal = scipy.stats.norm(scale=0.02).cdf
  assert scipy.stats.kstest(sample(np.concatenate(kernels)), normal).pvalue > 1e-6
  assert np.abs(np.concatenate(kernels)).max() > 4.5 * 0.02  # untruncated at 2 std
  tokens = np.concatenate([np.asarray(model.pos_embed[...]).ravel(), model.cls_token[...].ravel()])
  # 5 position rows (2×2 and the class token) and the token: 2,304 draws, std spread ≈ 0.015.
  assert tokens.size == 6 * 384 and abs(tokens.std() / 0.02 - 1) < 0.1
  bound = 768**-0.5
  patch = np.concatenate(
    [np.asarray(model.patch_embed.kernel[...]).ravel(), model.patch_embed.bias[...]]
  )
  assert scipy.stats.kstest(sample(patch), scipy.stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-6
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear) and module is not model.patch_embed:
      assert module.bias is not None and not np.asarray(module.bias[...]).any(), path
    if isinstance(module, nnx.LayerNorm):
      assert module.epsilon == 1e-6, path
      np.testing.assert_array_equal(np.asarray(module.scale[...]), 1.0)
  lkca = create_model("lkca_s16", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
  assert all(not np.asarray(block.mixer.kernel[...]).any() for block in lkca.blocks)


def test_any_preset_takes_either_convention_and_options_still_win():
  """ "deit" gives MHSA its qkv bias (3·D a layer) unless the mixer options say otherwise; the
  paper's presets keep the reference's by default."""
  count = lambda **kw: count_params(
    nnx.eval_shape(
      lambda: create_model("vit", num_classes=10, image_size=32, rngs=nnx.Rngs(0), **kw)
    )
  )
  reference = count()
  assert count(convention="deit") == reference + 9 * 3 * 192
  no_bias = {"mhsa": {"qkv_bias": False}}
  assert count(convention="deit", mixer_options=no_bias) == reference
  assert count(convention="reference") == reference
  with pytest.raises(ValueError, match="convention must be one of"):
    count(convention="timm")


def test_layer_norm_epsilon_is_1e_minus_5_numerically():
  norm = layer_norm(2, rngs=nnx.Rngs(0))
  a = 1e-3  # variance a² = 1e-6 is comparable with epsilon, so epsilon shows in the output
  out = np.asarray(norm(jnp.asarray([[a, -a]], jnp.float32)))
  np.testing.assert_allclose(
    out, [[a / np.sqrt(a * a + 1e-5), -a / np.sqrt(a * a + 1e-5)]], rtol=1e-4
  )
  assert abs(out[0, 0] - a / np.sqrt(a * a + 1e-6)) > 0.1  # eps 1e-6 would give 0.707


def test_layer_norm_matches_float64_even_far_from_zero():
  """Statistics of each row shifted by its first value: a large common offset costs no
  precision (E[x²] − E[x]² of the raw row would; flax's is off by 0.043 here)."""
  rng = np.random.default_rng(0)
  norm = layer_norm(48, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(rng.normal(size=48), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=48), jnp.float32)
  for offset in (0.0, 300.0):
    x = (offset + rng.normal(size=(4, 5, 48))).astype(np.float32)
    x64 = x.astype(np.float64)
    normalised = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    expected = normalised * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
    out = np.asarray(norm(jnp.asarray(x)))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expected, atol=2e-4 if offset else 1e-5)


def test_layer_norm_in_bfloat16_returns_bfloat16():
  norm = layer_norm(16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.bfloat16)
  out = norm(x)
  assert out.dtype == jnp.bfloat16 and norm.scale[...].dtype == jnp.float32
  x32 = np.asarray(x, np.float32)
  expected = (x32 - x32.mean(-1, keepdims=True)) / np.sqrt(x32.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2)


# --- stochastic depth -------------------------------------------------------------------


def test_drop_path_drops_whole_samples_at_the_rate():
  rate, batch = 0.25, 8000
  drop = DropPath(rate, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, size=(batch, 3, 4)), jnp.float32)
  out = np.asarray(drop(x))
  dropped = np.all(out == 0, axis=(1, 2))
  kept = ~dropped
  assert abs(dropped.mean() - rate) < 0.02  # binomial std ≈ 0.005
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  drop.eval()
  np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(x))


def test_presets_use_rate_0_1_in_every_layer():
  model = nnx.eval_shape(
    lambda: create_model("lkca_t", num_classes=10, image_size=32, rngs=nnx.Rngs(0))
  )
  rates = [(b.drop_path1.rate, b.drop_path2.rate) for b in model.blocks]
  assert rates == [(0.1, 0.1)] * 9  # no linear ramp


@pytest.mark.parametrize(
  "schedule, rates", [("uniform", [0.5, 0.5, 0.5]), ("linear", [0.0, 0.25, 0.5])]
)
def test_each_block_drops_samples_at_its_share_of_the_rate(schedule, rates):
  """ "linear" spaces the rates as timm does for DeiT (torch.linspace(0, rate, depth)): at
  depth 3 and rate 0.5, 0, 0.25 and 0.5; the first block then drops nothing at all."""
  model = small_model(depth=3, drop_path_rate=0.5, drop_path_schedule=schedule)
  x = jnp.ones((8000, 3, 4))
  for i, (block, rate) in enumerate(zip(model.blocks, rates, strict=True)):
    for drop in (block.drop_path1, block.drop_path2):
      out = np.asarray(drop(x, rngs=nnx.Rngs(dropout=i)))
      dropped = np.all(out == 0, axis=(1, 2)).mean()
      assert abs(dropped - rate) < 0.02, (i, dropped)  # binomial std <= 0.0056
      if rate == 0:
        np.testing.assert_array_equal(out, np.asarray(x))


def test_a_rate_given_at_the_call_is_shared_out_by_the_schedule(monkeypatch):
  """The train step passes its (traced) rate to the model's call: each block takes its
  share, as the blocks' own rates are shared out when the model is built."""
  seen = []
  call = DropPath.__call__

  def recording(self, inputs, *, rngs=None, rate=None):
    seen.append(rate)
    return call(self, inputs, rngs=rngs, rate=rate)

  monkeypatch.setattr(DropPath, "__call__", recording)
  model = small_model(depth=3, drop_path_schedule="linear")
  model(images((4, 16, 16, 3)), rngs=nnx.Rngs(dropout=0), drop_path_rate=jnp.float32(0.5))
  assert [float(r) for r in seen] == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5]
  with pytest.raises(
    ValueError, match=r"drop_path_schedule must be one of \('uniform', 'linear'\)"
  ):
    small_model(drop_path_schedule="ramp")


def test_stochastic_depth_train_and_eval():
  x = images((BATCH, 16, 16, 3))
  model = small_model(drop_path_rate=0.5)
  plain = small_model(drop_path_rate=0.0)
  randomise_lkca_kernels(model)
  randomise_lkca_kernels(plain)
  plain_out = np.asarray(plain(x))

  model.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), plain_out)

  model.train()
  first = np.asarray(model(x, rngs=nnx.Rngs(dropout=7)))
  again = np.asarray(model(x, rngs=nnx.Rngs(dropout=7)))
  other = np.asarray(model(x, rngs=nnx.Rngs(dropout=8)))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  changed = np.abs(first - plain_out).max(axis=1) > 1e-4
  assert changed.any()  # 4 branches × 4 samples at rate 0.5: P(nothing dropped) = 2^-16
  # Without explicit rngs the model's own stream advances: two calls differ.
  assert np.abs(np.asarray(model(x)) - np.asarray(model(x))).max() > 1e-3


# --- pooling, patterns, prefix tokens ----------------------------------------------------


def manual_forward_tokens(model, x, rngs=None):
  """The token sequence before pooling, built from the model's own pieces, every block on
  every token."""
  tokens = model.patch_embed(model.patchify(x))
  if model.pool == "cls":
    cls = jnp.broadcast_to(model.cls_token[...], (x.shape[0], 1, tokens.shape[-1]))
    tokens = jnp.concatenate([cls, tokens], axis=1)
  tokens = tokens + model.pos_embed[...]
  for block in model.blocks:
    tokens = block(tokens, num_prefix=int(model.pool == "cls"), rngs=rngs)
  return tokens


@pytest.mark.parametrize("name, pool", [("vit_05m", "cls"), ("lkca_05m", "mean")])
def test_pooling_follows_the_preset(name, pool):
  model = small_model(name)
  model.eval()
  randomise_lkca_kernels(model)
  assert model.pool == pool
  assert hasattr(model, "cls_token") == (pool == "cls")  # no unused parameters
  assert model.pos_embed[...].shape == (64 + (pool == "cls"), 16)
  x = images((BATCH, 16, 16, 3))
  tokens = manual_forward_tokens(model, x)
  by_cls = model.head(model.head_norm(tokens[:, 0]))
  by_mean = model.head(model.head_norm(tokens.mean(axis=1)))
  logits = model(x)
  expected, other = (by_cls, by_mean) if pool == "cls" else (by_mean, by_cls)
  assert_reordered(logits, expected, chain_terms(model))
  assert np.abs(np.asarray(logits) - np.asarray(other)).max() > 1e-3


def test_per_layer_mixer_pattern():
  model = small_model(mixer=["lkca", "mhsa"], depth=4)
  assert [type(b.mixer) for b in model.blocks] == [LKCA, MHSA, LKCA, MHSA]
  assert model.pool == "mean"  # some layer needs the grid, so no class token
  model.eval()
  x = images((BATCH, 16, 16, 3))
  before = np.asarray(model(x))
  randomise_lkca_kernels(model)
  after = np.asarray(model(x))
  assert before.shape == (BATCH, 5) and np.isfinite(after).all()
  assert np.abs(after - before).max() > 1e-3  # the LKCA layers take part


def test_grid_mixer_skips_the_class_token():
  model = small_model(pool="cls")
  model.eval()
  randomise_lkca_kernels(model)
  assert model.pos_embed[...].shape == (65, 16) and model.cls_token[...].shape == (1, 1, 16)
  block = model.blocks[0]
  tokens = images((BATCH, 65, 16), seed=1)
  out = block(tokens, num_prefix=1)
  # Patch tokens: exactly the block without the prefix token.
  np.testing.assert_allclose(
    np.asarray(out[:, 1:]), np.asarray(block(tokens[:, 1:])), rtol=1e-6, atol=1e-6
  )
  # Class token: its mixer branch is zero, only the MLP branch is added.
  cls = tokens[:, :1]
  np.testing.assert_allclose(
    np.asarray(out[:, :1]), np.asarray(cls + block.mlp(block.norm2(cls))), rtol=1e-6, atol=1e-6
  )
  logits = model(images((BATCH, 16, 16, 3)))
  assert logits.shape == (BATCH, 5) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
  "name, overrides", [("vit_05m", {}), ("lkca_05m", {"pool": "cls"}), ("lkca_05m", {})]
)
def test_the_last_block_computes_only_the_pooled_token(name, overrides):
  """Only the last block's pooled token reaches the head. Computing just that (the class
  token's row; or the mean, with the MLP's last product taken once) gives the every-token
  pass's logits and parameter gradients, stochastic depth included (the same per-sample
  draws), and skips at least the MLP products it leaves out."""
  model = small_model(name, drop_path_rate=0.5, **overrides)
  randomise_lkca_kernels(model)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, c = images((BATCH, 16, 16, 3)), images((BATCH, 5), seed=1)

  def every_token(model, x, rngs=None):
    return model.classify(manual_forward_tokens(model, x, rngs))

  def apply(forward):  # the same dropout stream for both passes
    return lambda p, x: forward(nnx.merge(graphdef, p, rest), x, rngs=nnx.Rngs(dropout=7))

  def loss(forward):
    return lambda p, x: jnp.vdot(apply(forward)(p, x), c)

  by_model = lambda model, x, rngs: model(x, rngs=rngs)
  logits, expected = (jax.jit(apply(f))(params, x) for f in (by_model, every_token))
  grads, expected_grads = (jax.jit(jax.grad(loss(f)))(params, x) for f in (by_model, every_token))
  # Two evaluations of the same sums in other orders: 2·L·u of the magnitudes (L the chain's
  # reduction terms, and for the gradients the loss's sum over the logits).
  terms = chain_terms(model) + c.size
  assert_reordered(logits, expected, terms)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
    assert_reordered(got, want, terms)

  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  undropped = jax.jit(apply(by_model))(params, x)
  assert float(jnp.abs(undropped - logits).max()) > 1e-3  # the passes above dropped branches
  x_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

  def flops(forward):
    fn = lambda p, x: forward(nnx.merge(graphdef, p, rest), x)
    cost = jax.jit(fn).lower(params, x_shape).cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  dim, hidden = model.head.kernel.shape[0], model.blocks[-1].mlp.fc1.out_features
  tokens = model.pos_embed[...].shape[0]
  skipped = flops(every_token) - flops(lambda model, x: model(x))
  # The class token's row: both MLP products on the other rows; the mean: the second one,
  # for one sum over the tokens of its inputs.
  products = 2 if model.pool == "cls" else 1
  assert skipped >= 2 * BATCH * (tokens - 1) * products * dim * hidden - BATCH * tokens * hidden


def test_a_block_refuses_a_pooling_it_does_not_know():
  block = small_model().blocks[0]
  with pytest.raises(ValueError, match=r"pool must be None, 'cls' or 'mean', got 'max'"):
    block(images((BATCH, 64, 16)), pool="max")


# --- inputs: batch, dtype, channels, shape ------------------------------------------------


def test_batch_sizes_1_and_7():
  model = small_model()
  model.eval()
  randomise_lkca_kernels(model)
  x = images((7, 16, 16, 3))
  full = np.asarray(model(x))
  assert full.shape == (7, 5)
  # Each sample's logits are independent of the rest of the batch.
  assert_reordered(model(x[:1]), full[:1], chain_terms(model))
  assert_reordered(model(x[3:]), full[3:], chain_terms(model))


def test_bfloat16_input_to_float32_model():
  model = small_model()
  model.eval()
  randomise_lkca_kernels(model)
  x = images((BATCH, 16, 16, 3))
  out32 = model(x)
  out_bf16_input = model(x.astype(jnp.bfloat16))
  assert out_bf16_input.dtype == jnp.float32
  # Only the input is rounded (2^-9 relative); measured 7e-4.
  assert rel_err(out_bf16_input, out32) < 5e-3


def test_bfloat16_model():
  model32 = small_model()
  model16 = small_model(dtype=jnp.bfloat16)
  for model in (model32, model16):
    model.eval()
    randomise_lkca_kernels(model)
  x = images((BATCH, 16, 16, 3))
  out16 = model16(x)
  assert out16.dtype == jnp.bfloat16
  assert model16.patch_embed.kernel[...].dtype == jnp.float32  # float32 master weights
  assert np.isfinite(np.asarray(out16, np.float32)).all()
  # Every activation is rounded to bf16 (relative step 2^-8); measured 0.5% of the logit scale.
  assert rel_err(out16.astype(jnp.float32), model32(x)) < 2e-2


def test_single_channel_images():
  model = create_model(
    "lkca_05m", num_classes=5, image_size=16, channels=1, rngs=nnx.Rngs(0), **SMALL
  )
  assert model.patch_embed.kernel[...].shape == (2 * 2 * 1, 16)
  logits = model(images((BATCH, 16, 16, 1)))
  assert logits.shape == (BATCH, 5) and np.isfinite(np.asarray(logits)).all()


def test_patchify_flattens_patches_as_p1_p2_c():
  model = create_model(
    "lkca_05m",
    num_classes=5,
    image_size=(4, 6),
    patch_size=2,
    channels=3,
    rngs=nnx.Rngs(0),
    **SMALL,
  )
  x = np.arange(4 * 6 * 3, dtype=np.float32).reshape(1, 4, 6, 3)
  patches = np.asarray(model.patchify(jnp.asarray(x)))
  assert patches.shape == (1, 6, 12)
  np.testing.assert_array_equal(patches[0, 4], x[0, 2:4, 2:4, :].reshape(-1))  # row 1, col 1


@pytest.mark.slow
def test_non_square_images_in_every_view():
  x = images((BATCH, 24, 40, 3))
  outputs = {}
  for view in ["conv", "attention", "fft", "auto"]:
    for sharing in ["layer", "head", "channel"]:
      model = create_model(
        "lkca_05m",
        num_classes=5,
        image_size=(24, 40),
        patch_size=8,
        rngs=nnx.Rngs(0),
        dim=16,
        depth=2,
        mixer_options={"lkca": {"view": view, "kernel_sharing": sharing}},
      )
      assert model.grid == (3, 5)
      assert model.blocks[0].mixer.kernel[...].shape[-2:] == (5, 9)
      mixer = model.blocks[0].mixer
      assert mixer.view == view
      assert mixer.cpu_view == mixer.default_view == ("attention" if view == "auto" else view)
      model.eval()
      randomise_lkca_kernels(model)
      outputs[view, sharing] = np.asarray(model(x))
  for sharing in ["layer", "head", "channel"]:
    for view in ["attention", "fft", "auto"]:
      assert rel_err(outputs[view, sharing], outputs["conv", sharing]) < 1e-5
  assert np.isfinite(outputs["conv", "layer"]).all()


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: create_model(
        "lkca_05m", num_classes=5, image_size=30, patch_size=4, rngs=nnx.Rngs(0)
      ),
      "not divisible by patch size 4",
    ),
    (
      lambda: create_model("lkca_xl", num_classes=5, image_size=32, rngs=nnx.Rngs(0)),
      "unknown model preset 'lkca_xl'",
    ),
    (
      lambda: create_model(
        "lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), mixer="conv"
      ),
      "unknown mixer 'conv'",
    ),
    (
      lambda: create_model("lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), width=64),
      "unknown model override 'width'",
    ),
    (
      lambda: create_model(
        "lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), mixer=["lkca", "mhsa", "lkca"]
      ),
      "must repeat evenly over depth 8",
    ),
    (
      lambda: create_model("lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), pool="max"),
      "pool must be",
    ),
    (
      lambda: create_model(
        "lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), mixer_options={"view": "conv"}
      ),
      "key mixer_options by mixer name",
    ),
    (
      lambda: create_model(
        "lkca_05m",
        num_classes=5,
        image_size=32,
        rngs=nnx.Rngs(0),
        mixer_options={"lkca": {"veiw": "conv"}},
      ),
      r"bad mixer_options for 'lkca': unknown option 'veiw'; valid options of 'lkca': "
      r"\['kernel_init', 'kernel_sharing', 'view'\]",
    ),
    (
      lambda: create_model(
        "lkca_05m", num_classes=5, image_size=32, rngs=nnx.Rngs(0), mixer_options={"lkca": "conv"}
      ),
      r"mixer_options\['lkca'\] must map option names to values",
    ),
  ],
)
def test_bad_configuration_raises_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  "sizes, match",
  [
    (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
    (dict(num_classes=10.0), "num_classes must be a positive integer, got 10.0"),
    (dict(channels=0), "channels must be a positive integer, got 0"),
    (dict(patch_size=0), "patch_size must be a positive integer, got 0"),
    (dict(dim=0), "dim must be a positive integer, got 0"),
    (dict(depth=0), "depth must be a positive integer, got 0"),
    (dict(num_heads=0), "num_heads must be a positive integer, got 0"),
    (dict(mlp_ratio=0.001), r"mlp_ratio must give an MLP of 1 unit or more at dim 32, got 0.001"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\), got -0.1"),
    (dict(image_size=0), r"image_size must be positive, got \(0, 0\)"),
    (dict(image_size=32.0), r"image_size must be an int or an \(h, w\) pair, got 32.0"),
    (dict(image_size=(32, 31.5)), r"image_size must be whole numbers, got \(32, 31.5\)"),
  ],
)
def test_sizes_no_model_can_have_are_one_value_error_naming_the_argument(sizes, match):
  """Not a ZeroDivisionError from an initialiser, nor a size silently rounded (NumPy integers
  are whole numbers too)."""
  args = dict(
    num_classes=np.int64(5), image_size=32, dim=32, num_heads=np.int32(2), rngs=nnx.Rngs(0)
  )
  assert create_model("lkca_05m", **args).head.out_features == 5
  with pytest.raises(ValueError, match=match):
    create_model("lkca_05m", **{**args, **sizes})


class BrokenMixer(nnx.Module):
  """A mixer whose constructor has a bug that raises TypeError."""

  needs_grid = False

  def __init__(self, dim, grid=None, *, num_heads, scale=1.0, dtype=None, rngs):
    len(scale)  # the bug: a float has no len()


class AnyOptionMixer(nnx.Module):
  """A mixer that takes **options: any name reaches it, unchecked."""

  needs_grid = False

  def __init__(self, dim, grid=None, *, num_heads, dtype=None, rngs, **options):
    self.options = tuple(sorted(options.items()))

  def __call__(self, x):
    return x


def test_type_error_inside_a_mixer_constructor_surfaces_unchanged(monkeypatch):
  monkeypatch.setitem(MIXERS, "broken", BrokenMixer)
  with pytest.raises(TypeError, match="has no len") as info:
    small_model(mixer="broken", mixer_options={"broken": {"scale": 2.0}})
  assert info.traceback[-1].name == "__init__"  # raised where the bug is, not re-wrapped


def test_options_of_a_mixer_taking_keyword_arguments_pass_through(monkeypatch):
  monkeypatch.setitem(MIXERS, "any", AnyOptionMixer)
  model = small_model(mixer="any", mixer_options={"any": {"whatever": 3}})
  assert model.blocks[0].mixer.options == (("whatever", 3),)


@pytest.mark.parametrize(
  "shape, fix",
  [
    ((2, 16, 16, 1), "build the model with channels=1"),
    ((2, 3, 16, 16), "the model takes channels-last images: images.transpose(0, 2, 3, 1)"),
    ((2, 17, 16, 3), "crop or resize them to multiples of the patch size, 2"),
  ],
)
def test_bad_images_raise_value_error_naming_the_fix(shape, fix):
  model = small_model()
  with pytest.raises(ValueError, match=r"expects images of shape \(B, 16, 16, 3\)") as info:
    model(jnp.zeros(shape))
  assert str(info.value).endswith(f"; {fix}")


def test_images_of_another_size_name_a_model_that_takes_them():
  model = small_model()
  images = jnp.zeros((2, 16, 24, 3))
  with pytest.raises(ValueError, match=r"expects images of shape \(B, 16, 16, 3\)") as info:
    model(images)
  named = re.search(r"with image_size=\((\d+), (\d+)\), patch_size=(\d+);", str(info.value))
  height, width, patch = map(int, named.groups())
  other = small_model(image_size=(height, width), patch_size=patch)
  assert other(images).shape == (2, 5)
  assert other.patch_size == model.patch_size  # what move_params needs to carry the weights
  assert str(info.value).endswith(
    "lkca_jax.resolution.move_params carries trained parameters to it"
  )


@pytest.mark.parametrize("shape", [(16, 16, 3), (1, 2, 16, 16, 3)])
def test_images_without_one_batch_axis_are_told_to_add_it(shape):
  with pytest.raises(ValueError, match=r"a batch of images \(B, 16, 16, 3\), got shape"):
    small_model()(jnp.zeros(shape))


def test_model_jits_and_differentiates():
  model = small_model()
  randomise_lkca_kernels(model)
  model.eval()
  x = images((BATCH, 16, 16, 3))

  @nnx.jit
  def loss_and_grads(model, x):
    return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)

  loss, grads = loss_and_grads(model, x)
  assert np.isclose(float(loss), float(jnp.sum(model(x) ** 2)), rtol=1e-5)
  kernel_grad = np.asarray(grads.blocks[0].mixer.kernel[...])
  assert kernel_grad.shape == (15, 15) and np.abs(kernel_grad).max() > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
