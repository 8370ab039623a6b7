"""benchmarks/gpu_check.sh --smoke end to end: every part's status, numbers and projection.

One run, with the two ViT parts given an unknown model: they must be recorded as
failed while every other part (including one after them) still runs and reports.
"""

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from tests.helpers import built_once

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OK_PARTS = (
  "env",
  "train",
  "step_b128_lkca_t",
  "export",
  "forms",
  "views",
  "runs",
  "step_b128_lkca_b",
  "mixers",
  "autoaugment",
  "randaugment",
  "stream",
  "step_b1024_lkca",
)
BROKEN_PARTS = ("step_b128_vit", "step_b1024_vit")
RECIPE_STEPS = 117_100
PROBE = "gpu_check_probe"  # a wheel no environment has: the offline install must add it


def write_wheel(folder) -> None:
  """A minimal pure-Python wheel: one module and its dist-info."""
  info = f"{PROBE}-1.0.dist-info"
  files = {
    f"{PROBE}.py": "VALUE = 42\n",
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
  }
  files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
  with zipfile.ZipFile(folder / f"{PROBE}-1.0-py3-none-any.whl", "w") as whl:
    for name, text in files.items():
      whl.writestr(name, text)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  return built_once(tmp_path_factory, "gpu_check_smoke", run_smoke)


