"""Every place the project relies on a dependency's behaviour that its public API does not give.

Each workaround below was written against the versions in `PINNED` (requirements.txt);
tests/test_adapters.py checks what each one assumes and fails, naming the version and
this module, when an upgrade changes it. Nothing here imports a dependency at module
level: importing this module stays cheap and TensorFlow-free.

- TensorStore (orbax-checkpoint's array storage) raises plain `ValueError`s whose
  message starts with an absl status code ("NOT_FOUND: ..."); it has no typed
  errors, so the code is read from the message.
- orbax-checkpoint abandons the other array reads when one fails. Their callbacks then
  reach a closed event loop ("Event loop is closed"), their failed coroutines and tasks
  report their own errors when collected ("Exception ignored in", asyncio's "Task
  exception was never retrieved"), and those never started warn that they were never
  awaited: thousands of lines for a damaged checkpoint of a model, saying nothing new.
- clu's `clu.metric_writers` package imports its TensorFlow summary writer on
  import (and with it TensorFlow), although its other writers and
  `clu.periodic_actions` never use it.
- jax has no public barrier for processes that arrive far apart in time; its
  coordination service has one, reached through `jax._src.distributed`.
- TensorFlow Datasets retries a failing HTTP download 10 times with backoff (minutes),
  with no option for it in `DownloadConfig`; its checksum error and its cache file
  names are not exported either. Building a builder of a dataset not yet prepared
  makes a temporary folder for metadata from its GCS bucket before it checks that GCS
  is off (its default), and never removes it: one empty folder in /tmp per builder.
- grain's `mp_prefetch` reads an absl flag of its own in the parent process, which raises
  `UnparsedFlagAccessError` outside an absl app until the flags are parsed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
import types
import warnings

PINNED = {
  "jax": "0.10.2",
  "orbax-checkpoint": "0.12.8",
  "tensorstore": "0.1.86",
  "clu": "0.0.12",
  "tensorflow-datasets": "4.9.10",
  "grain": "0.2.18",
}

# --- TensorStore errors ----------------------------------------------------------------
_STATUS = re.compile(r"([A-Z][A-Z_]+): ")


def tensorstore_status(error: BaseException) -> str | None:
  """The absl status code ("NOT_FOUND", "OUT_OF_RANGE", ...) of a TensorStore error, else None."""
  if not isinstance(error, ValueError):
    return None
  match = _STATUS.match(str(error))
  return match.group(1) if match else None


def tensorstore_error(error: BaseException) -> BaseException | None:
  """`error` if it is a TensorStore error, else the first of its causes that is one (orbax
  raises a plain Exception "Encountered error while reading array index" from the
  TensorStore error of a failed array read), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if tensorstore_status(error):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def tensorstore_summary(error: BaseException) -> str | None:
  """A TensorStore error in one line: its status and innermost cause, without its JSON spec.

  None if `error` is not a TensorStore error.
  """
  status = tensorstore_status(error)
  if status is None:
    return None
  lines = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  causes = lines[0][len(status) + 2 :] if lines else ""
  return f"{status}: {causes.rsplit(': ', 1)[-1]}"


# --- orbax-checkpoint's abandoned reads ---------------------------------------------------
_ORBAX_CHECKPOINT = "orbax/checkpoint/"  # in the path of each of its source files
_UNRETRIEVED = re.compile(r"\w+ exception was never retrieved")
ORBAX_READS = "orbax.checkpoint._src.serialization.serialization"  # its array reads


