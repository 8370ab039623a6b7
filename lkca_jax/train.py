"""Training and evaluation: one jit-compiled, state-donating step over a `data` mesh.

Parameters and optimizer state are replicated over a 1-D mesh of all devices,
batches are sharded on its `data` axis, and XLA inserts the gradient
all-reduce (the `jit` successor of `pmap` data parallelism).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import signal
import time
from collections.abc import Callable
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import (
  adapters,
  backend,
  config_checks,
  distributed,
  files,
  metric_writer,
  models,
  resolution,
)
from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import data as data_lib
from lkca_jax import workdir as workdir_lib
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.mixing import mix_batch

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


@flax.struct.dataclass
class TrainState:
  """What the train step updates. Its nnx.States hold arrays where the model holds
  Variables (`variable_values`); checkpoints keep the Variables (`Training.saved_form`)."""

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


def learning_rate_schedule(
  config, steps_per_epoch: int, total_steps: int, peak=None
) -> optax.Schedule:
  """Per step: linear warmup from init to peak, then one cosine decay to end.

  optax's warmup_cosine_decay_schedule, written so that `peak` (default: the
  config's learning rate) may be a traced value, one run's of many.
  """
  opt = config.optimizer
  peak = opt.learning_rate if peak is None else peak
  init, end = opt.init_learning_rate, opt.end_learning_rate
  warmup = min(opt.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
  decay = max(total_steps, warmup + 1) - warmup

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = init + (peak - init) * jnp.clip(count, 0, warmup) / max(warmup, 1)
    done = jnp.clip(count - warmup, 0, decay) / decay
    cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * done))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def create_optimizer(
  config, schedule, weight_decay=None, decay_mask=None
) -> optax.GradientTransformation:
  """AdamW; `weight_decay` (default: the config's) may be traced: the state is the same.
  `decay_mask` (`weight_decay_mask`) limits the decay to its True leaves; None: every
  parameter."""
  opt = config.optimizer
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  return optax.adamw(
    schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=weight_decay, mask=decay_mask
  )


def weight_decay_mask(config, model):
  """Where `config.optimizer.weight_decay_on` puts AdamW's weight decay on `model`'s
  parameters: None for "all", else a tree of bools shaped as the train state's parameters
  (`models.decays` of each)."""
  if config.optimizer.weight_decay_on == "all":
    return None
  owners = dict(nnx.iter_modules(model))

  def decays(path, value) -> bool:
    names = tuple(k.key for k in path)
    return models.decays(owners[names[:-1]], names[-1], value)

  return jax.tree_util.tree_map_with_path(decays, variable_values(nnx.state(model, nnx.Param)))


# --- runs: seeds x sweep ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a process: its seed, swept values, and its own single-run config."""

  index: int
  seed: int
  values: dict  # {swept config key: value}
  config: ml_collections.ConfigDict  # num_runs=1, no sweep: trains this run alone


def _get_key(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _set_key(config, key: str, value) -> None:
  *path, last = key.split(".")
  for part in path:
    config = config[part]
  config[last] = value


def run_specs(config) -> list[RunSpec]:
  """Every combination of the sweep (in the order given) times the seeds, seed fastest."""
  sweep = config_checks.parse_sweep(config.sweep)
  specs = []
  for combo in itertools.product(*sweep.values()):
    values = dict(zip(sweep, combo, strict=True))
    for k in range(config.num_runs):
      single = copy.deepcopy(config)
      with single.unlocked():
        single.num_runs, single.sweep, single.seed = 1, "", config.seed + k
        for key, value in values.items():
          _set_key(single, key, value)
      specs.append(RunSpec(len(specs), config.seed + k, values, single))
  return specs


def describe_values(values: dict) -> str:
  """ "label_smoothing=0.1, mixing.prob=0": swept values as logs and reports show them."""
  return ", ".join(f"{k}={v:g}" for k, v in values.items())


def run_name(seed: int, values: dict) -> str:
  """ "seed 3, label_smoothing=0.1": how a run is named in logs and reports."""
  return ", ".join([f"seed {seed}", *([describe_values(values)] if values else [])])


def hparams(config) -> dict[str, float]:
  """The step's per-run scalars of a single-run config: the value of each sweepable key."""
  values = {key: _get_key(config, key) for key in config_checks.SWEEPABLE}
  if values["model_overrides.drop_path_rate"] is None:
    values["model_overrides.drop_path_rate"] = models.PRESETS[config.model].drop_path_rate
  return values


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
  values = [float(v) for v in values]
  if not values:
    return None, None
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


# --- steps -------------------------------------------------------------------
def cross_entropy(logits, labels, smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def global_norm(tree) -> jax.Array:
  """The L2 norm of all of a pytree's leaves together (`optax.tree.norm`'s value), taken
  over the leaves concatenated: one reduction, where a sum per leaf is a kernel per leaf on
  a GPU (117 for `lkca_t`'s gradients)."""
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])
  return jnp.sqrt(jnp.sum(jnp.square(flat)))


def top_k_correct(logits, labels, k: int):
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1)


