"""Helpers of benchmarks/gpu_check.sh: wheel selection, the AutoAugment timing, the summary.

    python benchmarks/gpu_check.py missing-wheels DIR
    python benchmarks/gpu_check.py check-parts NAME,NAME,...
    python benchmarks/gpu_check.py env [--wheels DIR] --out FILE
    python benchmarks/gpu_check.py autoaugment --batch B --steps N [--policy P] --out FILE
    python benchmarks/gpu_check.py export --batch B --steps N [--smoke] --out FILE
    python benchmarks/gpu_check.py summary DIR [--mode smoke|full]

`missing-wheels` and `summary` use the standard library only, so they work whatever the
machine lacks; `autoaugment` needs jax and lkca_jax.augment (not ml_collections), `export`
jax, flax, flatbuffers and lkca_jax. For that reason this helper parses its arguments with
argparse, not absl through `lkca_jax.tools.cli` like the other commands (absl may be one of
the wheels `missing-wheels` is asked about), but keeps their contract: `--help`
exits 0, and a bad argument is one `error:` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

RECIPE_STEPS = 117_100  # the full CIFAR-10 recipe at batch 128
RECIPE_BATCH = 128
GOAL_MINUTES = 10.0  # lkca_t: the goal; about 5 ms/step
STRETCH_MINUTES = 5.0
RUNS_GOAL = 4.0  # K runs in one process: at least 4x one run's images/s
PROJECTED = ("lkca_t", "lkca_b")
# The order the driver runs its parts in (the summary lists them in this order).
PARTS = (
  "env",
  "train",
  "step_b128_lkca_t",
  "export",
  "forms",
  "views",
  "runs",
  "step_b128_lkca_b",
  "mixers",
  "autoaugment",
  "randaugment",
  "stream",
  "step_b128_vit",
  "step_b1024_lkca",
  "step_b1024_vit",
)


def missing_wheels(folder: str) -> list[str]:
  """The .whl files in `folder` whose distribution is not installed."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  missing = []
  for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
    name = os.path.basename(path).split("-")[0]
    try:
      metadata.version(name)
    except metadata.PackageNotFoundError:
      missing.append(path)
  return missing


# What the parts import beyond jax/flax/optax/orbax/numpy (see gpu_check.sh's header).
NEEDED = ("ml_collections", "clu", "tensorboard", "wrapt", "etils", "absl", "flatbuffers")


