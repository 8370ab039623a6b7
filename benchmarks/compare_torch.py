"""lkca_jax's train step against the plain PyTorch port, alternated A B B A on one machine.

    python benchmarks/compare_torch.py [--models lkca_b,vit,lkca_t,vit_1m] [--batch 128]
        [--steps 20] [--repeats 1] [--dtype float32] [--forms auto]
        [--torch_python /work/torchvenv/bin/python]
        [--torch_script ../shared/bench/torch_reference_step.py]
        [--cpus 0] [--out bench_results/compare_torch.json]

Each repeat runs, in separate processes, A = `python -m lkca_jax.tools.bench_step
--columns fixed` (model, loss, AdamW, no per-image augmentation, as the port times it),
then B = the port, B again, A again, so a drift in machine load hits both alike.
`--dtype bfloat16` times lkca_jax's bfloat16 compute against the port under CPU autocast
(its products in bfloat16), each side's own way to train in bfloat16 on a CPU.
`--forms cpu,plain` times both layer forms in each A run (interleaved in one process),
so both ratios come from one alternation. Per model it prints the median images/s of
each side over its runs, the JAX / PyTorch ratio (above 1: JAX is faster), and the load
average before and after every run.
`--cpus` pins both sides to the CPUs listed (each side sizes its thread pool to
them): `--cpus=0` compares the kernels on one core, without either side's threading.
PyTorch is a timing anchor only: nothing in lkca_jax imports it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LINE = re.compile(r"^torch (\S+) .*: ([\d.]+) ms/step, ([\d.]+) img/s")


def load() -> float:
  return round(os.getloadavg()[0], 2)


def run_jax(models, batch, steps, forms, dtype) -> tuple[dict, int]:
  """{"jax_<forms>": {model: images/s}} of one bench_step run (fixed batch), and the number
  of CPUs that run could use."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench_step.json")
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "lkca_jax.tools.bench_step",
        f"--models={','.join(models)}",
        f"--batch={batch}",
        f"--dtype={dtype}",
        "--columns=fixed",
        f"--forms={','.join(forms)}",
        f"--steps={steps}",
        f"--out={out}",
      ],
      cwd=ROOT,
      check=False,
      stdout=subprocess.DEVNULL,
    )  # its stderr is this process's: a failure's own lines come before ours
    if result.returncode != 0:
      cli.fail(f"the JAX side (lkca_jax.tools.bench_step) exited with {result.returncode}", 1)
    with open(out) as f:
      report = json.load(f)
  by_side = {f"jax_{form}": {} for form in forms}
  for r in report["results"]:
    by_side[f"jax_{r['forms']}"][r["model"]] = r["fixed"]["images_per_second"]
  return by_side, report["machine"]["cpus_usable"]


def run_torch(python, script, models, batch, steps, dtype) -> dict:
  """{model: images/s} parsed from the port's output lines."""
  result = subprocess.run(
    [python, script, *models, f"--batch={batch}", f"--steps={steps}", f"--dtype={dtype}"],
    cwd=ROOT,
    check=False,
    capture_output=True,
    text=True,
  )
  text = result.stdout
  if result.returncode != 0:
    sys.stderr.write(result.stderr)
    cli.fail(f"the PyTorch port exited with {result.returncode} (its output is above)", 1)
  found = {}
  for line in text.splitlines():
    match = TORCH_LINE.match(line.strip())
    if match:
      found[match.group(1)] = batch / (float(match.group(2)) / 1e3)
  missing = sorted(set(models) - set(found))
  if missing:
    sys.stderr.write(text)
    cli.fail(f"no timing for {missing} in the PyTorch port's output (above)", 1)
  return found


def define_flags() -> None:
  flags.DEFINE_list("models", ["lkca_b", "vit", "lkca_t", "vit_1m"], "Model presets.")
  flags.DEFINE_integer("batch", 128, "Batch size of both sides.", lower_bound=1)
  flags.DEFINE_integer("steps", 20, "Timed steps per model and run.", lower_bound=1)
  flags.DEFINE_integer("repeats", 1, "A B B A rounds.", lower_bound=1)
  flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype of both sides: lkca_jax's --config.dtype, the port's CPU autocast.",
  )
  flags.DEFINE_string("torch_python", "/work/torchvenv/bin/python", "The PyTorch interpreter.")
  flags.DEFINE_string(
    "torch_script",
    os.path.join(os.path.dirname(ROOT), "shared", "bench", "torch_reference_step.py"),
    "The PyTorch port's step timing script.",
  )
  cli.define_output_file(
    "out", "bench_results/compare_torch.json", "Where the JSON results go (from the repository)."
  )
  flags.DEFINE_list(
    "cpus",
    [],
    "CPU ids both sides run on (pinned, inherited by their processes); empty: every CPU "
    "this process may use. --cpus=0 times one core.",
  )
  flags.DEFINE_list(
    "forms",
    ["auto"],
    "Layer forms lkca_jax times, each its own column: auto, cpu, plain (lkca_jax/backend.py).",
  )


