"""The streaming pipeline (grain over array_record) against the whole-split one.

On the Tiny-ImageNet fixture prepared as array_record (48 train, 20 validation
images of 64x64, the training size), streaming with the "resize" crop must give
the whole-split pipeline's batches exactly: the same labels and pixels, step by
step over two epochs, and the same evaluation batches. A pipeline opened
mid-epoch (a resumed run) gives exactly the batches from there on.
"""

import dataclasses
import hashlib
import io
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tinyimagenet
from lkca_jax.data import pipeline as pipeline_lib
from lkca_jax.data import sources, stream
from tests.helpers import FIXTURE_RUN, FIXTURE_RUN_STEPS, prepared_fixture, with_overrides

BATCH = 16
STEPS_PER_EPOCH = 3 * 48 // BATCH
STEPS = 2 * STEPS_PER_EPOCH  # two epochs: two different orders


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(prepared_fixture(tmp_path_factory, "array_record"))


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
  first, second = (
    np.concatenate([b["label"] for b in streamed[e * 9 : e * 9 + 3]]) for e in (0, 1)
  )
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


def test_an_epoch_as_long_as_the_images_streams_the_whole_split_batches(data_dir):
  """DeiT's epoch (adjacent copies, epoch_length "images"): 3 steps of 16 of the 48 images'
  144-long order, and the stream reads those, then the next epoch's, as the host pipeline."""
  deit = {"epoch_order": "adjacent", "epoch_length": "images"}
  host = build(fixture_config(data_dir, **deit, **{"dataset.placement": "host"}))
  streamed = build(fixture_config(data_dir, **deit, **{"dataset.placement": "stream"}))
  assert streamed.steps_per_epoch == host.steps_per_epoch == 48 // BATCH
  pairs = zip(batches(host, range(6)), batches(streamed, range(6)), strict=True)
  for step, (a, b) in enumerate(pairs):
    np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"step {step}")
    np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"step {step}")
  # Step 5 read samples 80-95: the last copy of one image, then 5 images' 3 copies.
  assert sorted(np.unique(streamed.last_read, return_counts=True)[1]) == [1, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("resume_at", [4, STEPS_PER_EPOCH + 5])
def test_a_pipeline_opened_mid_epoch_gives_the_uninterrupted_batches(both, data_dir, resume_at):
  """What a resumed run does: a new pipeline, asked first for step `resume_at`."""
  _, uninterrupted, _, _ = both
  fresh = build(fixture_config(data_dir, **{"dataset.placement": "stream"}))
  resumed = batches(fresh, range(resume_at, STEPS))
  for step, b in zip(range(resume_at, STEPS), resumed, strict=True):
    np.testing.assert_array_equal(b["label"], uninterrupted[step]["label"], err_msg=f"step {step}")
    np.testing.assert_array_equal(b["image"], uninterrupted[step]["image"], err_msg=f"step {step}")


@pytest.mark.slow  # starts grain's worker processes
def test_worker_processes_give_the_batches_of_threads(both, data_dir):
  _, uninterrupted, _, _ = both
  config = fixture_config(data_dir, **{"dataset.placement": "stream", "dataset.stream_workers": 2})
  pipeline = build(config)
  steps = range(STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH + 7)  # opened mid-epoch
  for step, b in zip(steps, batches(pipeline, steps), strict=True):
    np.testing.assert_array_equal(b["label"], uninterrupted[step]["label"], err_msg=f"step {step}")
    np.testing.assert_array_equal(b["image"], uninterrupted[step]["image"], err_msg=f"step {step}")
  pipeline.close()


def test_each_run_of_a_stack_streams_its_own_whole_split_batches(data_dir):
  """Runs side by side (num_runs): run k's batches are those of a pipeline with key k alone."""
  keys = jax.random.split(jax.random.key(3), 2)
  config = fixture_config(data_dir, **{"dataset.placement": "stream"})
  stacked = batches(build(config, keys), [STEPS_PER_EPOCH + 1])
  for k in range(2):
    alone = build(fixture_config(data_dir, **{"dataset.placement": "host"}), keys[k])
    single = batches(alone, [STEPS_PER_EPOCH + 1])
    for a, b in zip(single, stacked, strict=True):
      np.testing.assert_array_equal(a["label"], b["label"][k])
      np.testing.assert_array_equal(a["image"], b["image"][k])
  assert not np.array_equal(stacked[0]["label"][0], stacked[0]["label"][1])


def build(config, key=0):
  spec = sources.get_spec(config.dataset.name)
  if config.dataset.classes:
    spec = dataclasses.replace(spec, num_classes=config.dataset.classes)
  key = jax.random.key(key) if isinstance(key, int) else key
  return pipeline_lib.from_config(config, spec, pipeline_lib.make_mesh(), key)


def test_random_resized_crops_are_drawn_per_step_and_row_and_repeat_on_resume(data_dir):
  config = fixture_config(
    data_dir, **{"dataset.stream_crop": "random_resized", "augment.flip": False}
  )
  config.augment.crop_padding, config.augment.random_erasing = 0, 0.0  # only the host's crop
  first = build(config)
  assert first.placement == "stream"  # "auto" streams: only the host makes this crop
  steps = [0, STEPS_PER_EPOCH]  # the same image positions of two epochs
  a = batches(first, steps)
  b = batches(build(config), steps)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])  # a pure function of key, step, row
  whole = batches(build(fixture_config(data_dir, **{"dataset.placement": "host"})), steps)
  # The crops change the pixels (with p 1 - (crop draws a box of the whole image) per image).
  assert all(not np.array_equal(x["image"], w["image"]) for x, w in zip(a, whole, strict=True))
  with pytest.raises(ValueError, match="stream_crop='random_resized' is made on the host"):
    build(with_overrides(config, {"dataset.placement": "host"}))