def run_check(env, *args, timeout):
  """benchmarks/gpu_check.sh ARGS from the repository root, under `env`."""
  return subprocess.run(
    ["bash", "benchmarks/gpu_check.sh", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_smoke(directory):
  out, wheels = directory / "out", directory / "wheels"
  wheels.mkdir()
  env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
  env["GPU_CHECK_VIT_MODELS"] = "no_such_model"
  write_wheel(wheels)
  env["GPU_CHECK_WHEELS"] = str(wheels)
  # Every part must run here: a budget well above the 100-150 s the smoke run takes on 2
  # busy cores, so that a slow machine is not read as a part skipped for time.
  env["GPU_CHECK_BUDGET_S"] = "400"
  result = run_check(env, "--smoke", timeout=480)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  return out, summary, result.stdout


def load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_statuses_failed_parts_contained(smoke):
  out, summary, stdout = smoke
  parts = summary["parts"]
  assert summary["mode"] == "smoke"
  assert list(parts) == [
    "wheels",
    "env",
    "train",
    "step_b128_lkca_t",
    "export",
    "forms",
    "views",
    "runs",
    "step_b128_lkca_b",
    "mixers",
    "autoaugment",
    "randaugment",
    "stream",
    "step_b128_vit",
    "step_b1024_lkca",  # after a failed part: still ran
    "step_b1024_vit",
  ]
  for name in ("wheels", *OK_PARTS):
    assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts[name]["rc"] == 0 and parts[name]["seconds"] > 0
    assert name == "wheels" or os.path.isfile(parts[name]["json"]), name
  for name in BROKEN_PARTS:
    assert parts[name]["status"] == "failed" and parts[name]["rc"] != 0
    # bench_step's own message, the last line of the part's log.
    assert "unknown model 'no_such_model'" in parts[name]["error"]
    assert not os.path.exists(out / f"{name}.json")
  assert summary["failed"] == sorted(BROKEN_PARTS)
  assert "failed parts: step_b1024_vit, step_b128_vit" in stdout


def test_train_part_is_main_py_and_its_summary(smoke):
  out, summary, stdout = smoke
  # main.py's own summary.json in the part's workdir, a real run of the digits config.
  run = load(out / "train_workdir" / "summary.json")
  assert summary["parts"]["train"]["json"] == str(out / "train_workdir" / "summary.json")
  assert (run["model"], run["dataset"], run["step"], run["total_steps"]) == (
    "lkca_t",
    "digits",
    4,
    4,
  )
  assert os.path.isdir(out / "train_workdir" / "checkpoints")
  train = summary["train"]
  assert (train["steps"], train["batch"], train["final_top1"]) == (4, 64, run["final_top1"])
  assert train["train_images_per_second"] == run["train_images_per_second"] > 0
  assert summary["parts"]["train"]["final_top1"] == run["final_top1"]
  assert "main.py lkca_t on digits (all classes, float32): 4 steps in " in stdout


def test_train_projection_from_known_numbers():
  from benchmarks import gpu_check

  # 8,000 img/s at batch 128 is 16 ms a step: 117,100 steps take 31.2 minutes; a 2,000-step
  # run of 180 s wall is 90 ms a step all in: 175.65 minutes.
  results = {
    "model": "lkca_t",
    "dataset": "tiny_imagenet",
    "step": 2000,
    "final_top1": 0.5,
    "best_top1": 0.55,
    "train_images_per_second": 8000.0,
    "wall_seconds": 180.0,
    "config": {"batch_size": 128, "dtype": "float32", "dataset": {"classes": 20}},
  }
  train = gpu_check.train_summary(results)
  assert train["train_ms_per_step"] == pytest.approx(16.0)
  assert train["recipe_minutes_at_train_rate"] == pytest.approx(31.2267, abs=1e-3)
  assert train["wall_ms_per_step"] == pytest.approx(90.0)
  assert train["recipe_minutes_at_wall_rate"] == pytest.approx(175.65, abs=1e-3)
  assert (train["classes"], train["best_top1"]) == (20, 0.55)


def test_images_per_second_match_bench_step_json(smoke):
  _, summary, _ = smoke
  expected = {
    "step_b128_lkca_t": {("lkca_t", "float32")},
    "step_b128_lkca_b": {("lkca_b", "float32")},
    "step_b1024_lkca": {("lkca_t", "float32"), ("lkca_b", "float32")},
  }
  for part, cases in expected.items():
    results = load(summary["parts"][part]["json"])
    batch = results["config"]["batch_size"]
    assert batch == 16  # bench_step --smoke
    rows = {(r["model"], r["dtype"]): r for r in summary["step"] if r["part"] == part}
    assert set(rows) == cases
    for r in results["results"]:
      row = rows[(r["model"], r["dtype"])]
      for column in ("fixed", "pipeline"):
        ips = r[column]["images_per_second"]
        assert ips > 0
        assert row[f"{column}_images_per_second"] == ips
      key = f"{r['model']}/{r['dtype']}/b{batch}"
      assert summary["parts"][part]["images_per_second"][key] == r["pipeline"]["images_per_second"]
  assert {r["part"] for r in summary["step"]} == set(expected)


def test_the_lkca_t_step_part_traces_its_cases_and_the_summary_reports_them(smoke):
  out, summary, stdout = smoke
  part = summary["parts"]["step_b128_lkca_t"]
  (r,) = load(part["json"])["results"]
  assert set(part["traces"]) == {f"lkca_t/float32/{c}" for c in ("fixed", "pipeline")}
  for column, traced in r["trace"].items():
    row = part["traces"][f"lkca_t/float32/{column}"]
    assert row["ops_per_step"] == traced["ops_per_step"] >= 1
    assert row["top_op"] == traced["top_ops"][0]["name"]
    assert traced["dir"].startswith(str(out / "traces"))  # inside what comes back
    assert f"trace step_b128_lkca_t lkca_t/float32/{column}: " in stdout
  assert all("traces" not in summary["parts"][name] for name in ("forms", "step_b128_lkca_b"))


def test_projection_takes_the_recipe_batch_parts_pipeline_ms(smoke):
  _, summary, _ = smoke
  projection = summary["projection"]
  assert projection["steps"] == RECIPE_STEPS
  assert set(projection["models"]) == {"lkca_t", "lkca_b"}
  for name in ("lkca_t", "lkca_b"):
    (r,) = load(summary["parts"][f"step_b128_{name}"]["json"])["results"]
    model = projection["models"][name]
    assert list(model["by_dtype"]) == ["float32"]  # the only dtype that ran
    # The pipeline column (augmentation included) of its step_b128 part, not step_b1024's.
    assert model["by_dtype"]["float32"]["ms_per_step"] == r["pipeline"]["median_ms"]


def test_projection_and_runs_goals_from_known_timings():
  from benchmarks import gpu_check

  def row(part, model, dtype, ms):
    return {"part": part, "model": model, "dtype": dtype, "batch": 128, "pipeline_ms": ms}

  rows = [
    row("step_b128_lkca_t", "lkca_t", "float32", 6.0),
    row("step_b128_lkca_t", "lkca_t", "bfloat16", 5.0),
    row("step_b1024_lkca", "lkca_t", "float32", 0.5),  # another batch: not the recipe's
    row("step_b128_lkca_b", "lkca_b", "float32", 2.5),
  ]
  models = gpu_check.projection(rows)["models"]
  lkca_t, lkca_b = models["lkca_t"], models["lkca_b"]
  assert lkca_t["by_dtype"]["float32"]["ms_per_step"] == 6.0
  # 5 ms x 117,100 steps = 585.5 s: within the 10-minute goal, not the 5-minute stretch.
  assert lkca_t["best_dtype"] == "bfloat16"
  assert lkca_t["best_minutes"] == pytest.approx(9.758, abs=1e-3)
  assert (lkca_t["meets_goal"], lkca_t["meets_stretch"]) == (True, False)
  # 2.5 ms: 292.75 s, within both.
  assert lkca_b["best_minutes"] == pytest.approx(4.879, abs=1e-3)
  assert (lkca_b["meets_goal"], lkca_b["meets_stretch"]) == (True, True)
  # 4 runs in one 10 ms step against 4 single runs of 10 ms each: 4x one run's images/s,
  # the goal; in a 20 ms step, 2x.
  runs = gpu_check.runs_summary(
    {
      "results": [
        {"model": "lkca_t", "dtype": d, "runs": 4, "together_ms": ms, "separate_ms": 40.0}
        for d, ms in (("float32", 10.0), ("bfloat16", 20.0))
      ]
    }
  )
  assert [(r["throughput_vs_one_run"], r["meets_goal"]) for r in runs] == [
    (4.0, True),
    (2.0, False),
  ]
  assert [r["one_run_ms"] for r in runs] == [10.0, 10.0]


def test_runs_forms_mixers_views_autoaugment_env(smoke):
  _, summary, stdout = smoke
  parts = summary["parts"]
  (run,) = load(parts["runs"]["json"])["results"]
  (row,) = summary["runs"]
  assert (row["model"], row["dtype"], row["runs"]) == ("lkca_t", "float32", 2)
  assert row["together_ms"] == run["together_ms"]  # the runs part's own numbers

  forms = load(parts["forms"]["json"])["results"]
  ms = {r["forms"]: r["fixed"]["median_ms"] for r in forms}
  ((row),) = summary["forms"]
  assert set(ms) == {"plain", "cpu"} and (row["model"], row["dtype"]) == ("lkca_t", "float32")
  assert row["ms"] == ms and row["faster"] == min(ms, key=ms.get)

  mixers = load(parts["mixers"]["json"])
  ms = {r["case"]: r["median_ms"] for r in mixers["rows"]}
  assert set(ms) == {"lkca-attention", "lkca-conv"} and min(ms.values()) > 0
  view = summary["mixers"]["8x8"]
  assert view["ms"] == {"attention": ms["lkca-attention"], "conv": ms["lkca-conv"]}
  assert view["faster"] == min(("attention", "conv"), key=lambda v: ms[f"lkca-{v}"])
  assert view["auto_picks"] == mixers["auto_view"]["8x8"]

  views = load(parts["views"]["json"])
  assert {(r["grid_name"], r["view"]) for r in views["rows"]} == {
    (g, v) for g in ("2x2", "3x3") for v in ("conv", "attention", "fft")
  }
  assert {r["level"] for r in views["rows"]} == {"mix"}
  assert summary["views"] == {"crossover": views["crossover"], "auto": views["auto"]}
  fft_from = views["crossover"]["mix"]["fft_beats_attention_from_tokens"]
  assert parts["views"]["fft_from_tokens"] == {"mix": fft_from}
  assert "LKCA views over grids (mix): fastest 2x2 " in stdout

  for name, policy in (("autoaugment", "cifar10"), ("randaugment", "rand-m9-mstd0.5-inc1")):
    augment = summary[name]
    assert augment["backend"] == "cpu" and augment["batch"] == 4
    assert augment["policy"] == policy and f"  {policy} b4 on cpu: " in stdout
    assert set(augment["forms"]) == {"batched_select", "per_image_loop"}
    for form in augment["forms"].values():
      assert form["median_ms"] > 0 and form["images_per_second"] > 0
    assert parts[name]["ms"]["batched_select"] > 0

  env = parts["env"]["env"]
  assert env["backend"] == "cpu" and env["devices"] and env["jax"]
  assert not env["imports"]["ml_collections"].startswith("MISSING")
  # Installed offline (pip --no-index --no-deps --target) and on the parts' PYTHONPATH.
  assert env["wheels"] == {PROBE: "1.0"}


def test_the_export_part_calls_one_artifact_on_the_cpu_and_the_default_device(smoke):
  _, summary, stdout = smoke
  exported = load(summary["parts"]["export"]["json"])
  assert summary["export"] == exported
  assert exported["platforms"] == ["cpu", "cuda", "tpu"] and exported["device"] == "cpu:0"
  # Here the default device is the CPU: the same program on the same inputs, bit for bit.
  assert exported["max_abs_difference_to_cpu"] == 0.0 < exported["max_abs_logit"]
  assert exported["top1_agreement_with_cpu"] == 1.0
  assert exported["batch"] == 4 and exported["median_ms"] > 0 and exported["bytes"] > 0
  assert "  exported lkca_t (smoke sizes) (cpu,cuda,tpu) on cpu:0: b4 " in stdout


def test_stream_part_sets_one_cores_rate_against_each_steps_images(smoke):
  _, summary, stdout = smoke
  results = load(summary["parts"]["stream"]["json"])
  stream = summary["stream"]
  rates = {name: c["images_per_cpu_second"] for name, c in results["cases"].items()}
  assert set(rates) == {
    "tiny_imagenet_64_resize",
    "imagenet_size_random_resized_224",
    "imagenet_size_eval_224",
  }
  assert stream["images_per_core_second"] == rates and all(r > 0 for r in rates.values())
  assert stream["host_cores"] == results["machine"]["cpu_count"]
  # One need per step row and case: the device's images/s over one core's.
  assert len(stream["needs"]) == len(summary["step"]) * len(rates)
  for need in stream["needs"]:
    (row,) = [
      r
      for r in summary["step"]
      if (r["part"], r["model"], r["dtype"]) == (need["part"], need["model"], need["dtype"])
    ]
    expected = row["pipeline_images_per_second"] / rates[need["case"]]
    assert need["host_cores_needed"] == pytest.approx(expected)
    assert need["host_keeps_up"] == (expected <= stream["host_cores"])
  assert "streaming host work, images per core-second: tiny_imagenet_64_resize " in stdout


def test_missing_wheels_lists_only_uninstalled(tmp_path):
  for name in ("numpy-1.0-py3-none-any.whl", "no_such_dist-1.0-py3-none-any.whl"):
    (tmp_path / name).write_bytes(b"")
  result = subprocess.run(
    [sys.executable, "benchmarks/gpu_check.py", "missing-wheels", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(tmp_path / "no_such_dist-1.0-py3-none-any.whl")]


def sleeping_python(tmp_path):
  """An interpreter that runs gpu_check.py for real and sleeps for every other command."""
  stub = tmp_path / "python"
  stub.write_text(
    f'#!/bin/sh\ncase "$1" in benchmarks/gpu_check.py) exec "{sys.executable}" "$@" ;; esac\n'
    "exec sleep 600\n"
  )
  stub.chmod(0o755)
  return stub


def test_parts_selection_runs_only_the_named_parts(tmp_path):
  out = tmp_path / "out"
  env = {**os.environ, "OUT": str(out), "PYTHON": str(sleeping_python(tmp_path))}
  env.update(GPU_CHECK_BUDGET_S="16", GPU_CHECK_WHEELS=str(tmp_path / "none"))
  env["GPU_CHECK_PARTS"] = "mixers"
  result = run_check(env, "--smoke", timeout=120)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = load(out / "summary.json")
  statuses = {name: p["status"] for name, p in summary["parts"].items()}
  # env always runs; the one selected part ran (into the sleeping stub's timeout).
  assert statuses.pop("env") == "ok" and statuses.pop("mixers") == "timeout"
  assert set(statuses.values()) == {"not selected"}
  assert summary["failed"] == ["mixers"]

  env["GPU_CHECK_PARTS"] = "mixers,no_such_part"
  result = run_check(env, "--smoke", "--out", str(tmp_path / "second"), timeout=60)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: GPU_CHECK_PARTS=mixers,no_such_part: unknown part(s) no_such_")
  assert not (tmp_path / "second").exists()  # refused before anything ran


def test_budget_cuts_the_run_short(tmp_path):
  # Only env and the summary run for real; every other part's interpreter sleeps past any
  # limit, so the budget alone (not how fast a part happens to be) must end it: the first
  # part gets what is left of 12 s (the env part takes about 1 s), then the rest are
  # skipped.
  out = tmp_path / "out"
  env = {**os.environ, "OUT": str(out), "PYTHON": str(sleeping_python(tmp_path))}
  env["GPU_CHECK_BUDGET_S"] = "12"
  env["GPU_CHECK_WHEELS"] = str(tmp_path / "no_wheels")
  start = time.perf_counter()
  result = run_check(env, "--smoke", timeout=120)
  seconds = time.perf_counter() - start
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  parts = load(out / "summary.json")["parts"]
  assert parts["env"]["status"] == "ok"
  assert parts["step_b1024_vit"] == {
    "status": "skipped",
    "log": str(out / "logs" / "step_b1024_vit.log"),
    "error": "skipped: 12s budget spent",
  }
  # The first part after env was cut to what was left (or skipped if env took most of it).
  rest = [p["status"] for name, p in parts.items() if name != "env"]
  assert set(rest) <= {"timeout", "skipped"} and rest.count("timeout") <= 1
  assert sum(p.get("seconds", 0) for p in parts.values()) <= 12 + 5  # + timeout's kill grace
  assert seconds < 60  # the budget, then the summary


def test_a_timed_out_part_keeps_the_results_it_wrote(tmp_path):
  from benchmarks import gpu_check

  # forms stopped by its limit after its first group (bench_step writes after each);
  # views stopped before writing anything.
  forms = {
    "complete": False,
    "results": [
      {"model": "lkca_t", "dtype": "float32", "forms": f, "fixed": {"median_ms": ms}}
      for f, ms in (("plain", 4.0), ("cpu", 5.0))
    ],
  }
  (tmp_path / "forms.json").write_text(json.dumps(forms))
  (tmp_path / "logs").mkdir()
  for name in ("forms", "views"):
    (tmp_path / "logs" / f"{name}.log").write_text("compiled something\n")
  rows = [
    ("forms", "124", "300.1", tmp_path / "logs" / "forms.log", tmp_path / "forms.json"),
    ("views", "124", "300.0", tmp_path / "logs" / "views.log", tmp_path / "views.json"),
  ]
  (tmp_path / "parts.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
  summary = gpu_check.summarize(str(tmp_path), "full")
  assert summary["parts"]["forms"]["status"] == "timeout"
  assert summary["parts"]["forms"]["partial"] is True
  assert summary["forms"] == [
    {"model": "lkca_t", "dtype": "float32", "ms": {"plain": 4.0, "cpu": 5.0}, "faster": "plain"}
  ]
  assert "partial" not in summary["parts"]["views"] and summary["views"] is None
  assert summary["failed"] == sorted(gpu_check.PARTS)  # each timed out or never ran
  assert "(partial results kept)" in gpu_check.format_summary(summary)
