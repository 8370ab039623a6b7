"""benchmarks/compare_torch.py refuses bad input with one `error:` line before either side
runs, and ends a run whose port fails or prints no timing with one; it writes nothing then.
(Its timing needs torch, which is never installed here: /bin/false and /bin/true stand in
for a broken interpreter.)"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_torch.py")


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
  ],
)
def test_bad_input_is_one_error_line_before_any_run(tmp_path, args, message):
  out = tmp_path / "compare.json"
  result = subprocess.run(
    [sys.executable, SCRIPT, *args, f"--out={out}"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert result.returncode == 2, result.stdout + result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr
  assert result.stdout == ""  # neither side ran: each prints a line per run
  assert not out.exists()


@pytest.mark.slow  # runs the JAX side first, as the rounds do
@pytest.mark.parametrize(
  "interpreter, message",
  [
    ("/bin/false", "error: the PyTorch port exited with 1"),
    ("/bin/true", "error: no timing for ['vit_1m'] in the PyTorch port's output"),
  ],
)
def test_a_port_that_fails_or_prints_no_timing_ends_the_run_with_one_error_line(
  tmp_path, interpreter, message
):
  out = tmp_path / "compare.json"
  args = ["--models=vit_1m", "--batch=8", "--steps=1", f"--torch_python={interpreter}"]
  result = subprocess.run(
    [sys.executable, SCRIPT, *args, f"--torch_script={SCRIPT}", f"--out={out}"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
  assert result.stdout.startswith("jax_auto")  # JAX had run: the failure is the port's
  assert not out.exists()
