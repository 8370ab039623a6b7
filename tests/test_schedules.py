"""The learning-rate schedules: the reference's warmup-cosine by step, and DeiT's by epoch."""

import jax
import numpy as np
import pytest

from configs import cifar10, imagenet
from lkca_jax import schedules
from lkca_jax.data import pipeline as pipeline_lib


@pytest.mark.parametrize("steps_per_epoch,total", [(1171, 117100), (2343, 234300)])
def test_schedule_warms_up_linearly_then_cosine_decays(steps_per_epoch, total):
  config = cifar10.get_config()
  schedule = schedules.learning_rate(config, steps_per_epoch, total)
  warmup = 10 * steps_per_epoch
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-5)  # the first step uses 1e-6
  assert float(schedule(warmup // 2)) == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-3)
  assert float(schedule(warmup)) == pytest.approx(1e-3, rel=1e-6)
  mid = warmup + (total - warmup) // 2
  assert float(schedule(mid)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
  assert float(schedule(total)) == pytest.approx(1e-6, rel=1e-3)
  lrs = np.asarray([float(schedule(s)) for s in range(warmup, total, 997)])
  assert np.all(np.diff(lrs) <= 0)


def test_a_fractional_warmup_ends_at_its_nearest_step():
  """5/3 of an epoch of 3,753 steps is 6,255 steps, step 6,255 the first at the peak."""
  config = cifar10.get_config()
  config.optimizer.warmup_epochs = 5 / 3
  schedule = schedules.learning_rate(config, 3753, 100 * 3753)
  rates = [float(schedule(s)) for s in (6253, 6254, 6255)]
  slope = (1e-3 - 1e-6) / 6255
  assert rates[1] - rates[0] == pytest.approx(slope, rel=1e-2)
  assert rates[2] - rates[1] == pytest.approx(slope, rel=1e-2)
  assert rates[2] == pytest.approx(1e-3, rel=1e-6)
  # 0.26 of 10 steps is 3 whole steps (not 2.6): step 2 is two thirds of the way up.
  config.optimizer.warmup_epochs = 0.26
  schedule = schedules.learning_rate(config, 10, 1000)
  assert float(schedule(2)) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 2 / 3, rel=1e-6)
  assert float(schedule(3)) == pytest.approx(1e-3, rel=1e-6)


def test_the_deit_schedule_sets_timms_cosine_once_an_epoch_as_deits_main_does():
  """configs/imagenet.py on ImageNet-1k's 1,281,167 images at batch 1024: 1,251 steps an
  epoch (RASampler's 1,281,024 samples). DeiT's main.py sets epoch e's rate from e - 1, so
  epochs 0 and 1 train at the warmup's 1e-6; timm's warmup_t = 5 climbs by a fifth of the
  way an epoch; its cosine runs over all 300 epochs, warmup included, so it starts below the
  peak, is half-way at epoch 151 (t = 150) and never reaches the peak itself."""
  config = imagenet.get_config()
  per_epoch = pipeline_lib.steps_per_epoch(1_281_167, 1024, 3, "images")
  assert per_epoch == 1251
  schedule = jax.jit(schedules.learning_rate(config, per_epoch, 300 * per_epoch))
  first = np.asarray([float(schedule(e * per_epoch)) for e in range(300)])
  last = np.asarray([float(schedule(e * per_epoch + per_epoch - 1)) for e in range(300)])
  np.testing.assert_array_equal(first, last)  # constant within each epoch
  peak, init, end = 1e-3, 1e-6, 1e-5
  climb = (peak - init) / 5
  np.testing.assert_allclose(
    first[:6],
    [init, init, init + climb, init + 2 * climb, init + 3 * climb, init + 4 * climb],
    rtol=1e-6,
  )
  assert peak * (1 - 1e-3) < first[6] < peak  # cos(pi 5 / 300): 6.8e-7 below the peak
  assert first.max() == first[6]
  assert first[151] == pytest.approx((peak + end) / 2, rel=1e-6)
  # The last epoch trains at t = 298: (peak - end) sin(pi / 300)^2 = 1.1e-7 above the end.
  assert np.all(np.diff(first[6:]) < 0) and end < first[299] < end * 1.02


def test_the_deit_schedule_warms_up_for_whole_epochs_only():
  config = imagenet.get_config()
  config.optimizer.warmup_epochs = 5 / 3
  with pytest.raises(ValueError, match="warms up for whole epochs"):
    schedules.learning_rate(config, 1251, 300 * 1251)
  config.optimizer.schedule = "warmup_cosine"  # rounded to steps there
  assert float(schedules.learning_rate(config, 3, 30)(5)) == pytest.approx(1e-3)


def test_a_warmup_fraction_is_that_share_of_the_run_whatever_the_epochs():
  """warmup_fraction replaces warmup_epochs: 0.1 of 1,000 steps peaks at step 100 and the
  cosine then reaches the end at step 1,000, where 10 epochs of 1,171 steps would not end."""
  config = cifar10.get_config()
  config.optimizer.warmup_fraction = 0.1
  schedule = schedules.learning_rate(config, 1171, 1000)
  assert float(schedule(50)) == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-5)
  assert float(schedule(99)) < 1e-3 and float(schedule(100)) == pytest.approx(1e-3, rel=1e-6)
  assert float(schedule(550)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-5)
  assert float(schedule(1000)) == pytest.approx(1e-6, rel=1e-4)
  assert schedules.warmup_overrun(config, 1171, 1000) is None


def test_a_warmup_that_outlasts_the_run_is_named_with_its_fix():
  config = cifar10.get_config()  # 10 of 100 epochs
  assert schedules.warmup_overrun(config, 1171, 117_100) is None
  assert schedules.warmup_overrun(config, 1171, 11_711) is None  # one step of decay
  note = schedules.warmup_overrun(config, 1171, 1000)
  assert "optimizer.warmup_epochs=10: 11,710 steps" in note and "run's 1,000 steps" in note
  assert note.endswith("--config.optimizer.warmup_fraction=0.1 (the same share of this run)")
  # Without the fix, the rate rises over all 1,000 steps (0 ... 999), the last at the peak.
  schedule = schedules.learning_rate(config, 1171, 1000)
  rates = np.asarray([float(schedule(s)) for s in range(1000)])
  assert np.all(np.diff(rates) > 0) and rates[-1] == pytest.approx(1e-3, rel=1e-6)
  # DeiT's schedule peaks an epoch after its 5 warmup epochs: 6 of 1,251 steps.
  deit = imagenet.get_config()
  assert schedules.warmup_overrun(deit, 1251, 6 * 1251 + 1) is None
  note = schedules.warmup_overrun(deit, 1251, 6 * 1251)
  assert "7,506 steps" in note and "warmup_fraction" not in note.split("; set")[1]
  config.optimizer.warmup_fraction = 0.9995  # 999.5 of 1,000 steps rounds to 1,000
  note = schedules.warmup_overrun(config, 1171, 1000)
  assert "(optimizer.warmup_fraction=0.9995: 1,000 steps)" in note
  assert note.endswith("set a smaller --config.optimizer.warmup_fraction")


def test_the_deit_schedule_takes_no_warmup_fraction():
  config = imagenet.get_config()
  config.optimizer.warmup_fraction = 0.1
  with pytest.raises(ValueError, match="leave it unset and set optimizer.warmup_epochs"):
    schedules.check_schedule(config.optimizer)
