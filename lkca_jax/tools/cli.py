"""What every command shares: the process it owns, flag parsing, one way to fail, machine
info, where it writes and its output files.

A command (main.py, `python -m lkca_jax.tools.NAME`, `python benchmarks/NAME.py`) is one
file with its flags and a `main`:

    '''What it does, and how it is run:

        python -m lkca_jax.tools.NAME [--steps 10]
    '''

    from absl import flags

    from lkca_jax.tools import cli

    FLAGS = flags.FLAGS


    def define_flags() -> None:
      flags.DEFINE_integer("steps", 10, "Steps to take.", lower_bound=1)


    def main(argv) -> None:
      from lkca_jax import train  # the heavy imports here, once the flags are good
      ...
      cli.fail("what is wrong, and the fix")  # bad input found by main


    if __name__ == "__main__":
      cli.run(main, define_flags=define_flags)

Flags are defined in `define_flags`, which `run` calls, so that importing the module (as
the tests do, several in one process) registers none. `run` owns the process: the
host-memory settings (`lkca_jax.host_memory`) first, then the flags. `--help` and
`--helpfull` print the help and exit 0. Every bad input (an unknown flag, a bad value, a
positional argument, a --config that cannot load, whatever `main` passes to `fail`) is one
`error:` line on stderr, as its last line, and exit code 2. Every output file is written
whole through `lkca_jax.files.write_atomic`. (benchmarks/gpu_check.py, which must run on
the standard library alone, keeps the same contract with argparse.)

A flag that names where the command writes is defined with `define_output_dir` or
`define_output_file` (its help says so, and `output_flags` finds it), and checked by
`output_dir` or `output_file` in `main` once the other input is known good (bad input
leaves nothing behind) and before any expensive work: a regular file given as a directory,
a directory given as a file, or a place that cannot be written is one `error:` line naming
it. The check is a real write, as for main.py's --workdir (`lkca_jax.workdir.prepare`).
"""

from __future__ import annotations

import difflib
import inspect
import io
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from etils import epath

from lkca_jax import adapters, host_memory
from lkca_jax import workdir as workdir_lib
from lkca_jax.files import cache_dir, write_atomic, write_json

__all__ = [
  "OUTPUT_NOTES",
  "USAGE_ERROR",
  "FailExit",
  "cpu_model",
  "define_output_dir",
  "define_output_file",
  "fail",
  "fail_training",
  "machine_info",
  "output_dir",
  "output_file",
  "output_flags",
  "parse_flags",
  "program_name",
  "run",
  "save_figure",
  "write_atomic",
  "write_json",
]

USAGE_ERROR = 2
INTERRUPTED = 128 + 2  # the shell's code for a process ended by SIGINT
# How an output flag's help ends; `output_flags` finds the flags by it.
OUTPUT_NOTES = {
  "dir": "(A directory, created if missing; checked before any work.)",
  "file": "(A file; its directory is created if missing; checked before any work.)",
}


class _QuietLibraries(logging.Filter):
  """Keeps libraries' INFO chatter out of a command's log (their warnings still show):
  orbax's lines at every save and restore, TFDS's "Load dataset info" at every split it
  opens, and jax's probe of the backends a machine lacks ("Unable to initialize backend
  'tpu'"), which reads like an error. TFDS's lines while preparing a dataset stay."""

  def filter(self, record):
    path = record.pathname.replace(os.sep, "/")
    chatter = "/orbax/" in path or path.endswith(
      ("/jax/_src/xla_bridge.py", "/tensorflow_datasets/core/dataset_info.py")
    )
    return record.levelno >= logging.WARNING or not chatter


class FailExit(SystemExit):
  """Raised by `fail` once its `error:` line is out; `run` ends the process on it."""


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
  """Prints `error: message` on stderr and raises FailExit with `code`: 2 (the default) for
  bad input, 1 for a run that failed on its own (a diverged loss, a full disk).

  Under `run` nothing prints after that line: `run` ends the process at once. Elsewhere (a
  test calling a command's function) it is an ordinary SystemExit.
  """
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise FailExit(code)


