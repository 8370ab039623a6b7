"""The pre-norm ViT family of the reference, with a token mixer per layer.

`create_model(name, ...)` builds a preset; any preset field can be
overridden, and `mixer` may be a single registry name or a per-layer pattern
(a list as long as `depth`, or a shorter one that repeats).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax.layers import MIXERS, MLP, DropPath, layer_norm, linear, option_names
from lkca_jax.layers.common import LAYER_NORM_EPSILON, add_wide, as_grid


@dataclasses.dataclass(frozen=True)
class Preset:
  mixer: Any  # registry name, or a per-layer pattern of names
  dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.1
  drop_path_schedule: str = "uniform"  # DROP_PATH_SCHEDULES
  pool: str = "auto"  # "cls", "mean", or "auto": cls only when no layer needs the grid
  # Constructor options per mixer name, e.g. {"lkca": {"view": "conv"}}.
  mixer_options: dict = dataclasses.field(default_factory=dict)
  # Pixels per patch side; None: image size / DEFAULT_GRID (the paper's 8×8 grid).
  # `create_model(patch_size=...)` (config.patch_size) overrides it.
  patch_size: int | None = None
  convention: str = "reference"  # CONVENTIONS


# `docs/method.md`, "Presets". LKCA presets' `num_heads` only matters for kernel_sharing="head".
PRESETS: dict[str, Preset] = {
  "vit_05m": Preset("mhsa", 120, 4, 4),
  "vit_1m": Preset("mhsa", 136, 7, 8),
  "vit_2m": Preset("mhsa", 200, 6, 8),
  "vit": Preset("mhsa", 192, 9, 12),
  "vit_4m": Preset("mhsa", 264, 7, 8),
  "vit_8m": Preset("mhsa", 312, 10, 8),
  "lkca_05m": Preset("lkca", 100, 8, 4),
  "lkca_t": Preset("lkca", 136, 9, 8),
  "lkca_2m": Preset("lkca", 192, 9, 12),
  "lkca_b": Preset("lkca", 210, 10, 10),
  "lkca_4m": Preset("lkca", 246, 11, 6),
  "lkca_8m": Preset("lkca", 306, 14, 9),
  "lkca_l": Preset("lkca", 360, 12, 12, mlp_ratio=3.0),
  # Peer mixers (`docs/method.md`, "Peer presets") at lkca_t / lkca_b's CIFAR-10 budget: the
  # same depth (9 / 10) and MLP ratio 2, width shrunk to match. ACmix keeps
  # 8 heads (as lkca_t / vit_1m); FLatten uses a few wide heads (d 38 / 44),
  # as FLatten-DeiT-T does (3 × 64). CIFAR-10 params vs 1,027,611 / 2,691,310:
  "acmix_t": Preset("acmix", 112, 9, 8),  # 1,028,157 (+0.05%)
  "acmix_b": Preset("acmix", 176, 10, 8),  # 2,682,280 (−0.34%)
  "flatten_t": Preset("flatten", 114, 9, 3),  # 1,036,840 (+0.90%)
  "flatten_b": Preset("flatten", 176, 10, 4),  # 2,645,290 (−1.71%)
  # ImageNet-1k size (`docs/method.md`, "ImageNet presets"): DeiT-S / ViT-S/16, 16×16
  # patches (a 14×14 grid at 224×224), width 384, depth 12, 6 heads, MLP 4×, built and
  # initialised as DeiT builds it. Parameters at 224×224 with 1000 classes: vit_s16
  # 22,050,664 (DeiT-S's); lkca_s16 18,505,876 (27×27 kernels, no class token).
  "vit_s16": Preset("mhsa", 384, 12, 6, mlp_ratio=4.0, patch_size=16, convention="deit"),
  "lkca_s16": Preset("lkca", 384, 12, 6, mlp_ratio=4.0, patch_size=16, convention="deit"),
}

# How a model is built and initialised beyond its shape: "reference", as the LKCA authors'
# code (xavier-normal Linear weights, N(0, 1) position table and class token, LayerNorm
# epsilon 1e-5, no qkv bias); "deit", as DeiT builds its ViTs with timm (`deit_init`:
# trunc-normal(0.02) Linear weights and tokens, PyTorch's Conv2d init for the patch
# embedding; LayerNorm epsilon 1e-6; MHSA with a qkv bias).
CONVENTIONS = ("reference", "deit")
DEIT_NORM_EPSILON = 1e-6

# The input grid is 8×8 for every dataset of the paper (patch 4 at 32×32,
# patch 8 at 64×64), so the default patch size is image_size / 8.
DEFAULT_GRID = 8

# Compute dtypes by config name; parameters and optimizer state stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Which parameters AdamW's weight decay reaches (optimizer.weight_decay_on): "all" (the
# reference recipe) or the "weights" (`decays`: timm's rule, which DeiT's recipe uses).
WEIGHT_DECAY_ON = ("all", "weights")

# How the drop-path rate is spread over the blocks (`drop_path_scales`): "uniform", the same
# rate in every block (the reference recipe), or "linear", from 0 in the first block to the
# rate in the last (timm's spacing, which DeiT's recipe uses).
DROP_PATH_SCHEDULES = ("uniform", "linear")


def drop_path_scales(schedule: str, depth: int) -> tuple[float, ...]:
  """Each block's share of the model's drop-path rate under `schedule`."""
  if schedule == "uniform":
    return (1.0,) * depth
  if schedule == "linear":  # block i of L: i / (L - 1); one block alone: 0, as timm's linspace
    return tuple(i / (depth - 1) if depth > 1 else 0.0 for i in range(depth))
  raise ValueError(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}, got {schedule!r}")


# How a model started from another's parameters (resolution.move_params) takes its
# classifier `head`: "keep" the source's (the same classes), or a "new" one as the model
# initialises it (another dataset's classes; timm does the same for another class count).
HEAD_STARTS = ("keep", "new")


def decays(owner: nnx.Module, name: str, value) -> bool:
  """Whether the "weights" weight decay reaches the parameter `name` of the module `owner`:
  matrices and kernels (two or more axes) do; biases, norms' scales, scalars and the
  position tables and tokens a module class names in its `no_weight_decay` do not."""
  return value.ndim >= 2 and name not in getattr(type(owner), "no_weight_decay", ())


def check_mixer_options(mixer: str, options) -> None:
  """ValueError unless every option name is one that mixer's constructor takes.

  Checked against the signature rather than by catching the constructor's
  TypeError, so a TypeError raised inside a constructor surfaces as the bug it is.
  """
  if not isinstance(options, Mapping):
    raise ValueError(f"mixer_options[{mixer!r}] must map option names to values, got {options!r}")
  valid = option_names(MIXERS[mixer])
  unknown = [] if valid is None else sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
      f"bad mixer_options for {mixer!r}: unknown option {unknown[0]!r}; "
      f"valid options of {mixer!r}: {valid}"
    )


class Block(nnx.Module):
  """x += DropPath(Mixer(LN(x))); x += DropPath(MLP(LN(x)))."""

  def __init__(
    self,
    dim: int,
    grid,
    *,
    mixer: str,
    num_heads: int,
    mlp_ratio: float,
    drop_path_rate: float,
    mixer_options: dict,
    dtype,
    norm_epsilon: float = LAYER_NORM_EPSILON,
    rngs: nnx.Rngs,
  ):
    self.norm1 = layer_norm(dim, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)
    options = mixer_options.get(mixer, {})
    check_mixer_options(mixer, options)
    self.mixer = MIXERS[mixer](dim, grid, num_heads=num_heads, dtype=dtype, rngs=rngs, **options)
    # What `macs` needs besides the token count and width (a tuple: static attributes hash).
    self.num_heads = num_heads
    self.mixer_options = tuple(sorted(options.items()))
    self.drop_path1 = DropPath(drop_path_rate, rngs=rngs)
    self.norm2 = layer_norm(dim, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)
    self.mlp = MLP(dim, int(round(dim * mlp_ratio)), dtype=dtype, rngs=rngs)
    self.drop_path2 = DropPath(drop_path_rate, rngs=rngs)

  def __call__(self, x, *, num_prefix: int = 0, rngs=None, drop_path_rate=None, pool=None):
    """x (B, T, D) → (B, T, D); with `pool`, only the pooled output token (B, 1, D), computing
    no more than it needs. "cls": the first token's, its mixer branch and MLP on that row
    alone. "mean": the mean over tokens, the MLP's last product (affine) taken once, of
    the mean of its inputs."""
    if pool not in (None, "cls", "mean"):
      raise ValueError(f"pool must be None, 'cls' or 'mean', got {pool!r}")
    mixed = self._mixed(self.norm1(x), num_prefix, first_only=pool == "cls")
    if pool == "cls":
      x = x[:, :1]
    x = x + self.drop_path1(mixed, rngs=rngs, rate=drop_path_rate)
    if pool == "mean":
      branch = self.mlp.mean_output(self.norm2(x))
      x = x.mean(axis=1, keepdims=True)
    else:
      branch = self.mlp(self.norm2(x))
    return x + self.drop_path2(branch, rngs=rngs, rate=drop_path_rate)

  def attention_weights(self, y, *, num_prefix: int = 0) -> jax.Array:
    """The weights (B, H, N, N) the mixer's attention applies among the N patch tokens, for
    its input y (B, T, D) (`self.norm1` of the block's input), in float32; for a mixer with
    `attention_weights` (MHSA, ACmix, FLatten). Rows are queries."""
    if self.mixer.needs_grid:  # it sees the patch tokens only
      return self.mixer.attention_weights(y[:, num_prefix:])
    return self.mixer.attention_weights(y)[:, :, num_prefix:, num_prefix:]

  def _mixed(self, y, num_prefix: int, *, first_only: bool):
    """The mixer branch before the residual add, for every token or the first alone."""
    if num_prefix and self.mixer.needs_grid:
      # A grid mixer sees the patch tokens only; prefix tokens skip this branch.
      if first_only:
        return jnp.zeros_like(y[:, :1])
      return jnp.concatenate([jnp.zeros_like(y[:, :num_prefix]), self.mixer(y[:, num_prefix:])], 1)
    if not first_only:
      return self.mixer(y)
    if hasattr(self.mixer, "mix_first"):
      return self.mixer.mix_first(y, 1)
    return self.mixer(y)[:, :1]


def _conventional(convention: str, mixers, mixer_options) -> tuple[dict, float]:
  """The mixer options and LayerNorm epsilon of a model built by `convention` (CONVENTIONS):
  under "deit", MHSA layers take a qkv bias unless the options say otherwise."""
  options = dict(mixer_options)
  if convention == "reference":
    return options, LAYER_NORM_EPSILON
  if convention != "deit":
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  if "mhsa" in mixers:
    options["mhsa"] = {"qkv_bias": True, **options.get("mhsa", {})}
  return options, DEIT_NORM_EPSILON


def deit_init(model, rngs: nnx.Rngs) -> None:
  """Draws `model`'s parameters again as timm's VisionTransformer, which DeiT builds: every
  Linear weight, the position table and the class token from trunc_normal_(std=0.02), whose
  bounds ±2 are absolute (±100 standard deviations); Linear biases 0; the patch embedding,
  a Conv2d there, as PyTorch initialises one: weight and bias U(±1/√fan_in). LayerNorms
  (1, 0) and the mixers' own parameters (LKCA's zero kernels) keep their init."""

  def trunc_normal(shape):
    return 0.02 * jax.random.truncated_normal(rngs.params(), -100.0, 100.0, shape)

  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear) and module is not model.patch_embed:
      module.kernel[...] = trunc_normal(module.kernel.shape)
  bound = model.patch_embed.in_features**-0.5
  for param in (model.patch_embed.kernel, model.patch_embed.bias):
    param[...] = jax.random.uniform(rngs.params(), param.shape, minval=-bound, maxval=bound)
  for name in ("pos_embed", "cls_token"):
    if hasattr(model, name):
      getattr(model, name)[...] = trunc_normal(getattr(model, name).shape)


def _expand_pattern(mixer, depth: int) -> list[str]:
  pattern = [mixer] if isinstance(mixer, str) else list(mixer)
  if not pattern or depth % len(pattern):
    raise ValueError(f"mixer pattern {pattern} must repeat evenly over depth {depth}")
  unknown = sorted(set(pattern) - set(MIXERS))
  if unknown:
    raise ValueError(f"unknown mixer {unknown[0]!r}; registered mixers: {sorted(MIXERS)}")
  return pattern * (depth // len(pattern))


def check_sizes(**sizes) -> None:
  """A ValueError naming the first of a ViT's `sizes` that no model can have: counts are
  positive integers, the MLP at least one unit wide, the drop-path rate in [0, 1)."""
  for name in ("num_classes", "channels", "patch_size", "dim", "depth", "num_heads"):
    value = sizes[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  ratio, rate = sizes["mlp_ratio"], sizes["drop_path_rate"]
  if not isinstance(ratio, numbers.Real) or not round(sizes["dim"] * ratio) >= 1:
    raise ValueError(
      f"mlp_ratio must give an MLP of 1 unit or more at dim {sizes['dim']}, got {ratio!r}"
    )
  if not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
    raise ValueError(f"drop_path_rate must be in [0, 1), got {rate!r}")


class ViT(nnx.Module):
  """Patch embedding → position embedding → blocks → LN → Linear head.

  Called on NHWC images (B, H, W, C); returns logits (B, num_classes).
  Pooling is the class token ("cls", the MHSA baseline) or the mean of the
  patch tokens ("mean", the LKCA models).
  """

  no_weight_decay = ("pos_embed", "cls_token")  # models.decays

  def __init__(
    self,
    *,
    num_classes: int,
    image_size,
    channels: int,
    patch_size: int,
    dim: int,
    depth: int,
    num_heads: int,
    mixer: Any = "lkca",
    mlp_ratio: float = 2.0,
    drop_path_rate: float = 0.1,
    drop_path_schedule: str = "uniform",
    pool: str = "auto",
    mixer_options: dict | None = None,
    convention: str = "reference",
    dtype=None,
    rngs: nnx.Rngs,
  ):
    check_sizes(
      num_classes=num_classes,
      channels=channels,
      patch_size=patch_size,
      dim=dim,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=mlp_ratio,
      drop_path_rate=drop_path_rate,
    )
    height, width = as_grid(image_size, "image_size")
    if height % patch_size or width % patch_size:
      raise ValueError(
        f"image size {height}x{width} is not divisible by patch size "
        f"{patch_size}; choose a patch size that divides both sides"
      )
    self.grid = (height // patch_size, width // patch_size)
    self.patch_size = patch_size
    self.channels = channels
    self.dtype = dtype
    self.mixers = _expand_pattern(mixer, depth)
    mixer_options, norm_epsilon = _conventional(convention, self.mixers, mixer_options or {})
    unused = sorted(set(mixer_options) - set(self.mixers))
    if unused:
      raise ValueError(
        f"mixer_options for {unused[0]!r}, which no layer uses (mixers: "
        f"{sorted(set(self.mixers))}); key mixer_options by mixer name"
      )
    needs_grid = any(MIXERS[m].needs_grid for m in self.mixers)
    if pool == "auto":
      pool = "mean" if needs_grid else "cls"
    if pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls', 'mean' or 'auto', got {pool!r}")
    self.pool = pool
    num_tokens = self.grid[0] * self.grid[1]
    self.patch_embed = linear(patch_size * patch_size * channels, dim, dtype=dtype, rngs=rngs)
    normal = jax.nn.initializers.normal(1.0)
    if pool == "cls":
      self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, dim)))
      num_tokens += 1
    self.pos_embed = nnx.Param(normal(rngs.params(), (num_tokens, dim)))
    self.drop_path_scales = drop_path_scales(drop_path_schedule, depth)
    self.blocks = nnx.List(
      [
        Block(
          dim,
          self.grid,
          mixer=m,
          num_heads=num_heads,
          mlp_ratio=mlp_ratio,
          drop_path_rate=drop_path_rate * scale,
          mixer_options=mixer_options,
          dtype=dtype,
          norm_epsilon=norm_epsilon,
          rngs=rngs,
        )
        for m, scale in zip(self.mixers, self.drop_path_scales, strict=True)
      ]
    )
    self.head_norm = layer_norm(dim, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)
    self.head = linear(dim, num_classes, dtype=dtype, rngs=rngs)
    if convention == "deit":
      deit_init(self, rngs)

  def patchify(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) → (B, h·w, p·p·C), each patch flattened as (p1, p2, c)."""
    p = self.patch_size
    expected = f"(B, {self.grid[0] * p}, {self.grid[1] * p}, {self.channels})"
    if images.ndim != 4:  # one image, e.g. under jax.vmap over a batch
      raise ValueError(
        f"model expects a batch of images {expected}, got shape {images.shape}; give one "
        "image a batch axis (images[None])"
      )
    b, height, width, c = images.shape
    if (height // p, width // p) != self.grid or c != self.channels or height % p or width % p:
      raise ValueError(
        f"model expects images of shape {expected}, got {images.shape}; {self._fix_for(images)}"
      )
    x = images.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, self.grid[0] * self.grid[1], p * p * c)

  def _fix_for(self, images: jax.Array) -> str:
    """What to do about images of the wrong shape (patchify's error names it)."""
    _, height, width, c = images.shape
    p = self.patch_size
    if c != self.channels and images.shape[1] == self.channels:
      return "the model takes channels-last images: images.transpose(0, 2, 3, 1)"
    if c != self.channels:
      return f"build the model with channels={c}"
    if height % p or width % p:
      return f"crop or resize them to multiples of the patch size, {p}"
    return (
      f"build the model with image_size=({height}, {width}), patch_size={p}; "
      "lkca_jax.resolution.move_params carries trained parameters to it"
    )

  def embed(self, images: jax.Array) -> tuple[jax.Array, int]:
    """The tokens the first block takes, (B, T, D), and how many of them (the class token)
    come before the h·w patch tokens."""
    if self.dtype is not None:
      images = images.astype(self.dtype)
    x = self.patch_embed(self.patchify(images))
    num_prefix = 0
    if self.pool == "cls":
      # Broadcast, then cast: its gradient sums over the batch in the parameter's float32.
      cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
      num_prefix = 1
    return add_wide(x, self.pos_embed[...]), num_prefix

  def classify(self, tokens: jax.Array) -> jax.Array:
    """Logits from the last block's tokens: every token, or only the pooled one."""
    pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
    return self.head(self.head_norm(pooled))

  def __call__(
    self, images: jax.Array, *, rngs: nnx.Rngs | None = None, drop_path_rate=None
  ) -> jax.Array:
    """`drop_path_rate`, if given (a traced scalar), replaces the model's rate: each block
    takes its share of it (`drop_path_scales`)."""
    x, num_prefix = self.embed(images)
    for i, (block, scale) in enumerate(zip(self.blocks, self.drop_path_scales, strict=True)):
      # Only the pooled token of the last block reaches the head, so that block computes
      # just it: the same logits for less work (a tenth of a ViT's products with a class
      # token, less with the mean).
      pool = self.pool if i == len(self.blocks) - 1 else None
      rate = drop_path_rate if drop_path_rate is None or scale == 1.0 else drop_path_rate * scale
      x = block(x, num_prefix=num_prefix, rngs=rngs, drop_path_rate=rate, pool=pool)
    return self.classify(x)


def preset_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(Preset)]


def create_model(
  name: str,
  *,
  num_classes: int,
  image_size,
  channels: int = 3,
  patch_size: int | None = None,
  rngs: nnx.Rngs,
  dtype=None,
  **overrides,
) -> ViT:
  """Builds preset `name`; keyword overrides replace preset fields (see `Preset`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  unknown = sorted(set(overrides) - set(preset_fields()))
  if unknown:
    raise ValueError(f"unknown model override {unknown[0]!r}; valid overrides: {preset_fields()}")
  preset = dataclasses.replace(PRESETS[name], **overrides)
  height, width = as_grid(image_size, "image_size")
  fields = dataclasses.asdict(preset)
  preset_patch = fields.pop("patch_size")
  if patch_size is None:
    patch_size = preset_patch or max(1, min(height, width) // DEFAULT_GRID)
  return ViT(
    num_classes=num_classes,
    image_size=(height, width),
    channels=channels,
    patch_size=patch_size,
    dtype=dtype,
    rngs=rngs,
    **fields,
  )


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (every nnx.Param leaf)."""
  params = nnx.state(model, nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(params)))
