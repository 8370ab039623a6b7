"""The trainer in-process: schedule, devices, config validation, the step on other backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cifar10, default, digits, tinyimagenet
from lkca_jax import train
from lkca_jax.layers import backend
from tests.helpers import with_overrides


def tiny_digits(**overrides):
  config = digits.get_config()
  config.model_overrides.dim = 32
  config.model_overrides.depth = 2
  config.model_overrides.num_heads = 4
  config.batch_size = 32
  config.num_train_steps = 5
  return with_overrides(config, overrides)


def test_default_config_is_the_reference_recipe():
  c = default.get_config()
  assert (
    c.optimizer.learning_rate,
    c.optimizer.b1,
    c.optimizer.b2,
    c.optimizer.eps,
    c.optimizer.weight_decay,
  ) == (1e-3, 0.9, 0.999, 1e-8, 0.05)
  assert (c.batch_size, c.num_epochs, c.repeats, c.optimizer.warmup_epochs) == (128, 100, 3, 10)
  assert (c.label_smoothing, c.mixing.prob, c.mixing.cutmix_prob) == (0.1, 0.5, 0.5)
  assert (c.augment.random_erasing, c.augment.crop_padding, c.seed) == (0.25, 4, 0)
  assert tinyimagenet.get_config().augment.autoaugment == "imagenet"
  assert tinyimagenet.get_config().dataset.mean == (0.4802, 0.4481, 0.3975)


@pytest.mark.parametrize("steps_per_epoch,total", [(1171, 117100), (2343, 234300)])
def test_schedule_warms_up_linearly_then_cosine_decays(steps_per_epoch, total):
  config = cifar10.get_config()
  schedule = train.learning_rate_schedule(config, steps_per_epoch, total)
  warmup = 10 * steps_per_epoch
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)  # the first step uses 1e-6
  assert float(schedule(warmup // 2)) == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-3)
  assert float(schedule(warmup)) == pytest.approx(1e-3, rel=1e-6)
  mid = warmup + (total - warmup) // 2
  assert float(schedule(mid)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
  assert float(schedule(total)) == pytest.approx(1e-6, rel=1e-3)
  lrs = np.asarray([float(schedule(s)) for s in range(warmup, total, 997)])
  assert np.all(np.diff(lrs) <= 0)


def test_model_overrides_reach_the_model():
  config = tiny_digits()
  config.model_overrides.mixer = "lkca,mhsa"
  config.model_overrides.mixer_options.lkca.view = "conv"
  run = train.Run.prepare(config)
  assert run.model.mixers == ["lkca", "mhsa"]
  assert run.model.blocks[0].mixer.view == "conv"
  assert run.model.pool == "mean"
  assert run.model.blocks[0].mixer.kernel.shape == (15, 15)


def _losses(num_devices, steps=5):
  config = tiny_digits(num_devices=num_devices)
  t = train.build_training(train.Run.prepare(config), config)
  assert t.pipeline.mesh.devices.size == num_devices
  state, losses = t.state, []
  order = t.pipeline.epoch_order(0)
  for step in range(steps):
    batch = t.pipeline.train_batch(order, step)
    assert batch["image"].sharding.spec[0] == "data"
    state, metrics = t.train_step(state, batch, t.train_key)
    losses.append(float(metrics["loss"][0]))
  params = jax.device_get(state.params)
  return np.asarray(losses), params


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8
  one, params_one = _losses(1)
  eight, params_eight = _losses(8)
  assert np.all(np.isfinite(one)) and one[0] > one[-1] - 5  # real, finite losses
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_one, params_eight
  )


def _full_size_training(model: str, **overrides):
  """The trainer's step for a paper preset at full width on digits (an 8×8 grid, as CIFAR's)."""
  config = with_overrides(digits.get_config(), {"model": model, "batch_size": 8, **overrides})
  return train.build_training(train.Run.prepare(config), config)


@pytest.mark.parametrize("model", ["lkca_b", "vit"])
def test_the_train_step_exports_for_gpu_and_tpu_with_no_cpu_forms(model):
  t = _full_size_training(model)
  args = t.step_args(t.state, 0)
  lowered = {
    platform: jax.export.export(t.compiled_step, platforms=[platform])(*args).mlir_module()
    for platform in ("cuda", "tpu", "cpu")
  }
  assert backend.CPU_SCOPE in lowered["cpu"]  # the check below can see a CPU form
  for platform in ("cuda", "tpu"):
    assert backend.CPU_SCOPE not in lowered[platform]
    assert "optimization_barrier" not in lowered[platform]


@pytest.mark.parametrize("model", ["lkca_b", "vit"])
def test_the_plain_forms_give_the_cpu_forms_gradients(model):
  """What GPU and TPU compile (the plain forms), run here, against the CPU forms: the same
  gradients to float32 round-off. Two blocks at full width keep the compile short."""
  config = with_overrides(
    digits.get_config(), {"model": model, "batch_size": 8, "model_overrides.depth": 2}
  )
  run = train.Run.prepare(config)
  batch = train.build_training(run, config).batch(0)

  def loss(net):
    logits = net(batch["image"])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), batch["label"]])

  grads = {}
  for form in ("cpu", "plain"):
    with backend.forms(form):
      grads[form] = jax.jit(nnx.grad(loss))(run.model)
  # Reduction terms along the longest path: per block ~8·D in products and norms plus the
  # 65 tokens twice, then the head; a weight gradient also sums over batch × tokens.
  dim = run.model.head.kernel.shape[0]
  terms = 2 * (8 * dim + 2 * 65) + 2 * dim + 8 * 65
  pairs = zip(jax.tree.leaves(grads["cpu"]), jax.tree.leaves(grads["plain"]), strict=True)
  for got, expected in pairs:
    bound = 4 * terms * 2.0**-24 * max(float(jnp.abs(expected).max()), 1e-30)
    assert float(jnp.abs(got - expected).max()) <= bound
