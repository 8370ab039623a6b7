"""Helpers shared by several test modules."""

import fcntl
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

FIXTURE_ZIP = Path(__file__).parent / "data" / "tiny-imagenet-200-fixture.zip"
FIXTURE_FORMATS = ("array_record", "tfrecord")
ROOT = Path(__file__).resolve().parent.parent
FIXTURE_RUN_STEPS = 8
# A tiny main.py run on the prepared fixture (add --workdir and --config.dataset.data_dir).
# tests/test_no_tensorflow.py runs it, tests/data/test_stream.py streams it: the same model
# and step, so the compilation cache serves whichever compiles second. AutoAugment is off
# (it is slow to compile); its code is imported with the augment package either way, so
# what the run imports does not change.
FIXTURE_RUN = [
  "--config",
  "configs/tinyimagenet.py",
  "--config.dataset.download=False",
  "--config.model=lkca_t",
  "--config.model_overrides.dim=32",
  "--config.model_overrides.depth=1",
  "--config.model_overrides.num_heads=2",
  "--config.num_devices=1",
  "--config.batch_size=16",
  f"--config.num_train_steps={FIXTURE_RUN_STEPS}",
  "--config.checkpoint_every_steps=4",
  "--config.log_every_steps=1",
  "--config.augment.autoaugment=none",
]


def cpu_model_name() -> str:
  """This machine's CPU model, as /proc/cpuinfo names it."""
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return names[0] if names else "unknown"


def run_python(code: str, *, unset=(), **env) -> str:
  """Runs `code` in a fresh interpreter at the repository root, with the environment
  variables in `unset` removed and `env` added; asserts it succeeded and returns stdout."""
  environ = {k: v for k, v in os.environ.items() if k not in unset}
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=dict(environ, **env),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


HOLD = str(ROOT / "tests" / "hold.py")  # a program held at one of the trainer's events


def start_held(hold: str, command: list, **popen) -> tuple[subprocess.Popen, str]:
  """Starts `command` (an interpreter, then main.py or -m MODULE and their arguments) held at
  `hold` ("eval:STEP" or "save:STEP", tests/hold.py); returns the process once it says it
  is held, with the stderr it wrote until then."""
  proc = subprocess.Popen(
    [command[0], HOLD, hold, *command[1:]],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **popen,
  )
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if line.startswith(f"holding at {hold}"):
      return proc, "".join(seen)
  pytest.fail("the run never reached the hold:\n" + "".join(seen[-40:]))


def built_once(tmp_path_factory, name: str, build):
  """`build(directory)`'s result, built once in the test session however many workers run.

  pytest-xdist builds a module fixture in every worker that runs one of its
  tests, and with `-n 2` a module's tests often land on both. Here the first
  worker builds into a folder of the session's that the workers share and
  pickles the result; the others wait for it, then read it. Only for fixtures
  whose tests read what was built and change nothing.
  """
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  directory, result_file = shared / name, shared / f"{name}.pickle"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if result_file.exists():
      return pickle.loads(result_file.read_bytes())
    shutil.rmtree(directory, ignore_errors=True)  # what a failed build left
    directory.mkdir()
    result = build(directory)
    result_file.write_bytes(pickle.dumps(result))
    return result


def manual_dir_with(tmp_dir, zip_path=FIXTURE_ZIP) -> Path:
  """A manual_dir under `tmp_dir` holding `zip_path` as tiny-imagenet-200.zip."""
  manual = Path(tmp_dir) / "manual"
  manual.mkdir()
  os.symlink(os.path.abspath(zip_path), manual / "tiny-imagenet-200.zip")
  return manual


def prepared_fixture(tmp_path_factory, file_format: str) -> Path:
  """The data_dir of the fixture zip prepared through the real builder in `file_format`,
  once in the session for every module that reads it: copy it before changing it."""
  from lkca_jax import data

  def build(directory):
    data_dir = directory / file_format
    sizes = data.prepare(
      "tiny_imagenet",
      data_dir=data_dir,
      manual_dir=manual_dir_with(directory),
      file_format=file_format,
    )
    assert sizes == {"train": 48, "validation": 20}
    return data_dir

  return built_once(tmp_path_factory, f"tiny_imagenet_fixture_{file_format}", build)


