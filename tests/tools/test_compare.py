"""lkca_jax.tools.compare: whole-model multiply-adds against the paper, and a real comparison."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits
from lkca_jax import analysis, models, paper
from lkca_jax.tools import _experiment as experiment
from lkca_jax.tools import compare
from tests.helpers import built_once, cpu_model_name

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def abstract_model(name, *, classes, image_size, channels=3, **overrides):
  """The model's structure without allocating its parameters."""
  return nnx.eval_shape(
    lambda: models.create_model(
      name,
      num_classes=classes,
      image_size=image_size,
      channels=channels,
      rngs=nnx.Rngs(0),
      **overrides,
    )
  )


# --- multiply-adds --------------------------------------------------------------
def token_mixing_macs(name, tokens):
  """The N²-terms of the paper's models: MHSA's q·kᵀ and weights·v (over N+1 tokens with the
  class token), LKCA's N×N mixing. The paper's FLOPs leave these out."""
  preset = models.PRESETS[name]
  if preset.mixer == "mhsa":
    return preset.depth * 2 * (tokens + 1) ** 2 * preset.dim
  return preset.depth * tokens**2 * preset.dim


# The paper's FLOPs (lkca_jax.paper) on CIFAR (32×32, patch 4, 10 classes) and Tiny-ImageNet
# (64×64, patch 8, 200 classes); 8×8 = 64 tokens each.
SHAPES = {"cifar": (10, 32), "tinyimagenet": (200, 64)}
PAPER = [(f.preset, *SHAPES[f.input], f.millions) for f in paper.FLOPS]


@pytest.mark.parametrize("name, classes, size, paper_millions", PAPER)
def test_count_without_token_mixing_is_within_2_percent_of_the_paper(
  name, classes, size, paper_millions
):
  model = abstract_model(name, classes=classes, image_size=size)
  mixing_free = compare.model_macs(model) - token_mixing_macs(name, 64)
  assert abs(mixing_free / 1e6 / paper_millions - 1) < 0.02


@pytest.mark.parametrize("name, classes, size, paper_millions", PAPER)
def test_paper_flops_are_our_count_less_token_mixing_plus_elementwise_work(
  name, classes, size, paper_millions
):
  # The paper's numbers are what a PyTorch module-hook counter reports: Linear layers, plus
  # 2 per element for each affine LayerNorm, 1 per element for GELU and softmax, and nothing
  # for functional matmuls (MHSA's q·kᵀ, weights·v) or LKCA's functional conv. Rebuilding that
  # from our count reproduces every published value to rounding.
  preset = models.PRESETS[name]
  model = abstract_model(name, classes=classes, image_size=size)
  tokens = 64 + (model.pool == "cls")
  hidden = int(round(preset.dim * preset.mlp_ratio))
  softmax = preset.num_heads * tokens**2 if preset.mixer == "mhsa" else 0
  elementwise = preset.depth * (2 * 2 * tokens * preset.dim + tokens * hidden + softmax)
  elementwise += 2 * preset.dim  # the head LayerNorm
  paper_style = compare.model_macs(model) - token_mixing_macs(name, 64) + elementwise
  assert paper_style / 1e6 == pytest.approx(paper_millions, rel=5e-4)


def test_breakdown_by_hand_for_a_class_token_model_with_a_grid_mixer():
  # 4×4 image, patch 2: N = 4 patches, T = 5 tokens with the class token; D 8, 2 heads,
  # MLP hidden 16, 5 classes. The LKCA layer sees the 4 patch tokens, MHSA all 5.
  model = abstract_model(
    "vit",
    classes=5,
    image_size=4,
    patch_size=2,
    dim=8,
    depth=2,
    num_heads=2,
    mixer=["mhsa", "lkca"],
    pool="cls",
  )
  assert compare.model_macs_breakdown(model) == {
    "patch_embed": 4 * 12 * 8,
    "mixers": (4 * 5 * 8**2 + 2 * 5**2 * 8) + (2 * 4 * 8**2 + 4**2 * 8),
    "mlp": 2 * (2 * 5 * 8 * 16),
    "head": 8 * 5,
  }
  assert compare.model_macs(model) == sum(compare.model_macs_breakdown(model).values())


