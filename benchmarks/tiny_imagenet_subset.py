"""Writes a Tiny-ImageNet zip that holds only the first K classes, in the official layout.

  python benchmarks/tiny_imagenet_subset.py --zip tiny-imagenet-200.zip --classes 20 \\
      --out DIR/tiny-imagenet-200.zip

The result is read by the same TFDS builder as the official zip (`lkca_jax.tools.prepare
--dataset tiny_imagenet --manual_dir DIR`), so a machine without the 240 MB original (the
GPU check's, which takes at most 64 MiB along) trains on real images through the usual
prepared-dataset path. Kept: wnids.txt whole (labels stay the official indices), the
train images of the first K wnids in wnids.txt order, and the validation images and
annotation lines of those wnids. Entries are stored, not deflated: JPEGs do not compress.
The subset is built in memory (22 MB for 20 classes) and written whole.
"""

from __future__ import annotations

import io
import zipfile

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
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


def subset_zip(archive: zipfile.ZipFile, members: list[str], annotations: bytes) -> bytes:
  """The subset zip's bytes: `members` copied from `archive`, and the cut annotations."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as subset:
    for name in members:
      subset.writestr(name, archive.read(name))
    subset.writestr(ROOT + "val/val_annotations.txt", annotations)
  return buffer.getvalue()


def define_flags() -> None:
  flags.DEFINE_string("zip", None, "The official tiny-imagenet-200.zip (required).")
  flags.DEFINE_integer("classes", 20, "Keep the first K wnids.")
  cli.define_output_file("out", None, "The subset zip to write (required).")


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  # Not flags.mark_flag_as_required: absl would report a missing flag before an unknown one.
  missing = [f"--{name}" for name in ("zip", "out") if getattr(FLAGS, name) is None]
  if missing:
    cli.fail(f"{' and '.join(missing)} required; see `{cli.program_name()} --help`")
  if not zipfile.is_zipfile(FLAGS.zip):
    cli.fail(f"--zip={FLAGS.zip} is not a zip file: give the official tiny-imagenet-200.zip")
  with zipfile.ZipFile(FLAGS.zip) as archive:
    try:
      members, annotations = kept_members(archive, FLAGS.classes)
    except ValueError as e:
      cli.fail(str(e))
    out = cli.output_file(FLAGS.out, "--out")  # once the input is known good
    cli.write_atomic(out, subset_zip(archive, members, annotations))
  print(f"{out}: {len(members) - 1} images of the first {FLAGS.classes} classes")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags)