def format_param(file_format: str, *values: str):
  """A pytest param for a case in `file_format`, marked slow for tfrecord: writing and reading
  tfrecord files imports TensorFlow, seconds in each process, so the fast tier
  (`-m "not slow"`) checks array_record, the default, and the full suite both."""
  marks = [pytest.mark.slow] if file_format == "tfrecord" else []
  return pytest.param(file_format, *values, marks=marks, id="-".join((file_format, *values)))


def with_overrides(config, overrides):
  """The config with dotted-key overrides applied, as `--config.KEY=VALUE` would (typed values)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def tiny_digits(**overrides):
  """The digits config at a size that trains in a second: width 32, depth 2, 5 steps."""
  from configs import digits  # pylint: disable=import-outside-toplevel

  config = digits.get_config()
  config.model_overrides.dim = 32
  config.model_overrides.depth = 2
  config.model_overrides.num_heads = 4
  config.batch_size = 32
  config.num_train_steps = 5
  return with_overrides(config, overrides)


def fixture_images():
  """Every JPEG of the fixture zip, in name order: (all as RGB arrays, the grey ones as 2-D)."""
  rgb, grey = [], []
  with zipfile.ZipFile(FIXTURE_ZIP) as archive:
    for name in sorted(n for n in archive.namelist() if n.endswith(".JPEG")):
      image = Image.open(io.BytesIO(archive.read(name)))
      image.load()
      if image.mode == "L":
        grey.append(np.asarray(image))
      rgb.append(np.asarray(image.convert("RGB")))
  return rgb, grey


def tfds_builder(name: str, data_dir):
  """`tfds.builder`, leaving no empty temporary folder behind for data not prepared there
  (`adapters.tfds_without_bucket_metadata`, as the project's own builders)."""
  import tensorflow_datasets as tfds

  from lkca_jax import adapters

  with adapters.tfds_without_bucket_metadata():
    return tfds.builder(name, data_dir=data_dir)


def bodies(hlo: str) -> dict[str, str]:
  """{computation name: its body} of a compiled program's HLO text."""
  return dict(re.findall(r"\n%(\S+) [^\n]*\{\n(.*?)\n\}", hlo, flags=re.S))


def ynn_fusions(hlo: str) -> list[str]:
  """The computations that a compiled program's YNNPACK fusions call."""
  return re.findall(r"calls=%([\w.\-]+),[^\n]*__ynn_fusion", hlo)


def ynn_fusion_ranks(hlo: str) -> list[int]:
  """The largest array rank in each of a compiled program's YNNPACK fusions."""
  computations = bodies(hlo)
  shapes = [re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", computations[n]) for n in ynn_fusions(hlo)]
  return [max(len(dims.split(",")) if dims else 0 for dims in found) for found in shapes]


def product_fusions(fn, *args) -> dict[str, set[str]]:
  """{fusion: the ops it holds} for every fusion with a matrix product in the program
  XLA:CPU compiles for `fn(*args)`, plus "unfused" for products standing alone; skips
  when this jaxlib on this CPU hands none of those products to YNNPACK (the CPU forms'
  steer of YNNPACK's threads is then moot)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  fusions = {name: set(re.findall(r"= \S+ (\w+)\(", body)) for name, body in bodies(text).items()}
  fusions = {name: ops for name, ops in fusions.items() if "dot" in ops}
  if not set(ynn_fusions(text)) & set(fusions):
    pytest.skip(f"jaxlib {jax.__version__} on this CPU hands no products to YNNPACK")
  unfused = re.findall(r"= \S+ dot\(", text.split("ENTRY")[1])
  return {**fusions, **({"unfused": {"dot"}} if unfused else {})}


def chain_terms(model) -> int:
  """Reduction terms along a ViT's longest path (tests/test_transforms.py): the patch
  embedding, per block the mixer's and the MLP's products and LayerNorms (~8·D) and the
  tokens twice, the final norm and the head. Bounds on float32 round-off scale with it."""
  dim = model.head.kernel.shape[0]
  tokens = model.grid[0] * model.grid[1] + 1
  return model.patch_embed.in_features + len(model.blocks) * (8 * dim + 2 * tokens) + 2 * dim


U = 2.0**-24  # float32 unit round-off
U_BF16 = 2.0**-8  # bfloat16 unit round-off (8-bit significand)


def assert_reordered(got, expected, terms: int) -> None:
  """`got` and `expected` compute the same sums of at most `terms` terms in other orders (a
  batch split another way, a pooled row taken alone): each is within terms·u of the exact
  value at the scale of the summed magnitudes, so they differ by at most 2·terms·u of
  that scale, taken here as the largest |expected|."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  bound = 2 * terms * U * max(float(np.abs(expected).max()), 1e-30)
  err = float(np.abs(got - expected).max())
  assert err <= bound, f"off by {err:.3g}, over the round-off bound {bound:.3g}"


def step_chain_terms(config) -> int:
  """Reduction terms along the longest path of one train step of `config` (as `chain_terms`):
  per block ~8·D in products and norms and the tokens twice, the head, and the weight
  gradients' sums over batch × tokens (the patch grid and a class token)."""
  from lkca_jax.data import sources

  height, width = sources.DATASETS[config.dataset.name].image_size
  tokens = (height // config.patch_size) * (width // config.patch_size) + 1
  dim, depth = config.model_overrides.dim, config.model_overrides.depth
  return depth * (8 * dim + 2 * tokens) + 2 * dim + config.batch_size * tokens


def leaves_by_path(tree) -> dict:
  return {
    jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def adam_state(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return state


def adamw_round_off(config, before, after, lr: float, terms: int) -> dict:
  """Per parameter, the most one AdamW step can move it when its gradient is off by the
  round-off of `terms`-term sums (2·terms·u of the leaf's largest gradient, the scale of
  its summed magnitudes): the gradient's interval carried through mu, nu, the bias
  corrections and mu/(√nu + eps), plus the rounding of applying the update."""
  opt = config.optimizer
  b1, b2, eps = opt.b1, opt.b2, opt.eps
  adam_before, adam_after = adam_state(before.opt_state), adam_state(after.opt_state)
  count = float(adam_after.count)  # the step's bias corrections use the incremented count
  mu0, mu1, nu1, params = (
    leaves_by_path(tree) for tree in (adam_before.mu, adam_after.mu, adam_after.nu, before.params)
  )
  assert mu0.keys() == mu1.keys() == nu1.keys() == params.keys()
  bounds = {}
  for path, theta in params.items():
    m0, m1, n1 = mu0[path], mu1[path], nu1[path]
    g = (m1 - b1 * m0) / (1 - b1)
    dg = 2 * terms * U * np.abs(g).max()
    c1, c2 = 1 - b1**count, 1 - b2**count
    m_hat, dm = np.abs(m1) / c1, (1 - b1) * dg / c1
    v_hat, dv = n1 / c2, (1 - b2) * (2 * np.abs(g) * dg + dg * dg) / c2
    s_lo = np.sqrt(np.maximum(v_hat - dv, 0.0)) + eps
    s_hi = np.sqrt(v_hat + dv) + eps
    width = (m_hat + dm) / s_lo - np.maximum(m_hat - dm, 0.0) / s_hi
    bounds[path] = lr * width + 8 * U * (np.abs(theta) + lr * (m_hat + dm) / s_lo)
  return bounds


def assert_one_step_apart(config, before, after, params, lr: float, terms: int, step: int):
  """`params` (another program's step from the state `before`) is `after`'s parameters to
  within that one step's round-off carried through AdamW (`adamw_round_off`)."""
  bounds = adamw_round_off(config, before, after, lr, terms)
  got, expected = leaves_by_path(params), leaves_by_path(after.params)
  for path, bound in bounds.items():
    excess = np.abs(got[path] - expected[path]) - bound
    assert excess.max() <= 0, (step, path, float(excess.max()))
