"""The import direction: commands → trainer → data/models → layers/augment, never back.

Every `import` in the package is read, function-local ones included (a local
import hides a cycle; it does not remove it).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lkca_jax"

# Lower numbers sit lower: a module may import its own layer's package and anything below it.
LAYERS = {
  "adapters": 0,
  "backend": 0,
  "files": 0,
  "host_memory": 0,
  "mixing": 0,
  "paper": 0,
  "schedules": 0,
  "workdir": 0,
  "layers": 1,
  "augment": 1,
  "models": 2,
  "data": 2,
  "analysis": 3,
  "checkpoint": 3,
  "config_checks": 3,
  "distributed": 3,
  "exporting": 3,
  "linen": 3,
  "metric_writer": 3,
  "resolution": 3,
  "run_files": 4,
  "runs": 4,
  "steps": 4,
  "finetune": 5,
  "train": 6,
  "tools": 7,
}


def layer_of(module: str) -> int:
  """`lkca_jax.data.pipeline` → the layer of `data`; the package root is a facade (8)."""
  parts = module.split(".")
  if len(parts) == 1:
    return 8
  return LAYERS[parts[1]]


def imports_of(path: Path) -> list[str]:
  tree = ast.parse(path.read_text())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found += [
        f"{node.module}.{alias.name}" if node.module == "lkca_jax" else node.module
        for alias in node.names
      ]
  return [name for name in found if name.split(".")[0] == "lkca_jax"]


def package_modules() -> list[tuple[str, Path]]:
  modules = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules.append((".".join(parts), path))
  return modules


def test_every_package_module_has_a_layer():
  unplaced = {name.split(".")[1] for name, _ in package_modules() if "." in name} - set(LAYERS)
  assert not unplaced, f"add {sorted(unplaced)} to LAYERS in {__file__}"


@pytest.mark.parametrize("module,path", package_modules(), ids=lambda x: str(x))
def test_imports_point_down(module, path):
  if module == "lkca_jax":
    return  # the facade re-exports layers and models
  own = layer_of(module)
  own_package = module.split(".")[1]
  for imported in imports_of(path):
    if imported == "lkca_jax":
      raise AssertionError(f"{module} imports the package facade; import the submodule")
    target_package = imported.split(".")[1]
    if target_package == own_package:
      continue
    assert layer_of(imported) < own, (
      f"{module} (layer {own}) imports {imported} (layer {layer_of(imported)}): imports must "
      "run commands → trainer → data/models → layers/augment"
    )


def test_the_checker_sees_local_imports(tmp_path):
  source = tmp_path / "m.py"
  source.write_text("def f():\n  from lkca_jax import train\n  import lkca_jax.tools.cli\n")
  assert imports_of(source) == ["lkca_jax.train", "lkca_jax.tools.cli"]
