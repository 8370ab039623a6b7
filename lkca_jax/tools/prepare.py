"""Prepares a TFDS dataset ahead of training and prints the time and split sizes.

  python -m lkca_jax.tools.prepare --dataset cifar10 --manual_dir DIR --data_dir DIR

With --manual_dir, the dataset is prepared from the official files downloaded
by hand into DIR, with no network: cifar10: cifar-10-binary.tar.gz or
cifar-10-python.tar.gz; cifar100: cifar-100-binary.tar.gz or
cifar-100-python.tar.gz; svhn: train_32x32.mat and test_32x32.mat (plus
extra_32x32.mat for the extra split); tiny_imagenet: tiny-imagenet-200.zip (or
set $LKCA_TINY_IMAGENET_ZIP). Without it, TFDS downloads them. The examples are
stored as array_record (--file_format, default), which training reads without
TensorFlow; tfrecord copies are read through TensorFlow. Every failure
(a bad flag, missing files, a download that cannot happen) is one `error:`
line and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from lkca_jax.data.sources import DATASETS, DatasetUnavailableError, prepare  # noqa: E402
from lkca_jax.tools import cli  # noqa: E402
from lkca_jax.tools.cli import fail  # noqa: E402

PROGRAM = "python -m lkca_jax.tools.prepare"
TFDS_DATASETS = sorted(name for name, spec in DATASETS.items() if spec.tfds_name)


def _define_flags() -> None:
  flags.DEFINE_enum("dataset", None, TFDS_DATASETS, "The dataset to prepare.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's own).")
  flags.DEFINE_string("manual_dir", None, "Dir holding the official files downloaded by hand.")
  flags.DEFINE_enum(
    "file_format",
    "array_record",
    ["array_record", "tfrecord"],
    "How TFDS stores the prepared examples; training reads array_record without TensorFlow.",
  )


def main(argv) -> None:
  args = flags.FLAGS
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; see `{PROGRAM} --helpfull`")
  if args.dataset is None:
    fail(f"--dataset is required: one of {', '.join(TFDS_DATASETS)}")
  if args.manual_dir is not None and not os.path.isdir(args.manual_dir):
    fail(f"--manual_dir={args.manual_dir} is not a directory")
  start = time.perf_counter()
  try:
    sizes = prepare(
      args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir, file_format=args.file_format
    )
  except DatasetUnavailableError as e:
    fail(str(e))
  print(
    f"prepared {args.dataset} ({args.file_format}) in {time.perf_counter() - start:.1f} s: "
    + ", ".join(f"{split} {size:,}" for split, size in sorted(sizes.items()))
  )
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  cli.run(main, PROGRAM)
