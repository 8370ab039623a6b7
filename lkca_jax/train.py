"""Training and evaluation: one jit-compiled, state-donating step over a `data` mesh.

Parameters and optimizer state are replicated over a 1-D mesh of all devices,
batches are sharded on its `data` axis, and XLA inserts the gradient
all-reduce (the `jit` successor of `pmap` data parallelism).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lkca_jax import checkpoint as checkpoint_lib
from lkca_jax import config_checks, distributed, files, metric_writer, models
from lkca_jax import data as data_lib
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
      options = {
        name: {k: v for k, v in opts.items() if v is not None} for name, opts in value.items()
      }
      options = {name: opts for name, opts in options.items() if opts}
      if options:
        overrides[key] = options
    elif value is not None:
      overrides[key] = value.split(",") if key == "mixer" and "," in value else value
  return overrides


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


def create_optimizer(config, schedule, weight_decay=None) -> optax.GradientTransformation:
  """AdamW; `weight_decay` (default: the config's) may be traced: the state is the same."""
  opt = config.optimizer
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=weight_decay)


# --- many runs: seeds x sweep --------------------------------------------------
# Swept config key → the name of its per-run value in the step's `hparams`.
HPARAMS = {
  "optimizer.learning_rate": "learning_rate",
  "optimizer.weight_decay": "weight_decay",
  "model_overrides.drop_path_rate": "drop_path_rate",
  "label_smoothing": "label_smoothing",
  "mixing.prob": "mixing_prob",
  "mixing.cutmix_prob": "cutmix_prob",
}
assert set(HPARAMS) == set(config_checks.SWEEPABLE)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a many-run process: its seed, swept values, and its own single-run config."""

  index: int
  seed: int
  values: dict  # {swept config key: value}
  config: ml_collections.ConfigDict  # num_runs=1, no sweep: trains this run alone


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


def hparams(config) -> dict[str, float]:
  """The step's per-run scalars of a single-run config."""
  rate = config.model_overrides.drop_path_rate
  if rate is None:
    rate = models.PRESETS[config.model].drop_path_rate
  return {
    "learning_rate": config.optimizer.learning_rate,
    "weight_decay": config.optimizer.weight_decay,
    "drop_path_rate": rate,
    "label_smoothing": config.label_smoothing,
    "mixing_prob": config.mixing.prob,
    "cutmix_prob": config.mixing.cutmix_prob,
  }


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


