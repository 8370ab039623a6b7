"""lkca_jax/host_memory.py: importing the package leaves the process as it was; the commands'
entry point (`cli.run`) applies the malloc settings, which stop the per-step page faults.

Both are shown by behaviour in fresh interpreters: how much of a freed 64 MiB block stays
resident, and how many pages a compiled function's large temporary faults in per run.
"""

import platform

import pytest

from lkca_jax import host_memory
from tests.helpers import run_python

BLOCK_PAGES = 8192 * 2048 * 4 // 4096  # the (8192, 2048) float32 temporary below: 16,384 pages

glibc_only = pytest.mark.skipif(
  platform.libc_ver()[0] != "glibc", reason="the settings act on glibc's malloc only"
)

# Resident MiB kept after a 64 MiB block is written and freed. glibc serves a block that
# large with its own mmap and unmaps it on free, so nothing stays; with the settings it
# comes from the heap, which is never trimmed, so all of it stays.
RETAINED = """
import gc, os
import numpy as np
def resident_mib():
  return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = np.ones(64 * 2**20, np.uint8)
before_free = resident_mib()
del block
gc.collect()
print("retained:", round(64 - (before_free - resident_mib()), 1))
"""

# Imports the modules one after another, each time comparing with the state before the
# first: a module that changed anything shows at the import that first loads it.
STATE = """
import importlib, logging, os, sys
import jax
def state():
  root = logging.getLogger()
  return (os.environ.get("XLA_FLAGS"), root.level, list(root.handlers),
          logging.getLogger("jax").level, jax.config.jax_enable_x64,
          jax.config.jax_default_matmul_precision, sorted(os.environ))
before = state()
for name in {modules}:
  importlib.import_module(name)
  print(name, "same state:", state() == before)
"""
IMPORTED = ("lkca_jax", "lkca_jax.layers", "lkca_jax.models")


def retained_mib(prefix: str, **env) -> float:
  stdout = run_python(prefix + RETAINED, unset=(host_memory.ENV,), **env)
  return float(stdout.split("retained:")[1])


@glibc_only
def test_importing_the_package_leaves_malloc_as_it_was():
  plain = retained_mib("")
  imported = retained_mib("import lkca_jax\nfrom lkca_jax.layers import LKCA\n")
  assert plain < 4 and imported < 4  # the freed block went back to the system


@glibc_only
def test_the_entry_point_keeps_freed_memory_mapped_and_can_be_turned_off():
  entry = "from lkca_jax.tools import cli\ncli.host_memory.apply()\n"
  assert retained_mib(entry) > 60
  assert retained_mib(entry, **{host_memory.ENV: "0"}) < 4


def test_importing_changes_no_xla_flags_logging_config_or_environment():
  """The package, its layers (LKCA's home) and its models, each imported in turn."""
  out = run_python(STATE.format(modules=IMPORTED), unset=("XLA_FLAGS",)).splitlines()
  assert out == [f"{name} same state: True" for name in IMPORTED], out


def test_commands_start_through_the_entry_point():
  """main.py and every command module end in `cli.run(main, ...)`, which applies the settings."""
  from pathlib import Path  # pylint: disable=import-outside-toplevel

  root = Path(__file__).resolve().parent.parent
  tools = sorted((root / "lkca_jax" / "tools").glob("*.py"))
  commands = [root / "main.py", *(p for p in tools if p.name != "cli.py")]  # cli: their part
  started = [p.name for p in commands if "\n  cli.run(main" in p.read_text()]
  assert set(started) == {p.name for p in commands if 'if __name__ == "__main__"' in p.read_text()}


# A compiled function with one large temporary, run warm; each run's minor page faults.
FAULTS = """
import resource
import numpy as np, jax, jax.numpy as jnp
from lkca_jax import host_memory
if {apply}:
  host_memory.apply()
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)  # tanh(x @ w) is the temporary block
x, w, v = jnp.ones((8192, 64)), jnp.ones((64, 2048)) / 64, jnp.ones((2048, 8))
for _ in range(4):  # the heap grows to its steady size over the first few runs
  f(x, w, v).block_until_ready()
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w, v).block_until_ready()
  print("faults:", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
"""


def fewest_faults_in_a_run(apply: bool) -> int:
  """The fewest over 7 runs. Without the settings every run maps the block anew; with them
  a run now and then still maps one, when it starts before the last run's block is freed."""
  stdout = run_python(FAULTS.format(apply=apply), unset=(host_memory.ENV,))
  faults = [int(line.split(":")[1]) for line in stdout.splitlines() if "faults:" in line]
  assert len(faults) == 7, stdout
  return min(faults)


@glibc_only
@pytest.mark.slow
def test_the_settings_keep_a_large_temporary_mapped_between_runs():
  assert fewest_faults_in_a_run(apply=False) > 0.9 * BLOCK_PAGES
  assert fewest_faults_in_a_run(apply=True) < 0.05 * BLOCK_PAGES


@glibc_only
def test_apply_reports_what_it_set():
  assert host_memory.apply({host_memory.ENV: "0"}) is False
  assert (
    run_python("from lkca_jax import host_memory\nprint(host_memory.apply())").strip() == "True"
  )