def make_train_step(
  train_graphdef, config, steps_per_epoch: int, total_steps: int, decay_mask=None
):
  """Returns the pure step `train_step(state, batch, rng, hp) -> (state, metrics)`.

  `hp` holds the scalars of `hparams` (one a sweepable key), as traced values, so that
  one program trains any of them (and, vmapped, a different one in each run). `decay_mask`
  is `weight_decay_mask`'s.
  """
  alphas = {"cutmix_alpha": config.mixing.cutmix_alpha, "mixup_alpha": config.mixing.mixup_alpha}

  def train_step(state: TrainState, batch, rng, hp):
    schedule = learning_rate_schedule(
      config, steps_per_epoch, total_steps, peak=hp["optimizer.learning_rate"]
    )
    tx = create_optimizer(config, schedule, hp["optimizer.weight_decay"], decay_mask)
    step_key = jax.random.fold_in(rng, state.step)
    mix_key, drop_key = jax.random.split(step_key)
    images, labels_a, labels_b, lam = mix_batch(
      mix_key,
      batch["image"],
      batch["label"],
      prob=hp["mixing.prob"],
      cutmix_prob=hp["mixing.cutmix_prob"],
      **alphas,
    )
    mixed = {"image": images, "label_a": labels_a, "label_b": labels_b}

    def loss_fn(params, mixed, drop_key):
      model = nnx.merge(train_graphdef, params, state.rest)
      logits = model(
        mixed["image"],
        rngs=nnx.Rngs(dropout=drop_key),
        drop_path_rate=hp["model_overrides.drop_path_rate"],
      )
      smoothing = hp["label_smoothing"]
      loss = lam * cross_entropy(logits, mixed["label_a"], smoothing) + (1.0 - lam) * cross_entropy(
        logits, mixed["label_b"], smoothing
      )
      accuracy = {
        "top1": top_k_correct(logits, mixed["label_a"], 1).mean(),
        "top5": top_k_correct(logits, mixed["label_a"], 5).mean(),
      }
      return loss.mean(), accuracy

    with backend.reverse_mode_only():
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      if config.microbatches == 1:
        (loss, accuracy), grads = grad_fn(state.params, mixed, drop_key)
      else:
        (loss, accuracy), grads = _averaged_over_slices(
          grad_fn, state.params, mixed, drop_key, config.microbatches
        )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      **accuracy,
      "learning_rate": schedule(state.step),
      "grad_norm": global_norm(grads),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _averaged_over_slices(grad_fn, params, batch, key, count: int):
  """`grad_fn(params, batch, key) -> ((loss, aux), grads)` of the mean over the batch, taken
  over `count` equal slices one after another (a scan, so only one slice's activations are
  live at a time) and averaged: the whole batch's value, summed in another order. Slice m is
  rows m, m + count, … : on a batch sharded over devices by rows, each device keeps its own
  rows of every slice. Slice m draws with `fold_in(key, m)`."""

  def as_slices(x):  # (B, ...) -> (count, B / count, ...), slice m = rows m::count
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

  slices = jax.tree.map(as_slices, batch)
  keys = jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.arange(count))

  def add_slice(total, slice_and_key):
    value, grads = grad_fn(params, *slice_and_key)
    return jax.tree.map(jnp.add, total, (value, grads)), None

  first = jax.tree.map(lambda x: x[0], (slices, keys))
  zeros = jax.tree.map(
    lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(grad_fn, params, *first)
  )
  total, _ = jax.lax.scan(add_slice, zeros, (slices, keys))
  return jax.tree.map(lambda x: x / count, total)


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_runs_step(train_step, num_runs: int):
  """`train_step` over `num_runs` runs, with a per-run `alive` mask.

  Returns `runs_step(state, batch, rng, hp, alive) -> (state, metrics)`. `hp`,
  `alive` and the metrics (with the new `alive`) have a leading run axis. A run
  whose loss or new parameters are non-finite dies: from that step on its
  parameters and optimizer state stay those before the step, so it never feeds
  NaN to the others (they share nothing but the program). Several runs: state,
  batch and rng carry the run axis too, and the step is vmapped over it. One
  run: they are a single run's, as saved and as the model's own, and the step
  is the plain one (a vmap over one run would still change the program); it dies
  at its first non-finite loss.
  """

  def one_run(state, batch, rng, hp, alive):
    new, metrics = train_step(state, batch, rng, hp)
    ok = alive & jnp.isfinite(metrics["loss"]) & _all_finite(new.params)
    keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
    new = new.replace(
      params=jax.tree.map(keep, new.params, state.params),
      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
    )
    return new, {**metrics, "alive": ok}

  if num_runs > 1:
    return jax.vmap(one_run)

  def single_run(state, batch, rng, hp, alive):
    # Its death ends the loop before anything is saved, so nothing needs freezing: the
    # plain step, without the masks' extra passes over the parameters and moments.
    state, metrics = train_step(state, batch, rng, _first(hp))
    ok = alive[0] & jnp.isfinite(metrics["loss"])
    return state, _with_run_axis({**metrics, "alive": ok})

  return single_run


def make_eval_step(eval_graphdef, num_runs: int):
  """`eval_step(params, rest, batch) -> sums` with a leading run axis (as `make_runs_step`)."""

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

  if num_runs > 1:
    return jax.vmap(eval_step, in_axes=(0, 0, None))
  return lambda params, rest, batch: _with_run_axis(eval_step(params, rest, batch))


