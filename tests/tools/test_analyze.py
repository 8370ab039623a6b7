"""The analyze command in real subprocesses, on two tiny digits models trained by main.py.

Numbers are checked against what is known without the command: the kernels
in the checkpoint (read back with orbax), the block-Toeplitz index formula,
softmax rows, the grid's mean pairwise distance, and a zero-kernel LKCA at
init (an ERF of the centre pixel alone, patch 1).
"""

import itertools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from matplotlib import image as mpimg

from lkca_jax import analysis, models
from lkca_jax.layers import MIXERS
from lkca_jax.tools import analyze
from tests.helpers import built_once

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
  "--config.num_train_steps=10",
  "--config.model_overrides.dim=32",
  "--config.model_overrides.num_heads=2",
  "--config.num_devices=1",
  "--config.batch_size=32",
  "--config.eval_every_steps=10",
]
# It keeps a moving average of its parameters too (the same training; --average draws it).
LKCA = [
  "--config",
  "configs/digits.py",
  "--config.model_overrides.depth=2",
  "--config.ema_decay=0.5",
  *TINY,
]
VIT = [
  "--config",
  "configs/digits.py",
  "--config.model=vit_1m",
  "--config.model_overrides.depth=3",
  *TINY,
]
IMAGES = 20
OUTPUTS = ["kernels", "attention", "erf", "distance"]


def start(args, **kwargs):
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """{"lkca": workdir, "vit": workdir}: depth-2 lkca_t and depth-3 vit_1m, 10 steps each."""
  return built_once(tmp_path_factory, "analyze_trained", train_both)


def train_both(tmp):
  workdirs = {"lkca": tmp / "lkca", "vit": tmp / "vit"}
  procs = [
    start(["main.py", *flags, f"--workdir={workdirs[name]}"])
    for name, flags in (("lkca", LKCA), ("vit", VIT))
  ]
  for proc in procs:
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
  return workdirs


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, trained):
  """The command on the LKCA workdir with the ViT one to compare: (stdout, {name: JSON})."""
  return built_once(tmp_path_factory, "analyze_analysed", lambda _: analyse(trained))


def analyse(trained):
  code, out, err = finish(
    start(
      [
        "-m",
        "lkca_jax.tools.analyze",
        *LKCA,
        f"--workdir={trained['lkca']}",
        f"--compare={trained['vit']}",
        f"--images={IMAGES}",
      ]
    )
  )
  assert code == 0, err[-3000:]
  directory = trained["lkca"] / "analysis"
  return out, {name: json.loads((directory / f"{name}.json").read_text()) for name in OUTPUTS}


def checkpoint_kernels(workdir, average: bool = False):
  """Each LKCA layer's kernel as stored in the latest checkpoint, read without the command:
  of the parameters, or of their moving average (the optimizer state's second part)."""
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  params = state["opt_state"][1]["average"] if average else state["params"]
  kernels = []
  for index in range(2):
    leaf = params["blocks"][str(index)]["mixer"]["kernel"]
    kernels.append(np.asarray(leaf["value"] if isinstance(leaf, dict) else leaf))
  return step, kernels


def read_png(path):
  pixels = mpimg.imread(path)
  assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
  assert pixels[..., :3].var() > 1e-3  # not a blank canvas
  return pixels


def test_pictures_are_written_with_content(trained, analysed):
  out, _ = analysed
  directory = trained["lkca"] / "analysis"
  for name in OUTPUTS:
    assert f"{directory / name}.png" in out
    read_png(directory / f"{name}.png")


def test_kernels_are_the_checkpoints(trained, analysed):
  _, outputs = analysed
  result = outputs["kernels"]
  step, kernels = checkpoint_kernels(trained["lkca"])
  assert result["step"] == step and result["checkpoint"].endswith(f"checkpoints/{step}")
  assert [layer["layer"] for layer in result["layers"]] == [1, 2]
  for layer, kernel in zip(result["layers"], kernels, strict=True):
    assert layer["shape"] == [15, 15] and layer["kernel_sharing"] == "layer"
    np.testing.assert_allclose(layer["kernel"], kernel, rtol=1e-6)
    assert layer["zero_offset_tap"] == pytest.approx(float(kernel[7, 7]))
    assert np.abs(kernel).sum() > 0  # trained away from the zero init


