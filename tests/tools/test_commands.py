"""Every command, found from its folder, answers --help and refuses a bad flag the same way.

The commands are main.py, every public module of lkca_jax/tools (cli.py is their shared
part) and every script of benchmarks/; in both folders a leading underscore marks a helper,
not a command (benchmarks/_torch_products.py runs under PyTorch's interpreter). Each runs as a
real process: `--help` exits 0 with the command's own description on stdout; an unknown
flag is one `error:` line naming it, the last line on stderr, and exit code 2.

A command that writes names where in flags it defines with `cli.define_output_dir` or
`cli.define_output_file`; asked for them (`cli.output_flags`), each command refuses the wrong
kind of thing (a regular file for a directory, left as it was; a directory for a file) with
one line naming the flag, before any work: so it checks each such flag with the check of
its kind. That check (`cli.output_dir`, `cli.output_file`) is tested here in-process on
every bad place, a place where no directory can be made included; a process per place and
command would only start the same check again.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts every command: make test, not make check

TOOLS = sorted(
  path
  for path in (ROOT / "lkca_jax" / "tools").glob("*.py")
  if not path.name.startswith("_") and path.name != "cli.py"
)
BENCHMARKS = sorted(
  path for path in (ROOT / "benchmarks").glob("*.py") if not path.name.startswith("_")
)
COMMANDS = [ROOT / "main.py", *TOOLS, *BENCHMARKS]


def command_line(path) -> list[str]:
  if path.parent.name == "tools":
    return [sys.executable, "-m", f"lkca_jax.tools.{path.stem}"]
  return [sys.executable, str(path.relative_to(ROOT))]


def first_line_of_docstring(path) -> str:
  return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))).splitlines()[0]


def docstring_lines_as_written(path) -> list[str]:
  """The docstring's lines as the file shows them; a line's final `\\` is a shell's."""
  source = path.read_text(encoding="utf-8")
  written = ast.get_source_segment(source, ast.parse(source).body[0]).strip('"')
  return [line.strip().replace("\\\\", "\\") for line in written.splitlines() if line.strip()]


def test_the_commands_are_found():
  names = {path.name for path in COMMANDS}
  assert {"main.py", "compare.py", "reproduce.py", "launch.py", "compare_torch.py"} <= names
  assert not names & {"cli.py", "__init__.py", "_experiment.py", "_torch_products.py"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: str(path.relative_to(ROOT)))
def test_help_exits_0_and_a_bad_flag_is_one_error_line_and_exit_2(path, output_flags):
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
  if path.name != "gpu_check.py":  # argparse's description: the first line alone
    # A backslash ending a docstring's line would join the usage lines into one.
    shown = {line.strip() for line in out.splitlines()}
    missing = [line for line in docstring_lines_as_written(path) if line not in shown]
    assert not missing, missing[:3]
  # The flags naming where it writes are the command's own, defined through cli: listed.
  unlisted = [name for name in output_flags[path]["outputs"] if f"--{name}:" not in out]
  assert not unlisted, unlisted
  out, err = procs["bad"].communicate(timeout=120)
  lines = [line for line in err.splitlines() if line.strip()]
  assert procs["bad"].returncode == 2, err[-1500:]
  assert lines and lines[-1].startswith("error: ") and "no_such_flag" in lines[-1], err[-1500:]
  assert [line for line in lines if "error" in line.lower()] == lines[-1:], err[-1500:]


# Asks each command which flags name where it writes (cli.output_flags) and which flags it
# cannot run without: --config (given configs/digits.py), --zip (the Tiny-ImageNet archive
# benchmarks/tiny_imagenet_subset.py reads; given the fixture), the PyTorch side of the
# benchmarks/compare_*.py (--torch_python and --torch_script: given this interpreter and
# the command's own file, which pass every check made before the output places; the
# interpreter's `import torch` is tried after them), enums with no default (given their
# first value) and a --workdir that names a run to read, not a place to write (None: the
# test gives a directory with a config.json, `run_workdir`). One process for all: each
# command's flags are removed after it.
DISCOVER = """
import importlib.util, json, sys
from absl import flags
from lkca_jax.tools import cli

found = {}
for index, path in enumerate(sys.argv[1:]):
  spec = importlib.util.spec_from_file_location(f"command_{index}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  before = set(flags.FLAGS)
  getattr(module, "define_flags", lambda: None)()
  new = sorted(set(flags.FLAGS) - before)
  outputs = {name: kind for name, kind in cli.output_flags().items() if name in new}
  needed = {}
  for name in new:
    flag = flags.FLAGS[name]
    if flag.default is None and name == "config":
      needed[name] = "configs/digits.py"
    elif flag.default is None and name == "zip":
      needed[name] = "tests/data/tiny-imagenet-200-fixture.zip"
    elif name == "torch_python":
      needed[name] = sys.executable
    elif name == "torch_script":
      needed[name] = path
    elif flag.default is None and getattr(flag.parser, "enum_values", None):
      needed[name] = flag.parser.enum_values[0]
    elif flag.default is None and name == "workdir" and name not in outputs:
      needed[name] = None  # a main.py run's workdir, made by the test
  defaults = {name: flags.FLAGS[name].default for name in outputs}
  found[path] = {"outputs": outputs, "defaults": defaults, "needed": needed}
  for name in new:
    delattr(flags.FLAGS, name)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def output_flags():
  """{command path: {"outputs": {flag: "dir" | "file"}, "defaults": ..., "needed": ...}}."""
  result = subprocess.run(
    [sys.executable, "-c", DISCOVER, *map(str, COMMANDS)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return {ROOT / path: found for path, found in json.loads(result.stdout).items()}


def test_the_output_flags_are_found(output_flags):
  outputs = {path.name: found["outputs"] for path, found in output_flags.items()}
  assert outputs["compare.py"] == {"out": "file", "workdir": "dir"}
  assert outputs["reproduce.py"] == {"out": "dir"}
  assert outputs["analyze.py"] == {"workdir": "dir"}
  assert outputs["export.py"] == {"out": "file"}
  assert outputs["launch.py"] == {}
  assert outputs["tiny_imagenet_subset.py"] == {"out": "file"}


def output_value(directory, name, kind, default) -> str:
  """A path under `directory` for the flag `name`; a file keeps its default's suffix (.png)."""
  suffix = os.path.splitext(default or "")[1] if kind == "file" else ""
  return str(directory / f"{name}{suffix}")


