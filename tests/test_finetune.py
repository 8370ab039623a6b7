"""init_from: a new head on other classes, a fine-tuned run without its source, and a start
from the source's moving average."""

import shutil

import numpy as np
import pytest
from flax import nnx

from lkca_jax import finetune, steps, train
from tests.helpers import leaves_by_path, tiny_digits


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
  state = finetune.initialised_from(config, run.model, run.mesh, fresh)
  by_name = lambda tree: leaves_by_path(steps.variable_values(tree))  # noqa: E731
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


@pytest.mark.slow
def test_a_fine_tune_starts_from_the_sources_average_and_its_own_average_from_there(tmp_path):
  """init_from_average reads the moving average the source kept (a run with ema_decay),
  not its parameters, whatever the source's optimizer state looks like around it (its
  weight decay on the weights alone, here, where the fine-tune decays all); the
  fine-tune's own average starts at what it starts from (not at the fresh model's draw); a
  source that kept none is refused before anything loads."""
  source = tmp_path / "source"
  weights_only = {"optimizer.weight_decay_on": "weights"}
  train.train_and_evaluate(
    tiny_digits(num_train_steps=1, ema_decay=0.5, **weights_only), str(source)
  )
  by_name = lambda tree: leaves_by_path(steps.variable_values(tree))  # noqa: E731
  average = by_name(nnx.state(train.load_trained(source, average=True), nnx.Param))
  params = by_name(nnx.state(train.load_trained(source), nnx.Param))
  for starts_from, expected in ((False, params), (True, average)):
    config = tiny_digits(ema_decay=0.9, init_from=str(source), init_from_average=starts_from)
    run = train.Run.prepare(config)
    fresh = train.build_training(run, config).state
    state = finetune.initialised_from(config, run.model, run.mesh, fresh)
    got = leaves_by_path(state.params)
    own_average = leaves_by_path(steps.average_of(state.opt_state))
    assert got.keys() == expected.keys()
    for name, value in got.items():
      np.testing.assert_array_equal(value, expected[name], err_msg=name)
      np.testing.assert_array_equal(own_average[name], value, err_msg=name)
  assert any(not np.array_equal(average[n], params[n]) for n in params)
  plain = tmp_path / "plain"
  train.train_and_evaluate(tiny_digits(num_train_steps=1), str(plain))
  refused = tiny_digits(init_from=str(plain), init_from_average=True)
  with pytest.raises(train.ConfigError, match=r"kept no moving average.*init_from_average=False"):
    train.Run.prepare(refused)
