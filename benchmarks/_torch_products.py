"""PyTorch's side of compare_products.py: x·W, g·Wᵀ and xᵀ·g for each (M, K, N) given.

    python benchmarks/_torch_products.py '[[8320, 192, 576], ...]' REPEATS

Run by an interpreter with torch; imports nothing of lkca_jax. Prints one JSON line:
{"seconds": {"MxKxN": {"NN": s, "NT": s, "TN": s}}, "threads": T, "torch": version}, each
the median of REPEATS calls after one untimed call.
"""

import json
import statistics
import sys
import timeit

import torch


def median_seconds(call, repeats):
  call()
  return statistics.median(timeit.repeat(call, number=1, repeat=repeats))


def products(x, w, g):
  return {"NN": lambda: x @ w, "NT": lambda: g @ w.t(), "TN": lambda: x.t() @ g}


def main():
  shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
  torch.manual_seed(0)
  seconds = {}
  for m, k, n in shapes:
    x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    seconds[f"{m}x{k}x{n}"] = {
      form: median_seconds(f, repeats) for form, f in products(x, w, g).items()
    }
  print(
    json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__})
  )


if __name__ == "__main__":
  main()
