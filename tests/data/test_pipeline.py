"""The epoch order of the input pipeline (docs/method.md#training-recipe).

The reference epoch is `repeats` independent shuffles of the training set back
to back, cut into batches ("independent", the default); "joint" (one shuffle of
the stacked copies) and "adjacent" (DeiT's: one shuffle, each image's copies side by
side) are options. Every order is a pure function of (key, epoch), which exact resume
relies on.
"""

import jax
import numpy as np
import pytest

from configs import default
from lkca_jax import augment
from lkca_jax.data import pipeline as pipeline_lib

SIZE, REPEATS, BATCH = 500, 3, 25


def make_pipeline(order=None, key=0, size=SIZE, batch=BATCH, **kwargs):
  # Image i holds its index in its first two pixels (i // 256, i % 256): see `indices_of`.
  images = np.zeros((size, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.divmod(np.arange(size), 256)
  labels = np.arange(size, dtype=np.int32) % 10
  test = (images[:batch], labels[:batch])
  if order is not None:
    kwargs["epoch_order"] = order
  return pipeline_lib.Pipeline(
    pipeline_lib.make_mesh(1),
    (images, labels),
    test,
    global_batch=batch,
    repeats=REPEATS,
    augment=augment.AugmentConfig(mean=(0.5,), std=(0.25,)),
    key=jax.random.key(key),
    placement="host",
    **kwargs,
  )


def indices_of(batch) -> np.ndarray:
  """The training images a batch holds, read back from their pixels (mean 0.5, std 0.25)."""
  pixels = np.rint((np.asarray(batch["image"])[:, 0, :, 0] * 0.25 + 0.5) * 255).astype(int)
  return pixels[:, 0] * 256 + pixels[:, 1]


def test_the_reference_order_is_the_default_of_the_pipeline_and_of_the_config():
  assert make_pipeline().order == "independent"
  assert default.get_config().epoch_order == "independent"
  assert pipeline_lib.EPOCH_ORDERS == ("independent", "joint", "adjacent")


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_independent_order_is_three_permutations_back_to_back(epoch):
  order = np.asarray(make_pipeline("independent").epoch_order(epoch))
  assert order.shape == (REPEATS * SIZE,) and order.dtype == np.int32
  passes = order.reshape(REPEATS, SIZE)
  for one in passes:  # each pass is a permutation: no image twice within it
    np.testing.assert_array_equal(np.sort(one), np.arange(SIZE))
  # ... and the passes are shuffled independently, not one permutation tiled.
  assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
  # No batch that lies inside one pass holds an image twice.
  steps = make_pipeline("independent").steps_per_epoch
  assert steps == REPEATS * SIZE // BATCH
  for step in range(steps):
    batch = order[step * BATCH : (step + 1) * BATCH]
    if step * BATCH // SIZE == ((step + 1) * BATCH - 1) // SIZE:
      assert len(set(batch.tolist())) == BATCH


def test_joint_order_tiles_the_copies_and_can_repeat_an_image_in_a_batch():
  order = np.asarray(make_pipeline("joint").epoch_order(0))
  np.testing.assert_array_equal(np.bincount(order, minlength=SIZE), np.full(SIZE, REPEATS))
  passes = order.reshape(REPEATS, SIZE)
  assert any(len(set(one.tolist())) < SIZE for one in passes)  # a pass is not a permutation
  # 500 images in 3 copies, batch 25: ~ C(25, 2) * 2 / 1499 ~ 0.4 repeated pairs per batch,
  # so among 60 batches many hold an image twice.
  repeats = sum(len(set(batch.tolist())) < BATCH for batch in order.reshape(-1, BATCH))
  assert repeats >= 5


@pytest.mark.parametrize("epoch", [0, 4])
def test_adjacent_order_puts_each_images_copies_in_one_step(epoch):
  """DeiT's RASampler: one shuffle, each index repeated `repeats` times side by side; with a
  batch that holds whole groups of copies, every copy of an image is in the same step."""
  p = make_pipeline("adjacent", batch=REPEATS * 10)
  order = np.asarray(p.epoch_order(epoch))
  assert order.shape == (REPEATS * SIZE,) and order.dtype == np.int32
  groups = order.reshape(SIZE, REPEATS)
  assert np.all(groups == groups[:, :1])  # copies side by side
  np.testing.assert_array_equal(np.sort(groups[:, 0]), np.arange(SIZE))  # every image once
  assert not np.array_equal(groups[:, 0], np.arange(SIZE))  # shuffled
  for batch in order[: p.steps_per_epoch * p.global_batch].reshape(p.steps_per_epoch, -1):
    np.testing.assert_array_equal(np.bincount(batch)[np.unique(batch)], REPEATS)


@pytest.mark.parametrize("order", ["adjacent", "joint"])
def test_an_epoch_as_long_as_the_images_trains_the_first_samples_of_its_order(order):
  """epoch_length "images" (DeiT's RASampler): an epoch is N samples in whole batches, the
  first of its 3N-long order; with the adjacent order, a third of the images, 3 copies each.
  The batches the trainer reads (placed in host memory, gathered by step) are those samples,
  and the step after the last batch starts the next epoch's order."""
  p = make_pipeline(order, batch=30, epoch_length="images")
  assert p.steps_per_epoch == SIZE // 30 == 16  # 480 samples of 500 images, not 1,500
  epochs = [np.asarray(p.epoch_order(e)) for e in (0, 1)]
  read = [indices_of(p.train_batch(epochs[s // 16], s)) for s in range(32)]
  for e in (0, 1):
    np.testing.assert_array_equal(np.concatenate(read[16 * e : 16 * (e + 1)]), epochs[e][:480])
  if order == "adjacent":
    trained = [np.unique(epoch[:480], return_counts=True) for epoch in epochs]
    for images, counts in trained:
      assert len(images) == 160 and np.all(counts == REPEATS)
    assert not np.array_equal(trained[0][0], trained[1][0])  # another third of the images
  whole = make_pipeline(order, batch=30)
  assert whole.steps_per_epoch == REPEATS * SIZE // 30 == 50


def test_an_epoch_as_long_as_the_images_is_refused_for_independent_passes():
  """The first N samples of independent passes would be the first pass alone: the other
  `repeats - 1` passes would be dropped without a word."""
  with pytest.raises(ValueError, match='epoch_length="images" with epoch_order="independent"'):
    make_pipeline("independent", epoch_length="images")
  with pytest.raises(ValueError, match="epoch_length must be one of"):
    make_pipeline("adjacent", epoch_length="passes")
  with pytest.raises(ValueError, match="makes no full batch of 600"):
    make_pipeline("adjacent", batch=600, epoch_length="images")
  assert make_pipeline("adjacent", batch=600).steps_per_epoch == 2  # 1,500 samples


def test_the_old_joint_order_is_unchanged():
  # The joint order is one permutation of the tiled copies keyed by fold_in(order_key, epoch):
  # runs made before the independent order became the default keep their batches.
  p = make_pipeline("joint", key=3)
  copies = np.tile(np.arange(SIZE, dtype=np.int32), REPEATS)
  expected = jax.random.permutation(jax.random.fold_in(p.order_key, 2), copies)
  np.testing.assert_array_equal(np.asarray(p.epoch_order(2)), np.asarray(expected))


@pytest.mark.parametrize("order", pipeline_lib.EPOCH_ORDERS)
def test_order_is_a_pure_function_of_key_and_epoch(order):
  # A resumed run rebuilds the pipeline and asks for the epoch it stopped in.
  first, again = make_pipeline(order, key=4), make_pipeline(order, key=4)
  for epoch in (5, 0, 5):
    np.testing.assert_array_equal(
      np.asarray(first.epoch_order(epoch)), np.asarray(again.epoch_order(epoch))
    )
  assert not np.array_equal(np.asarray(first.epoch_order(0)), np.asarray(first.epoch_order(1)))
  other_key = make_pipeline(order, key=5)
  assert not np.array_equal(np.asarray(first.epoch_order(0)), np.asarray(other_key.epoch_order(0)))


def test_cifar_sized_epoch_repeats_no_image_within_a_pass():
  # A CIFAR epoch: 50,000 images, batch 128, 1,171 batches. Joint ordering puts the same
  # image twice in ~130 of them; the independent order only where a batch straddles two passes.
  p = make_pipeline("independent", size=50_000, batch=128)
  order = np.asarray(p.epoch_order(0))
  assert p.steps_per_epoch == 1171
  batches = order[: 1171 * 128].reshape(1171, 128)
  doubled = [k for k, batch in enumerate(batches) if len(np.unique(batch)) < 128]
  # Only the two batches that straddle a pass boundary (starts 49,920 and 99,968) may.
  assert set(doubled) <= {50_000 // 128, 100_000 // 128}
  joint = np.asarray(make_pipeline("joint", size=50_000, batch=128).epoch_order(0))
  joint_doubled = sum(len(np.unique(b)) < 128 for b in joint[: 1171 * 128].reshape(1171, 128))
  assert 80 < joint_doubled < 200


def test_from_config_passes_the_epoch_order(monkeypatch):
  captured = {}

  class Spy(pipeline_lib.Pipeline):
    def __init__(self, *args, **kwargs):  # records the arguments, builds nothing
      captured.update(kwargs)

  monkeypatch.setattr(
    pipeline_lib.sources,
    "load_split",
    lambda *a, **k: (np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, np.int32)),
  )
  monkeypatch.setattr(pipeline_lib, "Pipeline", Spy)
  config = default.get_config()
  for i, order in enumerate(pipeline_lib.EPOCH_ORDERS):
    config.epoch_order = order
    spec = type(
      "Spec",
      (),
      {
        "name": "cifar10",
        "train_split": "train",
        "eval_split": "test",
        "num_classes": 10,
        "tfds_name": None,  # read by a loader: placed whole
        "image_size": (2, 2),
        "channels": 3,
      },
    )()
    config.epoch_length = pipeline_lib.EPOCH_LENGTHS[i % 2]
    pipeline_lib.from_config(config, spec, pipeline_lib.make_mesh(1), jax.random.key(0))
    assert captured["epoch_order"] == order
    assert captured["epoch_length"] == config.epoch_length


def test_unknown_order_is_refused():
  with pytest.raises(ValueError, match="epoch_order must be one of"):
    make_pipeline("shuffled")


def test_resize_images_keeps_flat_colours_and_halves_a_checkerboard_to_its_mean():
  """Antialiased bilinear weights are non-negative and sum to 1: a flat image stays flat, and
  a 1-pixel checkerboard (0/200) shrunk 2x is its mean 100 away from the edges, where the
  triangle filter covers the pattern symmetrically (the edge rows renormalise over fewer)."""
  flat = np.full((3, 8, 6, 3), 77, np.uint8)
  np.testing.assert_array_equal(pipeline_lib.resize_images(flat, (4, 3)), flat[:, :4, :3])
  board = (200 * ((np.arange(16)[:, None] + np.arange(16)[None, :]) % 2)).astype(np.uint8)
  small = pipeline_lib.resize_images(board[None, :, :, None], (8, 8))
  assert small.shape == (1, 8, 8, 1) and small.dtype == np.uint8
  np.testing.assert_array_equal(small[0, 1:-1, 1:-1, 0], 100)
  assert pipeline_lib.resize_images(flat, (8, 6)) is flat
