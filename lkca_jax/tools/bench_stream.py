"""Host throughput of the streaming input path: images a CPU core decodes and crops a second.

    python -m lkca_jax.tools.bench_stream [--data_dir DIR] [--images 2000] \\
        [--out bench_results/stream.json]

Times the function the streaming pipeline's host threads and grain workers run on
each image (`lkca_jax.data.stream._Load`: parse the tf.train.Example, decode the
JPEG with PIL, crop or resize to the training size) over records held in memory,
so no disk is timed. Three cases:

- `tiny_imagenet_64_resize`: Tiny-ImageNet's 64x64 JPEGs at their training size
  (decode only: "resize" has nothing to do). From the array_record train split
  prepared in --data_dir, else from synthetic 64x64 JPEGs.
- `imagenet_size_random_resized_224`: the same images re-encoded as 500x375 JPEGs
  (quality 90, with noise so that they weigh about what an ImageNet JPEG does, ~110 kB;
  the JSON gives their mean size), random-resized crop to 224 (DeiT's training crop).
- `imagenet_size_eval_224`: those, shorter side to 256 then the centre 224 (DeiT's
  evaluation).

"Per core" is images per second of the timing thread's own CPU time
(`time.thread_time`), which other processes' load barely changes; the wall-clock
rate of the same loop is given beside it. Prints a Markdown table and writes it
next to the JSON (`.md`).
"""

from __future__ import annotations

import io
import time

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS

IMAGENET_SIZE = (500, 375)  # width, height: ImageNet-1k's most common size
IMAGENET_QUALITY = 90
# Std of the Gaussian noise added before encoding, in levels: it brings the upscaled
# Tiny-ImageNet JPEGs to about ImageNet-1k's mean (its train tar, ~138 GiB over 1,281,167
# JPEGs: ~115 kB each).
NOISE = 24.0


def example(image_bytes: bytes, label: int) -> bytes:
  """A serialized tf.train.Example as TFDS stores one (image bytes, int64 label)."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  ex = tf_example_pb2.Example()
  ex.features.feature["image"].bytes_list.value.append(image_bytes)
  ex.features.feature["label"].int64_list.value.append(label)
  return ex.SerializeToString()


def jpeg(pixels, quality: int) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def tiny_records(data_dir, count: int) -> list[bytes]:
  """The first `count` records of the prepared Tiny-ImageNet train split, else synthetic ones."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if data_dir:
    from lkca_jax.data import sources  # pylint: disable=import-outside-toplevel

    files = sources.split_files("tiny_imagenet", "train", data_dir=data_dir)
    source = files.source()
    return list(source.__getitems__(range(min(count, len(source)))))
  rng = np.random.default_rng(0)
  smooth = [rng.integers(0, 256, (8, 8, 3), np.uint8).repeat(8, 0).repeat(8, 1) for _ in range(16)]
  return [example(jpeg(smooth[i % 16], 75), i % 200) for i in range(count)]


def imagenet_sized(records: list[bytes]) -> list[bytes]:
  """Each record's image upscaled to IMAGENET_SIZE, with noise, as a quality-90 JPEG."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from lkca_jax.data import stream  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  out = []
  for record in records:
    data, label = stream.parse_example(record, "image", "label")
    with stream.decode(data, 3) as image:
      big = np.asarray(image.resize(IMAGENET_SIZE, Image.Resampling.BICUBIC), np.float32)
    noisy = np.clip(big + rng.normal(0, NOISE, big.shape), 0, 255).astype(np.uint8)
    out.append(example(jpeg(noisy, IMAGENET_QUALITY), label))
  return out


def time_case(records: list[bytes], crop, train: bool) -> dict:
  """Per-image CPU time and wall time of the pipeline's own per-image function, one thread."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lkca_jax.data import records as records_lib  # pylint: disable=import-outside-toplevel
  from lkca_jax.data import stream  # pylint: disable=import-outside-toplevel

  split = records_lib.SplitFiles((), len(records), "array_record", "image", "label", ())
  seeds = np.zeros((1, 2), np.uint32) if train else None
  load = stream._Load(records, split, crop, seeds)  # pylint: disable=protected-access
  load((0, 0, 0, 0))  # warm: imports, PIL's first decode
  cpu, wall = time.thread_time(), time.perf_counter()
  for i in range(len(records)):
    shape = load((0, 0, i, i))["image"].shape
  cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
  return {
    "images": len(records),
    "mean_jpeg_bytes": round(float(np.mean([len(r) for r in records]))),
    "output_shape": list(shape),
    "cpu_seconds": round(cpu, 3),
    "wall_seconds": round(wall, 3),
    "images_per_cpu_second": round(len(records) / cpu, 1),
    "images_per_wall_second": round(len(records) / wall, 1),
  }


def run_benchmark(data_dir, images: int) -> dict:
  from lkca_jax.data import stream  # pylint: disable=import-outside-toplevel

  tiny = tiny_records(data_dir, images)
  big = imagenet_sized(tiny)
  cases = {
    "tiny_imagenet_64_resize": time_case(tiny, stream.HostCrop((64, 64), 3), train=True),
    "imagenet_size_random_resized_224": time_case(
      big, stream.HostCrop((224, 224), 3, crop="random_resized"), train=True
    ),
    "imagenet_size_eval_224": time_case(
      big, stream.HostCrop((224, 224), 3, eval_fraction=0.875), train=False
    ),
  }
  return {
    "source": f"prepared tiny_imagenet in {data_dir}" if data_dir else "synthetic 64x64 JPEGs",
    "machine": cli.machine_info(),
    "cases": cases,
  }


def format_table(results: dict) -> str:
  machine = results["machine"]
  lines = [
    f"Host decode + crop, one thread ({machine['cpu_model']}, load average "
    f"{machine['load_average_1m']}; {results['source']}):",
    "",
    "| case | output | mean JPEG | images / CPU-second (per core) | images / wall-second |",
    "|---|---|---:|---:|---:|",
  ]
  for name, case in results["cases"].items():
    shape = "x".join(str(d) for d in case["output_shape"])
    lines.append(
      f"| `{name}` | {shape} | {case['mean_jpeg_bytes'] / 1000:.1f} kB | "
      f"{case['images_per_cpu_second']:.0f} | {case['images_per_wall_second']:.0f} |"
    )
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir with tiny_imagenet prepared (else synthetic JPEGs)."
  )
  flags.DEFINE_integer("images", 2000, "Images timed per case.", lower_bound=1)
  cli.define_output_file(
    "out", "bench_results/stream.json", "Where the JSON results go (the table: .md beside it)."
  )


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  out = cli.output_file(FLAGS.out, "--out")
  from lkca_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  try:
    results = run_benchmark(FLAGS.data_dir, FLAGS.images)
  except (ValueError, data_lib.DatasetUnavailableError) as e:
    cli.fail(str(e))
  table = format_table(results)
  print(table)
  print(f"wrote {cli.write_json(out, results)}")
  print(f"wrote {cli.write_atomic(out.with_suffix('.md'), table + chr(10))}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