def _first(tree):
  return jax.tree.map(lambda x: x[0], tree)


def _with_run_axis(tree):
  return jax.tree.map(lambda x: x[None], tree)


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
      mesh = pipeline_lib.make_mesh(config.num_devices)
      pipeline_lib.check_global_batch(config.batch_size, mesh.devices.size, config.microbatches)
      model = build_model(config, spec, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if not (checkpoints and holds_checkpoint(checkpoints)):
      check_init_from(config, model)
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
    try:  # a download that cannot happen is the user's to fix, as an unprepared dataset is
      pipeline = pipeline_lib.from_config(self.config, self.spec, self.mesh, key)
    except data_lib.DatasetUnavailableError as e:
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
  """Turns SIGTERM/SIGINT into a flag (`received`, the signal's name) checked between steps."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

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


def variable_values(tree):
  """`tree` with each nnx.Variable replaced by its array: the same leaves in the same order.

  A jitted call flattens and rebuilds every Variable among its arguments and results in
  Python, one by one; arrays it passes in C++ (docs/benchmarks.md, 2026-12-05j).
  `nnx.merge` takes either.
  """
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def _split_model(model):
  model.train()
  train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return train_graphdef, eval_graphdef, params, rest


def _run_of(tree, k: int):
  """Run k's part of a tree with a leading run axis."""
  return jax.tree.map(lambda x: x[k], tree)


def _stack(trees):
  """Pytrees of the same structure (one a run) stacked along a new leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _as_runs(trees):
  """The runs' trees as the step and the checkpoints hold them: stacked along a leading run
  axis when there are several, a single run's tree as it is."""
  return _stack(trees) if len(trees) > 1 else trees[0]


def _run_eval(eval_fn, params, rest, pipeline) -> list[dict]:
  """Test loss, top-1 and top-5 of each run (an `eval_fn` of `make_eval_step`)."""
  totals = None
  for batch in pipeline.eval_batches():
    sums = distributed.in_order(eval_fn(params, rest, batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return [
    {key: float(totals[key][r]) / float(totals["count"][r]) for key in ("loss", "top1", "top5")}
    for r in range(len(totals["count"]))
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
  every leaf has a leading run axis. The steps' per-run values (`hparams`,
  `alive`, metrics) always have one.
  """

  pipeline: pipeline_lib.Pipeline
  state: TrainState
  compiled_step: Any  # jit(runs_step(state, batch, rng, hp, alive)), state donated
  eval_step: Any  # jit(eval_step(params, rest, batch)) -> per-run sums
  schedule: optax.Schedule
  total_steps: int
  train_key: jax.Array
  hparams: dict  # {sweepable key: (runs,) float32}
  specs: list  # RunSpec of each run
  all_alive: jax.Array  # (runs,) True: the mask of a fresh start
  saved_layout: Any  # the state's tree with the model's Variables: what checkpoints hold
  _order: tuple = dataclasses.field(default=(-1, None), repr=False)  # (epoch, its order)

  @property
  def num_runs(self) -> int:
    return len(self.specs)

  def train_step(self, state: TrainState, batch, rng, alive=None):
    """The jitted update on `batch` (state donated); every run alive unless `alive` says."""
    return self.compiled_step(state, batch, rng, self.hparams, self._alive(alive))

  def _alive(self, alive):
    return self.all_alive if alive is None else alive

  def saved_form(self, state: TrainState) -> TrainState:
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

  def step_args(self, state: TrainState, step: int, alive=None) -> tuple:
    """The arguments of `compiled_step` at global step `step`."""
    return (state, self.batch(step), self.train_key, self.hparams, self._alive(alive))

  def step(self, state: TrainState, step: int, alive=None):
    """One training step at global step `step`: its batch, then the jitted update."""
    return self.compiled_step(*self.step_args(state, step, alive))

  def compile_everywhere(self, state: TrainState, step: int) -> None:
    """With several processes: both steps compiled in every process before the first runs."""
    if jax.process_count() == 1:
      return  # the eval batch below is not built for nothing
    distributed.compile_everywhere(
      "steps",
      (self.compiled_step, self.step_args(state, step)),
      (self.eval_step, (state.params, state.rest, next(iter(self.pipeline.eval_batches())))),
    )


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(data key, train key) of a run: the pipeline's order and augmentation, and the step's."""
  data_key, train_key = jax.random.split(jax.random.key(seed))
  return data_key, train_key


def _keys(specs) -> tuple[jax.Array, jax.Array]:
  """(data key, train key): a single run's, or stacked along the run axis."""
  keys = [run_keys(spec.seed) for spec in specs]
  if len(specs) == 1:
    return keys[0]
  return tuple(jnp.stack([k[i] for k in keys]) for i in (0, 1))


def _initial_state(run: Run, specs, tx) -> TrainState:
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
  params, rest, opt_state = (_as_runs(part) for part in zip(*parts, strict=True))
  step = jnp.zeros((len(specs),) if len(specs) > 1 else (), jnp.int32)
  return TrainState(step=step, params=params, opt_state=opt_state, rest=rest)


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
  specs = run_specs(config)
  data_key, train_key = _keys(specs)
  pipeline = run.load_data(data_key)
  total_steps = total_train_steps(config, pipeline.steps_per_epoch)
  schedule = learning_rate_schedule(config, pipeline.steps_per_epoch, total_steps)
  train_graphdef, eval_graphdef, _, _ = _split_model(run.model)
  per_run = [hparams(spec.config) for spec in specs]
  hp = {key: jnp.asarray([h[key] for h in per_run], jnp.float32) for key in per_run[0]}
  replicated = NamedSharding(run.mesh, P())
  decay_mask = weight_decay_mask(config, run.model)
  state = _initial_state(run, specs, create_optimizer(config, schedule, decay_mask=decay_mask))
  saved_layout, state = jax.tree.structure(state), variable_values(state)
  state, hp, alive = pipeline_lib.put_tree(  # onto every process's devices
    (state, hp, jnp.ones(len(specs), bool)), replicated
  )
  state_sharding = jax.tree.map(lambda _: replicated, state)
  train_step = make_train_step(
    train_graphdef, config, pipeline.steps_per_epoch, total_steps, decay_mask
  )
  compiled = jax.jit(
    make_runs_step(train_step, len(specs)),
    in_shardings=(state_sharding, pipeline.train_sharding, *[replicated] * 3),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(eval_graphdef, len(specs)), out_shardings=replicated)
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
class RunRecord:
  """What a run's checkpoints remember about it: test results so far, its best, its death."""

  best_top1: float = -1.0
  best_step: int = 0
  history: tuple = ()  # {"step", "loss", "top1", "top5"} at each evaluation
  died_at_step: int | None = None
  died_with_loss: str | None = None  # its loss at that step ("nan", "inf"), as JSON keeps it

  def evaluated(self, step: int, result: dict) -> RunRecord:
    better = self.died_at_step is None and result["top1"] > self.best_top1
    return dataclasses.replace(
      self,
      history=(*self.history, {"step": step, **result}),
      best_top1=result["top1"] if better else self.best_top1,
      best_step=step if better else self.best_step,
    )


def checkpoint_meta(records) -> dict:
  """The metadata saved with every checkpoint: one record a run."""
  return {"runs": [dataclasses.asdict(r) | {"history": list(r.history)} for r in records]}


def records_from_meta(meta: dict, num_runs: int) -> tuple[RunRecord, ...]:
  """The runs' records from a checkpoint's metadata (also the single-run layout before 0.1)."""
  runs = meta.get("runs")
  if runs is None and {"best_top1", "best_step", "history"} <= meta.keys():
    runs = [meta]  # one run's fields at the top: how single runs were saved before
  if runs is None or len(runs) != num_runs:
    raise checkpoint_lib.CheckpointError(
      f"the checkpoint's metadata holds {'no' if runs is None else len(runs)} run records, "
      f"this config trains {num_runs}; resume with the config it was trained with"
    )
  return tuple(
    RunRecord(
      r["best_top1"],
      r["best_step"],
      tuple(r["history"]),
      r.get("died_at_step"),
      r.get("died_with_loss"),
    )
    for r in runs
  )


@dataclasses.dataclass(frozen=True)
class Loop:
  """The training loop's state between two pieces of work, passed from one to the next."""

  state: TrainState
  alive: jax.Array  # (runs,) bool: which runs' losses are still finite
  step: int
  records: tuple  # RunRecord of each run
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
    return Loop(t.state, t.all_alive, 0, tuple(RunRecord() for _ in t.specs))
  step, saved, meta = restored
  state = variable_values(saved)
  logging.info("resumed from %s/%d", checkpoints.directory, step)
  records = records_from_meta(meta, t.num_runs)
  alive = jax.device_put(
    jnp.asarray([r.died_at_step is None for r in records]), NamedSharding(mesh, P())
  )
  return Loop(state, alive, step, records, window_start=step)


# Config keys a resumed run may change: where its data and outputs live, how often it logs,
# evaluates and saves, and how many devices share it (a step on any count is the same step
# to round-off). init_from seeds only a run's start. Any other change would train the rest
# of a run as another run under the first one's name.
RESUME_MAY_CHANGE = frozenset(
  {
    "checkpoint_every_steps",
    "dataset.data_dir",
    "dataset.download",
    "dataset.manual_dir",
    "dataset.placement",
    "dataset.stream_workers",
    "eval_every_steps",
    "init_from",
    "init_from_head",
    "init_from_kernels",
    "keep_checkpoints",
    "log_every_steps",
    "microbatches",
    "num_devices",
  }
)
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def check_resumes_its_own_run(workdir: epath.Path, config) -> None:
  """Raises WorkdirError if `workdir` holds checkpoints of a run whose config (its
  config.json) differs from `config` outside RESUME_MAY_CHANGE. Keys only one of them has
  (a config of another version of this code) are not compared. Process 0 decides."""
  changes = config_changes(workdir, config) if jax.process_index() == 0 else []
  if distributed.process_zero_says(not changes):
    return
  shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
  raise workdir_lib.WorkdirError(
    f"--workdir={workdir} holds checkpoints of a run with another config "
    f"({shown or 'process 0 names them'}): resuming would train the rest of it as another "
    f"run. Resume with its config (--config {workdir_lib.READ_BACK_CONFIG}:{workdir}), or "
    "train in a fresh --workdir"
  )


def config_changes(workdir: epath.Path, config) -> list[str]:
  """'key: A there, B here' for each key outside RESUME_MAY_CHANGE that the config.json of
  the run checkpointed in `workdir` holds otherwise; [] where it holds no checkpoint."""
  checkpoints, saved_file = workdir / "checkpoints", workdir / CONFIG_FILE
  if not checkpoints.is_dir() or not saved_file.exists():
    return []
  if not any(p.name.isdigit() for p in checkpoints.iterdir()):
    return []
  try:
    saved = json.loads(saved_file.read_text())
  except (OSError, ValueError) as e:  # written atomically: not expected, and not worth a stop
    logging.warning("%s cannot be read (%s); resuming without comparing configs", saved_file, e)
    return []
  return _differences(saved, config)


def _differences(saved: dict, config) -> list[str]:
  """'key: A there, B here' for each key outside RESUME_MAY_CHANGE where the config saved
  as JSON and `config` differ; keys only one of them has are not compared."""
  saved, here = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  return [
    f"{key}: {saved[key]!r} there, {here[key]!r} here"
    for key in sorted(saved.keys() & here.keys())
    if saved[key] != here[key] and key not in RESUME_MAY_CHANGE
  ]


# The config keys (and groups of keys) that decide the parameters' names and shapes; the
# other model_overrides (drop_path_rate) and the recipe do not.
SHAPE_KEYS = (
  "model",
  "model_overrides.mixer",
  "model_overrides.dim",
  "model_overrides.depth",
  "model_overrides.num_heads",
  "model_overrides.mlp_ratio",
  "model_overrides.pool",
  "model_overrides.mixer_options",
  "patch_size",
  "dataset.name",
  "dataset.classes",
  "dataset.image_size",
  "num_runs",
  "sweep",
)


def _shapes_params(change: str) -> bool:
  """Whether a 'key: A there, B here' of `_differences` is of a key in SHAPE_KEYS."""
  key = change.split(":", 1)[0]
  return any(key == shaping or key.startswith(f"{shaping}.") for shaping in SHAPE_KEYS)


def read_trained(config, like, source) -> checkpoint_lib.Restored:
  """`checkpoint_lib.read_checkpoint`, read-only; a checkpoint of other shapes than `config`'s
  model is a CheckpointError that names the keys of SHAPE_KEYS its run's config.json holds
  otherwise (where that file is beside its checkpoints)."""
  try:
    return checkpoint_lib.read_checkpoint(like, source)
  except checkpoint_lib.OtherShapesError as e:
    saved_file = e.path.parent.parent / CONFIG_FILE
    try:
      saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):  # a checkpoint kept without its run's files
      saved = {}
    changes = [c for c in _differences(saved, config) if _shapes_params(c)]
    if not changes:
      raise
    raise checkpoint_lib.CheckpointError(
      f"checkpoint {e.path} does not match this model/config ({e.mismatch}); its run "
      f"({saved_file}) differs in {'; '.join(changes)}: use that run's config "
      f"(--config {workdir_lib.READ_BACK_CONFIG}:{e.path.parent.parent})"
    ) from None


def finished_summary(workdir) -> dict | None:
  """The summary.json in `workdir` of a training that reached its last step, else None."""
  try:
    summary = json.loads((epath.Path(workdir) / SUMMARY_FILE).read_text())
  except (OSError, ValueError):
    return None
  if not summary or summary.get("stopped_by") or summary.get("step") != summary.get("total_steps"):
    return None
  return summary


def _summary_of_this_run(workdir: epath.Path, config, step: int) -> dict | None:
  """The finished summary in `workdir` of this config's run at `step`: what a command run
  again after the run finished reports (its train images/s and wall time are the ones
  measured while it trained, where this process measured none)."""
  summary = finished_summary(workdir)
  if summary is None or summary["step"] != step:
    return None
  return None if _differences(summary.get("config", {}), config) else summary


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# --- init_from: fine-tuning from another image size's checkpoint ----------------------
def init_from_source(path) -> tuple[epath.Path, int]:
  """--config.init_from → (checkpoints directory, step): a workdir or its checkpoints
  directory (the newest checkpoint), or a step directory. Raises ConfigError."""
  where = f"init_from={path}"
  path = checkpoint_lib.absolute(path)
  if path.name.isdigit():
    try:
      return checkpoint_lib.resolve(path)
    except checkpoint_lib.CheckpointError as e:
      raise ConfigError(f"{where}: {e}") from None
  directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  if not directory.is_dir():
    raise ConfigError(
      f"{where}: no such directory; pass a workdir, its checkpoints/ or a checkpoint step "
      "directory <workdir>/checkpoints/<step>"
    )
  checkpoints = checkpoint_lib.Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    step = checkpoints.latest_step()
  finally:
    checkpoints.close()
  if step is None:
    raise ConfigError(f"{where}: no checkpoint in {directory}; train there first")
  return directory, step


def _saved_params(directory, step, model) -> tuple[nnx.State, int | None]:
  """(shapes of the checkpoint's parameters as one run's nnx.State, its run count or None)."""
  like = nnx.state(model, nnx.Param)
  saved = checkpoint_lib.saved_like(directory, step, "params", like)
  runs = checkpoint_lib.saved_runs(directory, step)
  if runs is not None:
    saved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), saved)
  return saved, runs


