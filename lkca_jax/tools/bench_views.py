"""Times LKCA's three views (conv, attention, fft) over grid sizes, bare and in context.

    python -m lkca_jax.tools.bench_views [--grids 8,16,32,48,64] [--levels mix,mixer,block]
        [--views conv,attention,fft] [--tokens 4096] [--repeats 10] [--max_seconds 2]
        [--out bench_results/bench_views.json]

For every level, grid and view it compiles (ahead of time, not timed) the forward pass
and the forward+backward pass (grad of sum(outputs) w.r.t. the input and every
parameter), runs each once untimed, then times up to --repeats calls (block_until_ready;
stopping after --max_seconds once 3 calls are in, or after one call when one call alone
takes longer), on the running backend, float32. Levels:

- mix: the bare mixing step `lkca.mix_<view>(v, kernel, grid)`, D 192, one shared kernel;
- mixer: the whole `LKCA(192, grid, view=...)` module (projections included);
- block: one `lkca_b`-shaped block (`models.Block`: D 210, 10 heads, MLP ratio 2, the two
  LayerNorms; drop path 0).

Batch: --tokens // (h·w) images (at least 1), so every grid sees about as many tokens:
with 4096, batch 64 at 8×8, 16 at 16×16, 4 at 32×32, 1 at 48×48 and 64×64. Times are
reported per image (the median call over the batch). Memory: the compiled program's own
allocation, temp + output bytes from `Compiled.memory_analysis()` (XLA's buffer
assignment, the same on every backend; the inputs are not counted).

Prints a Markdown table and the crossover it implies (from which grid the FFT view beats
the gathered matrix, per level), and writes the JSON to --out and the table beside it
(same name, .md). The JSON is also written after every level and grid ("complete": false
until the last), so a run stopped by a time limit keeps what it finished.
lkca_jax/layers/lkca.py's AUTO_FFT_MIN_TOKENS comes from such a run.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from lkca_jax.backend import by_backend
from lkca_jax.layers import LKCA, lkca
from lkca_jax.models import PRESETS, Block
from lkca_jax.tools import cli
from lkca_jax.tools.bench_mixers import parse_list, random_array, time_calls

FLAGS = flags.FLAGS

DIM = 192
VIEWS = ("conv", "attention", "fft")
LEVELS = ("mix", "mixer", "block")
GRIDS = "8,16,32,48,64"
BLOCK = PRESETS["lkca_b"]  # the block level's shape: D 210, 10 heads, MLP ratio 2
TOKENS_PER_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class Program:
  """One level × grid × view: the function of `args`, all of them differentiated."""

  apply: Callable
  args: tuple
  batch: int


def build(level: str, view: str, grid: tuple[int, int], batch: int, dim: int) -> Program:
  rng = np.random.default_rng(0)
  tokens = grid[0] * grid[1]
  if level == "mix":
    kernel = random_array(rng, lkca.kernel_shape(dim, grid, 1, "layer"), 0.05)
    cpu_mix, plain_mix = lkca.CPU_MIXES[view], lkca.MIXES[view]
    apply = lambda kernel, v: by_backend(  # noqa: E731  the backend's own form
      lambda k, v: cpu_mix(v, k, grid, "layer"),
      lambda k, v: plain_mix(v, k, grid, "layer"),
      kernel,
      v,
    )
    return Program(apply, (kernel, random_array(rng, (batch, tokens, dim))), batch)
  if level == "mixer":
    module = LKCA(dim, grid, view=view, rngs=nnx.Rngs(0))
  else:
    dim = BLOCK.dim
    module = Block(
      dim,
      grid,
      mixer="lkca",
      num_heads=BLOCK.num_heads,
      mlp_ratio=BLOCK.mlp_ratio,
      drop_path_rate=0.0,
      mixer_options={"lkca": {"view": view}},
      dtype=None,
      rngs=nnx.Rngs(0),
    )
  lkca_layer = module if level == "mixer" else module.mixer
  # The reference init is a zero kernel; give it real values.
  lkca_layer.kernel[...] = random_array(rng, lkca_layer.kernel[...].shape, 0.05)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)  # rest: the block's RNG state
  apply = lambda params, x: nnx.merge(graphdef, params, rest)(x)  # noqa: E731
  return Program(apply, (params, random_array(rng, (batch, tokens, dim))), batch)


def memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:  # a backend without the analysis
    return {}
  out = {
    name: int(getattr(stats, f"{name}_size_in_bytes"))
    for name in ("temp", "output", "argument", "alias")
  }
  out["temp_plus_output"] = out["temp"] + out["output"]
  return out


def measure(program: Program, repeats: int, max_seconds: float) -> dict:
  """Per-image median and min ms and memory of the forward and forward+backward passes."""
  forward = jax.jit(program.apply)
  loss = lambda *a: jnp.sum(program.apply(*a))  # noqa: E731
  backward = jax.jit(jax.grad(loss, argnums=tuple(range(len(program.args)))))
  result = {}
  for name, fn in (("forward", forward), ("forward_backward", backward)):
    compiled = fn.lower(*program.args).compile()
    times = time_calls(compiled, program.args, repeats, max_seconds)
    result[name] = {
      "ms_per_image": 1e3 * statistics.median(times) / program.batch,
      "min_ms_per_image": 1e3 * min(times) / program.batch,
      "runs": len(times),
      "memory_bytes": memory(compiled),
    }
  return result


def parse_grids(text: str) -> list[tuple[int, int]]:
  """ "8,16,12x20" → [(8, 8), (16, 16), (12, 20)]; `cli.fail`s on anything else."""
  grids = []
  for item in (t.strip() for t in text.split(",") if t.strip()):
    sides = item.lower().split("x")
    if len(sides) > 2 or not all(s.isdigit() and int(s) > 0 for s in sides):
      cli.fail(f"--grids: bad grid {item!r}; give sides such as 8,16,32 or 12x20")
    grids.append((int(sides[0]), int(sides[-1])))
  if not grids:
    cli.fail("--grids is empty; give sides such as 8,16,32")
  return grids


def platform_key() -> str:
  """The key of lkca.AUTO_FFT_MIN_TOKENS that applies to the running backend."""
  return "cpu" if jax.default_backend() == "cpu" else "default"


def crossover(rows: list[dict], views: list[str]) -> dict:
  """Per level: the fastest view per grid (forward+backward), and from which token count on
  the FFT view beats the gathered matrix at every larger grid measured."""
  out = {}
  for level in dict.fromkeys(r["level"] for r in rows):
    mine = sorted((r for r in rows if r["level"] == level), key=lambda r: r["tokens"])
    grids = sorted({(r["tokens"], r["grid_name"]) for r in mine})
    ms = {(r["grid_name"], r["view"]): r["forward_backward"]["ms_per_image"] for r in mine}
    fastest = {g: min(views, key=lambda v, g=g: ms[g, v]) for _, g in grids}
    fft_from = None
    if {"fft", "attention"} <= set(views):
      for tokens, g in reversed(grids):
        if ms[g, "fft"] >= ms[g, "attention"]:
          break
        fft_from = tokens
    out[level] = {"fastest": fastest, "fft_beats_attention_from_tokens": fft_from}
  return out


def report(rows: list[dict], settings: dict, machine: dict, complete: bool) -> dict:
  """The JSON results of the rows measured so far; "complete" once every one is in."""
  grids = [tuple(g) for g in settings["grids"]]
  platform = platform_key()
  dim = settings["dim"]
  auto = {f"{g[0]}x{g[1]}": lkca.resolve_view("auto", dim, g, 1, "layer", platform) for g in grids}
  machine = machine | {"load_average_1m_at_end": round(os.getloadavg()[0], 2)}
  return {
    "machine": machine,
    "settings": settings,
    "complete": complete,
    "auto": {
      "platform": platform,
      "fft_min_tokens": lkca.AUTO_FFT_MIN_TOKENS[platform],
      "picks": auto,
    },
    "crossover": crossover(rows, settings["views"]),
    "rows": list(rows),  # a snapshot: the caller's list grows on
  }


def measure_row(level: str, view: str, grid, tokens_per_batch, repeats, max_seconds, dim) -> dict:
  """One level × grid × view: its settings and its measure()."""
  tokens = grid[0] * grid[1]
  batch = max(1, tokens_per_batch // tokens)
  program = build(level, view, grid, batch, dim)
  row = {
    "level": level,
    "grid": list(grid),
    "grid_name": f"{grid[0]}x{grid[1]}",
    "tokens": tokens,
    "view": view,
    "batch": batch,
    "dim": BLOCK.dim if level == "block" else dim,
    **measure(program, repeats, max_seconds),
  }
  print(
    f"  {level:<6} {row['grid_name']:>6} B{batch:<3} {view:<10}"
    f" fwd {row['forward']['ms_per_image']:9.3f}"
    f"  fwd+bwd {row['forward_backward']['ms_per_image']:9.3f} ms/image",
    flush=True,
  )
  return row


def run(
  grids: list[tuple[int, int]],
  levels: list[str],
  views: list[str],
  tokens_per_batch: int,
  repeats: int,
  max_seconds: float,
  dim: int = DIM,
  on_grid: Callable[[dict], None] | None = None,
) -> dict:
  """Every level × grid × view. After each level and grid (all its views),
  `on_grid(results so far)`, marked "complete": False, so a run stopped by a time limit
  keeps every grid it finished."""
  machine = cli.machine_info()
  machine["load_average_1m_at_start"] = machine.pop("load_average_1m")
  settings = {
    "grids": [list(g) for g in grids],
    "levels": levels,
    "views": views,
    "tokens_per_batch": tokens_per_batch,
    "repeats": repeats,
    "max_seconds": max_seconds,
    "dim": dim,
    "block": dataclasses.asdict(BLOCK) | {"drop_path_rate": 0.0},
    "dtype": "float32",
  }
  rows = []
  for level in levels:
    for grid in grids:
      rows += [
        measure_row(level, view, grid, tokens_per_batch, repeats, max_seconds, dim)
        for view in views
      ]
      if on_grid is not None:
        on_grid(report(rows, settings, machine, complete=False))
  return report(rows, settings, machine, complete=True)


def markdown(results: dict) -> str:
  views = results["settings"]["views"]
  head = ["level", "grid", "B"]
  head += [f"{v} fwd" for v in views] + [f"{v} fwd+bwd" for v in views]
  head += [f"{v} MB" for v in views] + ["fastest", "auto"]
  lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
  cross = results["crossover"]
  for level in results["settings"]["levels"]:
    for g in results["settings"]["grids"]:
      name = f"{g[0]}x{g[1]}"
      cells = {r["view"]: r for r in results["rows"] if r["level"] == level and r["grid"] == g}
      some = next(iter(cells.values()))
      row = [level, name, str(some["batch"])]
      row += [f"{cells[v]['forward']['ms_per_image']:.3f}" for v in views]
      row += [f"{cells[v]['forward_backward']['ms_per_image']:.3f}" for v in views]
      mb = lambda r: r["forward_backward"]["memory_bytes"].get("temp_plus_output")  # noqa: E731
      row += ["n/a" if mb(cells[v]) is None else f"{mb(cells[v]) / 2**20:.2f}" for v in views]
      row += [cross[level]["fastest"][name], results["auto"]["picks"][name]]
      lines.append("| " + " | ".join(row) + " |")
  s, m, auto = results["settings"], results["machine"], results["auto"]
  lines += [
    "",
    "ms per image (median call / batch), float32; fwd+bwd: grad of sum(outputs) w.r.t. the "
    "input and every parameter. MB: temp + output bytes of the compiled fwd+bwd program "
    "(XLA's buffer assignment; inputs not counted). fastest: by fwd+bwd. auto: "
    f"view='auto' on this backend ({auto['platform']}: fft from "
    f"{auto['fft_min_tokens']} tokens), one shared kernel.",
    f"mix: lkca.mix_<view>, D {s['dim']}; mixer: LKCA(D {s['dim']}); block: lkca_b-shaped "
    f"block (D {s['block']['dim']}, {s['block']['num_heads']} heads, MLP ratio "
    f"{s['block']['mlp_ratio']:g}). Batch: {s['tokens_per_batch']} tokens // h·w, at least "
    f"1. Up to {s['repeats']} timed calls after compile and one warm-up.",
    f"Machine: {m['cpu_model']}, {m['device_kind']} ({m['backend']}), {m['cpu_count']} CPUs, "
    f"jax {m['jax']}, load average {m['load_average_1m_at_start']} → "
    f"{m['load_average_1m_at_end']}.",
  ]
  for level, c in cross.items():
    tokens = c["fft_beats_attention_from_tokens"]
    says = "never at these grids" if tokens is None else f"from {tokens} tokens on"
    lines.append(f"Crossover ({level}): fft beats attention {says}.")
  return "\n".join(lines)


def define_flags() -> None:
  cli.define_output_file(
    "out", "bench_results/bench_views.json", "JSON results; the Markdown table goes beside it."
  )
  flags.DEFINE_string("grids", GRIDS, "Comma-separated grids: a side (8) or HxW (12x20).")
  flags.DEFINE_string("levels", ",".join(LEVELS), "Comma-separated subset of: " + ", ".join(LEVELS))
  flags.DEFINE_string("views", ",".join(VIEWS), "Comma-separated subset of: " + ", ".join(VIEWS))
  flags.DEFINE_integer("tokens", TOKENS_PER_BATCH, "Tokens per batch.", lower_bound=1)
  flags.DEFINE_integer("dim", DIM, "Width of the mix and mixer levels.", lower_bound=1)
  flags.DEFINE_integer("repeats", 10, "Timed calls per pass (at most).", lower_bound=1)
  flags.DEFINE_float(
    "max_seconds", 2.0, "Stop timing a pass after this long (3 calls in).", lower_bound=0.0
  )


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  grids = parse_grids(FLAGS.grids)
  levels = parse_list(FLAGS.levels, LEVELS, "level")
  views = parse_list(FLAGS.views, VIEWS, "view")
  out = cli.output_file(FLAGS.out, "--out")
  results = run(
    grids,
    levels,
    views,
    FLAGS.tokens,
    FLAGS.repeats,
    FLAGS.max_seconds,
    FLAGS.dim,
    on_grid=lambda partial: cli.write_json(out, partial),
  )
  table = markdown(results)
  print(table)
  print(f"wrote {cli.write_json(out, results)}")
  print(f"wrote {cli.write_atomic(out.with_suffix('.md'), table + chr(10))}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
