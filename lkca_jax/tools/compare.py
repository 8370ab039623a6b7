"""Trains several token mixers with one recipe and one step budget; writes a Markdown table.

    python -m lkca_jax.tools.compare --config configs/digits.py --mixers mhsa,lkca,acmix,flatten \\
        --seeds 3 [--size t|b | --same-preset] [--steps N] [--out FILE.md] [--workdir DIR] \\
        [--overwrite] [--config.KEY=VALUE ...]

A row of the table is a mixer, trained by the experiment runner
(`lkca_jax.tools._experiment`): its seeds 0..S-1 side by side in one process, one
`train.train_and_evaluate` call with `config.num_runs` = S (see README "Many runs in one
process"; run k is exactly the single run of seed k) and `config.num_train_steps` = --steps
(default: the config's own budget; shortened, its warmup keeps the recipe's share of the
run, `_experiment.configure`). The model of a row is

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

The table's header names the config file, the rows' presets and model overrides, and every
other config key set on the command line that changes what a run trains (e.g.
`optimizer.learning_rate`=0.0005; not where data or outputs live or how often runs report).
The table (--out, default bench_results/compare_<config name>.md) is printed,
written after every finished row (an interrupted comparison keeps its finished
rows), and saved with the per-seed values as JSON next to it (same name, .json;
top-1 values there are fractions, as in summary.json). Columns: top-1 final and
best (in %, mean ± sample standard deviation, ddof 1, over the seeds),
trainable parameters, multiply-adds per image (`model_macs`), and training
images per second of one run (the process's rate over its S runs, divided by S;
the first, compiling step excluded).

Bad input (unknown mixer, --seeds < 1, a config that cannot run, an existing
run directory) is one line on stderr and exit code 2 before any training.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from lkca_jax.layers import MIXERS
from lkca_jax.tools import _experiment as experiment
from lkca_jax.tools import cli

# {size: {mixer: preset}}, from each registered mixer's own `size_presets`.
SIZE_PRESETS = {
  size: {name: cls.size_presets[size] for name, cls in MIXERS.items() if size in cls.size_presets}
  for size in sorted({s for cls in MIXERS.values() for s in cls.size_presets})
}

FLAGS = flags.FLAGS
# Config keys the table's header states itself (or the command sets per row); any other key
# set on the command line is listed there, unless it leaves the training as it is.
STATED = frozenset(
  {
    "batch_size",
    "dataset.classes",
    "dataset.train_per_class",
    "model",
    "num_runs",
    "num_train_steps",
    "seed",
  }
)


# --- multiply-adds --------------------------------------------------------------
def model_macs_breakdown(model) -> dict[str, int]:
  """Multiply-adds of one forward pass of one image through a `models.ViT`, by part: the
  architecture's count, every token of every block, as the paper's tables count (a
  class-token ViT's own call computes only the class token in its last block).

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


# --- configs -------------------------------------------------------------------------
def check_mixers(mixers: list[str], size: str, same_preset: bool) -> None:
  if not mixers:
    raise experiment.UsageError("--mixers is empty; pass e.g. --mixers mhsa,lkca")
  experiment.check_once(mixers, "--mixers", "mixer")
  for mixer in mixers:
    if mixer not in MIXERS:
      raise experiment.UsageError(
        f"unknown mixer {mixer!r} in --mixers; choose from {sorted(MIXERS)}"
      )
    if not same_preset and mixer not in SIZE_PRESETS[size]:
      raise experiment.UsageError(
        f"no size-{size} preset for mixer {mixer!r} (have "
        f"{sorted(SIZE_PRESETS[size])}); pass --same-preset to use config.model"
      )


def run_config(base, mixer: str, *, seeds: int, size: str, same_preset: bool, steps: int | None):
  """A copy of `base` that trains `mixer` with seeds 0..seeds-1 (for `steps` steps, if given)."""
  config = experiment.configure(base, seed=0, seeds=seeds, steps=steps)
  config.model = base.model if same_preset else SIZE_PRESETS[size][mixer]
  config.model_overrides.mixer = mixer
  for name, options in config.model_overrides.mixer_options.items():
    if name != mixer:
      for key in options:
        options[key] = None
  return config


def enable_compile_cache(directory: str) -> None:
  """JAX's persistent compilation cache: a rerun of the same comparison compiles nothing
  (the same executable runs either way). An explicit $JAX_COMPILATION_CACHE_DIR wins."""
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# --- the table ------------------------------------------------------------------
def format_table(report: dict) -> str:
  s, rows = report["settings"], report["rows"]
  steps = next((row["steps"] for row in rows if row.get("steps")), s["steps"])
  # Before a row finishes, an epoch budget has no step count yet (the data sets it).
  budget = f"{steps:,} steps" if steps else f"{s['epochs']} epochs"
  how = (
    "`config.model` " + f"`{s['model']}`" + " with each mixer"
    if s["same_preset"]
    else f"size-matched presets (size {s['size']})"
  )
  overrides = ", ".join(f"{k}={v}" for k, v in s["model_overrides"].items())
  changes = cli.format_config_changes(s["config_changes"])
  subset = (f"first {s['classes']} classes, " if s["subset_classes"] else "") + (
    f"{s['train_per_class']} training images a class, " if s["train_per_class"] else ""
  )
  lines = [
    f"## Token mixers on {s['dataset']}: {budget} at batch {s['batch_size']}",
    "",
    f"Config `{s['config_file']}`, {how}"
    + (f", overrides {overrides}" if overrides else "")
    + (f", set on the command line: {changes}" if changes else "")
    + f"; {subset}seeds {', '.join(map(str, s['seeds']))}; {s['hardware']}. "
    "Top-1 on the full evaluation split"
    + (" of those classes" if s["subset_classes"] else "")
    + ", in %, mean ± sample std (ddof 1) over seeds.",
    "",
    "| mixer | preset | top-1 final | best top-1 | params | multiply-adds / image "
    "| train images/s | seeds |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    speed = row["train_images_per_second_mean"]
    final = experiment.percent(row["final_top1_mean"], row["final_top1_std"])
    best = experiment.percent(row["best_top1_mean"], row["best_top1_std"])
    lines.append(
      f"| {row['mixer']} | {row['preset']} | {final} | {best} | {row['params']:,} "
      f"| {row['macs'] / 1e6:.2f}M | {f'{speed:.0f}' if speed else '–'} "
      f"| {len(row['finished_seeds'])}/{len(s['seeds'])} |"
    )
  lines += [
    "",
    "Multiply-adds: patch embedding + per-layer mixer (the mixer's `macs`, "
    "token-token mixing included) + MLP + head; norms, activations and softmax "
    "not counted. Train images/s: the trainer's summary value, first step excluded.",
  ]
  failed = experiment.failures(report)
  if failed:
    lines += [""] + [f"- failed: {f}" for f in failed]
  return "\n".join(lines) + "\n"


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
  cli.define_output_file(
    "out", None, "Markdown table path (default bench_results/compare_<config>.md)."
  )
  cli.define_output_dir(
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


def settings(base, same_preset: bool, size: str) -> dict:
  """The comparison's settings, as the table's header and the JSON state them."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel

  return {
    "config_file": config_flags.get_config_filename(FLAGS["config"]),
    "dataset": base.dataset.name,
    "subset_classes": bool(base.dataset.classes),
    "train_per_class": base.dataset.train_per_class,
    "mixers": FLAGS.mixers,
    "seeds": list(range(FLAGS.seeds)),
    "size": None if same_preset else size,
    "same_preset": same_preset,
    "model": base.model if same_preset else None,
    "model_overrides": {k: v for k, v in train.model_kwargs(base).items() if k != "mixer"},
    "batch_size": base.batch_size,
    "steps": FLAGS.steps or (base.num_train_steps if base.num_train_steps > 0 else None),
    "epochs": base.num_epochs,
    "config_changes": cli.config_changes(FLAGS["config"], STATED),
  }


def describe_models(comparison: experiment.Experiment) -> None:
  """Each row's preset, parameters and multiply-adds, and the devices, from its built model."""
  for row in comparison.rows:
    model = row.run.model
    row.values.update(
      preset=row.config.model,
      params=row.run.num_params,
      macs=model_macs(model),
      macs_breakdown=model_macs_breakdown(model),
    )
  first = comparison.rows[0].run
  comparison.settings.update(
    classes=first.spec.num_classes,
    devices=int(first.mesh.devices.size),
    hardware=cli.hardware(cli.machine_info(), int(first.mesh.devices.size)),
  )


def main(argv):
  del argv  # no positional arguments: cli.run refuses them
  base, mixers, size = FLAGS.config, FLAGS.mixers, FLAGS.size
  same_preset = FLAGS["same-preset"].value
  workdir = FLAGS.workdir or os.path.join("workdirs", f"compare_{config_stem()}")
  table = FLAGS.out or os.path.join("bench_results", f"compare_{config_stem()}.md")
  # Everything that can fail on input fails here, before the first step.
  try:
    check_mixers(mixers, size, same_preset)
    rows = [
      experiment.Row(
        m,
        run_config(
          base, m, seeds=FLAGS.seeds, size=size, same_preset=same_preset, steps=FLAGS.steps
        ),
        {"mixer": m},
      )
      for m in mixers
    ]
    comparison = experiment.Experiment(
      directory=workdir,
      table=table,
      flag="--workdir",
      settings={**settings(base, same_preset, size), "workdir": workdir},
      rows=rows,
      render=format_table,
      overwrite=FLAGS.overwrite,
    )
    cli.output_file(table, "--out")  # the JSON goes next to it
    cli.output_dir(workdir, "--workdir")
    if FLAGS["compile-cache"].value:
      enable_compile_cache(os.path.join(workdir, "jax_cache"))
    experiment.quiet_trainer_log()
    experiment.prepare(comparison)
  except experiment.UsageError as e:
    cli.fail(str(e))
  describe_models(comparison)
  return experiment.run(comparison)


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
