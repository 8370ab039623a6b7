"""lkca_jax.tools.reproduce: the paper's table, real runs on a tiny budget, resuming."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import lkca_jax
from lkca_jax import paper
from lkca_jax.tools import _experiment as experiment
from lkca_jax.tools import reproduce
from tests.data.test_offline_archives import closed_port, proxy_env
from tests.helpers import built_once, cpu_model_name, start_held

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_table_has_its_config():
  for table in reproduce.TABLES:
    assert os.path.exists(reproduce.config_path(table))


def test_select_rows():
  assert [r.preset for r in reproduce.select_rows("cifar10", ["lkca_t", "vit_1m"])] == [
    "lkca_t",
    "vit_1m",
  ]
  assert reproduce.select_rows("svhn", None) == paper.models("svhn")
  with pytest.raises(experiment.UsageError, match="no row 'lkca_l'"):
    reproduce.select_rows("cifar10", ["lkca_l"])
  with pytest.raises(experiment.UsageError, match="twice"):
    reproduce.select_rows("cifar10", ["lkca_t", "lkca_t"])


def test_table_in_argv():
  assert reproduce.table_in_argv(["x", "--table=svhn", "--runs=2"]) == "svhn"
  assert reproduce.table_in_argv(["x", "--runs=2", "--table", "cifar100"]) == "cifar100"
  assert reproduce.table_in_argv(["x"]) is None


def test_recipe_changes_names_the_keys_that_differ_from_the_tables_recipe():
  from configs import tinyimagenet

  config = tinyimagenet.get_config()
  # Where data lives and how the table's rows, seeds and budget are set change no recipe.
  config.dataset.manual_dir, config.dataset.placement = "/data", "stream"
  config.model, config.seed, config.num_train_steps = "vit_1m", 3, 400
  assert reproduce.recipe_changes(config, "tinyimagenet") == []
  config.dataset.classes, config.augment.erasing_area = 10, (0.1, 0.2)
  assert reproduce.recipe_changes(config, "tinyimagenet") == [
    ("augment.erasing_area", [0.02, 0.4], [0.1, 0.2]),
    ("dataset.classes", 0, 10),
  ]
  # Weights from another run are no recipe's start, though a resume may name them.
  config.init_from = "/runs/pretrained"
  assert reproduce.recipe_changes(config, "tinyimagenet")[-1] == (
    "init_from",
    None,
    "/runs/pretrained",
  )
  # Against another table's recipe, the dataset and its statistics differ too.
  changed = [key for key, _, _ in reproduce.recipe_changes(config, "cifar10")]
  assert {"dataset.name", "dataset.mean", "augment.autoaugment"} <= set(changed)


# --- the command, end to end: the cifar10 rows on digits, a few steps ------------------
STEPS, RUNS = 6, 2
ROWS = ["vit_05m", "lkca_05m"]
TINY = [
  "--config",
  "configs/digits.py",
  "--config.model_overrides.dim=16",
  "--config.model_overrides.depth=1",
  "--config.model_overrides.num_heads=2",
  "--config.num_devices=1",
  "--config.batch_size=32",
  "--config.log_every_steps=3",
  "--config.eval_every_steps=3",
]


def run_reproduce(out, *extra, timeout=600, env=None):
  command = [
    sys.executable,
    "-m",
    "lkca_jax.tools.reproduce",
    "--table=cifar10",
    f"--out={out}",
    *extra,
  ]
  env = {**os.environ, **(env or {})}
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
  return built_once(tmp_path_factory, "reproduce", reproduce_rows)


def reproduce_rows(out):
  result = run_reproduce(
    out, f"--rows={','.join(ROWS)}", f"--steps={STEPS}", f"--runs={RUNS}", *TINY
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_table_holds_paper_ours_and_their_difference_from_the_runs(reproduction):
  out, result = reproduction
  table = (out / "table.md").read_text()
  assert table in result.stdout
  report = json.loads((out / "table.json").read_text())
  published = {model.preset: model for model in paper.models("cifar10")}
  assert [row["preset"] for row in report["rows"]] == ROWS
  for row in report["rows"]:
    model = published[row["preset"]]
    assert row["paper_top1"] == pytest.approx(model.top1["cifar10"] / 100)
    assert row["paper_name"] == model.name
    finals, bests = [], []
    # The row's runs trained side by side in one process: one summary.json, a record per run.
    summary = json.loads((out / row["preset"] / "summary.json").read_text())
    assert summary["num_runs"] == RUNS and summary["step"] == STEPS
    assert summary["model"] == row["preset"] and summary["dataset"] == "digits"
    assert row["params"] == summary["params"]
    for k, (run, recorded) in enumerate(zip(row["runs"], summary["runs"], strict=True)):
      assert run["seed"] == recorded["seed"] == k
      assert run["final_top1"] == recorded["final_top1"]
      seed_summary = json.loads((out / row["preset"] / f"seed{k}" / "summary.json").read_text())
      assert seed_summary["final_top1"] == recorded["final_top1"]
      assert (seed_summary["config"]["seed"], seed_summary["num_runs"]) == (k, 1)
      finals.append(100 * recorded["final_top1"])
      bests.append(100 * recorded["best_top1"])
    assert len(finals) == RUNS
    assert 100 * row["final_top1_mean"] == pytest.approx(np.mean(finals))
    assert 100 * row["final_top1_std"] == pytest.approx(np.std(finals, ddof=1))
    assert 100 * row["best_top1_mean"] == pytest.approx(np.mean(bests))
    assert row["steps"] == STEPS and row["recipe_steps"] == 9 * (3 * 1437 // 32)
    assert row["machine"]["backend"] == "cpu"
    line = next(line for line in table.splitlines() if f"`{row['preset']}`" in line)
    paper_top1 = model.top1["cifar10"]
    assert (
      f"| {model.name} | `{row['preset']}` | {paper_top1:.2f} "
      f"| {np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f} "
      f"| {np.mean(finals) - paper_top1:+.2f} | {np.mean(bests):.2f} "
      f"| {row['params']:,} | {STEPS} |"
    ) in line
    # --config.num_devices=1 of 8; the CPU's model as /proc/cpuinfo names it
    assert line.endswith(" CPUs |") and f"| 1× cpu: {cpu_model_name()} (" in line, line
  # digits warms up for 1 of its 9 epochs: the proxy, for that share of its 6 steps.
  warmup = round(STEPS / 9)
  assert (
    f"**Shortened proxy** ({STEPS} steps per run instead of the recipe's 1,206, warming up "
    f"for the first {warmup})"
  ) in table
  assert "**Not the paper's dataset**" in table and "CIFAR-10" in table
  # Every change from configs/cifar10.py that alters training is named; device counts and
  # reporting intervals are not.
  changed = next(line for line in table.splitlines() if "**Not the paper's recipe**" in line)
  for shown in ("`batch_size` 128 → 32", "`model_overrides.dim` unset → 16", "`dataset.name`"):
    assert shown in changed
  assert "num_devices" not in changed and "eval_every_steps" not in changed


def test_a_second_invocation_skips_finished_rows(reproduction):
  out, _ = reproduction
  marker = [out / preset / experiment.ROW_FILE for preset in ROWS]
  before = [os.path.getmtime(path) for path in marker]
  summaries = [os.path.getmtime(out / preset / "summary.json") for preset in ROWS]
  table_before = json.loads((out / "table.json").read_text())["rows"]
  result = run_reproduce(
    out, f"--rows={','.join(ROWS)}", f"--steps={STEPS}", f"--runs={RUNS}", *TINY
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for preset in ROWS:
    assert f"skipped {preset}: finished" in result.stdout
  assert [os.path.getmtime(path) for path in marker] == before
  assert [os.path.getmtime(out / p / "summary.json") for p in ROWS] == summaries
  assert json.loads((out / "table.json").read_text())["rows"] == table_before


def test_a_row_stopped_mid_training_resumes_to_the_uninterrupted_rows_values(
  reproduction, tmp_path
):
  """SIGTERM while the first row's runs evaluate step 3 of 6: reproduce stops with the row
  unfinished; the same command resumes it from its checkpoint to the very parameters and
  values of the row that trained without a stop."""
  done, _ = reproduction
  row, out = ROWS[0], tmp_path / "out"
  args = [f"--rows={row}", f"--steps={STEPS}", f"--runs={RUNS}", *TINY]
  command = [sys.executable, "-m", "lkca_jax.tools.reproduce", "--table=cifar10"]
  proc, seen = start_held("eval:3", [*command, f"--out={out}", *args])
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  lines = [line for line in (seen + rest).splitlines() if line.strip()]
  assert proc.returncode == 1, lines[-20:]
  assert lines[-1] == (
    f"stopped by SIGTERM during {row} ({out / row}); run the same command to resume"
  )
  assert not (out / row / experiment.ROW_FILE).exists()  # the row is not done
  assert json.loads((out / row / "summary.json").read_text())["step"] == 4

  result = run_reproduce(out, *args, "--verbosity=0")  # the trainer's log: where it resumed
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from {out / row / 'checkpoints'}/4\n" in result.stderr
  resumed = json.loads((out / "table.json").read_text())["rows"]
  (uninterrupted,) = [
    r for r in json.loads((done / "table.json").read_text())["rows"] if r["preset"] == row
  ]
  for ours, theirs in zip(resumed[0]["runs"], uninterrupted["runs"], strict=True):
    assert (ours["seed"], ours["final_top1"], ours["best_top1"]) == (
      theirs["seed"],
      theirs["final_top1"],
      theirs["best_top1"],
    )
  for run in range(RUNS):
    ours = nnx.state(lkca_jax.load_trained(out / row, run=run), nnx.Param)
    theirs = nnx.state(lkca_jax.load_trained(done / row, run=run), nnx.Param)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_signal_in_a_rows_last_step_stops_the_experiment_after_that_row(reproduction, tmp_path):
  """SIGTERM while the first row evaluates its last step, after the trainer's last look
  for a signal: that row finishes with the uninterrupted row's values, and reproduce stops
  there instead of training the second row."""
  done, _ = reproduction
  out = tmp_path / "out"
  args = [f"--rows={','.join(ROWS)}", f"--steps={STEPS}", f"--runs={RUNS}", *TINY]
  command = [sys.executable, "-m", "lkca_jax.tools.reproduce", "--table=cifar10"]
  proc, seen = start_held(f"eval:{STEPS}", [*command, f"--out={out}", *args])
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  lines = [line for line in (seen + rest).splitlines() if line.strip()]
  assert proc.returncode == 1, lines[-20:]
  first, second = ROWS
  assert lines[-1] == (
    f"stopped by SIGTERM after {first} finished ({out / first}); run the same command to resume"
  )
  ours = json.loads((out / first / experiment.ROW_FILE).read_text())
  theirs = json.loads((done / first / experiment.ROW_FILE).read_text())
  assert [r["final_top1"] for r in ours["runs"]] == [r["final_top1"] for r in theirs["runs"]]
  assert not (out / second).exists()  # never started


def test_a_finished_row_with_other_settings_is_refused(reproduction):
  out, _ = reproduction
  result = run_reproduce(out, "--rows=lkca_05m", "--steps=5", f"--runs={RUNS}", *TINY)
  assert result.returncode == 2
  assert "finished row with other settings" in result.stderr and "--out" in result.stderr
  assert result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
  "args, message",
  [
    (["--rows=lkca_l"], "no row 'lkca_l'"),
    (["--runs=0"], "--runs=0"),
    (["--config.no_such_key=1"], "no_such_key"),
  ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  result = run_reproduce(tmp_path / "out", *args, *TINY)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and message in result.stderr
  assert not os.path.exists(tmp_path / "out")  # nothing trained


def test_a_row_workdir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
  # Found when the row starts training, after the flags and configs were checked.
  out = tmp_path / "out"
  out.mkdir()
  (out / "vit_05m").write_text("not a directory")
  result = run_reproduce(out, "--rows=vit_05m", "--runs=1", "--steps=2", *TINY)
  assert result.returncode == 2, result.stderr[-3000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and f"{out / 'vit_05m'} is a file, not a directory" in line


def test_a_download_that_cannot_start_is_one_line_before_any_row_is_written(tmp_path):
  """The rows' data is checked with their configs, before the table or a row is written:
  here CIFAR-10, not prepared, behind a proxy that refuses connections."""
  out, data_dir = tmp_path / "out", tmp_path / "tfds"
  args = [
    "--rows=vit_05m,lkca_05m",
    "--runs=1",
    "--steps=2",
    f"--config.dataset.data_dir={data_dir}",
  ]
  result = run_reproduce(out, *args, env=proxy_env(f"http://127.0.0.1:{closed_port()}"))
  assert result.returncode == 2, result.stderr[-3000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: dataset cifar10 cannot be downloaded"), line
  assert "refused the connection" in line and "--config.dataset.manual_dir=DIR" in line
  assert os.listdir(out) == []  # no table, no row's workdir


def test_the_table_is_required():
  result = subprocess.run(
    [sys.executable, "-m", "lkca_jax.tools.reproduce", "--rows=lkca_t"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert "--table is required: one of cifar10,cifar100,tinyimagenet,svhn" in lines[0]
