"""The package's top level: its public names, loaded on first use."""

import re
from pathlib import Path

import pytest

import lkca_jax
from tests.helpers import run_python


def test_importing_the_package_or_a_command_loads_no_jax():
  out = run_python(
    "import sys, lkca_jax, lkca_jax.tools.cli\n"
    "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))\n"
  )
  assert out.strip() == "[]"


def test_every_public_name_is_its_module_object():
  from lkca_jax import layers, models, train

  for name in lkca_jax.__all__:
    home = next(module for module in (layers, models, train) if hasattr(module, name))
    assert getattr(lkca_jax, name) is getattr(home, name), name
  public = {name for name in dir(lkca_jax) if not name.startswith("_")}
  # Beside the exports, only the package's own submodules (imported by the lookups above).
  assert set(lkca_jax.__all__) <= public
  assert all(name in lkca_jax.__all__ or is_submodule(name) for name in public), public
  names = {}
  exec("from lkca_jax import *", names)  # noqa: S102
  assert set(lkca_jax.__all__) <= set(names)


def is_submodule(name: str) -> bool:
  return getattr(getattr(lkca_jax, name), "__name__", "") == f"lkca_jax.{name}"


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    lkca_jax.no_such_name  # noqa: B018


def test_the_readmes_example_runs_and_prints_the_count_its_comment_gives(capsys):
  readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = readme.split("## Use LKCA in your own model\n")[1].split("\n## ")[0]
  code = section.split("```python\n")[1].split("```")[0]
  (stated,) = re.findall(r"print\(count_params\(model\)\)  # (\d+)", code)
  exec(code, {})  # noqa: S102  (its own asserts run too)
  assert capsys.readouterr().out.split() == [stated]
