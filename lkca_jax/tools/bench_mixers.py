"""Forward+backward timing of the LKCA mixer in each view against MHSA.

    python -m lkca_jax.tools.bench_mixers [--out bench_results/bench_mixers.json] [--repeats N]
        [--max_seconds S] [--cases mhsa,lkca-attention,...] [--shapes 8x8,16x16]

Every case times one jit-compiled call of grad(sum(outputs)) with respect to
the input AND the parameters (the kernel for the bare mixing steps), on the
running backend, with block_until_ready; compilation and one warm-up call are
excluded. Reported: the median and the min of the timed calls. Module cases
("mhsa", "lkca-*") include the projections; "mix-*" cases time only the
spatial mixing (`lkca.mix_attention` / `lkca.mix_conv`) so the share of the
mixing in the module cost is visible. "*-channel" is the depthwise
formulation (kernel_sharing="channel": one kernel per channel).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from lkca_jax.layers import LKCA, MHSA, lkca
from lkca_jax.tools import cli

FLAGS = flags.FLAGS

DIM = 192
MHSA_HEADS = 12
# name → (batch, grid): the paper's 8×8 grid at batch 128, and a 4× longer sequence.
SHAPES = {"8x8": (128, (8, 8)), "16x16": (32, (16, 16))}
MIN_TIMED_RUNS = 3  # unless a single call takes longer than the per-case budget


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  description: str
  # (batch, grid, rng) → (function, its arguments); all arguments are differentiated.
  build: Callable[[int, tuple[int, int], np.random.Generator], tuple[Callable, tuple]]


def random_array(rng: np.random.Generator, shape, scale=1.0) -> jax.Array:
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def module_case(make_module: Callable[[tuple[int, int]], nnx.Module]):
  """A whole mixer module: the function of (parameters, tokens)."""

  def build(batch, grid, rng):
    module = make_module(grid)
    if isinstance(module, LKCA):  # the init is zero; give the kernel real values
      module.kernel[...] = random_array(rng, module.kernel[...].shape, 0.05)
    graphdef, params = nnx.split(module)

    def apply(params, x):
      return nnx.merge(graphdef, params)(x)

    return apply, (params, random_array(rng, (batch, grid[0] * grid[1], DIM)))

  return build


def mix_case(mix: Callable, sharing: str):
  """The bare spatial mixing step: the function of (kernel, values)."""

  def build(batch, grid, rng):
    kernel = random_array(rng, lkca.kernel_shape(DIM, grid, MHSA_HEADS, sharing), 0.05)

    def apply(kernel, v):
      return mix(v, kernel, grid, sharing)

    return apply, (kernel, random_array(rng, (batch, grid[0] * grid[1], DIM)))

  return build


def lkca_module(view: str, sharing: str):
  return module_case(
    lambda grid: LKCA(
      DIM, grid, num_heads=MHSA_HEADS, view=view, kernel_sharing=sharing, rngs=nnx.Rngs(0)
    )
  )


CASES = {
  case.name: case
  for case in [
    Case(
      "mhsa",
      f"MHSA module, {MHSA_HEADS} heads",
      module_case(lambda grid: MHSA(DIM, num_heads=MHSA_HEADS, rngs=nnx.Rngs(0))),
    ),
    Case(
      "lkca-attention", "LKCA module, attention view, one kernel", lkca_module("attention", "layer")
    ),
    Case("lkca-conv", "LKCA module, conv view, one kernel", lkca_module("conv", "layer")),
    Case(
      "lkca-attention-channel",
      "LKCA module, attention view, depthwise",
      lkca_module("attention", "channel"),
    ),
    Case("lkca-conv-channel", "LKCA module, conv view, depthwise", lkca_module("conv", "channel")),
    Case(
      "mix-attention",
      "mixing only: mix_attention, one kernel",
      mix_case(lkca.mix_attention, "layer"),
    ),
    Case("mix-conv", "mixing only: mix_conv, one kernel", mix_case(lkca.mix_conv, "layer")),
    Case(
      "mix-attention-channel",
      "mixing only: mix_attention, depthwise",
      mix_case(lkca.mix_attention, "channel"),
    ),
    Case(
      "mix-conv-channel", "mixing only: mix_conv, depthwise", mix_case(lkca.mix_conv, "channel")
    ),
  ]
}


def time_grad(apply: Callable, args: tuple, repeats: int, max_seconds: float) -> list[float]:
  """Seconds per call of the jitted grad of sum(apply(*args)) w.r.t. every argument.

  Compiles ahead of time (no execution), then `time_calls`.
  """
  loss = lambda *a: jnp.sum(apply(*a))  # noqa: E731
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile()
  return time_calls(grad, args, repeats, max_seconds)


def time_calls(fn: Callable, args: tuple, repeats: int, max_seconds: float) -> list[float]:
  """Seconds per call of fn(*args): one untimed warm-up call, then up to `repeats` timed
  calls, stopping once they have taken `max_seconds` (after MIN_TIMED_RUNS calls, or after
  one when the warm-up call alone took longer than the budget: the depthwise convolution on
  CPU takes seconds)."""
  tic = time.perf_counter()
  jax.block_until_ready(fn(*args))
  warm_up = time.perf_counter() - tic
  min_runs = MIN_TIMED_RUNS if warm_up * MIN_TIMED_RUNS <= max_seconds else 1
  times = []
  started = time.perf_counter()
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
    if len(times) >= min_runs and time.perf_counter() - started > max_seconds:
      break
  return times


def run(case_names: list[str], shape_names: list[str], repeats: int, max_seconds: float) -> dict:
  machine = cli.machine_info()
  machine["load_average_1m_at_start"] = machine.pop("load_average_1m")
  rows = []
  for shape_name in shape_names:
    batch, grid = SHAPES[shape_name]
    mhsa_median = None
    for name in case_names:
      apply, args = CASES[name].build(batch, grid, np.random.default_rng(0))
      times = time_grad(apply, args, repeats, max_seconds)
      median = statistics.median(times) * 1e3
      if name == "mhsa":
        mhsa_median = median
      rows.append(
        {
          "case": name,
          "description": CASES[name].description,
          "shape": f"B{batch} {grid[0]}x{grid[1]} D{DIM}",
          "batch": batch,
          "grid": list(grid),
          "dim": DIM,
          "median_ms": median,
          "min_ms": min(times) * 1e3,
          "runs": len(times),
        }
      )
      print(f"  {rows[-1]['shape']:>18}  {name:<24} {median:10.2f} ms", flush=True)
    for row in rows:
      if row["grid"] == list(grid) and mhsa_median is not None:
        row["ratio_vs_mhsa"] = mhsa_median / row["median_ms"]
  platform = "cpu" if jax.default_backend() == "cpu" else "default"  # lkca.AUTO_PLATFORMS
  auto_view = {
    name: lkca.resolve_view("auto", DIM, grid, MHSA_HEADS, "layer", platform)
    for name, (_, grid) in SHAPES.items()
  }
  machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
  return {
    "machine": machine,
    "repeats": repeats,
    "max_seconds_per_case": max_seconds,
    "auto_view": auto_view,
    "rows": rows,
  }


def markdown(results: dict) -> str:
  lines = [
    "| case | shape | median ms | min ms | ratio vs MHSA | runs |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for row in results["rows"]:
    ratio = f"{row['ratio_vs_mhsa']:.2f}x" if "ratio_vs_mhsa" in row else "n/a"
    lines.append(
      f"| {row['case']} | {row['shape']} | {row['median_ms']:.2f} | "
      f"{row['min_ms']:.2f} | {ratio} | {row['runs']} |"
    )
  m = results["machine"]
  lines += [
    "",
    "ratio vs MHSA = MHSA median / case median (above 1: faster than MHSA).",
    f"Forward+backward (grads w.r.t. input and parameters), float32, median of up to "
    f"{results['repeats']} timed runs after compile and warm-up.",
    f"Machine: {m['device_kind']} ({m['platform']}), {m['cpu_count']} CPUs, jax {m['jax']}, "
    f"load average {m['load_average_1m_at_start']} → {m['load_average_1m_at_end']}.",
    "view='auto' picks: "
    + ", ".join(f"{k}: {v}" for k, v in results["auto_view"].items())
    + " (kernel_sharing='layer', D 192).",
  ]
  default = {r["case"]: r for r in results["rows"] if r["shape"].startswith("B128 8x8")}
  view = results["auto_view"].get("8x8")
  if view and f"lkca-{view}" in default and "ratio_vs_mhsa" in default[f"lkca-{view}"]:
    lines.append(
      f"Default view ({view}) vs MHSA at B128 8x8 D192: "
      f"{default[f'lkca-{view}']['ratio_vs_mhsa']:.2f}x faster (the goal is at least 5x)."
    )
  return "\n".join(lines)


def parse_list(text: str, valid, what: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    cli.fail(f"unknown {what} {unknown or text!r}; choose from {', '.join(valid)}")
  return names


def define_flags() -> None:
  cli.define_output_file("out", "bench_results/bench_mixers.json", "JSON results file.")
  flags.DEFINE_integer("repeats", 15, "Timed runs per case (at most).")
  flags.DEFINE_float(
    "max_seconds", 3.0, f"Stop timing a case after this long (at least {MIN_TIMED_RUNS} runs)."
  )
  flags.DEFINE_string("cases", ",".join(CASES), "Comma-separated subset of: " + ", ".join(CASES))
  flags.DEFINE_string("shapes", ",".join(SHAPES), "Comma-separated subset of: " + ", ".join(SHAPES))


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  if FLAGS.repeats < 1 or FLAGS.max_seconds <= 0:
    cli.fail(
      f"--repeats must be at least 1 and --max_seconds above 0, got {FLAGS.repeats} and "
      f"{FLAGS.max_seconds}"
    )
  cases = parse_list(FLAGS.cases, CASES, "case")
  shapes = parse_list(FLAGS.shapes, SHAPES, "shape")
  out = cli.output_file(FLAGS.out, "--out")
  results = run(cases, shapes, FLAGS.repeats, FLAGS.max_seconds)
  print(markdown(results))
  print(f"wrote {cli.write_json(out, results)}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
