"""A model as one `jax.export` artifact: images in, logits out, without lkca_jax.

`classifier(model, mean, std)` stages the model's forward pass in eval mode, its
parameters inside as constants, behind the normalisation the model trained with: uint8
images (B, H, W, C) at the model's image size, any batch size B (or the one `batch`), give
float32 logits (B, num_classes). `save` writes its serialization whole; a program with jax
(and flatbuffers, which jax's serialization needs) and nothing else reads it back and calls it:

    from jax import export
    with open("model.jax", "rb") as f:
      forward = export.deserialize(f.read())
    logits = forward.call(images)

One artifact serves several platforms: the layers choose their form when the computation
is lowered (`lkca_jax.backend.by_backend`), so the CPU forms run on the CPU and the plain
ones on GPUs and TPUs. jax reads an artifact written by the same or an older jax within its
compatibility window (about six months: jax's export documentation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lkca_jax import augment, files
from lkca_jax.layers import LKCA

# What `jax.export` lowers for: "cpu", "cuda", "rocm", "tpu".
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
BATCH = "batch"  # the name of the symbolic batch size in the artifact's input shape


def image_shape(model) -> tuple[int, int, int]:
  """(H, W, C) of the images `model` takes."""
  height, width = model.grid
  return height * model.patch_size, width * model.patch_size, model.channels


def check_platforms(platforms) -> tuple[str, ...]:
  """`platforms` as a tuple, each one `jax.export` lowers for, none twice; else ValueError."""
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms or len(set(platforms)) != len(platforms):
    raise ValueError(
      f"platforms must be distinct names among {', '.join(PLATFORMS)}, got {list(platforms)}"
    )
  return platforms


def classifier(
  model, mean, std, *, platforms=DEFAULT_PLATFORMS, batch: int | None = None
) -> jax.export.Exported:
  """The model's eval-mode forward pass, uint8 images normalised by `mean` and `std` (one
  value or one per channel, of [0, 1] pixels, as the dataset's config gives them) to float32
  logits, exported for `platforms`, for any batch size or only for `batch`. `model` is left
  as it is.

  The parameters are constants of the artifact, so LKCA's merged projections (W_v W_o) cost
  nothing per call (XLA multiplies them once, when it compiles): the artifact takes them
  merged at every batch size (`LKCA.merge`)."""
  platforms = check_platforms(platforms)
  if batch is not None and (not isinstance(batch, int) or batch < 1):
    raise ValueError(f"batch must be a positive int or None (any size), got {batch!r}")
  height, width, channels = image_shape(model)
  graphdef, state = nnx.split(model)
  frozen = nnx.merge(graphdef, state)  # a copy: eval mode here leaves the caller's model be
  frozen.eval()
  for _, module in nnx.iter_modules(frozen):
    if isinstance(module, LKCA):
      module.merge = "always"
  mean, std = tuple(mean), tuple(std)

  def forward(images):
    logits = frozen(augment.normalize(images, mean, std))
    return logits.astype(jnp.float32)

  if batch is None:
    (batch,) = jax.export.symbolic_shape(BATCH)
  images = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8)
  return jax.export.export(jax.jit(forward), platforms=platforms)(images)


def save(exported: jax.export.Exported, path):
  """Writes `exported`'s serialization to `path` whole (a temporary name, then a rename)."""
  return files.write_atomic(path, bytes(exported.serialize()))


def load(path) -> jax.export.Exported:
  """The artifact `save` wrote (what `jax.export.deserialize` gives for its bytes)."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))
