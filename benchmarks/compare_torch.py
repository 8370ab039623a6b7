"""lkca_jax's train step against the plain PyTorch port, alternated A B B A on one machine.

    python benchmarks/compare_torch.py [--models lkca_b,vit,lkca_t,vit_1m] [--batch 128]
        [--steps 20] [--repeats 1] [--fast_cpu] [--torch_python /work/torchvenv/bin/python]
        [--torch_script ../shared/bench/torch_reference_step.py]
        [--out bench_results/compare_torch.json]

Each repeat runs, in separate processes, A = `python -m lkca_jax.tools.bench_step
--dtype float32` (the "fixed" column: model, loss, AdamW, no per-image
augmentation, as the port times it), then B = the port, B again, A again, so a
drift in machine load hits both alike. Per model it prints the median images/s of
each side over its runs, the JAX / PyTorch ratio (above 1: JAX is faster), and the
load average before and after every run. PyTorch is a timing anchor only: nothing
in lkca_jax imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LINE = re.compile(r"^torch (\S+) .*: ([\d.]+) ms/step, ([\d.]+) img/s")


def load() -> float:
  return round(os.getloadavg()[0], 2)


def run_jax(models, batch, steps, *, fast_cpu: bool = False) -> dict:
  """{model: images/s} of one bench_step run (float32, fixed batch)."""
  env = dict(os.environ, LKCA_JAX_FAST_CPU="1" if fast_cpu else "0")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench_step.json")
    subprocess.run(
      [
        sys.executable,
        "-m",
        "lkca_jax.tools.bench_step",
        f"--models={','.join(models)}",
        f"--batch={batch}",
        "--dtype=float32",
        f"--steps={steps}",
        f"--out={out}",
      ],
      cwd=ROOT,
      check=True,
      stdout=subprocess.DEVNULL,
      env=env,
    )
    with open(out) as f:
      results = json.load(f)["results"]
  return {r["model"]: r["fixed"]["images_per_second"] for r in results}


def run_torch(python, script, models, batch, steps) -> dict:
  """{model: images/s} parsed from the port's output lines."""
  text = subprocess.run(
    [python, script, *models, f"--batch={batch}", f"--steps={steps}"],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  found = {}
  for line in text.splitlines():
    match = TORCH_LINE.match(line.strip())
    if match:
      found[match.group(1)] = batch / (float(match.group(2)) / 1e3)
  missing = sorted(set(models) - set(found))
  if missing:
    raise SystemExit(f"error: no timing for {missing} in the PyTorch output:\n{text}")
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="lkca_b,vit,lkca_t,vit_1m")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=1, help="A B B A rounds")
  parser.add_argument("--torch_python", default="/work/torchvenv/bin/python")
  parser.add_argument(
    "--torch_script",
    default=os.path.join(os.path.dirname(ROOT), "shared", "bench", "torch_reference_step.py"),
  )
  parser.add_argument("--out", default="bench_results/compare_torch.json")
  parser.add_argument(
    "--fast_cpu",
    action="store_true",
    help="also time lkca_jax with LKCA_JAX_FAST_CPU=1 (lkca_jax/xla_flags.py): A C B B C A",
  )
  args = parser.parse_args()
  models = args.models.split(",")
  sides = ("jax", "jax_fast_cpu", "torch", "torch", "jax_fast_cpu", "jax")
  if not args.fast_cpu:
    sides = ("jax", "torch", "torch", "jax")
  runs = []
  for _ in range(args.repeats):
    for side in sides:
      before, start = load(), time.time()
      if side.startswith("jax"):
        ips = run_jax(models, args.batch, args.steps, fast_cpu=side == "jax_fast_cpu")
      else:
        ips = run_torch(args.torch_python, args.torch_script, models, args.batch, args.steps)
      runs.append(
        {
          "side": side,
          "images_per_second": ips,
          "load_before": before,
          "load_after": load(),
          "seconds": round(time.time() - start, 1),
        }
      )
      print(
        f"{side:<13} load {before:5.2f} -> {runs[-1]['load_after']:5.2f}  "
        + "  ".join(f"{m} {ips[m]:.1f}" for m in models),
        flush=True,
      )
  summary = {}
  jax_sides = [side for side in dict.fromkeys(sides) if side != "torch"]
  print(f"\nmedian images/s over runs, batch {args.batch}, float32 (ratio > 1: JAX faster)")
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
      summary[m]["ratio" if side == "jax" else f"ratio_{side.removeprefix('jax_')}"] = (
        ips / torch_ips
      )
      row += f"{ips:>14.1f}{ips / torch_ips:>8.2f}"
    print(row)
  loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
  print(
    f"load average (1 min) during the runs: {min(loads):.2f} .. {max(loads):.2f}; "
    f"{os.cpu_count()} CPUs"
  )
  os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
  with open(os.path.join(ROOT, args.out), "w") as f:
    json.dump(
      {
        "runs": runs,
        "summary": summary,
        "batch": args.batch,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
      },
      f,
      indent=2,
    )
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
