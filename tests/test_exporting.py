"""lkca_jax.exporting: a model as one jax.export artifact, written, read back and called.

The artifact's logits are compared with the model's own on the same normalised images: the
same sums compiled apart, so within the float32 round-off bound of reordered sums
(`tests.helpers.assert_reordered`, over the model's reduction chain).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkca_jax import augment, backend, exporting
from lkca_jax.layers import LKCA
from lkca_jax.layers.common import DropPath
from lkca_jax.models import create_model
from tests.helpers import assert_reordered, chain_terms

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny(name, **overrides):
  """A two-block preset on 8×12 images, patch 2 (a 4×6 grid: height and width apart); LKCA's
  kernels drawn at random, so that they mix (the reference starts them at zero)."""
  if name.startswith("lkca"):
    overrides.setdefault("mixer_options", {"lkca": {"kernel_init": "gaussian"}})
  return create_model(
    name,
    num_classes=5,
    image_size=(8, 12),
    channels=3,
    patch_size=2,
    depth=2,
    rngs=nnx.Rngs(0),
    **overrides,
  )


def images(batch, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, 8, 12, 3), dtype=np.uint8)


def in_eval_mode(model):
  """A model with `model`'s parameters in eval mode, `model` left as it is."""
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return copy


def drop_paths(model):
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, DropPath)]


@pytest.mark.slow  # compiles a whole model
@pytest.mark.parametrize("name", ["lkca_t", "vit_1m", "vit_s16", "acmix_t", "flatten_t"])
def test_the_artifact_read_back_gives_the_eval_models_logits_at_any_batch_size(name, tmp_path):
  model = tiny(name, drop_path_rate=0.5)  # in train mode: blocks dropped at random
  exported = exporting.classifier(model, MEAN, STD, platforms=["cpu"])
  assert not any(d.deterministic for d in drop_paths(model)), "the caller's model changed mode"
  exporting.save(exported, tmp_path / "model.jax")
  loaded = exporting.load(tmp_path / "model.jax")
  reference = in_eval_mode(model)
  for batch in (1, 5):
    x = images(batch, seed=batch)
    logits = loaded.call(x)
    assert logits.shape == (batch, 5) and logits.dtype == jnp.float32
    assert_reordered(logits, reference(augment.normalize(x, MEAN, STD)), chain_terms(model))


@pytest.mark.slow  # lowers whole models for three platforms
def test_one_artifact_runs_the_cpu_forms_on_the_cpu_only_and_gives_float32_logits():
  model = tiny("vit_1m")  # MHSA, Linear, LayerNorm and GELU: each has a CPU form
  everywhere = exporting.classifier(model, MEAN, STD)
  assert everywhere.platforms == exporting.DEFAULT_PLATFORMS
  assert backend.CPU_SCOPE in everywhere.mlir_module()
  accelerators = exporting.classifier(model, MEAN, STD, platforms=["cuda", "tpu"]).mlir_module()
  assert backend.CPU_SCOPE not in accelerators
  assert "optimization_barrier" not in accelerators
  bfloat16 = exporting.classifier(tiny("lkca_t", dtype=jnp.bfloat16), MEAN, STD)
  assert [str(a.dtype) for a in bfloat16.out_avals] == ["float32"]
  assert [str(a.dtype) for a in bfloat16.in_avals] == ["uint8"]
  assert [str(d) for d in bfloat16.in_avals[0].shape] == [exporting.BATCH, "8", "12", "3"]


def test_lkca_takes_its_projections_merged_in_an_artifact_for_any_batch():
  """Its parameters are constants there: W_v W_o, a D×D by D×D product, is folded when the
  artifact compiles, so the merged form costs nothing per call even where an image has fewer
  tokens than channels (here 24 against 136). The caller's modules keep their own choice."""
  model = tiny("lkca_t")
  module = exporting.classifier(model, MEAN, STD, platforms=["cpu"]).mlir_module()
  weights = "(tensor<136x136xf32>, tensor<136x136xf32>) -> tensor<136x136xf32>"
  assert module.count(weights) == 2  # one a block
  assert [m.merge for _, m in nnx.iter_modules(model) if isinstance(m, LKCA)] == ["auto"] * 2


@pytest.mark.slow  # compiles a whole model
def test_the_artifacts_merged_weights_are_a_constant_of_the_compiled_program():
  """What the merged form costing nothing rests on: XLA folds W_v W_o when it compiles, so
  no instruction of the compiled program computes a 136×136 array."""
  exported = exporting.classifier(tiny("lkca_t"), MEAN, STD, platforms=["cpu"])
  one_image = jax.ShapeDtypeStruct((1, 8, 12, 3), jnp.uint8)
  program = jax.jit(exported.call).lower(one_image).compile().as_text()
  kinds = re.findall(r"= f32\[136,136\]\{[^}]*\} ([\w-]+)\(", program)
  assert sorted(set(kinds)) == ["constant", "parameter"], kinds


@pytest.mark.slow  # compiles a whole model
def test_a_fixed_batch_artifact_takes_that_batch_alone():
  model = tiny("lkca_t")
  exported = exporting.classifier(model, MEAN, STD, platforms=["cpu"], batch=3)
  assert list(exported.in_avals[0].shape) == [3, 8, 12, 3]
  x = images(3)
  assert_reordered(
    exported.call(x), in_eval_mode(model)(augment.normalize(x, MEAN, STD)), chain_terms(model)
  )
  with pytest.raises(ValueError, match="shape"):
    exported.call(images(2))


@pytest.mark.parametrize(
  "platforms, mean, std, batch, named",
  [
    (["gpu"], MEAN, STD, None, "platforms"),
    ([], MEAN, STD, None, "platforms"),
    (["cpu", "cpu"], MEAN, STD, None, "platforms"),
    (["cpu"], (0.5, 0.5), STD, None, "mean has 2 values"),
    (["cpu"], MEAN, (), None, "std has 0 values"),
    (["cpu"], MEAN, STD, 0, "batch must be"),
    (["cpu"], MEAN, STD, 2.0, "batch must be"),
  ],
  ids=[
    "unknown platform",
    "no platform",
    "a platform twice",
    "2 means",
    "no std",
    "batch 0",
    "2.0",
  ],
)
def test_bad_platforms_statistics_or_batch_are_refused_by_name(platforms, mean, std, batch, named):
  with pytest.raises(ValueError) as error:
    exporting.classifier(tiny("lkca_t"), mean, std, platforms=platforms, batch=batch)
  assert str(error.value).startswith(named), str(error.value)
