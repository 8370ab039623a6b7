"""benchmarks/gpu_program.py: what it counts in a compiled program, in XLA's thunk sequence and
in the PTX, its one error line where JAX's CUDA plugin is missing (as in CI), and, where the
plugin is installed, the train step compiled for an H100 as one CUDA graph with no loop that
the host drives and no atomic update of memory."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_program.py")
# Cut from XLA's dump for the train step before λ's Beta draws lost their loops (41c4ae1).
THUNKS = os.path.join(ROOT, "tests", "data", "gpu_thunk_sequence_fixture.txt")
# Cut from the PTX of an LKCA layer's gradient while its matrix was a gather (tests/data).
PTX = os.path.join(ROOT, "tests", "data", "gpu_ptx_fixture.ptx")
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and (
  importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
)


@pytest.fixture(scope="module")
def gpu_program():
  spec = importlib.util.spec_from_file_location("gpu_program", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(*args, env=None):
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": "", **(env or {})},  # one CPU device: the suite forces 8
  )


def error_line(result) -> str:
  """The last line a refused run printed, after checking that it exited with code 2."""
  assert result.returncode == 2, result.stderr[-2000:]
  return [line for line in result.stderr.splitlines() if line.strip()][-1]


def test_it_counts_a_programs_loops_and_which_of_them_know_their_trips(gpu_program):
  def loops(x):
    fixed = jax.lax.fori_loop(0, 5, lambda i, c: c * 2 + jnp.sin(c), x)  # 5 trips, known
    until = jax.lax.while_loop(lambda c: c.sum() < 100, lambda c: c * 2 + 1, x)  # data decides
    return fixed, until

  x = jnp.ones(4)
  found = gpu_program.program_kernels(jax.jit(loops).lower(x).compile().as_text())
  assert (found["while_loops"], found["while_loops_unknown_trips"]) == (2, 1)
  plain = gpu_program.program_kernels(
    jax.jit(lambda x: jnp.sin(x) @ x).lower(x).compile().as_text()
  )
  assert (plain["while_loops"], plain["while_loops_unknown_trips"]) == (0, 0)
  assert plain["kernels"] >= 1 and plain["kernels"] == sum(plain["by_instruction"].values())
  assert not {"parameter", "get-tuple-element", "tuple"} & set(plain["by_instruction"])


def test_it_reads_the_graphs_and_the_loops_the_host_drives_from_xlas_thunk_sequence(gpu_program):
  with open(THUNKS, encoding="utf-8") as f:
    found = gpu_program.host_thunks(f.read())
  # Three graphs with four loops between them, each loop's body a graph and a loop of its own.
  assert found["by_thunk"] == {"kWhile": 4, "kCommandBuffer": 3}
  assert (found["host_thunks"], found["command_buffers"], found["host_loops"]) == (7, 3, 8)
  with pytest.raises(ValueError, match="format"):
    gpu_program.host_thunks("condition:\n  body:\n")


def test_it_finds_the_kernels_that_update_memory_atomically_in_ptx(gpu_program):
  with open(PTX, encoding="utf-8") as f:
    ptx = f.read()
  # The scatter-add's kernel adds its float by a compare-and-swap loop; the gather's reads.
  assert gpu_program.atomic_kernels(ptx) == ["input_scatter_fusion"]
  predicated = ptx.replace("\tatom.relaxed", "\t@%p1 red.relaxed").replace(
    "input_scatter_fusion", "scatter"
  )
  assert gpu_program.atomic_kernels(predicated) == ["scatter"]
  assert gpu_program.atomic_kernels(ptx.replace("atom.relaxed", "ld.relaxed")) == []


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_is_one_error_line_naming_the_install(tmp_path):
  out = tmp_path / "gpu.json"
  result = run("--models", "lkca_t", "--out", str(out))
  line = error_line(result)
  assert line.startswith("error: ") and f"jax[cuda13]=={jax.__version__}" in line
  assert not out.exists()


def test_with_several_cpu_devices_it_is_one_error_line_before_any_work(tmp_path):
  out = tmp_path / "gpu.json"
  result = run("--out", str(out), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  line = error_line(result)
  assert line.startswith("error: ") and "xla_force_host_platform_device_count" in line
  assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin (never a dependency)")
def test_the_train_step_compiled_for_an_h100_is_one_cuda_graph(tmp_path):
  out = tmp_path / "gpu.json"
  result = run("--models", "lkca_t", "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(out.read_text())["results"]["lkca_t"]
  step = found["train_step"]
  assert step["while_loops_unknown_trips"] == 0
  assert step["kernels"] > 100  # a whole step: forward, backward, optimizer
  assert (step["host_thunks"], step["command_buffers"], step["host_loops"]) == (1, 1, 0)
  # No float sum in no fixed order: the step's results repeat from run to run.
  assert step["atomic_kernels"] == 0, step["atomic_kernel_names"]
  assert found["augment"]["while_loops_unknown_trips"] == 0


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin (never a dependency)")
def test_a_target_config_xla_cannot_read_is_one_error_line_naming_it(tmp_path):
  target, out = tmp_path / "gpu.txtpb", tmp_path / "gpu.json"
  target.write_text("gpu_device_info { core_count: many }\n")
  result = run("--target_config", str(target), "--out", str(out))
  assert error_line(result).startswith(
    f"error: --target_config={target} is not a GpuTargetConfigProto"
  )
  assert not out.exists()
