"""The malloc settings of lkca_jax/host_memory.py: set on import, and they stop the page faults.

A compiled function whose temporaries are one block far above glibc's mmap threshold runs
several times in a fresh process, and the probe counts each warm run's minor page faults.
With malloc as glibc sets it up, each run maps the block anew and faults all of it in; with
the package's settings the block stays mapped.
"""

import platform

import pytest

from lkca_jax import host_memory
from tests.helpers import run_python

BLOCK_PAGES = 8192 * 2048 * 4 // 4096  # the (8192, 2048) float32 temporary below: 16,384 pages

# numpy and jax are imported first, as a user's script would; lkca_jax before any computation.
PROBE = """
import resource
import numpy as np, jax, jax.numpy as jnp
import lkca_jax
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)  # tanh(x @ w) is the temporary block
x, w, v = jnp.ones((8192, 64)), jnp.ones((64, 2048)) / 64, jnp.ones((2048, 8))
for _ in range(4):  # the heap grows to its steady size over the first few runs
  f(x, w, v).block_until_ready()
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w, v).block_until_ready()
  print("faults:", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
"""


glibc_only = pytest.mark.skipif(
  platform.libc_ver()[0] != "glibc", reason="the settings act on glibc's malloc only"
)


def fewest_faults_in_a_run(**env) -> int:
  """The fewest over 7 runs. Without the settings every run maps the block anew; with them
  a run now and then still maps one, when it starts before the last run's block is freed."""
  stdout = run_python(PROBE, unset=(host_memory.ENV,), **env)
  faults = [int(line.split(":")[1]) for line in stdout.splitlines() if "faults:" in line]
  assert len(faults) == 7, stdout
  return min(faults)


@glibc_only
def test_the_settings_keep_a_large_temporary_mapped_between_runs():
  kept = fewest_faults_in_a_run()
  remapped = fewest_faults_in_a_run(**{host_memory.ENV: "0"})
  # Without them every run faults the whole block in again; with them, a few stray pages.
  assert remapped > 0.9 * BLOCK_PAGES
  assert kept < 0.05 * BLOCK_PAGES


@glibc_only
def test_apply_reports_what_it_set():
  assert host_memory.apply({host_memory.ENV: "0"}) is False
  assert host_memory.apply({}) is True  # already set on import; setting again is harmless
