"""Pictures of what a trained model learned: LKCA kernels, attention views, ERFs, distances.

    python -m lkca_jax.tools.analyze --config configs/digits.py [--workdir DIR] \\
        [--checkpoint DIR/checkpoints/STEP] [--images 50] [--layers 1,5,9] \\
        [--compare OTHER_WORKDIR] [--run K] [--average] [--config.KEY=VALUE ...]
    python -m lkca_jax.tools.analyze --config configs/workdir.py:DIR   # DIR's run, as trained

The model is the one `main.py` trains for the config (`train.Run.prepare`),
with the parameters of the workdir's latest checkpoint (or of --checkpoint);
the same model before restoring is the one training started from, its
"initialisation". Of a workdir that trained several runs (num_runs, sweep),
run --run's (default 0). Test images are the first --images of the test split,
normalised as for evaluation. --average draws the moving average of the
parameters instead, which a run with ema_decay > 0 kept. Written to
<workdir>/analysis/ (analysis/run<K>/ for a run of several; average/ below that
for the average), a PNG (150 dpi) and a JSON each:

- kernels: every LKCA layer's (2h−1)×(2w−1) kernel, indexed by the key's
  offset from the query in patches (zero offset boxed), on a diverging scale
  centred on 0; per-head kernels one panel per head, per-channel kernels the
  first 16 channels and the mean |K| over all of them. The JSON holds the raw
  kernels. Left out for a model without LKCA layers.
- attention: the N×N attention view of the --layers (default: the first,
  middle and last layer with one): LKCA's signed block-Toeplitz matrix A
  (the mean over heads / channels for per-head / per-channel kernels); for
  MHSA its softmax, for ACmix its attention branch's softmax (the convolution
  branch aside), for FLatten its linear attention's weights on v (the depthwise
  convolution aside), each averaged over the test images and heads, patch
  tokens only. Tokens are numbered row-major over the h×w grid.
- erf: the effective receptive field of the centre token (see
  `lkca_jax.analysis`) after training and at initialisation, log-scaled,
  with the sides of the smallest centred squares holding 20/30/50/99% of it.
- distance: the mean attention distance of every layer with an attention
  view, in patches, over depth, with the value of uniform attention for
  reference.

--compare OTHER_WORKDIR adds a second trained model to the attention, erf and
distance figures, e.g. vit_1m next to lkca_t: the config its run saved there
(config.json, laid over --config for keys it lacks) and its latest checkpoint (its
run 0 if it trained several).

Bad input (no checkpoint, a checkpoint of another model, a --compare directory
that is no training workdir, --images < 1, a --layers entry out of range, a --run
the workdir did not train, --average for a run that kept no average, a --workdir
that cannot be written) is one line on stderr
and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
DPI = 150
MAX_CHANNELS_SHOWN = 16
ERF_DECADES = 4  # the log colour scale spans max / 10^4 .. max
ERF_SQUARE_SHOWN = 0.5  # the threshold whose square is drawn on the ERF maps


# --- the models ----------------------------------------------------------------
@dataclasses.dataclass
class Subject:
  """One trained model, its initialisation and the test images it is probed with."""

  label: str
  config: object
  workdir: str
  checkpoint: str
  step: int
  trained: object  # models.ViT with the checkpoint's parameters
  init: object  # the same model as training started
  images: np.ndarray  # normalised test images (B, H, W, C)
  run: int | None = None  # which run, of a workdir that trained several
  average: bool = False  # the parameters' moving average (ema_decay), not the parameters

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.trained.grid)

  @property
  def patch_size(self) -> int:
    return int(self.trained.patch_size)

  def layer_count(self) -> int:
    return len(self.trained.blocks)


def restore_params(
  config, model, workdir: str, checkpoint: str | None, run: int = 0, average: bool = False
) -> tuple[object, int]:
  """Loads into `model` the parameters of `checkpoint`, else of the newest good one in workdir.

  Reads the parameters only (the optimizer state only for their moving average, with
  `average`), read-only: nothing in the workdir is moved or cleaned up, so a run may be
  training there. Damaged checkpoints are skipped with a warning, as `main.py --mode eval`
  does. Of a workdir that trained several runs, run `run`'s. Returns (checkpoints
  directory, step).
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  source = checkpoint or epath.Path(workdir) / "checkpoints"
  params, restored = train.read_run_params(config, model, source, run, average=average)
  nnx.update(model, params)
  return restored.path.parent, restored.step