# --- the host's crops, alone ----------------------------------------------------------
def test_random_boxes_lie_in_the_image_with_the_asked_area_and_aspect():
  width, height, scale, ratio = 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)
  for seed in range(300):
    left, top, right, bottom = stream.random_box(
      stream.image_rng([seed], 0, 0), width, height, scale, ratio
    )
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    # w and h are rounded: each within 0.5 of the drawn real, so area and aspect within
    # (1 ± 0.5/side)^2 of the drawn ones (sides here are >= 0.08 area's sqrt, about 122 px).
    slack = (1 + 0.5 / min(w, h)) ** 2
    assert scale[0] / slack <= w * h / (width * height) <= scale[1] * slack
    assert ratio[0] / slack <= w / h <= ratio[1] * slack


def test_a_box_that_never_fits_falls_back_to_the_centred_box_of_the_ratio():
  # Area >= 90 % of 1000 x 10 with aspect 1 needs a side of 95 px: never fits in 10 rows.
  box = stream.random_box(stream.image_rng([0], 0, 0), 1000, 10, (0.9, 1.0), (1.0, 1.0))
  assert box == (495, 0, 505, 10)


# sha256 (first 16 hex digits) of torchvision 0.28.0's transforms with Pillow 13.0.0 on the
# noise image `_noise(width, height)`, made once in a separate venv (torchvision is never a
# dependency). Noise: a box off by a pixel, a scale off by one or a filter reaching past
# the box changes most pixels.
TORCHVISION = {
  # Compose([Resize(256, BICUBIC), CenterCrop(224)]): DeiT's evaluation at its 0.875.
  ("eval", 0.875, (500, 375)): "6439a1cd637adf0f",
  ("eval", 0.875, (333, 500)): "f6f808b7bdacea18",
  ("eval", 0.875, (640, 427)): "e8dccadf3a8232d0",
  ("eval", 0.875, (300, 300)): "b7d5c21283208a6c",
  # Compose([Resize(224, BICUBIC), CenterCrop(224)]): stream_crop="resize".
  ("resize", 1.0, (500, 375)): "557c3ab6fbaa0982",
  ("resize", 1.0, (333, 500)): "c0ebb551242ba9f6",
}
# F.resized_crop(noise(500, 375), top, left, height, width, [224, 224], BICUBIC) of a box
# (left, top, right, bottom): RandomResizedCrop's resize of the box it drew.
TORCHVISION_RESIZED_CROPS = {
  (10, 20, 310, 280): "d38a96212f3d40e1",
  (100, 50, 200, 150): "2e2e0fbe59f3b584",
  (0, 0, 500, 375): "21239c16011d6772",
}


def _noise(width: int, height: int) -> Image.Image:
  return Image.fromarray(
    np.random.default_rng([width, height]).integers(0, 256, (height, width, 3), np.uint8)
  )


