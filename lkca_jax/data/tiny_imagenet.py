"""TFDS builder for Tiny-ImageNet-200 (CS231n), which is not in the TFDS catalog.

Importing this module registers the builder, so `tfds.builder("tiny_imagenet")`
works afterwards. It reads the images straight out of `tiny-imagenet-200.zip`
(no extraction): from `<manual_dir>/tiny-imagenet-200.zip`, else from the file
named by $LKCA_TINY_IMAGENET_ZIP, else from the official download.

Splits: train (100,000, 500 per class) and validation (10,000, labels from
val/val_annotations.txt). Labels index the 200 wnids in wnids.txt order. RGB
JPEGs are stored byte for byte; the 1,989 grayscale ones are re-encoded as RGB
JPEGs at quality 100 (3 equal channels, within 1 level of the original decode:
measured over all 1,989).
"""

from __future__ import annotations

import io
import os
import zipfile

import tensorflow_datasets as tfds
from etils import epath

from lkca_jax.data.sources import MANUAL_DIR_FLAG, DatasetUnavailableError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
URLS = (URL,)  # what preparing without a local zip downloads
ZIP_NAME = "tiny-imagenet-200.zip"
ZIP_ENV = "LKCA_TINY_IMAGENET_ZIP"
IMAGE_SHAPE = (64, 64, 3)
_ROOT = "tiny-imagenet-200/"

# wnids.txt of the official zip, in file order: the label of wnid WNIDS[i] is i.
WNIDS = (
  "n02124075",
  "n04067472",
  "n04540053",
  "n04099969",
  "n07749582",
  "n01641577",
  "n02802426",
  "n09246464",
  "n07920052",
  "n03970156",
  "n03891332",
  "n02106662",
  "n03201208",
  "n02279972",
  "n02132136",
  "n04146614",
  "n07873807",
  "n02364673",
  "n04507155",
  "n03854065",
  "n03838899",
  "n03733131",
  "n01443537",
  "n07875152",
  "n03544143",
  "n09428293",
  "n03085013",
  "n02437312",
  "n07614500",
  "n03804744",
  "n04265275",
  "n02963159",
  "n02486410",
  "n01944390",
  "n09256479",
  "n02058221",
  "n04275548",
  "n02321529",
  "n02769748",
  "n02099712",
  "n07695742",
  "n02056570",
  "n02281406",
  "n01774750",
  "n02509815",
  "n03983396",
  "n07753592",
  "n04254777",
  "n02233338",
  "n04008634",
  "n02823428",
  "n02236044",
  "n03393912",
  "n07583066",
  "n04074963",
  "n01629819",
  "n09332890",
  "n02481823",
  "n03902125",
  "n03404251",
  "n09193705",
  "n03637318",
  "n04456115",
  "n02666196",
  "n03796401",
  "n02795169",
  "n02123045",
  "n01855672",
  "n01882714",
  "n02917067",
  "n02988304",
  "n04398044",
  "n02843684",
  "n02423022",
  "n02669723",
  "n04465501",
  "n02165456",
  "n03770439",
  "n02099601",
  "n04486054",
  "n02950826",
  "n03814639",
  "n04259630",
  "n03424325",
  "n02948072",
  "n03179701",
  "n03400231",
  "n02206856",
  "n03160309",
  "n01984695",
  "n03977966",
  "n03584254",
  "n04023962",
  "n02814860",
  "n01910747",
  "n04596742",
  "n03992509",
  "n04133789",
  "n03937543",
  "n02927161",
  "n01945685",
  "n02395406",
  "n02125311",
  "n03126707",
  "n04532106",
  "n02268443",
  "n02977058",
  "n07734744",
  "n03599486",
  "n04562935",
  "n03014705",
  "n04251144",
  "n04356056",
  "n02190166",
  "n03670208",
  "n02002724",
  "n02074367",
  "n04285008",
  "n04560804",
  "n04366367",
  "n02403003",
  "n07615774",
  "n04501370",
  "n03026506",
  "n02906734",
  "n01770393",
  "n04597913",
  "n03930313",
  "n04118538",
  "n04179913",
  "n04311004",
  "n02123394",
  "n04070727",
  "n02793495",
  "n02730930",
  "n02094433",
  "n04371430",
  "n04328186",
  "n03649909",
  "n04417672",
  "n03388043",
  "n01774384",
  "n02837789",
  "n07579787",
  "n04399382",
  "n02791270",
  "n03089624",
  "n02814533",
  "n04149813",
  "n07747607",
  "n03355925",
  "n01983481",
  "n04487081",
  "n03250847",
  "n03255030",
  "n02892201",
  "n02883205",
  "n03100240",
  "n02415577",
  "n02480495",
  "n01698640",
  "n01784675",
  "n04376876",
  "n03444034",
  "n01917289",
  "n01950731",
  "n03042490",
  "n07711569",
  "n04532670",
  "n03763968",
  "n07768694",
  "n02999410",
  "n03617480",
  "n06596364",
  "n01768244",
  "n02410509",
  "n03976657",
  "n01742172",
  "n03980874",
  "n02808440",
  "n02226429",
  "n02231487",
  "n02085620",
  "n01644900",
  "n02129165",
  "n02699494",
  "n03837869",
  "n02815834",
  "n07720875",
  "n02788148",
  "n02909870",
  "n03706229",
  "n07871810",
  "n03447447",
  "n02113799",
  "n12267677",
  "n03662601",
  "n02841315",
  "n07715103",
  "n02504458",
)


