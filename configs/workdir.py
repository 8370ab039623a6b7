"""The config a `main.py` run trained with, read back from its workdir's config.json.

    python main.py --config configs/workdir.py:WORKDIR --mode eval
    python -m lkca_jax.tools.analyze --config configs/workdir.py:WORKDIR

Every key of configs/default.py, typed as there, takes the value the run saved, so the
overrides it trained with need no retyping; `--config.KEY=VALUE` still applies on top (a
data path on another machine, say). The workdir defaults to WORKDIR itself
(`lkca_jax.tools.cli.default_workdir`); running `main.py` in train mode resumes that run.
"""

import ml_collections

from configs import default
from lkca_jax import run_files


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  if not workdir:
    raise ValueError("configs/workdir.py reads a run's config: pass configs/workdir.py:WORKDIR")
  return run_files.saved_config(workdir, default.get_config())
