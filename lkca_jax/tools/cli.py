"""What every command shares: the process it owns, flag parsing, one way to fail, machine
info, output files.

Used by main.py and the `python -m lkca_jax.tools.*` commands, each started by `run`. A bad input is
one `error:` line on stderr and exit code 2, before any work; every output
file is written whole through `lkca_jax.files.write_atomic`.
"""

from __future__ import annotations

import io
import os
import platform
import sys

from lkca_jax import host_memory
from lkca_jax.files import write_atomic, write_json

__all__ = [
  "USAGE_ERROR",
  "fail",
  "machine_info",
  "parse_flags",
  "parser_for",
  "run",
  "save_figure",
  "write_atomic",
  "write_json",
]

USAGE_ERROR = 2


def fail(message: str) -> None:
  """Prints `error: message` on stderr, as its last line, and exits with the usage-error code."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  _silence_shutdown()
  sys.exit(USAGE_ERROR)


def _silence_shutdown() -> None:
  """Keeps the interpreter's shutdown from printing after the error line.

  A failed checkpoint read leaves orbax's other reads abandoned; when they are
  collected at exit they report themselves (an unretrieved task's exception,
  a never-awaited coroutine, a log line from a worker thread), restating the
  error already printed, and would bury it. Some of those are written by the
  interpreter's finalization, past any Python-level filter, so the stderr file
  descriptor itself is pointed at /dev/null.
  """
  sys.stderr.flush()
  try:
    fd = sys.stderr.fileno()
  except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a file
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, fd)
  os.close(devnull)


def parse_flags(argv, *, program: str = "main.py"):
  """absl flag parsing whose every failure is one `error:` line and exit 2.

  Covers unknown flags, bad values, unknown `--config.KEY` overrides, a config
  file that is missing or fails to load, and a missing `--config` (for commands
  that define one).
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel

  takes_config = "config" in flags.FLAGS
  config = None
  try:
    rest = flags.FLAGS(argv)
    if takes_config:
      config = flags.FLAGS.config
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      config.keys()  # a config file that failed to load raises its error on first use
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    fail(f"could not load the --config file ({reason}); pass a config such as configs/digits.py")
  except flags.Error as e:  # unknown flag, bad value
    fail(f"{e}. See `{program} --helpfull` and the keys in configs/default.py.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
    key = str(e).strip("\"'")
    fail(
      f"bad --config override: {key} is not a key of this config or has the wrong type; "
      "the keys are in configs/default.py"
    )
  if takes_config and config is None:
    fail("--config is required, e.g. --config configs/digits.py")
  return rest


def parser_for(program: str):
  """A `flags_parser` for absl's app.run naming `program` in its hints."""
  return lambda argv: parse_flags(argv, program=program)


def run(main, program: str) -> None:
  """Runs a command's absl `main` as the owner of its process: the host-memory settings
  (`lkca_jax.host_memory`) first, before jax starts its threads, then the flags, parsed by
  `parse_flags` with `program` named in its hints."""
  from absl import app  # pylint: disable=import-outside-toplevel

  host_memory.apply()
  app.run(main, flags_parser=parser_for(program))


def machine_info() -> dict:
  """The machine a number was measured on, with the 1-minute load average now."""
  import jax  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "load_average_1m": round(os.getloadavg()[0], 2),
  }


def save_figure(figure, path, *, dpi: int = 150):
  """Saves a matplotlib figure as a PNG, atomically; returns the path."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  return write_atomic(path, buffer.getvalue())