def test_the_average_is_drawn_into_its_own_folder(trained, analysed):
  """--average draws the moving average that the run kept, not its parameters, into
  analysis/average/, beside the parameters' pictures."""
  code, out, err = finish(
    start(
      [
        "-m",
        "lkca_jax.tools.analyze",
        *LKCA,
        f"--workdir={trained['lkca']}",
        "--average",
        f"--images={IMAGES}",
      ]
    )
  )
  assert code == 0, err[-3000:]
  directory = trained["lkca"] / "analysis" / "average"
  assert f"{directory / 'kernels'}.png" in out
  layers = json.loads((directory / "kernels.json").read_text())["layers"]
  _, averaged = checkpoint_kernels(trained["lkca"], average=True)
  _, kernels = checkpoint_kernels(trained["lkca"])
  for layer, average, kernel in zip(layers, averaged, kernels, strict=True):
    np.testing.assert_allclose(layer["kernel"], average, rtol=1e-6)
    assert not np.allclose(average, kernel)
  assert (trained["lkca"] / "analysis" / "kernels.json").exists()  # the parameters' stay


def test_attention_views(trained, analysed):
  _, outputs = analysed
  lkca, vit = outputs["attention"]["models"]
  assert (lkca["model"], vit["model"]) == ("lkca_t", "vit_1m")
  assert [layer["layer"] for layer in lkca["layers"]] == [1, 2]
  assert [layer["layer"] for layer in vit["layers"]] == [1, 2, 3]  # first, middle, last
  _, kernels = checkpoint_kernels(trained["lkca"])
  for layer, kernel in zip(lkca["layers"], kernels, strict=True):
    matrix = np.asarray(layer["matrix"])
    assert matrix.shape == (64, 64)
    expected = [
      [kernel[7 + p - i, 7 + q - j] for p, q in itertools.product(range(8), repeat=2)]
      for i, j in itertools.product(range(8), repeat=2)
    ]  # A[(i,j),(p,q)]
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
  for layer in vit["layers"]:
    matrix = np.asarray(layer["matrix"])
    assert matrix.shape == (64, 64) and matrix.min() >= 0
    rows = matrix.sum(axis=1)  # the class token's share is dropped
    assert (rows <= 1 + 1e-5).all() and (rows > 0.5).all()
    assert vit["images"] == IMAGES


def test_erf(analysed):
  _, outputs = analysed
  result = outputs["erf"]
  assert result["thresholds"] == list(analysis.ERF_THRESHOLDS)
  lkca, vit = result["models"]
  for entry in (lkca, vit):
    assert entry["images"] == IMAGES and entry["centre_token"] == [4, 4]
    for key in ("trained", "init"):
      erf = np.asarray(entry[key]["map"])
      assert erf.shape == (8, 8) and erf.min() >= 0 and erf.max() > 0
      sides = [entry[key]["square_sides"][str(t)] for t in analysis.ERF_THRESHOLDS]
      assert sides == sorted(sides) and all(1 <= s <= 15 for s in sides)
      fractions = [entry[key]["squares"][str(t)]["fraction"] for t in analysis.ERF_THRESHOLDS]
      assert fractions == sorted(fractions)
      assert all(f >= t for f, t in zip(fractions, analysis.ERF_THRESHOLDS, strict=True))
  # LKCA kernels start at zero: at init the centre token sees its own pixel only.
  init = np.asarray(lkca["init"]["map"])
  assert init[4, 4] > 0 and np.count_nonzero(init) == 1
  assert all(side == 1 for side in lkca["init"]["square_sides"].values())
  # Trained, its kernels reach further; global attention reaches everywhere from the start.
  assert np.count_nonzero(np.asarray(lkca["trained"]["map"])) > 1
  assert np.asarray(vit["init"]["map"]).min() > 0


def test_attention_distances(analysed):
  _, outputs = analysed
  lkca, vit = outputs["distance"]["models"]
  cells = list(itertools.product(range(8), range(8)))
  uniform = np.mean([math.dist(a, b) for a, b in itertools.product(cells, cells)])
  assert lkca["uniform_attention"] == pytest.approx(uniform)
  assert [layer["layer"] for layer in lkca["layers"]] == [1, 2]
  assert [layer["layer"] for layer in vit["layers"]] == [1, 2, 3]
  for entry, units in ((lkca, 1), (vit, 2)):
    for layer in entry["layers"]:
      assert len(layer["per_unit"]) == units
      assert 0 < layer["mean"] < 7 * math.sqrt(2)
      assert layer["mean"] == pytest.approx(np.mean(layer["per_unit"]))


