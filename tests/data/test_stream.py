"""The streaming pipeline (grain over array_record) against the whole-split one.

On the Tiny-ImageNet fixture prepared as array_record (48 train, 20 validation
images of 64x64, the training size), streaming with the "resize" crop must give
the whole-split pipeline's batches exactly: the same labels and pixels, step by
step over two epochs, and the same evaluation batches. A pipeline opened
mid-epoch (a resumed run) gives exactly the batches from there on.
"""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tinyimagenet
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.data import sources, stream
from tests.data.test_tiny_imagenet import FIXTURE, manual_dir_with
from tests.helpers import built_once, with_overrides

BATCH = 16
STEPS_PER_EPOCH = 3 * 48 // BATCH
STEPS = 2 * STEPS_PER_EPOCH  # two epochs: two different orders


def prepare_fixture(directory):
  manual = manual_dir_with(directory, FIXTURE)
  sizes = sources.prepare("tiny_imagenet", data_dir=directory / "tfds", manual_dir=manual)
  assert sizes == {"train": 48, "validation": 20}
  return str(directory / "tfds")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return built_once(tmp_path_factory, "stream_prepared", prepare_fixture)


def fixture_config(data_dir, **overrides):
  return with_overrides(
    tinyimagenet.get_config(),
    {
      "dataset.data_dir": data_dir,
      "dataset.download": False,
      "batch_size": BATCH,
      "augment.autoaugment": "none",  # compiled quickly; the inputs are what is compared
      **overrides,
    },
  )


def build(config, key=0):
  spec = sources.get_spec(config.dataset.name)
  if config.dataset.classes:
    import dataclasses

    spec = dataclasses.replace(spec, num_classes=config.dataset.classes)
  return pipeline_lib.from_config(config, spec, pipeline_lib.make_mesh(), jax.random.key(key))


def batches(pipeline, steps):
  out = []
  for step in steps:
    order = pipeline.epoch_order(step // pipeline.steps_per_epoch)
    out.append(jax.device_get(pipeline.train_batch(order, step)))
  return out


@pytest.fixture(scope="module")
def both(data_dir):
  """(whole-split batches, streamed batches, the streaming pipeline) of the same config."""
  host = build(fixture_config(data_dir, **{"dataset.placement": "host"}))
  streamed = build(fixture_config(data_dir, **{"dataset.placement": "stream"}))
  assert (host.placement, streamed.placement) == ("host", "stream")
  return batches(host, range(STEPS)), batches(streamed, range(STEPS)), host, streamed


def test_streaming_gives_the_whole_split_batches_exactly(both):
  whole, streamed, host, pipeline = both
  assert pipeline.steps_per_epoch == host.steps_per_epoch == STEPS_PER_EPOCH
  assert (pipeline.train.size, pipeline.test.size) == (48, 20)
  assert pipeline.image_shape == host.image_shape == (64, 64, 3)
  for step, (a, b) in enumerate(zip(whole, streamed, strict=True)):
    np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"step {step}")
    np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"step {step}")
  # Each epoch is 3 passes over the 48 images: every label 3 times per image.
  for epoch in range(2):
    labels = np.concatenate([b["label"] for b in streamed[epoch * 9 : (epoch + 1) * 9]])
    expected = np.repeat(np.asarray([0, 1, 2, 199]), 3 * 12)
    np.testing.assert_array_equal(np.sort(labels), expected)
  first, second = (np.concatenate([b["label"] for b in streamed[e * 9 : e * 9 + 3]]) for e in (0, 1))
  assert not np.array_equal(first, second)  # the second epoch has an order of its own


def test_streaming_evaluates_on_the_whole_split_batches(both):
  _, _, host, pipeline = both
  whole = [jax.device_get(b) for b in host.eval_batches()]
  streamed = [jax.device_get(b) for b in pipeline.eval_batches()]
  assert len(whole) == len(streamed) == 2  # 20 images in batches of 16, padded
  for a, b in zip(whole, streamed, strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
  assert streamed[1]["mask"].sum() == 4


@pytest.mark.parametrize("resume_at", [4, STEPS_PER_EPOCH + 5])
def test_a_pipeline_opened_mid_epoch_gives_the_uninterrupted_batches(both, data_dir, resume_at):
  """What a resumed run does: a new pipeline, asked first for step `resume_at`."""
  _, uninterrupted, _, _ = both
  fresh = build(fixture_config(data_dir, **{"dataset.placement": "stream"}))
  resumed = batches(fresh, range(resume_at, STEPS))
  for step, b in zip(range(resume_at, STEPS), resumed, strict=True):
    np.testing.assert_array_equal(b["label"], uninterrupted[step]["label"], err_msg=f"step {step}")
    np.testing.assert_array_equal(b["image"], uninterrupted[step]["image"], err_msg=f"step {step}")