def _is_abandoned_read_noise(unraisable) -> bool:
  """An abandoned orbax read's report: its callback finding the event loop closed, or the
  error of one of orbax's own coroutines, collected unfinished."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
  return code is not None and _ORBAX_CHECKPOINT in code.co_filename.replace("\\", "/")


def _is_abandoned_task_log(record) -> bool:
  """asyncio's log line for one of orbax's tasks or futures (a gather of its reads, a
  TensorStore read's), failed and collected unretrieved."""
  message = record.getMessage()
  if not _UNRETRIEVED.match(message):  # "Task exception ...", "_GatheringFuture exception ..."
    return False
  error = record.exc_info[1] if record.exc_info else None
  return _ORBAX_CHECKPOINT in message or (
    error is not None and tensorstore_error(error) is not None
  )


def orbax_read_coroutines() -> list[str]:
  """The names of the coroutine functions of orbax's array reads ([] where that module is
  gone: a filter of noise must not stop a read)."""
  import inspect  # pylint: disable=import-outside-toplevel

  try:
    module = importlib.import_module(ORBAX_READS)
  except ImportError:
    return []
  return [name for name, f in vars(module).items() if inspect.iscoroutinefunction(f)]


def quiet_abandoned_reads() -> None:
  """From now on in this process, the reports of abandoned orbax reads are not shown.

  orbax abandons the other reads of a checkpoint when one fails, and each reports
  itself whenever it ends or is collected, on no schedule: only filters for the rest of
  the process catch them all. The commands install them when they start
  (`lkca_jax.tools.cli.run`), and the library before it reads a checkpoint, so that
  reading past a damaged one (`lkca_jax.load_trained`, say) shows its one warning, not
  thousands of lines. Each filter drops those reports alone: every other unraisable
  exception reaches the hook installed before, every other log line and warning shows.
  """
  hook = sys.unraisablehook
  if not getattr(hook, "quiets_abandoned_reads", False):

    def quiet(unraisable):
      if not _is_abandoned_read_noise(unraisable):
        hook(unraisable)

    quiet.quiets_abandoned_reads = True
    sys.unraisablehook = quiet
  if not _QUIETED_LOGS:
    _QUIETED_LOGS.append(True)
    logging.getLogger("asyncio").addFilter(lambda record: not _is_abandoned_task_log(record))
    names = "|".join(orbax_read_coroutines())
    warnings.filterwarnings("ignore", rf"coroutine '({names})' was never awaited", RuntimeWarning)


_QUIETED_LOGS: list[bool] = []  # the log and warning filters are added once a process


# --- clu without TensorFlow -------------------------------------------------------------
CLU_TF_WRITER = "clu.metric_writers.summary_writer"


def clu_metric_writers() -> types.ModuleType:
  """`clu.metric_writers`, imported without TensorFlow (so also `clu.periodic_actions` after it).

  While clu's package imports, a stand-in takes the place of its TensorFlow writer
  module; `SummaryWriter` then imports the real one (and TensorFlow) only if one is
  ever created. The stand-in leaves `sys.modules` once clu has imported.
  """
  if "clu.metric_writers" in sys.modules:
    return sys.modules["clu.metric_writers"]

  class SummaryWriter:  # pylint: disable=too-few-public-methods
    """clu's TensorFlow SummaryWriter, imported (with TensorFlow) when first created."""

    def __new__(cls, *args, **kwargs):
      real = importlib.import_module("clu.metric_writers.tf.summary_writer")
      return real.SummaryWriter(*args, **kwargs)

  stand_in = types.ModuleType(CLU_TF_WRITER, SummaryWriter.__doc__)
  stand_in.SummaryWriter = SummaryWriter
  planted = CLU_TF_WRITER not in sys.modules
  if planted:
    sys.modules[CLU_TF_WRITER] = stand_in
  try:
    return importlib.import_module("clu.metric_writers")
  finally:
    if planted and sys.modules.get(CLU_TF_WRITER) is stand_in:
      del sys.modules[CLU_TF_WRITER]


# --- TensorFlow Datasets downloads --------------------------------------------------------
@contextlib.contextmanager
def tfds_http_retries(limit: int):
  """Within: TFDS retries a failing HTTP download at most `limit` times."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=import-outside-toplevel

  saved = downloader.MAX_RETRIES
  downloader.MAX_RETRIES = min(saved, limit)
  try:
    yield
  finally:
    downloader.MAX_RETRIES = saved


@contextlib.contextmanager
def tfds_without_bucket_metadata():
  """Within: building a TFDS builder of an unprepared dataset leaves no empty temporary
  folder behind. TFDS's `DatasetInfo.initialize_from_bucket` does nothing else while GCS
  is off, so it is skipped then; with GCS on it runs as TFDS has it."""
  from tensorflow_datasets.core import dataset_info  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=import-outside-toplevel

  if not gcs_utils._is_gcs_disabled:  # pylint: disable=protected-access
    yield
    return
  saved = dataset_info.DatasetInfo.initialize_from_bucket
  dataset_info.DatasetInfo.initialize_from_bucket = lambda self: None
  try:
    yield
  finally:
    dataset_info.DatasetInfo.initialize_from_bucket = saved


def tfds_checksum_error() -> type[Exception]:
  """The exception TFDS raises when a download does not have its registered checksum."""
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=import-outside-toplevel

  return download_manager.NonMatchingChecksumError


def tfds_checksum_error_url(error: Exception) -> str | None:
  """The URL a TFDS checksum error names ("Artifact URL, downloaded to ..."), else None."""
  words = str(error).split()
  return words[1].rstrip(",") if len(words) > 1 and words[0] == "Artifact" else None


def tfds_cached_names(url: str, checksum: str | None = None) -> list[str]:
  """The file names TFDS's download cache gives `url`: by the URL, and by its checksum if known."""
  from tensorflow_datasets.core.download import resource  # pylint: disable=import-outside-toplevel

  names = [resource.get_dl_fname(url)]
  if checksum:
    names.append(resource.get_dl_fname(url, checksum))
  return names


# --- jax's coordination service -----------------------------------------------------------
def coordination_barrier(barrier_id: str, timeout_s: float) -> None:
  """Waits until every process reaches the barrier `barrier_id` (used once) of the client
  `jax.distributed.initialize` made (orbax takes the same client the same way)."""
  from jax._src import distributed as jax_distributed  # no public API for it

  jax_distributed.global_state.client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


# --- grain's worker processes -------------------------------------------------------------
def grain_workers_ready() -> None:
  """Lets grain start worker processes outside an absl app (main.py is one; a script or a
  test need not be): marks the absl flags parsed, every flag keeping its value (its default,
  no command line being read). Called only when worker processes are asked for."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
