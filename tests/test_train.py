"""The trainer in-process: schedule, devices, config validation, the step on other backends."""

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import cifar10, digits
from lkca_jax import backend, train
from tests.helpers import (
  U,
  assert_one_step_apart,
  leaves_by_path,
  step_chain_terms,
  with_overrides,
  ynn_fusion_ranks,
)


def tiny_digits(**overrides):
  config = digits.get_config()
  config.model_overrides.dim = 32
  config.model_overrides.depth = 2
  config.model_overrides.num_heads = 4
  config.batch_size = 32
  config.num_train_steps = 5
  return with_overrides(config, overrides)


def test_one_runs_scalars_keep_their_names_and_several_add_mean_and_std_of_the_living():
  assert train.run_scalars([{"loss": 2.5}], "train_") == {"train_loss": 2.5}
  scalars = train.run_scalars([{"top1": 0.5}, None, {"top1": 0.75}], "test_")
  assert scalars["run0/test_top1"] == 0.5 and scalars["run2/test_top1"] == 0.75
  assert not any(key.startswith("run1/") for key in scalars)  # dead: left out
  assert scalars["mean/test_top1"] == 0.625
  assert scalars["std/test_top1"] == pytest.approx(0.25 / np.sqrt(2))  # ddof 1, two values


def test_a_record_keeps_its_best_and_a_dead_run_gains_none():
  result = lambda top1: {"loss": 1.0, "top1": top1, "top5": 1.0}  # noqa: E731
  record = train.RunRecord().evaluated(5, result(0.4)).evaluated(10, result(0.3))
  assert (record.best_top1, record.best_step) == (0.4, 5)
  assert [h["step"] for h in record.history] == [5, 10]
  dead = dataclasses.replace(record, died_at_step=7).evaluated(15, result(0.9))
  assert (dead.best_top1, dead.best_step, len(dead.history)) == (0.4, 5, 3)


def _checkpoint_meta(workdir, step) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata"


