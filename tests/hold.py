"""Runs a program (main.py) held at one point of its training until a signal lands.

  python tests/hold.py POINT:STEP main.py [ARGS...]
  python tests/hold.py POINT:STEP -m lkca_jax.tools.reproduce [ARGS...]

Installs the trainer's `on_event` hook: at POINT ("eval": before evaluating, "save":
after a checkpoint write has started, "end": after the training loop, before waiting for
the last write) of STEP it says "holding at POINT:STEP" on stderr, then waits until the
run receives a signal: SIGTERM or SIGINT (which the run then handles) or SIGUSR1 (which
just releases the hold). At "save" and "end" it spins holding the GIL (a long switch
interval), so a write in flight stays unfinished (orbax finalizes it from Python
threads); at "eval" it sleeps, so that earlier writes still in flight finish.
Gives up after a minute. The tests use it to make a signal land at one moment however
fast the machine runs.
"""

import functools
import os
import runpy
import signal
import sys
import time

from lkca_jax import train


def hold_at(target: str):
  def on_event(point: str, step: int, stop: train.StopSignal) -> None:
    if f"{point}:{step}" != target:
      return
    released = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: released.append(True))
    print(f"holding at {target}", file=sys.stderr, flush=True)
    interval, deadline = sys.getswitchinterval(), time.monotonic() + 60
    hold_the_gil = point in ("save", "end")
    if hold_the_gil:
      sys.setswitchinterval(60.0)
    while stop.received is None and not released and time.monotonic() < deadline:
      if not hold_the_gil:
        time.sleep(0.01)
    sys.setswitchinterval(interval)
    if stop.received is None and not released:
      print(f"gave up holding at {target} after a minute", file=sys.stderr, flush=True)
    # A release that comes late must not end the run (SIGUSR1's default action).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN if previous == signal.SIG_DFL else previous)

  return on_event


if __name__ == "__main__":
  target, program, *args = sys.argv[1:]
  train.train_and_evaluate = functools.partial(train.train_and_evaluate, on_event=hold_at(target))
  if program == "-m":  # as `python -m MODULE` would: the working directory first on the path
    module, *args = args
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  else:
    sys.argv = [program, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(program))  # as `python program` would
    runpy.run_path(program, run_name="__main__")
