"""Many runs in one process: seeds and swept scalars trained side by side under one vmapped step.

Run k of a K-run process must be the single run with seed + k (and its swept values).
The two are different programs (a batched product sums in another order, and how differs
by CPU kind), so they agree to float32 round-off, not bitwise, and AdamW can amplify
round-off without limit where a gradient is near zero; a tolerance on free-running
trajectories would only restate one machine's margin. So each step is checked from the
same state: run k's slot of the K-run state is set to the single run's, one step of each
program is taken, and they must agree to the round-off of that one step, propagated
through AdamW by interval arithmetic (`tests.helpers.adamw_round_off`). That checks, at every step,
the data order, the augmentation and dropout keys, the schedule and every swept value.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from lkca_jax import config_checks, runs, train
from lkca_jax.data import pipeline as pipeline_lib
from tests.helpers import U, assert_one_step_apart, step_chain_terms, with_overrides

pytestmark = pytest.mark.slow  # trains or starts processes: make test, not make check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
# Tiny, but with every random part of the recipe on: CutMix/Mixup (digits: prob 0.5),
# stochastic depth (lkca_t: 0.1), crop augmentation, shuffled data order.
TINY = {
  "model_overrides.dim": 32,
  "model_overrides.depth": 2,
  "model_overrides.num_heads": 2,
  "batch_size": 32,
  "num_train_steps": STEPS,
  "num_devices": 1,
  "eval_every_steps": 5,
  "log_every_steps": 5,
  "checkpoint_every_steps": 5,
  "optimizer.warmup_epochs": 0,
}


def tiny(**overrides):
  return with_overrides(digits.get_config(), {**TINY, **overrides})


def assert_each_step_is_the_single_runs(many, single, k, config, steps=STEPS):
  """From one shared state per step, run k of `many` and `single` take the same step.
  Returns the runs' `alive` mask at the end and `many`'s losses (steps, runs); the other
  runs train freely from their own states."""
  terms = step_chain_terms(config)
  many_state, single_state, alive = many.state, single.state, many.all_alive
  losses = []
  for step in range(steps):
    forced = jax.tree.map(lambda m, s: m.at[k].set(s), many_state, single_state)
    before = jax.device_get(single_state.replace(rest=None))  # rest holds PRNG keys
    many_state, many_metrics = many.step(forced, step, alive)
    alive = many_metrics["alive"]
    losses.append(np.asarray(many_metrics["loss"]))
    single_state, single_metrics = single.step(single_state, step)
    loss_k, loss = float(many_metrics["loss"][k]), float(single_metrics["loss"][0])
    assert abs(loss_k - loss) <= 2 * terms * U * abs(loss), (step, loss_k, loss)
    after = jax.device_get(single_state.replace(rest=None))
    run_k = jax.tree.map(lambda a: np.asarray(a)[k], jax.device_get(many_state.params))
    lr = float(single_metrics["learning_rate"][0])
    assert float(many_metrics["learning_rate"][k]) == lr
    assert_one_step_apart(config, before, after, run_k, lr, terms, step)
  return alive, np.stack(losses)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_stacked_pipeline_gives_each_run_its_own_order_and_augmentation(placement):
  # Every per-image augmentation on, over a 2-device data axis.
  config = tiny(
    num_devices=2,
    **{
      "dataset.placement": placement,
      "augment.autoaugment": "svhn",
      "augment.random_erasing": 0.5,
    },
  )
  run = train.Run.prepare(config)
  keys = [runs.run_keys(seed)[0] for seed in (3, 4)]
  many = pipeline_lib.from_config(config, run.spec, run.mesh, jnp.stack(keys))
  order = many.epoch_order(1)
  batch = many.train_batch(order, 70)
  assert batch["image"].shape[:2] == (2, 32) and batch["image"].sharding.spec[1] == "data"
  for k, key in enumerate(keys):
    one = pipeline_lib.from_config(config, run.spec, run.mesh, key)
    one_order = one.epoch_order(1)
    np.testing.assert_array_equal(np.asarray(order[k]), np.asarray(one_order))
    one_batch = one.train_batch(one_order, 70)
    np.testing.assert_array_equal(np.asarray(batch["label"][k]), np.asarray(one_batch["label"]))
    np.testing.assert_allclose(
      np.asarray(batch["image"][k]), np.asarray(one_batch["image"]), rtol=0, atol=1e-6
    )
  assert not np.array_equal(np.asarray(order[0]), np.asarray(order[1]))


def build(config):
  return train.build_training(train.Run.prepare(config), config)


def test_each_of_three_runs_reproduces_its_single_run():
  many = build(tiny(num_runs=3, seed=5))
  assert [s.seed for s in many.specs] == [5, 6, 7]
  for k in range(3):
    single_config = tiny(seed=5 + k)
    _, losses = assert_each_step_is_the_single_runs(many, build(single_config), k, single_config)
    assert losses.shape == (STEPS, 3) and np.all(np.isfinite(losses))
    # Different seeds, different runs (run k is its single run's; the others run freely).
    assert not np.allclose(losses[:, k], losses[:, (k + 1) % 3])


def test_a_sweep_run_reproduces_its_single_run_for_every_sweepable_key():
  # Every sweepable key off its default; the runs differ in the CutMix share.
  sweep = (
    "optimizer.learning_rate=2e-3;optimizer.weight_decay=0.2;"
    "model_overrides.drop_path_rate=0.3;label_smoothing=0.2;mixing.prob=0.9;"
    "mixing.cutmix_prob=0.0,1.0"
  )
  t = build(tiny(sweep=sweep))
  assert set(t.specs[0].values) == set(config_checks.SWEEPABLE)
  assert [s.values["mixing.cutmix_prob"] for s in t.specs] == [0.0, 1.0]
  for k, spec in enumerate(t.specs):
    assert spec.config.label_smoothing == 0.2 and spec.config.sweep == ""
    assert_each_step_is_the_single_runs(t, build(spec.config), k, spec.config)


def test_runs_are_every_combination_times_the_seeds():
  specs = runs.run_specs(
    tiny(num_runs=2, seed=1, sweep="label_smoothing=0.0,0.1;optimizer.learning_rate=1e-3")
  )
  assert [(s.seed, s.values["label_smoothing"]) for s in specs] == [
    (1, 0.0),
    (2, 0.0),
    (1, 0.1),
    (2, 0.1),
  ]
  assert all(s.config.optimizer.learning_rate == 1e-3 and s.config.num_runs == 1 for s in specs)


@pytest.mark.parametrize(
  "text, message",
  [
    ("model_overrides.dim=32,64", "model_overrides.dim cannot be swept (it changes shapes"),
    ("batch_size=16,32", "batch_size cannot be swept"),
    ("bogus.key=1", "bogus.key cannot be swept (it is no config key)"),
    ("label_smoothing", "is not KEY=V1,V2"),
    ("label_smoothing=0.1,x", "not a number"),
    ("label_smoothing=0.1,1.5", "label_smoothing must be a number in [0, 1)"),
    ("label_smoothing=0.1;label_smoothing=0.2", "named twice"),
  ],
)
def test_bad_sweeps_are_refused_with_the_reason(text, message):
  with pytest.raises(config_checks.ConfigError, match=None) as error:
    config_checks.validate(tiny(sweep=text))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_sweep_keys_exit_2_with_one_line(tmp_path):
  cases = [
    ("--config.sweep=model_overrides.depth=2,4", "model_overrides.depth cannot be swept"),
    ("--config.sweep=dataset.name=digits", "dataset.name cannot be swept"),
  ]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "main.py",
        "--config",
        "configs/digits.py",
        flag,
        f"--workdir={tmp_path / str(i)}",
      ],
      cwd=ROOT,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i, (flag, _) in enumerate(cases)
  ]
  for proc, (flag, message) in zip(procs, cases, strict=True):
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, (flag, err[-2000:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (flag, err[-2000:])
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
  assert not any((tmp_path / str(i) / "checkpoints").exists() for i in range(len(cases)))


def test_a_non_finite_run_dies_alone_and_is_named(tmp_path, caplog):
  # Run 1's learning rate blows it up within a few steps; run 0 must not notice.
  config = tiny(
    sweep="optimizer.learning_rate=1e-3,1e30", checkpoint_every_steps=1, log_every_steps=1
  )
  summary = train.train_and_evaluate(config, str(tmp_path))
  healthy, dead = summary["runs"]
  assert dead["values"] == {"optimizer.learning_rate": 1e30}
  assert dead["died_at_step"] is not None and 1 <= dead["died_at_step"] <= STEPS
  assert healthy["died_at_step"] is None and healthy["final_top1"] is not None
  assert f"stopped: loss became non-finite at step {dead['died_at_step']}" in caplog.text
  # Both runs' checkpointed parameters stay finite.
  many = build(config)  # the restore's template, then the step-by-step check's
  restored = train.checkpoint_lib.Checkpoints(tmp_path / "checkpoints", read_only=True)
  state = restored.restore_latest(many.saved_form(many.state))[1]
  restored.close()
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(state.params))
  # Step by step, before and after run 1 dies, run 0 is its single run.
  survivor = runs.run_specs(config)[0].config
  alive, _ = assert_each_step_is_the_single_runs(many, build(survivor), 0, survivor)
  assert not bool(alive[1])
  # The statistics leave the dead run out.
  groups = {g["values"]["optimizer.learning_rate"]: g for g in summary["groups"]}
  assert groups[1e30]["finished_seeds"] == [] and groups[1e30]["final_top1_mean"] is None
  assert groups[1e-3]["final_top1_mean"] == pytest.approx(healthy["final_top1"])


def test_all_runs_dying_stops_the_process(tmp_path):
  config = tiny(sweep="optimizer.learning_rate=1e30,1e31", log_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match="non-finite in every run"):
    train.train_and_evaluate(config, str(tmp_path))


def test_summary_lists_every_run_with_mean_and_std_over_seeds(tmp_path):
  config = tiny(num_runs=2, seed=3, sweep="label_smoothing=0.0,0.1")
  summary = train.train_and_evaluate(config, str(tmp_path))
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["runs"] == summary["runs"] and summary["num_runs"] == 4
  listed = summary["runs"]
  assert [(r["seed"], r["values"]["label_smoothing"]) for r in listed] == [
    (3, 0.0),
    (4, 0.0),
    (3, 0.1),
    (4, 0.1),
  ]
  for r in listed:
    assert 0.0 <= r["final_top1"] <= r["best_top1"] <= 1.0 and r["died_at_step"] is None
    assert r["best_step"] in (5, 10)
  assert len(summary["groups"]) == 2
  for group, pair in zip(summary["groups"], (listed[:2], listed[2:]), strict=True):
    assert group["seeds"] == group["finished_seeds"] == [3, 4]
    for key in ("final_top1", "best_top1"):
      values = [r[key] for r in pair]
      assert group[f"{key}_mean"] == pytest.approx(sum(values) / 2, abs=1e-12)
      sample_std = abs(values[0] - values[1]) / np.sqrt(2)  # ddof 1, by hand for two values
      assert group[f"{key}_std"] == pytest.approx(sample_std, abs=1e-12)
  finals = [r["final_top1"] for r in listed]
  assert summary["final_top1"] == pytest.approx(np.mean(finals))
  # Per-run and mean/std scalars reach TensorBoard.
  events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  assert events
  text = open(tmp_path / events[0], "rb").read()
  for tag in (b"run3/test_top1", b"mean/test_top1", b"std/test_top1", b"run0/train_loss"):
    assert tag in text


def test_the_memory_check_says_how_many_runs_fit():
  train.check_runs_fit(3, step_bytes=300, limit_bytes=1000, reserved_bytes=100)  # 9 fit
  with pytest.raises(train.ConfigError, match="at most 2 fit"):
    train.check_runs_fit(3, step_bytes=300, limit_bytes=250)
  with pytest.raises(train.ConfigError, match="at most 0 fit"):
    train.check_runs_fit(4, step_bytes=400, limit_bytes=150, reserved_bytes=100)
  # The compiled step's own estimate, against a fake device limit of one run's share.
  config = tiny(num_runs=3)
  run = train.Run.prepare(config)
  with pytest.raises(train.ConfigError, match=r"num_runs: 3 runs need about .* at most 1 fit"):
    train.build_training(run, config, memory_limit=_one_run_share(config))


def _one_run_share(config) -> int:
  """Bytes for a bit more than one of the config's runs: the compiled step's third, plus 40%."""
  many = train.build_training(train.Run.prepare(config), config)
  lowered = many.compiled_step.lower(*many.step_args(many.state, 0))
  return int(train.step_memory_bytes(lowered.compile()) / 3 * 1.4)
