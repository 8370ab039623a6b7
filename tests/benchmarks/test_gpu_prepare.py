"""benchmarks/gpu_prepare.sh: the wheel list at the suite's own versions, the carried data
read back as the first classes, and its refusals. (Downloading the wheels needs the package
registry; the list it reads is what is checked here.)"""

import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from lkca_jax import data
from tests.helpers import FIXTURE_ZIP

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEELS_LIST = os.path.join(REPO, "benchmarks", "gpu_wheels.txt")


def pins():
  with open(WHEELS_LIST, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  return [tuple(line.split("==")) for line in lines]


@pytest.mark.parametrize("name,version", pins(), ids=lambda x: x)
def test_each_wheel_is_pinned_at_the_version_the_suite_runs(name, version):
  assert metadata.version(name) == version


def prepare(tmp_path, *args, env=None):
  # A copy of the repository's benchmarks and package, so the data lands in tmp_path.
  env = env or {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO}
  return subprocess.run(
    ["bash", os.path.join(tmp_path, "benchmarks", "gpu_prepare.sh"), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.fixture
def copy(tmp_path):
  (tmp_path / "benchmarks").mkdir()
  for name in ("gpu_prepare.sh", "gpu_wheels.txt", "tiny_imagenet_subset.py"):
    (tmp_path / "benchmarks" / name).write_bytes(
      open(os.path.join(REPO, "benchmarks", name), "rb").read()
    )
  return tmp_path


def test_the_data_is_the_first_classes_prepared(copy):
  result = prepare(copy, "--zip", str(FIXTURE_ZIP), "--classes", "2", "--no_wheels")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "train 24, validation 10" in result.stdout
  assert not (copy / "benchmarks" / "wheels").exists()
  images, labels = data.load_split(
    "tiny_imagenet", "validation", data_dir=copy / "benchmarks" / "gpu_data"
  )
  assert images.shape == (10, 64, 64, 3) and np.bincount(labels).tolist() == [5, 5]


@pytest.mark.parametrize(
  "args,says",
  [
    (("--no_such_flag",), "unknown argument --no_such_flag"),
    (("--zip", "/no/such.zip"), "--zip=/no/such.zip is not a file"),
    (("--no_wheels",), "nothing to prepare"),
  ],
)
def test_bad_input_is_one_error_line(copy, args, says):
  result = prepare(copy, *args)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and says in line
  assert sorted(p.name for p in (copy / "benchmarks").iterdir()) == [
    "gpu_prepare.sh",
    "gpu_wheels.txt",
    "tiny_imagenet_subset.py",
  ]


@pytest.fixture
def bare_python(tmp_path_factory):
  """A real Python with nothing installed: a fresh venv without pip."""
  venv = tmp_path_factory.mktemp("bare")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  return venv / "bin" / "python"


def test_a_python_without_the_package_is_refused_before_any_download(copy, bare_python):
  env = {**os.environ, "PYTHON": str(bare_python)}
  env.pop("PYTHONPATH", None)
  result = prepare(copy, "--zip", str(FIXTURE_ZIP), env=env)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and "cannot import lkca_jax: run make install" in line
  assert not (copy / "benchmarks" / "wheels").exists()  # refused before downloading
  assert not (copy / "benchmarks" / "gpu_data").exists()


def test_the_repository_environment_is_the_default_python(copy, bare_python):
  # The repository's .venv runs the script, not a `python` without the package that comes
  # first on PATH (a newcomer's shell without the venv activated).
  venv_bin = copy / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (venv_bin / "python").chmod(0o755)
  env = {**os.environ, "PYTHONPATH": REPO, "PATH": f"{bare_python.parent}:{os.environ['PATH']}"}
  env.pop("PYTHON", None)
  result = prepare(copy, "--zip", str(FIXTURE_ZIP), "--classes", "2", "--no_wheels", env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train 24, validation 10" in result.stdout
