"""The mixer contract, checked for every entry of `MIXERS`: registering a mixer is enough for
it to get every test here (as timm's tests run over its model registry).

Shapes, gradients, bfloat16, grids, option names, size-matched presets, and `macs`: equal to
the products of the lowered forward, and its width-squared terms to XLA's own flop count.
Values particular to one mixer (float64 references, parameter counts) live in that mixer's
test file; the published cost table is checked at the end.
"""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from lkca_jax import backend
from lkca_jax.layers import MIXER_ARGS, MIXERS, option_names
from lkca_jax.models import PRESETS, count_params, create_model
from lkca_jax.tools import compare
from tests.helpers import assert_reordered

NAMES = sorted(MIXERS)
BATCH = 2
DIM, HEADS = 8, 2
GRID = (3, 5)  # non-square, so a swapped h and w shows


def num_tokens(name, grid=GRID) -> int:
  """What the mixer sees in a model: the patch tokens, plus a class token unless grid-bound."""
  return grid[0] * grid[1] + (0 if MIXERS[name].needs_grid else 1)


def build(name, *, dim=DIM, grid=GRID, heads=HEADS, seed=0, **kwargs):
  return MIXERS[name](dim, grid, num_heads=heads, rngs=nnx.Rngs(seed), **kwargs)


def tokens(name, seed=0, dtype=jnp.float32, dim=DIM):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(BATCH, num_tokens(name), dim)), dtype)


def randomise(module, seed=0):
  """Adds N(0, 0.1²) to every parameter: zero inits (LKCA's kernel, biases, FLatten's
  position table) would otherwise leave some gradients exactly zero."""
  rng = np.random.default_rng(seed)
  params = nnx.state(module, nnx.Param)
  nnx.update(
    module, jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params)
  )
  return module


def max_rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --- what a mixer class declares ----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_declares_the_contract_attributes(name):
  cls = MIXERS[name]
  assert isinstance(cls.needs_grid, bool)
  assert isinstance(inspect.getattr_static(cls, "macs"), staticmethod)
  assert isinstance(cls.size_presets, dict) and isinstance(cls.config_options, dict)
  params = list(inspect.signature(cls.__init__).parameters)
  assert params[1:3] == ["dim", "grid"] and set(MIXER_ARGS) <= set(params)


@pytest.mark.parametrize("name", NAMES)
def test_macs_takes_the_constructor_options(name):
  cls = MIXERS[name]
  params = inspect.signature(cls.macs).parameters
  assert list(params)[:3] == ["num_tokens", "dim", "num_heads"]
  if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
    assert set(option_names(cls) or []) <= set(params)


@pytest.mark.parametrize("name", NAMES)
def test_config_exposes_exactly_the_declared_options(name):
  cls = MIXERS[name]
  valid = option_names(cls)
  assert valid is None or set(cls.config_options) <= set(valid)
  assert all(
    kind in (str, int, float, bool)
    or (isinstance(kind, tuple) and all(isinstance(v, str) for v in kind))
    for kind in cls.config_options.values()
  )
  exposed = default.get_config().model_overrides.mixer_options[name]
  assert sorted(exposed) == sorted(cls.config_options)
  assert all(value is None for value in exposed.values())  # unset: the mixer's default


SIZED = [(name, size) for name in NAMES for size in sorted(MIXERS[name].size_presets)]


