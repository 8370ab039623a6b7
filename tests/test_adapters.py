"""What lkca_jax/adapters.py assumes of its dependencies still holds, on the real libraries.

Each failure names the version the adapter was written against and says what to
update: an upgrade that changes one of these assumptions fails here first, not
as a silent change of behaviour in training.
"""

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import tomllib

import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

from lkca_jax import adapters, checkpoint
from tests.helpers import ROOT, run_python
from tests.test_checkpoint import data_files

PINNED = adapters.PINNED
UPDATE = "update lkca_jax/adapters.py"


def changed(package: str, what: str) -> str:
  return f"{package} {PINNED[package]} changed: {what}; {UPDATE}"


def test_pins_are_the_project_pins():
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  pins = dict(dep.split("==") for dep in deps)
  for package, version in PINNED.items():
    assert pins.get(package) == version, (
      f"pyproject.toml pins {package} {pins.get(package)}, the adapters were checked with "
      f"{version}: run this file's tests with the new version, then {UPDATE} (PINNED)"
    )


# --- TensorStore errors, as orbax-checkpoint raises them ------------------------------------
def small_state():
  return {
    "step": jnp.int32(3),
    "params": {f"w{i}": jnp.full((4, 5), float(i)) for i in range(8)},
    "opt": optax.adam(1e-3).init({"w": jnp.ones((4, 5))}),
  }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("adapters") / "checkpoints"
  checkpoints = checkpoint.Checkpoints(directory, asynchronous=False)
  checkpoints.save(1, small_state(), {"best_top1": 0.5})
  checkpoints.close()
  return directory


def read_error(saved, tmp_path, damage):
  """The error orbax raises reading the metadata of a damaged copy of `saved`."""
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  for path in data_files(directory / "1"):
    damage(path)
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  adapters.quiet_abandoned_reads()  # as the library does before it reads
  with pytest.raises(Exception) as info:
    manager.metadata(1).item_metadata["state"]
  manager.close()
  return info.value


