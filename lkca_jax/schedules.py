"""The learning-rate schedules a run can train on (`optimizer.schedule`), by step.

Each is a function of the optimizer's step count whose peak may be a traced value, one
run's of many (`steps.make_train_step` passes each run's own learning rate).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

# How the learning rate moves (optimizer.schedule): "warmup_cosine" every step, a linear
# warmup then one cosine decay over the steps left; "deit_epochs" once an epoch, as DeiT's
# main.py drives timm's CosineLRScheduler (see `_deit_epochs`).
SCHEDULES = ("warmup_cosine", "deit_epochs")


def check_schedule(optimizer) -> None:
  """ValueError unless `optimizer.schedule` is known and, for "deit_epochs", the warmup is a
  whole number of epochs (timm's warmup_t counts epochs), not a share of the run."""
  if optimizer.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {optimizer.schedule!r}")
  if optimizer.schedule == "deit_epochs" and optimizer.warmup_fraction is not None:
    raise ValueError(
      f'optimizer.schedule="deit_epochs" warms up for whole epochs (optimizer.warmup_epochs), '
      f"got optimizer.warmup_fraction={optimizer.warmup_fraction}; leave it unset and set "
      "optimizer.warmup_epochs"
    )
  if optimizer.schedule == "deit_epochs" and optimizer.warmup_epochs % 1:
    raise ValueError(
      f'optimizer.schedule="deit_epochs" warms up for whole epochs, got '
      f"optimizer.warmup_epochs={optimizer.warmup_epochs}; set it to a whole number"
    )


def learning_rate(config, steps_per_epoch: int, total_steps: int, peak=None) -> optax.Schedule:
  """The learning rate at each step under `optimizer.schedule` (see SCHEDULES), from init
  through peak to end. `peak` (default: the config's learning rate) may be a traced value,
  one run's of many."""
  opt = config.optimizer
  check_schedule(opt)
  peak = opt.learning_rate if peak is None else peak
  if opt.schedule == "deit_epochs":
    return _deit_epochs(opt, peak, steps_per_epoch, total_steps)
  return _warmup_cosine(opt, peak, steps_per_epoch, total_steps)


def warmup_steps(opt, steps_per_epoch: int, total_steps: int) -> int:
  """The steps until the rate reaches its peak, as configured (before any cap by the run):
  `optimizer.warmup_fraction` of the run's steps when set, else `optimizer.warmup_epochs`
  epochs, each rounded to the nearest step; under "deit_epochs" the peak's epoch comes one
  epoch late (see `_deit_epochs`)."""
  if opt.schedule == "deit_epochs":
    return (int(opt.warmup_epochs) + 1) * steps_per_epoch if opt.warmup_epochs else 0
  if opt.warmup_fraction is not None:
    return round(opt.warmup_fraction * total_steps)
  return round(opt.warmup_epochs * steps_per_epoch)


def warmup_share(config) -> float | None:
  """The share of the epochs budget (`num_epochs`) that `optimizer.warmup_epochs` is, as the
  `optimizer.warmup_fraction` that keeps it in a run of any length; None where no fraction
  can ("deit_epochs", or a warmup as long as the budget)."""
  opt = config.optimizer
  share = opt.warmup_epochs / config.num_epochs
  return share if opt.schedule == "warmup_cosine" and share < 1 else None


def warmup_overrun(config, steps_per_epoch: int, total_steps: int) -> str | None:
  """None, or the one-line warning for a run that ends before its warmup does: its rate then
  only rises (e.g. the recipe's 10 epochs in a run shortened by `num_train_steps`)."""
  opt = config.optimizer
  warmup = warmup_steps(opt, steps_per_epoch, total_steps)
  if warmup < total_steps:
    return None
  key = "warmup_epochs" if opt.warmup_fraction is None else "warmup_fraction"
  source, fix = f"optimizer.{key}={opt[key]:g}", f"a smaller --config.optimizer.{key}"
  share = warmup_share(config)
  if key == "warmup_epochs" and share is not None:
    fix += f" or --config.optimizer.warmup_fraction={share:.3g} (the same share of this run)"
  return (
    f"the warmup ({source}: {warmup:,} steps) does not end within the run's {total_steps:,} "
    f"steps, so the learning rate rises for the whole run and never decays; set {fix}"
  )


def _warmup_cosine(opt, peak, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per step: linear warmup from init to peak, then one cosine decay to end.

  optax's warmup_cosine_decay_schedule, written so that `peak` may be traced. The warmup
  (`warmup_steps`) is cut to end before the run does.
  """
  init, end = opt.init_learning_rate, opt.end_learning_rate
  warmup = min(warmup_steps(opt, steps_per_epoch, total_steps), max(total_steps - 1, 0))
  decay = max(total_steps, warmup + 1) - warmup

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = init + (peak - init) * jnp.clip(count, 0, warmup) / max(warmup, 1)
    done = jnp.clip(count - warmup, 0, decay) / decay
    cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * done))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def _deit_epochs(opt, peak, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Constant within an epoch. timm's CosineLRScheduler (t_initial = the epochs, warmup_t,
  no warmup prefix) gives epoch t: init + t (peak - init) / warmup_t while t < warmup_t, then
  end + (peak - end) (1 + cos(pi t / epochs)) / 2: the cosine counts the warmup's epochs
  too, so the peak itself is never used. DeiT's main.py sets epoch e's rate when epoch e - 1
  ends, from e - 1, so epoch e trains at t = max(e - 1, 0) (epochs 0 and 1 both at init)."""
  init, end = opt.init_learning_rate, opt.end_learning_rate
  warmup = int(opt.warmup_epochs)
  epochs = total_steps / steps_per_epoch

  def schedule(count):
    epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
    t = jnp.maximum(epoch - 1, 0).astype(jnp.float32)
    warm = init + (peak - init) * t / max(warmup, 1)
    cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * t / epochs))
    return jnp.where(t < warmup, warm, cosine)

  return schedule