def fail_training(error: Exception) -> NoReturn:
  """`fail` for one of `lkca_jax.train.REPORTED_ERRORS`: exit 1 where the run failed on its
  own, 2 where its input (the config, data, checkpoint or workdir) is wrong or in use."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  fail(str(error), code=1 if isinstance(error, train.RUN_FAILURES) else USAGE_ERROR)


def run(
  main: Callable,
  program: str | None = None,
  *,
  define_flags: Callable[[], None] | None = None,
  arguments: bool = False,
) -> None:
  """Runs a command's absl `main` as the owner of its process.

  The host-memory settings first, before jax starts its threads; then `define_flags`;
  then the flags, parsed by `parse_flags` (`program`, default `program_name()`, is named in
  its hints; `arguments`: the command takes positional arguments, else they are an error).
  Ctrl-C ends it with one line and exit code 130, not a traceback from wherever it fell.
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  host_memory.apply()
  adapters.quiet_abandoned_reads()
  # On absl's handler, which both absl's and Python's loggers reach, before jax starts.
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  if define_flags is not None:
    define_flags()
  program = program or program_name()
  try:
    app.run(main, flags_parser=lambda argv: parse_flags(argv, program, arguments=arguments))
  except FailExit as e:
    _end_now(e.code)
  except KeyboardInterrupt:  # Ctrl-C outside a training loop, which stops at a step itself
    sys.stdout.flush()
    print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    _end_now(INTERRUPTED)


def _end_now(code: int) -> NoReturn:
  """Ends the process with `code` at once, its output flushed: the error line stays last.

  After a failed checkpoint read, orbax's abandoned reads leave tasks, coroutines and
  worker threads behind that report themselves at interpreter shutdown, restating the
  error at length. `os._exit` skips that shutdown (atexit handlers, finalizers, the join of
  non-daemon threads), none of which a usage error needs: every output file is written
  whole through `write_atomic` or not at all, and what is left running is abandoned work.
  It is what `lkca_jax.distributed.exit_on_failure` does for a failed process of a job.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def program_name() -> str:
  """How this process was started: `python -m PACKAGE.MODULE` or `python FILE`."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name and spec.name != "__main__":
    return f"python -m {spec.name}"
  return f"python {sys.argv[0]}"


def parse_flags(argv, program: str = "main.py", *, arguments: bool = False):
  """absl flag parsing whose every failure is one `error:` line and exit 2.

  Covers unknown flags, bad values, positional arguments (unless `arguments`), unknown
  `--config.KEY` overrides, a config file that is missing or fails to load, and a missing
  `--config` (for commands that define one). Returns argv less the flags.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  takes_config = "config" in flags.FLAGS
  problem = _config_file_problem(_config_file(argv)) if takes_config else None
  if problem:
    fail(f"could not load the --config file ({problem})")
  config = None
  try:
    rest = _parse_or_help(argv)
    if takes_config:
      config = flags.FLAGS.config
  except flags.Error as e:  # unknown flag, bad value
    message = str(e).strip()
    keys = " and the keys in configs/default.py" if takes_config else ""
    fail(f"{message.rstrip('.')}. See `{program} --helpfull`{keys}.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
    reason = _bad_override(argv) if takes_config else None
    reason = reason or f"--config override: {str(e).strip().splitlines()[0]}"
    fail(f"bad {reason}; the keys are in configs/default.py")
  if takes_config and config is None:
    fail("--config is required, e.g. --config configs/digits.py")
  if len(rest) > 1 and not arguments:
    settings = "--flag=VALUE" + (" or --config.KEY=VALUE" if takes_config else "")
    fail(f"unexpected arguments {rest[1:]}; pass settings as {settings}")
  return rest


def _config_file(argv) -> str | None:
  """The file the last `--config` of argv names."""
  found = None
  for arg, following in zip(argv, [*argv[1:], None], strict=True):
    if arg == "--config":
      found = following
    elif arg.startswith("--config="):
      found = arg.removeprefix("--config=")
  return found


def _config_alone(config_file: str):
  """What `config_file` (FILE or FILE:ARGUMENT) gives, loaded by a flag of its own so that
  nothing of the command's other flags mixes in; raises what loading it raised."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  alone, only_the_file = flags.FlagValues(), ["", f"--config={config_file}"]
  config_flags.DEFINE_config_file("config", flag_values=alone, sys_argv=only_the_file)
  alone(only_the_file)
  config = alone.config
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    config.keys()  # a config file that failed to load raises its error on first use
  return config