@pytest.mark.parametrize(
  "damage, status",
  [
    (lambda path: os.truncate(path, os.path.getsize(path) // 2), "OUT_OF_RANGE"),
    (os.remove, "NOT_FOUND"),
  ],
  ids=["truncated", "deleted"],
)
def test_tensorstore_errors_carry_their_status_first(saved, tmp_path, damage, status):
  error = read_error(saved, tmp_path, damage)
  what = "TensorStore's read errors (a ValueError starting with the absl status code)"
  assert isinstance(error, ValueError), changed("tensorstore", what)
  assert adapters.tensorstore_status(error) == status, changed("tensorstore", what)
  summary = adapters.tensorstore_summary(error)
  assert summary.startswith(f"{status}: ") and "\n" not in summary, changed("tensorstore", what)
  assert "tensorstore_spec" not in summary and len(summary) < 200, changed("tensorstore", what)


def test_errors_of_other_kinds_have_no_tensorstore_status():
  assert adapters.tensorstore_status(FileNotFoundError("NOT_FOUND: x")) is None
  assert adapters.tensorstore_status(ValueError("pytree structure error")) is None
  assert adapters.tensorstore_summary(ValueError("Expecting value: line 1")) is None


# --- orbax-checkpoint's abandoned reads ---------------------------------------------------
class _FailsOnDelete:
  def __init__(self, message):
    self.message = message

  def __del__(self):
    raise RuntimeError(self.message)


def report_unraisable(message):
  """Python hands the error of a __del__ to sys.unraisablehook, as with orbax's callbacks."""
  _FailsOnDelete(message)  # deleted at once


def test_the_quiet_hook_drops_only_closed_loop_noise():
  seen = []
  original = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    adapters.quiet_abandoned_reads()
    report_unraisable("Event loop is closed")
    report_unraisable("something else")
  finally:
    sys.unraisablehook = original
  assert [str(u.exc_value) for u in seen] == ["something else"]


# A command whose checkpoint read fails (a data file removed), then lives on for a second.
FAILED_READ = """
import os, sys, time
from lkca_jax.tools import cli

def main(argv):
  from lkca_jax import checkpoint
  import orbax.checkpoint as ocp
  directory = sys.argv[1] if len(sys.argv) > 1 else os.environ["CHECKPOINTS"]
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    manager.metadata(1).item_metadata["state"]
  except Exception:
    print("the read failed", flush=True)
  time.sleep(1.0)  # the abandoned reads end in here

cli.run(main, "failed_read")
"""


def test_a_command_prints_no_closed_loop_noise_after_a_failed_orbax_read(saved, tmp_path):
  """orbax abandons the other reads when one fails; in a command's process (cli.run) their
  "Event loop is closed" reports stay out of stderr, whenever they come."""
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  for path in data_files(directory / "1"):
    os.remove(path)
  result = subprocess.run(
    [sys.executable, "-c", FAILED_READ],
    cwd=ROOT,
    env=dict(os.environ, CHECKPOINTS=str(directory)),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0 and "the read failed" in result.stdout, result.stderr[-2000:]
  assert "Event loop is closed" not in result.stderr, changed(
    "orbax-checkpoint", "its abandoned reads report something other than a closed loop"
  )


# A library caller (no command, no hook of its own) reads past a damaged checkpoint whose
# array data is cut (tests/test_checkpoint.py's random_state and cut_array_data).
LIBRARY_READ = """
import gc, sys
from lkca_jax import checkpoint
from tests.test_checkpoint import cut_array_data, random_state

directory = checkpoint.absolute(sys.argv[1])
saving = checkpoint.Checkpoints(directory, asynchronous=False)
for step in (1, 2):
  saving.save(step, random_state(step), {})
saving.close()
cut_array_data(directory / "2")
restored = checkpoint.read_checkpoint(random_state(), directory)
print("read step", restored.step, flush=True)
gc.collect()  # the abandoned reads' coroutines and tasks, collected here if not before
"""


def test_a_library_read_past_damage_shows_one_warning_of_all_orbaxs_reports(tmp_path):
  """orbax's abandoned reads report in three ways (unraisable errors, asyncio's log, never
  awaited warnings); in a plain Python process the read shows the damage's warning alone."""
  result = subprocess.run(
    [sys.executable, "-c", LIBRARY_READ, str(tmp_path / "checkpoints")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0 and "read step 1" in result.stdout, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "cannot be restored (data-truncated" in lines[0], changed(
    "orbax-checkpoint", f"its abandoned reads report otherwise:\n{result.stderr[-3000:]}"
  )


def test_orbaxs_array_reads_are_where_the_never_awaited_filter_looks():
  assert "_read_array_index_and_device_put" in adapters.orbax_read_coroutines(), changed(
    "orbax-checkpoint", f"its array reads moved from {adapters.ORBAX_READS}"
  )


def test_orbax_raises_a_failed_array_read_around_its_tensorstore_error(tmp_path):
  from tests.test_checkpoint import cut_array_data, random_state

  directory = tmp_path / "checkpoints"
  saving = checkpoint.Checkpoints(directory, asynchronous=False)
  saving.save(1, random_state(), {})
  saving.close()
  cut_array_data(directory / "1")
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  like = random_state()
  restore_args = ocp.checkpoint_utils.construct_restore_args(like)
  restore = ocp.args.Composite(state=ocp.args.PyTreeRestore(item=like, restore_args=restore_args))
  adapters.quiet_abandoned_reads()  # as the library does before it reads
  with pytest.raises(Exception) as info:  # noqa: PT011 - what orbax raises is the question
    manager.restore(1, args=restore)
  manager.close()
  cause = adapters.tensorstore_error(info.value)
  assert cause is not None and adapters.tensorstore_status(cause) == "OUT_OF_RANGE", changed(
    "orbax-checkpoint", f"a failed array read raises {info.value!r:.300}, with no TensorStore cause"
  )


# --- clu without TensorFlow -------------------------------------------------------------
def test_clu_writers_and_periodic_actions_import_without_tensorflow(tmp_path):
  code = f"""
import sys
from lkca_jax import adapters
writers = adapters.clu_metric_writers()
from clu import periodic_actions
print("tf after import:", "tensorflow" in sys.modules)
print("stand-in left:", adapters.CLU_TF_WRITER in sys.modules)
print("writers:", writers.LoggingWriter.__name__, writers.AsyncMultiWriter.__name__)
writer = writers.SummaryWriter({str(tmp_path)!r})
writer.write_scalars(1, {{"loss": 1.0}})
writer.close()
print("created:", type(writer).__module__, "tensorflow" in sys.modules)
"""
  out = run_python(code)
  assert out.splitlines() == [
    "tf after import: False",
    "stand-in left: False",
    "writers: LoggingWriter AsyncMultiWriter",
    "created: clu.metric_writers.tf.summary_writer True",
  ], changed("clu", f"how clu.metric_writers imports its TensorFlow writer:\n{out}")
  assert [name for name in os.listdir(tmp_path) if name.startswith("events.out.tfevents")]


@pytest.mark.slow
def test_clu_still_imports_tensorflow_on_its_own():
  out = run_python("import sys, clu.metric_writers; print('tensorflow' in sys.modules)")
  assert out.split() == ["True"], changed(
    "clu", "`import clu.metric_writers` no longer imports TensorFlow: clu_metric_writers can go"
  )


# --- TensorFlow Datasets downloads --------------------------------------------------------
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
BODY = b"the file's bytes"


@pytest.fixture
def server(monkeypatch):
  """start(status) -> base URL of a local server answering every GET; .hits counts them."""
  for name in PROXY_VARS:
    monkeypatch.delenv(name, raising=False)
  servers, hits = [], []

  class Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the name http.server calls)
      hits.append(self.path)
      body = BODY if self.status == 200 else b""
      self.send_response(self.status)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  def start(status):
    handler = type("Handler", (Answer,), {"status": status})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    servers.append(httpd)
    return f"http://127.0.0.1:{httpd.server_address[1]}"

  start.hits = hits
  yield start
  for httpd in servers:
    httpd.shutdown()
    httpd.server_close()


def test_tfds_retries_are_capped_and_the_cap_is_undone(tmp_path, server):
  import requests
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import downloader

  url = server(503) + "/file.bin"
  before = downloader.MAX_RETRIES
  with adapters.tfds_http_retries(2), pytest.raises(requests.RequestException):
    tfds.download.DownloadManager(download_dir=tmp_path).download(url)
  assert len(server.hits) == 3, changed(
    "tensorflow-datasets", f"downloader.MAX_RETRIES no longer caps retries ({server.hits})"
  )
  assert downloader.MAX_RETRIES == before == 10


def test_tfds_builders_of_unprepared_data_leave_no_temporary_folder(tmp_path, monkeypatch):
  import tempfile

  import tensorflow_datasets as tfds

  from lkca_jax import data

  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where mkdtemp writes, this test only
  empty = tmp_path / "tfds"  # a data_dir where nothing is prepared
  tfds.builder("mnist", data_dir=empty)
  assert [p.name.endswith("tfds") for p in temp.iterdir()] == [True], changed(
    "tensorflow-datasets",
    "a builder of unprepared data no longer leaves a temporary folder: "
    "tfds_without_bucket_metadata may go",
  )
  shutil.rmtree(next(temp.iterdir()))
  with adapters.tfds_without_bucket_metadata():
    builder = tfds.builder("mnist", data_dir=empty)
  assert list(temp.iterdir()) == []
  assert builder.info.features["label"].num_classes == 10  # its metadata still from the code
  # Through the project's own path: asking for an unprepared dataset leaves nothing either.
  with pytest.raises(data.DatasetUnavailableError):
    data.load_split("tiny_imagenet", "train", data_dir=empty)
  assert list(temp.iterdir()) == []


def test_tfds_checksum_error_and_cache_names(tmp_path, server):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import checksums

  url = server(200) + "/data.bin"
  sha = hashlib.sha256(BODY).hexdigest()
  by_url, by_checksum = adapters.tfds_cached_names(url, sha)
  # Unregistered: cached under the URL's name; registered: under the checksum's.
  path = tfds.download.DownloadManager(download_dir=tmp_path / "a").download(url)
  assert os.path.basename(path) == by_url, changed("tensorflow-datasets", "cache file names")
  infos = {url: checksums.UrlInfo(size=len(BODY), checksum=sha, filename="data.bin")}
  path = tfds.download.DownloadManager(download_dir=tmp_path / "b", url_infos=infos).download(url)
  assert os.path.basename(path) == by_checksum, changed("tensorflow-datasets", "cache file names")

  wrong = {url: checksums.UrlInfo(size=len(BODY), checksum="0" * 64, filename="data.bin")}
  manager = tfds.download.DownloadManager(download_dir=tmp_path / "c", url_infos=wrong)
  with pytest.raises(Exception) as info:
    manager.download(url)
  assert isinstance(info.value, adapters.tfds_checksum_error()), changed(
    "tensorflow-datasets", f"the wrong-checksum error is a {type(info.value).__name__}"
  )
  assert adapters.tfds_checksum_error_url(info.value) == url, changed(
    "tensorflow-datasets", f"the checksum error's message: {str(info.value)[:200]!r}"
  )


# --- jax's coordination service ------------------------------------------------------------
def test_jax_keeps_its_coordination_client_where_the_barrier_reaches_it():
  """The two-process tests (tests/test_multiprocess.py) use the barrier itself; here, what it
  reaches for, without a job: the state object, its client slot, the client's barrier."""
  from jax._src import distributed
  from jax._src.lib import _jax

  assert hasattr(distributed.global_state, "client"), changed("jax", "global_state.client")
  assert hasattr(_jax.DistributedRuntimeClient, "wait_at_barrier"), changed(
    "jax", "DistributedRuntimeClient.wait_at_barrier"
  )


# --- grain's worker processes outside an absl app -------------------------------------------
GRAIN_WORKERS = """
import grain
from absl import flags
from lkca_jax import adapters

stream = grain.MapDataset.range(3).to_iter_dataset().mp_prefetch(
  grain.MultiprocessingOptions(num_workers=1)
)
try:
  next(iter(stream))
  print("started without the adapter")
except flags.UnparsedFlagAccessError:
  print("unparsed flags")
adapters.grain_workers_ready()
print(list(stream))
"""


@pytest.mark.slow  # starts a worker process
def test_grain_workers_need_parsed_absl_flags_and_start_once_marked():
  lines = run_python(f"if __name__ == '__main__':\n{textwrap.indent(GRAIN_WORKERS, '  ')}")
  first, result = lines.strip().splitlines()[-2:]
  assert first == "unparsed flags", changed(
    "grain", "mp_prefetch starts outside an absl app: grain_workers_ready is not needed"
  )
  assert result == "[0, 1, 2]", changed("grain", f"mp_prefetch gave {result}")
