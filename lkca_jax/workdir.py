"""A run's workdir: checked before anything expensive starts, and held by one run at a time.

`prepare` turns a path that cannot hold a run's files (a regular file, a place
where no directory can be made, a directory that cannot be written) into one
`WorkdirError` naming the path and the fix. `hold` keeps a second run off a
workdir while one trains there: the holder writes who it is (host, process id,
start time) into `<workdir>/lock` and holds an advisory lock (flock) on that
file. The kernel releases the lock when the holder's process ends in any way,
SIGKILL included, so a lock left behind by a dead run is told apart from a live
one without guessing from process ids, and taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator

from absl import logging
from etils import epath

LOCK_FILE = "lock"


# The config file that reads a run's config back from its workdir (--config FILE:WORKDIR).
READ_BACK_CONFIG = "configs/workdir.py"


class WorkdirError(ValueError):
  """The workdir cannot be used; the message names it and the fix."""


class WorkdirBusyError(WorkdirError):
  """Another live run holds the workdir."""


def _is_local(path) -> bool:
  return "://" not in str(path)


def prepare(path, *, flag: str = "--workdir") -> epath.Path:
  """The workdir `path`, created if missing, after a real write shows it can be written."""
  path = epath.Path(path)
  fix = "pass a directory you can write (it is created if missing)"
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"{flag}={path} is a file, not a directory; {fix}")
  try:
    path.mkdir(parents=True, exist_ok=True)
    if _is_local(path):  # permissions, read-only mounts and full disks show only on a write
      probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
      probe.write_bytes(b"")
      probe.unlink()
  except OSError as e:
    raise WorkdirError(f"{flag}={path} cannot be written ({e.strerror or e}); {fix}") from None
  return path


def _holder() -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }


def describe(holder: dict) -> str:
  """ "host h, process 123, started 2026-12-03T07:00:00+00:00": who holds (or held) a lock."""
  return (
    f"host {holder.get('host', '?')}, process {holder.get('pid', '?')}, "
    f"started {holder.get('started', '?')}"
  )


def _read_holder(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode(errors="replace").strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"host": "?", "pid": "?", "started": "?"}  # a write cut short: still a stale holder
  return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
  os.fsync(fd)


@contextlib.contextmanager
def hold(path) -> Iterator[dict | None]:
  """Holds the prepared workdir `path` for the duration; yields the holder record.

  Raises WorkdirBusyError, naming the holder, if a live run holds it. A lock
  whose holder is gone is taken over with a warning. A remote workdir (gs://)
  has no such lock: a warning says so.
  """
  if not _is_local(path):
    logging.warning("%s is not local: it is not locked against a second run", path)
    yield None
    return
  fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd) or {}
      raise WorkdirBusyError(
        f"--workdir={path} is in use by a run still going ({describe(holder)}); wait for it "
        "to end, stop it, or pass another --workdir"
      ) from None
    stale = _read_holder(fd)
    if stale:
      logging.warning("%s: took over the lock of a run that is gone (%s)", path, describe(stale))
    holder = _holder()
    _write_holder(fd, holder)
    try:
      yield holder
    finally:
      os.ftruncate(fd, 0)  # a clean end leaves no holder behind
  finally:
    os.close(fd)  # releases the flock
