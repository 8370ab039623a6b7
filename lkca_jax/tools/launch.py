"""Runs one multi-process job on this machine: a pod run rehearsed on a laptop.

    python -m lkca_jax.tools.launch --processes 2 --devices_per_process 4 -- \\
        main.py --multihost --config configs/digits.py --workdir workdirs/two

Starts the command once per process with JAX_COORDINATOR_ADDRESS (a free port
on 127.0.0.1), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, and each process on
`--devices_per_process` virtual CPU devices. The command is what follows `--`
(or the first argument that is not a flag: its own flags are not the
launcher's); main.py without --multihost is refused, since each process would then
train alone in the one workdir. Output lines are prefixed with `[pN]`. SIGTERM/SIGINT are
forwarded to every process (a second one kills them, and the launcher exits
128 + the signal's number, saying so). If a process fails, the
others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the
launcher exits non-zero, with one line naming the process that failed first.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
# After a process fails, how long the others get to stop on SIGTERM before SIGKILL
# (one blocked in a collective with the dead one never reads its SIGTERM).
GRACE_S = 10.0


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict, *, port: int, processes: int, index: int, devices_per_process: int
) -> dict:
  env = dict(
    base,
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # not every interface
    JAX_NUM_PROCESSES=str(processes),
    JAX_PROCESS_ID=str(index),
    PYTHONUNBUFFERED="1",
  )
  if devices_per_process:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}"
    env["XLA_FLAGS"] = env["XLA_FLAGS"].strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def _describe(code: int) -> str:
  return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _wait_for_all(children, grace: float) -> tuple[int, int] | None:
  """Waits for every child; returns (index, exit code) of the first to fail, or None.

  First by the order the processes ended, not by the lowest index found dead at one
  look: a peer that fails because of it (a broken collective) can end moments later. A
  thread per child blocks in wait(), so each exit is queued as it happens. After the
  first failure the others get SIGTERM, then SIGKILL once `grace` seconds have passed.
  """
  exits = queue.Queue()
  for index, child in enumerate(children):
    threading.Thread(target=lambda i=index, c=child: exits.put((i, c.wait())), daemon=True).start()
  failed, deadline = None, None
  for _ in children:
    while True:
      try:
        index, code = exits.get(timeout=0.1)  # short: signal handlers run in between
        break
      except queue.Empty:
        if deadline is not None and time.monotonic() > deadline:
          for child in children:
            if child.poll() is None:
              child.kill()
    if code != 0 and failed is None:  # the others cannot finish without it
      failed = (index, code)
      for child in children:
        if child.poll() is None:
          child.terminate()
      deadline = time.monotonic() + grace
  return failed


def launch(
  command: list[str], *, processes: int, devices_per_process: int = 0, grace: float = GRACE_S
) -> int:
  """Runs `command` as `processes` processes of one job; returns the exit code for the job."""
  if command and command[0].endswith(".py"):
    command = [sys.executable, *command]
  port = free_port()
  children, threads = [], []
  for index in range(processes):
    env = process_env(
      os.environ,
      port=port,
      processes=processes,
      index=index,
      devices_per_process=devices_per_process,
    )
    # A session of their own: a terminal's Ctrl-C reaches them only through the forwarding.
    child = subprocess.Popen(
      command,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    children.append(child)
    for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
      thread = threading.Thread(target=_forward, args=(stream, f"[p{index}] ", out), daemon=True)
      thread.start()
      threads.append(thread)

  signals = []

  def forward(signum, frame):  # a second signal: the job is stuck, end it
    signals.append(signum)
    for child in children:
      if child.poll() is None:
        child.send_signal(signum) if len(signals) == 1 else child.kill()

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    failed = _wait_for_all(children, grace)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for thread in threads:
    thread.join(timeout=5)
  if len(signals) > 1:  # killed on the user's word: no process failed
    name = signal.Signals(signals[-1]).name
    print(
      f"launch: killed the job's processes on a second {name}; the same command resumes "
      "it from their last checkpoint",
      file=sys.stderr,
    )
    return 128 + signals[-1]
  if failed is None:
    return 0
  index, code = failed
  print(
    f"launch: process {index} of {processes} failed ({_describe(code)}); stopped the others",
    file=sys.stderr,
  )
  return code if code > 0 else 1


def define_flags() -> None:
  flags.DEFINE_integer("processes", 2, "Processes of the job.", lower_bound=1)
  flags.DEFINE_integer(
    "devices_per_process",
    0,
    "Virtual CPU devices per process (0: the platform's own devices).",
    lower_bound=0,
  )
  flags.DEFINE_float(
    "grace", GRACE_S, "Seconds the others get to stop after one fails.", lower_bound=0
  )
  # The first positional argument starts the command: its flags are its own, not ours.
  FLAGS.set_gnu_getopt(False)


def main(argv) -> int:
  command = argv[1:]  # after --, or from the first argument that is not a flag
  if not command:
    cli.fail("no command; pass it after --, e.g. -- main.py --multihost --config ...")
  # Without --multihost each process would train alone, all in one workdir.
  script = next((a for a in command if a.endswith(".py")), None)  # main.py, or python main.py
  if script and os.path.basename(script) == "main.py" and "--multihost" not in command:
    cli.fail("main.py joins the job only with --multihost; add it to the command")
  return launch(
    command,
    processes=FLAGS.processes,
    devices_per_process=FLAGS.devices_per_process,
    grace=FLAGS.grace,
  )


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags, arguments=True)
