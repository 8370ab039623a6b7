"""tests/conftest.py: a test process that crashes reports the thread that crashed, alone."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

CRASHES_IN_A_THREAD = """
import ctypes
import threading


def read_address_zero():
  ctypes.string_at(0)


def test_a_thread_crashes():
  thread = threading.Thread(target=read_address_zero)
  thread.start()
  thread.join()
"""


@pytest.mark.slow  # starts pytest in a process of its own
def test_a_crashed_worker_reports_the_crashing_threads_frames_and_not_the_main_threads(tmp_path):
  (tmp_path / "test_crash.py").write_text(CRASHES_IN_A_THREAD)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-n", "1", "test_crash.py"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  out = result.stdout + result.stderr
  assert result.returncode != 0 and "crashed while running" in out, out
  assert "Segmentation fault" in out and "line 7 in read_address_zero" in out, out
  assert "in test_a_thread_crashes" not in out, out  # the main thread, waiting in join()