def check_init_from(config, model) -> None:
  """ConfigError unless `config.init_from` names a checkpoint whose parameters move to
  `model` (shapes only: nothing is read but metadata)."""
  if not config.init_from:
    return
  where = f"init_from={config.init_from}"
  directory, step = init_from_source(config.init_from)
  try:
    saved, runs = _saved_params(directory, step, model)
    jax.eval_shape(lambda p: _moved(config, p, model), saved)
  except (checkpoint_lib.CheckpointError, resolution.MoveError) as e:
    raise ConfigError(f"{where}: {e}") from None
  num_runs = len(run_specs(config))
  if runs not in (None, num_runs):
    raise ConfigError(
      f"{where}: the checkpoint holds {runs} runs, this config trains {num_runs}; train as "
      "many runs (each starts from its own), or start from a single run's checkpoint"
    )


def moved_params(config, run: Run) -> nnx.State:
  """The parameters of `config.init_from` moved to this model's grid (resolution.move_params),
  each run's (stacked along the run axis with several), replicated on the mesh."""
  directory, step = init_from_source(config.init_from)
  saved, runs = _saved_params(directory, step, run.model)
  replicated = NamedSharding(run.mesh, P())
  lead = () if runs is None else (runs,)
  saved = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype, sharding=replicated), saved
  )
  restored = checkpoint_lib.read_checkpoint({"params": saved}, directory / str(step))
  params = restored.state["params"]
  count = len(run_specs(config))
  each = [params if runs is None else _run_of(params, k) for k in range(count)]
  moved = [_moved(config, p, run.model) for p in each]
  logging.info(
    "parameters from %s, moved to a %dx%d grid (kernels: %s; head: %s)",
    restored.path,
    *run.model.grid,
    config.init_from_kernels,
    config.init_from_head,
  )
  return pipeline_lib.put_tree(_as_runs(moved), replicated)