def synthetic_subject(sharing):
  """A 3-layer LKCA model with random kernels, wrapped for the plotting functions."""
  model = models.create_model(
    "lkca_t",
    num_classes=10,
    image_size=8,
    channels=1,
    patch_size=1,
    dim=32,
    depth=3,
    num_heads=4,
    rngs=nnx.Rngs(0),
    mixer_options={"lkca": {"kernel_sharing": sharing}},
  )
  rng = np.random.default_rng(0)
  for block in model.blocks:
    block.mixer.kernel[...] = rng.normal(size=block.mixer.kernel[...].shape).astype(np.float32)
  images = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  return analyze.Subject(
    "lkca_t", None, "workdir", "workdir/checkpoints/1", 1, model, nnx.clone(model), images
  )


@pytest.mark.parametrize("sharing,units", [("head", 4), ("channel", 32)])
def test_per_head_and_per_channel_kernels_are_drawn(tmp_path, sharing, units):
  subject = synthetic_subject(sharing)
  result = analyze.analyse(subject, [0, 2])
  assert sorted(result.views) == [0, 2] and result.views[0].shape == (64, 64)
  assert f"mean of {units} {sharing} kernels" in result.view_kinds[0]
  assert all(len(result.distances[i]["per_unit"]) == units for i in range(3))
  panels = titled_panels(analyze.kernels_figure(subject, result))
  for i, kernel in result.kernels.items():
    if sharing == "head":  # a panel per layer and head
      for h in range(units):
        np.testing.assert_array_equal(panels.pop(f"layer {i + 1}, head {h + 1}"), kernel[h])
    else:  # a mosaic of the first 16 channels and the mean |K| of all of them
      mosaic = panels.pop(f"layer {i + 1}: channels 1–16 of {units} (row-major tiles)")
      np.testing.assert_array_equal(mosaic.filled(np.nan), analyze.kernel_mosaic(kernel[:16])[0])
      np.testing.assert_allclose(
        panels.pop(f"layer {i + 1}: mean |K|, all {units}"), np.abs(kernel).mean(axis=0)
      )
  assert not panels  # nothing else is drawn


def titled_panels(figure) -> dict:
  """A figure's panels by title: the image each shows."""
  from matplotlib import pyplot

  panels = {}
  for ax in figure.axes:
    title = ax.get_title() or ax.get_title(loc="left")  # colour bars have none
    if title:
      panels[title] = ax.images[0].get_array()
  pyplot.close(figure)
  return panels


def test_erf_figure_shows_each_models_trained_and_initial_field():
  subject = synthetic_subject("layer")
  result = analyze.analyse(subject, [0])
  panels = titled_panels(analyze.erf_figure([subject], [result]))
  assert [title.split("\n")[0] for title in panels] == [
    "lkca_t, trained, step 1",
    "lkca_t, at initialisation",
  ]
  for shown, key in zip(panels.values(), ("trained", "init"), strict=True):
    erf = result.erf[key]
    np.testing.assert_allclose(shown.filled(0), erf / erf.max(), rtol=1e-6)


def test_kernel_mosaic_tiles_channels_row_major():
  stack = np.arange(5 * 3 * 3, dtype=float).reshape(5, 3, 3)
  mosaic, cols = analyze.kernel_mosaic(stack)
  assert cols == 3 and mosaic.shape == (7, 11)
  np.testing.assert_array_equal(mosaic[4:7, 0:3], stack[3])  # row 1, column 0
  np.testing.assert_array_equal(mosaic[0:3, 8:11], stack[2])
  assert np.isnan(mosaic[3]).all() and np.isnan(mosaic[4:7, 8:11]).all()


class Identity(nnx.Module):
  """A registered mixer that mixes nothing, and so has no attention view."""

  needs_grid, size_presets, config_options = False, {}, {}

  def __init__(self, dim, grid, *, num_heads, dtype=None, rngs):
    del dim, grid, num_heads, dtype, rngs

  def __call__(self, x):
    return x


def hybrid(mixers, dim=16):
  return models.create_model(
    "lkca_t",
    num_classes=10,
    image_size=8,
    channels=1,
    patch_size=1,
    dim=dim,
    depth=len(mixers),
    num_heads=4,
    rngs=nnx.Rngs(0),
    mixer=mixers,
  )


def test_layers_flag_selects_and_checks_layers(monkeypatch):
  monkeypatch.setitem(MIXERS, "identity", Identity)
  model = hybrid(["lkca", "identity"] * 2 + ["acmix"])
  assert analyze.choose_layers(model, None) == [0, 2, 4]  # identity layers have no view
  assert analyze.choose_layers(model, [5, 1, 1]) == [0, 4]
  with pytest.raises(ValueError, match="out of range"):
    analyze.choose_layers(model, [6])
  with pytest.raises(ValueError, match="identity layer"):
    analyze.choose_layers(model, [2])
  with pytest.raises(ValueError, match="comma-separated"):
    analyze.parse_layers("1;2")


