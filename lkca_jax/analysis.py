"""What a ViT of `lkca_jax.models` has learned, as arrays: kernels, attention, ERFs, distances.

- LKCA kernels and their attention view: each LKCA layer's (…, 2h−1, 2w−1)
  kernel K and the N×N block-Toeplitz matrix A it stands for (arXiv 2401.05738);
  both depend on the parameters only.
- Attention weights, which depend on the input: every MHSA, ACmix and FLatten
  layer's weights on the values (`attention_weights` of the mixer: MHSA's softmax,
  ACmix's attention-branch softmax, FLatten's linear-attention weights), averaged
  over images, on the patch tokens (a class token's row and column dropped).
- Mean attention distance (in patches): per query token, the mean grid
  distance to the keys weighted by its row of |A| (LKCA) or of the mean
  weights (the others), each row normalised to sum 1; then the mean over
  queries and heads (channels, for per-channel kernels).
- Effective receptive field (Luo et al., NeurIPS 2016, measured as RepLKNet
  does, Ding et al., CVPR 2022): the gradient of the positive part of the
  centre token's output of the last block, summed over channels, with
  respect to the input pixels; |gradient| summed over colour channels and
  averaged over images. RepLKNet keeps the positive part of the gradient;
  its absolute value here also counts pixels that push the output down.
  `erf_squares` gives the side of the smallest square around the centre
  token's patch that holds a fraction t of the map.

Layers are indexed from 0 (`model.blocks[i]`). The functions that run the
model put it in eval mode (no DropPath) and leave it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkca_jax import models
from lkca_jax.layers.lkca import LKCA

ERF_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
BATCH_SIZE = 64  # images per compiled forward / backward pass


# --- layers ------------------------------------------------------------------
def lkca_layers(model: models.ViT) -> list[int]:
  return [i for i, block in enumerate(model.blocks) if isinstance(block.mixer, LKCA)]


def attention_layers(model: models.ViT) -> list[int]:
  """The layers whose mixer has input-dependent attention weights (`attention_weights`)."""
  return [i for i, block in enumerate(model.blocks) if hasattr(block.mixer, "attention_weights")]


def lkca_kernels(model: models.ViT) -> dict[int, np.ndarray]:
  """Layer → its learned kernel: (2h−1, 2w−1), or (heads | channels, 2h−1, 2w−1)."""
  return {i: np.asarray(model.blocks[i].mixer.kernel[...], np.float32) for i in lkca_layers(model)}


def lkca_attention(model: models.ViT) -> dict[int, np.ndarray]:
  """Layer → the signed block-Toeplitz matrix A of every LKCA layer: (…, N, N)."""
  return {
    i: np.asarray(model.blocks[i].mixer.attention_matrix(), np.float32) for i in lkca_layers(model)
  }


# --- forward passes ------------------------------------------------------------
def run_blocks(model: models.ViT, images: jax.Array, *, attention: bool = False):
  """`ViT.__call__` up to the output of the last block.

  Returns (tokens (B, T, D), number of prefix tokens before the h·w patch
  tokens, {attention layer: its weights among the patch tokens (B, H, N, N)} if
  `attention` else {}).
  `model.classify` finishes the forward pass (tests check the two agree).
  """
  x, num_prefix = model.embed(images)
  weights = {}
  for i, block in enumerate(model.blocks):
    if attention and hasattr(block.mixer, "attention_weights"):
      weights[i] = block.attention_weights(block.norm1(x), num_prefix=num_prefix)
    x = block(x, num_prefix=num_prefix)
  return x, num_prefix, weights


def _batches(images, batch_size: int):
  images = np.asarray(images, np.float32)
  for start in range(0, images.shape[0], batch_size):
    yield images[start : start + batch_size]


def mean_attention_weights(
  model: models.ViT, images, *, batch_size: int = BATCH_SIZE
) -> dict[int, np.ndarray]:
  """Attention layer → its weights averaged over `images`, patch tokens only: (H, N, N).

  Rows are queries, columns keys, both row-major over the h×w grid. With a
  class token, its row and column are dropped and the rows are left as they
  are (they sum to 1 minus the weight on the class token).
  """
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def summed(state, batch):
    _, _, weights = run_blocks(nnx.merge(graphdef, state), batch, attention=True)
    return {i: w.sum(axis=0) for i, w in weights.items()}

  totals, count = None, 0
  for batch in _batches(images, batch_size):
    sums = summed(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    count += batch.shape[0]
  if totals is None:
    raise ValueError("mean_attention_weights needs at least one image")
  return {i: np.asarray(total, np.float32) / count for i, total in totals.items()}


def centre_token(grid) -> tuple[int, int]:
  """(row, column) of the centre patch: (h // 2, w // 2), the lower-right one of an even grid."""
  return grid[0] // 2, grid[1] // 2


def effective_receptive_field(
  model: models.ViT, images, *, batch_size: int = BATCH_SIZE
) -> np.ndarray:
  """Mean over `images` (B, H, W, C) of |∂ Σ_c relu(y_c) / ∂ image| summed over C: (H, W).

  y is the centre patch token's output of the last block (residual stream,
  before the final LayerNorm). Images do not interact in eval mode, so the
  gradient of the sum over a batch is each image's own gradient.
  """
  model.eval()
  graphdef, state = nnx.split(model)
  row, col = centre_token(model.grid)

  def objective(batch, state):
    tokens, num_prefix, _ = run_blocks(nnx.merge(graphdef, state), batch)
    centre = tokens[:, num_prefix + row * model.grid[1] + col]
    return jax.nn.relu(centre.astype(jnp.float32)).sum()

  @jax.jit
  def summed(state, batch):
    grad = jax.grad(objective)(batch, state)
    return jnp.abs(grad.astype(jnp.float32)).sum(axis=(0, 3))

  total, count = None, 0
  for batch in _batches(images, batch_size):
    sums = summed(state, batch)
    total = sums if total is None else total + sums
    count += batch.shape[0]
  if total is None:
    raise ValueError("effective_receptive_field needs at least one image")
  return np.asarray(total, np.float64) / count


# --- distances ---------------------------------------------------------------
@functools.cache
def token_distances(grid) -> np.ndarray:
  """(N, N) Euclidean distances in patches between row-major grid tokens."""
  h, w = grid
  rows, cols = np.divmod(np.arange(h * w), w)
  return np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])