def _moved(config, params, model) -> nnx.State:
  return resolution.move_params(
    params, model, kernels=config.init_from_kernels, head=config.init_from_head
  )


def initialised_from(config, run: Run, state: TrainState) -> TrainState:
  """`state` with the parameters of `config.init_from` (moved_params); the optimizer state
  and step stay fresh, and so does a new classifier (init_from_head="new"): each run's
  own, as its seed drew it."""
  params = variable_values(moved_params(config, run))
  if config.init_from_head == "new":
    params = jax.tree_util.tree_map_with_path(
      lambda path, moved, own: own if path[0].key == "head" else moved, params, state.params
    )
  return state.replace(params=params)


def train_one_step(t: Training, loop: Loop) -> tuple[Loop, dict]:
  state, metrics = t.step(loop.state, loop.step, loop.alive)
  loop = dataclasses.replace(
    loop, state=state, alive=metrics["alive"], step=loop.step + 1, window=(*loop.window, metrics)
  )
  return loop, metrics


def run_scalars(per_run: list[dict | None], prefix: str) -> dict[str, float]:
  """Scalars to log: one run's as `<prefix>KEY`; several runs' as run<k>/<prefix>KEY, with
  their mean/ and std/ over the runs given (None: a dead run, left out)."""
  if len(per_run) == 1:
    return {f"{prefix}{key}": value for key, value in (per_run[0] or {}).items()}
  scalars = {}
  keys = next((r for r in per_run if r is not None), {})
  for key in keys:
    values = {k: r[key] for k, r in enumerate(per_run) if r is not None}
    scalars.update({f"run{k}/{prefix}{key}": v for k, v in values.items()})
    mean, std = mean_std(values.values())
    scalars.update(
      {f"mean/{prefix}{key}": mean, **({f"std/{prefix}{key}": std} if std is not None else {})}
    )
  return scalars


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
          run_name(specs[k].seed, specs[k].values),
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
  writer.write_scalars(end, run_scalars(per_run, "train_"))
  return dataclasses.replace(loop, records=records, window=(), window_start=end)


