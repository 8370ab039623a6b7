"""The one place lkca_jax picks code per backend: `by_backend`.

Code with a CPU-tuned form (Linear, LayerNorm, GELU, the MHSA core, the LKCA view, ACmix's
position bias, FLatten's depthwise convolution, and AutoAugment over a batch) hands both
forms to `by_backend`, which stages them with `jax.lax.platform_dependent`: the choice
is made when the computation is lowered, so one model (and one jitted or exported
function) runs the CPU form on the CPU and the plain form on GPU and TPU, where XLA's
fusions, cuBLAS and cuDNN expect the plain formulation. Only the branch of the lowering
platform is compiled. The CPU forms are traced under the name scope `CPU_SCOPE`, so a
lowered module says which forms it holds.

Both forms are ordinary JAX functions (the layers' CPU ones are `custom_jvp`s with
tangent rules JAX linearises and transposes), so every transform (`grad`, `jvp`,
`vmap`, `hessian`, `linearize`) works on both.

`forms("plain")` or `forms("cpu")` pins one form on every backend while a function
is traced, for benchmarks and tests that compare them; the choice is read at
trace time, so jit a fresh function under it.

`reverse_mode_only()` marks a trace that only reverse mode differentiates (the
trainer's gradient). There a CPU form may use a hand-written backward pass
(`jax.custom_vjp`), which `jvp`, `jacfwd` and `hessian` cannot differentiate;
outside it every form stays a `custom_jvp` or plain JAX. Like `forms`, the mark is read at
trace time and JAX reuses a function's trace whatever the mark: trace a fresh function under
it (the trainer's loss is a closure made anew in each trace of its step).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

FORMS = ("auto", "cpu", "plain")
CPU_SCOPE = "lkca_cpu_form"
_pinned: contextvars.ContextVar[str] = contextvars.ContextVar("lkca_jax_forms", default="auto")
_reverse_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
  "lkca_jax_reverse_mode_only", default=False
)


@contextlib.contextmanager
def forms(name: str) -> Iterator[None]:
  """Traces with the CPU form ("cpu"), the plain form ("plain") or by platform ("auto")."""
  if name not in FORMS:
    raise ValueError(f"forms must be one of {FORMS}, got {name!r}")
  token = _pinned.set(name)
  try:
    yield
  finally:
    _pinned.reset(token)


@contextlib.contextmanager
def reverse_mode_only() -> Iterator[None]:
  """Traces a function that only reverse mode will differentiate (`grad`, `vjp`)."""
  token = _reverse_only.set(True)
  try:
    yield
  finally:
    _reverse_only.reset(token)


def in_reverse_mode_only() -> bool:
  """Whether the current trace is under `reverse_mode_only()`."""
  return _reverse_only.get()


def by_backend(cpu: Callable, plain: Callable, *args):
  """`cpu(*args)` where the computation is lowered for the CPU, `plain(*args)` elsewhere."""

  def cpu_form(*a):
    with jax.named_scope(CPU_SCOPE):
      return cpu(*a)

  pinned = _pinned.get()
  if pinned == "cpu":
    return cpu_form(*args)
  if pinned == "plain":
    return plain(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_form, default=plain)
