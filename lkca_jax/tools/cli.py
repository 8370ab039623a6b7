"""Shared command-line handling: one-line errors with exit code 2, before any work.

Used by main.py and the `python -m lkca_jax.*` commands, which all take an
ml_collections `--config` file with `--config.KEY=VALUE` overrides.
"""
from __future__ import annotations

import sys

USAGE_ERROR = 2


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with the usage-error code."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def parse_flags(argv, *, program: str = "main.py"):
  """absl flag parsing whose every failure is one `error:` line and exit 2.

  Covers unknown flags, bad values, unknown `--config.KEY` overrides, a config
  file that is missing or fails to load, and a missing `--config`.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
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
    fail(f"bad --config override: {key} is not a key of this config or has the wrong type; "
         "the keys are in configs/default.py")
  if config is None:
    fail("--config is required, e.g. --config configs/digits.py")
  return rest


def parser_for(program: str):
  """A `flags_parser` for absl's app.run naming `program` in its hints."""
  return lambda argv: parse_flags(argv, program=program)
