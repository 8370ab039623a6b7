"""Parameters moved between image sizes: a model trained on one patch grid, rebuilt for another.

`move_params(source, target)` returns the target model's parameters filled from `source`
(the parameters of the same model built for another grid):

- LKCA kernels (…, 2h−1, 2w−1) become (…, 2H−1, 2W−1) in one of `KERNEL_MOVES`:
  "pad": each learned tap keeps its offset in patches; the kernel is zero-padded (or
  cropped) around its centre tap, so on the offsets both grids have the operator is the
  old one exactly, and new offsets start at zero (as the reference's zeros init).
  "resample": each tap keeps its offset as a fraction of the image; the kernel is
  resampled (`resample_kernel`), so a token mixes the same part of the picture.
- Absolute position tables (the ViT's `pos_embed`, FLatten's `position`) are resampled
  as timm's `resample_abs_pos_embed`: prefix (class) tokens kept, the grid part resized.
- ACmix's relative position bias table is resampled as timm's
  `resample_relative_position_bias_table` (the whole table resized).
- Every other parameter is copied and must have the same shape in both models, except
  the classifier `head` with `head="new"`: the target's own, as it was initialised (for
  another class count: fine-tuning on another dataset).

Any other difference (another patch size, width, depth, class count without a new head, a
grid-shaped parameter without a move) raises `MoveError` naming the parameter and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax import models
from lkca_jax.layers import LKCA, MIXERS, ACmix, FocusedLinearAttention
from lkca_jax.layers.lkca import DEFAULT_KERNEL_MOVE, KERNEL_MOVES

# timm resamples position tables with bicubic interpolation, antialiased. jax.image.resize's
# "cubic" is the Keys kernel with a = −0.5, half-pixel centres, its weights renormalised at
# the edges (as PyTorch's antialiased bicubic); antialiased when it shrinks.
TABLE_METHOD = "cubic"
# Kernels are resampled bilinearly: a kernel's taps may be spiky (a strong zero-offset tap),
# and linear interpolation, unlike cubic, never overshoots them or flips a tap's sign.
KERNEL_METHOD = "linear"


class MoveError(ValueError):
  """Parameters that cannot be moved between the two models; the message names the fix."""


def kernel_grid(kernel_shape) -> tuple[int, int]:
  """The (h, w) grid of a (…, 2h−1, 2w−1) LKCA kernel or offset table."""
  rows, cols = kernel_shape[-2:]
  if rows % 2 == 0 or cols % 2 == 0:
    raise MoveError(f"a kernel of shape {tuple(kernel_shape)} has no centre tap (sides 2h−1, 2w−1)")
  return (rows + 1) // 2, (cols + 1) // 2


def centre_fit(kernel: jax.Array, grid) -> jax.Array:
  """(…, 2h−1, 2w−1) → (…, 2H−1, 2W−1) with each tap at its offset: zeros around, or cropped.

  Tap (a, b) is offset (a − (h−1), b − (w−1)); it keeps that offset on the new grid.
  """
  old = kernel_grid(kernel.shape)
  new = (int(grid[0]), int(grid[1]))
  for axis, (h, hh) in enumerate(zip(old, new, strict=True)):
    axis = kernel.ndim - 2 + axis
    if hh >= h:
      widths = [(0, 0)] * kernel.ndim
      widths[axis] = (hh - h, hh - h)
      kernel = jnp.pad(kernel, widths)
    else:
      kernel = jax.lax.slice_in_dim(kernel, h - hh, h - hh + 2 * hh - 1, axis=axis)
  return kernel


def resample_kernel(kernel: jax.Array, grid) -> jax.Array:
  """(…, 2h−1, 2w−1) → (…, 2H−1, 2W−1) with each tap at the same fraction of the image.

  Offset d (in old patches) lands at d·H/h: the kernel is stretched by s = (H/h, W/w) about
  its centre tap (`jax.image.scale_and_translate`, KERNEL_METHOD, antialiased when it
  shrinks), then divided by s_h·s_w, since each old token now covers s_h·s_w new ones: a
  picture sampled s times finer gets the same mixed values. At the same grid: the kernel.
  """
  old = kernel_grid(kernel.shape)
  new = (int(grid[0]), int(grid[1]))
  if old == new:
    return kernel
  scale = [n / o for n, o in zip(new, old, strict=True)]
  # Pixel centres sit at index + ½: the old centre tap (h−1) + ½ goes to the new (H−1) + ½.
  translation = [n - 0.5 - (o - 0.5) * s for n, o, s in zip(new, old, scale, strict=True)]
  lead = kernel.ndim - 2
  out = jax.image.scale_and_translate(
    kernel.astype(jnp.float32),
    (*kernel.shape[:lead], 2 * new[0] - 1, 2 * new[1] - 1),
    (lead, lead + 1),
    np.asarray(scale, np.float32),
    np.asarray(translation, np.float32),
    KERNEL_METHOD,
  )
  return (out / (scale[0] * scale[1])).astype(kernel.dtype)


def move_kernel(kernel: jax.Array, grid, how: str) -> jax.Array:
  """An LKCA kernel moved to `grid` as `how` ("pad" or "resample") says."""
  if how == "pad":
    return centre_fit(kernel, grid)
  if how == "resample":
    return resample_kernel(kernel, grid)
  raise MoveError(f"kernel move must be one of {KERNEL_MOVES}, got {how!r}")


def resample_grid_table(table: jax.Array, old_grid, new_grid) -> jax.Array:
  """(h·w, D) row-major grid of vectors → (H·W, D), resized as timm does (TABLE_METHOD)."""
  (h, w), (hh, ww) = old_grid, new_grid
  if (h, w) == (hh, ww):
    return table
  if table.shape[0] != h * w:
    raise MoveError(f"a position table of {table.shape[0]} rows is no {h}x{w} grid")
  grid = table.astype(jnp.float32).reshape(h, w, -1)
  out = jax.image.resize(grid, (hh, ww, grid.shape[-1]), TABLE_METHOD, antialias=True)
  return out.reshape(hh * ww, -1).astype(table.dtype)


def resample_pos_embed(pos_embed: jax.Array, old_grid, new_grid, num_prefix: int) -> jax.Array:
  """timm's `resample_abs_pos_embed` for a (prefix + h·w, D) table: prefix rows kept."""
  prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
  return jnp.concatenate([prefix, resample_grid_table(grid, old_grid, new_grid)], axis=0)


