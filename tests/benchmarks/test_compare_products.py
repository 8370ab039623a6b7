"""benchmarks/compare_products.py: the products it finds are the model's Linears, row for
row, and bad input is one `error:` line before any timing. (The PyTorch side needs torch,
which is never installed here: the end-to-end run times JAX alone, and small shell scripts
stand in for its interpreter.)"""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lkca_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_products.py")
HAS_TORCH = importlib.util.find_spec("torch") is not None  # never a dependency


def run(*args, cpus=None):
  """The command in a subprocess, pinned to `cpus` (as `taskset -c` would) when given."""
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
  )


def vit_linears(preset: str, batch: int) -> collections.Counter:
  """(rows, in, out) of a class-token ViT's Linears at 32×32 with 4×4 patches and 10
  classes, written from the architecture: patch embedding, qkv / proj / fc1 / fc2 per
  block, and a last block that computes only the class token's row (its keys and values
  still over every token), then the head."""
  p = models.PRESETS[preset]
  d, hidden, tokens = p.dim, int(p.dim * p.mlp_ratio), 8 * 8 + 1
  full = [(d, 3 * d), (d, d), (d, hidden), (hidden, d)]
  found = collections.Counter({(batch * 64, 4 * 4 * 3, d): 1})
  for k, n in full:
    found[(batch * tokens, k, n)] += p.depth - 1
  found[(batch, d, d)] += 2  # the class token's query and its projection
  found[(batch * tokens, d, 2 * d)] += 1  # keys and values of every token
  found[(batch, d, hidden)] += 1
  found[(batch, hidden, d)] += 1
  found[(batch, d, 10)] += 1
  return found


@pytest.mark.slow  # a subprocess that compiles and times 27 products
def test_it_times_every_linear_of_the_model_in_three_forms(tmp_path):
  out, last_cpu = tmp_path / "products.json", max(os.sched_getaffinity(0))
  args = ("--models=vit_1m", "--batch=2", "--repeats=1", "--sides=jax", f"--out={out}")
  result = run(*args, cpus={last_cpu})
  assert result.returncode == 0, result.stdout + result.stderr
  results = json.loads(out.read_text())
  assert results["cpus"] == [last_cpu]  # what it ran on, pinned
  summary = results["summary"]["vit_1m"]
  counts = collections.Counter(
    {
      tuple(int(s) for s in key.split("x")): row["count"]
      for key, row in summary["products"].items()
    }
  )
  assert counts == vit_linears("vit_1m", 2)
  for row in summary["products"].values():
    assert sorted(row["jax"]) == ["NN", "NT", "TN"]
    assert all(rate > 0 for rate in row["jax"].values())
  assert "torch" not in summary["step_ms"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--models=vit_9m"], "unknown model 'vit_9m'"),
    (["--sides=jax,gpu"], "--sides must list"),
    (["--torch_python=/nonexistent/python"], "--torch_python=/nonexistent/python is not an"),
    (["--torch_python=/bin/false"], "--torch_python=/bin/false cannot import torch (exit code"),
    pytest.param(
      [f"--torch_python={sys.executable}"],
      "cannot import torch (ModuleNotFoundError: No module named 'torch'); give a Python",
      marks=pytest.mark.skipif(HAS_TORCH, reason="this environment has torch"),
    ),
  ],
)
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, args, message):
  out = tmp_path / "products.json"
  result = run(*args, f"--out={out}")
  assert result.returncode == 2, result.stdout + result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr
  assert not out.exists()


@pytest.mark.slow  # runs the JAX side first, as the rounds do
def test_a_pytorch_side_that_fails_ends_the_run_with_one_error_line(tmp_path):
  out, python = tmp_path / "products.json", tmp_path / "python"
  # An interpreter whose `import torch` probe succeeds and whose PyTorch side exits with 3.
  python.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nexit 3\n')
  python.chmod(0o755)
  result = run(
    "--models=vit_1m", "--batch=2", "--repeats=1", f"--torch_python={python}", f"--out={out}"
  )
  assert result.returncode == 1, result.stdout + result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the PyTorch side exited with 3"), result.stderr
  # JAX had run: the failure is the PyTorch side's.
  assert result.stdout.splitlines()[0].startswith("jax ")
  assert not out.exists()
