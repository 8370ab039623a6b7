"""Trains several token mixers with one recipe and one step budget; writes a Markdown table.

    python -m lkca_jax.tools.compare --config configs/digits.py --mixers mhsa,lkca,acmix,flatten \
        --seeds 3 [--size t|b | --same-preset] [--steps N] [--out FILE.md] [--workdir DIR] \
        [--overwrite] [--config.KEY=VALUE ...]

The seeds of a mixer are trained side by side in one process: one
`train.train_and_evaluate` call with `config.num_runs` = S (seeds 0..S-1, see
README "Many runs in one process"; run k is exactly the single run of seed k)
and `config.num_train_steps` = --steps (default: the config's own budget).
The model of a row is

- size-matched (default): the preset of `SIZE_PRESETS[--size]` for that mixer,
  which each mixer class declares in its `size_presets` (t: vit_1m / lkca_t /
  acmix_t / flatten_t; b: vit / lkca_b / acmix_b / flatten_b); `config.model`
  is ignored;
- --same-preset: `config.model` with `model_overrides.mixer` set to the mixer.

Other `--config.model_overrides.*` apply to every row; `mixer_options` of
mixers other than the row's are cleared (they are keyed by mixer name).

The training directory of a mixer is DIR/<mixer> (DIR: --workdir, default
workdirs/compare_<config name>): checkpoints and logs of all its seeds, its
summary.json, and DIR/<mixer>/seed<k>/summary.json with each seed's own
values. Every comparison is a fresh one: if a mixer's directory already
exists the command refuses before training, unless --overwrite, which deletes
those directories first. Compiled programs are kept in DIR/jax_cache (JAX's
persistent cache; --nocompile-cache turns it off), so reruns skip compilation.

The table (--out, default bench_results/compare_<config name>.md) is printed,
written after every finished run (an interrupted comparison keeps its finished
rows), and saved with the per-seed values as JSON next to it (same name,
.json). Columns: top-1 final and best (in %, mean ± sample standard deviation,
ddof 1, over the seeds), trainable parameters, multiply-adds per image
(`model_macs`), and training images per second of one run (the process's
rate over its S runs, divided by S; the first, compiling step excluded).

Bad input (unknown mixer, --seeds < 1, a config that cannot run, an existing
run directory) is one line on stderr and exit code 2 before any training.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lkca_jax.layers import MIXERS  # noqa: E402
from lkca_jax.tools import cli  # noqa: E402
from lkca_jax.tools.cli import fail  # noqa: E402

# {size: {mixer: preset}}, from each registered mixer's own `size_presets`.
SIZE_PRESETS = {
  size: {name: cls.size_presets[size] for name, cls in MIXERS.items() if size in cls.size_presets}
  for size in sorted({s for cls in MIXERS.values() for s in cls.size_presets})
}
# What a directory must hold for --overwrite to delete it: something train_and_evaluate wrote.
RUN_DIR_MARKERS = ("config.json", "summary.json", "checkpoints")

FLAGS = flags.FLAGS


# --- multiply-adds --------------------------------------------------------------
def model_macs_breakdown(model) -> dict[str, int]:
  """Multiply-adds of one forward pass of one image through a `models.ViT`, by part.

  With N patch tokens, T = N (+1 with a class token), width D, MLP hidden D_h,
  patch p, C channels and K classes:
    patch_embed  N · p²C · D
    mixers       Σ_layers Mixer.macs(N if it needs the grid else T, D, heads, **options)
    mlp          depth · 2 · T · D · D_h
    head         D · K
  Only products of Linear / matmul / convolution count; LayerNorm, GELU,
  softmax, biases and residual adds do not. LKCA's N²·D mixing (and every
  mixer's token-token products) ARE counted, unlike the paper's FLOPs.
  A model built under `nnx.eval_shape` (no arrays) is enough.
  """
  num_patches = model.grid[0] * model.grid[1]
  tokens = num_patches + (1 if model.pool == "cls" else 0)
  dim = model.patch_embed.out_features
  mixers = mlp = 0
  for block in model.blocks:
    mixer = block.mixer
    mixer_tokens = num_patches if mixer.needs_grid else tokens
    mixers += type(mixer).macs(mixer_tokens, dim, block.num_heads, **dict(block.mixer_options))
    mlp += 2 * tokens * dim * block.mlp.fc1.out_features
  return {
    "patch_embed": num_patches * model.patch_embed.in_features * dim,
    "mixers": mixers,
    "mlp": mlp,
    "head": dim * model.head.out_features,
  }


def model_macs(model) -> int:
  """Whole-model multiply-adds per image (see `model_macs_breakdown`)."""
  return sum(model_macs_breakdown(model).values())


# --- configs and run directories ---------------------------------------------------
class UsageError(ValueError):
  """Input the comparison cannot run with; the message names the fix."""


def check_mixers(mixers: list[str], size: str, same_preset: bool) -> None:
  if not mixers:
    raise UsageError("--mixers is empty; pass e.g. --mixers mhsa,lkca")
  if len(set(mixers)) != len(mixers):
    raise UsageError(f"--mixers {','.join(mixers)} names a mixer twice; list each once")
  for mixer in mixers:
    if mixer not in MIXERS:
      raise UsageError(f"unknown mixer {mixer!r} in --mixers; choose from {sorted(MIXERS)}")
    if not same_preset and mixer not in SIZE_PRESETS[size]:
      raise UsageError(
        f"no size-{size} preset for mixer {mixer!r} (have "
        f"{sorted(SIZE_PRESETS[size])}); pass --same-preset to use config.model"
      )


def preset_for(config, mixer: str, size: str, same_preset: bool) -> str:
  return config.model if same_preset else SIZE_PRESETS[size][mixer]


def run_config(base, mixer: str, *, seed: int, size: str, same_preset: bool, steps: int | None):
  """A copy of `base` that trains `mixer` with `seed` (and `steps`, when given)."""
  config = copy.deepcopy(base)
  config.model = preset_for(base, mixer, size, same_preset)
  config.model_overrides.mixer = mixer
  for name, options in config.model_overrides.mixer_options.items():
    if name != mixer:
      for key in options:
        options[key] = None
  config.seed = seed
  if steps is not None:
    config.num_train_steps = steps
  return config


def enable_compile_cache(directory: str) -> None:
  """JAX's persistent compilation cache: a rerun of the same comparison compiles nothing
  (the same executable runs either way). An explicit $JAX_COMPILATION_CACHE_DIR wins."""
  import jax

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def clear_run_dirs(paths: list[str], overwrite: bool) -> None:
  """Refuses (UsageError) if any run directory exists, or deletes them with `overwrite`."""
  existing = [p for p in paths if os.path.exists(p)]
  if not existing:
    return
  if not overwrite:
    raise UsageError(
      f"run directory {existing[0]} already exists ({len(existing)} of "
      f"{len(paths)}); pass --overwrite to delete and retrain, or another --workdir"
    )
  for path in existing:
    if not os.path.isdir(path) or not any(
      os.path.exists(os.path.join(path, m)) for m in RUN_DIR_MARKERS
    ):
      raise UsageError(
        f"{path} exists but is not a training run directory; --overwrite "
        "deletes only those: move it away or pass another --workdir"
      )
  for path in existing:
    shutil.rmtree(path)


# --- the table ------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def summarize_row(row: dict) -> dict:
  """Adds the across-seed statistics of the finished runs of a row."""
  done = [r for r in row["runs"] if r.get("final_top1") is not None]
  for key in ("final_top1", "best_top1"):
    row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in done])
  speeds = [r["train_images_per_second"] for r in done if r["train_images_per_second"]]
  row["train_images_per_second_mean"] = float(np.mean(speeds)) if speeds else None
  row["finished_seeds"] = [r["seed"] for r in done]
  return row


def _percent(mean, std) -> str:
  if mean is None:
    return "–"
  return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def format_table(report: dict) -> str:
  s = report["settings"]
  how = (
    "`config.model` " + f"`{s['model']}`" + " with each mixer"
    if s["same_preset"]
    else f"size-matched presets (size {s['size']})"
  )
  overrides = ", ".join(f"{k}={v}" for k, v in s["model_overrides"].items())
  subset = (f"first {s['classes']} classes, " if s["subset_classes"] else "") + (
    f"{s['train_per_class']} training images a class, " if s["train_per_class"] else ""
  )
  lines = [
    f"## Token mixers on {s['dataset']}: {s['steps']} steps at batch {s['batch_size']}",
    "",
    f"Config `{s['config_file']}`, {how}"
    + (f", overrides {overrides}" if overrides else "")
    + f"; {subset}seeds {', '.join(map(str, s['seeds']))}; {s['devices']} {s['platform']} "
    "device(s). Top-1 on the full evaluation split"
    + (" of those classes" if s["subset_classes"] else "")
    + ", in %, mean ± sample std (ddof 1) over seeds.",
    "",
    "| mixer | preset | top-1 final | best top-1 | params | multiply-adds / image "
    "| train images/s | seeds |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in report["rows"]:
    speed = row["train_images_per_second_mean"]
    final = _percent(row["final_top1_mean"], row["final_top1_std"])
    best = _percent(row["best_top1_mean"], row["best_top1_std"])
    lines.append(
      f"| {row['mixer']} | {row['preset']} | {final} | {best} | {row['params']:,} "
      f"| {row['macs'] / 1e6:.2f}M | {f'{speed:.0f}' if speed else '–'} "
      f"| {len(row['finished_seeds'])}/{len(row['runs'])} |"
    )
  lines += [
    "",
    "Multiply-adds: patch embedding + per-layer mixer (the mixer's `macs`, "
    "token-token mixing included) + MLP + head; norms, activations and softmax "
    "not counted. Train images/s: the trainer's summary value, first step excluded.",
  ]
  failures = [
    f"{row['mixer']} seed {r['seed']}: {r['error']}"
    for row in report["rows"]
    for r in row["runs"]
    if r.get("error")
  ]
  if failures:
    lines += [""] + [f"- failed: {f}" for f in failures]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(format_table(report))
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(report, f, indent=2)


def write_seed_summary(path: str, summary: dict, run: dict) -> None:
  """PATH/seed<k>/summary.json: the values of one run of a many-run summary, with its seed."""
  config = copy.deepcopy(summary["config"])
  config.update(seed=run["seed"], num_runs=1)
  seed_summary = {k: v for k, v in summary.items() if k not in ("runs", "groups")}
  seed_summary.update(run, config=config, num_runs=1)
  os.makedirs(os.path.join(path, f"seed{run['seed']}"), exist_ok=True)
  with open(os.path.join(path, f"seed{run['seed']}", "summary.json"), "w") as f:
    json.dump(seed_summary, f, indent=2)


# --- command line -------------------------------------------------------------------
def define_flags() -> None:
  """The command's flags; defined on demand so importing this module (tests) registers none."""
  config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
  )
  flags.DEFINE_list("mixers", ["mhsa", "lkca", "acmix", "flatten"], "Token mixers to compare.")
  flags.DEFINE_integer(
    "seeds",
    3,
    "Seeds 0..S-1 per mixer, trained side by side in one process (config.num_runs=S).",
    lower_bound=1,
  )
  flags.DEFINE_enum("size", "t", sorted(SIZE_PRESETS), "Size-matched preset family.")
  flags.DEFINE_bool("same-preset", False, "Keep config.model; only override its mixer.")
  flags.DEFINE_integer(
    "steps", None, "Training steps per run (default: the config's).", lower_bound=1
  )
  flags.DEFINE_string(
    "out", None, "Markdown table path (default bench_results/compare_<config>.md)."
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Each mixer trains in DIR/<mixer>, its seeds' "
    "summaries in DIR/<mixer>/seed<k> (default workdirs/compare_<config>).",
  )
  flags.DEFINE_bool("overwrite", False, "Delete existing run directories instead of refusing.")
  flags.DEFINE_bool(
    "compile-cache",
    True,
    "Keep compiled steps in DIR/jax_cache, so reruns "
    "skip compilation; $JAX_COMPILATION_CACHE_DIR, when set, is used instead.",
  )


