"""The workdir: unusable paths are one WorkdirError; one live run holds it at a time, and a
dead run's lock is taken over. Holders are real processes."""

import os
import signal
import subprocess
import sys

import pytest

from lkca_jax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_regular_file_is_refused_and_left_as_it_was(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("keep me")
  with pytest.raises(workdir.WorkdirError, match=r"notes.txt is a file, not a directory"):
    workdir.prepare(path)
  assert path.read_text() == "keep me"


def test_a_place_where_no_directory_can_be_made_is_refused():
  with pytest.raises(workdir.WorkdirError, match=r"/proc/lkca-run cannot be written .*pass a"):
    workdir.prepare("/proc/lkca-run")


def test_a_missing_directory_is_created_and_left_clean(tmp_path):
  path = workdir.prepare(tmp_path / "a" / "b")
  assert path.is_dir() and list(path.iterdir()) == []  # the write probe is gone


def start_holder(path):
  """A process that holds `path` until it is killed; returned once it holds it."""
  code = (
    "import sys, time\n"
    "from lkca_jax import workdir\n"
    f"with workdir.hold({str(path)!r}):\n"
    "  print('held', flush=True)\n"
    "  time.sleep(120)\n"
  )
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_holder_refuses_a_second_run_by_name(tmp_path):
  holder = start_holder(tmp_path)
  try:
    with pytest.raises(workdir.WorkdirBusyError) as refused:
      with workdir.hold(tmp_path):
        pytest.fail("a second holder got in")
    message = str(refused.value)
    assert f"process {holder.pid}" in message and os.uname().nodename in message
    assert "started 20" in message  # an ISO date
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  holder = start_holder(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert str(holder.pid) in (tmp_path / workdir.LOCK_FILE).read_text()  # left behind
  with workdir.hold(tmp_path) as me:
    assert me["pid"] == os.getpid()
  assert f"took over the lock of a run that is gone (host {os.uname().nodename}, " in caplog.text
  assert f"process {holder.pid}," in caplog.text
  # A clean end leaves no holder: the next run takes it over without a warning.
  caplog.clear()
  with workdir.hold(tmp_path):
    pass
  assert "took over" not in caplog.text