def _config_file_problem(config_file: str | None) -> str | None:
  """Why `config_file` does not give a config, in one line naming the fix; None if it does."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if config_file is None:
    return None
  path, _, argument = config_file.partition(":")
  try:
    config = _config_alone(config_file)
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    return f"{reason}; pass a config such as configs/digits.py"
  except flags.Error as e:  # get_config raised a ValueError or TypeError: its message
    reason = re.sub(r"^[\w.]+: ", "", str(e).strip().splitlines()[-1].strip())  # less its class
    if argument and "positional argument" in reason:
      reason += f"; ':{argument}' after the file is an argument to its get_config"
    return reason
  except SyntaxError as e:
    return f"SyntaxError: {e.msg} in {e.filename}, line {e.lineno}"
  except Exception as e:  # noqa: BLE001 -- whatever the file's own code raised, in one line
    if isinstance(e, AttributeError) and "get_config" in str(e):
      return f"{path} defines no get_config(), the function that returns its config"
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
  if config is None:
    return f"the get_config() of {path} returned None; return the config from it"
  return None


def _bad_override(argv) -> str | None:
  """Which `--config.KEY=VALUE` of argv names no key of the --config file's config, said
  with the nearest key; None when every one does (the library's message is then all
  there is). The file is loaded again, alone, by a flag of its own."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  config_file = _config_file(argv)
  if config_file is None:
    return None
  try:
    config = _config_alone(config_file)
  except Exception:  # noqa: BLE001 -- the library's message stands
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg.removeprefix("--").split("=", 1)[0]
    node, walked = config, "config"
    for key in path.split(".")[1:]:
      if not isinstance(node, ml_collections.ConfigDict):
        return (
          f"override --{path}: --{walked} is a {type(node).__name__} ({node!r}), not a "
          f"group of keys: set it as --{walked}=VALUE"
        )
      if key not in node:
        near = difflib.get_close_matches(key, list(node.keys()), n=1)
        hint = f"did you mean --{walked}.{near[0]}?" if near else f"it has {', '.join(node)}"
        return f"override --{path}: --{walked} has no key {key} ({hint})"
      node, walked = node[key], f"{walked}.{key}"
  return None


