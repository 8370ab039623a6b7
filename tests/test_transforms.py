"""Every preset under every JAX transform: grad, jvp, jacfwd, hessian, linearize, a
forward-over-reverse Hessian-vector product, vmap and jit, in float32 and bfloat16.
The compiled checks run one preset per mixer; a trace-only test shows that every other
preset's program is its representative's with other sizes.

Tolerances are float32 round-off bounds. An inner product of float32 values that each
went through reductions of L terms in all (summed along the longest path of the network)
is off by at most about L·u of the summed magnitudes, u = 2⁻²⁴; two evaluations that sum
in different orders, twice that; an inner product over n elements adds n·u. `chain_terms`
is L for a model; bfloat16 results are compared with a bound counted in 2⁻⁸ roundings of
the layer outputs instead.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lkca_jax import backend
from lkca_jax.models import PRESETS, create_model
from tests.helpers import chain_terms

U32, U16 = 2.0**-24, 2.0**-8
IMAGE = 8  # 8×8 images, patch 1 or 2: grids of 8×8 or 4×4 tokens


def model_of(name, *, depth=2, dtype=None, patch=1, **overrides):
  """The preset in eval mode: the function itself, no stochastic depth. Two blocks: the last
  block of a class-token model computes only the class token, the first every token."""
  model = create_model(
    name,
    num_classes=5,
    image_size=IMAGE,
    channels=3,
    patch_size=patch,
    depth=depth,
    dtype=dtype,
    rngs=nnx.Rngs(0),
    **overrides,
  )
  model.eval()
  return model


def images(seed, dtype=jnp.float32, batch=2):
  return jax.random.normal(jax.random.key(seed), (batch, IMAGE, IMAGE, 3)).astype(dtype)


def adjoint_gap(fn, x, tangent, cotangent):
  """(|<J·t, c> − <t, Jᵀ·c>|, Σ|t|·|Jᵀc| + |<J·t, c>|): jvp and vjp of `fn` must agree."""
  _, jvp = jax.jvp(fn, (x,), (tangent,))
  _, vjp = jax.vjp(fn, x)
  (pullback,) = vjp(cotangent.astype(jvp.dtype))
  forward = jnp.vdot(jvp.astype(jnp.float32), cotangent)
  backward = jnp.vdot(tangent.astype(jnp.float32), pullback.astype(jnp.float32))
  scale = jnp.vdot(jnp.abs(tangent), jnp.abs(pullback).astype(jnp.float32)) + jnp.abs(forward)
  return jnp.abs(forward - backward), scale, jvp


# One preset per structure runs the compiled checks below: one per mixer, and vit_s16 for
# MHSA with a qkv bias (DeiT's). The presets differ otherwise only in sizes (width, heads,
# MLP ratio, depth, patch size; the tests fix depth and patch) and constants, which the
# transforms do not branch on: `test_every_preset_traces_to_its_representatives_program`
# shows that each preset's differentiated program is a representative's, sizes aside.
REPRESENTATIVES = ("lkca_t", "vit_1m", "vit_s16", "acmix_t", "flatten_t")
FORMS = ("cpu", "plain")


def adjoint_gap_of(model):
  """`adjoint_gap` of the model, as a function of its state, for jit or make_jaxpr."""
  graphdef, state = nnx.split(model)
  return lambda state, x, t, c: adjoint_gap(nnx.merge(graphdef, state), x, t, c), state


# Where the printed program holds a size: array shapes, literal operands (a mean's divisor,
# an attention scale) and the parameters that are shapes or channel counts. Everything else,
# the operations, their order and operands, axes, dimension numbers and dtypes, stays.
SIZE_TEXT = (
  r"(\b(?:bool|bf16|[fiu]\d{1,2})\[)[\d,]+(\])",
  r"()-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(:)",
  r"(\b(?:new_sizes|feature_group_count|reps|start_indices|limit_indices|shape)=)"
  r"(?:\([\d, ]*\)|\d+)()",
)


def programs_without_sizes(name, batch):
  """{layer form: the printed jaxpr of `adjoint_gap` on the two-block preset, sizes replaced
  by '#'}. Abstract throughout: nothing is initialised or compiled."""
  step, state = adjoint_gap_of(nnx.eval_shape(lambda: model_of(name)))
  x = jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, 3), jnp.float32)
  c = jax.ShapeDtypeStruct((batch, 5), jnp.float32)
  programs = {}
  for form in FORMS:
    with backend.forms(form):
      text = str(jax.make_jaxpr(step)(state, x, x, c))
    # One line, however the printer broke it (it breaks long lines; sizes change lengths).
    text = re.sub(r"(?<=[\[(]) | (?=[\])])", "", " ".join(text.split()))
    for pattern in SIZE_TEXT:
      text = re.sub(pattern, r"\1#\2", text)
    programs[form] = text
  return programs


def test_every_preset_traces_to_its_representatives_program():
  """Each preset's program is the same operations on the same operands as one of its mixer's
  representatives', in both layer forms: so the compiled checks of the representatives
  hold for every preset, up to the round-off of other sizes (which their bounds scale with).
  A preset that adds structure (mixer options, a pattern, other pooling) fails here until
  it gets a representative of its own.

  One size does change the program: LKCA with one kernel per layer merges its two
  projections where a call's tokens outnumber its width. Batch 1 (64 tokens) is below every
  preset's width, batch 8 (512 tokens) above; the compiled checks run both."""
  assert set(REPRESENTATIVES) <= set(PRESETS)
  for batch in (1, 8):
    programs = {name: programs_without_sizes(name, batch) for name in PRESETS}
    for form in FORMS:  # the abstraction keeps the structures apart
      assert len({programs[rep][form] for rep in REPRESENTATIVES}) == len(REPRESENTATIVES)
    for name, preset in PRESETS.items():
      own = [programs[rep] for rep in REPRESENTATIVES if PRESETS[rep].mixer == preset.mixer]
      assert programs[name] in own, (name, batch)


