"""The XLA flags lkca_jax can set: this file is the one place, applied when the package is imported.

LKCA_JAX_FAST_CPU=1 adds `--xla_cpu_experimental_ynn_fusion_type=dot`, which
narrows what XLA:CPU (jaxlib 0.10) hands to the YNNPACK library to matrix
products: by default it also takes reductions, and a YNNPACK reduction needs
every broadcast operand written out in full first. Since LayerNorm computes its
statistics with one multi-operand reduction that stays with XLA
(layers/common.py), most of that cost is gone without the flag; what is left
is measured in the README, "Speed" (nothing measurable on the 2-core CPU since
then). It is off by default: it no longer helps, and before that change it
loosened a guarantee, a run trained among several (`num_runs`, `sweep`) equal
to the single run of its seed to 1e-5 (the short sweep test's largest weight
difference was 1.8e-5 once; it is 1.9e-6 now with the flag, 2.3e-6 without).
It changes nothing off the CPU.

XLA aborts the process on a flag it does not know, and experimental flags get
renamed, so the flags are added only for the jaxlib versions they were checked
with. A flag already named in $XLA_FLAGS is left as the user set it. Flags are
read when jax first starts a backend, so importing lkca_jax after that changes
nothing.
"""

from __future__ import annotations

import importlib.metadata
import os

FAST_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
CHECKED_JAXLIB = ("0.10.",)  # version prefixes the flags were checked with


def flags_for(jaxlib_version: str | None, *, fast_cpu: bool) -> tuple[str, ...]:
  """The flags to add for this jaxlib version (none for an unchecked one)."""
  if fast_cpu and jaxlib_version and jaxlib_version.startswith(CHECKED_JAXLIB):
    return FAST_CPU_FLAGS
  return ()


def with_flags(xla_flags: str, flags: tuple[str, ...]) -> str:
  """`xla_flags` plus every flag of `flags` whose name it does not already set."""
  present = {f.split("=", 1)[0] for f in xla_flags.split()}
  added = [f for f in flags if f.split("=", 1)[0] not in present]
  return " ".join([xla_flags.strip(), *added]).strip()


def apply(environ=os.environ) -> None:
  """Adds the chosen flags to $XLA_FLAGS in `environ` (before jax starts a backend)."""
  fast_cpu = environ.get("LKCA_JAX_FAST_CPU", "0") == "1"
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags = flags_for(version, fast_cpu=fast_cpu)
  if flags:
    environ["XLA_FLAGS"] = with_flags(environ.get("XLA_FLAGS", ""), flags)