def _log_eval(step: int, living: list[dict | None]) -> None:
  if len(living) == 1:
    r = living[0]
    logging.info(
      "step %d: test top1 %.4f top5 %.4f loss %.4f", step, r["top1"], r["top5"], r["loss"]
    )
    return
  top1 = [r["top1"] for r in living if r is not None]
  mean, std = mean_std(top1)
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
  results = _run_eval(t.eval_step, loop.state.params, loop.state.rest, t.pipeline)
  records = tuple(r.evaluated(loop.step, res) for r, res in zip(loop.records, results, strict=True))
  living = [
    res if r.died_at_step is None else None for r, res in zip(records, results, strict=True)
  ]
  writer.write_scalars(loop.step, run_scalars(living, "test_"))
  _log_eval(loop.step, living)
  mean = mean_std(res["top1"] for res in living if res is not None)[0]
  return dataclasses.replace(loop, records=records), mean


def save(loop: Loop, t: Training, checkpoints, top1: float | None) -> None:
  """Starts writing the loop's checkpoint (after a flush: never a non-finite step's)."""
  metrics = {"top1": top1} if top1 is not None else None
  with writing("a checkpoint", checkpoints):  # the previous one's failure shows here
    checkpoints.save(loop.step, t.saved_form(loop.state), checkpoint_meta(loop.records), metrics)


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


