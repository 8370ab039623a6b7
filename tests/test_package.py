"""The package's top level: its public names, loaded on first use."""

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
  from lkca_jax import layers, models

  for name in lkca_jax.__all__:
    home = layers if hasattr(layers, name) else models
    assert getattr(lkca_jax, name) is getattr(home, name), name
  assert set(lkca_jax.__all__) <= set(dir(lkca_jax))
  names = {}
  exec("from lkca_jax import *", names)  # noqa: S102
  assert set(lkca_jax.__all__) <= set(names)


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    lkca_jax.no_such_name  # noqa: B018
