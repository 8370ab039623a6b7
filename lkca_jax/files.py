"""Files written whole or not at all.

Every file a run or a command produces (config.json, summary.json, tables,
JSON results, pictures) goes through `write_atomic`: the bytes land in a
temporary sibling that is then renamed over the target, so a crash or a
signal mid-write leaves the previous version (or nothing), never half a file.
"""

from __future__ import annotations

import json
import os
import uuid

from etils import epath


def write_atomic(path, data: str | bytes) -> epath.Path:
  """Writes `data` to `path` through a temporary sibling and a rename; returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    if isinstance(data, bytes):
      tmp.write_bytes(data)
    else:
      tmp.write_text(data)
    if "://" not in str(path):  # local: make the bytes durable before the rename publishes them
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_json(path, value) -> epath.Path:
  return write_atomic(path, json.dumps(value, indent=2) + "\n")


CACHE_ENV = "LKCA_JAX_CACHE_DIR"


def cache_dir() -> str:
  """lkca_jax's cache folder: $LKCA_JAX_CACHE_DIR, else lkca_jax under $XDG_CACHE_HOME or
  ~/.cache. What is kept there can be made again (the digits split, compiled programs)."""
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lkca_jax"
  )
