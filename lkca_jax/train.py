"""Training and evaluation: one jit-compiled, state-donating step over a `data` mesh.

Parameters and optimizer state are replicated over a 1-D mesh of all devices,
batches are sharded on its `data` axis, and XLA inserts the gradient
all-reduce (the `jit` successor of `pmap` data parallelism).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import config_checks
from lkca_jax import data as data_lib
from lkca_jax import files
from lkca_jax import metric_writer
from lkca_jax import models
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.mixing import mix_batch



ConfigError = config_checks.ConfigError  # one class: main.py and the tools catch train.ConfigError


class NonFiniteLossError(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: Any
  rest: nnx.State  # non-parameter module state (RNG stream counters)


# --- config → objects -------------------------------------------------------
def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Preset overrides that are set (not None) in `config.model_overrides`."""
  overrides = {}
  for key, value in config.model_overrides.items():
    if key == "mixer_options":
      options = {name: {k: v for k, v in opts.items() if v is not None}
                 for name, opts in value.items()}
      options = {name: opts for name, opts in options.items() if opts}
      if options:
        overrides[key] = options
    elif value is not None:
      overrides[key] = value.split(",") if key == "mixer" and "," in value else value
  return overrides


def build_model(config, spec, rngs: nnx.Rngs) -> models.ViT:
  return models.create_model(config.model, num_classes=spec.num_classes,
                             image_size=spec.image_size, channels=spec.channels,
                             patch_size=config.patch_size, dtype=models.DTYPES[config.dtype],
                             rngs=rngs, **model_kwargs(config))


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per step: linear warmup from init to peak, then one cosine decay to end."""
  opt = config.optimizer
  warmup = min(opt.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=opt.init_learning_rate, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.end_learning_rate)


def create_optimizer(config, schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay)


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


# --- steps -------------------------------------------------------------------
def cross_entropy(logits, labels, smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def top_k_correct(logits, labels, k: int):
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1)


def make_train_step(train_graphdef, tx, schedule, config):
  """Returns the pure step `train_step(state, batch, rng) -> (state, metrics)`."""
  mixing = dict(config.mixing)
  smoothing = config.label_smoothing

  def train_step(state: TrainState, batch, rng):
    step_key = jax.random.fold_in(rng, state.step)
    mix_key, drop_key = jax.random.split(step_key)
    images, labels_a, labels_b, lam = mix_batch(mix_key, batch["image"], batch["label"], **mixing)

    def loss_fn(params):
      model = nnx.merge(train_graphdef, params, state.rest)
      logits = model(images, rngs=nnx.Rngs(dropout=drop_key))
      loss = (lam * cross_entropy(logits, labels_a, smoothing)
              + (1.0 - lam) * cross_entropy(logits, labels_b, smoothing))
      return loss.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "top1": top_k_correct(logits, labels_a, 1).mean(),
        "top5": top_k_correct(logits, labels_a, 5).mean(),
        "learning_rate": schedule(state.step),
        "grad_norm": optax.global_norm(grads),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(eval_graphdef):
  def eval_step(params, rest, batch):
    model = nnx.merge(eval_graphdef, params, rest)
    logits = model(batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    return {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }
  return eval_step


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
  def prepare(cls, config) -> "Run":
    """Validates the config, dataset and devices; builds the model. Raises ConfigError."""
    config_checks.validate(config)  # every key's own range first, before anything is built
    try:
      spec = data_lib.get_spec(config.dataset.name)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    classes = config.dataset.classes
    if classes:
      if not 2 <= classes <= spec.num_classes:
        raise ConfigError(f"dataset.classes={classes} must be between 2 and {spec.num_classes} "
                          f"(or 0 for all of {spec.name})")
      spec = dataclasses.replace(spec, num_classes=classes)
    for key in ("mean", "std"):
      if len(config.dataset[key]) != spec.channels:
        raise ConfigError(f"dataset.{key} has {len(config.dataset[key])} values but "
                          f"{spec.name} images have {spec.channels} channels")
    # The library rejects bad arguments (sizes that do not divide, unknown names) with
    # ValueError; anything else raised here is a bug and keeps its traceback.
    try:
      pipeline_lib.augment_config(config)
      mesh = pipeline_lib.make_mesh(config.num_devices)
      pipeline_lib.check_global_batch(config.batch_size, mesh.devices.size)
      model = build_model(config, spec, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    try:
      data_lib.check_available(spec.name, data_dir=config.dataset.data_dir,
                               manual_dir=config.dataset.manual_dir,
                               download=config.dataset.download)
    except data_lib.DatasetUnavailableError as e:
      raise ConfigError(str(e)) from None
    return cls(config, spec, mesh, model, models.count_params(model))

  def load_data(self, key) -> pipeline_lib.Pipeline:
    t0 = time.time()
    try:  # a download that cannot happen is the user's to fix, as an unprepared dataset is
      pipeline = pipeline_lib.from_config(self.config, self.spec, self.mesh, key)
    except data_lib.DatasetUnavailableError as e:
      raise ConfigError(str(e)) from None
    logging.info("data: %d train / %d test images of %s on %s in %.1fs", pipeline.train.size,
                 pipeline.test.size, pipeline.image_shape, pipeline.placement, time.time() - t0)
    return pipeline


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def hold_for_tests(self, point: str, step: int) -> None:
    """Test-only: LKCA_TEST_HOLD=<point>:<step> holds the run there until a signal.

    Announces itself on stderr, then spins holding the GIL (a long switch
    interval), so a checkpoint write just started stays unfinished: orbax
    finalizes it from Python threads. Gives up after a minute.
    """
    if os.environ.get("LKCA_TEST_HOLD") != f"{point}:{step}":
      return
    print(f"holding at {point}:{step}", file=sys.stderr, flush=True)
    interval, deadline = sys.getswitchinterval(), time.monotonic() + 60
    sys.setswitchinterval(60.0)
    while self.received is None and time.monotonic() < deadline:
      pass
    sys.setswitchinterval(interval)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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


def _run_eval(eval_fn, params, rest, pipeline) -> dict:
  totals = None
  for batch in pipeline.eval_batches():
    sums = eval_fn(params, rest, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count}


def _first_nonfinite(metrics_window, first_step: int) -> int | None:
  """Number (1-based, as checkpoints count) of the first step with a non-finite loss."""
  losses = np.asarray([m["loss"] for m in metrics_window])
  bad = np.flatnonzero(~np.isfinite(losses))
  return first_step + int(bad[0]) + 1 if bad.size else None


@dataclasses.dataclass
class Training:
  """The compiled pieces of a run: data, initial state, and the two steps."""
  pipeline: pipeline_lib.Pipeline
  state: TrainState
  train_step: Any  # jit(train_step(state, batch, rng)), state donated
  eval_step: Any  # jit(eval_step(params, rest, batch)) -> sums
  schedule: optax.Schedule
  total_steps: int
  train_key: jax.Array
  _order: tuple = dataclasses.field(default=(-1, None), repr=False)  # (epoch, its order)

  def epoch_order(self, epoch: int) -> jax.Array:
    """The epoch's example order, drawn once and kept until the next epoch."""
    if self._order[0] != epoch:
      self._order = (epoch, self.pipeline.epoch_order(epoch))
    return self._order[1]

  def batch(self, step: int) -> dict:
    """The augmented training batch of global step `step`."""
    return self.pipeline.train_batch(self.epoch_order(step // self.pipeline.steps_per_epoch), step)

  def step(self, state: TrainState, step: int):
    """One training step at global step `step`: its batch, then the jitted update."""
    return self.train_step(state, self.batch(step), self.train_key)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(data key, train key) of a run: the pipeline's order and augmentation, and the step's."""
  data_key, train_key = jax.random.split(jax.random.key(seed))
  return data_key, train_key


def build_training(run: Run, config) -> Training:
  data_key, train_key = run_keys(config.seed)
  pipeline = run.load_data(data_key)
  total_steps = total_train_steps(config, pipeline.steps_per_epoch)
  schedule = learning_rate_schedule(config, pipeline.steps_per_epoch, total_steps)
  tx = create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, params, rest = _split_model(run.model)
  replicated = NamedSharding(run.mesh, P())
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), rest=rest)
  state = jax.device_put(state, replicated)
  state_sharding = jax.tree.map(lambda _: replicated, state)
  train_step = jax.jit(make_train_step(train_graphdef, tx, schedule, config),
                       in_shardings=(state_sharding, pipeline.batch_sharding, replicated),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(eval_graphdef), out_shardings=replicated)
  return Training(pipeline, state, train_step, eval_step, schedule, total_steps, train_key)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       run: Run | None = None) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the summary."""
  from clu import periodic_actions  # TF-free: lkca_jax.metric_writer is imported first

  run = run or Run.prepare(config)
  workdir = epath.Path(workdir)  # local paths and gs:// alike
  workdir.mkdir(parents=True, exist_ok=True)
  t = build_training(run, config)
  pipeline, state, total_steps = t.pipeline, t.state, t.total_steps
  eval_step = t.eval_step
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else pipeline.steps_per_epoch)

  checkpoints = checkpoint_lib.Checkpoints(workdir / "checkpoints",
                                           keep=config.keep_checkpoints)
  meta = {"best_top1": -1.0, "best_step": 0, "history": []}
  restored = checkpoints.restore_latest(state)  # damaged ones: a warning each, set aside
  if restored is not None:
    start, state, meta = restored
    logging.info("resumed from %s/%d", checkpoints.directory, start)
  step = int(state.step)
  if jax.process_index() == 0:
    files.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))

  writer = metric_writer.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams({"model": config.model, "dataset": config.dataset.name,
                          "params": run.num_params, "devices": run.mesh.devices.size})
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  logging.info("%s on %s: %d params, %d steps (%d a epoch), %d devices", config.model,
               config.dataset.name, run.num_params, total_steps, pipeline.steps_per_epoch,
               run.mesh.devices.size)

  def save(at_step, eval_metrics=None):
    if window:  # never let a non-finite step into a checkpoint
      flush()
    checkpoints.save(at_step, state, meta,
                     {"top1": eval_metrics["top1"]} if eval_metrics else None)

  window, window_start = [], step  # per-step metrics not yet fetched from the devices

  def flush():
    nonlocal window, window_start
    fetched = jax.device_get(window)
    bad = _first_nonfinite(fetched, window_start)
    if bad is not None:
      checkpoints.wait()
      keep = checkpoints.latest_step()
      raise NonFiniteLossError(
          f"loss became non-finite at step {bad}; training stopped. The last good checkpoint "
          f"({checkpoints.directory}/{keep}) is kept: lower the learning rate or use float32.")
    summary = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    writer.write_scalars(window_start + len(fetched), summary)
    window, window_start = [], window_start + len(fetched)

  clock = _TrainClock(config.batch_size)
  stopped_by = None
  wall_start = time.time()
  with _StopSignal() as stop:
    while step < total_steps:
      state, metrics = t.step(state, step)
      window.append(metrics)
      step += 1
      clock.step(metrics)
      progress(step)
      eval_now = step % eval_every == 0 or step == total_steps
      stopping = stop.received  # read once: a signal may land mid-iteration
      save_now = eval_now or step % config.checkpoint_every_steps == 0 or stopping is not None
      if step % config.log_every_steps == 0 or save_now:
        clock.stop(metrics)  # evaluation and checkpoints are not training time
        flush()
      eval_metrics = None
      if eval_now:
        stop.hold_for_tests("eval", step)
        eval_metrics = _run_eval(eval_step, state.params, state.rest, pipeline)
        writer.write_scalars(step, {f"test_{k}": v for k, v in eval_metrics.items()})
        meta["history"].append({"step": step, **eval_metrics})
        if eval_metrics["top1"] > meta["best_top1"]:
          meta["best_top1"], meta["best_step"] = eval_metrics["top1"], step
        logging.info("step %d: test top1 %.4f top5 %.4f loss %.4f", step, eval_metrics["top1"],
                     eval_metrics["top5"], eval_metrics["loss"])
      if save_now:
        save(step, eval_metrics)
        stop.hold_for_tests("save", step)  # the write is in flight
      clock.resume()
      if stopping:
        stopped_by = stopping
        break
    if window:
      flush()
  checkpoints.close()
  wall = time.time() - wall_start

  final = meta["history"][-1] if meta["history"] else None
  summary = {
      "model": config.model, "dataset": config.dataset.name, "params": run.num_params,
      "devices": run.mesh.devices.size, "step": step, "total_steps": total_steps,
      "stopped_by": stopped_by,
      "final_top1": final["top1"] if final else None,
      "final_top5": final["top5"] if final else None,
      "best_top1": meta["best_top1"] if final else None, "best_step": meta["best_step"],
      "steps_per_epoch": pipeline.steps_per_epoch, "train_images": pipeline.train.size,
      "test_images": pipeline.test.size,
      "train_images_per_second": clock.images_per_second(),
      "wall_seconds": wall, "config": json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    files.write_json(workdir / "summary.json", summary)
  writer.flush()
  writer.close()
  return summary


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str | None = None) -> dict:
  """Evaluates on the test split `checkpoint`, or else the newest good checkpoint in workdir."""
  run = Run.prepare(config)
  if checkpoint:
    directory, step = checkpoint_lib.resolve(checkpoint)
  else:
    directory, step = epath.Path(workdir) / "checkpoints", None
    if not directory.is_dir():
      raise checkpoint_lib.CheckpointError(
          f"no checkpoint in {directory}; train first or pass --checkpoint PATH")
  _, eval_graphdef, params, rest = _split_model(run.model)
  # Only what evaluation needs is read: no optimizer state is built or restored.
  like = jax.device_put({"params": params, "rest": rest}, NamedSharding(run.mesh, P()))
  checkpoints = checkpoint_lib.Checkpoints(directory, asynchronous=False, read_only=True)
  if step is None:  # the newest that restores; damaged ones are skipped with a warning
    restored = checkpoints.restore_latest(like, partial=True)
    if restored is None:
      raise checkpoint_lib.CheckpointError(
          f"no checkpoint in {directory}; train first or pass --checkpoint PATH")
    step, state, _ = restored
  else:
    state, _ = checkpoints.restore(step, like, partial=True)
  checkpoints.close()
  pipeline = run.load_data(run_keys(config.seed)[0])
  metrics = _run_eval(jax.jit(make_eval_step(eval_graphdef)), state["params"], state["rest"],
                      pipeline)
  return {"step": step, "checkpoint": f"{directory}/{step}", **metrics}
