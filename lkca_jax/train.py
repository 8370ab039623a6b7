"""Training and evaluation: the loop around one jit-compiled, state-donating step
(`steps.make_train_step`) over a `data` mesh.

Parameters and optimizer state are replicated over a 1-D mesh of all devices,
batches are sharded on its `data` axis, and XLA inserts the gradient
all-reduce (the `jit` successor of `pmap` data parallelism). Several runs
(`runs.run_specs`) train side by side as one program along a leading run axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import (
  adapters,
  config_checks,
  distributed,
  files,
  finetune,
  metric_writer,
  mixing,
  models,
  run_files,
  runs,
  schedules,
  steps,
)
from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import data as data_lib
from lkca_jax import workdir as workdir_lib
from lkca_jax.data import pipeline as pipeline_lib

ConfigError = config_checks.ConfigError  # one class: main.py and the tools catch train.ConfigError


class NonFiniteLossError(RuntimeError):
  pass


class WriteFailedError(RuntimeError):
  """A checkpoint or the summary could not be written (a full disk, a file-size limit)."""


# What every command reports as one `error:` line rather than a traceback
# (`tools.cli.fail_training` gives the exit code). INPUT_ERRORS: the config, or the data,
# checkpoint or workdir it names, is wrong or in use. RUN_FAILURES: the run failed on its
# own (every seed diverged, a write failed).
INPUT_ERRORS = (
  ConfigError,
  checkpoint_lib.CheckpointError,
  distributed.MismatchError,
  workdir_lib.WorkdirError,
)
RUN_FAILURES = (NonFiniteLossError, WriteFailedError)
REPORTED_ERRORS = INPUT_ERRORS + RUN_FAILURES


# --- config → objects -------------------------------------------------------
def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Preset overrides that are set (not None) in `config.model_overrides`."""
  overrides = {}
  for key, value in config.model_overrides.items():
    if key == "mixer_options":
      options = {
        name: {k: v for k, v in opts.items() if v is not None} for name, opts in value.items()
      }
      options = {name: opts for name, opts in options.items() if opts}
      if options:
        overrides[key] = options
    elif value is not None:
      overrides[key] = value.split(",") if key == "mixer" and "," in value else value
  return overrides


