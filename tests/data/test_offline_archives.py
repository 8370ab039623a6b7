"""CIFAR-10, CIFAR-100 and SVHN prepared offline from the official files, and downloads that fail.

The archives (tests/data/official_archives.py) have the official names and
byte layouts and hold real photos; preparing them runs the real TFDS builders
with the network blocked. TFDS stores examples in its own order, so images are
compared as (image, label) multisets, and one by one through their TFDS ids.

A download that cannot happen is provoked through the proxy settings that
requests (and so TFDS) follows: a closed local port (refused), a name under
.invalid (does not resolve), a local HTTP server answering garbage (wrong
checksum) or 503 (server error). No real host is contacted.
"""

import collections
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lkca_jax import data
from lkca_jax.data.sources import DOWNLOAD_RETRIES
from tests.data import official_archives as archives
from tests.helpers import tfds_builder

CATALOG = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
MANUAL_FILES = {
  "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"),
  "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"),
  "svhn": ("train_32x32.mat", "test_32x32.mat"),
  "tiny_imagenet": ("tiny-imagenet-200.zip",),
}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
FAST_S = 10  # a download that cannot happen must fail well within this


def block_network(patch) -> None:
  """Any Python-level connection or DNS lookup fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  patch.setattr(socket.socket, "connect", refuse)
  patch.setattr(socket, "getaddrinfo", refuse)
  patch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_network(monkeypatch):
  block_network(monkeypatch)


def closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def proxy_env(proxy: str) -> dict[str, str]:
  return {**{name: proxy for name in PROXY_VARS}, "NO_PROXY": "", "no_proxy": ""}


def use_proxy(monkeypatch, proxy: str) -> None:
  for name, value in proxy_env(proxy).items():
    monkeypatch.setenv(name, value)


def rows(images, labels):
  """(image, label) pairs as sorted byte rows: equal iff the same multiset."""
  flat = np.concatenate(
    [images.reshape(len(images), -1), np.asarray(labels).reshape(len(images), -1).astype(np.uint8)],
    axis=1,
  )
  return flat[np.lexsort(flat.T[::-1])]


# --- the catalog builders and ours ---------------------------------------------
def test_catalog_builders_work_with_the_pinned_dependencies(tmp_path):
  """Reading the catalog's own checksums needs importlib_resources (in requirements.txt)."""
  for tfds_name in CATALOG.values():
    builder = tfds_builder(tfds_name, data_dir=tmp_path)
    assert type(builder).code_path.exists()
    assert type(builder).url_infos, f"{tfds_name}: no download checksums found"
    assert not builder.is_prepared()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_manual_builders_describe_the_catalog_dataset(name, tmp_path):
  from lkca_jax import adapters
  from lkca_jax.data import cifar, svhn

  catalog = tfds_builder(CATALOG[name], data_dir=tmp_path / "a")
  make = {
    "cifar10": lambda: cifar.ManualCifar10(
      archive="-", layout=cifar.CIFAR10.layouts[0], data_dir=tmp_path / "b"
    ),
    "cifar100": lambda: cifar.ManualCifar100(
      archive="-", layout=cifar.CIFAR100.layouts[1], data_dir=tmp_path / "b"
    ),
    "svhn": lambda: svhn.ManualSvhnCropped(files={}, data_dir=tmp_path / "b"),
  }[name]
  with adapters.tfds_without_bucket_metadata():  # as the project builds them
    manual = make()
  assert isinstance(manual, type(catalog))
  assert (manual.name, manual.version) == (catalog.name, catalog.version)
  assert manual.info.features.to_json() == catalog.info.features.to_json()
  for field in ("description", "citation", "homepage", "supervised_keys"):
    assert getattr(manual.info, field) == getattr(catalog.info, field), field
  assert type(manual).url_infos == type(catalog).url_infos
  # Ours stay unregistered: the name resolves to the catalog's builder.
  assert type(tfds_builder(CATALOG[name], data_dir=tmp_path)) is type(catalog)


def test_registry_names_the_files_the_builders_read():
  from lkca_jax.data import cifar, svhn

  assert data.DATASETS["cifar10"].manual_files == " or ".join(cifar.CIFAR10.file_names)
  assert data.DATASETS["cifar100"].manual_files == " or ".join(cifar.CIFAR100.file_names)
  assert data.DATASETS["svhn"].manual_files == " and ".join(svhn.REQUIRED.values())


