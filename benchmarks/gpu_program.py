"""What a GPU would run for the train step, compiled here without one (XLA's deviceless AOT).

    python benchmarks/gpu_program.py [--models lkca_t,vit] [--batch 128] [--dtype float32]
        [--runs 1] [--target_config benchmarks/gpu_target_h100.txtpb]
        [--out bench_results/gpu_program.json]

Exports the trainer's jitted step (`Training.compiled_step`) and its batch's on-device
augmentation for `cuda` (`jax.export`), then compiles both for the GPU that
`--target_config` describes (an H100 by default; an XLA `GpuTargetConfigProto` in text form)
through `jax.experimental.topologies`, with no GPU present. Per program it reports the
kernels of its compiled entry computation (fusions, cuBLAS and cuDNN calls, copies), its while
loops (a loop whose trip count XLA does not know reads its condition back on every trip), the
kernels that update memory atomically (read from its PTX: a float sum made so may change from
run to run), and what the host issues for one run: XLA records runs of kernels into CUDA
graphs ("command buffers"), so a step may reach the GPU as a few graph launches and the loops
between them.
These are counts, not times: the time of a step needs the GPU (`benchmarks/gpu_check.sh`).

Needs JAX's CUDA plugin, which is never a dependency: in a separate venv,
`pip install -r requirements.txt "jax[cuda13]==<this jax's version>"`. It compiles with that
plugin's XLA, which may differ from the one a GPU machine runs.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile

from absl import flags

from lkca_jax.tools import cli

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Entry instructions that launch nothing: they name, split or join buffers.
NO_LAUNCH = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
# A thunk in XLA's dump of a GPU program's thunk sequence: its indent nests it in the one above.
THUNK = re.compile(r"^( *)\d+: (k\w+)")
# A kernel in PTX, and an instruction that updates memory atomically: `atom` (which returns
# the old value; a compare-and-swap loop is how XLA adds floats with it) or `red`, either
# possibly predicated (`@%p1 atom...`).
PTX_KERNEL = re.compile(r"^\.visible \.entry (\w+)\(", re.M)
PTX_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)\.", re.M)


def define_flags() -> None:
  flags.DEFINE_list("models", ["lkca_t", "vit"], "Model presets.")
  flags.DEFINE_integer("batch", 128, "Images per step.", lower_bound=1)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_integer("runs", 1, "Runs in one process (config.num_runs).", lower_bound=1)
  flags.DEFINE_string(
    "target_config", "benchmarks/gpu_target_h100.txtpb", "The GPU, as XLA describes it."
  )
  cli.define_output_file(
    "out", "bench_results/gpu_program.json", "Where the JSON results go (from the repository)."
  )


def _entry(text: str) -> str:
  start = text.index("\nENTRY ")
  return text[start : text.index("\n}\n", start)]


def program_kernels(hlo_text: str) -> dict:
  """Kernels of a compiled module's entry computation by instruction (a fusion's by its
  kind), and its while loops anywhere in the module, those of unknown trip count apart."""
  kernels, by_kind = collections.Counter(), collections.Counter()
  for line in _entry(hlo_text).splitlines()[1:]:
    op = re.search(r" = (?:\([^=]*?\)|\S+) ([a-z][\w-]*)\(", line)
    if not op or op.group(1) in NO_LAUNCH:
      continue
    kernels[op.group(1)] += 1
    kind = re.search(r'kind=(\w+)|custom_call_target="([^"]+)"', line)
    by_kind[f"{op.group(1)} {next(g for g in kind.groups() if g)}" if kind else op.group(1)] += 1
  loops = [line for line in hlo_text.splitlines() if re.search(r" while\(", line)]
  return {
    "kernels": sum(kernels.values()),
    "by_instruction": dict(kernels.most_common()),
    "by_kind": dict(by_kind.most_common()),
    "while_loops": len(loops),
    "while_loops_unknown_trips": sum("known_trip_count" not in line for line in loops),
  }


def host_thunks(thunk_text: str) -> dict:
  """What the host issues for one run of a GPU program, from XLA's dump of its thunk sequence
  after the thunk passes: the top-level thunks by kind (a `kCommandBuffer` is one CUDA graph
  launch), and the while loops the host drives, those outside every command buffer."""
  top, host_loops, stack = collections.Counter(), 0, []  # stack: (indent, kind) of the parents
  for line in thunk_text.splitlines():
    thunk = THUNK.match(line)
    if not thunk:
      continue  # a loop's "condition:" and "body:" labels
    indent, kind = len(thunk.group(1)), thunk.group(2)
    while stack and stack[-1][0] >= indent:
      stack.pop()
    if not stack:
      top[kind] += 1
    host_loops += kind == "kWhile" and all(k != "kCommandBuffer" for _, k in stack)
    stack.append((indent, kind))
  if not top:
    raise ValueError("no thunk found: the format of XLA's thunk-sequence dump has changed")
  return {
    "host_thunks": sum(top.values()),
    "by_thunk": dict(top.most_common()),
    "command_buffers": top["kCommandBuffer"],
    "host_loops": host_loops,
  }


def atomic_kernels(ptx: str) -> list[str]:
  """The kernels of PTX text that update memory atomically. Threads reach such updates in no
  fixed order: a float sum made so (a scatter-add) may differ from one run of the program to
  the next; an integer one (a histogram) may not."""
  kernels = list(PTX_KERNEL.finditer(ptx))
  ends = [k.start() for k in kernels[1:]] + [len(ptx)]
  return [
    k.group(1) for k, end in zip(kernels, ends, strict=True) if PTX_ATOMIC.search(ptx, k.end(), end)
  ]


def gpu_sharding(target_config: str):
  """A replicated sharding on one compile-only GPU described by `target_config`."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    topology = topologies.get_topology_desc(
      platform="cuda", target_config=target_config, topology="1x1x1"
    )
  except (NotImplementedError, RuntimeError) as e:
    if "GpuTargetConfigProto" in str(e):
      first = str(e).splitlines()[0]
      cli.fail(f"--target_config={FLAGS.target_config} is not a GpuTargetConfigProto ({first})")
    cli.fail(
      f"cannot compile for a GPU here ({str(e).splitlines()[0]}): install JAX's CUDA plugin "
      f'in a separate venv, pip install "jax[cuda13]=={jax.__version__}"'
    )
  mesh = topologies.make_mesh(topology, (1,), ("gpu",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def compile_for_gpu(fn, args, sharding, donated: int = 0) -> tuple[str, str, str, int]:
  """(compiled HLO text, thunk sequence, PTX, StableHLO ops) of jitted `fn` at `args`,
  compiled for `sharding`'s GPU, its first `donated` arguments donated as the trainer donates
  them (an export drops that)."""
  import jax  # pylint: disable=import-outside-toplevel

  exported = jax.export.export(fn, platforms=["cuda"])(*args)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in exported.in_avals]
  # Without donation, every output that passes an input through unchanged is a copy kernel.
  donate = tuple(range(len(jax.tree.leaves(args[:donated]))))

  def call(*flat):
    args, kwargs = jax.tree.unflatten(exported.in_tree, flat)
    return exported.call(*args, **kwargs)

  # With no GPU XLA cannot autotune, and its untuned Triton tiling fails on some products
  # (vit's 8320×192 by 192×192, jaxlib 0.10.2): cuBLAS takes every product here.
  options = {"xla_gpu_enable_triton_gemm": False}
  with tempfile.TemporaryDirectory() as dump:  # the thunk sequence is only in XLA's dump
    lowered = jax.jit(call, donate_argnums=donate).lower(*specs)
    text = lowered.compile(compiler_options={**options, "xla_dump_to": dump}).as_text()
    found = glob.glob(os.path.join(dump, "*.thunk_sequence_after_thunk_passes.txt"))
    if len(found) != 1:
      raise RuntimeError(f"XLA's dump holds {len(found)} thunk sequences, not 1: has it changed?")
    with open(found[0], encoding="utf-8") as f:
      thunks = f.read()
    ptx = ""  # XLA compiles a program's kernels in several LLVM modules, a .ptx file each
    for path in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
      with open(path, encoding="utf-8") as f:
        ptx += f.read()
  return text, thunks, ptx, exported.mlir_module().count("stablehlo.")


def model_programs(model: str, sharding) -> dict:
  """Both programs of one training step of `model`: the update and the batch's augmentation."""
  from lkca_jax import train  # pylint: disable=import-outside-toplevel
  from lkca_jax.tools import bench_step  # pylint: disable=import-outside-toplevel

  config = bench_step.step_config(model, batch=FLAGS.batch, dtype=FLAGS.dtype)
  config.num_runs = FLAGS.runs
  t = train.build_training(train.Run.prepare(config), config)  # nothing timed: no Case
  p = t.pipeline
  programs = {  # name: (jitted function, its arguments, how many of them are donated)
    "train_step": (t.compiled_step, t.step_args(t.state, 0), 1),
    # The jitted gather + augmentation that `Pipeline.train_batch` calls for data on the device.
    "augment": (
      p._gather_augment,  # noqa: SLF001
      (p.train.images, p.train.labels, t.epoch_order(0), 0, 0),
      0,
    ),
  }
  found = {}
  for name, (fn, args, donated) in programs.items():
    text, thunks, ptx, stablehlo_ops = compile_for_gpu(fn, args, sharding, donated)
    atomic = atomic_kernels(ptx)
    found[name] = {
      "stablehlo_ops": stablehlo_ops,
      **program_kernels(text),
      **host_thunks(thunks),
      "atomic_kernels": len(atomic),
      "atomic_kernel_names": atomic,
    }
  return found


def main(argv) -> None:
  del argv  # no positional arguments: cli.run refuses them
  import jax  # pylint: disable=import-outside-toplevel

  cli.check_presets(FLAGS.models)
  path = os.path.join(ROOT, FLAGS.target_config)
  if not os.path.isfile(path):
    cli.fail(f"--target_config={FLAGS.target_config} is not a file: give a GpuTargetConfigProto")
  out = cli.output_file(os.path.join(ROOT, FLAGS.out), "--out")
  # The model and its data stay on the CPU; the GPU is only compiled for, never opened (nor
  # its runtime libraries checked, which a machine without one may lack).
  jax.config.update("jax_platforms", "cpu")
  if jax.device_count() != 1:
    cli.fail(
      f"this process has {jax.device_count()} CPU devices (XLA_FLAGS?); the step is compiled "
      "for one GPU, so run it with one: leave out --xla_force_host_platform_device_count"
    )
  with open(path, encoding="utf-8") as f:
    sharding = gpu_sharding(f.read())
  results = {}
  print(
    f"{'model':<10}{'program':<12}{'kernels':>9}{'loops':>7}{'unknown trips':>15}"
    f"{'host thunks':>13}{'graphs':>8}{'host loops':>12}{'atomic kernels':>16}"
  )
  for model in FLAGS.models:
    results[model] = model_programs(model, sharding)
    for name, r in results[model].items():
      print(
        f"{model:<10}{name:<12}{r['kernels']:>9}{r['while_loops']:>7}"
        f"{r['while_loops_unknown_trips']:>15}{r['host_thunks']:>13}{r['command_buffers']:>8}"
        f"{r['host_loops']:>12}{r['atomic_kernels']:>16}"
      )
  settings = {k: getattr(FLAGS, k) for k in ("batch", "dtype", "runs", "target_config")}
  cli.write_json(out, {"results": results, **settings})
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)  # run as a script: the recipe's configs/ import from the repository
  cli.run(main, define_flags=define_flags)
