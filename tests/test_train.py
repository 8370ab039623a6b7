"""The trainer in-process: devices, microbatches, resume, the step on other backends."""

import json
import pathlib
import re
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits
from lkca_jax import backend, runs, steps, train
from tests.helpers import (
  U,
  assert_one_step_apart,
  leaves_by_path,
  step_chain_terms,
  tiny_digits,
  with_overrides,
  ynn_fusion_ranks,
)


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
  tx = steps.create_optimizer(config, t.schedule)
  old = steps.TrainState(step=jnp.asarray(3), params=params, opt_state=tx.init(params), rest=rest)
  assert _paths(t.saved_form(t.state)) == _paths(old)  # ...kernel.value, as on disk before
  written = train.checkpoint_lib.Checkpoints(tmp_path, asynchronous=False)
  written.save(3, old, runs.checkpoint_meta((runs.RunRecord(),)))
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


def test_model_overrides_reach_the_model():
  config = tiny_digits()
  config.model_overrides.mixer = "lkca,mhsa"
  config.model_overrides.mixer_options.lkca.view = "conv"
  config.model_overrides.drop_path_schedule = "linear"
  run = train.Run.prepare(config)
  assert run.model.mixers == ["lkca", "mhsa"]
  assert run.model.blocks[0].mixer.view == "conv"
  assert run.model.pool == "mean"
  assert run.model.blocks[0].mixer.kernel.shape == (15, 15)
  assert [b.drop_path1.rate for b in run.model.blocks] == [0.0, 0.1]  # digits' 0.1, ramped


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 4])
def test_eight_devices_take_one_devices_steps(groups):
  """The batch split over 8 devices sums the gradients in another order, so the two programs
  agree to float32 round-off, which AdamW can amplify over free-running steps: each step is
  taken from one shared state and checked against the round-off of that step, carried
  through AdamW (tests.helpers.assert_one_step_apart, as for many runs). With 4 mixing
  groups (every batch mixed), each group's rows (g, g + 4, …) lie on every device: the same
  steps still."""
  mixing = {"mixing.groups": groups, **({"mixing.prob": 1.0} if groups > 1 else {})}
  config = tiny_digits(**mixing)
  one, eight = (
    train.build_training(train.Run.prepare(c), c)
    for c in (tiny_digits(num_devices=1, **mixing), tiny_digits(num_devices=8, **mixing))
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
  gradient under backend.reverse_mode_only): none of them reaches a GPU or TPU module, nor
  does the gather of LKCA's CPU form."""
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
    # A GPU runs a scatter-add as atomic adds, a sum in no fixed order: a step's gradients
    # could then differ between two runs of it on the same GPU.
    assert "stablehlo.scatter" not in lowered[platform]
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
  saved_steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  # Another learning rate and length would train the rest of it as another run.
  other = tiny_digits(num_train_steps=4, eval_every_steps=2, **{"optimizer.learning_rate": 5e-4})
  with pytest.raises(train.workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(other, str(tmp_path))
  message = str(info.value)
  assert "num_train_steps: 2 there, 4 here" in message
  assert "optimizer.learning_rate: 0.001 there, 0.0005 here" in message
  assert f"(--config configs/workdir.py:{tmp_path})" in message and "fresh --workdir" in message
  assert (tmp_path / "config.json").read_text() == written  # the run's record stands
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved_steps
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


@pytest.mark.slow
def test_a_moving_average_is_evaluated_checkpointed_resumed_and_loaded(tmp_path):
  """ema_decay: the run evaluates the average beside the parameters, eval mode reads it
  back from the checkpoint to the same numbers, a resumed run ends with the same average,
  and load_trained(average=True) builds the model from it: one step of decay ½ from the
  initial parameters p0 to p1 makes it ½·p0 + ½·p1 exactly (both products exact, one
  rounding)."""
  config = tiny_digits(ema_decay=0.5, num_train_steps=2, eval_every_steps=1)
  config.checkpoint_every_steps = 1
  summary = train.train_and_evaluate(config, str(tmp_path))
  result = train.evaluate(config, str(tmp_path))
  for key in ("top1", "ema_top1"):
    assert result[key] == summary[f"final_{key}"], key
  assert {"ema_loss", "ema_top5"} <= result.keys()

  def params(**kwargs):
    return leaves_by_path(nnx.state(train.load_trained(tmp_path, **kwargs), nnx.Param))

  final = params(average=True)
  shutil.rmtree(tmp_path / "checkpoints" / "2")
  (tmp_path / "summary.json").unlink()
  assert train.train_and_evaluate(config, str(tmp_path))["final_ema_top1"] == result["ema_top1"]
  for path, value in params(average=True).items():
    np.testing.assert_array_equal(value, final[path], path)

  first = tmp_path / "checkpoints" / "1"
  initial = leaves_by_path(nnx.state(train.Run.prepare(config).model, nnx.Param))
  trained = params(checkpoint=first)
  averaged = params(checkpoint=first, average=True)
  for path, value in averaged.items():
    half = lambda x: np.float32(0.5) * x.astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(value, half(initial[path]) + half(trained[path]), path)
  assert any(not np.array_equal(averaged[p], trained[p]) for p in trained)


@pytest.mark.slow
def test_training_in_a_thread_of_its_own_leaves_the_signal_handlers_to_the_main_thread(tmp_path):
  """A notebook trains in a background thread: only the main thread may set signal
  handlers, so the trainer sets none there and trains to the end."""
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  result = {}

  def train_here():
    try:
      result["summary"] = train.train_and_evaluate(tiny_digits(num_train_steps=2), str(tmp_path))
    except Exception as e:  # noqa: BLE001 -- reported below, in the test's thread
      result["error"] = e

  thread = threading.Thread(target=train_here)
  thread.start()
  thread.join(timeout=300)
  assert "error" not in result, result.get("error")
  summary = result["summary"]
  assert (summary["step"], summary["stopped_by"]) == (2, None)
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert {sig: signal.getsignal(sig) for sig in before} == before