def _digest(pixels) -> str:
  return hashlib.sha256(np.asarray(pixels).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("case", list(TORCHVISION))
def test_the_centre_crops_are_torchvisions_pixel_for_pixel(case):
  kind, fraction, size = case
  crop = stream.HostCrop(size=(224, 224), channels=3, eval_fraction=fraction)
  rng = None if kind == "eval" else stream.image_rng([0], 0, 0)  # "resize" draws nothing
  pixels = stream.crop_image(_noise(*size), crop, rng)
  assert pixels.shape == (224, 224, 3) and _digest(pixels) == TORCHVISION[case]


def test_a_non_square_evaluation_crop_resizes_by_the_longer_output_side():
  """Compose([Resize(int(64 / 0.875)), CenterCrop((64, 48))]) of torchvision, as above."""
  crop = stream.HostCrop(size=(64, 48), channels=3, eval_fraction=0.875)
  assert _digest(stream.crop_image(_noise(500, 375), crop, None)) == "4989aea76ad5ab94"


@pytest.mark.parametrize("box", list(TORCHVISION_RESIZED_CROPS))
def test_a_random_resized_crop_resizes_its_box_as_torchvision(box):
  pixels = stream.resized_crop(_noise(500, 375), box, 224, 224)
  assert _digest(pixels) == TORCHVISION_RESIZED_CROPS[box]


def test_an_image_at_the_size_is_kept_as_it_is():
  image = _noise(64, 64)
  crop = stream.HostCrop(size=(64, 64), channels=3)
  np.testing.assert_array_equal(stream.crop_image(image, crop, None), np.asarray(image))
  training = stream.crop_image(image, crop, stream.image_rng([0], 0, 0))
  np.testing.assert_array_equal(training, np.asarray(image))


def test_host_randomness_is_a_function_of_key_step_and_row():
  draw = lambda *args: stream.image_rng(*args).uniform(size=4)  # noqa: E731
  np.testing.assert_array_equal(draw([1, 2], 5, 3), draw([1, 2], 5, 3))
  for other in (([1, 3], 5, 3), ([1, 2], 6, 3), ([1, 2], 5, 4)):
    assert not np.array_equal(draw([1, 2], 5, 3), draw(*other))


def test_a_crop_is_the_training_size_for_any_stored_size():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8))
  crop = stream.HostCrop(size=(64, 48), channels=3, crop="random_resized")
  assert stream.crop_image(image, crop, stream.image_rng([0], 0, 0)).shape == (64, 48, 3)
  assert stream.crop_image(image, crop, None).shape == (64, 48, 3)  # evaluation
  grey = Image.fromarray(np.zeros((30, 40), np.uint8))
  data = io.BytesIO()
  grey.save(data, format="JPEG")
  decoded = stream.decode(data.getvalue(), 3)
  assert decoded.mode == "RGB" and decoded.size == (40, 30)


# --- where the data lives --------------------------------------------------------------
def test_auto_places_by_what_fits_and_streams_what_only_the_host_can_make(monkeypatch):
  monkeypatch.setattr(pipeline_lib, "host_memory_bytes", lambda: 1000)
  # CPU devices state no memory of their own: their memory is the host's.
  assert pipeline_lib.choose_placement("auto", 500) == "device"
  assert pipeline_lib.choose_placement("auto", 501) == "stream"
  assert pipeline_lib.choose_placement("auto", 1, stream_only="why") == "stream"
  assert pipeline_lib.choose_placement("stream", 1) == "stream"
  with pytest.raises(
    ValueError, match="loads whole splits, but why: set --config.dataset.placement=stream"
  ):
    pipeline_lib.choose_placement("device", 1, stream_only="why")
  with pytest.raises(ValueError, match="must be one of"):
    pipeline_lib.choose_placement("disk", 1)
  # Splits already in memory stay there: host memory when too large for the device.
  assert pipeline_lib.choose_placement("auto", 501, streamable=False) == "host"
  assert pipeline_lib.choose_placement("auto", 500, streamable=False) == "device"
  with pytest.raises(ValueError, match="already in memory"):
    pipeline_lib.choose_placement("stream", 1, streamable=False)


# --- per-process shards ------------------------------------------------------------------
# Each of 2 real processes (4 CPU devices each, gloo) streams two epochs and saves the record
# indices it read, its rows of the global batch, and the whole global batches gathered.
SHARDS = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from lkca_jax import distributed

distributed.initialize()
from tests.data import test_stream as t

