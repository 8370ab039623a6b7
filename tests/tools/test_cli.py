"""Every command shares one bad-input contract: one `error:` line, exit 2, no traceback.

Here the --config cases, through main.py (every command that takes --config parses it with
the same `cli.parse_flags`), `fail` with work left behind, and the exit code
`fail_training` gives each error the trainer reports (1 where the run itself failed);
test_commands.py checks --help, an unknown flag and unusable outputs for every command.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = [sys.executable, "main.py"]
CASES = [
  (["--config", "configs/nope.py"], "could not load the --config file"),
  (["--config", "configs/digits.py", "--config.no_such_key=1"], "--config has no key no_such_key"),
  (
    ["--config=configs/digits.py", "--config.train_steps=1"],
    "--config has no key train_steps (did you mean --config.num_train_steps?)",
  ),
  (
    ["--config", "configs/digits.py", "--config.model.name=vit"],
    "--config.model is a str ('lkca_t'), not a group of keys: set it as --config.model=VALUE",
  ),
  (["--config", "configs/digits.py", "--config.batch_size=abc"], "--config.batch_size=abc"),
  ([], "--config is required"),
  # A config file whose get_config raises: its message, less the traceback and class.
  (
    ["--config", "configs/workdir.py"],
    "could not load the --config file (configs/workdir.py reads a run's config: pass "
    "configs/workdir.py:WORKDIR)",
  ),
  # Flags read only beside another: refused alone, not dropped (the run would train).
  (
    ["--config", "configs/digits.py", "--checkpoint", "configs"],
    "--checkpoint is read only with --mode eval; to train from another run's weights pass "
    "--config.init_from=WORKDIR",
  ),
  (
    ["--config", "configs/digits.py", "--coordinator", "localhost:1234"],
    "--coordinator is read only with --multihost (one process per host); add it",
  ),
  (
    ["--config", "configs/digits.py", "--process_id=0", "--nolog_all_processes"],
    "--process_id is read only with --multihost",
  ),
  (
    ["--config", "configs/digits.py", "--log_all_processes"],
    "--log_all_processes is read only with --multihost",
  ),
  (
    ["--config", "configs/workdir.py:configs"],
    "could not load the --config file (configs is not a training workdir (no config.json))",
  ),
]


def test_bad_config_flags_are_one_line_and_exit_2():
  procs = [
    subprocess.Popen(
      MAIN + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for args, _ in CASES
  ]
  for proc, (args, message) in zip(procs, CASES, strict=True):
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, (args, err[-1500:])
    assert "Traceback" not in err, (args, err[-1500:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (args, lines[-1])


# Config files that do not give a config, each as its author would write it by mistake, and
# a pattern of the error line's reason.
BROKEN_CONFIGS = {
  # Python's wording of a syntax error changes between versions; where it is does not.
  "syntax.py": ("def get_config(:\n", "SyntaxError: .* in {path}, line 1\\)$"),
  "imports.py": (
    "import no_such_module_xyz\n",
    "ModuleNotFoundError: No module named 'no_such_module_xyz'",
  ),
  "no_function.py": ("LEARNING_RATE = 1e-3\n", "{path} defines no get_config\\(\\)"),
  "returns_nothing.py": (
    "from configs import digits\ndef get_config():\n  digits.get_config()\n",
    "the get_config\\(\\) of {path} returned None; return the config from it",
  ),
  "raises.py": (
    "def get_config():\n  raise RuntimeError('no GPU here')\n",
    "RuntimeError: no GPU here",
  ),
}


def test_a_config_file_that_gives_no_config_is_one_line_naming_why_and_exit_2(tmp_path):
  paths = {name: tmp_path / name for name in BROKEN_CONFIGS}
  for name, (text, _) in BROKEN_CONFIGS.items():
    paths[name].write_text(text)
  cases = [
    (["--config", str(paths[name])], expected) for name, (_, expected) in BROKEN_CONFIGS.items()
  ]
  # A file's ':ARGUMENT' goes to its get_config, which takes none here.
  cases.append(
    (["--config", "configs/digits.py:8"], "':8' after the file is an argument to its get_config")
  )
  procs = [
    subprocess.Popen(
      MAIN + args + [f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for args, _ in cases
  ]
  for proc, (args, expected) in zip(procs, cases, strict=True):
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, (args, err[-1500:])
    assert "Traceback" not in err, (args, err[-1500:])
    pattern = expected.format(path=re.escape(args[1]))
    assert lines[-1].startswith("error: could not load the --config file ("), (args, lines[-1])
    assert re.search(pattern, lines[-1]), (args, lines[-1])
  assert not (tmp_path / "run").exists()


# What orbax's abandoned reads leave for the interpreter's shutdown after a failed restore:
# a failed task nobody awaited, a coroutine never awaited, a log line from a worker thread.
LEFT_BEHIND = """
import asyncio, threading, time
from absl import logging as absl_logging
from lkca_jax.tools import cli

async def read():
  raise ValueError("OUT_OF_RANGE: byte range not valid")