def resample_relative_table(table: jax.Array, new_grid) -> jax.Array:
  """ACmix's ((2h−1)(2w−1), H) bias table → ((2H−1)(2W−1), H), the whole table resized as
  timm's `resample_relative_position_bias_table`."""
  return resample_grid_table(table, _offsets(table.shape[0]), _offset_sides(new_grid))


def _offset_sides(grid) -> tuple[int, int]:
  return 2 * grid[0] - 1, 2 * grid[1] - 1


def _offsets(rows: int) -> tuple[int, int]:
  """The (2h−1, 2w−1) sides of a square offset table of `rows` rows."""
  side = math.isqrt(rows)
  if side * side != rows or side % 2 == 0:
    raise MoveError(
      f"an offset table of {rows} rows is no square (2h−1)² table; only square grids move"
    )
  return side, side


# --- which parameter moves how ------------------------------------------------------
# move(value, old_grid, new_grid, module, kernels) for each (module class, parameter name)
# whose shape depends on the grid.
Move = Callable[[jax.Array, tuple, tuple, nnx.Module, str], jax.Array]
MOVES: dict[tuple[type, str], Move] = {
  (LKCA, "kernel"): lambda v, old, new, module, kernels: move_kernel(v, new, kernels),
  (ACmix, "relative_bias"): lambda v, old, new, module, kernels: resample_relative_table(v, new),
  (FocusedLinearAttention, "position"): lambda v, old, new, module, kernels: resample_grid_table(
    v, old, new
  ),
  (models.ViT, "pos_embed"): lambda v, old, new, module, kernels: resample_pos_embed(
    v, old, new, 1 if module.pool == "cls" else 0
  ),
}


def _flat(state: nnx.State) -> dict[tuple, jax.Array]:
  return {path: leaf[...] for path, leaf in nnx.to_flat_state(state)}


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _owners(model: nnx.Module) -> dict[tuple, nnx.Module]:
  return {path: module for path, module in nnx.iter_modules(model)}


def grid_params(model: nnx.Module) -> set[tuple]:
  """Paths of `model`'s parameters that have a move in MOVES (the grid-shaped ones)."""
  owners = _owners(model)
  return {
    path
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    if (type(owners[path[:-1]]), path[-1]) in MOVES
  }


def source_grid(source: nnx.State, target: nnx.Module) -> tuple[int, int]:
  """The patch grid `source` was built for: from its first grid-shaped kernel or table,
  else (a plain ViT) the square grid its position table holds, as timm assumes."""
  flat = _flat(source)
  owners = _owners(target)
  for path, value in flat.items():
    cls = type(owners.get(path[:-1]))
    if (cls, path[-1]) == (LKCA, "kernel"):
      return kernel_grid(value.shape)
    if (cls, path[-1]) == (ACmix, "relative_bias"):
      return kernel_grid(_offsets(value.shape[0]))
  rows = flat[("pos_embed",)].shape[0] - (1 if target.pool == "cls" else 0)
  side = math.isqrt(rows)
  if side * side != rows:
    raise MoveError(
      f"the source's position table has {rows} grid rows, not a square grid; pass source_grid"
    )
  return side, side