@pytest.mark.parametrize("name, size", SIZED)
def test_size_presets_are_this_mixers_at_the_lkca_budget(name, size):
  preset, lkca = MIXERS[name].size_presets[size], MIXERS["lkca"].size_presets[size]
  assert PRESETS[preset].mixer == name
  assert PRESETS[preset].mlp_ratio == PRESETS[lkca].mlp_ratio
  assert PRESETS[preset].dim % PRESETS[preset].num_heads == 0
  assert compare.SIZE_PRESETS[size][name] == preset

  def build_preset(preset_name):
    return create_model(preset_name, num_classes=10, image_size=32, rngs=nnx.Rngs(0))

  model = nnx.eval_shape(lambda: build_preset(preset))
  budget = count_params(nnx.eval_shape(lambda: build_preset(lkca)))
  # Width is the only knob at a fixed depth, so counts land near, not on, the budget: the
  # farthest is the paper's own vit_1m at +3.2%.
  assert abs(count_params(model) - budget) / budget < 0.04
  # The preset's forward traces to logits (traced, not compiled: the small models above run).
  graphdef, state = nnx.split(model)
  logits = jax.eval_shape(
    lambda state, x: nnx.merge(graphdef, state)(x),
    state,
    jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32),
  )
  assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32


def test_compare_size_presets_are_exactly_the_declared_ones():
  declared = {
    (size, name, preset) for name in NAMES for size, preset in MIXERS[name].size_presets.items()
  }
  assert {
    (size, name, preset)
    for size, row in compare.SIZE_PRESETS.items()
    for name, preset in row.items()
  } == declared


