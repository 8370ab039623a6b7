"""Prepares a TFDS dataset ahead of training and prints the time and split sizes.

  python -m lkca_jax.tools.prepare --dataset tiny_imagenet --manual_dir DIR --data_dir DIR

DIR for --manual_dir holds tiny-imagenet-200.zip (or set $LKCA_TINY_IMAGENET_ZIP);
without either, the builder downloads the official zip.
"""
from __future__ import annotations

import argparse
import time

from lkca_jax.data.sources import DATASETS, prepare


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True,
                      choices=sorted(n for n, s in DATASETS.items() if s.tfds_name))
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's own)")
  parser.add_argument("--manual_dir", default=None, help="dir holding manually downloaded files")
  parser.add_argument("--file_format", default="tfrecord", choices=["tfrecord", "array_record"])
  args = parser.parse_args(argv)
  start = time.perf_counter()
  sizes = prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                  file_format=args.file_format)
  print(f"prepared {args.dataset} ({args.file_format}) in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{split} {size:,}" for split, size in sorted(sizes.items())))


if __name__ == "__main__":
  main()
