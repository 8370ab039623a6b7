"""Test-session setup: 8 virtual CPU devices, so multi-device paths run on CPU.

The flag must be set before jax is first imported, which is why it lives here.
The same goes for a compilation cache shared by the session's processes: many
tests start main.py or a tool on the same small configs, and a cached
executable spares each of them the compilation (the same executable runs either
way). It lives under the system temp dir, one per user, and is kept between
sessions: its keys cover the program, the jax version and the flags.
"""

import faulthandler
import os
import sys
import tempfile

import pytest

# Most of the suite's CPU time is XLA compiling small programs that then run for
# milliseconds. Two code-generation settings of XLA's CPU backend cut that compile
# time roughly in half: LLVM's cheapest optimization level, and the elemental IR
# emitters in place of the newer MLIR fusion emitters. Both change only how the same
# HLO program becomes machine code, not the program; every numeric check still holds
# to its own error bound. A jax whose XLA no longer knows a flag stops at start-up
# naming it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# For processes that run one program for hundreds of steps (tests/test_main.py's main.py
# runs): LLVM's -O1 compiles a little slower and steps about twice as fast, sooner done
# there than -O0 (and than XLA's default level, which compiles slower still).
FAST_STEPS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"lkca_jax_tests_jax_cache_{os.getuid()}"),
)
# Every program, however quick to compile: a process that finds them all cached starts
# training about a second sooner than one that recompiles the small ones.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler set-up, which dumps all threads
def pytest_configure(config):
  """A crash (SIGSEGV, SIGABRT) reports the stack of the thread that crashed, alone.

  pytest dumps every Python thread, the main thread last, and CI shows only the tail of
  the output: a worker crash there named the main thread's frames whichever thread had
  crashed. The thread that crashed is the one to read; a native thread of XLA's shows as
  "<no Python frame>"."""
  faulthandler.enable(file=os.dup(_stderr_fileno()), all_threads=False)


def _stderr_fileno() -> int:
  try:
    return sys.stderr.fileno()
  except (AttributeError, ValueError):  # an xdist worker's sys.stderr is no file
    return sys.__stderr__.fileno()