def make_train_step(train_graphdef, config, steps_per_epoch: int, total_steps: int):
  """Returns the pure step `train_step(state, batch, rng, hp) -> (state, metrics)`.

  `hp` holds the scalars of `hparams`, as traced values, so that one program
  trains any of them (and, vmapped, a different one in each run).
  """
  alphas = {"cutmix_alpha": config.mixing.cutmix_alpha, "mixup_alpha": config.mixing.mixup_alpha}

  def train_step(state: TrainState, batch, rng, hp):
    schedule = learning_rate_schedule(
      config, steps_per_epoch, total_steps, peak=hp["learning_rate"]
    )
    tx = create_optimizer(config, schedule, weight_decay=hp["weight_decay"])
    smoothing = hp["label_smoothing"]
    step_key = jax.random.fold_in(rng, state.step)
    mix_key, drop_key = jax.random.split(step_key)
    images, labels_a, labels_b, lam = mix_batch(
      mix_key,
      batch["image"],
      batch["label"],
      prob=hp["mixing_prob"],
      cutmix_prob=hp["cutmix_prob"],
      **alphas,
    )

    def loss_fn(params):
      model = nnx.merge(train_graphdef, params, state.rest)
      logits = model(images, rngs=nnx.Rngs(dropout=drop_key), drop_path_rate=hp["drop_path_rate"])
      loss = lam * cross_entropy(logits, labels_a, smoothing) + (1.0 - lam) * cross_entropy(
        logits, labels_b, smoothing
      )
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


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_runs_step(train_step):
  """`train_step` vmapped over a leading run axis, with a per-run `alive` mask.

  A run whose loss or new parameters are non-finite dies: from that step on
  its parameters and optimizer state stay those before the step, so it never
  feeds NaN to the others (they share nothing but the program). Returns
  `runs_step(state, batch, rng, hp, alive) -> (state, metrics)`, metrics with
  the new `alive`.
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

  return jax.vmap(one_run)


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
  def prepare(cls, config) -> Run:
    """Validates the config, dataset and devices; builds the model. Raises ConfigError."""
    config_checks.validate(config)  # every key's own range first, before anything is built
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
      pipeline_lib.check_global_batch(config.batch_size, mesh.devices.size)
      model = build_model(config, spec, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    except ValueError as e:
      raise ConfigError(str(e)) from None
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


def _stack(trees):
  """Pytrees of the same structure (one a run) stacked along a new leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _run_eval(eval_fn, params, rest, pipeline) -> dict | list[dict]:
  """Test loss, top-1 and top-5 of one run; of stacked parameters, a list with one a run."""
  totals = None
  for batch in pipeline.eval_batches():
    sums = distributed.in_order(eval_fn(params, rest, batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)

  def rates(t):
    count = float(t["count"])
    return {
      "loss": float(t["loss"]) / count,
      "top1": float(t["top1"]) / count,
      "top5": float(t["top5"]) / count,
    }

  if np.ndim(totals["count"]) == 0:
    return rates(totals)
  return [rates({k: v[r] for k, v in totals.items()}) for r in range(len(totals["count"]))]


def _first_nonfinite(metrics_window, first_step: int) -> int | None:
  """Number (1-based, as checkpoints count) of the first step with a non-finite loss."""
  losses = np.asarray([m["loss"] for m in metrics_window])
  bad = np.flatnonzero(~np.isfinite(losses))
  return first_step + int(bad[0]) + 1 if bad.size else None


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
  values = [float(v) for v in values]
  if not values:
    return None, None
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


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
      "fit; lower --config.num_runs or the sweep"
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
  """The compiled pieces of a run (or of runs side by side): data, state, the two steps.

  With one run the state is as a single run's; with several every leaf has a
  leading run axis, and `alive` marks the runs whose loss is still finite.
  """

  pipeline: pipeline_lib.Pipeline
  state: TrainState
  compiled_step: Any  # jit(step(state, batch, rng, hp[, alive])), state donated
  eval_step: Any  # jit(eval_step(params, rest, batch)) -> sums
  schedule: optax.Schedule
  total_steps: int
  train_key: jax.Array
  hparams: dict  # the step's per-run scalars (run axis first with several runs)
  specs: list  # RunSpec of each run
  alive: jax.Array | None = None  # with several runs: (runs,) bool
  _order: tuple = dataclasses.field(default=(-1, None), repr=False)  # (epoch, its order)

  @property
  def many(self) -> bool:
    return len(self.specs) > 1

  def train_step(self, state: TrainState, batch, rng):
    """The jitted update of one run on `batch` (state donated)."""
    return self.compiled_step(state, batch, rng, self.hparams)

  def epoch_order(self, epoch: int) -> jax.Array:
    """The epoch's example order, drawn once and kept until the next epoch."""
    if self._order[0] != epoch:
      self._order = (epoch, self.pipeline.epoch_order(epoch))
    return self._order[1]

  def batch(self, step: int) -> dict:
    """The augmented training batch of global step `step` (of every run)."""
    return self.pipeline.train_batch(self.epoch_order(step // self.pipeline.steps_per_epoch), step)

  def step_args(self, state: TrainState, step: int) -> tuple:
    """The arguments of `compiled_step` at global step `step`."""
    args = (state, self.batch(step), self.train_key, self.hparams)
    return (*args, self.alive) if self.many else args

  def step(self, state: TrainState, step: int):
    """One training step at global step `step`: its batch, then the jitted update."""
    state, metrics = self.compiled_step(*self.step_args(state, step))
    if self.many:
      self.alive = metrics["alive"]
    return state, metrics

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


def _initial_states(run: Run, specs, tx):
  """Per run (params, rest, opt_state) from its own seed, as its single run would build them."""
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
  return [by_seed[spec.seed] for spec in specs]


def build_training(run: Run, config, *, memory_limit: int | None = None) -> Training:
  """Data, initial state and compiled steps of `config`'s runs (one, or several side by side).

  With several runs on a device that states its memory (or given `memory_limit`
  bytes), raises ConfigError before training when they do not fit.
  """
  specs = run_specs(config)
  many = len(specs) > 1
  if many:
    keys = [run_keys(spec.seed) for spec in specs]
    data_key, train_key = (jnp.stack([k[i] for k in keys]) for i in (0, 1))
  else:
    data_key, train_key = run_keys(config.seed)
  pipeline = run.load_data(data_key)
  total_steps = total_train_steps(config, pipeline.steps_per_epoch)
  schedule = learning_rate_schedule(config, pipeline.steps_per_epoch, total_steps)
  tx = create_optimizer(config, schedule)
  train_graphdef, eval_graphdef, _, _ = _split_model(run.model)
  params, rest, opt_state = (
    _stack(parts) if many else parts[0]
    for parts in zip(*_initial_states(run, specs, tx), strict=True)
  )
  step0 = jnp.zeros((len(specs),) if many else (), jnp.int32)
  per_run = [hparams(spec.config) for spec in specs]
  hp = {
    name: jnp.asarray([h[name] for h in per_run] if many else per_run[0][name], jnp.float32)
    for name in per_run[0]
  }
  replicated = NamedSharding(run.mesh, P())
  state = TrainState(step=step0, params=params, opt_state=opt_state, rest=rest)
  state, hp = pipeline_lib.put_tree((state, hp), replicated)  # onto every process's devices
  state_sharding = jax.tree.map(lambda _: replicated, state)
  train_step = make_train_step(train_graphdef, config, pipeline.steps_per_epoch, total_steps)
  eval_step = make_eval_step(eval_graphdef)
  alive = None
  if many:
    compiled = jax.jit(
      make_runs_step(train_step),
      in_shardings=(state_sharding, pipeline.train_sharding, replicated, replicated, replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    )
    eval_step = jax.vmap(eval_step, in_axes=(0, 0, None))
    alive = jax.device_put(jnp.ones(len(specs), bool), replicated)
  else:
    compiled = jax.jit(
      train_step,
      in_shardings=(state_sharding, pipeline.batch_sharding, replicated, replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    )
  t = Training(
    pipeline,
    state,
    compiled,
    jax.jit(eval_step, out_shardings=replicated),
    schedule,
    total_steps,
    train_key,
    hp,
    specs,
    alive,
  )
  limit = memory_limit or device_memory_limit()  # this process's first device
  if many and limit:  # compiled once more here, ahead of time, for its memory analysis
    lowered = compiled.lower(state, t.batch(0), train_key, hp, alive)
    dataset = sum(
      x.nbytes
      for split in (pipeline.train, pipeline.test)
      if split.on_device
      for x in (split.images, split.labels)
    )
    check_runs_fit(len(specs), step_memory_bytes(lowered.compile()), limit, dataset)
  return t


def describe_values(run: dict) -> str:
  """ "label_smoothing=0.1, mixing.prob=0": the swept values of a run or group (its "values")."""
  return ", ".join(f"{k}={v:g}" for k, v in run["values"].items())


def describe(spec: RunSpec) -> str:
  """ "seed 3, label_smoothing=0.1": how a run is named in logs."""
  return ", ".join([f"seed {spec.seed}", *(f"{k}={v:g}" for k, v in spec.values.items())])


def _fresh_record() -> dict:
  return {"best_top1": -1.0, "best_step": 0, "history": [], "died_at_step": None}


def run_summaries(specs, records) -> list[dict]:
  """Per run: seed, swept values, final and best test top-1, best step, death if any."""
  runs = []
  for spec, rec in zip(specs, records, strict=True):
    final = rec["history"][-1] if rec["history"] else None
    runs.append(
      {
        "run": spec.index,
        "seed": spec.seed,
        "values": spec.values,
        "final_top1": final["top1"] if final else None,
        "final_top5": final["top5"] if final else None,
        "best_top1": rec["best_top1"] if final else None,
        "best_step": rec["best_step"],
        "died_at_step": rec.get("died_at_step"),
      }
    )
  return runs


def group_summaries(runs: list[dict]) -> list[dict]:
  """Per swept combination: mean ± sample std (ddof 1) of final and best top-1 over its seeds.

  Runs that died (non-finite loss) or never evaluated are left out of the statistics.
  """
  groups = {}
  for r in runs:
    key = tuple(r["values"].items())
    groups.setdefault(key, {"values": r["values"], "seeds": [], "finished_seeds": []})
    groups[key]["seeds"].append(r["seed"])
    if r["died_at_step"] is None and r["final_top1"] is not None:
      groups[key]["finished_seeds"].append(r["seed"])
  for key, group in groups.items():
    done = [
      r for r in runs if tuple(r["values"].items()) == key and r["seed"] in group["finished_seeds"]
    ]
    for metric in ("final_top1", "best_top1"):
      group[f"{metric}_mean"], group[f"{metric}_std"] = mean_std(r[metric] for r in done)
  return list(groups.values())


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, run: Run | None = None
) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the summary.

  With `num_runs` > 1 or a `sweep`, trains all runs side by side in one
  program (README, "Many runs in one process").
  """
  from clu import periodic_actions  # TF-free: lkca_jax.metric_writer is imported first

  run = run or Run.prepare(config)
  workdir = epath.Path(workdir)  # local paths and gs:// alike
  workdir.mkdir(parents=True, exist_ok=True)
  t = build_training(run, config)
  pipeline, state, total_steps, specs, many = t.pipeline, t.state, t.total_steps, t.specs, t.many
  eval_step = t.eval_step
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else pipeline.steps_per_epoch

  checkpoints = checkpoint_lib.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
  # One run: today's layout. Several: one record each (best, history, death) under "runs".
  meta = (
    {"runs": [_fresh_record() for _ in specs]}
    if many
    else {"best_top1": -1.0, "best_step": 0, "history": []}
  )
  restored = checkpoints.restore_latest(state)  # damaged ones: a warning each, set aside
  if restored is not None:
    start, state, meta = restored
    logging.info("resumed from %s/%d", checkpoints.directory, start)
  records = meta["runs"] if many else [meta]
  if many:
    t.alive = jax.device_put(
      jnp.asarray([r["died_at_step"] is None for r in records]), NamedSharding(run.mesh, P())
    )
  step = int(np.asarray(state.step).reshape(-1)[0])
  t.compile_everywhere(state, step)
  if jax.process_index() == 0:
    files.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))

  writer = metric_writer.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams(
      {
        "model": config.model,
        "dataset": config.dataset.name,
        "params": run.num_params,
        "devices": run.mesh.devices.size,
        **({"runs": len(specs)} if many else {}),
      }
    )
  progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps, every_secs=None
  )
  logging.info(
    "%s on %s: %d params, %d steps (%d a epoch), %d devices%s",
    config.model,
    config.dataset.name,
    run.num_params,
    total_steps,
    pipeline.steps_per_epoch,
    run.mesh.devices.size,
    f", {len(specs)} runs side by side" if many else "",
  )

  def save(at_step, eval_top1=None):
    if window:  # never let a non-finite step into a checkpoint
      flush()
    checkpoints.save(at_step, state, meta, {"top1": eval_top1} if eval_top1 is not None else None)

  def with_spread(scalars: dict, per_run: list[dict], name: str) -> None:
    """Adds each run's `name` values as run<k>/..., and their mean/ and std/ over runs."""
    for key in per_run[0] if per_run else ():
      values = []
      for k, values_k in enumerate(per_run):
        if values_k is not None:
          scalars[f"run{k}/{name}{key}"] = values_k[key]
          values.append(values_k[key])
      mean, std = mean_std(values)
      if mean is not None:
        scalars[f"mean/{name}{key}"] = mean
      if std is not None:
        scalars[f"std/{name}{key}"] = std

  window, window_start = [], step  # per-step metrics not yet fetched from the devices

  def flush():
    nonlocal window, window_start
    fetched = jax.device_get(window)
    if not many:
      bad = _first_nonfinite(fetched, window_start)
      if bad is not None:
        checkpoints.wait()
        keep = checkpoints.latest_step()
        raise NonFiniteLossError(
          f"loss became non-finite at step {bad}; training stopped. The last good checkpoint "
          f"({checkpoints.directory}/{keep}) is kept: lower the learning rate or use float32."
        )
      summary = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    else:
      alive = np.stack([m["alive"] for m in fetched])  # (steps, runs)
      for k, rec in enumerate(records):
        if rec["died_at_step"] is None and not alive[:, k].all():
          rec["died_at_step"] = window_start + int(np.argmin(alive[:, k])) + 1
          logging.warning(
            "run %d (%s) stopped: loss became non-finite at step %d; its "
            "parameters stay those before that step, the other runs go on",
            k,
            describe(specs[k]),
            rec["died_at_step"],
          )
      if all(rec["died_at_step"] is not None for rec in records):
        checkpoints.wait()
        raise NonFiniteLossError(
          "loss became non-finite in every run (at steps "
          f"{', '.join(str(r['died_at_step']) for r in records)}); training stopped. The last "
          f"checkpoint ({checkpoints.directory}/{checkpoints.latest_step()}) is kept: lower "
          "the learning rate or use float32."
        )
      keys = [key for key in fetched[0] if key != "alive"]
      per_run = []
      for k in range(len(specs)):
        live = np.flatnonzero(alive[:, k])  # its steps before it died
        per_run.append(
          {key: float(np.mean([fetched[i][key][k] for i in live])) for key in keys}
          if live.size
          else None
        )
      summary = {}
      with_spread(summary, per_run, "train_")
    writer.write_scalars(window_start + len(fetched), summary)
    window, window_start = [], window_start + len(fetched)

  def evaluate_now():
    results = _run_eval(eval_step, state.params, state.rest, pipeline)
    results = results if many else [results]
    for rec, res in zip(records, results, strict=True):
      rec["history"].append({"step": step, **res})
      if rec.get("died_at_step") is None and res["top1"] > rec["best_top1"]:
        rec["best_top1"], rec["best_step"] = res["top1"], step
    if not many:
      res = results[0]
      writer.write_scalars(step, {f"test_{k}": v for k, v in res.items()})
      logging.info(
        "step %d: test top1 %.4f top5 %.4f loss %.4f", step, res["top1"], res["top5"], res["loss"]
      )
      return res["top1"]
    living = [
      res if rec["died_at_step"] is None else None
      for rec, res in zip(records, results, strict=True)
    ]
    scalars = {}
    with_spread(scalars, living, "test_")
    writer.write_scalars(step, scalars)
    top1 = [res["top1"] for res in living if res is not None]
    mean, std = mean_std(top1)
    logging.info(
      "step %d: test top1 %.4f ± %.4f over %d live runs (%s)",
      step,
      mean,
      std or 0.0,
      len(top1),
      " ".join(f"{x:.4f}" for x in top1),
    )
    return mean

  clock = _TrainClock(config.batch_size * len(specs))
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
      stopping = distributed.agree_on_stop(stop.received, step, metrics)  # one answer for all
      save_now = eval_now or step % config.checkpoint_every_steps == 0 or stopping is not None
      if step % config.log_every_steps == 0 or save_now:
        clock.stop(metrics)  # evaluation and checkpoints are not training time
        flush()
      eval_top1 = None
      if eval_now:
        stop.hold_for_tests("eval", step)
        eval_top1 = evaluate_now()
      if save_now:
        save(step, eval_top1)
        stop.hold_for_tests("save", step)  # the write is in flight
      clock.resume()
      if stopping:
        stopped_by = stopping
        break
    if window:
      flush()
  checkpoints.close()
  wall = time.time() - wall_start

  runs = run_summaries(specs, records)
  groups = group_summaries(runs)
  if many:  # the headline numbers: means over the runs that finished alive
    done = [r for r in runs if r["died_at_step"] is None and r["final_top1"] is not None]
    final = (
      {
        "top1": mean_std(r["final_top1"] for r in done)[0],
        "top5": mean_std(r["final_top5"] for r in done)[0],
      }
      if done
      else None
    )
    best_top1, best_step = (mean_std(r["best_top1"] for r in done)[0] if done else None), None
  else:
    final = meta["history"][-1] if meta["history"] else None
    best_top1, best_step = (meta["best_top1"] if final else None), meta["best_step"]
  summary = {
    "model": config.model,
    "dataset": config.dataset.name,
    "params": run.num_params,
    "devices": run.mesh.devices.size,
    "step": step,
    "total_steps": total_steps,
    "stopped_by": stopped_by,
    "final_top1": final["top1"] if final else None,
    "final_top5": final["top5"] if final else None,
    "best_top1": best_top1,
    "best_step": best_step,
    "steps_per_epoch": pipeline.steps_per_epoch,
    "train_images": pipeline.train.size,
    "test_images": pipeline.test.size,
    "train_images_per_second": clock.images_per_second(),
    "wall_seconds": wall,
    "config": json.loads(config.to_json_best_effort()),
    "num_runs": len(specs),
    "runs": runs,
    "groups": groups,
  }
  if jax.process_index() == 0:
    files.write_json(workdir / "summary.json", summary)
  writer.flush()
  writer.close()
  return summary


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None
) -> dict:
  """Evaluates on the test split `checkpoint`, or else the newest good checkpoint in workdir.

  With several runs, every run: their results are under "runs", their means at the top.
  """
  run = Run.prepare(config)
  if checkpoint:
    directory, step = checkpoint_lib.resolve(checkpoint)
  else:
    directory, step = epath.Path(workdir) / "checkpoints", None
    if not directory.is_dir():
      raise checkpoint_lib.CheckpointError(
        f"no checkpoint in {directory}; train first or pass --checkpoint PATH"
      )
  specs = run_specs(config)
  many = len(specs) > 1
  _, eval_graphdef, params, rest = _split_model(run.model)
  # Only what evaluation needs is read: no optimizer state is built or restored.
  like = {"params": params, "rest": rest}
  like = pipeline_lib.put_tree(
    _stack([like] * len(specs)) if many else like, NamedSharding(run.mesh, P())
  )  # onto every process's devices
  checkpoints = checkpoint_lib.Checkpoints(directory, asynchronous=False, read_only=True)
  if step is None:  # the newest that restores; damaged ones are skipped with a warning
    restored = checkpoints.restore_latest(like, partial=True)
    if restored is None:
      raise checkpoint_lib.CheckpointError(
        f"no checkpoint in {directory}; train first or pass --checkpoint PATH"
      )
    step, state, _ = restored
  else:
    state, _ = checkpoints.restore(step, like, partial=True)
  checkpoints.close()
  pipeline = run.load_data(run_keys(config.seed)[0])  # evaluation batches: the same for all
  eval_step = make_eval_step(eval_graphdef)
  eval_step = jax.jit(jax.vmap(eval_step, in_axes=(0, 0, None)) if many else eval_step)
  if jax.process_count() > 1:
    first_batch = next(iter(pipeline.eval_batches()))
    distributed.compile_everywhere(
      "eval step", (eval_step, (state["params"], state["rest"], first_batch))
    )
  if not many:
    metrics = _run_eval(eval_step, state["params"], state["rest"], pipeline)
    return {"step": step, "checkpoint": f"{directory}/{step}", **metrics}
  results = _run_eval(eval_step, state["params"], state["rest"], pipeline)
  runs = [
    {"run": spec.index, "seed": spec.seed, "values": spec.values, **res}
    for spec, res in zip(specs, results, strict=True)
  ]
  means = {key: mean_std(r[key] for r in results)[0] for key in ("loss", "top1", "top5")}
  return {"step": step, "checkpoint": f"{directory}/{step}", **means, "runs": runs}