@pytest.mark.slow
def test_a_checkpoint_in_the_earlier_single_run_layout_resumes(tmp_path):
  # One config throughout (one compiled program): trained to 4, then cut back to step 2 as
  # if stopped there, with step 2's record rewritten in the earlier layout.
  config = lambda: tiny_digits(num_train_steps=4, eval_every_steps=2, checkpoint_every_steps=2)  # noqa: E731
  train.train_and_evaluate(config(), str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  meta = _checkpoint_meta(tmp_path, 2)
  record = json.loads(meta.read_text())["runs"][0]
  earlier = {key: record[key] for key in ("best_top1", "best_step", "history")}
  meta.write_text(json.dumps(earlier))  # one run's fields at the top, no "runs"
  summary = train.train_and_evaluate(config(), str(tmp_path))
  assert summary["step"] == 4
  history = json.loads(_checkpoint_meta(tmp_path, 4).read_text())["runs"][0]["history"]
  assert [h["step"] for h in history] == [2, 4] and history[0] == earlier["history"][0]
  # A record count that is not the config's: one line that says so.
  meta = _checkpoint_meta(tmp_path, 4)
  meta.write_text(json.dumps({"runs": [record, record]}))
  with pytest.raises(train.checkpoint_lib.CheckpointError, match="holds 2 run records"):
    train.train_and_evaluate(config(), str(tmp_path))


def _paths(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_the_step_takes_arrays_and_a_checkpoint_of_the_models_variables_resumes(tmp_path):
  # Checkpoints were written from a state holding the model's nnx Variables; the step now
  # takes their arrays. Such a checkpoint, built here as before, must resume value for value.
  config = tiny_digits()
  run = train.Run.prepare(config)
  t = train.build_training(run, config)
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  assert not [x for x in jax.tree.leaves(t.state, is_leaf=is_variable) if is_variable(x)]
  _, params, rest = nnx.split(run.model, nnx.Param, ...)
  params = jax.tree.map(lambda x: x * 2 + 1, params)  # values no fresh state holds
  tx = train.create_optimizer(config, t.schedule)
  old = train.TrainState(step=jnp.asarray(3), params=params, opt_state=tx.init(params), rest=rest)
  assert _paths(t.saved_form(t.state)) == _paths(old)  # ...kernel.value, as on disk before
  written = train.checkpoint_lib.Checkpoints(tmp_path, asynchronous=False)
  written.save(3, old, train.checkpoint_meta((train.RunRecord(),)))
  written.close()
  checkpoints = train.checkpoint_lib.Checkpoints(tmp_path)
  loop = train.resume(t, checkpoints, run.mesh)
  checkpoints.close()
  assert loop.step == 3 and int(loop.state.step) == 3
  assert not [x for x in jax.tree.leaves(loop.state, is_leaf=is_variable) if is_variable(x)]
  assert _paths(loop.state.params) == [p.removesuffix(".value") for p in _paths(params)]
  for got, want in zip(jax.tree.leaves(loop.state.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # And the step runs on what was restored.
  state, metrics = t.step(loop.state, loop.step)
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"][0]))


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


def test_the_gradient_norm_is_every_leafs_norm_together_in_one_reduction():
  """Small integers, so every float32 sum of their squares is exact and the norm is the
  correctly rounded square root: equal bit for bit to the float64 norm rounded once."""
  tree = {
    "w": jnp.arange(-6, 6, dtype=jnp.float32).reshape(3, 4),
    "b": jnp.arange(5, dtype=jnp.bfloat16),  # a bfloat16 leaf is widened, not rounded to
    "s": jnp.float32(7),
  }
  exact = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in tree.values()))
  assert float(jax.jit(train.global_norm)(tree)) == np.float32(exact)
  runs = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)  # as the runs step vmaps it
  np.testing.assert_array_equal(jax.vmap(train.global_norm)(runs), np.float32([exact, 2 * exact]))
  # One reduction for the whole tree, where a sum per leaf is a kernel per leaf on a GPU.
  assert jax.jit(train.global_norm).lower(tree).as_text().count("stablehlo.reduce") == 1
  assert jax.jit(optax.tree.norm).lower(tree).as_text().count("stablehlo.reduce") == 3


def test_model_overrides_reach_the_model():
  config = tiny_digits()
  config.model_overrides.mixer = "lkca,mhsa"
  config.model_overrides.mixer_options.lkca.view = "conv"
  run = train.Run.prepare(config)
  assert run.model.mixers == ["lkca", "mhsa"]
  assert run.model.blocks[0].mixer.view == "conv"
  assert run.model.pool == "mean"
  assert run.model.blocks[0].mixer.kernel.shape == (15, 15)


@pytest.mark.slow
def test_eight_devices_take_one_devices_steps():
  """The batch split over 8 devices sums the gradients in another order, so the two programs
  agree to float32 round-off, which AdamW can amplify over free-running steps: each step is
  taken from one shared state and checked against the round-off of that step, carried
  through AdamW (tests.helpers.assert_one_step_apart, as for many runs)."""
  config = tiny_digits()
  one, eight = (
    train.build_training(train.Run.prepare(c), c)
    for c in (tiny_digits(num_devices=1), tiny_digits(num_devices=8))
  )
  assert (one.pipeline.mesh.devices.size, eight.pipeline.mesh.devices.size) == (1, 8)
  replicated = jax.sharding.NamedSharding(eight.pipeline.mesh, jax.sharding.PartitionSpec())
  assert jax.device_count() == 8
  terms, state, losses = step_chain_terms(config), one.state, []
  orders = [t.pipeline.epoch_order(0) for t in (one, eight)]
  for step in range(config.num_train_steps):
    batches = [t.pipeline.train_batch(o, step) for t, o in zip((one, eight), orders, strict=True)]
    assert batches[1]["image"].sharding.spec[0] == "data"
    before = jax.device_get(state.replace(rest=None))  # rest holds PRNG keys
    shared = jax.device_put(jax.tree.map(jnp.copy, state), replicated)  # both steps donate
    state, metrics = one.train_step(state, batches[0], one.train_key)
    eight_state, eight_metrics = eight.train_step(shared, batches[1], eight.train_key)
    loss, eight_loss = float(metrics["loss"][0]), float(eight_metrics["loss"][0])
    assert abs(eight_loss - loss) <= 2 * terms * U * abs(loss), (step, eight_loss, loss)
    after = jax.device_get(state.replace(rest=None))
    lr = float(metrics["learning_rate"][0])
    params = jax.device_get(eight_state.params)
    assert_one_step_apart(config, before, after, params, lr, terms, step)
    losses.append(loss)
  assert np.all(np.isfinite(losses)) and losses[0] > losses[-1] - 5  # real, finite losses


@pytest.mark.slow
def test_microbatches_take_the_whole_batchs_step_in_less_memory():
  """A batch computed in slices sums each gradient in another order, so the steps agree to
  float32 round-off (as 8 devices do with 1, from one shared state each step). Without
  stochastic depth nothing else differs: slice m's own draws are its drop-path masks. On 8
  devices each device keeps its rows of every slice: the program's collectives are those of
  the whole batch's."""
  whole, sliced = (
    tiny_digits(num_devices=n, microbatches=m, **{"model_overrides.drop_path_rate": 0.0})
    for n, m in ((1, 1), (8, 2))
  )
  one, eight = (train.build_training(train.Run.prepare(c), c) for c in (whole, sliced))
  replicated = jax.sharding.NamedSharding(eight.pipeline.mesh, jax.sharding.PartitionSpec())
  terms, state = step_chain_terms(whole), one.state
  for step in range(whole.num_train_steps):
    before = jax.device_get(state.replace(rest=None))
    shared = jax.device_put(jax.tree.map(jnp.copy, state), replicated)  # both steps donate
    state, metrics = one.train_step(state, one.batch(step), one.train_key)
    eight_state, eight_metrics = eight.train_step(shared, eight.batch(step), eight.train_key)
    loss, sliced_loss = float(metrics["loss"][0]), float(eight_metrics["loss"][0])
    assert abs(sliced_loss - loss) <= 2 * terms * U * abs(loss), (step, sliced_loss, loss)
    for key in ("top1", "top5"):  # counts over 32 images: exact in either order
      assert float(eight_metrics[key][0]) == float(metrics[key][0]), (step, key)
    after = jax.device_get(state.replace(rest=None))
    lr = float(metrics["learning_rate"][0])
    assert_one_step_apart(whole, before, after, eight_state.params, lr, terms, step)

  def compiled(config):
    t = train.build_training(train.Run.prepare(config), config)
    return t.compiled_step.lower(*t.step_args(t.state, 0)).compile()

  collectives = ("all-gather(", "all-reduce(", "all-to-all(", "collective-permute(")
  eight_whole = compiled(tiny_digits(num_devices=8)).as_text()
  assert [eight_whole.count(c) for c in collectives] == [
    compiled(sliced).as_text().count(c) for c in collectives
  ]
  # Only one slice's activations are live at a time: the step's peak falls with the slices.
  peaks = [
    train.step_memory_bytes(compiled(tiny_digits(num_devices=1, microbatches=m))) for m in (1, 2, 4)
  ]
  assert peaks[0] > peaks[1] > peaks[2], peaks


def _full_size_training(model: str, **overrides):
  """The trainer's step for a paper preset at full width on digits (an 8×8 grid, as CIFAR's)."""
  config = with_overrides(digits.get_config(), {"model": model, "batch_size": 8, **overrides})
  return train.build_training(train.Run.prepare(config), config)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lkca_b", "vit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_train_step_exports_for_gpu_and_tpu_with_no_cpu_forms(model, dtype):
  """In bfloat16 the CPU forms include the reverse-only `custom_vjp`s (the trainer takes its
  gradient under backend.reverse_mode_only): none of them reaches a GPU or TPU module."""
  t = _full_size_training(model, dtype=dtype, **{"model_overrides.depth": 2})  # full width
  args = t.step_args(t.state, 0)
  lowered = {
    platform: jax.export.export(t.compiled_step, platforms=[platform])(*args).mlir_module()
    for platform in ("cuda", "tpu", "cpu")
  }
  assert backend.CPU_SCOPE in lowered["cpu"]  # the check below can see a CPU form
  for platform in ("cuda", "tpu"):
    assert backend.CPU_SCOPE not in lowered[platform]
    assert "optimization_barrier" not in lowered[platform]
  # A GPU reads a while loop's condition back to the host on every trip: none in the step.
  assert "stablehlo.while" not in lowered["cuda"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lkca_b", "vit"])
def test_the_bfloat16_train_step_takes_no_linear_product_with_a_bfloat16_result(model):
  """The trainer's gradient is reverse mode only, so on the CPU its bfloat16 Linears run
  their backward products on the bfloat16 cotangent with a float32 result (AMX where the
  CPU has it). Through the custom_jvp form they would take bfloat16 results, which XLA:CPU
  computes as float32 products of widened operands."""
  t = _full_size_training(model, dtype="bfloat16", **{"model_overrides.depth": 2})
  args = t.step_args(t.state, 0)
  lowered = t.compiled_step.lower(*args)
  text = lowered.as_text()
  products = re.findall(
    r"dot_general .*?: \((tensor<\d+x\d+xbf16>, tensor<\d+x\d+xbf16>)\) -> (\S+)", text
  )
  results = [result.rsplit("x", 1)[1] for _, result in products]
  assert results and set(results) == {"f32>"}, results
  compiled = lowered.compile()  # once: the program checked above, then run and read below
  _, metrics = compiled(*args)
  assert np.isfinite(float(metrics["loss"][0])) and float(metrics["grad_norm"][0]) > 0
  # jaxlib 0.10.2's YNNPACK fusions can crash from rank 7 on (docs/usage.md, "Training").
  ranks = ynn_fusion_ranks(compiled.as_text())
  assert ranks and max(ranks) < 7


@pytest.mark.slow
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


def _scalar_events(workdir, tag) -> dict[int, float]:
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  found = {}
  for path in pathlib.Path(workdir).glob("events.out.tfevents*"):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.tag == tag:
          found[event.step] = float(tensor_util.make_ndarray(value.tensor))
  return found


@pytest.mark.slow
def test_the_logged_steps_per_second_are_of_training_time_alone(tmp_path):
  # The progress report's rates, summed back to seconds, are the clock's training time: no
  # evaluation in them, and no interval timed at dispatch (steps queued, not done).
  config = tiny_digits(num_train_steps=8, log_every_steps=2, eval_every_steps=4)
  summary = train.train_and_evaluate(config, str(tmp_path))
  rates = _scalar_events(tmp_path, "steps_per_sec")
  assert sorted(rates) == [2, 4, 6, 8]
  seconds = sum(
    (step - previous) / rates[step] for previous, step in [(1, 2), (2, 4), (4, 6), (6, 8)]
  )
  timed_images = (8 - 1) * config.batch_size  # the first step compiles and is not timed
  # Each rate is stored in float32, within 2⁻²⁴ of it relatively; so is their sum.
  assert seconds == pytest.approx(timed_images / summary["train_images_per_second"], rel=2**-23)


@pytest.mark.slow
def test_a_workdir_resumes_only_its_own_runs_config(tmp_path):
  first = tiny_digits(num_train_steps=2, eval_every_steps=2)
  train.train_and_evaluate(first, str(tmp_path))
  written = (tmp_path / "config.json").read_text()
  steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  # Another learning rate and length would train the rest of it as another run.
  other = tiny_digits(num_train_steps=4, eval_every_steps=2, **{"optimizer.learning_rate": 5e-4})
  with pytest.raises(train.workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(other, str(tmp_path))
  message = str(info.value)
  assert "num_train_steps: 2 there, 4 here" in message
  assert "optimizer.learning_rate: 0.001 there, 0.0005 here" in message
  assert f"(--config configs/workdir.py:{tmp_path})" in message and "fresh --workdir" in message
  assert (tmp_path / "config.json").read_text() == written  # the run's record stands
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == steps
  # Where its outputs go, how often, in how many slices a batch is computed: the same run.
  # It reached its last step, so nothing trains, and its summary, train images/s and wall
  # time included, stands as written.
  summary = (tmp_path / "summary.json").read_text()
  cadence = tiny_digits(num_train_steps=2, eval_every_steps=3, log_every_steps=7, microbatches=2)
  assert train.train_and_evaluate(cadence, str(tmp_path)) == json.loads(summary)
  assert (tmp_path / "summary.json").read_text() == summary
  assert json.loads(summary)["train_images_per_second"] > 0


@pytest.mark.slow
def test_a_config_json_without_a_checkpoint_is_no_run_to_resume(tmp_path):
  (tmp_path / "config.json").write_text('{"num_train_steps": 9, "seed": 5}')
  summary = train.train_and_evaluate(tiny_digits(num_train_steps=1), str(tmp_path))
  assert summary["step"] == 1
  assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 1


def test_only_a_summary_that_reached_its_last_step_counts_as_finished(tmp_path):
  done = tmp_path / "done"
  done.mkdir()
  (done / "summary.json").write_text(json.dumps({"step": 5, "total_steps": 5, "stopped_by": None}))
  stopped = tmp_path / "stopped"
  stopped.mkdir()
  (stopped / "summary.json").write_text(
    json.dumps({"step": 3, "total_steps": 5, "stopped_by": "SIGTERM"})
  )
  assert train.finished_summary(str(done))["step"] == 5
  assert train.finished_summary(str(stopped)) is None
  assert train.finished_summary(str(tmp_path / "missing")) is None


# --- a run's config read back (configs/workdir.py) ----------------------------------------
def test_a_saved_config_is_laid_over_the_defaults_with_their_types(tmp_path):
  from configs import default, digits

  trained = digits.get_config()
  trained.model_overrides.depth = 3
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  config = train.saved_config(tmp_path, default.get_config())
  assert json.loads(config.to_json_best_effort()) == json.loads(trained.to_json_best_effort())
  # Unset there (digits has no AutoAugment): unset here, and still a str to override.
  assert config.augment.autoaugment is None and default.get_config().augment.autoaugment
  config.augment.autoaugment = "svhn"
  with pytest.raises(TypeError):
    config.augment.autoaugment = 3
  assert config.dataset.mean == (0.3054,)  # JSON's list, a tuple again


@pytest.mark.parametrize(
  "saved, message",
  [
    (
      {"model": "vit", "no_such_key": 1, "dataset": {"old_key": 2}},
      r"lacks \(no_such_key, dataset.old_key\)",
    ),
    ({"batch_size": "many"}, r"batch_size='many' does not fit this config"),
    (None, r"is not a training workdir \(no config.json\)"),
  ],
)
def test_a_saved_config_that_cannot_be_laid_over_is_one_error(tmp_path, saved, message):
  from configs import default

  if saved is not None:
    (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(train.ConfigError, match=message):
    train.saved_config(tmp_path, default.get_config())


@pytest.mark.slow
def test_a_new_head_fine_tunes_on_other_classes_each_run_with_its_own_classifier(tmp_path):
  """Pre-trained on the 10 digits, fine-tuned on the first 5: with init_from_head="new",
  every parameter but the classifier is the checkpoint's, and each of two runs keeps the
  classifier its own seed drew; with the checkpoint's head the classes do not fit, which
  Run.prepare says before anything loads."""
  pre = tiny_digits(num_train_steps=2, eval_every_steps=2)
  train.train_and_evaluate(pre, str(tmp_path / "pre"))
  model = train.Run.prepare(pre).model
  saved, _ = train.read_run_params(pre, model, tmp_path / "pre" / "checkpoints")
  other_classes = {"dataset.classes": 5, "init_from": str(tmp_path / "pre")}
  with pytest.raises(train.ConfigError, match=r"head\.\w+ is .*--config\.init_from_head=new"):
    train.Run.prepare(tiny_digits(**other_classes))
  config = tiny_digits(num_runs=2, init_from_head="new", **other_classes)
  run = train.Run.prepare(config)
  fresh = train.build_training(run, config).state
  state = train.initialised_from(config, run, fresh)
  by_name = lambda tree: leaves_by_path(train.variable_values(tree))  # noqa: E731
  saved, own, got = by_name(saved), by_name(fresh.params), by_name(state.params)
  assert got.keys() == own.keys() == saved.keys()
  for name, value in got.items():
    for k in range(2):
      expected = own[name][k] if name.startswith("['head']") else saved[name]
      np.testing.assert_array_equal(value[k], expected, err_msg=f"run {k} {name}")
  head = got["['head']['kernel']"]
  assert head.shape == (2, 32, 5) and not np.array_equal(head[0], head[1])


@pytest.mark.slow
def test_a_fine_tuned_run_resumes_and_evaluates_without_its_source(tmp_path):
  """Once the workdir holds a checkpoint of its own, init_from is never read: its source may
  be gone (deleted, or left on another machine), and the run still resumes and evaluates."""
  source, tuned = tmp_path / "source", tmp_path / "tuned"
  train.train_and_evaluate(tiny_digits(num_train_steps=1, eval_every_steps=1), str(source))
  config = tiny_digits(num_train_steps=2, eval_every_steps=2, init_from=str(source))
  finished = train.train_and_evaluate(config, str(tuned))
  shutil.rmtree(source)
  with pytest.raises(train.ConfigError, match="init_from=.*no such directory"):
    train.train_and_evaluate(config, str(tmp_path / "fresh"))  # nothing of its own: needed
  assert train.train_and_evaluate(config, str(tuned)) == finished  # resumed at its last step
  result = train.evaluate(config, str(tuned))
  assert result["step"] == 2 and result["top1"] == finished["final_top1"]


@pytest.mark.parametrize("name", ["vit_1m", "lkca_t", "acmix_t", "flatten_t"])
def test_weight_decay_on_the_weights_spares_vectors_tokens_and_position_tables(name):
  """With a zero gradient Adam's step is exactly 0 (its moments stay 0), so AdamW's update is
  the decay alone, −lr·wd·p: on every matrix and kernel with "weights"; never on biases,
  norms, scalars, the class token or a position table (timm's rule, DeiT's recipe); on
  every parameter with "all", the reference."""
  from lkca_jax.models import create_model

  model = create_model(
    name,
    num_classes=3,
    image_size=8,
    patch_size=2,
    channels=1,
    depth=1,
    dim=16,
    num_heads=4,
    rngs=nnx.Rngs(0),
    # LKCA's kernel starts at zero, whose decay is zero too: a start that shows it.
    **({"mixer_options": {"lkca": {"kernel_init": "gaussian"}}} if name == "lkca_t" else {}),
  )
  params = train.variable_values(nnx.state(model, nnx.Param))
  zeros = jax.tree.map(jnp.zeros_like, params)
  lr = 0.5  # a power of 2: −lr·(wd·p) is exact after the product's one rounding

  def updates(weight_decay_on):
    config = tiny_digits(**{"optimizer.weight_decay_on": weight_decay_on})
    mask = train.weight_decay_mask(config, model)
    tx = train.create_optimizer(config, lambda step: lr, decay_mask=mask)
    wd = np.float32(config.optimizer.weight_decay)
    return leaves_by_path(tx.update(zeros, tx.init(params), params)[0]), wd

  by_name, wd = updates("weights")
  decayed = {path for path, u in by_name.items() if np.any(u)}
  for path, p in leaves_by_path(params).items():
    if path in decayed:
      np.testing.assert_array_equal(by_name[path], -lr * (wd * p.astype(np.float32)), path)
      assert p.ndim >= 2, path
  spared = set(by_name) - decayed
  assert "['head']['kernel']" in decayed and "['blocks'][0]['mlp']['fc1']['kernel']" in decayed
  # A matrix spared by name: the position table; vectors by their shape.
  assert {"['pos_embed']", "['head']['bias']", "['blocks'][0]['norm1']['scale']"} <= spared
  own_table = {
    "vit_1m": "['cls_token']",
    "acmix_t": "['blocks'][0]['mixer']['relative_bias']",
    "flatten_t": "['blocks'][0]['mixer']['position']",
    "lkca_t": None,
  }[name]
  assert own_table is None or own_table in spared, spared
  if name == "lkca_t":
    assert "['blocks'][0]['mixer']['kernel']" in decayed  # the learned kernel is a weight
  every, _ = updates("all")
  assert all(np.any(every[path]) for path, p in leaves_by_path(params).items() if np.any(p))