def load_test_images(run, config, count: int) -> np.ndarray:
  """The first `count` images of the test split (classes the run keeps), normalised."""
  from lkca_jax import augment as augment_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel

  spec = run.spec
  images, labels = data_lib.load_split(
    spec.name,
    spec.eval_split,
    data_dir=config.dataset.data_dir,
    manual_dir=config.dataset.manual_dir,
    download=config.dataset.download,
    image_size=spec.image_size[0],  # varying sizes: centre-cropped to the run's
  )
  images = np.asarray(images)[np.asarray(labels) < spec.num_classes][:count]
  images = pipeline_lib.resize_images(images, spec.image_size)  # a fixed size: to the run's
  return np.asarray(augment_lib.normalize(images, config.dataset.mean, config.dataset.std))


def load_subject(
  config,
  workdir: str,
  checkpoint: str | None,
  images: int,
  run_index: int = 0,
  average: bool = False,
) -> Subject:
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lkca_jax import runs, train  # pylint: disable=import-outside-toplevel

  run = train.Run.prepare(config, checkpoints=checkpoint or os.path.join(workdir, "checkpoints"))
  init = nnx.clone(run.model)
  directory, step = restore_params(config, run.model, workdir, checkpoint, run_index, average)
  several = len(runs.run_specs(config)) > 1
  label = f"{config.model} run {run_index}" if several else config.model
  return Subject(
    label=f"{label} (moving average)" if average else label,
    run=run_index if several else None,
    average=average,
    config=config,
    workdir=str(workdir),
    checkpoint=f"{directory}/{step}",
    step=step,
    trained=run.model,
    init=init,
    images=load_test_images(run, config, images),
  )


def workdir_config(workdir: str, base):
  """The config a training run saved in `workdir` (config.json), laid over `base`."""
  from lkca_jax import run_files  # pylint: disable=import-outside-toplevel
  from lkca_jax.config_checks import ConfigError  # pylint: disable=import-outside-toplevel

  try:
    return run_files.saved_config(workdir, base)
  except ConfigError as e:
    raise ValueError(f"--compare {e}") from None


# --- what to show ----------------------------------------------------------------
def viewable_layers(model) -> list[int]:
  from lkca_jax import analysis  # pylint: disable=import-outside-toplevel

  return sorted(analysis.lkca_layers(model) + analysis.attention_layers(model))