def alternate(models, forms) -> list[dict]:
  """The A B B A rounds: one record per side and run, with the load around it."""
  runs = []
  for _ in range(FLAGS.repeats):
    for side in ("jax", "torch", "torch", "jax"):
      before, start = load(), time.time()
      if side == "jax":
        by_side, cpus_usable = run_jax(models, FLAGS.batch, FLAGS.steps, forms, FLAGS.dtype)
      else:
        by_side = {
          "torch": run_torch(
            FLAGS.torch_python, FLAGS.torch_script, models, FLAGS.batch, FLAGS.steps, FLAGS.dtype
          )
        }
        cpus_usable = None  # the port reports none; it inherits the same pinning
      after, seconds = load(), round(time.time() - start, 1)
      for name, ips in by_side.items():
        runs.append(
          {
            "side": name,
            "images_per_second": ips,
            "load_before": before,
            "load_after": after,
            "seconds": seconds,
            "cpus_usable": cpus_usable,
          }
        )
        print(
          f"{name:<13} load {before:5.2f} -> {after:5.2f}  "
          + "  ".join(f"{m} {ips[m]:.1f}" for m in models),
          flush=True,
        )
  return runs


def summarize(runs, models, forms) -> dict:
  """Per model: the median images/s of each side and JAX / PyTorch per form; printed too."""
  summary = {}
  jax_sides = [f"jax_{form}" for form in forms]
  print(f"\nmedian images/s over runs, batch {FLAGS.batch}, {FLAGS.dtype} (ratio > 1: JAX faster)")
  print(f"{'model':<10}{'torch':>10}" + "".join(f"{side:>14}{'ratio':>8}" for side in jax_sides))
  for m in models:

    def median(side, m=m):
      return statistics.median(r["images_per_second"][m] for r in runs if r["side"] == side)

    torch_ips = median("torch")
    summary[m] = {"torch": torch_ips}
    row = f"{m:<10}{torch_ips:>10.1f}"
    for side in jax_sides:
      ips = median(side)
      summary[m][side] = ips
      summary[m][f"ratio_{side.removeprefix('jax_')}"] = ips / torch_ips
      row += f"{ips:>14.1f}{ips / torch_ips:>8.2f}"
    print(row)
  return summary


def requested_cpus() -> set[int]:
  """--cpus as CPU ids this process may run on (all of them when the flag is empty)."""
  usable = os.sched_getaffinity(0)
  if not FLAGS.cpus:
    return usable
  try:
    cpus = {int(c) for c in FLAGS.cpus}
  except ValueError:
    cli.fail(f"--cpus must list CPU ids (integers), got {','.join(FLAGS.cpus)}")
  if not cpus <= usable:
    cli.fail(
      f"--cpus={','.join(FLAGS.cpus)}: CPU {min(cpus - usable)} is not one this process may "
      f"run on; choose from {','.join(map(str, sorted(usable)))}"
    )
  return cpus


def check_input() -> set[int]:
  """Bad flags are one `error:` line before either side runs (a JAX run takes minutes)."""
  from lkca_jax import backend  # pylint: disable=import-outside-toplevel

  cli.check_presets(FLAGS.models)
  if not FLAGS.forms or set(FLAGS.forms) - set(backend.FORMS):
    cli.fail(f"--forms must list {list(backend.FORMS)}, got {FLAGS.forms}")
  cpus = requested_cpus()
  if not os.path.isfile(FLAGS.torch_script):
    cli.fail(f"--torch_script={FLAGS.torch_script} is not a file; give the port's step script")
  return cpus


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  cpus = check_input()
  out = cli.output_file(os.path.join(ROOT, FLAGS.out), "--out")
  cli.check_interpreter(  # last: it starts the interpreter
    "torch_python",
    FLAGS.torch_python,
    "torch",
    "give a Python that has torch (pip install torch in a separate venv)",
  )
  models, forms = FLAGS.models, FLAGS.forms
  os.sched_setaffinity(0, cpus)  # both sides' processes inherit it
  runs = alternate(models, forms)
  summary = summarize(runs, models, forms)
  loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
  print(
    f"load average (1 min) during the runs: {min(loads):.2f} .. {max(loads):.2f}; "
    f"on {cli.cpus_in_use()}, {cli.cpu_model()}"
  )
  results = {
    "runs": runs,
    "summary": summary,
    "batch": FLAGS.batch,
    "steps": FLAGS.steps,
    "dtype": FLAGS.dtype,
    "forms": forms,
    "cpu_count": os.cpu_count(),
    "cpus": sorted(cpus),
    "cpu_model": cli.cpu_model(),
  }
  cli.write_json(out, results)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
