"""Writes a Tiny-ImageNet zip that holds only the first K classes, in the official layout.

  python benchmarks/tiny_imagenet_subset.py --zip tiny-imagenet-200.zip --classes 20 \
      --out DIR/tiny-imagenet-200.zip

The result is read by the same TFDS builder as the official zip (`lkca_jax.tools.prepare
--dataset tiny_imagenet --manual_dir DIR`), so a machine without the 240 MB original (the
GPU check's, which takes at most 64 MiB along) trains on real images through the usual
prepared-dataset path. Kept: wnids.txt whole (labels stay the official indices), the
train images of the first K wnids in wnids.txt order, and the validation images and
annotation lines of those wnids. Entries are stored, not deflated: JPEGs do not compress.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

ROOT = "tiny-imagenet-200/"


def kept_members(archive: zipfile.ZipFile, classes: int) -> tuple[list[str], bytes]:
  """The members to copy, and val_annotations.txt cut to the kept wnids."""
  wnids = archive.read(ROOT + "wnids.txt").decode().split()
  if not 1 <= classes <= len(wnids):
    raise ValueError(f"--classes={classes}: choose 1..{len(wnids)}")
  kept = set(wnids[:classes])
  members = [ROOT + "wnids.txt"]
  for name in archive.namelist():
    parts = name[len(ROOT) :].split("/")  # train/<wnid>/images/<file>
    if name.startswith(ROOT + "train/") and len(parts) == 4 and parts[1] in kept:
      if parts[2] == "images" and parts[3].endswith(".JPEG"):
        members.append(name)
  lines = []
  for line in archive.read(ROOT + "val/val_annotations.txt").decode().splitlines():
    fields = line.split("\t")
    if len(fields) >= 2 and fields[1] in kept:
      lines.append(line)
      members.append(ROOT + "val/images/" + fields[0])
  return members, ("\n".join(lines) + "\n").encode()


def write_subset(source: str, out: str, classes: int) -> int:
  """Writes the subset zip to `out` (through a temporary name); returns the image count."""
  tmp = out + ".partial"
  with zipfile.ZipFile(source) as archive:
    members, annotations = kept_members(archive, classes)
    try:
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as subset:
        for name in members:
          subset.writestr(name, archive.read(name))
        subset.writestr(ROOT + "val/val_annotations.txt", annotations)
    except BaseException:
      if os.path.exists(tmp):  # never a half-written zip beside the result
        os.remove(tmp)
      raise
  os.replace(tmp, out)
  return len(members) - 1


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error:` line on stderr and exit code 2."""

  def error(self, message):
    sys.stdout.flush()
    print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
    sys.exit(2)


def output_problem(out: str) -> str | None:
  """Why the subset zip cannot be written at `out`, before any work; None if it can."""
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out):
    return f"--out={out} is a directory: name the zip file to write"
  if not os.path.isdir(folder):
    return f"--out={out}: the folder {folder} does not exist; create it first"
  if not os.access(folder, os.W_OK):
    return f"--out={out}: the folder {folder} is not writable; choose another"
  return None


def main(argv=None) -> int:
  parser = Parser(description=__doc__.splitlines()[0])
  # Not required=True: argparse would report a missing flag before an unknown one.
  parser.add_argument("--zip", help="the official tiny-imagenet-200.zip (required)")
  parser.add_argument("--classes", type=int, default=20, help="keep the first K wnids")
  parser.add_argument("--out", help="the subset zip to write (required)")
  args = parser.parse_args(argv)
  missing = [f"--{name}" for name in ("zip", "out") if getattr(args, name) is None]
  if missing:
    parser.error(f"{' and '.join(missing)} required")
  problem = output_problem(args.out)
  if problem is None and not zipfile.is_zipfile(args.zip):
    problem = f"--zip={args.zip} is not a zip file: give the official tiny-imagenet-200.zip"
  if problem is None:
    try:
      count = write_subset(args.zip, args.out, args.classes)
    except ValueError as e:
      problem = str(e)
  if problem is not None:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  print(f"{args.out}: {count} images of the first {args.classes} classes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
