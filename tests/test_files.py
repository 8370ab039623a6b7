"""write_atomic: a write that fails (here a file-size limit, as a full disk would) leaves the
previous file byte for byte and no temporary sibling."""

import json
import subprocess
import sys

from tests.helpers import ROOT

LIMIT = 4096  # bytes a process may write to one file: the old summary fits, the new does not
# Python ignores SIGXFSZ, so a write past the limit is an OSError (EFBIG), not a killed process.
WRITE_OVER_THE_LIMIT = f"""
import errno, resource, sys
from lkca_jax import files

resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
  files.write_json(sys.argv[1], {{"step": 2, "losses": [0.5] * 10_000}})
except OSError as e:
  print(errno.errorcode[e.errno])
else:
  print("written")
"""


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text(json.dumps({"step": 1, "losses": [0.7]}) + "\n")
  before = path.read_bytes()
  result = subprocess.run(
    [sys.executable, "-c", WRITE_OVER_THE_LIMIT, str(path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["EFBIG"]  # the new summary (over 50 kB) could not be written
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
