"""The view benchmark: a tiny run end to end (every view, grid and level in the saved JSON
and Markdown, with memory the programs' real sizes), its crossover rule and bad --grids."""

import json
import os
import subprocess
import sys

import pytest

from lkca_jax.layers import lkca
from lkca_jax.tools import bench_views

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRIDS = {"2x2": (2, 2), "3x4": (3, 4)}
DIM, TOKENS = 8, 16
LEVELS = ("mix", "block")  # the mixer level runs the block's code path on a bare LKCA


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_views") / "views.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "lkca_jax.tools.bench_views",
      "--grids=2,3x4",
      f"--levels={','.join(LEVELS)}",
      f"--dim={DIM}",
      f"--tokens={TOKENS}",
      "--repeats=2",
      "--max_seconds=0.01",
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text()), out.with_suffix(".md").read_text()


@pytest.mark.slow  # starts a process that compiles 24 programs
def test_tiny_run_saves_every_view_grid_and_level(smoke):
  stdout, results, table = smoke
  rows = {(r["level"], r["grid_name"], r["view"]): r for r in results["rows"]}
  assert set(rows) == {
    (level, g, view) for level in LEVELS for g in GRIDS for view in bench_views.VIEWS
  }
  for (level, g, view), r in rows.items():
    h, w = GRIDS[g]
    assert r["batch"] == max(1, TOKENS // (h * w))  # 4 at 2x2, 1 at 3x4
    assert r["dim"] == (210 if level == "block" else DIM)
    for name in ("forward", "forward_backward"):
      p = r[name]
      assert 0 < p["min_ms_per_image"] <= p["ms_per_image"] and 1 <= p["runs"] <= 2
    memory = r["forward_backward"]["memory_bytes"]
    assert memory["temp_plus_output"] == memory["temp"] + memory["output"]
    if level == "mix":
      # The forward returns the float32 (B, N, D) output; the fwd+bwd program the gradients
      # of the kernel and v, as a tuple: their bytes and the tuple's two 8-byte pointers.
      assert r["forward"]["memory_bytes"]["output"] == 4 * r["batch"] * h * w * DIM
      kernel = (2 * h - 1) * (2 * w - 1)
      assert memory["output"] == 4 * (kernel + r["batch"] * h * w * DIM) + 2 * 8, (g, view)
  for level, c in results["crossover"].items():
    for g in GRIDS:
      ms = {v: rows[level, g, v]["forward_backward"]["ms_per_image"] for v in bench_views.VIEWS}
      assert c["fastest"][g] == min(ms, key=ms.get)
  assert results["auto"]["platform"] == "cpu"
  for g, grid in GRIDS.items():
    assert results["auto"]["picks"][g] == lkca.resolve_view("auto", DIM, grid, 1, "layer", "cpu")
  # The Markdown table: one row per level and grid, with the JSON's numbers.
  for (level, g, _), r in rows.items():
    line = next(x for x in table.splitlines() if x.startswith(f"| {level} | {g} |"))
    assert f"| {r['forward_backward']['ms_per_image']:.3f} |" in line
  assert table in stdout and "Crossover (block): fft beats attention" in table


def row(level, tokens, view, ms):
  return {
    "level": level,
    "tokens": tokens,
    "grid_name": f"{tokens}",
    "view": view,
    "forward_backward": {"ms_per_image": ms},
  }


def test_crossover_is_where_fft_stays_ahead_of_attention():
  views = ["conv", "attention", "fft"]
  # fft ahead at 256 and from 1024 on, behind at 576: it stays ahead from 1024 tokens.
  timings = {64: (9, 1, 2), 256: (9, 3, 2), 576: (9, 3, 4), 1024: (9, 8, 5), 4096: (9, 50, 7)}
  rows = [row("mix", n, v, ms) for n, t in timings.items() for v, ms in zip(views, t, strict=True)]
  rows += [row("block", n, v, 1.0 if v == "attention" else 2.0) for n in (64, 256) for v in views]
  c = bench_views.crossover(rows, views)
  assert c["mix"]["fft_beats_attention_from_tokens"] == 1024
  assert c["mix"]["fastest"] == {"64": "attention", "256": "fft", "576": "attention",
                                 "1024": "fft", "4096": "fft"}  # fmt: skip
  assert c["block"]["fft_beats_attention_from_tokens"] is None
  without_attention = bench_views.crossover(rows, ["conv", "fft"])["mix"]
  assert without_attention["fft_beats_attention_from_tokens"] is None


@pytest.mark.parametrize("text", ["8x", "0", "8x8x8", "a", ""])
def test_bad_grids_are_one_error_line(text, capsys):
  with pytest.raises(SystemExit) as e:
    bench_views.parse_grids(text)
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error: --grids")


def test_grids_parse_sides_and_rectangles():
  assert bench_views.parse_grids("8, 16,12x20") == [(8, 8), (16, 16), (12, 20)]


def test_results_are_handed_over_after_every_grid_so_a_stopped_run_keeps_them():
  seen = []
  final = bench_views.run(
    [(2, 2), (3, 4)], ["mix"], ["attention", "fft"], TOKENS, 1, 0.0, DIM, on_grid=seen.append
  )
  assert [s["complete"] for s in seen] == [False, False] and final["complete"] is True
  # The first hand-over holds the first grid's views only, with its own crossover.
  assert [(r["grid_name"], r["view"]) for r in seen[0]["rows"]] == [
    ("2x2", "attention"),
    ("2x2", "fft"),
  ]
  assert set(seen[0]["crossover"]["mix"]["fastest"]) == {"2x2"}
  assert seen[1]["rows"] == final["rows"] and len(final["rows"]) == 4
  json.dumps(seen[0])  # what cli.write_json saves