def main(argv):
  loop = asyncio.new_event_loop()
  task = loop.create_task(read())
  loop.run_until_complete(asyncio.sleep(0.01))
  never_awaited = read()
  threading.Thread(target=lambda: (time.sleep(0.3), absl_logging.error("late worker"))).start()
  print("restoring", flush=True)
  cli.fail("no checkpoint can be restored")

cli.run(main)
"""


def test_fail_is_the_last_line_even_with_work_left_behind():
  result = subprocess.run(
    [sys.executable, "-c", LEFT_BEHIND], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr
  assert lines == ["error: no checkpoint can be restored"], result.stderr
  assert result.stdout == "restoring\n"  # what the command printed before is kept


# Ctrl-C while a command works outside a training loop (loading data, compiling): the
# interrupt lands wherever the main thread is, here in a jitted function's first call.
INTERRUPTED = """
import os, signal
import jax, jax.numpy as jnp
from lkca_jax.tools import cli

# Python's own handler, whatever the test runner's workers left (they may ignore SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)

def main(argv):
  print("compiling", flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  while True:
    jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()

cli.run(main)
"""


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130():
  result = subprocess.run(
    [sys.executable, "-c", INTERRUPTED], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 130, result.stderr[-3000:]
  assert lines == ["stopped by SIGINT (Ctrl-C)"], result.stderr[-3000:]
  assert result.stdout == "compiling\n"


def test_fail_outside_run_is_an_ordinary_exit_with_the_line(capsys):
  from lkca_jax.tools import cli

  with pytest.raises(SystemExit) as exit_info:
    cli.fail("--steps must be at least 1")
  assert exit_info.value.code == cli.USAGE_ERROR
  assert capsys.readouterr().err == "error: --steps must be at least 1\n"


def test_fail_training_exits_1_for_a_failed_run_and_2_for_bad_input(capsys):
  from lkca_jax import checkpoint, config_checks, distributed, train, workdir
  from lkca_jax.tools import cli

  expected = {
    config_checks.ConfigError: 2,
    checkpoint.CheckpointError: 2,
    distributed.MismatchError: 2,
    workdir.WorkdirError: 2,
    train.NonFiniteLossError: 1,  # every seed diverged
    train.WriteFailedError: 1,  # a full disk
  }
  assert set(expected) == set(train.REPORTED_ERRORS)  # a new error class gets its code here
  for error_class, code in expected.items():
    with pytest.raises(SystemExit) as exit_info:
      cli.fail_training(error_class(f"{error_class.__name__} named"))
    assert exit_info.value.code == code, error_class
    assert capsys.readouterr().err == f"error: {error_class.__name__} named\n"


def test_an_interpreter_is_checked_to_import_its_module_before_any_work(capsys, tmp_path):
  from lkca_jax.tools import cli

  cli.check_interpreter("other_python", sys.executable, "json", "give another")  # no exit
  assert capsys.readouterr().err == ""
  not_a_file, no_program = str(tmp_path / "python"), tmp_path / "notes.txt"
  no_program.write_text("not a program\n")
  no_program.chmod(0o755)
  cases = {
    (not_a_file, "json"): f"--other_python={not_a_file} is not an executable; give another",
    (str(tmp_path), "json"): f"--other_python={tmp_path} is not an executable; give another",
    (str(no_program), "json"): (
      f"--other_python={no_program} cannot be run (Exec format error); give another"
    ),
    (sys.executable, "no_such_module"): (
      f"--other_python={sys.executable} cannot import no_such_module (ModuleNotFoundError: "
      "No module named 'no_such_module'); give another"
    ),
    (
      "/bin/false",
      "json",
    ): "--other_python=/bin/false cannot import json (exit code 1); give another",
  }
  for (python, module), message in cases.items():
    with pytest.raises(SystemExit) as exit_info:
      cli.check_interpreter("other_python", python, module, "give another")
    assert exit_info.value.code == cli.USAGE_ERROR
    assert capsys.readouterr().err == f"error: {message}\n"


# ml_collections loads a config file with importlib's deprecated load_module (its warning).
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_changes_are_the_training_keys_set_on_the_command_line():
  from absl import flags
  from ml_collections import config_flags

  from lkca_jax.tools import cli

  argv = [
    "prog",
    "--config=configs/digits.py",
    "--config.optimizer.learning_rate=0.002",
    "--config.augment.erasing_area=(0.1,0.2)",
    "--config.batch_size=32",  # stated by the caller's header
    "--config.model_overrides.depth=2",  # stated with the model
    "--config.num_devices=1",  # leaves the training as it is
    "--config.log_every_steps=5",
    "--config.dataset.manual_dir=/data",
    "--config.init_from=/runs/pretrained",  # a start from other weights is a change
  ]
  values = flags.FlagValues()  # a parser of its own: the process's flags stay as they are
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
  values(argv)
  assert cli.config_changes(values["config"], {"batch_size"}) == {
    "augment.erasing_area": [0.1, 0.2],
    "init_from": "/runs/pretrained",
    "optimizer.learning_rate": 0.002,
  }
  assert cli.config_changes(values["config"], {"batch_size", "init_from"}) == {
    "augment.erasing_area": [0.1, 0.2],
    "optimizer.learning_rate": 0.002,
  }