def config_stem() -> str:
  path = config_flags.get_config_filename(FLAGS["config"])
  return os.path.splitext(os.path.basename(path))[0]


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass settings as --flag=VALUE or --config.KEY=VALUE")
  base, mixers, seeds = FLAGS.config, FLAGS.mixers, list(range(FLAGS.seeds))
  same_preset, size, steps = FLAGS["same-preset"].value, FLAGS.size, FLAGS.steps
  workdir = FLAGS.workdir or os.path.join("workdirs", f"compare_{config_stem()}")
  out = FLAGS.out or os.path.join("bench_results", f"compare_{config_stem()}.md")
  try:
    check_mixers(mixers, size, same_preset)
  except UsageError as e:
    fail(str(e))
  if FLAGS["compile-cache"].value:
    enable_compile_cache(os.path.join(workdir, "jax_cache"))
  if not FLAGS["verbosity"].present:  # one progress line a run; --verbosity=0 shows the trainer's
    logging.set_verbosity(logging.WARNING)
  from lkca_jax import train

  # Everything that can fail on input fails here, before the first step.
  try:
    configs = {
      m: run_config(base, m, seed=0, size=size, same_preset=same_preset, steps=steps)
      for m in mixers
    }
    for config in configs.values():
      config.num_runs = len(seeds)
    runs = {m: train.Run.prepare(configs[m]) for m in mixers}
    clear_run_dirs([os.path.join(workdir, m) for m in mixers], FLAGS.overwrite)
  except (UsageError, train.ConfigError) as e:
    fail(str(e))

  first = runs[mixers[0]]
  report = {
    "settings": {
      "argv": sys.argv,
      "config_file": config_flags.get_config_filename(FLAGS["config"]),
      "dataset": base.dataset.name,
      "classes": first.spec.num_classes,
      "subset_classes": bool(base.dataset.classes),
      "train_per_class": base.dataset.train_per_class,
      "mixers": mixers,
      "seeds": seeds,
      "size": None if same_preset else size,
      "same_preset": same_preset,
      "model": base.model if same_preset else None,
      "model_overrides": {k: v for k, v in train.model_kwargs(base).items() if k != "mixer"},
      "batch_size": base.batch_size,
      "devices": int(first.mesh.devices.size),
      "platform": first.mesh.devices.flat[0].platform,
      "std_ddof": 1,
      "steps": steps,
      "workdir": workdir,
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    },
    "rows": [
      {
        "mixer": m,
        "preset": configs[m].model,
        "params": runs[m].num_params,
        "macs": model_macs(runs[m].model),
        "macs_breakdown": model_macs_breakdown(runs[m].model),
        "runs": [],
      }
      for m in mixers
    ],
  }
  rows = {row["mixer"]: summarize_row(row) for row in report["rows"]}
  total, done, failed = len(mixers) * len(seeds), 0, 0
  for mixer in mixers:  # all seeds of a mixer at once, side by side
    path = os.path.join(workdir, mixer)
    try:
      summary = train.train_and_evaluate(configs[mixer], path, run=runs.pop(mixer))
    except train.NonFiniteLossError as e:
      for seed in seeds:
        rows[mixer]["runs"].append({"seed": seed, "workdir": path, "error": str(e)})
      failed += len(seeds)
      print(f"[{done + failed}/{total}] {mixer}: {e}", file=sys.stderr)
      continue
    if summary["stopped_by"]:
      print(
        f"stopped by {summary['stopped_by']} during {mixer}; the mixers finished before it "
        f"are in {out}. Rerun with --overwrite to start over.",
        file=sys.stderr,
      )
      sys.exit(1)
    report["settings"]["steps"] = summary["total_steps"]
    speed = summary["train_images_per_second"]
    for r in summary["runs"]:
      if r["died_at_step"] is not None:
        rows[mixer]["runs"].append(
          {
            "seed": r["seed"],
            "workdir": path,
            "error": (f"loss became non-finite at step {r['died_at_step']}"),
          }
        )
        failed += 1
        continue
      done += 1
      rows[mixer]["runs"].append(
        {
          "seed": r["seed"],
          "workdir": path,
          "final_top1": r["final_top1"],
          "best_top1": r["best_top1"],
          "best_step": r["best_step"],
          "train_images_per_second": speed / len(seeds) if speed else None,
          "wall_seconds": summary["wall_seconds"],
        }
      )
      write_seed_summary(path, summary, r)
    summarize_row(rows[mixer])
    write_report(report, out)
    row = rows[mixer]
    print(
      f"[{done + failed}/{total}] {mixer}, seeds {row['finished_seeds']}: final top-1 "
      f"{_percent(row['final_top1_mean'], row['final_top1_std'])}%, best "
      f"{_percent(row['best_top1_mean'], row['best_top1_std'])}%, "
      f"{speed or 0:.0f} images/s over {len(seeds)} runs, "
      f"{summary['wall_seconds']:.0f} s",
      flush=True,
    )
  for row in report["rows"]:
    summarize_row(row)
  report["settings"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  if done:
    write_report(report, out)
    print(format_table(report))
    print(f"table: {out}; per-seed values: {os.path.splitext(out)[0]}.json")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  cli.run(main, "python -m lkca_jax.tools.compare")
