"""The train-step benchmark (a --smoke run end to end) and its synthetic_cifar data."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import config_checks, data, train
from lkca_jax.data import synthetic
from lkca_jax.tools import bench_step
from tests.helpers import built_once, cpu_model_name

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("lkca_t", "vit")
# One dtype in the smoke run: every (model, dtype, forms) case goes through the same
# itertools.product loop, whose order the two models show; bfloat16, so the state dtypes
# it records are those of the dtype that could change them. float32 steps are timed by the
# runs-mode test below, and the bfloat16 config is also checked in-process.
DTYPES = ("bfloat16",)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  return built_once(tmp_path_factory, "bench_step_smoke", run_smoke)


def run_smoke(directory):
  out = directory / "bench_step.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "lkca_jax.tools.bench_step",
      "--smoke",
      f"--models={','.join(MODELS)}",
      f"--dtype={','.join(DTYPES)}",
      f"--out={out}",
      f"--trace_dir={directory / 'traces'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())


def test_smoke_run_times_every_model_dtype_and_column(smoke):
  stdout, results = smoke
  config = results["config"]
  batch, steps = config["batch_size"], config["steps"]
  assert (batch, steps) == (bench_step.SMOKE["batch"], bench_step.SMOKE["steps"])
  assert config["models"] == list(MODELS) and config["dtypes"] == list(DTYPES)
  cases = [(r["model"], r["dtype"]) for r in results["results"]]
  assert cases == [(m, d) for m in MODELS for d in DTYPES]
  for r in results["results"]:
    assert r["params"] > 0
    for column in bench_step.COLUMNS:
      stats = r[column]
      assert len(stats["step_ms"]) == steps and min(stats["step_ms"]) > 0
      assert 0 < stats["min_ms"] <= stats["median_ms"]
      assert stats["min_ms"] == pytest.approx(min(stats["step_ms"]))
      assert stats["images_per_second"] == pytest.approx(batch / (stats["median_ms"] / 1e3))
    assert f"{r['model']:<10}{r['dtype']:<10}" in stdout
  assert set(results["columns"]) == set(bench_step.COLUMNS)


def test_smoke_run_records_machine_and_load(smoke):
  stdout, results = smoke
  assert results["jax"] == jax.__version__
  assert results["machine"]["cpu_model"].startswith(f"{cpu_model_name()} (")
  # The printed summary names the CPU too, so a pasted table says which machine it is.
  machine_line = [line for line in stdout.splitlines() if line.startswith("machine: ")]
  assert machine_line and machine_line[-1].startswith(f"machine: {cpu_model_name()} (")
  assert len(results["load_average_start"]) == len(results["load_average_end"]) == 3
  # A compile time per case, named as its results are.
  cases = {f"{r['model']}/{r['dtype']}/{r['forms']}" for r in results["results"]}
  assert set(results["compile_seconds"]) == cases


def test_smoke_run_traces_every_case_and_column_and_reports_its_ops(smoke):
  _, results = smoke
  assert results["config"]["trace_steps"] == bench_step.TRACE_STEPS
  for r in results["results"]:
    assert set(r["trace"]) == set(bench_step.COLUMNS)
    for column, trace in r["trace"].items():
      folder = trace["dir"]
      assert folder.endswith(f"{r['model']}-{r['dtype']}-{r['forms']}-{column}")
      written = [name for _, _, names in os.walk(folder) for name in names]
      assert any(name.endswith(".trace.json.gz") for name in written), written
      # On this CPU the ops run on XLA:CPU's own threads, at least one op a step.
      assert trace["lanes"] == bench_step.CPU_LANES and trace["ops_per_step"] >= 1
      assert 0 < trace["busy_ms_per_step"] <= trace["span_ms_per_step"]
      lanes = trace["per_lane"].values()
      assert sum(lane["ops_per_step"] for lane in lanes) == pytest.approx(trace["ops_per_step"])


def dot_instructions(hlo: str) -> set[str]:
  """Names of the instructions a compiled program runs (its entry computation's) that are a
  product or a fusion holding one."""
  computations = {}  # name -> its lines, the header "[ENTRY ]%name (...) -> ... {" first
  for line in hlo.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):
      name = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
      computations[name] = lines = [line]
    elif line.startswith(" ") and computations:
      lines.append(line)
  with_dot = {name for name, lines in computations.items() if any(" dot(" in x for x in lines)}
  (entry,) = [lines for lines in computations.values() if lines[0].startswith("ENTRY ")]
  names = set()
  for line in entry[1:]:
    line = line.strip().removeprefix("ROOT ")
    if not line.startswith("%") or " = " not in line:
      continue
    name = line[1:].split(" = ", 1)[0]
    called = line.split("calls=%", 1)[1].split(",", 1)[0] if "calls=%" in line else None
    if " dot(" in line or called in with_dot:
      names.add(name)
  return names


def test_trace_summary_finds_a_programs_products_as_its_busiest_ops(tmp_path):
  # Products of 1536³ (7 GFLOP, tens of ms each) against an element-wise pass of 1536² (about
  # a millisecond): a busy machine descheduling the test for a few ms cannot swap their order.
  a = jnp.asarray(np.random.default_rng(0).standard_normal((1536, 1536)), jnp.float32)
  compiled = jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(a).compile()
  jax.block_until_ready(compiled(a))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(compiled(a))
  summary = bench_step.trace_summary(str(tmp_path), 3)
  assert summary["lanes"] == bench_step.CPU_LANES
  # The two products are the two busiest ops, each one call a step, named as the compiled
  # program names them.
  busiest = summary["top_ops"][:2]
  products = dot_instructions(compiled.as_text())
  assert len(products) == 2 and {op["name"] for op in busiest} == products
  assert [op["calls_per_step"] for op in busiest] == [1, 1]
  assert 0 < summary["busy_ms_per_step"] <= summary["span_ms_per_step"]
  assert sum(op["ms_per_step"] for op in busiest) <= summary["busy_ms_per_step"] * 1.001


def test_a_models_timings_are_reported_before_its_traces_are_taken(tmp_path):
  snapshots = []  # as on disk: main's on_model writes each one out as it comes
  final = bench_step.run_benchmark(
    ["lkca_t"],
    ["float32"],
    batch=bench_step.SMOKE["batch"],
    steps=2,
    overrides=bench_step.SMOKE["overrides"],
    columns=("fixed",),
    log=lambda line: None,
    on_model=lambda partial: snapshots.append(json.loads(json.dumps(partial))),
    trace_dir=str(tmp_path),
  )
  timed, traced = snapshots  # a limit reached while tracing still leaves the first
  assert "trace" not in timed["results"][0]
  assert timed["results"][0]["fixed"] == traced["results"][0]["fixed"]
  assert traced["results"][0]["trace"]["fixed"]["ops_per_step"] >= 1
  assert json.loads(json.dumps(final["results"])) == traced["results"] and final["complete"]


class ProductSteps:
  """A stand-in for a `bench_step.Case`: each step one jitted product."""

  def __init__(self):
    self.a, self.steps = jnp.ones((64, 64)), 0
    self.product = jax.jit(lambda a: a @ a)

  def step(self, column):
    self.steps += 1
    return jax.block_until_ready(self.product(self.a))


def test_a_trace_the_profiler_cannot_write_is_an_error_in_the_results_not_a_crash():
  case = ProductSteps()
  summary = bench_step.trace_case(case, "fixed", "/proc/lkca-no-trace")
  assert summary["error"].startswith("jax.profiler: ") and "/proc/lkca-no-trace" in summary["error"]
  assert case.steps == bench_step.TRACE_STEPS  # the steps ran; only the trace is missing


def test_busy_time_is_the_length_of_the_intervals_union():
  assert bench_step.busy_time([(5, 6), (0, 2), (1, 3), (5.2, 5.5)]) == 4
  assert bench_step.busy_time([]) == 0


def test_op_lanes_are_a_devices_streams_where_the_trace_has_a_device():
  # Named as jax.profiler's traces name them: /host:CPU with XLA:CPU's tf_XLA threads;
  # a GPU as /device:GPU:0 with "Stream #N(...)" lanes beside lanes it derives from them.
  processes = {1: "/host:CPU", 2: "/device:GPU:0"}
  threads = {
    (1, 10): "tf_XLAEigen/1",
    (1, 11): "python",
    (2, 20): "Stream #13(Compute)",
    (2, 21): "XLA Ops",
  }
  keys = set(threads)
  assert bench_step.op_lanes(processes, threads, keys) == ("device streams", {(2, 20)})
  del threads[(2, 20)]
  assert bench_step.op_lanes(processes, threads, keys - {(2, 20)}) == ("device lanes", {(2, 21)})
  assert bench_step.op_lanes({1: "/host:CPU"}, threads, {(1, 10), (1, 11)}) == (
    bench_step.CPU_LANES,
    {(1, 10)},
  )


def test_bfloat16_keeps_parameters_and_optimizer_state_float32(smoke):
  _, results = smoke
  for r in results["results"]:  # after the timed steps, bf16 compute included
    assert r["state_dtypes"] == {"params": ["float32"], "opt_state": ["float32"]}, r["dtype"]


def test_bfloat16_config_computes_in_bfloat16_with_float32_state():
  config = bench_step.step_config(
    "lkca_t", batch=16, dtype="bfloat16", overrides=bench_step.SMOKE["overrides"]
  )
  case = bench_step.Case(config)
  model = jax.tree.leaves(case.state.params)
  assert {x.dtype for x in model} == {jnp.dtype(jnp.float32)}
  # Traced, not run: the dtype is fixed at trace time, and op-by-op runs compile each op.
  logits = nnx.eval_shape(
    lambda model, image: model(image), case.run.model, case.fixed_batch["image"]
  )
  assert logits.dtype == jnp.bfloat16
  case.step("fixed")
  assert bench_step.float_dtypes(case.state.params) == ["float32"]
  assert bench_step.float_dtypes(case.state.opt_state) == ["float32"]


def test_synthetic_loader_is_deterministic_with_declared_shapes():
  spec = data.get_spec("synthetic_cifar")
  assert (spec.num_classes, spec.image_size, spec.channels) == (10, (32, 32), 3)
  assert spec.tfds_name is None
  for split in (spec.train_split, spec.eval_split):
    images, labels = data.load_split("synthetic_cifar", split)
    again, again_labels = synthetic.load(split)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert images.shape == (synthetic.SPLIT_SIZES[split], 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (synthetic.SPLIT_SIZES[split],) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
    images[0] = 0  # callers get copies
    assert synthetic.load(split)[0].any(axis=(1, 2, 3))[0]
  train_images, _ = synthetic.load("train")
  test_images, _ = synthetic.load("test")
  assert not np.array_equal(train_images[: len(test_images)], test_images)
  with pytest.raises(ValueError, match="no split"):
    synthetic.load("validation")


def test_synthetic_dataset_passes_config_checks_without_tfds():
  config = bench_step.step_config("lkca_t", batch=16, dtype="float32")
  config_checks.validate(config)
  run = train.Run.prepare(config)
  assert run.spec.name == "synthetic_cifar"
  data.check_available("synthetic_cifar")  # no TFDS builder involved


def test_runs_mode_times_k_runs_together_and_apart_with_memory_per_run():
  results = bench_step.run_runs_benchmark(
    ["lkca_t"],
    ["float32"],
    runs=2,
    batch=bench_step.SMOKE["batch"],
    steps=2,
    overrides=bench_step.SMOKE["overrides"],
    log=lambda *_: None,
  )
  (r,) = results["results"]
  assert r["runs"] == 2 and len(r["together_step_ms"]) == 2
  assert r["ratio"] == pytest.approx(r["together_ms"] / r["separate_ms"])
  # The stacked state holds two of everything: more bytes than one run, each run's share less.
  assert r["single_bytes"] < r["together_bytes"] == 2 * r["together_bytes_per_run"]
  table = bench_step.format_runs_table(results)
  assert "2 runs in one process vs 2 single runs" in table and "lkca_t" in table


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--forms=gpu"], "--forms must list ['auto', 'cpu', 'plain']"),
    (["--columns=fixed,warm"], "--columns must list ['fixed', 'pipeline']"),
    (["--runs=2", "--forms=plain"], "--runs times the pipeline step in the backend's own forms"),
    (["--runs=2", "--trace_dir=/tmp"], "--trace_dir traces the cases of the per-model benchmark"),
  ],
)
def test_bad_forms_and_columns_are_one_error_line(flags, message, tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "lkca_jax.tools.bench_step", *flags, f"--out={tmp_path / 'b.json'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1]
  assert "Traceback" not in result.stderr and not (tmp_path / "b.json").exists()


def test_each_model_is_reported_as_it_finishes():
  snapshots = []
  final = bench_step.run_benchmark(
    ["lkca_t", "vit_1m"],
    ["float32", "bfloat16"],
    batch=bench_step.SMOKE["batch"],
    steps=2,
    overrides=bench_step.SMOKE["overrides"],
    forms=("plain",),
    columns=("fixed",),
    log=lambda line: None,
    on_model=snapshots.append,
  )
  # One snapshot per model, each holding the models done so far, all their dtypes.
  assert [s["complete"] for s in snapshots] == [False, False] and final["complete"]
  assert [(r["model"], r["dtype"]) for r in snapshots[0]["results"]] == [
    ("lkca_t", "float32"),
    ("lkca_t", "bfloat16"),
  ]
  assert snapshots[1]["results"] == final["results"]
  assert [r["model"] for r in final["results"]] == ["lkca_t", "lkca_t", "vit_1m", "vit_1m"]
  assert list(snapshots[0]["compile_seconds"]) == [
    "lkca_t/float32/plain",
    "lkca_t/bfloat16/plain",
  ]
  assert all(r["fixed"]["median_ms"] > 0 for r in final["results"])
