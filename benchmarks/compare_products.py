"""The matrix products of the train step's Linears, XLA:CPU against PyTorch, alternated.

    python benchmarks/compare_products.py [--models lkca_b,vit,lkca_t,vit_1m] [--batch 128]
        [--repeats 30] [--rounds 1] [--sides jax,torch]
        [--torch_python /work/torchvenv/bin/python]
        [--out bench_results/compare_products.json]

Each Linear multiplies three times a train step: forward x·W ("NN"), the input gradient
g·Wᵀ ("NT") and the weight gradient xᵀ·g ("TN", transposed on the left). This command
finds every forward product of a preset, (rows, in, out), by tracing its CPU forms
(lkca_jax/backend.py) on CIFAR-shaped images, then times the three products of each
distinct shape alone: in JAX as `lax.dot_general`s under `jit` (so XLA:CPU picks its
kernel as it does in the step), and in PyTorch as `torch.mm` (`benchmarks/_torch_products.py`,
run by `--torch_python`). Rounds alternate JAX, PyTorch, PyTorch, JAX in one process and
one subprocess, so a drift in the machine's speed hits both alike.

Per model and form it prints GFLOP/s of each side and the milliseconds a step spends in
those products at those rates (a count over every Linear; the patch embedding's input
gradient, which the step skips, is under 0.5 % of it). The mixers' own products (attention,
LKCA's mixing) are not Linears and are left out. `--sides jax` times JAX alone. Under
`taskset -c 0` both sides run on one core (each sizes its threads to the CPUs it may use;
the JSON records the CPUs, and the threads each PyTorch run used).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import timeit

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SCRIPT = os.path.join(ROOT, "benchmarks", "_torch_products.py")
FORMS = ("NN", "NT", "TN")
SIDES = ("jax", "torch")
IMAGE_SIZE, NUM_CLASSES = 32, 10  # CIFAR-shaped, as compare_torch.py and the port time it


def define_flags() -> None:
  flags.DEFINE_list("models", ["lkca_b", "vit", "lkca_t", "vit_1m"], "Model presets.")
  flags.DEFINE_integer("batch", 128, "Images per step: the products' rows.", lower_bound=1)
  flags.DEFINE_integer("repeats", 30, "Timed calls per product and run.", lower_bound=1)
  flags.DEFINE_integer("rounds", 1, "A B B A rounds.", lower_bound=1)
  flags.DEFINE_list("sides", list(SIDES), "What to time: jax, torch.")
  flags.DEFINE_string("torch_python", "/work/torchvenv/bin/python", "The PyTorch interpreter.")
  cli.define_output_file(
    "out", "bench_results/compare_products.json", "Where the JSON results go (from the repository)."
  )


def forward_products(preset: str, batch: int) -> list[tuple[int, int, int]]:
  """(rows, in, out) of every Linear's forward product in `preset`'s CPU forms, in order."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.extend.core as jax_core  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lkca_jax import backend, models  # pylint: disable=import-outside-toplevel

  model = models.create_model(
    preset, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, rngs=nnx.Rngs(0)
  )
  model.eval()  # drop path off: it draws random numbers and changes no product
  images = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  with backend.forms("cpu"):
    jaxpr = jax.make_jaxpr(model)(images).jaxpr
  linear = (((1,), (0,)), ((), ()))  # a 2-D x times a 2-D kernel: how a CPU Linear multiplies
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes = [v.aval.shape for v in eqn.invars]
      if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"] == linear:
        if len(shapes[0]) == 2 and len(shapes[1]) == 2:
          found.append((shapes[0][0], shapes[0][1], shapes[1][1]))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax_core.Jaxpr):
            walk(sub)

  walk(jaxpr)
  return found


def compile_jax_products(shapes) -> dict:
  """{"MxKxN": {form: a call of XLA:CPU's compiled product on its operands}}, compiled once
  for every run and called as such: the call costs microseconds, not the jit's lookup."""
  import jax  # pylint: disable=import-outside-toplevel

  dims = {
    "NN": (((1,), (0,)), ((), ())),  # x·W
    "NT": (((1,), (1,)), ((), ())),  # g·Wᵀ
    "TN": (((0,), (0,)), ((), ())),  # xᵀ·g
  }
  calls = {}
  for m, k, n in shapes:
    keys = jax.random.split(jax.random.key(0), 3)
    x, w, g = (
      jax.random.normal(key, s) for key, s in zip(keys, ((m, k), (k, n), (m, n)), strict=True)
    )
    operands = {"NN": (x, w), "NT": (g, w), "TN": (x, g)}
    mine = calls[shape_key((m, k, n))] = {}
    for form in FORMS:
      product = jax.jit(lambda a, b, d=dims[form]: jax.lax.dot_general(a, b, d))
      compiled = product.lower(*operands[form]).compile()
      mine[form] = lambda c=compiled, o=operands[form]: c(*o).block_until_ready()
  return calls


def time_jax(calls, repeats) -> dict:
  """{"seconds": {"MxKxN": {form: median seconds}}} of XLA:CPU's products, each alone."""
  return {
    "seconds": {
      key: {form: median_seconds(call, repeats) for form, call in forms.items()}
      for key, forms in calls.items()
    }
  }