# Called as on_event(point, step, stop) at "eval" (before evaluating) and "save" (after a
# checkpoint write starts): a hook for instrumentation and tests.
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


def run_summaries(specs, records) -> list[dict]:
  """Per run: seed, swept values, final and best test top-1, best step, death if any."""
  runs = []
  for spec, rec in zip(specs, records, strict=True):
    final = rec.history[-1] if rec.history else None
    runs.append(
      {
        "run": spec.index,
        "seed": spec.seed,
        "values": spec.values,
        "final_top1": final["top1"] if final else None,
        "final_top5": final["top5"] if final else None,
        "best_top1": rec.best_top1 if final else None,
        "best_step": rec.best_step,
        "died_at_step": rec.died_at_step,
        "died_with_loss": rec.died_with_loss,
      }
    )
  return runs


def group_summaries(runs: list[dict]) -> list[dict]:
  """Per swept combination: mean ± sample std (ddof 1) of final and best top-1 over its seeds.

  Runs that died (non-finite loss) or never evaluated are left out of the statistics.
  """
  groups = {}
  for r in runs:
    group = groups.setdefault(
      tuple(r["values"].items()), {"values": r["values"], "seeds": [], "finished_seeds": []}
    )
    group["seeds"].append(r["seed"])
    if r["died_at_step"] is None and r["final_top1"] is not None:
      group["finished_seeds"].append(r["seed"])
  for key, group in groups.items():
    done = [
      r for r in runs if tuple(r["values"].items()) == key and r["seed"] in group["finished_seeds"]
    ]
    for metric in ("final_top1", "best_top1"):
      group[f"{metric}_mean"], group[f"{metric}_std"] = mean_std(r[metric] for r in done)
  return list(groups.values())


def summarize(config, run: Run, t: Training, loop: Loop, clock: _TrainClock, wall: float) -> dict:
  """summary.json: the headline numbers (means over the runs that finished alive), each run,
  each swept combination, and the run's shape and speed."""
  runs = run_summaries(t.specs, loop.records)
  done = [r for r in runs if r["died_at_step"] is None and r["final_top1"] is not None]
  headline = {
    key: mean_std(r[key] for r in done)[0] for key in ("final_top1", "final_top5", "best_top1")
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
    "best_step": runs[0]["best_step"] if len(runs) == 1 else None,
    "steps_per_epoch": t.pipeline.steps_per_epoch,
    "train_images": t.pipeline.train.size,
    "test_images": t.pipeline.test.size,
    "train_images_per_second": clock.images_per_second(),
    "wall_seconds": wall,
    "config": json.loads(config.to_json_best_effort()),
    "num_runs": len(runs),
    "runs": runs,
    "groups": group_summaries(runs),
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
) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the summary.

  With `num_runs` > 1 or a `sweep`, trains all runs side by side in one
  program (README, "Many runs in one process"). Raises WorkdirError if `workdir` cannot
  be used or another run holds it.
  """
  run = run or Run.prepare(config, checkpoints=epath.Path(workdir) / "checkpoints")
  workdir = workdir_lib.prepare(workdir)  # local paths and gs:// alike
  with held_by_this_job(workdir):
    check_resumes_its_own_run(workdir, config)
    return _train_in(workdir, config, run, on_event)


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


def _train_in(workdir: epath.Path, config, run: Run, on_event: EventHook) -> dict:
  from clu import periodic_actions  # TF-free: lkca_jax.metric_writer is imported first

  t = build_training(run, config)
  checkpoints = checkpoint_lib.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
  loop = resume(t, checkpoints, run.mesh)
  resumed_at = loop.step
  if loop.step == 0 and config.init_from:  # no checkpoint of its own (they start at step 1)
    check_init_from(config, run.model)  # unchecked where only damaged checkpoints were
    loop = dataclasses.replace(loop, state=initialised_from(config, run, loop.state))
  t.compile_everywhere(loop.state, loop.step)
  if jax.process_index() == 0:
    files.write_atomic(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))
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
  with StopSignal() as stop:
    loop = run_loop(loop, t, config, out, stop, on_event)
  t.pipeline.close()  # a streaming pipeline's reader threads or worker processes
  with writing("a checkpoint", checkpoints):
    checkpoints.wait()
  latest = checkpoints.latest_step()
  checkpoints.close()
  # Nothing trained (the run had finished): its summary keeps the numbers measured then.
  kept = _summary_of_this_run(workdir, config, loop.step) if loop.step == resumed_at else None
  summary = kept or summarize(config, run, t, loop, out.clock, time.time() - wall_start)
  if kept is None and jax.process_index() == 0:
    with writing(SUMMARY_FILE, checkpoints):
      files.write_json(workdir / SUMMARY_FILE, summary)
  writer.flush()
  writer.close()
  if loop.all_died:
    raise _all_died(loop.records, latest, checkpoints.directory)
  return summary


def _read_for_eval(config, run: Run, like, source) -> checkpoint_lib.Restored:
  """The checkpoint at `source`; without one, init_from's parameters moved (step 0)."""
  if config.init_from and not holds_checkpoint(source):
    directory, step = init_from_source(config.init_from)
    state = {"params": moved_params(config, run), "rest": like["rest"]}
    return checkpoint_lib.Restored(directory / str(step), 0, state, {})
  return read_trained(config, like, source)


