"""How lkca_jax's commands have glibc's malloc keep freed memory: this file is the one place,
applied by the entry points that own their process (main.py and every command, through
`lkca_jax.tools.cli.run`), never on import: a library import must leave malloc as the
program that imports it set it up.

XLA:CPU gives each run of a compiled step its temporaries as one block (about 1 GB for an
lkca_b train step at batch 128) and frees it when the step ends. glibc serves a block that
large from a fresh `mmap` in the calling thread's arena and unmaps it on `free`, so every
step faults the whole block in again, page by page, and the kernel zeroes each page: on the
2-core CPU that was 286k page faults and 0.6 s of kernel time in every lkca_b step, about a
third of its wall time (docs/benchmarks.md). Three `mallopt` settings make such blocks come from
the main heap and stay mapped for the next step:

- one arena for every thread (`M_ARENA_MAX` 1), so XLA's worker threads use the main heap;
- no `mmap` for large requests (`M_MMAP_MAX` 0);
- no trimming of the heap's free top (`M_TRIM_THRESHOLD` -1).

The price is that the process keeps its peak heap mapped, as a training process does anyway,
and that all its threads share one arena: right for a process that trains, not for one that
merely imports the layers (a data loader, a server). They act only on glibc (Linux);
elsewhere, or with LKCA_JAX_KEEP_HOST_MEMORY=0 in the environment, malloc is left as it is.
They must be set before jax starts its CPU threads (threads started earlier keep their own
arenas, and the faults stay); a script of your own that trains can call `apply()` first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
ENV = "LKCA_JAX_KEEP_HOST_MEMORY"


def apply(environ=os.environ) -> bool:
  """Sets the three options unless $LKCA_JAX_KEEP_HOST_MEMORY is 0; True when glibc took all."""
  if environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