def find_zip(manual_dir=None) -> str | None:
  """The local zip: <manual_dir>/tiny-imagenet-200.zip, else $LKCA_TINY_IMAGENET_ZIP, else None."""
  if manual_dir is not None and os.path.isfile(os.path.join(manual_dir, ZIP_NAME)):
    return os.path.join(os.fspath(manual_dir), ZIP_NAME)
  env = os.environ.get(ZIP_ENV)
  if env:
    if not os.path.isfile(env):
      raise DatasetUnavailableError(
        f"dataset tiny_imagenet: {ZIP_ENV}={env} is not a file; point it at {ZIP_NAME} or unset it"
      )
    return env
  return None


def manual_dir_problem(manual_dir, tfds_name: str, flag: str) -> str | None:
  """Why preparing from manual_dir (given as `flag`) cannot work, or None; checked before
  any download starts."""
  del tfds_name
  if find_zip(manual_dir) is None:
    return (
      f"{flag}={manual_dir} holds no {ZIP_NAME}: put the official zip "
      f"there, or set ${ZIP_ENV} to its path"
    )
  return None


def manual_builder(tfds_name: str, manual_dir, data_dir):
  """The builder when a local zip is there (it reads it itself), else None: it downloads."""
  del tfds_name
  if find_zip(manual_dir) is None:
    return None
  return TinyImagenet(data_dir=data_dir)


def _as_rgb_jpeg(data: bytes) -> bytes:
  """JPEG bytes with 3 channels: RGB files pass through untouched (fast, lossless)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as image:
    if image.mode == "RGB":
      return data
    out = io.BytesIO()
    # Quality 100, 4:4:4: the luma plane is the original grey image, chroma is
    # exactly neutral, so the decode has 3 equal channels within 1 level of the source.
    image.convert("RGB").save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


def _check_wnids(archive: zipfile.ZipFile) -> None:
  found = tuple(archive.read(_ROOT + "wnids.txt").decode().split())
  if found != WNIDS:
    raise ValueError(
      f"{archive.filename}: wnids.txt differs from the official 200 wnids; "
      f"use the official {ZIP_NAME} ({URL})"
    )


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny-ImageNet-200: 64x64 RGB images of 200 ImageNet classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: train and validation splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Place the official {ZIP_NAME} ({URL}) in the manual dir, unextracted, "
    f"or set {ZIP_ENV} to its path."
  )
  # TFDS finds its checksums file next to the builder's code through the
  # top-level package, which fails while lkca_jax is a namespace package.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny-ImageNet-200 (CS231n): 64x64 images, 200 classes, "
      "500 train and 50 validation images per class.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=list(WNIDS)),
          "file_name": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="http://cs231n.stanford.edu/",
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # raised when the manual dir is missing or empty
      manual_dir = None
    local = find_zip(manual_dir)
    path = os.fspath(local or dl_manager.download(URL))
    if not zipfile.is_zipfile(path):  # e.g. a portal's or proxy's HTML page instead of the zip
      if local is None:  # no checksum to reject it by: drop it, or TFDS reuses it next time
        for junk in (path, path + ".INFO"):
          if os.path.exists(junk):
            os.remove(junk)
      raise DatasetUnavailableError(
        f"dataset tiny_imagenet: {path} is not a zip file: download the official {ZIP_NAME} "
        f"({URL}) by hand and pass its folder: {MANUAL_DIR_FLAG}=DIR (python -m "
        "lkca_jax.tools.prepare: --manual_dir DIR)"
      )
    return {
      "train": self._generate_examples(path, "train"),
      "validation": self._generate_examples(path, "validation"),
    }

  def _generate_examples(self, path, split):
    with zipfile.ZipFile(path) as archive:
      _check_wnids(archive)
      for file_name, wnid, member in _members(archive, split):
        yield (
          file_name,
          {
            "image": _as_rgb_jpeg(archive.read(member)),
            "label": wnid,
            "file_name": file_name,
          },
        )


def _members(archive: zipfile.ZipFile, split: str):
  """(file name, wnid, zip member) of every image of a split."""
  if split == "train":
    for member in archive.namelist():
      parts = member[len(_ROOT) :].split("/")  # train/<wnid>/images/<file>
      if (
        member.startswith(_ROOT + "train/")
        and len(parts) == 4
        and parts[2] == "images"
        and parts[3].endswith(".JPEG")
      ):
        yield parts[3], parts[1], member
  else:
    for line in archive.read(_ROOT + "val/val_annotations.txt").decode().splitlines():
      if line.strip():
        file_name, wnid = line.split("\t")[:2]
        yield file_name, wnid, _ROOT + "val/images/" + file_name
