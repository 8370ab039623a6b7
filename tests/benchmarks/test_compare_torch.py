"""benchmarks/compare_torch.py refuses bad input, a Python without torch included, with one
`error:` line before either side runs, and ends a run whose port fails or prints no timing
with one; it writes nothing then. `--cpus` pins both sides and `--dtype` reaches both. (Its
timing needs torch, which is never installed here: /bin/false, this environment's own
Python, /bin/true and small shell scripts stand in for the port's interpreter, one of them
reporting the CPUs it may use.)"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

USABLE = sorted(os.sched_getaffinity(0))
HAS_TORCH = importlib.util.find_spec("torch") is not None  # never a dependency
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_torch.py")


def compare_torch(*args: str, timeout: int) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["--models=vit_9m"], "unknown model 'vit_9m'"),
    (["--forms=cpu,gpu"], "--forms must list"),
    (["--torch_python=/nonexistent/python"], "--torch_python=/nonexistent/python is not an"),
    (
      [f"--torch_python={sys.executable}", "--torch_script=/nonexistent/step.py"],
      "--torch_script=/nonexistent/step.py is not a file",
    ),
    (["--torch_python=/bin/false"], "--torch_python=/bin/false cannot import torch (exit code 1)"),
    pytest.param(
      [f"--torch_python={sys.executable}"],
      "cannot import torch (ModuleNotFoundError: No module named 'torch'); give a Python",
      marks=pytest.mark.skipif(HAS_TORCH, reason="this environment has torch"),
    ),
    (["--cpus=first"], "--cpus must list CPU ids (integers), got first"),
    (["--dtype=float16"], "--dtype"),
    ([f"--cpus={USABLE[-1] + 1}"], f"CPU {USABLE[-1] + 1} is not one this process may run on"),
  ],
)
def test_bad_input_is_one_error_line_before_any_run(tmp_path, args, message):
  out = tmp_path / "compare.json"
  result = compare_torch(*args, f"--out={out}", timeout=120)
  assert result.returncode == 2, result.stdout + result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr
  assert result.stdout == ""  # neither side ran: each prints a line per run
  assert not out.exists()


# Interpreters for the port whose `import torch` probe succeeds: one exits with 3 on the
# port, the other runs it with this environment's Python.
PYTHON_WITH_A_FAILING_PORT = '#!/bin/sh\n[ "$1" = -c ] && exit 0\nexit 3\n'
PYTHON_RUNNING_THE_PORT = f'#!/bin/sh\n[ "$1" = -c ] && exit 0\nexec {sys.executable} "$@"\n'


def interpreter(tmp_path, script: str) -> str:
  path = tmp_path / "python"
  path.write_text(script)
  path.chmod(0o755)
  return str(path)


@pytest.mark.slow  # runs the JAX side first, as the rounds do
@pytest.mark.parametrize(
  "port_python, message",
  [
    (PYTHON_WITH_A_FAILING_PORT, "error: the PyTorch port exited with 3"),
    ("/bin/true", "error: no timing for ['vit_1m'] in the PyTorch port's output"),
  ],
)
def test_a_port_that_fails_or_prints_no_timing_ends_the_run_with_one_error_line(
  tmp_path, port_python, message
):
  if not os.path.isabs(port_python):  # a script's text
    port_python = interpreter(tmp_path, port_python)
  out = tmp_path / "compare.json"
  args = ["--models=vit_1m", "--batch=8", "--steps=1", f"--torch_python={port_python}"]
  result = compare_torch(*args, f"--torch_script={SCRIPT}", f"--out={out}", timeout=300)
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
  assert result.stdout.startswith("jax_auto")  # JAX had run: the failure is the port's
  assert not out.exists()


# The port's output line, its ms/step the number of CPUs it may use times 1,000; it
# keeps its flags beside itself.
PORT_SEEING_ITS_CPUS = """import json, os, sys
cpus = len(os.sched_getaffinity(0))
with open(os.path.join(os.path.dirname(__file__), "flags.json"), "w") as f:
  json.dump([a for a in sys.argv[1:] if a.startswith("--")], f)
for model in (a for a in sys.argv[1:] if not a.startswith("--")):
  print(f"torch {model} float32 batch 8: {1000.0 * cpus} ms/step, 0 img/s")
"""


@pytest.mark.slow  # two JAX runs
@pytest.mark.skipif(len(USABLE) < 2, reason="pinning to one CPU is only visible with two")
def test_cpus_pins_both_sides_to_the_cpus_listed_and_dtype_reaches_the_port(tmp_path):
  out, port = tmp_path / "compare.json", tmp_path / "port.py"
  port.write_text(PORT_SEEING_ITS_CPUS)
  args = ["--models=vit_1m", "--batch=8", "--steps=1", f"--cpus={USABLE[-1]}", f"--out={out}"]
  args += ["--dtype=bfloat16"]
  result = compare_torch(
    *args,
    f"--torch_python={interpreter(tmp_path, PYTHON_RUNNING_THE_PORT)}",
    f"--torch_script={port}",
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  results = json.loads(out.read_text())
  assert results["cpus"] == [USABLE[-1]]
  jax_runs = [r for r in results["runs"] if r["side"] == "jax_auto"]
  torch_runs = [r for r in results["runs"] if r["side"] == "torch"]
  assert [r["cpus_usable"] for r in jax_runs] == [1, 1]
  # 8 images in 1,000 ms: the port saw one CPU (two would be 2,000 ms, 4 images/s)
  assert [r["images_per_second"]["vit_1m"] for r in torch_runs] == [8.0, 8.0]
  assert results["dtype"] == "bfloat16"
  assert "--dtype=bfloat16" in json.loads((tmp_path / "flags.json").read_text())
  assert "batch 8, bfloat16" in result.stdout  # the summary names what was timed
