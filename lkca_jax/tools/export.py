"""A trained run's model as one file that classifies images without lkca_jax.

    python -m lkca_jax.tools.export --workdir DIR [--out DIR/export/model.jax] \\
        [--checkpoint DIR/checkpoints/STEP] [--run K] [--average] [--platforms cpu,cuda,tpu] \\
        [--batch N]

The file is the `jax.export` serialization of the model's forward pass in eval mode
(`lkca_jax.exporting.classifier`), the parameters of the run's latest checkpoint (or of
--checkpoint; of run --run of a workdir that trained several; their moving average with
--average) inside it: uint8 images (B, H, W, C) as the test split holds them, at the run's
image size and any batch size B (--batch N: N only), normalised with the run's dataset
statistics, give float32 logits (B, classes), on each of --platforms. It needs jax and
flatbuffers (jax's serialization needs it), not lkca_jax, flax nor the workdir:

    from jax import export
    with open("model.jax", "rb") as f:
      forward = export.deserialize(f.read())
    logits = forward.call(images)  # numpy uint8 (B, H, W, C)

Beside it, <out>.json says what it holds: the model, the dataset and its classes, the input
shape, the statistics, the checkpoint, the platforms, the jax version that wrote it and the
artifact's SHA-256. Both files are written whole. Bad input (no training workdir, no
checkpoint that restores, a --run the workdir did not train, --average for a run that kept no
average, an unknown platform, an --out that is a directory or cannot be written) is one
`error:` line and exit code 2, before anything is exported or written.
"""

from __future__ import annotations

import hashlib

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
DEFAULT_NAME = "export/model.jax"  # under the workdir


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The workdir of a main.py run (needed).")
  cli.define_output_file("out", None, f"The artifact to write (default: <workdir>/{DEFAULT_NAME}).")
  flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (default: the latest in <workdir>)."
  )
  flags.DEFINE_integer(
    "run",
    0,
    "Of a workdir that trained several runs (num_runs, sweep): which (from 0).",
    lower_bound=0,
  )
  flags.DEFINE_bool(
    "average", False, "The moving average of the parameters (a run with ema_decay > 0)."
  )
  flags.DEFINE_list(
    "platforms", "cpu,cuda,tpu", "Where the artifact runs: cpu, cuda, rocm and tpu."
  )
  flags.DEFINE_integer(
    "batch",
    None,
    "The one batch size the artifact takes (default: any).",
    lower_bound=1,
  )


def json_shape(shape) -> list:
  """A shape for JSON: its sizes, the symbolic batch size by its name."""
  return [d if isinstance(d, int) else str(d) for d in shape]


def description(trained, exported, run: int, average: bool) -> dict:
  """What <out>.json says about the artifact."""
  import jax  # pylint: disable=import-outside-toplevel

  from lkca_jax import train  # pylint: disable=import-outside-toplevel
  from lkca_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  config, augment = trained.config, pipeline.augment_config(trained.config)
  (images,), (logits,) = exported.in_avals, exported.out_avals
  return {
    "model": config.model,
    "model_overrides": train.model_kwargs(config),
    "dataset": config.dataset.name,
    "classes": int(logits.shape[1]),
    "input": {"shape": json_shape(images.shape), "dtype": str(images.dtype)},
    "output": {"shape": json_shape(logits.shape), "dtype": str(logits.dtype)},
    "mean": list(augment.mean),
    "std": list(augment.std),
    "checkpoint": str(trained.checkpoint),
    "step": trained.step,
    "run": run,
    "average": average,
    "platforms": list(exported.platforms),
    "jax": jax.__version__,
  }


def main(argv) -> None:
  del argv
  from lkca_jax import exporting, files, train  # pylint: disable=import-outside-toplevel
  from lkca_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  try:
    platforms = exporting.check_platforms(FLAGS.platforms)
  except ValueError as e:
    cli.fail(f"--platforms: {e}")
  out = checked_out(FLAGS.workdir, FLAGS.out)
  try:
    trained = train.read_trained_run(
      FLAGS.workdir, checkpoint=FLAGS.checkpoint, run=FLAGS.run, average=FLAGS.average
    )
  except train.REPORTED_ERRORS as e:
    cli.fail_training(e)
  augment = pipeline.augment_config(trained.config)
  exported = exporting.classifier(
    trained.model, augment.mean, augment.std, platforms=platforms, batch=FLAGS.batch
  )
  artifact = bytes(exported.serialize())
  described = description(trained, exported, FLAGS.run, FLAGS.average)
  # Two files cannot be replaced at once: the digest ties the description to its artifact.
  described["sha256"] = hashlib.sha256(artifact).hexdigest()
  files.write_atomic(out, artifact)
  files.write_json(f"{out}.json", described)
  (images,), (logits,) = exported.in_avals, exported.out_avals
  print(
    f"wrote {out} ({out.stat().length / 2**20:.1f} MiB) and {out}.json: {trained.config.model} "
    f"at step {trained.step}, {images.dtype}{list(images.shape)} images to "
    f"{logits.dtype}{list(logits.shape)} logits on {', '.join(exported.platforms)}"
  )


def checked_out(workdir, out):
  """--out as a file this process can write (default: under `workdir`), once `workdir` is
  known to be a training workdir; else one `error:` line. Nothing is made for bad input."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  from lkca_jax import run_files  # pylint: disable=import-outside-toplevel

  if not workdir:
    cli.fail("--workdir is missing: pass the workdir of a main.py run")
  try:
    run_files.saved_config_json(workdir)
  except run_files.ConfigError as e:
    cli.fail(f"--workdir={workdir}: {e}")
  return cli.output_file(out or epath.Path(workdir) / DEFAULT_NAME, "--out")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
