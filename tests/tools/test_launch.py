"""The launcher's bookkeeping with real child processes: which failure it names, that a
process that ignores SIGTERM is killed once the grace period is over, and that a second
signal kills the job and says so."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lkca_jax.tools import launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Process 1 fails at once; process 0 fails right after it, once process 1 has exited (a
# zombie in /proc): as a peer does whose collective broke. The launcher must name process 1.
FIRST_FAILS_THEN_ITS_PEER = textwrap.dedent(
  """
  import os, sys, time
  marker = sys.argv[1]
  if os.environ["JAX_PROCESS_ID"] == "1":
    with open(marker + ".tmp", "w") as f:
      f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    os._exit(3)
  while not os.path.exists(marker):
    time.sleep(0.001)
  pid = int(open(marker).read())
  def state():
    try:
      return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
      return "reaped"
  while state() not in ("Z", "reaped"):
    time.sleep(0.001)
  time.sleep(0.02)
  os._exit(4)
  """
)

# Process 1 fails; process 0 ignores SIGTERM and would sleep for a minute.
PEER_IGNORES_SIGTERM = textwrap.dedent(
  """
  import os, signal, time
  if os.environ["JAX_PROCESS_ID"] == "1":
    time.sleep(0.5)
    os._exit(5)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  time.sleep(60)
  """
)


def test_the_process_that_failed_first_is_named_though_its_peer_fails_at_once(tmp_path, capsys):
  marker = tmp_path / "pid_of_process_1"
  for _ in range(3):  # each time: a polling launcher often saw both dead at once
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-c", FIRST_FAILS_THEN_ITS_PEER, str(marker)]
    assert launch.launch(command, processes=2, grace=5) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "launch: process 1 of 2 failed (exit code 3); stopped the others"


def test_a_peer_that_ignores_sigterm_is_killed_after_the_grace_period(capsys):
  began = time.monotonic()
  command = [sys.executable, "-c", PEER_IGNORES_SIGTERM]
  assert launch.launch(command, processes=2, grace=1) == 5
  assert time.monotonic() - began < 30  # not the 60 s process 0 would have slept
  err = capsys.readouterr().err
  assert err.splitlines()[-1] == "launch: process 1 of 2 failed (exit code 5); stopped the others"


# Both processes say they are up, then ignore SIGINT (a job stuck in its step) for a minute.
STUCK = textwrap.dedent(
  """
  import signal, time
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  print("up", flush=True)
  time.sleep(60)
  """
)


def test_a_second_sigint_kills_the_job_and_says_so_not_a_failed_process():
  launcher = subprocess.Popen(
    [sys.executable, "-m", "lkca_jax.tools.launch", "--", sys.executable, "-c", STUCK],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  up = [launcher.stdout.readline() for _ in range(2)]
  assert sorted(up) == ["[p0] up\n", "[p1] up\n"], up
  began = time.monotonic()
  launcher.send_signal(signal.SIGINT)  # forwarded, and ignored
  time.sleep(0.5)
  launcher.send_signal(signal.SIGINT)  # the second: the job is killed
  _, err = launcher.communicate(timeout=30)
  assert time.monotonic() - began < 20  # not the minute the processes would sleep
  assert launcher.returncode == 128 + signal.SIGINT, err
  assert err.splitlines()[-1] == (
    "launch: killed the job's processes on a second SIGINT; the same command resumes it from "
    "their last checkpoint"
  )


@pytest.mark.parametrize("interpreter", [[], [sys.executable]], ids=["main.py", "python main.py"])
def test_main_py_without_multihost_is_refused_before_any_process_starts(tmp_path, interpreter):
  # Each process would train alone in the one workdir; the second would find it in use.
  command = [*interpreter, "main.py", "--config", "configs/digits.py", f"--workdir={tmp_path}/r"]
  result = subprocess.run(
    [sys.executable, "-m", "lkca_jax.tools.launch", "--", *command],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines == ["error: main.py joins the job only with --multihost; add it to the command"]
  assert not (tmp_path / "r").exists()
