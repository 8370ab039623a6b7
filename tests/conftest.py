"""Test-session setup: 8 virtual CPU devices, so multi-device paths run on CPU.

The flag must be set before jax is first imported, which is why it lives here.
The same goes for a compilation cache shared by the session's processes: many
tests start main.py or a tool on the same small configs, and a cached
executable spares each of them the compilation (the same executable runs either
way). It lives under the system temp dir, one per user, and is kept between
sessions: its keys cover the program, the jax version and the flags.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"lkca_jax_tests_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