data_dir, out = sys.argv[1:3]
pipeline = t.build(t.fixture_config(data_dir, **{"dataset.placement": "stream"}))
reads, images, labels = [], [], []
for step in range(t.STEPS):
  batch = pipeline.train_batch(pipeline.epoch_order(step // pipeline.steps_per_epoch), step)
  reads.append(pipeline.last_read)
  images.append(multihost_utils.process_allgather(batch["image"], tiled=True))
  labels.append(multihost_utils.process_allgather(batch["label"], tiled=True))
evals = [multihost_utils.process_allgather(b, tiled=True) for b in pipeline.eval_batches()]
np.savez(
  f"{out}/p{jax.process_index()}.npz",
  rows=pipeline.train_rows,
  reads=np.stack(reads),
  images=np.stack(images),
  labels=np.stack(labels),
  eval_images=np.stack([b["image"] for b in evals]),
  eval_labels=np.stack([b["label"] for b in evals]),
)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_disjoint_complete_shards_and_make_the_one_process_batches(
  both, data_dir, tmp_path
):
  from tests.test_multiprocess import LAUNCH, finish, last_lines, start

  rc, out = finish(start([*LAUNCH, sys.executable, "-c", SHARDS, data_dir, str(tmp_path)]))
  assert rc == 0, last_lines(out)
  shards = [np.load(tmp_path / f"p{p}.npz") for p in (0, 1)]
  rows = [s["rows"] for s in shards]
  # The rows of the global batch: disjoint, together all of them (process p: its 4 devices').
  assert not set(rows[0]) & set(rows[1])
  assert sorted([*rows[0], *rows[1]]) == list(range(BATCH))
  _, uninterrupted, _, one = both
  for epoch in range(2):
    order = np.asarray(one.epoch_order(epoch))
    seen = np.zeros(len(order), int)  # how often each position of the epoch's order was read
    for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
      for p in (0, 1):
        positions = (step % STEPS_PER_EPOCH) * BATCH + rows[p]
        np.testing.assert_array_equal(shards[p]["reads"][step], order[positions])
        seen[positions] += 1
    assert (seen == 1).all()  # each position once, by one process: disjoint and complete
  for p in (0, 1):  # the global batch, as either process holds it, is the one-process batch
    for step, batch in enumerate(uninterrupted):
      np.testing.assert_array_equal(shards[p]["labels"][step], batch["label"])
      np.testing.assert_array_equal(shards[p]["images"][step], batch["image"])
  whole_eval = [jax.device_get(b) for b in one.eval_batches()]
  for k, batch in enumerate(whole_eval):
    np.testing.assert_array_equal(shards[0]["eval_labels"][k], batch["label"])
    np.testing.assert_array_equal(shards[0]["eval_images"][k], batch["image"])


# --- a streamed run stopped by a signal mid-epoch ------------------------------------------
def run_flags():
  """The shared fixture run, streamed: 9 steps an epoch, so a stop at step 5 is mid-epoch;
  checkpoints at steps 4 and 8."""
  assert FIXTURE_RUN_STEPS == 8 and f"--config.batch_size={BATCH}" in FIXTURE_RUN
  return [*FIXTURE_RUN, "--config.dataset.placement=stream"]


@pytest.mark.slow  # three main.py runs
def test_a_streamed_run_stopped_mid_epoch_resumes_to_the_uninterrupted_parameters(
  data_dir, tmp_path
):
  """Also: a streamed main.py run trains with TensorFlow never imported (its uninterrupted run
  goes through tests/test_no_tensorflow.py's wrapper)."""
  from tests.helpers import HOLD
  from tests.test_main import ROOT, assert_same_params, final_params
  from tests.test_multiprocess import train_losses
  from tests.test_no_tensorflow import WRAPPER

  def main(workdir, *before):
    cmd = [sys.executable, *before, *run_flags(), f"--config.dataset.data_dir={data_dir}"]
    return subprocess.Popen(
      [*cmd, f"--workdir={workdir}"],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),  # tests/hold.py imports this checkout's lkca_jax
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  wrapper = tmp_path / "run_main.py"
  wrapper.write_text(WRAPPER)
  whole = main(tmp_path / "whole", str(wrapper))
  held = main(tmp_path / "stopped", HOLD, "save:4", "main.py")
  seen = []
  for line in held.stderr:
    seen.append(line)
    if line.startswith("holding at save:4"):
      break
  held.send_signal(signal.SIGTERM)
  out, err = held.communicate(timeout=300)
  assert held.returncode == 0, "".join(seen)[-2000:] + err[-2000:]
  assert "stopped by SIGTERM at step 5" in out
  out, err = whole.communicate(timeout=300)
  assert whole.returncode == 0, err[-3000:]
  assert out.strip().splitlines()[-1] == "tensorflow modules: []", out[-2000:]
  assert "images of (64, 64, 3) on stream in" in err, err[-2000:]
  resumed = main(tmp_path / "stopped", "main.py")
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0 and "resumed from" in err, err[-3000:]
  assert "Load dataset info" not in err  # TFDS's INFO line, once per split read
  step, params = final_params(str(tmp_path / "stopped"))
  assert step == 8 and final_params(str(tmp_path / "whole"))[0] == 8
  assert_same_params(params, final_params(str(tmp_path / "whole"))[1])
  # Steps 6-8 were trained after the resume, on the batches the uninterrupted run saw.
  np.testing.assert_array_equal(
    train_losses(str(tmp_path / "stopped"))[-3:], train_losses(str(tmp_path / "whole"))[-3:]
  )