def attention_distance_per_query(weights, grid) -> np.ndarray:
  """(…, N) mean distance of each query to the keys, weighted by its row of |weights|.

  Rows are normalised to sum 1 first; a row without weight (a query whose
  kernel taps all fall outside the grid) is NaN.
  """
  weights = np.abs(np.asarray(weights, np.float64))
  grid = tuple(int(g) for g in grid)
  totals = weights.sum(axis=-1)
  weighted = (weights * token_distances(grid)).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, weighted / np.where(totals > 0, totals, 1.0), np.nan)


def mean_attention_distance(weights, grid) -> float:
  """Mean of `attention_distance_per_query` over queries (and leading axes); NaN if all empty."""
  per_query = attention_distance_per_query(weights, grid)
  return float(np.nanmean(per_query)) if np.isfinite(per_query).any() else float("nan")


def uniform_attention_distance(grid) -> float:
  """The mean distance under uniform attention: the grid's mean pairwise token distance."""
  return float(token_distances(tuple(int(g) for g in grid)).mean())


def attention_distances(
  model: models.ViT, images=None, *, attention: dict[int, np.ndarray] | None = None
) -> dict[int, dict]:
  """Layer → {"mixer", "mean", "per_unit"} for every LKCA and attention layer.

  `per_unit` holds the mean distance of each head (attention layers, per-head
  LKCA kernels), channel (per-channel kernels) or the one layer kernel; `mean`
  is their mean. Attention layers need `images` or a precomputed `attention`
  (from `mean_attention_weights`); without either they are left out.
  """
  grid = model.grid
  weights = {i: a.reshape(-1, *a.shape[-2:]) for i, a in lkca_attention(model).items()}
  if attention is None and images is not None and attention_layers(model):
    attention = mean_attention_weights(model, images)
  weights.update(attention or {})
  out = {}
  for i in sorted(weights):
    per_unit = np.asarray([mean_attention_distance(unit, grid) for unit in weights[i]])
    mean = float(np.nanmean(per_unit)) if np.isfinite(per_unit).any() else float("nan")
    out[i] = {"mixer": model.mixers[i], "mean": mean, "per_unit": per_unit}
  return out


# --- ERF squares ---------------------------------------------------------------
def erf_squares(erf, patch_size: int, thresholds=ERF_THRESHOLDS) -> dict[float, dict]:
  """t → the smallest square around the centre token's patch holding a fraction ≥ t of `erf`.

  Squares grow one pixel a side from the centre patch (side p, p + 2, …) and
  count only the pixels inside the image; `side` is in pixels (it may pass
  the image border on the far side of an off-centre patch), `area_fraction`
  is the share of the image inside it. Every t maps to None for an all-zero map.
  """
  erf = np.asarray(erf, np.float64)
  height, width = erf.shape
  p = int(patch_size)
  row, col = centre_token((height // p, width // p))
  top, left = row * p, col * p
  total = erf.sum()
  found = {float(t): None for t in thresholds}
  if not total > 0:
    return found
  k = 0
  while any(v is None for v in found.values()):
    y0, y1 = max(top - k, 0), min(top + p + k, height)
    x0, x1 = max(left - k, 0), min(left + p + k, width)
    fraction = erf[y0:y1, x0:x1].sum() / total
    whole = y0 == 0 and x0 == 0 and y1 == height and x1 == width
    for t, v in found.items():
      if v is None and (fraction >= t or whole):
        found[t] = {
          "side": p + 2 * k,
          "fraction": float(fraction),
          "area_fraction": (y1 - y0) * (x1 - x0) / (height * width),
        }
    k += 1
  return found