def median_seconds(call, repeats) -> float:
  call()  # warms the caches, as the step's earlier calls would
  return statistics.median(timeit.repeat(call, number=1, repeat=repeats))


def time_torch(shapes, repeats) -> dict:
  """The same as `time_jax`, from PyTorch in its own process, with the threads it used."""
  result = subprocess.run(
    [FLAGS.torch_python, TORCH_SCRIPT, json.dumps(shapes), str(repeats)],
    capture_output=True,
    text=True,
    check=False,
  )
  if result.returncode != 0:
    sys.stderr.write(result.stderr)
    cli.fail(f"the PyTorch side exited with {result.returncode} (its output is above)", 1)
  report = json.loads(result.stdout.splitlines()[-1])
  return {"seconds": report["seconds"], "threads": report["threads"]}


def shape_key(shape) -> str:
  return "x".join(str(s) for s in shape)


def alternate(timers) -> list[dict]:
  """The A B B A rounds of `timers` ({side: a call giving {"seconds": ...}}): one record per
  side and run, with the load around it."""
  order = [s for s in ("jax", "torch", "torch", "jax") if s in timers]
  runs = []
  for _ in range(FLAGS.rounds):
    for side in order:
      before = round(os.getloadavg()[0], 2)
      timed = timers[side]()
      after = round(os.getloadavg()[0], 2)
      runs.append({"side": side, **timed, "load_before": before, "load_after": after})
      print(f"{side:<6} load {before:5.2f} -> {after:5.2f}", flush=True)
  return runs


def median_seconds_over_runs(runs, side) -> dict:
  """{"MxKxN": {form: the median over `side`'s runs of its seconds}}."""
  mine = [r["seconds"] for r in runs if r["side"] == side]
  return {
    key: {form: statistics.median(s[key][form] for s in mine) for form in FORMS} for key in mine[0]
  }


def summarize(products, runs, sides) -> dict:
  """Per model and side: each form's GFLOP/s per shape and milliseconds per step; printed."""
  median = {side: median_seconds_over_runs(runs, side) for side in sides}
  summary = {}
  for model, shapes in products.items():
    rows = {}
    for (m, k, n), count in collections.Counter(shapes).items():
      key, flop = shape_key((m, k, n)), 2 * m * k * n
      rows[key] = {"count": count}
      for side in sides:
        rows[key][side] = {form: flop / median[side][key][form] / 1e9 for form in FORMS}
    step_ms = {
      side: {
        form: 1e3 * sum(row["count"] * median[side][key][form] for key, row in rows.items())
        for form in FORMS
      }
      for side in sides
    }
    summary[model] = {"products": rows, "step_ms": step_ms}
    print_model(model, rows, step_ms, sides)
  return summary


def print_model(model, rows, step_ms, sides) -> None:
  print(f"\n{model}: GFLOP/s of each product alone, " + " / ".join(sides))
  print(f"{'rows x in x out':<20}{'count':>6}" + "".join(f"{form:>16}" for form in FORMS))
  for key, row in sorted(rows.items(), key=lambda kv: -kv[1]["count"]):
    cells = "".join(
      f"{' / '.join(f'{row[side][form]:.0f}' for side in sides):>16}" for form in FORMS
    )
    print(f"{key:<20}{row['count']:>6}{cells}")
  total = {side: sum(step_ms[side].values()) for side in sides}
  cells = "".join(
    f"{' / '.join(f'{step_ms[side][form]:.0f}' for side in sides):>16}" for form in FORMS
  )
  print(f"{'ms per step':<26}{cells}   all: " + " / ".join(f"{total[s]:.0f}" for s in sides))


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  cli.check_presets(FLAGS.models)
  if not FLAGS.sides or set(FLAGS.sides) - set(SIDES):
    cli.fail(f"--sides must list {list(SIDES)}, got {FLAGS.sides}")
  out = cli.output_file(os.path.join(ROOT, FLAGS.out), "--out")
  if "torch" in FLAGS.sides:
    cli.check_interpreter(  # last: it starts the interpreter
      "torch_python",
      FLAGS.torch_python,
      "torch",
      "give a Python that has torch (pip install torch in a separate venv), or time JAX "
      "alone with --sides jax",
    )
  products = {m: forward_products(m, FLAGS.batch) for m in FLAGS.models}
  shapes = sorted({s for found in products.values() for s in found})
  timers = {}
  if "jax" in FLAGS.sides:
    calls = compile_jax_products(shapes)
    timers["jax"] = lambda: time_jax(calls, FLAGS.repeats)
  if "torch" in FLAGS.sides:
    timers["torch"] = lambda: time_torch(shapes, FLAGS.repeats)
  runs = alternate(timers)
  summary = summarize(products, runs, FLAGS.sides)
  loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
  print(
    f"\nload average (1 min) during the runs: {min(loads):.2f} .. {max(loads):.2f}; "
    f"on {cli.cpus_in_use()}, {cli.cpu_model()}"
  )
  cli.write_json(
    out,
    {
      "summary": summary,
      "runs": runs,
      "batch": FLAGS.batch,
      "repeats": FLAGS.repeats,
      "cpu_count": os.cpu_count(),
      "cpus": sorted(os.sched_getaffinity(0)),
      "cpu_model": cli.cpu_model(),
    },
  )
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