def environment(wheels: str | None = None) -> dict:
  """Python, jax, the devices, which of NEEDED import, and the wheels' installed versions."""
  import importlib  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  env = {"python": sys.version.split()[0], "executable": sys.executable}
  env["platform"] = platform.platform()
  env["imports"] = {}
  for name in NEEDED:
    try:
      module = importlib.import_module(name)
      env["imports"][name] = getattr(module, "__version__", "ok")
    except Exception as e:  # noqa: BLE001 - any failure means the part that needs it fails
      env["imports"][name] = f"MISSING: {type(e).__name__}: {e}"
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  env["wheels"] = {}
  for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []:
    name = os.path.basename(path).split("-")[0]
    try:
      env["wheels"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      env["wheels"][name] = "MISSING"
  import jax  # pylint: disable=import-outside-toplevel

  env["jax"] = jax.__version__
  env["backend"] = jax.default_backend()
  env["devices"] = [str(d) for d in jax.devices()]
  return env


def time_autoaugment(batch: int, steps: int, policy: str = "cifar10") -> dict:
  """ms per batch of the two forms `transforms._autoaugment_batch` picks between by backend.

  "batched_select": vmap of the policy (its lax.switch becomes a select over all ops;
  what runs on GPU/TPU); "per_image_loop": lax.map of it (each image runs only its own
  ops; what runs on CPU). Both are timed here on whatever backend this is. `policy`: an
  AutoAugment policy, or a RandAugment string (DeiT's "rand-m9-mstd0.5-inc1").
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lkca_jax.augment import autoaugment, randaugment  # pylint: disable=import-outside-toplevel

  if randaugment.is_spec(policy):
    augment, fill = randaugment.parse(policy), randaugment.mean_fill((0.485, 0.456, 0.406))
    one = lambda key, image: randaugment.apply(key, image, augment, fill)
  else:
    one = lambda key, image: autoaugment.apply_policy(key, image, policy)
  forms = {
    "batched_select": jax.jit(jax.vmap(one)),
    "per_image_loop": jax.jit(lambda keys, images: jax.lax.map(lambda a: one(*a), (keys, images))),
  }
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
  keys = lambda i: jax.random.split(jax.random.key(i), batch)
  compile_s, times = {}, {name: [] for name in forms}
  for name, fn in forms.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(keys(0), images))  # compile and warm up: not timed
    compile_s[name] = time.perf_counter() - start
  for i in range(steps):  # interleaved, so load from elsewhere hits both alike
    for name, fn in forms.items() if i % 2 == 0 else reversed(forms.items()):
      k = keys(i + 1)
      jax.block_until_ready(k)
      start = time.perf_counter()
      jax.block_until_ready(fn(k, images))
      times[name].append(time.perf_counter() - start)
  results = {}
  for name in forms:
    ms = 1e3 * statistics.median(times[name])
    results[name] = {
      "median_ms": ms,
      "min_ms": 1e3 * min(times[name]),
      "images_per_second": batch / (ms / 1e3),
      "compile_seconds": compile_s[name],
    }
  return {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "batch": batch,
    "steps": steps,
    "policy": policy,
    "forms": results,
    "faster": min(results, key=lambda name: results[name]["median_ms"]),
    "note": "both forms exist in lkca_jax.augment.transforms._autoaugment_batch "
    "(vmap on GPU/TPU, lax.map on CPU)",
  }


def check_export(batch: int, steps: int, smoke: bool = False) -> dict:
  """One `lkca_jax.exporting` artifact (lkca_t on 32 px images, every platform, serialized and
  read back) called here on the CPU and on the default device: their logits' agreement, and
  the default device's ms per call (a forward pass of `batch` images). --smoke: a tiny model."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lkca_jax import exporting, models  # pylint: disable=import-outside-toplevel

  sizes = {"dim": 32, "depth": 1, "num_heads": 2} if smoke else {}
  model = models.create_model(
    "lkca_t",
    num_classes=10,
    image_size=32,
    rngs=nnx.Rngs(0),
    mixer_options={"lkca": {"kernel_init": "gaussian"}},  # kernels that mix
    **sizes,
  )
  start = time.perf_counter()
  artifact = exporting.classifier(model, (0.5,), (0.25,))
  loaded = jax.export.deserialize(artifact.serialize())
  export_s = time.perf_counter() - start
  images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
  cpu, device = jax.devices("cpu")[0], jax.devices()[0]
  on_cpu = np.asarray(loaded.call(jax.device_put(images, cpu)))
  x = jax.device_put(images, device)
  start = time.perf_counter()
  on_device = np.asarray(loaded.call(x))  # compiles
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(loaded.call(x))
    times.append(time.perf_counter() - start)
  ms = 1e3 * statistics.median(times)
  return {
    "model": "lkca_t" + (" (smoke sizes)" if smoke else ""),
    "platforms": list(loaded.platforms),
    "device": str(device),
    "batch": batch,
    "steps": steps,
    "bytes": len(artifact.serialize()),
    "export_seconds": export_s,
    "compile_seconds": compile_s,
    "median_ms": ms,
    "images_per_second": batch / (ms / 1e3),
    "max_abs_difference_to_cpu": float(np.abs(on_device - on_cpu).max()),
    "max_abs_logit": float(np.abs(on_cpu).max()),
    "top1_agreement_with_cpu": float(np.mean(on_device.argmax(1) == on_cpu.argmax(1))),
  }


# --- the summary ---------------------------------------------------------------


def read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def last_line(path: str) -> str:
  """The last non-empty line of a log: where a failed part says why."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  return lines[-1][:300] if lines else ""


def read_parts(folder: str) -> dict:
  """name -> status record, from the driver's parts.tsv (name, rc, seconds, log, json)."""
  parts = {}
  try:
    with open(os.path.join(folder, "parts.tsv"), encoding="utf-8") as f:
      rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  except OSError:
    rows = []
  for name, rc, seconds, log, out in rows:
    if rc == "unselected":  # GPU_CHECK_PARTS left it out
      parts[name] = {"status": "not selected"}
      continue
    if rc == "skipped":  # the overall budget was spent before this part
      parts[name] = {"status": "skipped", "log": log, "error": last_line(log)}
      continue
    rc = int(rc)
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    part = {"status": status, "rc": rc, "seconds": float(seconds), "log": log}
    if out:
      part["json"] = out
    if rc != 0:
      part["error"] = last_line(log)
    parts[name] = part
  for name in PARTS:  # a part the driver never reached (the whole run was cut short)
    parts.setdefault(name, {"status": "not run"})
  return parts


def step_rows(part: str, results: dict) -> list[dict]:
  batch = results["config"]["batch_size"]
  rows = []
  for r in results["results"]:
    rows.append(
      {
        "part": part,
        "model": r["model"],
        "dtype": r["dtype"],
        "batch": batch,
        "fixed_ms": r["fixed"]["median_ms"],
        "fixed_images_per_second": r["fixed"]["images_per_second"],
        "pipeline_ms": r["pipeline"]["median_ms"],
        "pipeline_images_per_second": r["pipeline"]["images_per_second"],
      }
    )
  return rows


def trace_rows(results: dict) -> dict:
  """{model/dtype/column: what bench_step --trace_dir found in its traces}: ops a step, the
  time their lanes (a GPU's streams) were busy, the span of the step's ops, the busiest op."""
  out = {}
  for r in results["results"]:
    for column, t in r.get("trace", {}).items():
      key = f"{r['model']}/{r['dtype']}/{column}"
      if "error" in t:
        out[key] = {"error": t["error"]}
        continue
      fields = ("lanes", "ops_per_step", "busy_ms_per_step", "span_ms_per_step", "busy_fraction")
      out[key] = {field: t[field] for field in fields}
      out[key]["top_op"] = t["top_ops"][0]["name"]
  return out


def projection(rows: list[dict]) -> dict:
  """Minutes for RECIPE_STEPS steps per model and dtype, from the pipeline column's median."""
  out = {}
  for model in PROJECTED:
    by_dtype = {}
    for r in rows:
      # The recipe's batch; a smoke run has only its tiny batch, projected all the same.
      if r["model"] == model and r["part"].startswith("step_b128"):
        ms = r["pipeline_ms"]
        by_dtype[r["dtype"]] = {
          "ms_per_step": ms,
          "batch": r["batch"],
          "minutes": ms * RECIPE_STEPS / 1e3 / 60,
        }
    if not by_dtype:
      continue
    best = min(by_dtype, key=lambda d: by_dtype[d]["minutes"])
    minutes = by_dtype[best]["minutes"]
    out[model] = {
      "by_dtype": by_dtype,
      "best_dtype": best,
      "best_minutes": minutes,
      "meets_goal": minutes <= GOAL_MINUTES,
      "meets_stretch": minutes <= STRETCH_MINUTES,
    }
  return {
    "steps": RECIPE_STEPS,
    "recipe_batch": RECIPE_BATCH,
    "goal_minutes": GOAL_MINUTES,
    "stretch_minutes": STRETCH_MINUTES,
    "column": "pipeline (augmentation included)",
    "models": out,
  }


def train_summary(results: dict) -> dict:
  """main.py's summary.json: what it reached, and the recipe's time at its training rate
  (compilation, evaluation and checkpoints left out) and at its wall-clock rate (all in)."""
  steps, batch = results["step"], results["config"]["batch_size"]
  rate = results["train_images_per_second"]
  wall_ms = results["wall_seconds"] / steps * 1e3
  return {
    "model": results["model"],
    "dataset": results["dataset"],
    "classes": results["config"]["dataset"]["classes"],
    "dtype": results["config"]["dtype"],
    "steps": steps,
    "batch": batch,
    "final_top1": results["final_top1"],
    "best_top1": results["best_top1"],
    "train_images_per_second": rate,
    "train_ms_per_step": batch / rate * 1e3,
    "wall_seconds": results["wall_seconds"],
    "wall_ms_per_step": wall_ms,
    "recipe_minutes_at_train_rate": RECIPE_STEPS * RECIPE_BATCH / rate / 60,
    "recipe_minutes_at_wall_rate": wall_ms * RECIPE_STEPS / 1e3 / 60,
  }


def runs_summary(results: dict) -> list[dict]:
  rows = []
  for r in results["results"]:
    # K runs together give K x batch images per together_ms; one run gives batch per
    # (separate_ms / K): the multiple of one run's images/s is separate_ms / together_ms.
    multiple = r["separate_ms"] / r["together_ms"]
    rows.append(
      {
        "model": r["model"],
        "dtype": r["dtype"],
        "runs": r["runs"],
        "together_ms": r["together_ms"],
        "one_run_ms": r["separate_ms"] / r["runs"],
        "throughput_vs_one_run": multiple,
        "meets_goal": multiple >= RUNS_GOAL,
      }
    )
  return rows


def forms_summary(results: dict) -> list[dict]:
  """Per model and dtype: the train step in the plain and the CPU-tuned layer forms."""
  rows = {}
  for r in results["results"]:
    row = rows.setdefault((r["model"], r["dtype"]), {"model": r["model"], "dtype": r["dtype"]})
    row.setdefault("ms", {})[r["forms"]] = r["fixed"]["median_ms"]
  for row in rows.values():
    row["faster"] = min(row["ms"], key=row["ms"].get)
  return list(rows.values())


def mixers_summary(results: dict) -> dict:
  """Per shape: the faster LKCA view (module cases) against the one `auto` picks."""
  out = {}
  for row in results["rows"]:
    view = row["case"].removeprefix("lkca-")
    if row["case"].startswith("lkca-") and view in ("attention", "conv"):
      name = f"{row['grid'][0]}x{row['grid'][1]}"
      out.setdefault(name, {"ms": {}})["ms"][view] = row["median_ms"]
  for name, shape in out.items():
    shape["faster"] = min(shape["ms"], key=shape["ms"].get)
    shape["auto_picks"] = results.get("auto_view", {}).get(name)
    shape["auto_agrees"] = shape["auto_picks"] == shape["faster"]
  return out


def views_summary(results: dict) -> dict:
  """bench_views' own verdict: per level the fastest view per grid and from which token
  count the FFT view beats the gathered matrix; and what view="auto" picks here."""
  return {"crossover": results["crossover"], "auto": results["auto"]}


def stream_summary(results: dict, rows: list[dict]) -> dict:
  """One host core's decode + crop rate per case (bench_stream), and per step part's
  images/s the host cores streaming would need at each case's rate, against this host's."""
  rates = {name: c["images_per_cpu_second"] for name, c in results["cases"].items()}
  cores = results["machine"]["cpu_count"]
  needs = []
  for r in rows:
    device = r["pipeline_images_per_second"]
    for case, rate in rates.items():
      needed = device / rate
      needs.append(
        {
          "part": r["part"],
          "model": r["model"],
          "dtype": r["dtype"],
          "device_images_per_second": device,
          "case": case,
          "host_cores_needed": needed,
          "host_keeps_up": needed <= cores,
        }
      )
  return {"images_per_core_second": rates, "host_cores": cores, "needs": needs}


def summarize(folder: str, mode: str) -> dict:
  parts = read_parts(folder)
  rows, runs, forms, mixers, views, augments, stream = [], [], [], {}, None, {}, None
  train = exported = None
  for name, part in parts.items():
    # A part stopped by its time limit may have written what it finished (bench_step
    # writes after every model, bench_views after every grid, main.py its summary when
    # stopped): used, marked partial.
    usable = part.get("status") in ("ok", "timeout") and "json" in part
    data = read_json(part["json"]) if usable else None
    if part.get("status") == "ok" and "json" in part and data is None:
      part.update(status="failed", error=f"no JSON results at {part['json']}")
    if data is None:
      continue
    if part["status"] == "timeout":
      part["partial"] = True
    if name.startswith("step_"):
      found = step_rows(name, data)
      part["images_per_second"] = {
        f"{r['model']}/{r['dtype']}/b{r['batch']}": r["pipeline_images_per_second"] for r in found
      }
      rows += found
      traces = trace_rows(data)
      if traces:
        part["traces"] = traces
    elif name == "train":
      train = train_summary(data)
      part["final_top1"] = train["final_top1"]
    elif name == "runs":
      runs = runs_summary(data)
      part["throughput_vs_one_run"] = {
        f"{r['model']}/{r['dtype']}": r["throughput_vs_one_run"] for r in runs
      }
    elif name == "forms":
      forms = forms_summary(data)
      part["faster_forms"] = {f"{r['model']}/{r['dtype']}": r["faster"] for r in forms}
    elif name == "mixers":
      mixers = mixers_summary(data)
      part["faster_view"] = {k: v["faster"] for k, v in mixers.items()}
    elif name == "views":
      views = views_summary(data)
      part["fft_from_tokens"] = {
        level: c["fft_beats_attention_from_tokens"] for level, c in views["crossover"].items()
      }
    elif name in ("autoaugment", "randaugment"):
      augments[name] = data
      part["ms"] = {k: v["median_ms"] for k, v in data["forms"].items()}
    elif name == "export":
      exported = data
      part["top1_agreement_with_cpu"] = data["top1_agreement_with_cpu"]
    elif name == "stream":
      stream = data
      part["images_per_core_second"] = {
        k: c["images_per_cpu_second"] for k, c in data["cases"].items()
      }
    elif name == "env":
      part["env"] = data
  return {
    "mode": mode,
    "parts": parts,
    "failed": sorted(n for n, p in parts.items() if p["status"] not in ("ok", "not selected")),
    "train": train,
    "step": rows,
    "projection": projection(rows),
    "runs": runs,
    "forms": forms,
    "mixers": mixers,
    "views": views,
    "autoaugment": augments.get("autoaugment"),
    "randaugment": augments.get("randaugment"),
    "stream": None if stream is None else stream_summary(stream, rows),
    "export": exported,
  }


def trace_lines(parts: dict) -> list[str]:
  lines = []
  for name, part in parts.items():
    for key, t in part.get("traces", {}).items():
      lines.append(
        f"  trace {name} {key}: {t['error']}"
        if "error" in t
        else f"  trace {name} {key}: {t['ops_per_step']:.0f} ops a step on {t['lanes']}, busy "
        f"{t['busy_ms_per_step']:.2f} of {t['span_ms_per_step']:.2f} ms; most time {t['top_op']}"
      )
  return lines


def format_summary(s: dict) -> str:
  lines = [f"== gpu_check summary ({s['mode']}) =="]
  for name, p in s["parts"].items():
    extra = f"  {p['error'][:100]}" if p.get("error") else ""
    extra = "  (partial results kept)" + extra if p.get("partial") else extra
    secs = f"{p['seconds']:6.1f}s" if "seconds" in p else "      -"
    lines.append(f"  {name:<18}{p['status']:<9}{secs}{extra}")
  t = s.get("train")
  if t:
    lines.append(
      f"  main.py {t['model']} on {t['dataset']} ({t['classes'] or 'all'} classes, {t['dtype']}): "
      f"{t['steps']} steps in {t['wall_seconds']:.0f} s, top-1 {t['final_top1']} "
      f"(best {t['best_top1']}); {t['train_images_per_second']:.0f} img/s training "
      f"({t['train_ms_per_step']:.2f} ms/step); recipe {t['recipe_minutes_at_train_rate']:.1f} "
      f"min at that rate, {t['recipe_minutes_at_wall_rate']:.1f} min at the wall rate"
    )
  if s["step"]:
    lines.append(
      f"  {'part':<18}{'model':<8}{'dtype':<10}{'batch':>6}{'fixed img/s':>13}{'pipe img/s':>12}"
    )
    for r in s["step"]:
      lines.append(
        f"  {r['part']:<18}{r['model']:<8}{r['dtype']:<10}{r['batch']:>6}"
        f"{r['fixed_images_per_second']:>13.0f}{r['pipeline_images_per_second']:>12.0f}"
      )
  lines += trace_lines(s["parts"])
  p = s["projection"]
  if s["mode"] == "smoke" and p["models"]:
    lines.append(
      "  (smoke: tiny models at batch 16; the projection below only checks the arithmetic)"
    )
  for model, m in p["models"].items():
    lines.append(
      f"  projected {model}: {m['best_minutes']:.1f} min for {p['steps']:,} steps "
      f"({m['best_dtype']}, {m['by_dtype'][m['best_dtype']]['ms_per_step']:.2f} ms/step); "
      f"goal {p['goal_minutes']:g} min {'met' if m['meets_goal'] else 'MISSED'}, "
      f"stretch {p['stretch_minutes']:g} min {'met' if m['meets_stretch'] else 'missed'}"
    )
  for r in s["runs"]:
    lines.append(
      f"  {r['runs']} runs together ({r['model']} {r['dtype']}): "
      f"{r['throughput_vs_one_run']:.2f}x one run's images/s (goal {RUNS_GOAL:g}x)"
    )
  for r in s["forms"]:
    ms = ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
    lines.append(f"  layer forms ({r['model']} {r['dtype']}): {ms}; faster {r['faster']}")
  for shape, m in s["mixers"].items():
    ms = ", ".join(f"{k} {v:.2f} ms" for k, v in m["ms"].items())
    lines.append(f"  LKCA views {shape}: {ms}; faster {m['faster']}, auto picks {m['auto_picks']}")
  if s["views"]:
    auto = s["views"]["auto"]
    for level, c in s["views"]["crossover"].items():
      fastest = ", ".join(f"{g} {v}" for g, v in c["fastest"].items())
      tokens = c["fft_beats_attention_from_tokens"]
      lines.append(
        f"  LKCA views over grids ({level}): fastest {fastest}; fft beats attention "
        f"{'nowhere measured' if tokens is None else f'from {tokens} tokens'} "
        f"(auto on {auto['platform']}: fft from {auto['fft_min_tokens']} tokens)"
      )
  for name in ("autoaugment", "randaugment"):
    if s.get(name):
      a = s[name]
      ms = ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in a["forms"].items())
      lines.append(f"  {a['policy']} b{a['batch']} on {a['backend']}: {ms}; faster {a['faster']}")
  if s["stream"]:
    st = s["stream"]
    rates = ", ".join(f"{k} {v:.0f}" for k, v in st["images_per_core_second"].items())
    lines.append(f"  streaming host work, images per core-second: {rates}")
    for n in st["needs"]:
      if n["part"].startswith("step_b128"):
        lines.append(
          f"  streaming {n['model']} {n['dtype']} ({n['device_images_per_second']:.0f} img/s) "
          f"at {n['case']}: {n['host_cores_needed']:.1f} of {st['host_cores']} host cores"
          f"{'' if n['host_keeps_up'] else ' (the host cannot keep up)'}"
        )
  if s.get("export"):
    e = s["export"]
    lines.append(
      f"  exported {e['model']} ({','.join(e['platforms'])}) on {e['device']}: b{e['batch']} "
      f"{e['median_ms']:.2f} ms ({e['images_per_second']:.0f} img/s); against the CPU max "
      f"|diff| {e['max_abs_difference_to_cpu']:.3g} of max |logit| {e['max_abs_logit']:.3g}, "
      f"top-1 agrees on {e['top1_agreement_with_cpu']:.1%}"
    )
  lines.append(f"  failed parts: {', '.join(s['failed']) or 'none'}")
  return "\n".join(lines)


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error:` line (its subcommands' too) and exit 2."""

  def error(self, message):
    sys.stdout.flush()
    print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None) -> int:
  parser = Parser(description=__doc__.splitlines()[0])
  # Not required=True: argparse would report a missing command before an unknown flag.
  sub = parser.add_subparsers(dest="command")
  p = sub.add_parser("missing-wheels")
  p.add_argument("folder")
  p = sub.add_parser("check-parts")
  p.add_argument("names")
  p = sub.add_parser("env")
  p.add_argument("--wheels")
  p.add_argument("--out", required=True)
  p = sub.add_parser("autoaugment")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--policy", default="cifar10")
  p.add_argument("--out", required=True)
  p = sub.add_parser("export")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", required=True)
  p = sub.add_parser("summary")
  p.add_argument("folder")
  p.add_argument("--mode", default="full")
  args = parser.parse_args(argv)
  if args.command is None:
    parser.error(f"a command is required: one of {', '.join(sub.choices)}")
  if args.command == "missing-wheels":
    print("\n".join(missing_wheels(args.folder)))
  elif args.command == "check-parts":
    unknown = [n for n in args.names.split(",") if n not in PARTS]
    if unknown or not args.names:
      names = ", ".join(unknown) or "(none given)"
      parser.error(
        f"GPU_CHECK_PARTS={args.names}: unknown part(s) {names}; choose from {','.join(PARTS)}"
      )
  elif args.command == "env":
    env = environment(args.wheels)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(env, f, indent=2)
    for key, value in env.items():  # one line each: the driver shows the log's tail
      print(f"{key}: {json.dumps(value)}")
  elif args.command == "export":
    results = check_export(args.batch, args.steps, args.smoke)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(json.dumps(results, indent=1))
  elif args.command == "autoaugment":
    results = time_autoaugment(args.batch, args.steps, args.policy)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(json.dumps(results["forms"], indent=1))
  else:
    summary = summarize(args.folder, args.mode)
    path = os.path.join(args.folder, "summary.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    print(format_summary(summary))
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  # Run as a script from the repository root: lkca_jax must import from here.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
