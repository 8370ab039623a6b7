"""The package's XLA flags: set on import when asked, the user's own kept, and seen by XLA."""

from lkca_jax import xla_flags
from tests.helpers import run_python

FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# Prints $XLA_FLAGS after `import lkca_jax`, then how many computations of a small compiled
# gradient run a matrix product and the tanh after it together (a YNNPACK dot fusion).
PROBE = """
import os, re
import lkca_jax, jax, jax.numpy as jnp
f = lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w.T)
text = jax.jit(jax.grad(f)).lower(jnp.ones((32, 32)), jnp.ones((8, 16, 32))).compile().as_text()
computations = re.split(r"\\n(?=%|ENTRY)", text)
print("flags:", os.environ.get("XLA_FLAGS", ""))
print("fusions:", sum(1 for c in computations if " dot(" in c and " tanh(" in c))
"""


def probe(**env):
  stdout = run_python(PROBE, unset=("XLA_FLAGS", "LKCA_JAX_FAST_CPU"), **env)
  lines = dict(line.split(":", 1) for line in stdout.splitlines() if ":" in line)
  return lines["flags"].strip(), int(lines["fusions"])


def test_fast_cpu_adds_the_flag_on_import_and_xla_fuses_products_with_it():
  flags, fused = probe(LKCA_JAX_FAST_CPU="1")
  assert f"{FLAG}=dot" in flags.split() and fused == 1
  flags, fused = probe()  # the default: XLA's own choices
  assert FLAG not in flags and fused == 0


def test_the_users_own_xla_flags_are_kept():
  mine = f"--xla_force_host_platform_device_count=2 {FLAG}=reduce"
  flags, _ = probe(XLA_FLAGS=mine, LKCA_JAX_FAST_CPU="1")
  assert flags.split() == ["--xla_force_host_platform_device_count=2", f"{FLAG}=reduce"]
  flags, _ = probe(XLA_FLAGS="--xla_force_host_platform_device_count=2", LKCA_JAX_FAST_CPU="1")
  assert flags.split() == ["--xla_force_host_platform_device_count=2", f"{FLAG}=dot"]


def test_unchecked_jaxlib_versions_get_no_flags():
  # XLA aborts on a flag it does not know; only checked versions get them.
  assert xla_flags.flags_for("0.10.2", fast_cpu=True) == xla_flags.FAST_CPU_FLAGS
  assert xla_flags.flags_for("0.10.2", fast_cpu=False) == ()
  assert xla_flags.flags_for("0.11.0", fast_cpu=True) == ()
  assert xla_flags.flags_for(None, fast_cpu=True) == ()
