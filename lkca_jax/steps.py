"""The pure train and eval steps: AdamW on a learning-rate schedule (and, optionally, the
parameters' moving average), batch mixing, label smoothing, and the run axis along which one
program trains several runs.

`make_train_step` builds `train_step(state, batch, rng, hp)`, which `train.build_training`
jits over the mesh with the state donated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lkca_jax import backend, models, schedules
from lkca_jax.mixing import mix_batch


@flax.struct.dataclass
class TrainState:
  """What the train step updates. Its nnx.States hold arrays where the model holds
  Variables (`variable_values`); checkpoints keep the Variables (`train.Training.saved_form`)."""

  step: jax.Array
  params: nnx.State
  opt_state: Any
  rest: nnx.State  # non-parameter module state (RNG stream counters)


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


def create_optimizer(
  config, schedule, weight_decay=None, decay_mask=None
) -> optax.GradientTransformation:
  """AdamW; `weight_decay` (default: the config's) may be traced: the state is the same.
  `decay_mask` (`weight_decay_mask`) limits the decay to its True leaves; None: every
  parameter. With `ema_decay` > 0 its state also keeps the parameters' moving average
  (`params_average`, read with `average_of`)."""
  opt = config.optimizer
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  adamw = optax.adamw(
    schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=weight_decay, mask=decay_mask
  )
  return optax.chain(adamw, params_average(config.ema_decay)) if config.ema_decay else adamw


# Where a saved train state keeps the moving average, as checkpoints name arrays: the
# optimizer state's second part (the chain's `params_average`), its `average`.
AVERAGE_NAME = "opt_state.1.average"


class ParamsAverage(NamedTuple):
  """The state of `params_average`."""

  average: Any  # shaped as the parameters


def params_average(decay: float) -> optax.GradientTransformation:
  """Passes the updates through unchanged and keeps the exponential moving average of the
  parameters they make: average ← decay·average + (1 − decay)·(params + updates), from the
  initial parameters on (timm's ModelEma, which DeiT keeps). Last in a chain, it sees the
  parameters `optax.apply_updates` makes; it changes nothing of the training."""

  def init(params):
    return ParamsAverage(jax.tree.map(jnp.copy, params))  # its own buffers: the state is donated

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    average = jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, state.average, new)
    return updates, ParamsAverage(average)

  return optax.GradientTransformation(init, update)


def _keeps_average(opt_state) -> bool:
  return (
    isinstance(opt_state, tuple) and len(opt_state) == 2 and isinstance(opt_state[1], ParamsAverage)
  )


def average_of(opt_state):
  """The parameters' moving average that a `create_optimizer` state keeps, else None."""
  return opt_state[1].average if _keeps_average(opt_state) else None


def average_restarted(opt_state, params):
  """`opt_state` with its moving average (if it keeps one) started afresh at `params`, as
  `params_average`'s init starts it: for parameters put in place of those it began with."""
  if not _keeps_average(opt_state):
    return opt_state
  return (opt_state[0], ParamsAverage(jax.tree.map(jnp.copy, params)))


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


def variable_values(tree):
  """`tree` with each nnx.Variable replaced by its array: the same leaves in the same order.

  A jitted call flattens and rebuilds every Variable among its arguments and results in
  Python, one by one; arrays it passes in C++ (docs/benchmarks.md, 2026-12-05j).
  `nnx.merge` takes either.
  """
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


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

  `hp` holds the scalars of `runs.hparams` (one a sweepable key), as traced values, so that
  one program trains any of them (and, vmapped, a different one in each run). `decay_mask`
  is `weight_decay_mask`'s.
  """
  mix_options = {
    "cutmix_alpha": config.mixing.cutmix_alpha,
    "mixup_alpha": config.mixing.mixup_alpha,
    "partner": config.mixing.partner,
    "groups": config.mixing.groups,
  }

  def train_step(state: TrainState, batch, rng, hp):
    schedule = schedules.learning_rate(
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
      **mix_options,
    )
    mixed = {"image": images, "label_a": labels_a, "label_b": labels_b, "lam": lam}

    def loss_fn(params, mixed, drop_key):
      model = nnx.merge(train_graphdef, params, state.rest)
      logits = model(
        mixed["image"],
        rngs=nnx.Rngs(dropout=drop_key),
        drop_path_rate=hp["model_overrides.drop_path_rate"],
      )
      smoothing = hp["label_smoothing"]
      lam = mixed["lam"]  # each image's own: its group's draw
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


def run_of(tree, k: int):
  """Run k's part of a tree with a leading run axis."""
  return jax.tree.map(lambda x: x[k], tree)


def _stack(trees):
  """Pytrees of the same structure (one a run) stacked along a new leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def as_runs(trees):
  """The runs' trees as the step and the checkpoints hold them: stacked along a leading run
  axis when there are several, a single run's tree as it is."""
  return _stack(trees) if len(trees) > 1 else trees[0]