def cpu_form_programs(name, dtype):
  """(the forward's printed jaxpr, jvp's tangent, the forward's jaxpr under
  `reverse_mode_only`), all in the CPU forms, traced abstractly for a two-block preset."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_of(name, dtype=dtype)))
  x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), dtype)

  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  def tangent(state, x):
    return jax.jvp(lambda x: apply(state, x), (x,), (x,))[1]

  def program():  # traced afresh each call: JAX caches traces by function, not by the mark
    return str(jax.make_jaxpr(lambda state, x: apply(state, x))(state, x))

  with backend.forms("cpu"):
    plain = program()
    jvp = jax.eval_shape(tangent, state, x)
    with backend.reverse_mode_only():
      marked = program()
  return plain, jvp, marked


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_every_preset_takes_jvp_and_only_the_trainers_gradient_reaches_a_custom_vjp(dtype):
  """Forward mode through every preset in the CPU forms, the only ones with hand-written
  reverse passes (`custom_vjp`): outside `backend.reverse_mode_only()` the program holds
  none, and jvp traces with the model's dtype. Under the mark, which only the trainer's
  gradient enters, bfloat16 programs do hold them (float32 ones do not), so a leak of the
  mark's forms into the default path would fail the first assertion."""
  for name in PRESETS:
    plain, jvp, marked = cpu_form_programs(name, dtype)
    assert "custom_vjp" not in plain, name
    assert jvp.dtype == dtype, name
    assert ("custom_vjp" in marked) == (dtype == jnp.bfloat16), name


@pytest.mark.parametrize("name", sorted(REPRESENTATIVES))
def test_every_preset_has_forward_and_reverse_derivatives_that_agree(name):
  """jvp is the adjoint of vjp, in each layer form, and the two forms' jvps agree. One
  preset per mixer: the others trace to the same programs (test above)."""
  model = model_of(name)
  step, state = adjoint_gap_of(model)
  x, t = images(1), images(2)
  c = jax.random.normal(jax.random.key(3), (2, 5))
  terms = chain_terms(model)
  jvps = {}
  for form in FORMS:
    with backend.forms(form):
      gap, scale, jvps[form] = jax.jit(step)(state, x, t, c)
    sums = terms + x.size  # the model's round-off, then the inner product over the input
    assert float(gap) <= 2 * sums * U32 * float(scale), (form, gap, scale)
  bound = 2 * terms * U32 * float(jnp.abs(jvps["plain"]).max())
  assert float(jnp.abs(jvps["cpu"] - jvps["plain"]).max()) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("mixer_preset", ["lkca_t", "vit_1m", "acmix_t", "flatten_t"])
def test_bfloat16_models_differentiate_forward_and_back_in_bfloat16(mixer_preset):
  x, t = images(1), images(2)
  model32, model16 = model_of(mixer_preset), model_of(mixer_preset, dtype=jnp.bfloat16)
  _, jvp32 = jax.jit(lambda x, t: jax.jvp(model32, (x,), (t,)))(x, t)
  _, jvp16 = jax.jit(lambda x, t: jax.jvp(model16, (x,), (t,)))(
    x.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  )
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32) ** 2)))(model16, x)
  assert jvp16.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  # The model rounds its layer outputs to bf16: the patch embedding and position add, per
  # block 9 (norm, mixer in and out, residual, norm, MLP in, GELU, MLP out, residual), the
  # final norm and head; once in the primal and once in the tangent, each by at most 2⁻⁸,
  # carried at unit gain (the layers roughly keep their inputs' scale).
  roundings = 2 * (4 + 9 * len(model16.blocks))
  error = float(jnp.abs(jvp16.astype(jnp.float32) - jvp32).max())
  assert error <= roundings * U16 * float(jnp.abs(jvp32).max())