def move_params(
  source: nnx.State,
  target: nnx.Module,
  *,
  kernels: str = DEFAULT_KERNEL_MOVE,
  head: str = "keep",
  old_grid=None,
) -> nnx.State:
  """`target`'s parameters (an nnx.State like nnx.state(target, nnx.Param)) from `source`,
  the parameters of the same model built for another image size (see the module docstring).

  `kernels` is how LKCA kernels move ("pad" or "resample", default DEFAULT_KERNEL_MOVE);
  `head` is "keep" (the source's classifier) or "new" (`target`'s own, for other classes);
  `old_grid` is the source's patch grid (default: read off its kernels, or the square its
  position table holds). Raises MoveError for anything that cannot be moved.
  """
  if kernels not in KERNEL_MOVES:
    raise MoveError(f"kernels must be one of {KERNEL_MOVES}, got {kernels!r}")
  if head not in models.HEAD_STARTS:
    raise MoveError(f"head must be one of {models.HEAD_STARTS}, got {head!r}")
  wanted = nnx.state(target, nnx.Param)
  have, want = _flat(source), _flat(wanted)
  _check_same_names(have, want)
  old = tuple(old_grid) if old_grid is not None else source_grid(source, target)
  new = tuple(target.grid)
  owners = _owners(target)
  moved = {}
  for path, like in want.items():
    owner = owners[path[:-1]]
    if head == "new" and path[0] == "head":
      moved[path] = like
      continue
    move = MOVES.get((type(owner), path[-1]))
    value = have[path]
    if move is not None and old != new:
      value = move(value, old, new, owner, kernels)
    if value.shape != like.shape:
      raise MoveError(
        _mismatch(path, have[path].shape, like.shape, owner, move is not None, target.channels)
      )
    moved[path] = jnp.asarray(value, like.dtype)
  return nnx.from_flat_state(
    {path: leaf.replace(moved[path]) for path, leaf in nnx.to_flat_state(wanted)}
  )


def _check_same_names(have: dict, want: dict) -> None:
  only_source = sorted(have.keys() - want.keys())
  only_target = sorted(want.keys() - have.keys())
  if only_source or only_target:
    parts = [
      f"{len(names)} parameters only in the {where}, e.g. {_name(names[0])}"
      for names, where in ((only_source, "checkpoint"), (only_target, "new model"))
      if names
    ]
    raise MoveError(
      f"the checkpoint is of another model ({'; '.join(parts)}); build the new model with the "
      "checkpoint's preset and overrides (depth, mixer, pool), changing only the image size"
    )


def _patch_fix(old_inputs: int, new_inputs: int, channels: int) -> str:
  """What to change when the patch embeddings take other inputs (patch² × channels)."""
  old_patch, new_patch = (math.isqrt(n // channels) for n in (old_inputs, new_inputs))
  if old_patch**2 * channels != old_inputs:  # another channel count, too
    return (
      f"its patches hold {old_inputs} values (patch² × channels), this model's {new_inputs}: "
      "use the checkpoint's patch size and channels; only the patch grid may change"
    )
  return (
    f"the checkpoint's patches are {old_patch}x{old_patch}, this model's {new_patch}x{new_patch}: "
    f"build it with patch_size={old_patch} (--config.patch_size); only the patch grid may change"
  )


def _mismatch(
  path: tuple, old_shape, new_shape, owner: nnx.Module, has_move: bool, channels: int
) -> str:
  name = _name(path)
  if has_move:
    return f"{name}: moved to {new_shape} failed from {tuple(old_shape)}; a bug, please report"
  if type(owner) in MIXERS.values():
    fix = (
      f"{type(owner).__name__}'s {path[-1]} depends on the grid and lkca_jax defines no move "
      "for it (resolution.MOVES); train this mixer at the new size from scratch"
    )
  elif path == ("patch_embed", "kernel"):
    fix = _patch_fix(old_shape[0], new_shape[0], channels)
  elif path[0] == "head":
    fix = (
      "use the checkpoint's class count (dataset.classes), or start a new classifier for "
      "these classes (head='new'; --config.init_from_head=new)"
    )
  else:
    fix = "only the image size may change; keep the checkpoint's width, heads and options"
  return (
    f"{name} is {tuple(old_shape)} in the checkpoint but {tuple(new_shape)} in the new model, "
    f"and it has no move between image sizes: {fix}"
  )
