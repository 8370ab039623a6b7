"""Multiply-add counts of the token mixers against the spec's cost table (section 6)."""
import pytest

from lkca_jax.layers.costs import mixer_macs


# Spec section 6, column N = 64, D = 192, in millions (one decimal). FLatten's
# count depends on the head dim: the column is FLatten-DeiT-T's 3 heads (d = 64).
@pytest.mark.parametrize("name, heads, millions", [
    ("mhsa", 12, 11.0), ("lkca", 12, 5.5), ("acmix", 12, 12.3), ("flatten", 3, 11.3)])
def test_spec_column_at_64_tokens_width_192(name, heads, millions):
  assert round(mixer_macs(name, 64, 192, heads) / 1e6, 1) == millions


@pytest.mark.parametrize("n, dim, heads", [(64, 192, 12), (15, 12, 3), (196, 384, 6)])
def test_leading_terms(n, dim, heads):
  d = dim // heads
  assert mixer_macs("mhsa", n, dim, heads) == 4 * n * dim ** 2 + 2 * n ** 2 * dim
  assert mixer_macs("lkca", n, dim, heads) == 2 * n * dim ** 2 + n ** 2 * dim
  # ACmix's conv branch: 3H → 9 per token and channel index (27·N·D) plus the
  # grouped 3×3 conv, 9 inputs × 9 taps per output (81·N·D): 108·N·D over MHSA.
  assert mixer_macs("acmix", n, dim, heads) - mixer_macs("mhsa", n, dim, heads) == 108 * n * dim
  # FLatten: 4 projections, kᵀv and q·kv (N·d² per head each), q·mean(k) (N·D), 5×5 dwc (25·N·D).
  assert mixer_macs("flatten", n, dim, heads) == 4 * n * dim ** 2 + 2 * n * dim * d + n * dim + 25 * n * dim


def test_only_flatten_depends_on_heads():
  assert mixer_macs("mhsa", 64, 192, 3) == mixer_macs("mhsa", 64, 192, 12)
  assert mixer_macs("flatten", 64, 192, 3) > mixer_macs("flatten", 64, 192, 12)


@pytest.mark.parametrize("args, match", [
    (("swin", 64, 192, 12), r"unknown mixer 'swin'.*choose one of \['acmix', 'flatten', 'lkca', 'mhsa'\]"),
    (("mhsa", 64, 192, 5), r"dim \(192\) divisible by num_heads \(5\)"),
    (("lkca", 0, 192, 12), "positive sizes"),
])
def test_bad_arguments_raise_value_error(args, match):
  with pytest.raises(ValueError, match=match):
    mixer_macs(*args)