TINY = dict(dim=8, num_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lkca_t", "vit_1m", "vit_s16", "acmix_t", "flatten_t"])
def test_hessian_jacfwd_linearize_and_hvp_on_a_tiny_model(name):
  patch = 2
  model = model_of(name, patch=patch, **TINY)
  terms = chain_terms(model)
  x = images(4, batch=1)
  labels = jnp.array([3])

  def loss(x):
    return jnp.mean(-jax.nn.log_softmax(model(x))[jnp.arange(1), labels])

  v = images(5, batch=1)

  @jax.jit  # one program holds every transform: each is still its own computation in it
  def transforms(x, v):
    out, linear_fn = jax.linearize(model, x)
    return dict(
      jac_fwd=jax.jacfwd(model)(x),
      jac_rev=jax.jacrev(model)(x),
      hessian=jax.hessian(loss)(x),
      forward_over_reverse=jax.jvp(jax.grad(loss), (x,), (v,))[1],
      reverse_over_reverse=jax.grad(lambda x, v: jnp.vdot(jax.grad(loss)(x), v))(x, v),
      out=out,
      linear=linear_fn(v),
      jvp=jax.jvp(model, (x,), (v,))[1],
    )

  r = transforms(x, v)
  bound = 2 * terms * U32 * float(jnp.abs(r["jac_rev"]).max())
  assert float(jnp.abs(r["jac_fwd"] - r["jac_rev"]).max()) <= bound

  hessian = r["hessian"].reshape(x.size, x.size)
  h_scale = float(jnp.abs(hessian).max())
  assert h_scale > 0
  assert float(jnp.abs(hessian - hessian.T).max()) <= 4 * terms * U32 * h_scale  # symmetric

  by_matrix = (hessian @ v.reshape(-1)).reshape(x.shape)
  hvp_bound = 4 * terms * U32 * h_scale * float(jnp.abs(v).sum())
  for hvp in (r["forward_over_reverse"], r["reverse_over_reverse"]):
    assert float(jnp.abs(hvp - by_matrix).max()) <= hvp_bound

  direct = jax.jit(model)(x)  # another program: the same values to round-off
  assert float(jnp.abs(r["out"] - direct).max()) <= 2 * terms * U32 * float(jnp.abs(direct).max())
  assert float(jnp.abs(r["linear"] - r["jvp"]).max()) <= bound * float(jnp.abs(v).max())


def test_vmapped_per_example_gradients_are_each_examples():
  model = model_of("lkca_t", patch=2, **TINY)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = images(6, batch=3)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x[None]) ** 2)

  per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)
  terms = chain_terms(model)
  one_example = jax.jit(jax.grad(loss))
  for i in range(3):
    alone = one_example(params, x[i])
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(alone), strict=True):
      bound = 2 * terms * U32 * max(float(jnp.abs(b).max()), 1e-30)
      assert float(jnp.abs(a[i] - b).max()) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lkca_05m", "vit_05m", "vit_s16", "acmix_t", "flatten_t"])
def test_parameter_tangents_are_the_adjoint_of_parameter_gradients(name):
  """jvp and vjp with respect to every parameter, in one jit, in both layer forms."""
  model = model_of(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
  tangent = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)
  x, c = images(1), jax.random.normal(jax.random.key(3), (2, 5))
  apply = lambda p: nnx.merge(graphdef, p, rest)(x)

  def gap(params, tangent, c):
    _, jvp = jax.jvp(apply, (params,), (tangent,))
    (grads,) = jax.vjp(apply, params)[1](c)
    pairs = list(zip(jax.tree.leaves(tangent), jax.tree.leaves(grads), strict=True))
    backward = sum(jnp.vdot(t, g) for t, g in pairs)
    scale = sum(jnp.vdot(jnp.abs(t), jnp.abs(g)) for t, g in pairs)
    return jnp.abs(jnp.vdot(jvp, c) - backward), scale

  @jax.jit  # both forms in one program: each traced under its own pin
  def gaps(params, tangent, c):
    by_form = {}
    for form in FORMS:
      with backend.forms(form):
        by_form[form] = gap(params, tangent, c)
    return by_form

  terms = chain_terms(model)
  sums = terms + sum(p.size for p in jax.tree.leaves(params))  # and the sum over parameters
  for form, (difference, scale) in gaps(params, tangent, c).items():
    assert float(difference) <= 2 * sums * U32 * float(scale), (form, difference, scale)