def choose_layers(model, requested: list[int] | None) -> list[int]:
  """0-based layers for the attention figure: `requested` (1-based) or first, middle, last."""
  viewable = viewable_layers(model)
  if requested is None:
    if not viewable:
      return []
    picks = [viewable[0], viewable[len(viewable) // 2], viewable[-1]]
    return sorted(set(picks))
  chosen = []
  for layer in requested:
    if not 1 <= layer <= len(model.blocks):
      raise ValueError(
        f"--layers {layer} is out of range: the model has layers 1..{len(model.blocks)}"
      )
    if layer - 1 not in viewable:
      raise ValueError(
        f"--layers {layer} is a {model.mixers[layer - 1]} layer, which has no "
        "attention view (LKCA, MHSA, ACmix and FLatten layers have)"
      )
    chosen.append(layer - 1)
  return sorted(set(chosen))


def parse_layers(text: str | None) -> list[int] | None:
  if not text:
    return None
  try:
    return [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(
      f"--layers must be comma-separated layer numbers, e.g. 1,5,9; got {text!r}"
    ) from None


@dataclasses.dataclass
class Results:
  """Every number the figures show, for one subject."""

  kernels: dict  # layer → kernel
  sharing: dict  # layer → kernel_sharing
  views: dict  # layer → (N, N) matrix shown
  view_kinds: dict  # layer → description
  distances: dict  # layer → analysis.attention_distances entry
  erf: dict  # "trained" / "init" → (H, W)
  squares: dict  # "trained" / "init" → analysis.erf_squares


def analyse(subject: Subject, layers: list[int]) -> Results:
  from lkca_jax import analysis  # pylint: disable=import-outside-toplevel

  model = subject.trained
  kernels = analysis.lkca_kernels(model)
  sharing = {i: model.blocks[i].mixer.kernel_sharing for i in kernels}
  attention = {}  # attention layer → mean weights over the test images (H, N, N)
  if analysis.attention_layers(model):
    attention = analysis.mean_attention_weights(model, subject.images)
  toeplitz = analysis.lkca_attention(model)
  views, kinds = {}, {}
  for i in layers:
    if i in toeplitz:
      a = toeplitz[i]
      views[i] = a if a.ndim == 2 else a.mean(axis=0)
      kinds[i] = "LKCA A" if a.ndim == 2 else f"LKCA A, mean of {a.shape[0]} {sharing[i]} kernels"
    else:
      views[i] = attention[i].mean(axis=0)
      kind = model.blocks[i].mixer.attention_kind
      kinds[i] = f"{kind}, mean of {attention[i].shape[0]} heads"
  distances = analysis.attention_distances(model, attention=attention)
  erf = {
    "trained": analysis.effective_receptive_field(model, subject.images),
    "init": analysis.effective_receptive_field(subject.init, subject.images),
  }
  squares = {key: analysis.erf_squares(value, subject.patch_size) for key, value in erf.items()}
  return Results(kernels, sharing, views, kinds, distances, erf, squares)


# --- figures -----------------------------------------------------------------------
def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  plt.rcParams.update(
    {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 10}
  )
  return plt


def _symmetric_limit(values) -> float:
  limit = float(np.max(np.abs(values))) if np.size(values) else 0.0
  return limit if limit > 0 else 1.0  # an all-zero kernel still gets a readable scale


def _kernel_panel(ax, kernel, grid, limit, cmap="RdBu_r"):
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  h, w = grid
  extent = (-(w - 1) - 0.5, (w - 1) + 0.5, (h - 1) + 0.5, -(h - 1) - 0.5)
  vmin = -limit if cmap == "RdBu_r" else 0.0
  image = ax.imshow(
    kernel, cmap=cmap, vmin=vmin, vmax=limit, extent=extent, interpolation="nearest"
  )
  ax.add_patch(Rectangle((-0.5, -0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
  ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
  ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
  return image


def kernel_mosaic(stack: np.ndarray) -> tuple[np.ndarray, int]:
  """(n, a, b) kernels as one image of ⌈√n⌉ columns, tiles one NaN pixel apart; and the columns."""
  n, a, b = stack.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  mosaic = np.full((rows * (a + 1) - 1, cols * (b + 1) - 1), np.nan)
  for k, kernel in enumerate(stack):
    r, c = divmod(k, cols)
    mosaic[r * (a + 1) : r * (a + 1) + a, c * (b + 1) : c * (b + 1) + b] = kernel
  return mosaic, cols


KERNEL_AXES = ("Δ column (patches)", "Δ row (patches)")


def plot_kernels(subject: Subject, results: Results, path) -> None:
  save_figure(kernels_figure(subject, results), path)


def kernels_figure(subject: Subject, results: Results):
  """Per layer: its kernel (layer sharing), a row of heads, or 16 channels and mean |K|."""
  plt = _pyplot()
  layers = sorted(results.kernels)
  sharing = results.sharing[layers[0]]  # one option for every LKCA layer of a model
  draw = {"layer": _layer_kernels, "head": _head_kernels}.get(sharing, _channel_kernels)
  fig = draw(plt, [(i, results.kernels[i]) for i in layers], subject.grid)
  fig.suptitle(
    f"{subject.label}: LKCA kernels at step {subject.step}, indexed by the key's "
    "offset from the query (box: zero offset)"
  )
  return fig


def _layer_kernels(plt, kernels, grid):
  """One panel per layer, each with its own colour scale."""
  cols = math.ceil(math.sqrt(len(kernels)))
  rows = math.ceil(len(kernels) / cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False, layout="constrained"
  )
  for ax in axes.flat[len(kernels) :]:
    ax.axis("off")
  for ax, (i, kernel) in zip(axes.flat, kernels, strict=False):  # spare panels are off
    image = _kernel_panel(ax, kernel, grid, _symmetric_limit(kernel))
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(f"layer {i + 1}")
    ax.set_xlabel(KERNEL_AXES[0])
    ax.set_ylabel(KERNEL_AXES[1])
  return fig


def _head_kernels(plt, kernels, grid):
  """A row of heads per layer, one colour scale per layer."""
  heads = kernels[0][1].shape[0]
  fig, axes = plt.subplots(
    len(kernels),
    heads,
    figsize=(1.5 * heads + 1.0, 1.45 * len(kernels)),
    squeeze=False,
    layout="constrained",
  )
  for row, (i, stack) in enumerate(kernels):
    limit = _symmetric_limit(stack)
    for col, kernel in enumerate(stack):
      ax = axes[row, col]
      image = _kernel_panel(ax, kernel, grid, limit)
      ax.set_title(f"layer {i + 1}, head {col + 1}", fontsize=6)
      ax.tick_params(labelsize=5)
      if col == 0:
        ax.set_ylabel(KERNEL_AXES[1], fontsize=6)
      if row == len(kernels) - 1:
        ax.set_xlabel(KERNEL_AXES[0], fontsize=6)
    fig.colorbar(image, ax=list(axes[row]), shrink=0.9, pad=0.01)
  return fig


def _channel_kernels(plt, kernels, grid):
  """Per layer: a mosaic of the first channels' kernels, and the mean |K| of all of them."""
  per_row = min(3, len(kernels))
  rows = math.ceil(len(kernels) / per_row)
  fig, axes = plt.subplots(
    rows,
    2 * per_row,
    figsize=(5.4 * per_row, 2.7 * rows),
    squeeze=False,
    layout="constrained",
    gridspec_kw={"width_ratios": [1.6, 1] * per_row},
  )
  for ax in axes.flat[2 * len(kernels) :]:
    ax.axis("off")
  for k, (i, stack) in enumerate(kernels):
    mosaic_ax, mean_ax = (
      axes[k // per_row, 2 * (k % per_row)],
      axes[k // per_row, 2 * (k % per_row) + 1],
    )
    _channel_mosaic_panel(plt, fig, mosaic_ax, i, stack, grid)
    mean_abs = np.abs(stack).mean(axis=0)
    image = _kernel_panel(mean_ax, mean_abs, grid, _symmetric_limit(mean_abs), cmap="magma")
    mean_ax.set_title(f"layer {i + 1}: mean |K|, all {stack.shape[0]}", fontsize=7)
    mean_ax.set_xlabel(KERNEL_AXES[0], fontsize=6)
    mean_ax.set_ylabel(KERNEL_AXES[1], fontsize=6)
    mean_ax.tick_params(labelsize=5)
    fig.colorbar(image, ax=mean_ax, shrink=0.85)
  return fig


def _channel_mosaic_panel(plt, fig, ax, layer, stack, grid) -> None:
  """The first MAX_CHANNELS_SHOWN channels' kernels as row-major tiles, zero offsets boxed."""
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel

  a, b = 2 * grid[0] - 1, 2 * grid[1] - 1
  shown = stack[:MAX_CHANNELS_SHOWN]
  mosaic, cols = kernel_mosaic(shown)
  limit = _symmetric_limit(shown)
  cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")  # the gaps between tiles
  image = ax.imshow(mosaic, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
  for t in range(shown.shape[0]):
    r, c = divmod(t, cols)
    ax.add_patch(
      Rectangle(
        (c * (b + 1) + grid[1] - 1.5, r * (a + 1) + grid[0] - 1.5),
        1,
        1,
        fill=False,
        edgecolor="black",
        linewidth=0.5,
      )
    )
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(
    f"layer {layer + 1}: channels 1–{shown.shape[0]} of {stack.shape[0]} (row-major tiles)",
    fontsize=7,
  )
  fig.colorbar(image, ax=ax, shrink=0.85)


def plot_attention(subjects, results, layers, path) -> None:
  save_figure(attention_figure(subjects, results, layers), path)


def attention_figure(subjects, results, layers):
  """A row per model: the N×N attention view of each chosen layer."""
  from matplotlib.ticker import MultipleLocator  # pylint: disable=import-outside-toplevel

  plt = _pyplot()
  cols = max(max(len(chosen), 1) for chosen in layers)
  fig, axes = plt.subplots(
    len(subjects),
    cols,
    figsize=(3.1 * cols, 2.9 * len(subjects)),
    squeeze=False,
    layout="constrained",
  )
  for row, (subject, result, chosen) in enumerate(zip(subjects, results, layers, strict=True)):
    for ax in axes[row, len(chosen) :]:
      ax.axis("off")
    if not chosen:
      axes[row, 0].text(
        0.5,
        0.5,
        f"{subject.label}: no layer with an attention view",
        ha="center",
        va="center",
        transform=axes[row, 0].transAxes,
      )
    for ax, i in zip(axes[row], chosen, strict=False):
      matrix = result.views[i]
      if result.view_kinds[i].startswith("LKCA"):
        limit = _symmetric_limit(matrix)
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
      else:
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, interpolation="nearest")
      fig.colorbar(image, ax=ax, shrink=0.85)
      w = subject.grid[1]
      ax.xaxis.set_major_locator(MultipleLocator(w))  # one tick per grid row of tokens
      ax.yaxis.set_major_locator(MultipleLocator(w))
      ax.tick_params(labelsize=6)
      ax.set_title(f"{subject.label}, layer {i + 1}\n{result.view_kinds[i]}")
      ax.set_xlabel("key token (row-major)")
      ax.set_ylabel("query token (row-major)")
  class_token = any(s.trained.pool == "cls" for s in subjects)
  fig.suptitle(
    f"Attention views on the {subjects[0].grid[0]}×{subjects[0].grid[1]} patch grid "
    f"(attention weights averaged over {len(subjects[0].images)} test images"
    + (", class token dropped)" if class_token else ")")
  )
  return fig


def plot_erf(subjects, results, path) -> None:
  save_figure(erf_figure(subjects, results), path)


def erf_figure(subjects, results):
  """Trained and initial ERF of each model, side by side, on a log colour scale."""
  from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel

  plt = _pyplot()
  panels = [
    (s, r, key) for s, r in zip(subjects, results, strict=True) for key in ("trained", "init")
  ]
  fig, axes = plt.subplots(
    1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False, layout="constrained"
  )
  floor = plt.get_cmap("magma")(0.0)
  # Exact zeros (no path to the pixel) and values under the scale show as the floor colour.
  cmap = plt.get_cmap("magma").with_extremes(bad=floor, under=floor)
  for ax, (subject, result, key) in zip(axes[0], panels, strict=True):
    erf = result.erf[key]
    peak = erf.max()
    scaled = erf / peak if peak > 0 else erf
    image = ax.imshow(
      np.ma.masked_less_equal(scaled, 0),
      cmap=cmap,
      interpolation="nearest",
      norm=LogNorm(vmin=10.0**-ERF_DECADES, vmax=1.0),
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="ERF / max (log scale)")
    p = subject.patch_size
    row, col = (subject.grid[0] // 2) * p, (subject.grid[1] // 2) * p
    ax.add_patch(
      Rectangle((col - 0.5, row - 0.5), p, p, fill=False, edgecolor="cyan", linewidth=1.0)
    )
    squares = result.squares[key]
    shown = squares.get(ERF_SQUARE_SHOWN)
    if shown:
      k = (shown["side"] - p) // 2
      ax.add_patch(
        Rectangle(
          (col - k - 0.5, row - k - 0.5),
          shown["side"],
          shown["side"],
          fill=False,
          edgecolor="white",
          linestyle="--",
          linewidth=0.9,
        )
      )
    sides = "/".join("–" if v is None else str(v["side"]) for v in squares.values())
    when = f"trained, step {subject.step}" if key == "trained" else "at initialisation"
    ax.set_title(
      f"{subject.label}, {when}\nt = {'/'.join(f'{t:g}' for t in squares)}: {sides} px", loc="left"
    )
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
  fig.suptitle(
    f"Effective receptive field of the centre token (cyan), mean over "
    f"{len(subjects[0].images)} test images\nt: sides of the smallest centred "
    f"squares holding a fraction t of it (dashed: t = {ERF_SQUARE_SHOWN:g})"
  )
  return fig


def plot_distances(subjects, results, path) -> None:
  """Mean attention distance over depth, with per-head / per-channel values as dots."""
  from lkca_jax import analysis  # pylint: disable=import-outside-toplevel

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.0, 3.4), layout="constrained")
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  grids = sorted({s.grid for s in subjects})
  for subject, result, colour in zip(subjects, results, colours[: len(subjects)], strict=True):
    layers = sorted(result.distances)
    means = [result.distances[i]["mean"] for i in layers]
    kinds = sorted({result.distances[i]["mixer"] for i in layers})
    ax.plot(
      [i + 1 for i in layers],
      means,
      marker="o",
      color=colour,
      label=f"{subject.label} ({', '.join(kinds)})",
    )
    for i in layers:
      units = result.distances[i]["per_unit"]
      if units.size > 1:
        ax.scatter(np.full(units.size, i + 1), units, s=6, color=colour, alpha=0.3, linewidths=0)
  for grid, style in zip(grids, ("--", ":"), strict=False):  # at most two grids
    ax.axhline(
      analysis.uniform_attention_distance(grid),
      color="grey",
      linestyle=style,
      linewidth=1,
      label=f"uniform attention, {grid[0]}×{grid[1]} grid",
    )
  depth = max(s.layer_count() for s in subjects)
  ax.set_xticks(range(1, depth + 1))
  ax.set_xlim(0.5, depth + 0.5)
  top = max(
    [analysis.uniform_attention_distance(g) for g in grids]
    + [
      float(np.nanmax(r.distances[i]["per_unit"]))
      for r in results
      for i in r.distances
      if np.isfinite(r.distances[i]["per_unit"]).any()
    ]
  )
  ax.set_ylim(0, 1.12 * top)
  ax.set_xlabel("layer")
  ax.set_ylabel("mean attention distance (patches)")
  ax.set_title("Mean attention distance (dots: heads / channels)")
  ax.legend(fontsize=7)
  save_figure(fig, path)


# --- files ---------------------------------------------------------------------------
def save_figure(fig, path) -> None:
  """Writes `fig` as a PNG, then closes it: pyplot keeps every open figure."""
  cli.save_figure(fig, path, dpi=DPI)
  _pyplot().close(fig)


def jsonable(value):
  """Numpy arrays and scalars as lists and numbers; NaN as null."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def save_json(path, value) -> None:
  cli.write_atomic(path, json.dumps(jsonable(value), indent=1) + "\n")


def describe(subject: Subject) -> dict:
  return {
    "label": subject.label,
    "model": subject.config.model,
    "dataset": subject.config.dataset.name,
    "workdir": subject.workdir,
    "checkpoint": subject.checkpoint,
    "step": subject.step,
    "grid": list(subject.grid),
    "patch_size": subject.patch_size,
    "mixers": list(subject.trained.mixers),
  }


def kernels_json(subject: Subject, result: Results) -> dict:
  layers = []
  for i in sorted(result.kernels):
    kernel = result.kernels[i]
    h, w = subject.grid
    layers.append(
      {
        "layer": i + 1,
        "kernel_sharing": result.sharing[i],
        "shape": list(kernel.shape),
        "zero_offset_tap": kernel[..., h - 1, w - 1],
        "abs_sum": np.abs(kernel).sum(axis=(-2, -1)),
        "kernel": kernel,
      }
    )
  return {
    **describe(subject),
    "layers_numbered_from": 1,
    "kernel_index": "K[..., h-1+drow, w-1+dcol]: the weight of the key (drow, dcol) "
    "patches from the query",
    "layers": layers,
  }


def attention_json(subjects, results, layers) -> dict:
  models = []
  for subject, result, chosen in zip(subjects, results, layers, strict=True):
    models.append(
      {
        **describe(subject),
        "images": len(subject.images),
        "layers": [
          {
            "layer": i + 1,
            "mixer": subject.trained.mixers[i],
            "shows": result.view_kinds[i],
            "matrix": result.views[i],
          }
          for i in chosen
        ],
      }
    )
  return {
    "layers_numbered_from": 1,
    "matrix": "rows: query tokens, columns: key tokens, row-major over the patch grid; "
    "attention weights (MHSA, ACmix, FLatten): their mean over images and heads, a class "
    "token's row and column dropped",
    "models": models,
  }


def erf_json(subjects, results) -> dict:
  from lkca_jax import analysis  # pylint: disable=import-outside-toplevel

  models = []
  for subject, result in zip(subjects, results, strict=True):
    entry = {
      **describe(subject),
      "images": len(subject.images),
      "centre_token": list(analysis.centre_token(subject.grid)),
    }
    for key in ("trained", "init"):
      squares = result.squares[key]
      entry[key] = {
        "square_sides": {t: (v or {}).get("side") for t, v in squares.items()},
        "squares": squares,
        "map": result.erf[key],
      }
    models.append(entry)
  return {
    "thresholds": list(analysis.ERF_THRESHOLDS),
    "definition": "mean over images of |d sum_c relu(y_c) / d image| summed over colour "
    "channels, y the centre token's output of the last block; squares "
    "grow around the centre token's patch, sides in pixels",
    "models": models,
  }


def distance_json(subjects, results) -> dict:
  from lkca_jax import analysis  # pylint: disable=import-outside-toplevel

  models = []
  for subject, result in zip(subjects, results, strict=True):
    models.append(
      {
        **describe(subject),
        "images": len(subject.images),
        "uniform_attention": analysis.uniform_attention_distance(subject.grid),
        "layers": [{"layer": i + 1, **result.distances[i]} for i in sorted(result.distances)],
      }
    )
  return {
    "layers_numbered_from": 1,
    "unit": "patches",
    "per_unit": "one value per head (MHSA, ACmix, FLatten, per-head LKCA), channel "
    "(per-channel LKCA) or the layer's one kernel",
    "models": models,
  }


def write_analysis(subjects, out_dir, layers: list[int] | None) -> list[str]:
  """Computes and writes everything; returns the files written."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  chosen = [choose_layers(s.trained, layers) for s in subjects]
  results = [analyse(s, c) for s, c in zip(subjects, chosen, strict=True)]
  written = []
  main, main_result = subjects[0], results[0]
  if main_result.kernels:
    plot_kernels(main, main_result, out / "kernels.png")
    save_json(out / "kernels.json", kernels_json(main, main_result))
    written += ["kernels.png", "kernels.json"]
  plot_attention(subjects, results, chosen, out / "attention.png")
  save_json(out / "attention.json", attention_json(subjects, results, chosen))
  plot_erf(subjects, results, out / "erf.png")
  save_json(out / "erf.json", erf_json(subjects, results))
  plot_distances(subjects, results, out / "distance.png")
  save_json(out / "distance.json", distance_json(subjects, results))
  written += [
    "attention.png",
    "attention.json",
    "erf.png",
    "erf.json",
    "distance.png",
    "distance.json",
  ]
  for subject, result in zip(subjects, results, strict=True):
    summary = ", ".join(
      f"{i + 1}: {result.distances[i]['mean']:.2f}" for i in sorted(result.distances)
    )
    sides = result.squares["trained"]
    print(
      f"{subject.label} ({subject.checkpoint}): mean attention distance by layer "
      f"[{summary}] patches; ERF squares "
      + ", ".join(f"{t:g}: {'-' if v is None else v['side']} px" for t, v in sides.items())
    )
  return [str(out / name) for name in written]


# --- command line ----------------------------------------------------------------------
def define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
  )
  cli.define_output_dir(
    "workdir",
    None,
    "The training workdir (default: workdirs/<config name>, or DIR for "
    "configs/workdir.py:DIR); "
    "the figures go to <workdir>/analysis/.",
  )
  flags.DEFINE_string(
    "checkpoint",
    None,
    "A checkpoint step directory (default: the latest in <workdir>/checkpoints).",
  )
  flags.DEFINE_bool(
    "average",
    False,
    "Draw the moving average of the parameters that a run with ema_decay > 0 kept, into "
    "<workdir>/analysis/average/.",
  )
  flags.DEFINE_integer("images", 50, "Test images for the ERF and the attention weights.")
  flags.DEFINE_integer(
    "run", 0, "Of a workdir that trained several runs (num_runs, sweep): which (from 0)."
  )
  flags.DEFINE_string(
    "layers",
    None,
    "Comma-separated layers (from 1) for the attention figure (default: the first, middle "
    "and last layer with an attention view).",
  )
  flags.DEFINE_string(
    "compare",
    None,
    "Another training workdir whose latest checkpoint is "
    "drawn next to this one (its config.json is used).",
  )


def load_subjects(workdir: str, other, layers: list[int] | None) -> list[Subject]:
  """The model of `workdir` (and of --compare's config `other`), or one error line."""
  from absl import logging  # pylint: disable=import-outside-toplevel

  from lkca_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  logging.set_verbosity(logging.WARNING)  # orbax reports every restore at INFO
  try:
    subjects = [
      load_subject(FLAGS.config, workdir, FLAGS.checkpoint, FLAGS.images, FLAGS.run, FLAGS.average)
    ]
    if other is not None:
      subjects.append(load_subject(other, FLAGS.compare, None, FLAGS.images))
    for subject in subjects:
      choose_layers(subject.trained, layers)  # a bad --layers fails before any work
  except (
    train.ConfigError,
    checkpoint_lib.CheckpointError,
    data_lib.DatasetUnavailableError,
    FileNotFoundError,
    ValueError,
  ) as e:
    cli.fail(str(e))
  if len(subjects) == 2 and subjects[0].label == subjects[1].label:
    for subject in subjects:  # the same preset twice: tell them apart by workdir
      subject.label = f"{subject.label} ({os.path.basename(os.path.normpath(subject.workdir))})"
  for subject in subjects:
    if len(subject.images) < FLAGS.images:
      print(
        f"note: {subject.label}'s test split has only {len(subject.images)} images; "
        "using all of them"
      )
  return subjects


def analysis_dir(workdir: str, subject: Subject) -> str:
  """<workdir>/analysis, or <workdir>/analysis/run<k> for run k of several; in average/
  below that for the parameters' moving average."""
  run = [] if subject.run is None else [f"run{subject.run}"]
  return os.path.join(workdir, "analysis", *run, *(["average"] if subject.average else []))


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  if FLAGS.images < 1:
    cli.fail(f"--images must be at least 1, got {FLAGS.images}")
  workdir = FLAGS.workdir or cli.default_workdir()
  try:
    layers = parse_layers(FLAGS.layers)
    other = workdir_config(FLAGS.compare, FLAGS.config) if FLAGS.compare else None
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  # The workdir itself, not its analysis/: a checkpoint found missing below leaves nothing.
  cli.output_dir(workdir, "--workdir")
  subjects = load_subjects(workdir, other, layers)
  try:
    written = write_analysis(subjects, analysis_dir(workdir, subjects[0]), layers)
  except OSError as e:
    cli.fail(f"could not write the analysis: {e.strerror or e}")
  print("wrote " + ", ".join(written))


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
