"""lkca_jax.paper: the one copy of the paper's numbers, and the documents that show them."""

import importlib

import pytest

from lkca_jax import models, paper
from tests.helpers import ROOT


@pytest.mark.parametrize(
  "document, table",
  [
    ("README.md", paper.top1_markdown),
    ("docs/method.md", paper.top1_markdown),
    ("docs/method.md", paper.flops_markdown),
  ],
)
def test_documents_show_the_rendered_tables_verbatim(document, table):
  assert table() in (ROOT / document).read_text(encoding="utf-8")


def test_every_model_is_a_preset_and_every_pair_a_vit_beside_an_lkca_model():
  by_preset = {model.preset: model for model in paper.TOP1}
  assert len(by_preset) == len(paper.TOP1)  # one entry a preset
  for model in paper.TOP1:
    assert model.preset in models.PRESETS
    assert set(model.top1) <= set(paper.TABLES)
    if model.baseline is not None:
      assert models.PRESETS[model.preset].mixer == "lkca"
      assert models.PRESETS[model.baseline].mixer == "mhsa"
      # The pair is compared on the same tables.
      assert set(by_preset[model.baseline].top1) == set(model.top1)
  assert {f.preset for f in paper.FLOPS} <= set(models.PRESETS)


@pytest.mark.parametrize("table", list(paper.TABLES))
def test_every_table_has_a_config_training_its_dataset(table):
  config = importlib.import_module(f"configs.{table}").get_config()
  assert config.dataset.name == paper.DATASETS[table]
  assert paper.models(table)  # and the paper reports models on it


def test_a_table_the_paper_lacks_is_named_with_the_ones_it_has():
  with pytest.raises(KeyError, match="no table 'imagenet'; the paper's are cifar10, cifar100"):
    paper.models("imagenet")


def test_every_value_is_in_its_models_row_and_its_tables_column():
  lines = paper.top1_markdown().splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  assert cells[0][2:] == list(paper.TABLES.values())
  rows = {row[1]: row for row in cells[2:]}
  for model in paper.TOP1:
    row = next(row for presets, row in rows.items() if f"`{model.preset}`" in presets)
    side = row[1].split(" → ").index(f"`{model.preset}`")  # 0: the baseline, 1: its LKCA model
    for column, table in enumerate(paper.TABLES, start=2):
      values = row[column].split(" → ")
      expected = f"{model.top1[table]:.2f}" if table in model.top1 else "–"
      assert (values[side] if len(values) > 1 else values[0]) == expected, (model, table)
