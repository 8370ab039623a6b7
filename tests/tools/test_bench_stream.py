"""The host-throughput benchmark of the streaming path: what it times and what it writes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lkca_jax.data import stream
from lkca_jax.tools import bench_stream
from tests.helpers import ROOT


def test_it_times_the_pipelines_own_function_on_each_case():
  results = bench_stream.run_benchmark(None, 3)
  cases = results["cases"]
  assert [tuple(c["output_shape"]) for c in cases.values()] == [
    (64, 64, 3),
    (224, 224, 3),
    (224, 224, 3),
  ]
  for case in cases.values():
    assert case["images"] == 3 and case["images_per_cpu_second"] > 0
  # The ImageNet-size JPEGs are 500 x 375 and weigh far more than the 64 x 64 ones.
  big = bench_stream.imagenet_sized(bench_stream.tiny_records(None, 1))[0]
  data, _ = stream.parse_example(big, "image", "label")
  assert stream.decode(data, 3).size == bench_stream.IMAGENET_SIZE
  tiny = cases["tiny_imagenet_64_resize"]["mean_jpeg_bytes"]
  assert cases["imagenet_size_random_resized_224"]["mean_jpeg_bytes"] > 10 * tiny
  table = bench_stream.format_table(results)
  assert all(f"`{name}`" in table for name in cases)


@pytest.mark.slow  # a process of its own
def test_the_command_writes_json_and_markdown(tmp_path):
  out = tmp_path / "stream.json"
  result = subprocess.run(
    [sys.executable, "-m", "lkca_jax.tools.bench_stream", "--images=2", f"--out={out}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  saved = json.loads(out.read_text())
  table = (tmp_path / "stream.md").read_text()
  assert table.strip() == bench_stream.format_table(saved) and table.strip() in result.stdout
  rates = [c["images_per_cpu_second"] for c in saved["cases"].values()]
  assert np.all(np.asarray(rates) > 0)