def dataset_spec(config) -> data_lib.DatasetSpec:
  """The dataset's spec as the config trains it: its class subset and image size applied."""
  try:
    spec = data_lib.get_spec(config.dataset.name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  classes = config.dataset.classes
  if classes:
    if not 2 <= classes <= spec.num_classes:
      raise ConfigError(
        f"dataset.classes={classes} must be between 2 and {spec.num_classes} "
        f"(or 0 for all of {spec.name})"
      )
    spec = dataclasses.replace(spec, num_classes=classes)
  if config.dataset.image_size:
    spec = dataclasses.replace(spec, image_size=(config.dataset.image_size,) * 2)
  return spec


def build_model(config, spec, rngs: nnx.Rngs) -> models.ViT:
  return models.create_model(
    config.model,
    num_classes=spec.num_classes,
    image_size=spec.image_size,
    channels=spec.channels,
    patch_size=config.patch_size,
    dtype=models.DTYPES[config.dtype],
    rngs=rngs,
    **model_kwargs(config),
  )


# --- the run -----------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step; cheap until `load_data`."""

  config: ml_collections.ConfigDict
  spec: Any
  mesh: Any
  model: models.ViT
  num_params: int

  @classmethod
  def prepare(cls, config, *, checkpoints=None) -> Run:
    """Validates the config, dataset and devices; builds the model. Raises ConfigError.

    `checkpoints` is where the run resumes or is evaluated from (a checkpoints directory or
    one step directory): where it holds a checkpoint, `init_from` is not checked, since
    nothing reads it (a fine-tuned run resumes, and is evaluated, without its source)."""
    config_checks.validate(config)  # every key's own range first, before anything is built
    spec = dataset_spec(config)
    for key in ("mean", "std"):
      if len(config.dataset[key]) != spec.channels:
        raise ConfigError(
          f"dataset.{key} has {len(config.dataset[key])} values but "
          f"{spec.name} images have {spec.channels} channels"
        )
    # The library rejects bad arguments (sizes that do not divide, unknown names) with
    # ValueError; anything else raised here is a bug and keeps its traceback.
    try:
      pipeline_lib.augment_config(config)
      pipeline_lib.check_epoch(config.repeats, config.epoch_order, config.epoch_length)
      pipeline_lib.check_placement(config, spec)
      schedules.check_schedule(config.optimizer)
      mesh = pipeline_lib.make_mesh(config.num_devices)
      pipeline_lib.check_global_batch(config.batch_size, mesh.devices.size, config.microbatches)
      mixing.check_groups(config.batch_size, config.mixing.groups)
      model = build_model(config, spec, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if not (checkpoints and checkpoint_lib.holds_checkpoint(checkpoints)):
      finetune.check_init_from(config, model)
    try:
      data_lib.check_available(
        spec.name,
        data_dir=config.dataset.data_dir,
        manual_dir=config.dataset.manual_dir,
        download=config.dataset.download,
      )
    except data_lib.DatasetUnavailableError as e:
      raise ConfigError(str(e)) from None
    return cls(config, spec, mesh, model, models.count_params(model))

  def load_data(self, key) -> pipeline_lib.Pipeline:
    t0 = time.time()
    # A download that cannot happen is the user's to fix, as an unprepared dataset is; so is
    # a config that the loaded data cannot take (a batch larger than a small subset's epoch):
    # the library says so with ValueError, as Run.prepare's checks do.
    try:
      pipeline = pipeline_lib.from_config(self.config, self.spec, self.mesh, key)
    except ValueError as e:  # DatasetUnavailableError and DamagedDatasetError among them
      raise ConfigError(str(e)) from None
    logging.info(
      "data: %d train / %d test images of %s on %s in %.1fs",
      pipeline.train.size,
      pipeline.test.size,
      pipeline.image_shape,
      pipeline.placement,
      time.time() - t0,
    )
    return pipeline


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag (`received`, the signal's name) checked between steps.

  One object may be entered for several trainings in turn (an experiment's rows): it keeps
  `received`, so a signal that lands after a training's last check (in its last step) still
  tells the caller to stop before the next one. Only the main thread can set handlers: in
  another (a notebook's background training) it sets none, and the process's own stay.
  """

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class _TrainClock:
  """Training throughput measured between device synchronisations.

  Dispatch is asynchronous, so time is read only after blocking on a step's
  result; compilation (the first step of a process), evaluation and
  checkpointing fall outside the timed spans.
  """

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.compiled = False
    self.running = False
    self.start, self.steps = 0.0, 0
    self.seconds, self.images = 0.0, 0

  def step(self, metrics):
    if not self.compiled:  # time from the end of the compiling step
      jax.block_until_ready(metrics)
      self.compiled = True
      self.resume()
    else:
      self.steps += 1

  def stop(self, metrics):
    jax.block_until_ready(metrics)
    if self.running:
      self.seconds += time.perf_counter() - self.start
      self.images += self.steps * self.batch_size
    self.running = False

  def resume(self):
    if self.compiled and not self.running:
      self.running, self.start, self.steps = True, time.perf_counter(), 0

  def images_per_second(self) -> float | None:
    return self.images / self.seconds if self.seconds else None


def _split_model(model):
  model.train()
  train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return train_graphdef, eval_graphdef, params, rest


def _run_eval(eval_fn, params, rest, pipeline) -> list[dict]:
  """Test loss, top-1 and top-5 of each run (an `eval_fn` of `steps.make_eval_step`).

  Each batch's sums come to the host before the next batch's step is dispatched, and are
  added there (the same float32 additions): eager device adds, one program per leaf, put
  between collective programs in flight once left XLA:CPU's in-process all-gather waiting
  for a participant that never came (a worker of the suite aborted, or with a longer
  timeout hung; docs/benchmarks.md 2026-12-06e)."""
  totals = None
  for batch in pipeline.eval_batches():
    sums = jax.device_get(distributed.in_order(eval_fn(params, rest, batch)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return [
    {key: float(totals[key][r]) / float(totals["count"][r]) for key in ("loss", "top1", "top5")}
    for r in range(len(totals["count"]))
  ]


def _run_evals(eval_fn, params, rest, average, pipeline) -> list[dict]:
  """`_run_eval` of the parameters and of their moving average (`ema_decay`; None: there is
  none), as ema_loss, ema_top1 and ema_top5."""
  results = _run_eval(eval_fn, params, rest, pipeline)
  if average is None:
    return results
  averaged = _run_eval(eval_fn, average, rest, pipeline)
  return [
    {**r, **{f"ema_{key}": value for key, value in a.items()}}
    for r, a in zip(results, averaged, strict=True)
  ]


# --- device memory ---------------------------------------------------------------
def device_memory_limit(device=None) -> int | None:
  """Bytes the device may allocate, or None where the backend does not say (CPU)."""
  device = device or jax.local_devices()[0]  # another process's device has no stats here
  return (device.memory_stats() or {}).get("bytes_limit")


def check_runs_fit(
  num_runs: int, step_bytes: int, limit_bytes: int, reserved_bytes: int = 0
) -> int:
  """How many runs fit; raises ConfigError when `num_runs` do not.

  `step_bytes` is what the compiled step of `num_runs` runs holds at its peak
  (arguments, outputs not aliased to them, temporaries); each run is taken to
  need an equal share of it. `reserved_bytes` (the dataset on the device) is
  held apart from the limit.
  """
  per_run = step_bytes / num_runs
  free = limit_bytes - reserved_bytes
  fit = max(int(free // per_run), 0) if per_run > 0 else num_runs
  if fit < num_runs:
    gib = 2.0**30
    raise ConfigError(
      f"num_runs: {num_runs} runs need about {step_bytes / gib:.2f} GiB of device memory "
      f"({per_run / gib:.2f} GiB each) but {free / gib:.2f} GiB are free: at most {fit} "
      "fit; lower --config.num_runs or the sweep, or raise --config.microbatches (a batch in "
      "slices, one slice's activations at a time)"
    )
  return fit


def step_memory_bytes(compiled) -> int:
  """Peak bytes of a compiled program, from its memory analysis."""
  m = compiled.memory_analysis()
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


# --- the training ----------------------------------------------------------------
@dataclasses.dataclass
class Training:
  """The compiled pieces of `num_runs` runs side by side: data, state, the two steps.

  With one run the state, batches and keys are a single run's; with several,
  every leaf has a leading run axis. The steps' per-run values (`runs.hparams`,
  `alive`, metrics) always have one.
  """

  pipeline: pipeline_lib.Pipeline
  state: steps.TrainState
  compiled_step: Any  # jit(runs_step(state, batch, rng, hp, alive)), state donated
  eval_step: Any  # jit(eval_step(params, rest, batch)) -> per-run sums
  schedule: optax.Schedule
  total_steps: int
  train_key: jax.Array
  hparams: dict  # {sweepable key: (runs,) float32}
  specs: list  # runs.RunSpec of each run
  all_alive: jax.Array  # (runs,) True: the mask of a fresh start
  saved_layout: Any  # the state's tree with the model's Variables: what checkpoints hold
  _order: tuple = dataclasses.field(default=(-1, None), repr=False)  # (epoch, its order)

  @property
  def num_runs(self) -> int:
    return len(self.specs)

  def train_step(self, state: steps.TrainState, batch, rng, alive=None):
    """The jitted update on `batch` (state donated); every run alive unless `alive` says."""
    return self.compiled_step(state, batch, rng, self.hparams, self._alive(alive))

  def _alive(self, alive):
    return self.all_alive if alive is None else alive

  def saved_form(self, state: steps.TrainState) -> steps.TrainState:
    """`state` as checkpoints hold it: its arrays in the model's Variables."""
    return jax.tree.unflatten(self.saved_layout, jax.tree.leaves(state))

  def epoch_order(self, epoch: int) -> jax.Array:
    """The epoch's example order, drawn once and kept until the next epoch."""
    if self._order[0] != epoch:
      self._order = (epoch, self.pipeline.epoch_order(epoch))
    return self._order[1]

  def batch(self, step: int) -> dict:
    """The augmented training batch of global step `step` (of every run)."""
    return self.pipeline.train_batch(self.epoch_order(step // self.pipeline.steps_per_epoch), step)

  def step_args(self, state: steps.TrainState, step: int, alive=None) -> tuple:
    """The arguments of `compiled_step` at global step `step`."""
    return (state, self.batch(step), self.train_key, self.hparams, self._alive(alive))

  def step(self, state: steps.TrainState, step: int, alive=None):
    """One training step at global step `step`: its batch, then the jitted update."""
    return self.compiled_step(*self.step_args(state, step, alive))

  def compile_everywhere(self, state: steps.TrainState, step: int) -> None:
    """With several processes: both steps compiled in every process before the first runs."""
    if jax.process_count() == 1:
      return  # the eval batch below is not built for nothing
    distributed.compile_everywhere(
      "steps",
      (self.compiled_step, self.step_args(state, step)),
      (self.eval_step, (state.params, state.rest, next(iter(self.pipeline.eval_batches())))),
    )


def _keys(specs) -> tuple[jax.Array, jax.Array]:
  """(data key, train key): a single run's, or stacked along the run axis."""
  keys = [runs.run_keys(spec.seed) for spec in specs]
  if len(specs) == 1:
    return keys[0]
  return tuple(jnp.stack([k[i] for k in keys]) for i in (0, 1))


def _initial_state(run: Run, specs, tx) -> steps.TrainState:
  """Each run's state from its own seed, as its single run builds it (stacked if several)."""
  by_seed = {}
  for spec in specs:
    if spec.seed not in by_seed:
      model = (
        run.model
        if spec.seed == run.config.seed
        else build_model(spec.config, run.spec, nnx.Rngs(params=spec.seed, dropout=spec.seed + 1))
      )
      _, _, params, rest = _split_model(model)
      by_seed[spec.seed] = (params, rest, tx.init(params))
  parts = [by_seed[spec.seed] for spec in specs]
  params, rest, opt_state = (steps.as_runs(part) for part in zip(*parts, strict=True))
  step = jnp.zeros((len(specs),) if len(specs) > 1 else (), jnp.int32)
  return steps.TrainState(step=step, params=params, opt_state=opt_state, rest=rest)


def _check_fit(t: Training, memory_limit: int | None) -> None:
  """With several runs on a device that states its memory: ConfigError if they do not fit."""
  limit = memory_limit or device_memory_limit()  # this process's first device
  if t.num_runs == 1 or not limit:
    return
  lowered = t.compiled_step.lower(*t.step_args(t.state, 0))  # compiled once more, ahead of time
  dataset = sum(
    x.nbytes
    for split in (t.pipeline.train, t.pipeline.test)
    if split.on_device
    for x in (split.images, split.labels)
  )
  check_runs_fit(t.num_runs, step_memory_bytes(lowered.compile()), limit, dataset)


def build_training(run: Run, config, *, memory_limit: int | None = None) -> Training:
  """Data, initial state and compiled steps of `config`'s runs (one, or several side by side).

  With several runs on a device that states its memory (or given `memory_limit`
  bytes), raises ConfigError before training when they do not fit.
  """
  specs = runs.run_specs(config)
  data_key, train_key = _keys(specs)
  pipeline = run.load_data(data_key)
  total_steps = steps.total_train_steps(config, pipeline.steps_per_epoch)
  schedule = schedules.learning_rate(config, pipeline.steps_per_epoch, total_steps)
  train_graphdef, eval_graphdef, _, _ = _split_model(run.model)
  per_run = [runs.hparams(spec.config) for spec in specs]
  hp = {key: jnp.asarray([h[key] for h in per_run], jnp.float32) for key in per_run[0]}
  replicated = NamedSharding(run.mesh, P())
  decay_mask = steps.weight_decay_mask(config, run.model)
  tx = steps.create_optimizer(config, schedule, decay_mask=decay_mask)
  state = _initial_state(run, specs, tx)
  saved_layout, state = jax.tree.structure(state), steps.variable_values(state)
  state, hp, alive = pipeline_lib.put_tree(  # onto every process's devices
    (state, hp, jnp.ones(len(specs), bool)), replicated
  )
  state_sharding = jax.tree.map(lambda _: replicated, state)
  train_step = steps.make_train_step(
    train_graphdef, config, pipeline.steps_per_epoch, total_steps, decay_mask
  )
  compiled = jax.jit(
    steps.make_runs_step(train_step, len(specs)),
    in_shardings=(state_sharding, pipeline.train_sharding, *[replicated] * 3),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(steps.make_eval_step(eval_graphdef, len(specs)), out_shardings=replicated)
  t = Training(
    pipeline,
    state,
    compiled,
    eval_step,
    schedule,
    total_steps,
    train_key,
    hp,
    specs,
    alive,
    saved_layout,
  )
  _check_fit(t, memory_limit)
  return t


# --- the loop --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loop:
  """The training loop's state between two pieces of work, passed from one to the next."""

  state: steps.TrainState
  alive: jax.Array  # (runs,) bool: which runs' losses are still finite
  step: int
  records: tuple  # runs.RunRecord of each run
  window: tuple = ()  # per-step metrics not yet fetched from the devices
  window_start: int = 0  # the step before the window's first
  stopped_by: str | None = None  # the signal that stopped training, or "non-finite loss"

  @property
  def all_died(self) -> bool:
    return all(r.died_at_step is not None for r in self.records)


def resume(t: Training, checkpoints: checkpoint_lib.Checkpoints, mesh) -> Loop:
  """The loop at the latest good checkpoint, or at step 0. Damaged ones: a warning each."""
  restored = checkpoints.restore_latest(t.saved_form(t.state))
  if restored is None:
    return Loop(t.state, t.all_alive, 0, tuple(runs.RunRecord() for _ in t.specs))
  step, saved, meta = restored
  state = steps.variable_values(saved)
  logging.info("resumed from %s/%d", checkpoints.directory, step)
  records = runs.records_from_meta(meta, t.num_runs)
  alive = jax.device_put(
    jnp.asarray([r.died_at_step is None for r in records]), NamedSharding(mesh, P())
  )
  return Loop(state, alive, step, records, window_start=step)


def train_one_step(t: Training, loop: Loop) -> tuple[Loop, dict]:
  state, metrics = t.step(loop.state, loop.step, loop.alive)
  loop = dataclasses.replace(
    loop, state=state, alive=metrics["alive"], step=loop.step + 1, window=(*loop.window, metrics)
  )
  return loop, metrics


def _record_deaths(records, alive: np.ndarray, losses: np.ndarray, first_step: int, specs):
  """Records with the step (1-based) and loss of each run's first non-finite step in
  `alive` (steps, runs), if it died there."""
  new = []
  for k, record in enumerate(records):
    if record.died_at_step is None and not alive[:, k].all():
      at = int(np.argmin(alive[:, k]))
      record = dataclasses.replace(
        record, died_at_step=first_step + at + 1, died_with_loss=str(float(losses[at, k]))
      )
      if len(records) > 1:
        logging.warning(
          "run %d (%s) stopped: loss became non-finite at step %d; its parameters stay "
          "those before that step, the other runs go on",
          k,
          runs.run_name(specs[k].seed, specs[k].values),
          record.died_at_step,
        )
    new.append(record)
  return tuple(new)


def _all_died(records, latest: int | None, directory) -> NonFiniteLossError:
  where = (
    f"at step {records[0].died_at_step}"
    if len(records) == 1
    else f"in every run (at steps {', '.join(str(r.died_at_step) for r in records)})"
  )
  kept = (
    "No checkpoint was saved before it"
    if latest is None
    else f"The last checkpoint ({directory}/{latest}) is kept"
  )
  return NonFiniteLossError(
    f"loss became non-finite {where}; training stopped. {kept}: lower the learning rate "
    "or use float32."
  )


def flush(loop: Loop, t: Training, writer) -> Loop:
  """Fetches the window's metrics: records deaths, writes the train scalars, empties it."""
  if not loop.window:
    return loop
  fetched = jax.device_get(list(loop.window))
  alive = np.stack([m["alive"] for m in fetched])  # (steps, runs)
  losses = np.stack([m["loss"] for m in fetched])
  records = _record_deaths(loop.records, alive, losses, loop.window_start, t.specs)
  per_run = []
  for k in range(t.num_runs):
    live = np.flatnonzero(alive[:, k])  # its steps before it died
    keys = [key for key in fetched[0] if key != "alive"]
    per_run.append(
      {key: float(np.mean([fetched[i][key][k] for i in live])) for key in keys}
      if live.size
      else None
    )
  end = loop.window_start + len(fetched)
  writer.write_scalars(end, runs.run_scalars(per_run, "train_"))
  return dataclasses.replace(loop, records=records, window=(), window_start=end)


def _log_eval(step: int, living: list[dict | None]) -> None:
  if len(living) == 1:
    r = living[0]
    logging.info(
      "step %d: test top1 %.4f top5 %.4f loss %.4f%s",
      step,
      r["top1"],
      r["top5"],
      r["loss"],
      f"; moving average top1 {r['ema_top1']:.4f}" if "ema_top1" in r else "",
    )
    return
  top1 = [r["top1"] for r in living if r is not None]
  mean, std = runs.mean_std(top1)
  logging.info(
    "step %d: test top1 %.4f ± %.4f over %d live runs (%s)",
    step,
    mean,
    std or 0.0,
    len(top1),
    " ".join(f"{x:.4f}" for x in top1),
  )


def evaluate_runs(loop: Loop, t: Training, writer) -> tuple[Loop, float]:
  """Tests every run; returns the loop with their records and the mean top-1 of the living."""
  state = loop.state
  average = steps.average_of(state.opt_state)
  results = _run_evals(t.eval_step, state.params, state.rest, average, t.pipeline)
  records = tuple(r.evaluated(loop.step, res) for r, res in zip(loop.records, results, strict=True))
  living = [
    res if r.died_at_step is None else None for r, res in zip(records, results, strict=True)
  ]
  writer.write_scalars(loop.step, runs.run_scalars(living, "test_"))
  _log_eval(loop.step, living)
  mean = runs.mean_std(res["top1"] for res in living if res is not None)[0]
  return dataclasses.replace(loop, records=records), mean


def save(loop: Loop, t: Training, checkpoints, top1: float | None) -> None:
  """Starts writing the loop's checkpoint (after a flush: never a non-finite step's)."""
  metrics = {"top1": top1} if top1 is not None else None
  with writing("a checkpoint", checkpoints):  # the previous one's failure shows here
    meta = runs.checkpoint_meta(loop.records)
    checkpoints.save(loop.step, t.saved_form(loop.state), meta, metrics)


@contextlib.contextmanager
def writing(what: str, checkpoints):
  """Turns a failed write into WriteFailedError: what failed, why, what is intact, the fix.

  orbax reports a failed checkpoint write (asynchronous: at the next save or at close) as
  tensorstore's ValueError, a file write is an OSError. The unfinished checkpoint stays
  in its temporary folder, which the next start sets aside.
  """
  try:
    yield
  except (OSError, ValueError) as e:
    try:
      latest = checkpoints.latest_step()
    except Exception:  # noqa: BLE001 - the manager may be broken by the failure itself
      latest = None
    kept = (
      f"the last complete checkpoint, {checkpoints.directory}/{latest}, is intact"
      if latest is not None
      else "no checkpoint was complete before it"
    )
    reason = adapters.tensorstore_summary(e) or (str(e).strip().splitlines() or [repr(e)])[0]
    raise WriteFailedError(
      f"writing {what} in {checkpoints.directory.parent} failed ({reason}); {kept}: free "
      "space (or raise the file-size limit), then run the same command to resume"
    ) from None


def _due(config, step: int, total_steps: int, eval_every: int) -> tuple[bool, bool, bool]:
  """(evaluate, save, log) after global step `step`."""
  evaluate = step % eval_every == 0 or step == total_steps
  save = evaluate or step % config.checkpoint_every_steps == 0
  return evaluate, save, save or step % config.log_every_steps == 0


# Called as on_event(point, step, stop) at "eval" (before evaluating), "save" (after a
# checkpoint write starts) and "end" (after the loop, before waiting for the last write): a
# hook for instrumentation and tests.
EventHook = Callable[[str, int, StopSignal], None]


def _no_event(point: str, step: int, stop: StopSignal) -> None:
  pass


@dataclasses.dataclass
class _Outputs:
  """Where a loop's work goes: checkpoints, metric writer, progress report, clock."""

  checkpoints: checkpoint_lib.Checkpoints
  writer: Any
  progress: Any
  clock: _TrainClock


def run_loop(loop: Loop, t: Training, config, out: _Outputs, stop, on_event) -> Loop:
  """Trains from `loop` to the last step or to a stop signal; returns the loop at the end."""
  every = config.eval_every_steps
  eval_every = every if every > 0 else t.pipeline.steps_per_epoch
  while loop.step < t.total_steps:
    loop, metrics = train_one_step(t, loop)
    out.clock.step(metrics)
    evaluate, save_now, log = _due(config, loop.step, t.total_steps, eval_every)
    stopping = distributed.agree_on_stop(stop.received, loop.step, metrics)  # one answer for all
    if log or stopping:
      out.clock.stop(metrics)  # evaluation and checkpoints are not training time
      loop = flush(loop, t, out.writer)
      if loop.all_died:  # nothing of the last steps is evaluated or saved
        return _died(loop)
    # On the clock's training time, which is exact at every step the report can fall on (the
    # log steps): the rate of steps done, where wall time at dispatch gives steps queued.
    out.progress(loop.step, out.clock.seconds)
    top1 = None
    if evaluate:
      on_event("eval", loop.step, stop)
      loop, top1 = evaluate_runs(loop, t, out.writer)
    if save_now or stopping:
      save(loop, t, out.checkpoints, top1)
      on_event("save", loop.step, stop)  # the write is in flight
    out.clock.resume()
    if stopping:
      return dataclasses.replace(loop, stopped_by=stopping)
  loop = flush(loop, t, out.writer)
  return _died(loop) if loop.all_died else loop


def _died(loop: Loop) -> Loop:
  return dataclasses.replace(loop, stopped_by="non-finite loss")


# --- a training in its workdir --------------------------------------------------------
def summarize(config, run: Run, t: Training, loop: Loop, clock: _TrainClock, wall: float) -> dict:
  """summary.json: the headline numbers (means over the runs that finished alive), each run,
  each swept combination, and the run's shape and speed."""
  per_run = runs.run_summaries(t.specs, loop.records)
  done = [r for r in per_run if r["died_at_step"] is None and r["final_top1"] is not None]
  metrics = ("final_top1", "final_top5", "best_top1", *runs.AVERAGE_METRICS)
  headline = {
    key: runs.mean_std(r[key] for r in done)[0] for key in metrics if all(key in r for r in per_run)
  }
  return {
    "model": config.model,
    "dataset": config.dataset.name,
    "params": run.num_params,
    "devices": run.mesh.devices.size,
    "step": loop.step,
    "total_steps": t.total_steps,
    "stopped_by": loop.stopped_by,
    **headline,
    "best_step": per_run[0]["best_step"] if len(per_run) == 1 else None,
    "steps_per_epoch": t.pipeline.steps_per_epoch,
    "train_images": t.pipeline.train.size,
    "test_images": t.pipeline.test.size,
    "train_images_per_second": clock.images_per_second(),
    "wall_seconds": wall,
    "config": json.loads(config.to_json_best_effort()),
    "num_runs": len(per_run),
    "runs": per_run,
    "groups": runs.group_summaries(per_run),
  }


def _start_logging(workdir, config, run: Run, t: Training, step: int):
  """The metric writer (hparams on a fresh start) and the opening log line."""
  writer = metric_writer.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  shape = {"params": run.num_params, "devices": run.mesh.devices.size, "runs": t.num_runs}
  if step == 0:
    writer.write_hparams({"model": config.model, "dataset": config.dataset.name, **shape})
  logging.info(
    "%s on %s: %d params, %d steps (%d an epoch), %d device(s), %d run(s) side by side",
    config.model,
    config.dataset.name,
    run.num_params,
    t.total_steps,
    t.pipeline.steps_per_epoch,
    run.mesh.devices.size,
    t.num_runs,
  )
  return writer


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  run: Run | None = None,
  on_event: EventHook = _no_event,
  stop: StopSignal | None = None,
) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the summary.

  With `num_runs` > 1 or a `sweep`, trains all runs side by side in one
  program (README, "Many runs in one process"). SIGTERM or SIGINT while it trains stops it
  at the next step with a checkpoint (the summary's `stopped_by`); a caller that trains
  several times passes one `stop` to all, to see a signal that came in a last step. Raises
  WorkdirError if `workdir` cannot be used or another run holds it.
  """
  run = run or Run.prepare(config, checkpoints=epath.Path(workdir) / "checkpoints")
  workdir = workdir_lib.prepare(workdir)  # local paths and gs:// alike
  with held_by_this_job(workdir):
    run_files.check_resumes_its_own_run(workdir, config)
    return _train_in(workdir, config, run, on_event, stop or StopSignal())


@contextlib.contextmanager
def held_by_this_job(workdir):
  """The workdir's lock, held by process 0 for the whole job; every process fails if it
  cannot be had (WorkdirBusyError)."""
  with contextlib.ExitStack() as stack:
    busy = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.hold(workdir))
      except workdir_lib.WorkdirBusyError as e:
        busy = e
    if not distributed.process_zero_says(busy is None):
      raise busy or workdir_lib.WorkdirBusyError(
        f"--workdir={workdir} is in use by a run still going (process 0 names it); "
        "wait for it to end, stop it, or pass another --workdir"
      )
    yield


def _train_in(workdir: epath.Path, config, run: Run, on_event: EventHook, stop: StopSignal) -> dict:
  from clu import periodic_actions  # TF-free: lkca_jax.metric_writer is imported first

  t = build_training(run, config)
  overrun = schedules.warmup_overrun(config, t.pipeline.steps_per_epoch, t.total_steps)
  if overrun and jax.process_index() == 0:
    logging.warning(overrun)
  checkpoints = checkpoint_lib.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
  loop = resume(t, checkpoints, run.mesh)
  resumed_at = loop.step
  if loop.step == 0 and config.init_from:  # no checkpoint of its own (they start at step 1)
    finetune.check_init_from(config, run.model)  # unchecked where only damaged checkpoints were
    state = finetune.initialised_from(config, run.model, run.mesh, loop.state)
    loop = dataclasses.replace(loop, state=state)
  t.compile_everywhere(loop.state, loop.step)
  if jax.process_index() == 0:
    files.write_atomic(workdir / run_files.CONFIG_FILE, config.to_json_best_effort(indent=2))
  writer = _start_logging(workdir, config, run, t, loop.step)
  out = _Outputs(
    checkpoints,
    writer,
    periodic_actions.ReportProgress(
      num_train_steps=t.total_steps,
      writer=writer,
      every_steps=config.log_every_steps,
      every_secs=None,
    ),
    _TrainClock(config.batch_size * t.num_runs),
  )
  wall_start = time.time()
  # Up to the last write: a signal after the loop's last look (a second Ctrl-C, say) is only
  # noted, so it cannot cut short the checkpoint that a stop or the last step has started.
  with stop:
    loop = run_loop(loop, t, config, out, stop, on_event)
    on_event("end", loop.step, stop)
    t.pipeline.close()  # a streaming pipeline's reader threads or worker processes
    with writing("a checkpoint", checkpoints):
      checkpoints.wait()
    latest = checkpoints.latest_step()
    checkpoints.close()
    summary = _summary_written(workdir, config, run, t, loop, out, resumed_at, wall_start)
  if loop.all_died:
    raise _all_died(loop.records, latest, checkpoints.directory)
  return summary


def _summary_written(workdir, config, run, t, loop, out: _Outputs, resumed_at, wall_start):
  """The run's summary, written to its workdir (process 0), and the metric writer closed.
  Nothing trained (the run had finished): its summary keeps the numbers measured then."""
  kept = None
  if loop.step == resumed_at:
    kept = run_files.summary_of_this_run(workdir, config, loop.step)
  summary = kept or summarize(config, run, t, loop, out.clock, time.time() - wall_start)
  if kept is None and jax.process_index() == 0:
    with writing(run_files.SUMMARY_FILE, out.checkpoints):
      files.write_json(workdir / run_files.SUMMARY_FILE, summary)
  out.writer.flush()
  out.writer.close()
  return summary


# --- evaluation, and a trained model for use from code --------------------------------
def _read_for_eval(config, run: Run, like, source) -> tuple[checkpoint_lib.Restored, Any]:
  """(the checkpoint at `source`, the parameters' moving average saved there or None);
  without a checkpoint, init_from's parameters moved (step 0) and no average."""
  if config.init_from and not checkpoint_lib.holds_checkpoint(source):
    directory, step = finetune.init_from_source(config.init_from)
    state = {"params": finetune.moved_params(config, run.model, run.mesh), "rest": like["rest"]}
    return checkpoint_lib.Restored(directory / str(step), 0, state, {}), None
  restored = run_files.read_trained(config, like, source)
  return restored, _saved_average(config, restored)


def _saved_average(config, restored: checkpoint_lib.Restored):
  """The moving average of `restored`'s parameters, read from the same checkpoint, where
  `config` keeps one (ema_decay > 0); else None. Shaped and placed as the parameters."""
  if not config.get("ema_decay", 0.0):  # a config.json of an older run lacks it
    return None
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    restored.state["params"],
  )
  return checkpoint_lib.read_under(steps.AVERAGE_NAME, shapes, restored.path).state


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None
) -> dict:
  """Evaluates on the test split `checkpoint`, or else the newest good checkpoint in workdir,
  or else (with `config.init_from` and no checkpoint in workdir) the parameters of init_from
  moved to this image size, untrained.

  Returns the step, the checkpoint, the means over the runs at the top level and each
  run's results under "runs".
  """
  source = checkpoint or epath.Path(workdir) / "checkpoints"
  run = Run.prepare(config, checkpoints=source)
  specs = runs.run_specs(config)
  _, eval_graphdef, params, rest = _split_model(run.model)
  like = {"params": params, "rest": rest}  # the optimizer state is read for its average only
  on_every_device = NamedSharding(run.mesh, P())  # every process's devices
  like = pipeline_lib.put_tree(steps.as_runs([like] * len(specs)), on_every_device)
  restored, average = _read_for_eval(config, run, like, source)
  # Arrays: cheaper to pass at every batch.
  state, average = steps.variable_values((restored.state, average))
  pipeline = run.load_data(runs.run_keys(config.seed)[0])  # evaluation batches: the same for all
  eval_step = jax.jit(steps.make_eval_step(eval_graphdef, len(specs)))
  if jax.process_count() > 1:
    first_batch = next(iter(pipeline.eval_batches()))
    distributed.compile_everywhere(
      "eval step", (eval_step, (state["params"], state["rest"], first_batch))
    )
  results = _run_evals(eval_step, state["params"], state["rest"], average, pipeline)
  per_run = [
    {"run": spec.index, "seed": spec.seed, "values": spec.values, **res}
    for spec, res in zip(specs, results, strict=True)
  ]
  means = {key: runs.mean_std(r[key] for r in results)[0] for key in results[0]}
  return {"step": restored.step, "checkpoint": str(restored.path), **means, "runs": per_run}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A `main.py` run's trained model, and where it came from."""

  model: models.ViT  # in eval mode
  config: ml_collections.ConfigDict  # the run's config.json
  checkpoint: epath.Path  # the step directory its parameters were read from
  step: int


def read_trained_run(workdir, *, checkpoint=None, run: int = 0, average: bool = False) -> Trained:
  """`load_trained`'s model with the run's config and the checkpoint it was read from."""
  config = ml_collections.ConfigDict(run_files.saved_config_json(workdir))
  model = build_model(config, dataset_spec(config), nnx.Rngs(params=0, dropout=1))
  source = checkpoint or epath.Path(workdir) / "checkpoints"
  params, restored = read_run_params(config, model, source, run, average=average)
  nnx.update(model, params)
  model.eval()
  return Trained(model, config, restored.path, restored.step)


def load_trained(workdir, *, checkpoint=None, run: int = 0, average: bool = False) -> models.ViT:
  """The model a `main.py` run trained in `workdir`, in eval mode, for use from code.

  Built from the workdir's config.json, with the parameters of `checkpoint` (a step
  directory <workdir>/checkpoints/<step>), else of the newest checkpoint there that
  restores; of run `run` (0 … K−1) where the run trained several side by side (num_runs,
  sweep); with `average`, their moving average instead (a run with ema_decay > 0).
  Read-only: a run may be training there. Raises ConfigError or CheckpointError
  (ValueErrors) naming what is missing or does not fit.
  """
  return read_trained_run(workdir, checkpoint=checkpoint, run=run, average=average).model


def read_run_params(config, model, source, run: int = 0, *, average: bool = False):
  """(run `run`'s parameters for `model`, the Restored they came from): read-only, from the
  checkpoint `source` or the newest one there that restores, which holds the parameters of
  `config`'s runs (num_runs × sweep) stacked when there are several. With `average`, the
  parameters' moving average that its optimizer state keeps (ema_decay > 0)."""
  count = len(runs.run_specs(config))
  if not 0 <= run < count:
    raise checkpoint_lib.CheckpointError(
      f"run={run}: the run in {source} trained {count} run(s); pass run 0 … {count - 1}"
    )
  if average and not config.get("ema_decay", 0.0):  # a config.json of an older run lacks it
    raise checkpoint_lib.CheckpointError(
      f"average=True: the run in {source} kept no moving average of its parameters "
      "(its ema_decay is 0); load its parameters (average=False)"
    )
  like = {"params": steps.as_runs([nnx.state(model, nnx.Param)] * count)}
  restored = run_files.read_trained(config, like, source)
  params = _saved_average(config, restored) if average else restored.state["params"]
  return (steps.run_of(params, run) if count > 1 else params), restored