# --- prepared offline ------------------------------------------------------------
CASES = {
  "cifar10-binary": ("cifar10", lambda d: archives.write_cifar10(d, "binary")),
  "cifar10-python": ("cifar10", lambda d: archives.write_cifar10(d, "python")),
  "cifar100-binary": ("cifar100", lambda d: archives.write_cifar100(d, "binary")),
  "cifar100-python": ("cifar100", lambda d: archives.write_cifar100(d, "python")),
  "svhn": ("svhn", archives.write_svhn),
  "svhn-no-extra": ("svhn", lambda d: archives.write_svhn(d, splits=("train", "test"))),
}
OFFICIAL_NAMES = {
  "cifar10": {"label": list(archives.CIFAR10_NAMES)},
  "cifar100": {
    "label": list(archives.CIFAR100_FINE),
    "coarse_label": list(archives.CIFAR100_COARSE),
  },
  "svhn": {"label": [str(digit) for digit in range(10)]},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def prepared(request, tmp_path_factory):
  """(dataset name, data_dir, what the archive holds), prepared from the manual dir offline."""
  name, write = CASES[request.param]
  tmp = tmp_path_factory.mktemp(request.param)
  manual = tmp / "manual"
  manual.mkdir()
  written = write(manual)
  with pytest.MonkeyPatch.context() as patch:
    block_network(patch)
    sizes = data.prepare(name, data_dir=tmp / "tfds", manual_dir=manual)
  assert sizes == {split: len(images) for split, (images, _) in written.items()}
  return name, tmp / "tfds", written


def test_prepared_splits_hold_exactly_the_archive_images(prepared, no_network):
  name, data_dir, written = prepared
  for split in ("train", "test"):
    images, labels = data.load_split(name, split, data_dir=data_dir, download=False)
    expected_images, expected_labels = written[split]
    assert images.shape == expected_images.shape and images.dtype == np.uint8
    # The training label is the last label column: CIFAR-100's fine label.
    np.testing.assert_array_equal(
      rows(images, labels), rows(expected_images, expected_labels[:, -1])
    )


def test_prepared_copy_is_the_catalog_dataset(prepared, tmp_path):
  """Loaded through the catalog's own builder: same name, version, features, splits, label names."""

  name, data_dir, written = prepared
  builder = tfds_builder(CATALOG[name], data_dir=data_dir)
  fresh = tfds_builder(CATALOG[name], data_dir=tmp_path)
  assert type(builder) is type(fresh) and builder.is_prepared()
  assert (builder.info.name, str(builder.info.version)) == (fresh.info.name, str(fresh.version))
  assert set(builder.info.splits) == set(written)
  # The feature spec (label names aside: the catalog reads them from the download) is the same.
  assert builder.info.features.to_json() == fresh.info.features.to_json()
  for key, official in OFFICIAL_NAMES[name].items():
    assert builder.info.features[key].names == official


def test_prepared_ids_and_labels_follow_the_catalog(prepared):
  """Each example's id ("test_00003") is its place in the archive, as the catalog numbers them."""

  name, data_dir, written = prepared
  builder = tfds_builder(CATALOG[name], data_dir=data_dir)
  images, labels = written["test"]
  keys = list(OFFICIAL_NAMES[name])[::-1]  # record order: CIFAR-100's coarse label, then fine
  seen = set()
  for example in builder.as_data_source("test"):  # prepared as array_record: no tf.data
    index = int(example["id"].decode().removeprefix("test_"))
    np.testing.assert_array_equal(example["image"], images[index])
    assert [int(example[key]) for key in keys] == labels[index].tolist()
    seen.add(index)
  assert seen == set(range(len(images)))


def test_download_true_prepares_from_the_manual_dir_offline(tmp_path, no_network):
  manual = tmp_path / "manual"
  manual.mkdir()
  written = archives.write_cifar10(manual, "python", per_batch=1, test=2)
  with pytest.raises(data.DatasetUnavailableError, match="downloading is off"):
    data.check_available("cifar10", data_dir=tmp_path / "tfds", manual_dir=manual)
  data.check_available("cifar10", data_dir=tmp_path / "tfds", manual_dir=manual, download=True)
  images, labels = data.load_split(
    "cifar10", "test", data_dir=tmp_path / "tfds", manual_dir=manual, download=True
  )
  np.testing.assert_array_equal(rows(images, labels), rows(*written["test"]))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_manual_dir_without_the_files_is_refused(name, tmp_path, no_network):
  (tmp_path / "cifar-10-batches-bin.zip").write_bytes(b"")
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_split(name, "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path, download=True)
  message = str(info.value)
  assert "\n" not in message and "--config.dataset.manual_dir" in message
  assert all(file in message for file in MANUAL_FILES[name])


def test_damaged_archive_is_one_clear_error(tmp_path, no_network):
  (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tarball")
  with pytest.raises(data.DatasetUnavailableError, match="not a readable .tar.gz"):
    data.prepare("cifar10", data_dir=tmp_path / "tfds", manual_dir=tmp_path)


def test_damaged_svhn_file_is_one_clear_error(tmp_path, no_network):
  archives.write_svhn(tmp_path, splits=("train",), count=2)
  (tmp_path / "test_32x32.mat").write_bytes(b"<html>not found</html>")
  with pytest.raises(data.DatasetUnavailableError, match="test_32x32.mat is not a MATLAB file"):
    data.prepare("svhn", data_dir=tmp_path / "tfds", manual_dir=tmp_path)


# --- downloads that cannot happen ---------------------------------------------------
def assert_offline_hint(message: str, name: str) -> None:
  assert "\n" not in message
  assert f"dataset {name}" in message
  assert "--config.dataset.manual_dir=DIR" in message and "--manual_dir DIR" in message
  assert all(file in message for file in MANUAL_FILES[name]), message


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tiny_imagenet"])
def test_refused_connection_fails_fast_naming_the_offline_route(name, tmp_path, monkeypatch):
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  port = closed_port()
  use_proxy(monkeypatch, f"http://127.0.0.1:{port}")
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_split(name, "train", data_dir=tmp_path, download=True)
  assert time.perf_counter() - start < FAST_S
  message = str(info.value)
  assert_offline_hint(message, name)
  assert f"127.0.0.1:{port} refused the connection" in message
  assert not (tmp_path / CATALOG.get(name, name)).exists()  # nothing half-prepared
  with pytest.raises(data.DatasetUnavailableError) as checked:  # what a run checks first
    data.check_available(name, data_dir=tmp_path, download=True)
  assert str(checked.value) == message


def test_unknown_host_fails_fast(tmp_path, monkeypatch):
  use_proxy(monkeypatch, "http://proxy.invalid:3128")  # .invalid never resolves (RFC 6761)
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError, match="proxy.invalid does not resolve") as info:
    data.prepare("cifar100", data_dir=tmp_path)
  assert time.perf_counter() - start < FAST_S
  assert_offline_hint(str(info.value), "cifar100")


class _Answer(http.server.BaseHTTPRequestHandler):
  """A proxy that answers every GET with a login page, or with 503."""

  status = 200
  requests: list  # every path asked for, shared with the test

  def do_GET(self):  # noqa: N802 (the name http.server calls)
    self.requests.append(self.path)
    body = b"<html>please log in</html>" if self.status == 200 else b""
    self.send_response(self.status)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def answering_proxy():
  """start(status) -> (the proxy's URL, the list of paths it is asked for)."""
  servers = []

  def start(status: int) -> tuple[str, list]:
    requests = []
    handler = type("Handler", (_Answer,), {"status": status, "requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}", requests

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


def test_wrong_checksum_fails_fast(tmp_path, monkeypatch, answering_proxy):
  # SVHN's URLs are plain http, so the local proxy serves them.
  url, requests = answering_proxy(200)
  use_proxy(monkeypatch, url)
  with pytest.raises(data.DatasetUnavailableError, match="has the wrong checksum") as info:
    data.prepare("svhn", data_dir=tmp_path)
  assert set(collections.Counter(requests).values()) == {1}, requests  # none asked again
  assert_offline_hint(str(info.value), "svhn")
  assert "http://ufldl.stanford.edu/housenumbers/" in str(info.value)


def test_a_reachable_download_passes_the_check_and_nothing_is_fetched(
  tmp_path, monkeypatch, answering_proxy
):
  url, requests = answering_proxy(200)
  use_proxy(monkeypatch, url)
  data.check_available("svhn", data_dir=tmp_path, download=True)  # the proxy answers
  assert requests == []  # connected to, asked for nothing
  assert not (tmp_path / "svhn_cropped").exists()


def test_server_errors_are_not_retried_for_minutes(tmp_path, monkeypatch, answering_proxy):
  url, requests = answering_proxy(503)
  use_proxy(monkeypatch, url)
  with pytest.raises(data.DatasetUnavailableError, match="download failed.*503") as info:
    data.prepare("svhn", data_dir=tmp_path)
  # Each file asked for at most 1 + DOWNLOAD_RETRIES times: TFDS on its own asks 11
  # times, over 3.5 minutes of backoff.
  assert requests and max(collections.Counter(requests).values()) <= 1 + DOWNLOAD_RETRIES
  assert_offline_hint(str(info.value), "svhn")


def test_tiny_imagenet_download_that_is_not_a_zip(tmp_path, monkeypatch, answering_proxy):
  """No checksum is known for the zip: a login page instead is refused, and not kept."""
  monkeypatch.delenv("LKCA_TINY_IMAGENET_ZIP", raising=False)
  use_proxy(monkeypatch, answering_proxy(200)[0])
  with pytest.raises(data.DatasetUnavailableError, match="is not a zip file") as info:
    data.prepare("tiny_imagenet", data_dir=tmp_path)
  assert "--config.dataset.manual_dir=DIR" in str(info.value)
  kept = [name for _, _, names in os.walk(tmp_path / "downloads") for name in names]
  assert not [name for name in kept if name.endswith((".zip", ".zip.INFO"))], kept


# --- the prepare command ----------------------------------------------------------------
def run_prepare(*args, env=None):
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, "-m", "lkca_jax.tools.prepare", *args],
    capture_output=True,
    text=True,
    env={**os.environ, **(env or {})},
    timeout=120,
  )
  return result, time.perf_counter() - start


def test_prepare_command_unreachable_download_is_one_line_exit_2(tmp_path):
  result, seconds = run_prepare(
    "--dataset",
    "cifar10",
    "--data_dir",
    str(tmp_path),
    env=proxy_env(f"http://127.0.0.1:{closed_port()}"),
  )
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: dataset cifar10 cannot be downloaded")
  assert_offline_hint(lines[0], "cifar10")
  assert seconds < 30  # interpreter and TFDS start included, on a loaded machine too


def prepare_offline(dataset: str, manual, data_dir):
  """The prepare command from `manual` into `data_dir`, where any download attempt would
  meet a closed port: preparing from local files must not need one."""
  result, _ = run_prepare(
    "--dataset",
    dataset,
    "--manual_dir",
    str(manual),
    "--data_dir",
    str(data_dir),
    env=proxy_env(f"http://127.0.0.1:{closed_port()}"),
  )
  return result


def test_prepare_command_names_its_own_flag_for_a_manual_dir_without_the_files(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  result = prepare_offline("cifar10", manual, tmp_path / "tfds")
  assert result.returncode == 2, result.stderr
  assert result.stderr == (
    f"error: dataset cifar10: --manual_dir={manual} holds no cifar-10-binary.tar.gz or "
    "cifar-10-python.tar.gz: put the official archive there, unextracted\n"
  )


@pytest.mark.slow
def test_prepare_command_offline_from_the_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  archives.write_cifar100(manual, "binary", train=3, test=2)
  result = prepare_offline("cifar100", manual, tmp_path / "tfds")
  assert result.returncode == 0, result.stderr
  assert "prepared cifar100 (array_record)" in result.stdout and "test 2, train 3" in result.stdout


@pytest.mark.parametrize("args", [["--dataset", "mnist"], ["--dataset", "svhn", "extra"]])
def test_prepare_command_bad_input_is_one_line_exit_2(args, tmp_path):
  result, _ = run_prepare(*args, "--data_dir", str(tmp_path))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
