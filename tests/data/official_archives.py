"""Small archives in the byte layout of the official CIFAR-10, CIFAR-100, SVHN and ImageNet files.

Each writer puts real photos (the Tiny-ImageNet fixture's JPEGs, or 32x32
crops of them) into the file a user downloads by hand, with the official file
and folder names, and returns what it wrote: {split: (images (N, 32, 32, 3)
uint8, labels)}; ImageNet's: {split: {file name: JPEG bytes}}.
"""

import io
import pickle
import tarfile
import zipfile

import numpy as np
from PIL import Image

from tests.helpers import FIXTURE_ZIP, fixture_images

CIFAR10_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
CIFAR100_COARSE = (
  "aquatic_mammals",
  "fish",
  "flowers",
  "food_containers",
  "fruit_and_vegetables",
  "household_electrical_devices",
  "household_furniture",
  "insects",
  "large_carnivores",
  "large_man-made_outdoor_things",
  "large_natural_outdoor_scenes",
  "large_omnivores_and_herbivores",
  "medium_mammals",
  "non-insect_invertebrates",
  "people",
  "reptiles",
  "small_mammals",
  "trees",
  "vehicles_1",
  "vehicles_2",
)
CIFAR100_FINE = (
  "apple",
  "aquarium_fish",
  "baby",
  "bear",
  "beaver",
  "bed",
  "bee",
  "beetle",
  "bicycle",
  "bottle",
  "bowl",
  "boy",
  "bridge",
  "bus",
  "butterfly",
  "camel",
  "can",
  "castle",
  "caterpillar",
  "cattle",
  "chair",
  "chimpanzee",
  "clock",
  "cloud",
  "cockroach",
  "couch",
  "crab",
  "crocodile",
  "cup",
  "dinosaur",
  "dolphin",
  "elephant",
  "flatfish",
  "forest",
  "fox",
  "girl",
  "hamster",
  "house",
  "kangaroo",
  "keyboard",
  "lamp",
  "lawn_mower",
  "leopard",
  "lion",
  "lizard",
  "lobster",
  "man",
  "maple_tree",
  "motorcycle",
  "mountain",
  "mouse",
  "mushroom",
  "oak_tree",
  "orange",
  "orchid",
  "otter",
  "palm_tree",
  "pear",
  "pickup_truck",
  "pine_tree",
  "plain",
  "plate",
  "poppy",
  "porcupine",
  "possum",
  "rabbit",
  "raccoon",
  "ray",
  "road",
  "rocket",
  "rose",
  "sea",
  "seal",
  "shark",
  "shrew",
  "skunk",
  "skyscraper",
  "snail",
  "snake",
  "spider",
  "squirrel",
  "streetcar",
  "sunflower",
  "sweet_pepper",
  "table",
  "tank",
  "telephone",
  "television",
  "tiger",
  "tractor",
  "train",
  "trout",
  "tulip",
  "turtle",
  "wardrobe",
  "whale",
  "willow_tree",
  "wolf",
  "woman",
  "worm",
)


def crops(count: int, offset: int = 0) -> np.ndarray:
  """`count` distinct 32x32 RGB photos: the 4 quadrants of each fixture image."""
  rgb, _ = fixture_images()
  tiles = [image[y : y + 32, x : x + 32] for image in rgb for y in (0, 32) for x in (0, 32)]
  assert offset + count <= len(tiles), "the fixture has 272 crops"
  return np.stack(tiles[offset : offset + count]).astype(np.uint8)


