"""The malloc settings of lkca_jax/host_memory.py: set on import, and they stop the page faults.

A compiled function whose temporaries are one block far above glibc's mmap threshold runs a
few times in a fresh process; the probe counts the minor page faults of the later runs. With
malloc as glibc sets it up, each run maps the block anew and faults all of it in; with the
package's settings the block stays mapped.
"""

import os
import platform
import subprocess
import sys

import pytest

from lkca_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_PAGES = 8192 * 2048 * 4 // 4096  # the (8192, 2048) float32 temporary below: 16,384 pages

# numpy and jax are imported first, as a user's script would; lkca_jax before any computation.
PROBE = """
import resource
import numpy as np, jax, jax.numpy as jnp
import lkca_jax
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)  # tanh(x @ w) is the temporary block
x, w, v = jnp.ones((8192, 64)), jnp.ones((64, 2048)) / 64, jnp.ones((2048, 8))
for _ in range(2):
  f(x, w, v).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x, w, v).block_until_ready()
print("faults per run:", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""

glibc_only = pytest.mark.skipif(
  platform.libc_ver()[0] != "glibc", reason="the settings act on glibc's malloc only"
)


def faults_per_run(**env) -> float:
  environ = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
  result = subprocess.run(
    [sys.executable, "-c", PROBE],
    cwd=ROOT,
    env=dict(environ, **env),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return float(result.stdout.split("faults per run:")[1])


@glibc_only
def test_the_settings_keep_a_large_temporary_mapped_between_runs():
  kept = faults_per_run()
  remapped = faults_per_run(**{host_memory.ENV: "0"})
  # Without them every run faults the whole block in again; with them, a few stray pages.
  assert remapped > 0.9 * BLOCK_PAGES
  assert kept < 0.05 * BLOCK_PAGES


@glibc_only
def test_apply_reports_what_it_set():
  assert host_memory.apply({host_memory.ENV: "0"}) is False
  assert host_memory.apply({}) is True  # already set on import; setting again is harmless
