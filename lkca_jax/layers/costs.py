"""Multiply-adds of one token mixer on one image (spec section 6, cost table).

Counted: every product of a Linear, matmul or convolution. Not counted:
element-wise work (softmax, scaling, biases, ReLU, the focusing powers and
norms, the two ACmix rates), as the spec's MHSA row 4ND² + 2N²D leaves out
the softmax.
"""
from __future__ import annotations


def _mhsa(n: int, dim: int, head_dim: int) -> int:
  # qkv and output projections, then q·kᵀ and weights·v.
  return 4 * n * dim ** 2 + 2 * n ** 2 * dim


def _lkca(n: int, dim: int, head_dim: int) -> int:
  # W_v and W_o, then the direct N×N mixing of every channel.
  return 2 * n * dim ** 2 + n ** 2 * dim


def _acmix(n: int, dim: int, head_dim: int) -> int:
  # MHSA + the conv branch: 3H → 9 map (27·N·D) + grouped 3×3 conv, 9 inputs per output (81·N·D).
  return _mhsa(n, dim, head_dim) + 108 * n * dim


def _flatten(n: int, dim: int, head_dim: int) -> int:
  # q, k, v, out projections; kᵀv and q·kv (N·d² per head each); q·mean_N(k) (N·D);
  # the 5×5 depthwise conv of v (25·N·D).
  return 4 * n * dim ** 2 + 2 * n * dim * head_dim + 26 * n * dim


_COSTS = {"mhsa": _mhsa, "lkca": _lkca, "acmix": _acmix, "flatten": _flatten}


def mixer_macs(name: str, num_tokens: int, dim: int, num_heads: int) -> int:
  """Multiply-adds of mixer `name` on one image of `num_tokens` tokens of width `dim`.

  `num_tokens` is what the mixer sees (h·w for grid mixers; add the class
  token yourself for MHSA in a ViT). Only FLatten depends on the head dim
  dim / num_heads. LKCA is its direct (attention-view) cost.
  """
  if name not in _COSTS:
    raise ValueError(f"unknown mixer {name!r} for mixer_macs; choose one of {sorted(_COSTS)}")
  if num_tokens < 1 or dim < 1 or num_heads < 1 or dim % num_heads:
    raise ValueError(f"mixer_macs needs positive sizes with dim ({dim}) divisible by "
                     f"num_heads ({num_heads}); got num_tokens={num_tokens}")
  return _COSTS[name](num_tokens, dim, dim // num_heads)
