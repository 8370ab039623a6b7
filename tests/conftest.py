"""Test-session setup: 8 virtual CPU devices, so multi-device paths run on CPU.

The flag must be set before jax is first imported, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