@pytest.mark.parametrize("name", ["vit", "lkca_b", "acmix_b", "flatten_b"])
def test_count_is_the_bulk_of_xla_flops(name):
  # XLA's own count of the compiled-from forward pass (2 flops per multiply-add, plus the
  # element-wise work we leave out): a missing matmul would push the ratio far above 1. The
  # pass computes every token of every block, as the count does (`analysis.run_blocks`).
  model = abstract_model(name, classes=10, image_size=32)
  model.eval()
  graphdef, state = nnx.split(model)

  def forward(state, images):
    model = nnx.merge(graphdef, state)
    return model.classify(analysis.run_blocks(model, images)[0])

  forward = jax.jit(forward)
  cost = forward.lower(state, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert 1.0 < cost["flops"] / 2 / compare.model_macs(model) < 1.08


# --- configs and run directories ---------------------------------------------------
@pytest.mark.parametrize(
  "mixers, size, same_preset, message",
  [
    (["lkca", "lkca"], "t", False, "names a mixer twice"),
    ([], "t", False, "--mixers is empty"),
    (["lkca", "swin"], "b", True, r"unknown mixer 'swin' in --mixers; choose from \['acmix'"),
  ],
)
def test_check_mixers_rejects_with_the_fix(mixers, size, same_preset, message):
  with pytest.raises(experiment.UsageError, match=message):
    compare.check_mixers(mixers, size, same_preset)


def test_run_config_picks_size_matched_or_same_preset_and_leaves_the_base_alone():
  base = digits.get_config()
  base.seed = 5
  base.model_overrides.mixer_options.lkca.view = "conv"
  sized = compare.run_config(base, "acmix", seeds=2, size="b", same_preset=False, steps=7)
  assert (sized.model, sized.model_overrides.mixer, sized.num_train_steps) == (
    "acmix_b",
    "acmix",
    7,
  )
  assert (sized.seed, sized.num_runs) == (0, 2)  # seeds 0 and 1, whatever config.seed says
  assert sized.model_overrides.mixer_options.lkca.view is None  # not for acmix layers
  same = compare.run_config(base, "mhsa", seeds=1, size="t", same_preset=True, steps=None)
  assert (same.model, same.model_overrides.mixer, same.num_train_steps) == (
    "lkca_t",
    "mhsa",
    base.num_train_steps,
  )
  lkca = compare.run_config(base, "lkca", seeds=1, size="t", same_preset=False, steps=None)
  assert lkca.model == "lkca_t" and lkca.model_overrides.mixer_options.lkca.view == "conv"
  assert (base.seed, base.num_runs, base.model_overrides.mixer) == (5, 1, None)


def test_run_dirs_refused_unless_overwrite_and_only_run_dirs_deleted(tmp_path):
  run = tmp_path / "lkca" / "seed0"
  run.mkdir(parents=True)
  (run / "config.json").write_text("{}")
  fresh = str(tmp_path / "lkca" / "seed1")
  with pytest.raises(experiment.UsageError, match="already exists.*--overwrite.*--workdir"):
    experiment.clear_run_dirs([str(run), fresh], overwrite=False, flag="--workdir")
  experiment.clear_run_dirs([str(run), fresh], overwrite=True, flag="--workdir")
  assert not run.exists()
  stranger = tmp_path / "mhsa" / "seed0"
  stranger.mkdir(parents=True)
  (stranger / "notes.txt").write_text("mine")
  with pytest.raises(experiment.UsageError, match="not a training run directory"):
    experiment.clear_run_dirs([str(stranger)], overwrite=True, flag="--workdir")
  assert (stranger / "notes.txt").exists()


def test_table_cells_for_known_per_seed_values():
  # Mean and sample std (ddof 1) by hand: finals [0.5, 0.6, 0.7]: mean 0.6, squared
  # deviations 0.01 + 0 + 0.01, / 2 → std 0.1; bests [0.81, 0.84, 0.90]: mean 0.85,
  # 0.0016 + 0.0001 + 0.0025 = 0.0042, / 2 → std √0.0021 ≈ 0.0458.
  def run(seed, final, best, speed):
    return {"seed": seed, "final_top1": final, "best_top1": best, "train_images_per_second": speed}

  rows = [
    {
      "name": "lkca",
      "mixer": "lkca",
      "preset": "lkca_t",
      "params": 1_234,
      "macs": 5_678_901,
      "runs": [run(0, 0.5, 0.81, 100.0), run(1, 0.6, 0.84, 200.0), run(2, 0.7, 0.90, 300.0)],
    },
    {
      "name": "mhsa",
      "mixer": "mhsa",
      "preset": "vit_1m",
      "params": 56_789,
      "macs": 12_345_678,
      "runs": [
        run(0, 0.5, 0.55, 50.0),
        {"seed": 1, "error": "loss is nan at step 3"},
        {"seed": 2, "error": "loss is nan at step 5"},
      ],
    },
  ]
  report = {
    "settings": {
      "same_preset": False,
      "model": None,
      "size": "t",
      "model_overrides": {},
      "subset_classes": False,
      "classes": 10,
      "train_per_class": 0,
      "dataset": "digits",
      "steps": 20,
      "batch_size": 32,
      "config_file": "configs/digits.py",
      "seeds": [0, 1, 2],
      "devices": 1,
      "hardware": "1× cpu: a CPU (avx512f), 2 CPUs",
      "config_changes": {"optimizer.learning_rate": 0.002, "augment.autoaugment": None},
    },
    "rows": [{**row, **experiment.statistics(row["runs"])} for row in rows],
  }
  table = compare.format_table(report)
  assert (
    "set on the command line: `optimizer.learning_rate`=0.002, `augment.autoaugment`=null;" in table
  )
  assert "| lkca | lkca_t | 60.00 ± 10.00 | 85.00 ± 4.58 | 1,234 | 5.68M | 200 | 3/3 |" in table
  # One finished seed: a mean and no std; the failed seeds are counted and listed.
  assert "| mhsa | vit_1m | 50.00 | 55.00 | 56,789 | 12.35M | 50 | 1/3 |" in table
  assert "- failed: mhsa seed 1: loss is nan at step 3" in table
  assert "- failed: mhsa seed 2: loss is nan at step 5" in table
  assert table.startswith("## Token mixers on digits: 20 steps at batch 32\n")
  # Stopped before any row finished, under the config's epoch budget: no step count yet.
  stopped = {
    "settings": {**report["settings"], "steps": None, "epochs": 9},
    "rows": [{**rows[0], "runs": [], **experiment.statistics([])}],
  }
  assert compare.format_table(stopped).startswith("## Token mixers on digits: 9 epochs at batch")


# --- the command, end to end -------------------------------------------------------
STEPS = 20
TINY = [
  "--config.model_overrides.dim=32",
  "--config.model_overrides.depth=2",
  "--config.model_overrides.num_heads=4",
  "--config.num_devices=1",
  "--config.batch_size=32",
  "--config.eval_every_steps=10",
  "--config.log_every_steps=10",
]


def compare_cmd(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "lkca_jax.tools.compare",
    "--config",
    "configs/digits.py",
    f"--workdir={workdir}",
    *extra,
  ]


def run_compare(workdir, *extra, timeout=300):
  return subprocess.run(
    compare_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  return built_once(tmp_path_factory, "compare", compare_mixers)


def compare_mixers(workdir):
  out = workdir / "table.md"
  result = run_compare(
    str(workdir),
    "--mixers=lkca,mhsa",
    "--seeds=2",
    f"--steps={STEPS}",
    "--same-preset",
    f"--out={out}",
    *TINY,
    "--config.optimizer.weight_decay=0.01",  # a recipe change the header must name
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, out, result


def test_table_has_one_row_per_mixer_with_mean_and_std_over_the_seeds(comparison):
  workdir, out, result = comparison
  table = out.read_text()
  assert table in result.stdout  # printed as well
  assert f"seeds 0, 1; 1× cpu: {cpu_model_name()} (" in table  # images/s depend on the CPU
  report = json.loads(out.with_suffix(".json").read_text())
  # Of the settings given on the command line, the header names the one the title and the
  # model overrides do not state and that changes the training: not where outputs go or
  # how often runs evaluate and log, not the device count.
  assert report["settings"]["config_changes"] == {"optimizer.weight_decay": 0.01}
  header = table.split("\n| mixer |")[0]
  assert "overrides depth=2, dim=32, num_heads=4, set on the command line: " in header
  assert "`optimizer.weight_decay`=0.01;" in header
  assert not any(key in header for key in ("num_devices", "every_steps", "batch_size"))
  rows = [line for line in table.splitlines() if re.match(r"\| (lkca|mhsa) \|", line)]
  assert [r["mixer"] for r in report["rows"]] == ["lkca", "mhsa"] and len(rows) == 2
  for row, line in zip(report["rows"], rows, strict=True):
    assert [r["seed"] for r in row["runs"]] == [0, 1]
    for key in ("final_top1", "best_top1"):
      values = [r[key] for r in row["runs"]]
      assert row[f"{key}_mean"] == pytest.approx(np.mean(values))
      assert row[f"{key}_std"] == pytest.approx(np.std(values, ddof=1))
      assert f"| {100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f} |" in line
    speeds = [r["train_images_per_second"] for r in row["runs"]]
    assert row["train_images_per_second_mean"] == pytest.approx(np.mean(speeds))
    assert min(speeds) > 0
    for run in row["runs"]:  # each value is that run's own summary, trained as asked
      summary = json.loads(
        open(os.path.join(workdir, row["mixer"], f"seed{run['seed']}", "summary.json")).read()
      )
      assert summary["final_top1"] == run["final_top1"]
      assert summary["best_top1"] == run["best_top1"]
      assert summary["config"]["seed"] == run["seed"]
      assert summary["step"] == STEPS
      assert summary["config"]["model_overrides"]["mixer"] == row["mixer"]


def test_params_and_macs_columns_are_those_of_the_built_model(comparison):
  _, out, _ = comparison
  report = json.loads(out.with_suffix(".json").read_text())
  table = out.read_text()
  for row in report["rows"]:
    model = abstract_model(
      "lkca_t",
      classes=10,
      image_size=8,
      channels=1,
      patch_size=1,
      dim=32,
      depth=2,
      num_heads=4,
      mixer=row["mixer"],
    )
    assert row["params"] == models.count_params(model)
    assert row["macs"] == compare.model_macs(model)
    assert f"| {row['mixer']} | lkca_t | " in table
    assert f"| {row['params']:,} | {row['macs'] / 1e6:.2f}M |" in table


@pytest.mark.parametrize(
  "args, message",
  [
    (["--mixers=lkca,swin"], "unknown mixer 'swin' in --mixers"),
    (["--seeds=0"], "--seeds=0"),
  ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  result = run_compare(str(tmp_path), *args, *TINY)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and message in result.stderr
  assert not os.listdir(tmp_path)  # nothing trained


def test_existing_run_directory_is_refused_before_training(comparison):
  workdir, out, _ = comparison
  before = os.path.getmtime(os.path.join(workdir, "lkca", "seed0", "summary.json"))
  result = run_compare(
    str(workdir),
    "--mixers=lkca",
    "--seeds=1",
    "--steps=5",
    "--same-preset",
    f"--out={workdir / 'again.md'}",
    *TINY,
  )
  assert result.returncode == 2
  assert "already exists" in result.stderr and "--overwrite" in result.stderr
  assert os.path.getmtime(os.path.join(workdir, "lkca", "seed0", "summary.json")) == before
  assert not (workdir / "again.md").exists()