def bad_places(tmp_path, stem, name, kind, default) -> dict:
  """What the flag refuses: a place no directory can be made, and the wrong kind of thing."""
  places = {"proc": output_value(Path("/proc/lkca-test") / stem, name, kind, default)}
  wrong = Path(output_value(tmp_path / "wrong", name, kind, default))
  wrong.parent.mkdir(exist_ok=True)
  if kind == "dir":
    wrong.write_text("a regular file\n")  # must be left as it is
  else:
    wrong.mkdir()
  places["wrong kind"] = str(wrong)
  return places


def assert_left_as_it_was(tmp_path, name, kind, default):
  wrong = Path(output_value(tmp_path / "wrong", name, kind, default))
  if kind == "dir":
    assert wrong.read_text() == "a regular file\n"
  else:
    assert wrong.is_dir() and not any(wrong.iterdir())


def one_error_line(err, name, place):
  lines = [line for line in err.splitlines() if line.strip()]
  why = (name, place, err[-1500:])
  assert "Traceback" not in err, why
  assert lines[-1].startswith("error: ") and f"--{name}={place}" in lines[-1], why
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], why


@pytest.mark.parametrize(
  "kind, default", [("dir", None), ("file", "x.png")], ids=["output_dir", "output_file"]
)
def test_the_output_checks_refuse_every_bad_place_with_one_line(kind, default, tmp_path, capsys):
  from lkca_jax.tools import cli

  check = cli.output_dir if kind == "dir" else cli.output_file
  for case, place in bad_places(tmp_path, "check", "out", kind, default).items():
    with pytest.raises(SystemExit) as exit_info:
      check(place, "--out")
    assert exit_info.value.code == cli.USAGE_ERROR, case
    captured = capsys.readouterr()
    one_error_line(captured.err, "out", place)
    assert captured.out == "", case
  assert_left_as_it_was(tmp_path, "out", kind, default)
  assert not Path("/proc/lkca-test").exists()


def run_workdir(tmp_path) -> Path:
  """A directory with a config.json where a main.py run's workdir is read (tools/export.py):
  a command takes it for a run's workdir before its output checks, and reads the run's
  checkpoints only after them."""
  workdir = tmp_path / "run"
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text("{}")
  return workdir


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: str(path.relative_to(ROOT)))
def test_an_unusable_output_place_is_one_error_line_before_any_work(path, output_flags, tmp_path):
  found = output_flags[path]
  if not found["outputs"]:
    pytest.skip("defines no output flag")
  needed = [
    f"--{name}={run_workdir(tmp_path) if value is None else value}"
    for name, value in found["needed"].items()
  ]
  cases = {}
  for name, kind in found["outputs"].items():
    default = found["defaults"][name]
    others = [  # every other output flag at a good place: only `name` is bad
      f"--{other}={output_value(tmp_path / 'good', other, k, found['defaults'][other])}"
      for other, k in found["outputs"].items()
      if other != name
    ]
    # The wrong kind: refused only by the check of the flag's own kind (a file flag checked
    # as a directory would take a directory, and the other way round).
    place = bad_places(tmp_path, path.stem, name, kind, default)["wrong kind"]
    cases[(name, place)] = subprocess.Popen(
      command_line(path) + [*needed, *others, f"--{name}={place}"],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  for (name, place), proc in cases.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (name, err[-1500:])
    one_error_line(err, name, place)
    assert out == "", (name, out)  # refused before any work that reports itself
  for name, kind in found["outputs"].items():
    assert_left_as_it_was(tmp_path, name, kind, found["defaults"][name])