def holds_checkpoint(source) -> bool:
  """Whether `source` is a checkpoint step directory, or a checkpoints directory holding one."""
  directory = checkpoint_lib.absolute(source)
  if directory.name.isdigit():
    return True  # named as one: reading it says what is wrong with it
  if not directory.is_dir():
    return False
  checkpoints = checkpoint_lib.Checkpoints(directory, asynchronous=False, read_only=True)
  try:
    return checkpoints.latest_step() is not None
  finally:
    checkpoints.close()


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
  specs = run_specs(config)
  _, eval_graphdef, params, rest = _split_model(run.model)
  like = {"params": params, "rest": rest}  # no optimizer state is built or read
  on_every_device = NamedSharding(run.mesh, P())  # every process's devices
  like = pipeline_lib.put_tree(_as_runs([like] * len(specs)), on_every_device)
  restored = _read_for_eval(config, run, like, source)
  state = variable_values(restored.state)  # arrays: cheaper to pass at every batch
  pipeline = run.load_data(run_keys(config.seed)[0])  # evaluation batches: the same for all
  eval_step = jax.jit(make_eval_step(eval_graphdef, len(specs)))
  if jax.process_count() > 1:
    first_batch = next(iter(pipeline.eval_batches()))
    distributed.compile_everywhere(
      "eval step", (eval_step, (state["params"], state["rest"], first_batch))
    )
  results = _run_eval(eval_step, state["params"], state["rest"], pipeline)
  runs = [
    {"run": spec.index, "seed": spec.seed, "values": spec.values, **res}
    for spec, res in zip(specs, results, strict=True)
  ]
  means = {key: mean_std(r[key] for r in results)[0] for key in ("loss", "top1", "top5")}
  return {"step": restored.step, "checkpoint": str(restored.path), **means, "runs": runs}


def saved_config(workdir, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a `main.py` run saved in `workdir` (its config.json), laid over a copy of
  `base`: each saved value typed as `base` types it (an unset one keeps its type, so it can
  still be overridden); keys the file lacks keep `base`'s values. Raises ConfigError for a
  missing or unreadable file, a value that does not fit, or a key `base` lacks (a run of
  another version of lkca_jax, whose settings could not all be applied)."""
  path = epath.Path(workdir) / CONFIG_FILE
  config = copy.deepcopy(base)
  unknown = _lay_over(config, _saved_json(workdir), path)
  if unknown:
    raise ConfigError(
      f"{path} holds keys this version's config lacks ({', '.join(unknown)}): a run of "
      "another version of lkca_jax"
    )
  return config


def _saved_json(workdir) -> dict:
  """The config.json a `main.py` run wrote in `workdir`; ConfigError if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not epath.Path(workdir).is_dir():
    raise ConfigError(f"{workdir} is not a directory")
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise ConfigError(f"{workdir} is not a training workdir (no {CONFIG_FILE})") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({e})") from None


def _lay_over(config, saved: dict, path, prefix: str = "") -> list[str]:
  """Sets each saved value on `config`, key by key; returns the keys `config` lacks."""
  unknown = []
  for key, value in saved.items():
    if key not in config:
      unknown.append(prefix + key)
    elif isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
      unknown += _lay_over(config[key], value, path, f"{prefix}{key}.")
    elif value is None:
      if config[key] is not None:
        config[key] = ml_collections.config_dict.placeholder(type(config[key]))
    else:
      try:
        config[key] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
      except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(
          f"{path}: {prefix}{key}={value!r} does not fit this config ({e})"
        ) from None
  return unknown


def load_trained(workdir, *, checkpoint=None, run: int = 0) -> models.ViT:
  """The model a `main.py` run trained in `workdir`, in eval mode, for use from code.

  Built from the workdir's config.json, with the parameters of `checkpoint` (a step
  directory <workdir>/checkpoints/<step>), else of the newest checkpoint there that
  restores; of run `run` (0 … K−1) where the run trained several side by side (num_runs,
  sweep). Read-only: a run may be training there. Raises ConfigError or CheckpointError
  (ValueErrors) naming what is missing or does not fit.
  """
  config = ml_collections.ConfigDict(_saved_json(workdir))
  model = build_model(config, dataset_spec(config), nnx.Rngs(params=0, dropout=1))
  source = checkpoint or epath.Path(workdir) / "checkpoints"
  nnx.update(model, read_run_params(config, model, source, run)[0])
  model.eval()
  return model


def read_run_params(config, model, source, run: int = 0):
  """(run `run`'s parameters for `model`, the Restored they came from): read-only, from the
  checkpoint `source` or the newest one there that restores, which holds the parameters of
  `config`'s runs (num_runs × sweep) stacked when there are several."""
  count = len(run_specs(config))
  if not 0 <= run < count:
    raise checkpoint_lib.CheckpointError(
      f"run={run}: the run in {source} trained {count} run(s); pass run 0 … {count - 1}"
    )
  params = nnx.state(model, nnx.Param)
  like = {"params": _as_runs([params] * count)}
  restored = read_trained(config, like, source)
  params = restored.state["params"]
  return (_run_of(params, run) if count > 1 else params), restored