def _parse_or_help(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel

  try:
    return flags.FLAGS(argv)
  except SystemExit:  # absl's --help and --helpfull print the help, then exit 1
    sys.stdout.flush()
    raise SystemExit(0) from None  # asking for help is no failure


def default_workdir() -> str:
  """Where main.py trains for the --config given: workdirs/<config name>, or DIR itself
  for configs/workdir.py:DIR, the config read back from that run."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  path, _, argument = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
  if os.path.basename(path) == os.path.basename(workdir_lib.READ_BACK_CONFIG) and argument:
    return argument
  return os.path.join("workdirs", os.path.splitext(os.path.basename(path))[0])


# JAX's persistent compilation cache, as main.py keeps it by default: under cache_dir().
COMPILATION_CACHE = "xla"


def use_compilation_cache(directory: str | None, flag: str = "--compilation_cache") -> str | None:
  """Turns on JAX's persistent compilation cache for this process, before it compiles: a
  rerun or a resume of the same programs loads them instead of compiling them again.

  `directory` is a place checked as an output directory (`output_dir`), or "" to turn the
  cache off, or None: then $JAX_COMPILATION_CACHE_DIR where it is set (JAX reads it
  itself), else COMPILATION_CACHE under `cache_dir()` (left out, with a warning, where it
  cannot be made). Returns the directory in use, or None.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if directory == "":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if directory is not None:
    directory = str(output_dir(directory, flag))
  elif os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  else:
    directory = os.path.join(cache_dir(), COMPILATION_CACHE)
    try:
      workdir_lib.prepare(directory, flag=flag)
    except workdir_lib.WorkdirError as e:
      logging.getLogger(__name__).warning("no compilation cache: %s", e)
      return None
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def define_output_dir(name: str, default: str | None, help_text: str) -> None:
  """A string flag naming a directory the command writes; check it with `output_dir`."""
  _define_output(name, default, help_text, "dir")


def define_output_file(name: str, default: str | None, help_text: str) -> None:
  """A string flag naming a file the command writes; check it with `output_file`."""
  _define_output(name, default, help_text, "file")


def _define_output(name: str, default: str | None, help_text: str, kind: str) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  # Defined for the command that asked (two calls up), so that its --help lists the flag:
  # absl's --help shows only the flags of the module that defined them, and names the
  # program's own module by its path (sys.argv[0]), as absl does.
  command = inspect.currentframe().f_back.f_back.f_globals["__name__"]
  command = sys.argv[0] if command == "__main__" else command
  flags.DEFINE_string(name, default, f"{help_text} {OUTPUT_NOTES[kind]}", module_name=command)


def output_flags() -> dict[str, str]:
  """The defined flags that name where the command writes: name -> "dir" or "file"."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  found = {}
  for name in flags.FLAGS:
    help_text = flags.FLAGS[name].help or ""
    for kind, note in OUTPUT_NOTES.items():
      if help_text.endswith(note):
        found[name] = kind
  return found


def output_dir(path, flag: str) -> epath.Path:
  """`path` as a directory this process can write, created if missing; else `fail`s."""
  try:
    return workdir_lib.prepare(path, flag=flag)
  except workdir_lib.WorkdirError as e:
    fail(str(e))


def output_file(path, flag: str) -> epath.Path:
  """`path` as a file this process can write: no directory, in a directory it can write
  (created if missing); else `fail`s. The file itself is written later, whole."""
  path = epath.Path(path)
  if path.is_dir():
    fail(f"{flag}={path} is a directory; pass the path of a file to write")
  output_dir(path.parent, f"{flag}={path}: its directory")
  return path


def config_changes(config_flag, stated=frozenset()) -> dict:
  """{key: value} for each config key set on the command line (`--config.KEY=VALUE`) that
  changes what a run trains, in key order: not the keys in `stated` (a table's header
  states them), not the model overrides (stated with the model), not
  `run_files.SAME_TRAINING` (where data and outputs live, how often runs report). Values as
  JSON keeps them (tuples as lists)."""
  import json  # pylint: disable=import-outside-toplevel

  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from lkca_jax import run_files  # pylint: disable=import-outside-toplevel

  set_here = config_flags.get_override_values(config_flag)
  left_out = frozenset(stated) | run_files.SAME_TRAINING
  return {
    key: json.loads(json.dumps(value))
    for key, value in sorted(set_here.items())
    if key not in left_out and not key.startswith("model_overrides.")
  }


def format_config_changes(changes: dict) -> str:
  """`key`=value, ... of `config_changes`, as the tables' headers list them."""
  import json  # pylint: disable=import-outside-toplevel

  return ", ".join(f"`{key}`={json.dumps(value)}" for key, value in changes.items())


def check_presets(names: list[str]) -> None:
  """`fail`s unless `names` (a --models list) is non-empty and every name is a preset."""
  from lkca_jax import models  # pylint: disable=import-outside-toplevel

  unknown = [name for name in names if name not in models.PRESETS]
  if not names or unknown:
    fail(f"unknown model {unknown[0] if unknown else ''!r}; choose from {sorted(models.PRESETS)}")


def check_interpreter(flag: str, python: str, module: str, fix: str) -> None:
  """`fail`s unless `--flag=python` is an interpreter that imports `module` (another
  environment's side of a benchmark), naming `fix`: checked before any work, not after it."""
  import subprocess  # pylint: disable=import-outside-toplevel

  if not (os.path.isfile(python) and os.access(python, os.X_OK)):
    fail(f"--{flag}={python} is not an executable; {fix}")
  try:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
  except OSError as e:  # an executable file that is no program (no #! line, another machine's)
    fail(f"--{flag}={python} cannot be run ({e.strerror}); {fix}")
  if probe.returncode != 0:
    said = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
    fail(f"--{flag}={python} cannot import {module} ({said}); {fix}")


def cpu_model() -> str:
  """The CPU's model name and the flags that decide its fast paths (AVX-512, AMX)."""
  try:
    with open("/proc/cpuinfo") as f:
      first = f.read().split("\n\n")[0]  # the first processor's block
  except OSError:
    return "unknown"
  info = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
  info = {k.strip(): v.strip() for k, v in info.items()}
  wanted = [
    f for f in info.get("flags", "").split() if f.startswith(("avx512f", "amx", "avx512_bf16"))
  ]
  return f"{info.get('model name', 'unknown')} ({' '.join(wanted) or 'no AVX-512/AMX'})"


def cpus_in_use() -> str:
  """The CPUs this process may run on (fewer when pinned), of all: "CPUs 0,1 of 2"."""
  return f"CPUs {','.join(map(str, sorted(os.sched_getaffinity(0))))} of {os.cpu_count()}"


def machine_line(machine: dict, load_start: float, load_end: float) -> str:
  """The last line of a printed summary: the machine (`machine_info`) and the load."""
  return (
    f"machine: {machine['cpu_model']}, {machine['backend']} {machine['device_kind']} "
    f"x{machine['devices']}, {machine['cpu_count']} CPUs, jax {machine['jax']}, "
    f"load average {load_start:.2f} -> {load_end:.2f}"
  )


def hardware(machine: dict, devices: int) -> str:
  """What a table's runs used, from `machine_info`: the devices and, on the CPU, which CPU
  (its speed depends on the kind)."""
  if machine["backend"] == "cpu":
    return f"{devices}× cpu: {machine['cpu_model']}, {machine['cpus_usable']} CPUs"
  return f"{devices}× {machine['device_kind']} ({machine['backend']})"


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
    "cpus_usable": len(os.sched_getaffinity(0)),  # fewer than cpu_count when pinned
    "cpu_model": cpu_model(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "load_average_1m": round(os.getloadavg()[0], 2),
  }


def save_figure(figure, path, *, dpi: int = 150):
  """Saves a matplotlib figure as a PNG, atomically; returns the path."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  return write_atomic(path, buffer.getvalue())