# --- the module ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_dtype(name):
  module = randomise(build(name))
  out = module(tokens(name))
  assert out.shape == (BATCH, num_tokens(name), DIM) and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_and_nonzero_for_input_and_every_parameter(name):
  module = randomise(build(name))
  x = tokens(name)
  # A random cotangent weighs every output position and channel differently.
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) * cotangent)

  param_grads, input_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert bool(jnp.isfinite(input_grad).all()) and float(jnp.abs(input_grad).max()) > 0
  for path, g in jax.tree_util.tree_leaves_with_path(param_grads):
    assert bool(jnp.isfinite(g).all()), jax.tree_util.keystr(path)
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(MIXERS[n], "mix_first")])
def test_mix_first_is_the_first_rows_of_the_output_in_value_and_gradient(name):
  """The optional `mix_first(x, count)` (a class-token model's last block calls it) is
  `mixer(x)[:, :count]`, and so are the gradients of every parameter and of x."""
  assert not MIXERS[name].needs_grid  # the block gives grid mixers' prefix tokens zeros
  module = randomise(build(name))
  x, count = tokens(name), 2
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, count, DIM)), jnp.float32)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(first_rows):
    return lambda params, x: jnp.vdot(first_rows(nnx.merge(graphdef, params, rest), x), cotangent)

  by_rows, sliced = lambda m, x: m.mix_first(x, count), lambda m, x: m(x)[:, :count]
  rows, want_rows = (jax.jit(f)(module, x) for f in (by_rows, sliced))
  grads, want_grads = (
    jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, x) for f in (by_rows, sliced)
  )
  # The same sums in other orders: twice L·u of the magnitudes, L the products over the width
  # and the inner width, the sum over tokens and, for the gradients, over the cotangent.
  terms = 2 * DIM + x.shape[1] + cotangent.size
  assert rows.shape == (BATCH, count, DIM)
  assert_reordered(rows, want_rows, terms)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    assert_reordered(g, w, terms)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_activations_stay_bfloat16_and_close_to_float32(name):
  module = randomise(build(name, dtype=jnp.bfloat16))
  reference = randomise(build(name))  # same seeds: the same parameters in float32
  x = tokens(name, seed=4)
  out = module(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
  # bf16 keeps an 8-bit mantissa (~0.4% a rounding), a few roundings per output; each
  # mixer's own file bounds it tighter where it can.
  assert max_rel_err(out.astype(jnp.float32), reference(x)) < 5e-2


ATTENTION = [name for name in NAMES if hasattr(MIXERS[name], "attention_weights")]


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_weights_are_distributions_over_the_tokens_it_mixes(name):
  """Non-negative float32 (B, H, T, T) rows summing to at most 1 (within the rounding of T
  terms): a softmax's to 1, FLatten's to S / (S + T·ε) for S = Σ_m q·k_m, far below 1 for a
  query that ReLU zeroed."""
  module = randomise(build(name))
  n = num_tokens(name)
  weights = jax.jit(lambda x: module.attention_weights(x))(tokens(name, seed=1))
  assert weights.shape == (BATCH, HEADS, n, n) and weights.dtype == jnp.float32
  assert float(weights.min()) >= 0
  sums = np.asarray(weights, np.float64).sum(axis=-1)
  assert sums.max() <= 1 + 2 * n * 2.0**-24 and sums.min() > 0
  assert isinstance(MIXERS[name].attention_kind, str)


@pytest.mark.parametrize("name", NAMES)
def test_tokens_of_another_width_or_without_a_batch_axis_are_one_line_naming_the_fix(name):
  module = build(name)
  tokens = GRID[0] * GRID[1] if MIXERS[name].needs_grid else "N"
  with pytest.raises(ValueError) as info:
    module(jnp.ones((BATCH, GRID[0] * GRID[1], 2 * DIM)))
  assert f"expects tokens of shape (B, {tokens}, {DIM})" in str(info.value)
  assert f"build the mixer with dim={2 * DIM}" in str(info.value)
  with pytest.raises(ValueError, match=re.escape("give it (batch, tokens, channels)")):
    module(jnp.ones((GRID[0] * GRID[1], DIM)))


@pytest.mark.parametrize("name", NAMES)
def test_grid_mixers_check_their_grid_and_others_take_any_token_count(name):
  if MIXERS[name].needs_grid:
    module = build(name)
    with pytest.raises(ValueError, match=rf"\(B, 15, {DIM}\) for its 3x5 grid.*class token excl"):
      module(jnp.ones((BATCH, 16, DIM)))
    for grid in [(0, 4), (4, 0)]:
      with pytest.raises(ValueError, match="grid must be positive"):
        build(name, grid=grid)
  else:
    module = build(name)
    for n in (1, 7):
      assert module(jnp.ones((BATCH, n, DIM))).shape == (BATCH, n, DIM)


@pytest.mark.parametrize("name", NAMES)
def test_head_count_that_does_not_divide_the_width_is_refused_or_unused(name):
  try:
    module = build(name, heads=3)
  except ValueError as e:
    assert re.search(r"dim \(8\) divisible by num_heads \(3\)", str(e))
    return
  out = module(tokens(name))
  assert out.shape == (BATCH, num_tokens(name), DIM) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("option", ["no_such_option", "num_heads"])
def test_unknown_option_is_a_value_error_naming_mixer_option_and_valid_ones(name, option):
  valid = option_names(MIXERS[name])
  message = (
    f"bad mixer_options for '{name}': unknown option '{option}'; valid options of '{name}': {valid}"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    create_model(
      "lkca_05m",
      num_classes=5,
      image_size=16,
      rngs=nnx.Rngs(0),
      dim=16,
      depth=1,
      mixer=name,
      mixer_options={name: {option: 1}},
    )


@pytest.mark.parametrize("name", NAMES)
def test_inside_create_model_every_parameter_gets_a_gradient(name):
  model = create_model(
    "lkca_t",
    num_classes=10,
    image_size=16,
    rngs=nnx.Rngs(0),
    mixer=name,
    dim=16,
    depth=1,
    num_heads=4,
  )
  assert model.pool == ("mean" if MIXERS[name].needs_grid else "cls")
  assert all(isinstance(block.mixer, MIXERS[name]) for block in model.blocks)
  randomise(model)
  model.eval()
  images = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, 16, 16, 3)), jnp.float32)

  def loss(m):
    logits = m(images)
    return jnp.sum(logits**2), logits

  (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.shape == (BATCH, 10) and bool(jnp.isfinite(logits).all())
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  mixer_tokens = model.grid[0] * model.grid[1] + (0 if MIXERS[name].needs_grid else 1)
  assert compare.model_macs_breakdown(model)["mixers"] == MIXERS[name].macs(mixer_tokens, 16, 4)


# --- multiply-adds ------------------------------------------------------------------------
def xla_flops(name, dim, grid, heads) -> float:
  """XLA's flop count of the jitted forward on one image, from the HLO as lowered.

  The lowered program, not the compiled one: XLA:CPU's rewrites change the count (FLatten's
  full-precision dots count ~15% off after compilation), and `macs` counts the program as
  written. No arrays are allocated.
  """
  module = nnx.eval_shape(lambda: build(name, dim=dim, grid=grid, heads=heads))
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jax.ShapeDtypeStruct((1, num_tokens(name, grid), dim), jnp.float32)
  cost = forward.lower(state, x).cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


# StableHLO as jax prints it: one op a line, ending in its operand and result types. The
# products are dot_general and convolution; `call @f` runs a private function's ops again.
FUNCTION = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
CALL = re.compile(r"\bcall @([\w.$-]+)\(")
SHAPE = re.compile(r"tensor<((?:\d+x)*)(?:[a-z]+\d*|complex<[a-z0-9]+>)>")


def _shapes(line: str) -> list[list[int]]:
  return [[int(d) for d in dims.split("x") if d] for dims in SHAPE.findall(line.split(" : ")[-1])]


def product_macs(line: str) -> int:
  """The multiply-adds of one dot_general or convolution line (0 for any other op)."""
  if "stablehlo.dot_general" in line:
    lhs, _, out = _shapes(line)
    contracted = re.search(r"contracting_dims = \[([\d, ]*)\] x", line).group(1)
    return math.prod(out) * math.prod(lhs[int(i)] for i in contracted.split(",") if i.strip())
  if "stablehlo.convolution" in line:
    _, kernel, out = _shapes(line)
    kernel_dims = re.search(r"x\[([\w, ]+)\]->", line).group(1).split(", ")
    # Each output element takes every tap of its group's kernel: all kernel dims but `o`.
    return math.prod(out) * math.prod(
      d for d, k in zip(kernel, kernel_dims, strict=True) if k != "o"
    )
  return 0


def lowered_macs(text: str) -> int:
  """The multiply-adds of the products of a lowered module, from `main`, calls followed."""
  own, calls, function = {}, {}, None
  for line in text.splitlines():
    if match := FUNCTION.match(line):
      function = match.group(1)
      own[function], calls[function] = 0, []
    elif function is not None:
      own[function] += product_macs(line)
      calls[function] += CALL.findall(line)

  def total(name):
    return own[name] + sum(total(callee) for callee in calls[name])

  return total("main")


def lowered_forward(name, dim, grid, heads) -> str:
  """The jitted forward on one image as lowered in the plain forms (the program as written,
  as GPU and TPU take it: the CPU runs FLatten's depthwise convolution as element-wise
  multiply-adds), as text."""
  module = nnx.eval_shape(lambda: build(name, dim=dim, grid=grid, heads=heads))
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jax.ShapeDtypeStruct((1, num_tokens(name, grid), dim), jnp.float32)
  with backend.forms("plain"):
    return forward.lower(state, x).as_text()


def test_the_lowered_products_are_counted():
  # A 2x3 by 3x4 product, then two calls of f: a 1-channel 3x3 convolution onto 5x5 outputs.
  text = "\n".join(
    [
      "func.func public @main(%arg0: tensor<2x3xf32>) -> tensor<2x4xf32> {",
      "  %0 = stablehlo.dot_general %arg0, %arg1, contracting_dims = [1] x [0], precision = "
      "[DEFAULT, DEFAULT] : (tensor<2x3xf32>, tensor<3x4xf32>) -> tensor<2x4xf32>",
      "  %1 = call @f(%0) : (tensor<2x4xf32>) -> tensor<2x4xf32>",
      "  %2 = call @f(%1) : (tensor<2x4xf32>) -> tensor<2x4xf32>",
      "}",
      "func.func private @f(%arg0: tensor<2x4xf32>) -> tensor<2x4xf32> {",
      "  %0 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->"
      "[b, 0, 1, f], window = {stride = [1, 1]} {feature_group_count = 1 : i64} : "
      "(tensor<1x5x5x1xf32>, tensor<3x3x1x1xf32>) -> tensor<1x5x5x1xf32>",
      "}",
    ]
  )
  assert lowered_macs(text) == 2 * 3 * 4 + 2 * 25 * 9


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim, grid", [(16, GRID), (128, GRID), (32, (4, 4))])
def test_macs_equal_the_products_of_the_lowered_forward(name, dim, grid):
  # `macs` counts every product of a Linear, matmul or convolution and nothing else: exactly
  # the dot_general and convolution ops of the program as written. (XLA:CPU's rewrites change
  # the compiled program's count; element-wise work is left out by definition.)
  n = num_tokens(name, grid)
  assert lowered_macs(lowered_forward(name, dim, grid, HEADS)) == MIXERS[name].macs(n, dim, HEADS)


@pytest.mark.parametrize("name", NAMES)
def test_macs_width_squared_terms_equal_xla_exactly(name):
  # At fixed N and H, element-wise work is linear in D (softmax: constant), so the second
  # difference over D, 2D, 3D keeps only the products' D² terms, which must match exactly.
  n, base = num_tokens(name), 16
  flops = [xla_flops(name, k * base, GRID, HEADS) for k in (1, 2, 3)]
  macs = [MIXERS[name].macs(n, k * base, HEADS) for k in (1, 2, 3)]
  assert flops[2] - 2 * flops[1] + flops[0] == 2 * (macs[2] - 2 * macs[1] + macs[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sizes", [(0, 192, 12), (64, 0, 12), (64, 192, 0)])
def test_macs_refuse_sizes_no_module_has(name, sizes):
  with pytest.raises(ValueError, match="positive sizes"):
    MIXERS[name].macs(*sizes)


@pytest.mark.parametrize("name", NAMES)
def test_macs_is_an_int_that_grows_with_tokens_and_width(name):
  macs = MIXERS[name].macs
  assert isinstance(macs(64, 192, 12), int)
  assert macs(64, 192, 12) < macs(65, 192, 12) and macs(64, 192, 12) < macs(64, 204, 12)


# --- the published cost table (docs/method.md, "Peer mixers") ---------------------------
# Column N = 64, D = 192, in millions (one decimal). FLatten's count depends on the head dim:
# the column is FLatten-DeiT-T's 3 heads (d = 64).
@pytest.mark.parametrize(
  "name, heads, millions",
  [("mhsa", 12, 11.0), ("lkca", 12, 5.5), ("acmix", 12, 12.3), ("flatten", 3, 11.3)],
)
def test_published_column_at_64_tokens_width_192(name, heads, millions):
  assert round(MIXERS[name].macs(64, 192, heads) / 1e6, 1) == millions


def test_only_flatten_depends_on_heads():
  assert MIXERS["mhsa"].macs(64, 192, 3) == MIXERS["mhsa"].macs(64, 192, 12)
  assert MIXERS["flatten"].macs(64, 192, 3) > MIXERS["flatten"].macs(64, 192, 12)


def test_mhsa_counts_its_inner_width_when_head_dim_is_decoupled():
  # H·d = 2·5 = 10 ≠ D = 16: projections 4·N·D·10, mixing 2·N²·10.
  assert MIXERS["mhsa"].macs(9, 16, 2, head_dim=5) == 4 * 9 * 16 * 10 + 2 * 81 * 10


@pytest.mark.parametrize("name", ["mhsa", "acmix", "flatten"])
def test_head_dim_mixers_refuse_heads_that_do_not_divide_the_width(name):
  with pytest.raises(ValueError, match=r"dim \(192\) divisible by num_heads \(5\)"):
    MIXERS[name].macs(64, 192, 5)
  with pytest.raises(ValueError, match=r"dim \(192\) divisible by num_heads \(5\)"):
    build(name, dim=192, heads=5)
