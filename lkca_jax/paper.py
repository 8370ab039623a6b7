"""The paper's published numbers, kept once: top-1 per dataset and the FLOPs it reports.

Li et al., arXiv 2401.05738, every model trained from scratch. `lkca_jax.tools.reproduce`
trains against `TOP1`, and the tables of README.md and docs/method.md are what
`top1_markdown()` and `flops_markdown()` render (tests/test_paper.py holds them equal).
Plain data: this module imports nothing of lkca_jax.
"""

from __future__ import annotations

import dataclasses

# The paper's results tables, in its column order: name → how the paper titles it.
TABLES = {
  "cifar10": "CIFAR-10",
  "cifar100": "CIFAR-100",
  "tinyimagenet": "Tiny-ImageNet",
  "svhn": "SVHN",
}
# The `config.dataset.name` each table's numbers are for (configs/<table>.py trains on it).
DATASETS = {
  "cifar10": "cifar10",
  "cifar100": "cifar100",
  "tinyimagenet": "tiny_imagenet",
  "svhn": "svhn",
}


@dataclasses.dataclass(frozen=True)
class Model:
  """One model of the paper: its preset here, its name there, its top-1 (%) per table."""

  preset: str
  name: str
  top1: dict[str, float]  # table → top-1 in %; a table the paper leaves it out of is absent
  baseline: str | None = None  # the ViT preset an LKCA model is set beside


TOP1 = (
  Model("vit_05m", "ViT/0.5M", {"cifar10": 87.83, "cifar100": 64.68, "tinyimagenet": 46.53}),
  Model(
    "lkca_05m",
    "ViT/0.5M-LKCA",
    {"cifar10": 90.94, "cifar100": 69.35, "tinyimagenet": 50.59},
    baseline="vit_05m",
  ),
  Model(
    "vit_1m",
    "ViT/1M (ViT-Lite)",
    {"cifar10": 91.16, "cifar100": 70.86, "tinyimagenet": 53.46, "svhn": 97.53},
  ),
  Model(
    "lkca_t",
    "ViT/1M-LKCA (LKCA-T)",
    {"cifar10": 92.49, "cifar100": 73.40, "tinyimagenet": 57.29, "svhn": 97.15},
    baseline="vit_1m",
  ),
  Model("vit_2m", "ViT/2M", {"cifar10": 92.32, "cifar100": 71.17, "tinyimagenet": 54.58}),
  Model(
    "lkca_2m",
    "ViT/2M-LKCA",
    {"cifar10": 93.55, "cifar100": 75.94, "tinyimagenet": 60.70},
    baseline="vit_2m",
  ),
  Model(
    "vit",
    "ViT (ViT-Small)",
    {"cifar10": 93.36, "cifar100": 72.65, "tinyimagenet": 55.74, "svhn": 97.90},
  ),
  Model(
    "lkca_b",
    "ViT-LKCA (LKCA-B)",
    {"cifar10": 94.11, "cifar100": 76.50, "tinyimagenet": 60.95, "svhn": 97.68},
    baseline="vit",
  ),
  Model("vit_4m", "ViT/4M", {"cifar10": 93.64, "cifar100": 72.82, "tinyimagenet": 56.16}),
  Model(
    "lkca_4m",
    "ViT/4M-LKCA",
    {"cifar10": 94.71, "cifar100": 76.95, "tinyimagenet": 62.30},
    baseline="vit_4m",
  ),
  Model("vit_8m", "ViT/8M", {"cifar10": 94.46, "cifar100": 73.39, "tinyimagenet": 57.39}),
  Model(
    "lkca_8m",
    "ViT/8M-LKCA",
    {"cifar10": 94.88, "cifar100": 78.57, "tinyimagenet": 63.38},
    baseline="vit_8m",
  ),
  Model("lkca_l", "LKCA-L", {"tinyimagenet": 63.43}),
)


@dataclasses.dataclass(frozen=True)
class Flops:
  """A FLOPs figure of the paper: multiply-adds of one image, the LKCA mixing not counted."""

  preset: str
  name: str
  input: str  # "cifar" (32×32, patch 4, 10 classes) or "tinyimagenet" (64×64, patch 8, 200)
  millions: float


INPUTS = {"cifar": "CIFAR (32×32)", "tinyimagenet": "Tiny-ImageNet (64×64)"}
FLOPS = (
  Flops("vit", "ViT", "cifar", 174.25),
  Flops("lkca_b", "ViT-LKCA", "cifar", 170.81),
  Flops("lkca_t", "LKCA-T", "tinyimagenet", 66.10),
  Flops("lkca_b", "LKCA-B", "tinyimagenet", 172.78),
  Flops("lkca_l", "LKCA-L", "tinyimagenet", 802.99),
)


def models(table: str) -> list[Model]:
  """The models the paper reports on `table`, in its order."""
  if table not in TABLES:
    raise KeyError(f"no table {table!r}; the paper's are {', '.join(TABLES)}")
  return [model for model in TOP1 if table in model.top1]


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def _rule(aligns: str) -> str:
  """The row under a header: "l" a left-aligned column, "r" a right-aligned one."""
  return "|" + "|".join("---" if a == "l" else "---:" for a in aligns) + "|"


def _pair(baseline, model, cell) -> str:
  """`cell` of the baseline and of the model joined by an arrow; "–" where neither has one."""
  cells = [cell(m) for m in (baseline, model) if m is not None]
  if all(c is None for c in cells):
    return "–"
  return " → ".join("–" if c is None else c for c in cells)


def top1_markdown() -> str:
  """The top-1 table: one row per ViT baseline → LKCA pair (or unpaired model), in %."""
  by_preset = {model.preset: model for model in TOP1}
  baselines = {model.baseline for model in TOP1}
  lines = [
    _row(["model", "presets", *TABLES.values()]),
    _rule("ll" + "r" * len(TABLES)),
  ]
  for model in TOP1:
    if model.preset in baselines:
      continue  # shown on its LKCA model's row
    base = by_preset[model.baseline] if model.baseline else None
    lines.append(
      _row(
        [
          _pair(base, model, lambda m: m.name),
          _pair(base, model, lambda m: f"`{m.preset}`"),
          *(
            _pair(base, model, lambda m, t=table: f"{m.top1[t]:.2f}" if t in m.top1 else None)
            for table in TABLES
          ),
        ]
      )
    )
  return "\n".join(lines) + "\n"


def flops_markdown() -> str:
  """The FLOPs table: model, preset, input, millions of multiply-adds."""
  lines = [_row(["model", "preset", "input", "FLOPs"]), _rule("lllr")]
  for f in FLOPS:
    lines.append(_row([f.name, f"`{f.preset}`", INPUTS[f.input], f"{f.millions:.2f}M"]))
  return "\n".join(lines) + "\n"