def test_every_mixers_attention_is_drawn_and_measured():
  model = hybrid(["mhsa", "lkca", "acmix", "flatten"], dim=32)
  rng = np.random.default_rng(0)
  for block in model.blocks:  # off the init: LKCA's zero kernel, FLatten's zero tables
    params = nnx.state(block.mixer, nnx.Param)
    nnx.update(block.mixer, jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params))
  images = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  subject = analyze.Subject(
    "hybrid", None, "workdir", "workdir/checkpoints/1", 1, model, nnx.clone(model), images
  )
  assert analyze.choose_layers(model, None) == [0, 2, 3]  # first, middle, last: all have one
  result = analyze.analyse(subject, [0, 1, 2, 3])
  assert result.view_kinds == {
    0: "MHSA softmax, mean of 4 heads",
    1: "LKCA A",
    2: "ACmix attention-branch softmax, mean of 4 heads",
    3: "FLatten linear-attention weights, mean of 4 heads",
  }
  expected = analysis.mean_attention_weights(model, images)
  for i in (0, 2, 3):  # the mean over heads of the mean over images
    np.testing.assert_allclose(result.views[i], expected[i].mean(axis=0), rtol=1e-6)
    assert len(result.distances[i]["per_unit"]) == 4
    assert 0 < result.distances[i]["mean"] < 7 * math.sqrt(2)
  figure = analyze.attention_figure([subject], [result], [[0, 1, 2, 3]])
  title = figure.get_suptitle()
  assert "averaged over 3 test images" in title and "class token" not in title  # it has none
  panels = titled_panels(figure)
  assert [title.split("\n")[1] for title in panels] == list(result.view_kinds.values())
  # Beside a model with a class token, the title says its row and column are left out.
  vit = hybrid(["mhsa"])  # no grid mixer: a class token
  assert vit.pool == "cls"
  other = analyze.Subject("vit", None, "w", "w/checkpoints/1", 1, vit, nnx.clone(vit), images)
  both = analyze.attention_figure(
    [subject, other], [result, analyze.analyse(other, [0])], [[0], [0]]
  )
  assert both.get_suptitle().endswith("class token dropped)")
  titled_panels(both)  # closes it


def test_bad_input_exits_2_with_one_line(trained, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  lkca = [*LKCA, f"--workdir={trained['lkca']}"]
  cases = [
    ([*LKCA, f"--workdir={empty}"], "no checkpoint in"),
    ([*lkca, f"--compare={tmp_path / 'missing'}"], "is not a directory"),
    ([*lkca, f"--compare={empty}"], "is not a training workdir"),
    ([*lkca, "--images=0"], "--images must be at least 1"),
    ([*lkca, "--layers=3"], "out of range"),
    ([*lkca, "--config.model_overrides.dim=48"], "does not match this model"),
  ]
  procs = [start(["-m", "lkca_jax.tools.analyze", *flags]) for flags, _ in cases]
  for proc, (flags, message) in zip(procs, cases, strict=True):
    code, _, err = finish(proc, timeout=300)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (flags, err[-2000:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (flags, err[-2000:])
  assert not (empty / "analysis").exists()


def test_a_workdir_of_two_runs_is_analysed_run_by_run_from_its_own_config(tmp_path):
  """configs/workdir.py reads the run's overrides back; --run picks a run of the stack."""
  workdir = tmp_path / "two"
  code, _, err = finish(start(["main.py", *LKCA, "--config.num_runs=2", f"--workdir={workdir}"]))
  assert code == 0, err[-3000:]
  own = ["-m", "lkca_jax.tools.analyze", f"--config=configs/workdir.py:{workdir}"]
  code, out, err = finish(start([*own, "--run=1", f"--images={IMAGES}"]))
  assert code == 0, err[-3000:]
  assert "lkca_t run 1 (" in out
  result = json.loads((workdir / "analysis" / "run1" / "kernels.json").read_text())
  step, stacked = checkpoint_kernels(workdir)
  assert result["step"] == step and not (workdir / "analysis" / "kernels.json").exists()
  for layer, kernels in zip(result["layers"], stacked, strict=True):
    assert kernels.shape == (2, 15, 15)  # the run axis
    np.testing.assert_allclose(layer["kernel"], kernels[1], rtol=1e-6)
    assert not np.allclose(kernels[0], kernels[1])  # seeds 0 and 1 trained apart
  code, _, err = finish(start([*own, "--run=2"]))
  last = err.strip().splitlines()[-1]
  assert code == 2 and last.startswith("error: run=2: ") and "trained 2 run(s)" in last, last
