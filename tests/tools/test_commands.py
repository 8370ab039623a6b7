"""Every command, found from its folder, answers --help and refuses a bad flag the same way.

The commands are main.py, every public module of lkca_jax/tools (cli.py is their shared
part, a leading underscore marks a helper) and every script of benchmarks/. Each runs as a
real process: `--help` exits 0 with the command's own description on stdout; an unknown
flag is one `error:` line naming it, the last line on stderr, and exit code 2.
"""

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

TOOLS = sorted(
  path
  for path in (ROOT / "lkca_jax" / "tools").glob("*.py")
  if not path.name.startswith("_") and path.name != "cli.py"
)
COMMANDS = [ROOT / "main.py", *TOOLS, *sorted((ROOT / "benchmarks").glob("*.py"))]


def command_line(path) -> list[str]:
  if path.parent.name == "tools":
    return [sys.executable, "-m", f"lkca_jax.tools.{path.stem}"]
  return [sys.executable, str(path.relative_to(ROOT))]


def first_line_of_docstring(path) -> str:
  return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))).splitlines()[0]


def test_the_commands_are_found():
  names = {path.name for path in COMMANDS}
  assert {"main.py", "compare.py", "reproduce.py", "launch.py", "compare_torch.py"} <= names
  assert not names & {"cli.py", "__init__.py", "_experiment.py"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: str(path.relative_to(ROOT)))
def test_help_exits_0_and_a_bad_flag_is_one_error_line_and_exit_2(path):
  procs = {
    case: subprocess.Popen(
      command_line(path) + [flag],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for case, flag in (("help", "--help"), ("bad", "--no_such_flag=1"))
  }
  out, err = procs["help"].communicate(timeout=120)
  assert procs["help"].returncode == 0, err[-1500:]
  # absl prints the main module's docstring, argparse its description.
  assert first_line_of_docstring(path) in " ".join(out.split()), out[:1500]
  out, err = procs["bad"].communicate(timeout=120)
  lines = [line for line in err.splitlines() if line.strip()]
  assert procs["bad"].returncode == 2, err[-1500:]
  assert lines and lines[-1].startswith("error: ") and "no_such_flag" in lines[-1], err[-1500:]
  assert [line for line in lines if "error" in line.lower()] == lines[-1:], err[-1500:]
