"""Prepares a TFDS dataset ahead of training and prints the time and split sizes.

  python -m lkca_jax.tools.prepare --dataset cifar10 --manual_dir DIR --data_dir DIR

With --manual_dir, the dataset is prepared from the official files downloaded
by hand into DIR, with no network: cifar10: cifar-10-binary.tar.gz or
cifar-10-python.tar.gz; cifar100: cifar-100-binary.tar.gz or
cifar-100-python.tar.gz; svhn: train_32x32.mat and test_32x32.mat (plus
extra_32x32.mat for the extra split); tiny_imagenet: tiny-imagenet-200.zip (or
set $LKCA_TINY_IMAGENET_ZIP); imagenet2012: ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (required: ImageNet has no public download). Without
it, TFDS downloads them. The examples are
stored as array_record (--file_format, default), which training reads without
TensorFlow; tfrecord copies are read through TensorFlow. A dataset already
prepared in --data_dir is kept and its files checked; --force deletes that
version's prepared folder first and prepares it again (the way to repair a
file that is missing, cut short or corrupted). Every failure (a bad flag,
missing files, a download that cannot happen, a damaged prepared file) is one
`error:` line and exit code 2.
"""

from __future__ import annotations

import os
import time

from absl import flags

from lkca_jax.data.sources import DATASETS, DatasetUnavailableError, prepare
from lkca_jax.tools import cli

FLAGS = flags.FLAGS
TFDS_DATASETS = sorted(name for name, spec in DATASETS.items() if spec.tfds_name)


def define_flags() -> None:
  flags.DEFINE_enum("dataset", None, TFDS_DATASETS, "The dataset to prepare.")
  cli.define_output_dir("data_dir", None, "TFDS data dir (default: TFDS's own).")
  flags.DEFINE_string("manual_dir", None, "Dir holding the official files downloaded by hand.")
  flags.DEFINE_enum(
    "file_format",
    "array_record",
    ["array_record", "tfrecord"],
    "How TFDS stores the prepared examples; training reads array_record without TensorFlow.",
  )
  flags.DEFINE_bool(
    "force",
    False,
    "Delete the dataset's prepared folder (this version, in --data_dir) and prepare it again.",
  )


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  if FLAGS.dataset is None:
    cli.fail(f"--dataset is required: one of {', '.join(TFDS_DATASETS)}")
  if FLAGS.manual_dir is not None and not os.path.isdir(FLAGS.manual_dir):
    cli.fail(f"--manual_dir={FLAGS.manual_dir} is not a directory")
  if FLAGS.data_dir is not None:  # TFDS's own default is TFDS's to make
    cli.output_dir(FLAGS.data_dir, "--data_dir")
  start = time.perf_counter()
  try:
    sizes = prepare(
      FLAGS.dataset,
      data_dir=FLAGS.data_dir,
      manual_dir=FLAGS.manual_dir,
      file_format=FLAGS.file_format,
      force=FLAGS.force,
      manual_dir_flag="--manual_dir",
    )
  except DatasetUnavailableError as e:
    cli.fail(str(e))
  print(
    f"prepared {FLAGS.dataset} ({FLAGS.file_format}) in {time.perf_counter() - start:.1f} s: "
    + ", ".join(f"{split} {size:,}" for split, size in sorted(sizes.items())),
    flush=True,
  )


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