def _chw_rows(images: np.ndarray) -> np.ndarray:
  """(N, 3072): the red plane, then green, then blue, each row-major (CIFAR's layout)."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def _pickle(obj) -> bytes:
  return pickle.dumps(obj, protocol=2)  # the official files are Python 2 pickles


def _split(counts: dict, label_sizes: tuple[int, ...], seed: int):
  """{key: (distinct crops, random labels (N, len(label_sizes)))}."""
  rng = np.random.default_rng(seed)
  out, offset = {}, 0
  for split, count in counts.items():
    labels = np.stack([rng.integers(0, size, count) for size in label_sizes], 1)
    out[split] = (crops(count, offset), labels)
    offset += count
  return out


def write_cifar10(folder, fmt: str, per_batch: int = 3, test: int = 5) -> dict:
  """cifar-10-{binary,python}.tar.gz with 5 train batches of `per_batch` and a test batch."""
  batches = _split({f"b{i}": per_batch for i in range(1, 6)} | {"test": test}, (10,), seed=10)
  path = folder / f"cifar-10-{fmt}.tar.gz"
  with tarfile.open(path, "w:gz") as archive:
    for key, (images, labels) in batches.items():
      stem = "test_batch" if key == "test" else f"data_batch_{key[1:]}"
      if fmt == "binary":
        rows = np.concatenate([labels.astype(np.uint8), _chw_rows(images)], axis=1)
        _add(archive, f"cifar-10-batches-bin/{stem}.bin", rows.tobytes())
      else:
        _add(
          archive,
          f"cifar-10-batches-py/{stem}",
          _pickle(
            {
              b"batch_label": f"{stem} of 5".encode(),
              b"labels": labels[:, 0].tolist(),
              b"data": _chw_rows(images),
              b"filenames": [b"x.png"] * len(images),
            }
          ),
        )
    if fmt == "binary":
      _add(
        archive,
        "cifar-10-batches-bin/batches.meta.txt",
        ("\n".join(CIFAR10_NAMES) + "\n\n").encode(),
      )
    else:
      _add(
        archive,
        "cifar-10-batches-py/batches.meta",
        _pickle(
          {
            b"label_names": [name.encode() for name in CIFAR10_NAMES],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
          }
        ),
      )
  train = [batches[f"b{i}"] for i in range(1, 6)]
  return {
    "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
    "test": batches["test"],
  }


def write_cifar100(folder, fmt: str, train: int = 12, test: int = 6) -> dict:
  """cifar-100-{binary,python}.tar.gz; labels are (coarse, fine) columns, as in the records."""
  splits = _split({"train": train, "test": test}, (20, 100), seed=100)
  path = folder / f"cifar-100-{fmt}.tar.gz"
  with tarfile.open(path, "w:gz") as archive:
    for split, (images, labels) in splits.items():
      if fmt == "binary":
        rows = np.concatenate([labels.astype(np.uint8), _chw_rows(images)], axis=1)
        _add(archive, f"cifar-100-binary/{split}.bin", rows.tobytes())
      else:
        _add(
          archive,
          f"cifar-100-python/{split}",
          _pickle(
            {
              b"filenames": [b"x.png"] * len(images),
              b"batch_label": f"{split} batch".encode(),
              b"fine_labels": labels[:, 1].tolist(),
              b"coarse_labels": labels[:, 0].tolist(),
              b"data": _chw_rows(images),
            }
          ),
        )
    if fmt == "binary":
      _add(
        archive,
        "cifar-100-binary/coarse_label_names.txt",
        ("\n".join(CIFAR100_COARSE) + "\n").encode(),
      )
      _add(
        archive, "cifar-100-binary/fine_label_names.txt", ("\n".join(CIFAR100_FINE) + "\n").encode()
      )
    else:
      _add(
        archive,
        "cifar-100-python/meta",
        _pickle(
          {
            b"fine_label_names": [n.encode() for n in CIFAR100_FINE],
            b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE],
          }
        ),
      )
  return splits


def write_svhn(folder, splits=("train", "test", "extra"), count: int = 7) -> dict:
  """{split}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) in 1..10, where 10 is the digit 0."""
  from scipy import io as scipy_io

  out = {}
  for k, split in enumerate(splits):
    images = crops(count, offset=k * count)
    digits = np.arange(k, k + count) % 10  # every split has a 0, stored as 10
    scipy_io.savemat(
      folder / f"{split}_32x32.mat",
      {
        "X": images.transpose(1, 2, 3, 0),
        "y": np.where(digits == 0, 10, digits).astype(np.uint8)[:, None],
      },
    )
    out[split] = (images, digits[:, None])
  return out


# --- ImageNet (ILSVRC 2012) --------------------------------------------------------
# The one training image that the official train tar holds as a PNG under a .JPEG name;
# TFDS's imagenet2012 builder re-encodes it as a JPEG.
IMAGENET_PNG = "n02105855_2933.JPEG"
IMAGENET_PNG_SIZE = (80, 64)  # width, height: not square, as most ImageNet photos
IMAGENET_VAL = 10  # ILSVRC2012_val_00000001.JPEG ... _00000010.JPEG


def _tar_bytes(members: dict[str, bytes]) -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as archive:
    for name, data in members.items():
      _add(archive, name, data)
  return out.getvalue()


def write_imagenet(folder) -> dict:
  """ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar laid out as the official ones.

  Train: one uncompressed tar per synset, n########.tar, of JPEGs n########_k.JPEG: the
  fixture's 4 classes (12 images each, one of them greyscale) and n02105855 holding only
  the PNG that the official tar has under a .JPEG name (an 80x64 fixture image). Val: flat
  JPEGs ILSVRC2012_val_%08d.JPEG, numbers 1..IMAGENET_VAL as the official file begins (its
  labels come from TFDS's own list, by sorted name), added in reverse order; the images are
  the fixture's validation JPEGs, so their content is not their label's class.
  """
  with zipfile.ZipFile(FIXTURE_ZIP) as archive:
    names = sorted(n for n in archive.namelist() if n.endswith(".JPEG"))
    jpegs = {n: archive.read(n) for n in names}
  synsets: dict[str, dict[str, bytes]] = {}
  for name, data in jpegs.items():
    parts = name.split("/")  # tiny-imagenet-200/train/<wnid>/images/<wnid>_<k>.JPEG
    if parts[1] == "train":
      synsets.setdefault(parts[2], {})[parts[4]] = data
  png = io.BytesIO()
  first = jpegs[names[0]]
  with Image.open(io.BytesIO(first)) as image:
    image.convert("RGB").resize(IMAGENET_PNG_SIZE, Image.Resampling.BICUBIC).save(png, "PNG")
  synsets[IMAGENET_PNG.split("_")[0]] = {IMAGENET_PNG: png.getvalue()}
  val_sources = [n for n in names if n.split("/")[1] == "val"][:IMAGENET_VAL]
  val = {f"ILSVRC2012_val_{k:08d}.JPEG": jpegs[n] for k, n in enumerate(val_sources, 1)}
  with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as archive:
    for wnid in sorted(synsets):
      _add(archive, f"{wnid}.tar", _tar_bytes(synsets[wnid]))
  with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as archive:
    for name in reversed(val):  # the builder must label by sorted name, not by tar order
      _add(archive, name, val[name])
  train = {name: data for members in synsets.values() for name, data in members.items()}
  return {"train": train, "validation": val}
