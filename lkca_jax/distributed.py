"""One training run over several processes: start-up, agreement checks and a shared stop.

Every process runs the same program on its own devices; `jax.devices()` then
lists all processes' devices and one `jit` spans them. What each process
decides on its own (its config, its device count, whether a signal reached it)
must agree across processes, or the collectives deadlock: the helpers here
gather those decisions so that every process acts on the same answer.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import sys
import traceback
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lkca_jax import adapters

# A process that sends no heartbeat for this long is dead to the others, which then
# stop instead of waiting in a collective that cannot complete (jax's default is 100 s).
HEARTBEAT_TIMEOUT_S = 15
# How long a process waits for all the others to join at start-up, and at the end.
INITIALIZATION_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 60
# How long the first process to finish compiling the steps waits for the last one.
COMPILE_TIMEOUT_S = 1800
# Signals are combined across processes every this many steps (a collective that
# waits for the step before it, so not every step).
STOP_VOTE_EVERY = 4


_barriers = itertools.count()


class MismatchError(ValueError):
  """The processes of one job were started with different settings."""


def initialize(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """jax.distributed.initialize with bounded timeouts; unset arguments come from the cluster.

  Unset arguments come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
  $JAX_PROCESS_ID (which `lkca_jax.tools.launch` sets for local runs), else jax
  detects them (TPU pod slices, SLURM, Open MPI, Kubernetes).
  """
  # Cross-process collectives on CPU devices (the local rehearsal): gloo over TCP.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # jax itself reads JAX_COORDINATOR_ADDRESS; the launcher also sets the ranks this way.
  env = {
    name: int(os.environ[name])
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if os.environ.get(name)
  }
  num_processes = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
  kwargs = {
    name: value
    for name, value in (
      ("coordinator_address", coordinator),
      ("num_processes", num_processes),
      ("process_id", process_id),
    )
    if value is not None
  }
  jax.distributed.initialize(
    **kwargs,
    initialization_timeout=INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
  )


def exit_on_failure(fn: Callable[[], None]) -> None:
  """Runs `fn`; if it fails (an exception or a non-zero sys.exit), ends the process at once.

  A normal exit waits at jax's shutdown barrier for every process, which a
  failed one's peers never reach. Exiting without it lets them notice the
  missing process (a broken connection or missed heartbeats) and stop too.
  """
  try:
    fn()
    return
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code == 0:
      raise
  except BaseException:  # noqa: B036 - whatever it is, the peers must not wait for us
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _digest(text: str) -> np.ndarray:
  """Two int32 words of a SHA-256 (allgather moves 32-bit integers without x64)."""
  words = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)
  return (words >> 1).astype(np.int32)


def check_same_everywhere(config_json: str, workdir: str) -> None:
  """Raises MismatchError unless every process has this config, workdir and device count."""
  if jax.process_count() == 1:
    return
  mine = np.concatenate(
    [_digest(config_json), _digest(workdir), np.asarray([jax.local_device_count()], np.int32)]
  )
  everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 5)
  for what, columns in (("config", slice(0, 2)), ("workdir", slice(2, 4))):
    differ = [
      p
      for p in range(len(everyone))
      if not np.array_equal(everyone[p, columns], everyone[0, columns])
    ]
    if differ:
      raise MismatchError(
        f"the {what} of process {differ[0]} differs from process 0's; start "
        "every process with the same command"
      )
  counts = everyone[:, 4].tolist()
  if len(set(counts)) > 1:
    raise MismatchError(
      f"the processes see different numbers of local devices {counts}; give "
      "every process the same number"
    )


def wait_for_everyone(name: str, timeout_s: float) -> None:
  """Returns once every process has called this with `name` (no collective, no device).

  A barrier of jax's coordination service, for points that processes reach
  far apart in time: a collective there could give up first (gloo waits 30 s
  for a peer to join a new group of devices, and jax offers no setting).
  """
  if jax.process_count() == 1:
    return
  # A fresh id each time (every process counts the same calls): a barrier's id is used once.
  adapters.coordination_barrier(f"lkca_jax/{name}/{next(_barriers)}", timeout_s)


def compile_everywhere(name: str, *calls) -> None:
  """Compiles each (jitted, args) of `calls`, then waits until every process has compiled.

  Only process 0 writes jax's persistent compilation cache, so on a rerun it
  loads its programs at once while the others compile theirs. Its first call
  would then wait in a collective for as long as they compile, and gloo
  (processes of CPU devices) gives up on a peer after 30 s. Here the wait is
  at a barrier instead, and the first calls start together. jit keeps what is
  compiled here for its first call with the same arguments.
  """
  if jax.process_count() == 1:
    return
  for jitted, args in calls:
    jitted.lower(*args).compile()
  wait_for_everyone(f"{name} compiled", COMPILE_TIMEOUT_S)


def in_order(tree):
  """With several processes, waits until `tree` is computed; returns it.

  Programs with collectives must run in the same order in every process. One
  that depends on the previous (the train steps) does; independent ones
  dispatched asynchronously (the evaluation batches, the stop vote) may
  overlap, and CPU collectives then deadlock when processes match them up in
  different orders.
  """
  return jax.block_until_ready(tree) if jax.process_count() > 1 else tree


def process_zero_says(flag: bool) -> bool:
  """Process 0's `flag`, in every process (a decision only process 0 can make)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def agree_on_stop(received: str | None, step: int, after=None) -> str | None:
  """The signal name every process stops for at `step`, or None to go on.

  A signal reaches each process at a slightly different step; stopping on the
  local flag alone would leave the others waiting in the next step's all-reduce.
  With several processes the flags are combined every STOP_VOTE_EVERY steps,
  the same steps everywhere, once `after` (the step's output) is computed.
  """
  if jax.process_count() == 1:
    return received
  if step % STOP_VOTE_EVERY:
    return None
  in_order(after)  # the step's own collectives first
  mine = np.int32(signal.Signals[received].value if received else 0)
  agreed = int(np.max(multihost_utils.process_allgather(mine)))
  return signal.Signals(agreed).name if agreed else None
