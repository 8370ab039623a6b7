"""Whole splits of an array_record-prepared TFDS dataset, decoded without TensorFlow.

TFDS stores each example as a serialized `tf.train.Example`. TFDS ships its own
copy of that proto, so the records parse with protobuf alone; the image bytes
(PNG or JPEG) decode with PIL. PIL and TensorFlow decode JPEGs with the same
libjpeg defaults (integer DCT, fancy upsampling), so the arrays equal those of
the TensorFlow path pixel for pixel (tests/data/test_records.py).

Each split file is read whole and checked against the number of examples the
dataset's metadata lists for it; `count_records` finds a missing, cut short or
corrupted file cheaply (array_record: its footer; tfrecord: its record headers),
and every such problem is a `DamagedFileError` naming the file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import struct

import numpy as np

# PIL releases the GIL while it decodes, so threads overlap the decoding.
DECODE_THREADS = min(8, os.cpu_count() or 1)
# Images of many sizes are brought to one as the ImageNet evaluation of DeiT/timm does
# (their `eval_crop_ratio` / `crop_pct`): the shorter side scaled to size / 0.875 (256 for
# 224), bicubic, then the centre size x size.
CROP_FRACTION = 0.875
_MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode; what TF's decode_*(channels=C) gives
# A tfrecord record: uint64 length, uint32 CRC of the length, the data, uint32 CRC of the data.
_TFRECORD_HEADER = 12
_TFRECORD_FOOTER = 4


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """Where one prepared split's records are, and what its examples hold (from its metadata)."""

  paths: tuple[str, ...]
  num_examples: int
  file_format: str  # "array_record" or "tfrecord"
  image_key: str
  label_key: str
  image_shape: tuple  # as stored: (H, W, C), None where the images differ

  def source(self):
    """grain's random-access reader of the records (array_record files only)."""
    import grain  # pylint: disable=import-outside-toplevel

    return grain.sources.ArrayRecordDataSource(list(self.paths))


class DamagedFileError(Exception):
  """A prepared split file that is missing, cut short or corrupted; `reason` says which."""

  def __init__(self, path, reason: str):
    super().__init__(f"{path} {reason}")
    self.path = os.fspath(path)
    self.reason = reason


def count_records(path, file_format: str) -> int:
  """How many records the file holds, read cheaply; DamagedFileError if it cannot say."""
  if not os.path.exists(path):
    raise DamagedFileError(path, "is missing")
  if file_format == "array_record":
    reader = _array_record_reader(path)
    try:
      return reader.num_records()  # from the footer: nothing else is read
    finally:
      reader.close()
  if file_format == "tfrecord":
    return _count_tfrecords(path)
  raise ValueError(f"cannot count the records of a {file_format} file")


def read_array_record(path, expected: int) -> list[bytes]:
  """All records of an array_record file; DamagedFileError unless it holds `expected` whole."""
  if not os.path.exists(path):
    raise DamagedFileError(path, "is missing")
  reader = _array_record_reader(path)
  try:
    found = reader.read_all()
  except RuntimeError as e:  # Riegeli's hash checks: a byte changed or the file was cut
    raise DamagedFileError(path, f"is corrupted ({_one_line(e)})") from None
  finally:
    reader.close()
  if len(found) != expected:
    raise DamagedFileError(path, f"holds {len(found)} examples, not the {expected} listed for it")
  return found


def _array_record_reader(path):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  try:
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
  except RuntimeError as e:
    raise DamagedFileError(path, f"cannot be opened ({_one_line(e)})") from None
  if not reader.ok():  # a cut file opens, but its footer is gone: reading says why
    try:
      reader.read_all()
      reason = "cannot be opened"
    except RuntimeError as e:
      reason = f"is cut short or corrupted ({_one_line(e)})"
    raise DamagedFileError(path, reason)
  return reader


def _count_tfrecords(path) -> int:
  """Walks the record headers (no TensorFlow); the last record must end where the file ends."""
  size = os.path.getsize(path)
  count = offset = 0
  with open(path, "rb") as f:
    while offset < size:
      header = f.read(_TFRECORD_HEADER)
      length = struct.unpack("<Q", header[:8])[0] if len(header) == _TFRECORD_HEADER else size
      end = offset + _TFRECORD_HEADER + length + _TFRECORD_FOOTER
      if end > size:
        raise DamagedFileError(
          path,
          f"is cut short or corrupted: record {count + 1} starts at byte {offset} "
          f"but does not end within the file's {size} bytes",
        )
      offset = end
      f.seek(offset)
      count += 1
  return count


def _one_line(error: BaseException, limit: int = 300) -> str:
  return " ".join(str(error).split())[:limit]


def decode_split(
  builder, split: str, shape: tuple[int, int, int], *, crop: bool = False, classes: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
  """A split of an array_record builder as (uint8 images (K, *shape), int32 labels (K,), N):
  its N examples, or with `classes` > 0 the K of labels below it (only their images are
  decoded).

  With `crop`, images of any size are brought to `shape` by `centre_crop`; without,
  every image must have that shape. Raises DamagedFileError when a file of the split
  is missing, cut short or corrupted.
  """
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  image_key, label_key = builder.info.supervised_keys
  info = builder.info.splits[split]
  records = [
    record
    for path, expected in zip(info.filepaths, info.shard_lengths, strict=True)
    for record in read_array_record(path, expected)
  ]
  features = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
  all_labels = np.asarray([f[label_key].int64_list.value[0] for f in features], np.int32)
  kept = np.flatnonzero(all_labels < classes) if classes else np.arange(len(records))
  images = np.empty((len(kept), *shape), np.uint8)
  mode = _MODES[shape[-1]]

  def decode_range(start: int, stop: int) -> None:
    for i in range(start, stop):
      images[i] = _decode_image(features[kept[i]][image_key].bytes_list.value[0], mode, shape, crop)

  chunk = -(-len(kept) // DECODE_THREADS) if len(kept) else 1
  with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
    futures = [
      pool.submit(decode_range, start, min(start + chunk, len(kept)))
      for start in range(0, len(kept), chunk)
    ]
    for future in futures:
      future.result()  # re-raises a decoding error
  return images, all_labels[kept], len(records)


def _decode_image(data: bytes, mode: str, shape: tuple[int, int, int], crop: bool) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as image:
    image = image if image.mode == mode else image.convert(mode)
    pixels = centre_crop(image, shape[:2]) if crop else np.asarray(image)
  if pixels.shape[:2] != shape[:2]:
    raise ValueError(
      f"an image is {pixels.shape[1]}x{pixels.shape[0]}, expected {shape[1]}x{shape[0]}"
    )
  return pixels.reshape(shape)


def centre_crop(image, size: tuple[int, int]) -> np.ndarray:
  """A PIL image as uint8 pixels (height, width, ...) = size: the shorter side scaled to
  int(max(size) / CROP_FRACTION) with bicubic filtering, the other keeping the aspect, then
  the centre cut out (torchvision's Resize and CenterCrop, which DeiT's evaluation uses)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  height, width = size
  short = int(max(size) / CROP_FRACTION)
  if image.width <= image.height:
    new = (short, int(short * image.height / image.width))
  else:
    new = (int(short * image.width / image.height), short)
  resized = image.resize(new, Image.Resampling.BICUBIC)
  top = int(round((new[1] - height) / 2.0))
  left = int(round((new[0] - width) / 2.0))
  return np.asarray(resized.crop((left, top, left + width, top + height)))
