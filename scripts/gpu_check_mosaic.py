"""One-shot H100 check of the Mosaic GPU MLR kernel (structattn.attention.mosaic_mlr).

  python3 scripts/gpu_check_mosaic.py --out results/mosaic.json [--time-limit 190] [--iters 5]
      [--probes] [--pallas] [--extras] [--chunk64] [--seq-lens 4096,8192,16384]
      [--accuracy mlr8_d64,mlr4_d128,mlr3_d64_noncausal]

1. accuracy: the bf16 Mosaic kernel (forward and backward) vs the XLA MLR path in float32
   on the same bf16-rounded inputs (relative max-abs error of out, dq, dk, dv), one XLA
   reference per config: 8 levels 32|8|6|4|4|4|4|2 at d_head 64 and 4 levels
   with prefix widths 16|32|64|128 (ranks 16|16|32|64, benchmarks/attention.py MLR4_D128)
   at d_head 128 (block sizes T/2^(l-1), finest 8 tokens at T=1024), causal, T=1024;
   a non-causal 3-level case after the timings;
2. timing: fwd and fwd+bwd of cuDNN dense (is_causal) and the Mosaic MLR kernel, for T in
   4096, 8192, 16384 at B*T = 16384 tokens, 12 heads at d64 / 6 heads at d128 (helpers of
   benchmarks/attention.py), T-major so that the time limit cuts long T first;
3. behind flags: --probes (forward options at T=1024: block_k=128, no schedule barrier),
   --pallas (the Pallas-Triton MLR kernel), --chunk64 (64-column q/k chunks), --extras
   (block_k=128, the kernel on dense attention, the XLA MLR path at T=4096).
Every case runs in its own try/except; errors are recorded in the JSON, which is rewritten
after every step.  No new step starts after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from structattn.attention import dispatch  # noqa: E402
from structattn.attention.kernel_config import KernelConfig  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "attention.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_attention"] = bench
_spec.loader.exec_module(bench)

MLR8, MLR4 = bench.MLR8, bench.MLR4_D128
CASES = {  # name: (config, heads, d_head, impl, kwargs)
    "dense_cudnn_d64": (bench._mha(64), 12, 64, "cudnn", {}),
    "mlr8_mosaic_d64": (bench._mlr(64, MLR8), 12, 64, "mosaic", {}),
    "mlr8_pallas_d64": (bench._mlr(64, MLR8), 12, 64, "pallas", {}),
    "dense_cudnn_d128": (bench._mha(128), 6, 128, "cudnn", {}),
    "mlr4_mosaic_d128": (bench._mlr(128, MLR4), 6, 128, "mosaic", {}),
    "mlr4_pallas_d128": (bench._mlr(128, MLR4), 6, 128, "pallas", {}),
    # --chunk64: 64-column q/k chunks (128-byte swizzle; the default is 32)
    "mlr8_mosaic_c64_d64": (bench._mlr(64, MLR8), 12, 64, "mosaic", {"chunk": 64}),
    "mlr4_mosaic_c64_d128": (bench._mlr(128, MLR4), 6, 128, "mosaic", {"chunk": 64}),
    # extras: tile/option variants and the kernel on plain dense attention
    "mlr8_mosaic_bk128_d64": (bench._mlr(64, MLR8), 12, 64, "mosaic", {"block_k": 128}),
    "mlr4_mosaic_bk128_d128": (bench._mlr(128, MLR4), 6, 128, "mosaic", {"block_k": 128}),
    "dense_mosaic_d64": (bench._mha(64), 12, 64, "mosaic", {}),
    "mlr8_xla_d64": (bench._mlr(64, MLR8), 12, 64, "xla", {}),
}


def err(e: BaseException) -> str:
  tb = traceback.format_exception(type(e), e, e.__traceback__)
  return (bench.short_error(e) + "\n" + "".join(tb[-6:]))[:4000]


def fn_of(pattern, impl: str, **kw):
  if impl == "mosaic":
    from structattn.attention.mosaic_mlr import mlr_attention_mosaic
    config = KernelConfig.for_mosaic(block_k=kw.pop("block_k", 64), chunk=kw.pop("chunk", 32))
    if "schedule_barrier" in kw:
      config = dataclasses.replace(config, schedule_barrier=kw.pop("schedule_barrier"))
    return lambda q, k, v: mlr_attention_mosaic(q, k, v, pattern, config, **kw)
  if impl == "pallas":
    from structattn.attention.pallas_mlr import mlr_attention_pallas
    return lambda q, k, v: mlr_attention_pallas(q, k, v, pattern, **kw)
  if impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True,
                                                        implementation="cudnn")
  return lambda q, k, v: dispatch.attention(q, k, v, pattern, impl)


def spec_pattern(cfg, heads, d, t, causal=True):
  spec = bench.from_config(dict(cfg, num_heads=heads, causal=causal), heads * d, t)
  return spec, bench.pattern_of(spec)


def probe(name, kw, t=1024):
  row = dict(probe=name, T=t, kwargs=kw)
  t0 = time.perf_counter()
  try:
    spec, pattern = spec_pattern(bench._mlr(64, MLR8), 2, 64, t)
    args = bench._pallas_inputs(spec, 1, t, jnp.bfloat16, seed=1)
    out = jax.jit(fn_of(pattern, "mosaic", **kw))(*args)
    want = dispatch.attention(*(x.astype(jnp.float32) for x in args), pattern, "xla")
    row["rel_err_out"] = float(jnp.abs(out.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    row["ok"] = row["rel_err_out"] < 2e-2
  except Exception as e:
    row.update(ok=False, error=err(e))
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  return row


def accuracy(name, cfg, d, t, causal=True, heads=2, variants=(("default", {}),)):
  """Rows (one per (label, kernel kwargs) variant) of relative errors vs the float32 XLA
  MLR path."""
  rows = [dict(case=name, T=t, causal=causal, variant=label, kwargs=kw) for label, kw in variants]
  t0 = time.perf_counter()
  try:
    spec, pattern = spec_pattern(cfg, heads, d, t, causal)
    args = bench._pallas_inputs(spec, 1, t, jnp.bfloat16, seed=1)
    w = jax.random.normal(jax.random.key(2), args[2].shape, jnp.float32)

    def out_and_grads(fn, *a):
      out, vjp = jax.vjp(fn, *a)
      return (out,) + vjp(w.astype(out.dtype))

    ref = jax.jit(lambda *a: out_and_grads(fn_of(pattern, "xla"), *a))(
        *(x.astype(jnp.float32) for x in args))
  except Exception as e:
    for row in rows:
      row.update(ok=False, error=err(e))
    return rows
  rows[0]["ref_wall_s"] = round(time.perf_counter() - t0, 2)
  for row in rows:
    t1 = time.perf_counter()
    try:
      fn = fn_of(pattern, "mosaic", **row["kwargs"])
      got = jax.jit(lambda *a: out_and_grads(fn, *a))(*args)
      errs = {n: float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
              for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
      row.update(rel_err=errs, max_rel_err=max(errs.values()), ok=max(errs.values()) < 2e-2)
    except Exception as e:
      row.update(ok=False, error=err(e))
    row["wall_s"] = round(time.perf_counter() - t1, 2)
  return rows


def timing(name, t, args, tags=("fwd", "fwdbwd")):
  cfg, heads, d, impl, kw = CASES[name]
  b = max(1, args.tokens // t)
  row = dict(case=name, T=t, B=b, H=heads, d_head=d, impl=impl, kwargs=kw)
  t0 = time.perf_counter()
  try:
    spec, pattern = spec_pattern(cfg, heads, d, t)
    row.update(flops_fwd=bench.flops.kernel_flops(b, heads, t, d, causal=True),
               flops_fwdbwd=bench.flops.kernel_flops(b, heads, t, d, causal=True, backward=True))
    inputs = bench._pallas_inputs(spec, b, t, jnp.bfloat16)
    fwd = fn_of(pattern, impl, **kw)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    for tag, fn in (("fwd", fwd), ("fwdbwd", jax.value_and_grad(loss, argnums=(0, 1, 2)))):
      if tag in tags:
        bench.time_into(row, tag, fn, inputs, args.iters)
  except Exception as e:
    row["error"] = err(e)
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  return row


def ratios(rows):
  base = {(r["d_head"], r["T"]): r for r in rows if r["impl"] == "cudnn" and r.get("fwdbwd_ms")}
  pal = {(r["d_head"], r["T"]): r for r in rows if r["impl"] == "pallas" and r.get("fwdbwd_ms")}
  for r in rows:
    for tag, ref in (("cudnn", base), ("pallas", pal)):
      b = ref.get((r["d_head"], r["T"]))
      if b and r.get("fwdbwd_ms"):
        if r.get("fwd_ms") and b.get("fwd_ms"):
          r[f"fwd_x_vs_{tag}"] = r["fwd_ms"] / b["fwd_ms"]
        r[f"fwdbwd_x_vs_{tag}"] = r["fwdbwd_ms"] / b["fwdbwd_ms"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="mosaic.json")
  p.add_argument("--time-limit", "--deadline-s", dest="time_limit", type=float, default=190.0,
                 help="start no new step after this many seconds")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--seq-lens", type=bench.ints, default=[4096, 8192, 16384])
  p.add_argument("--probes", action="store_true", help="forward option probes first")
  p.add_argument("--pallas", action="store_true", help="also time the Pallas-Triton kernel")
  p.add_argument("--chunk64", action="store_true",
                 help="also check and time the kernels with 64-column q/k chunks (chunk=64)")
  p.add_argument("--accuracy", default="mlr8_d64,mlr4_d128,mlr3_d64_noncausal",
                 help="accuracy cases to run (comma list; '' for none)")
  p.add_argument("--extras", action="store_true", help="option variants at T=4096")
  args = p.parse_args()
  start = time.perf_counter()
  late = lambda: time.perf_counter() - start > args.time_limit
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  try:
    from jax._src.lib import cuda_versions
    cuda = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
  except Exception as e:  # noqa: BLE001
    cuda = f"unknown: {e}"
  dev = jax.devices()[0]
  res = dict(header=dict(jax=jax.__version__, device=str(dev),
                         device_kind=getattr(dev, "device_kind", None),
                         backend=jax.default_backend(), cuda_runtime=cuda, argv=sys.argv),
             probes=[], accuracy=[], rows=[])
  save, log = bench.recorder(out, res, start, lambda r: ratios(r["rows"]))

  steps = []
  if args.probes:
    steps += [("probe", n, kw) for n, kw in (
        ("default", {}), ("block_k=128", {"block_k": 128}),
        ("no_schedule_barrier", {"schedule_barrier": False}))]
  steps += [("acc", "mlr8_d64", (bench._mlr(64, MLR8), 64, 1024, True)),
            ("acc", "mlr4_d128", (bench._mlr(128, MLR4), 128, 1024, True))]
  main_rows = [("mlr8_mosaic_d64", ("fwd", "fwdbwd")), ("dense_cudnn_d64", ("fwd", "fwdbwd")),
               ("mlr4_mosaic_d128", ("fwd", "fwdbwd")), ("dense_cudnn_d128", ("fwd", "fwdbwd"))]
  if args.chunk64:
    main_rows += [("mlr8_mosaic_c64_d64", ("fwd", "fwdbwd")),
                  ("mlr4_mosaic_c64_d128", ("fwd", "fwdbwd"))]
  if args.pallas:
    main_rows += [("mlr8_pallas_d64", ("fwd", "fwdbwd")), ("mlr4_pallas_d128", ("fwd", "fwdbwd"))]
  steps += [("time", n, (t, tags)) for t in args.seq_lens for n, tags in main_rows]
  steps += [("acc", "mlr3_d64_noncausal",
             ((("variant", "mlr"), ("d_head", 64), ("mlr_ranks", (32, 16, 16)),
               ("mlr_block_sizes", (0, 256, 16)), ("mlr_divide", "block")), 64, 512, False))]
  if args.extras:
    steps += [("time", n, (4096, ("fwd", "fwdbwd"))) for n in (
        "mlr8_mosaic_bk128_d64", "mlr4_mosaic_bk128_d128", "dense_mosaic_d64", "mlr8_xla_d64")]
  wanted = set(filter(None, args.accuracy.split(",")))
  steps = [st for st in steps if st[0] != "acc" or st[1] in wanted]
  for kind, name, a in steps:
    if late():
      log(f"time limit: stopping before {kind} {name}")
      res.setdefault("not_run", []).append(f"{kind} {name} {a[0] if kind == 'time' else ''}")
      continue
    if kind == "probe":
      rs = [probe(name, a)]
      res["probes"] += rs
    elif kind == "acc":
      cfg, d, t, causal = a
      rs = accuracy(name, dict(cfg), d, t, causal, variants=(("default", {}),) + (
          (("chunk64", {"chunk": 64}),) if args.chunk64 else ()))
      res["accuracy"] += rs
    else:
      rs = [timing(name, a[0], args, a[1])]
      res["rows"] += rs
    for r in rs:
      log(f"{kind} {name} {a[0] if kind == 'time' else ''} {r.get('variant', '')} "
          f"{r.get('kwargs', '') if kind == 'acc' else ''}: "
          + json.dumps({k: v for k, v in r.items() if k in (
              "ok", "rel_err", "rel_err_out", "fwd_ms", "fwdbwd_ms", "wall_s", "skipped")})
          + (f" ERROR {r['error'].splitlines()[0]}" if r.get("error") else ""))
    save()
  save()
  for r in res["accuracy"]:
    if r.get("skipped"):
      continue
    e = r.get("rel_err") or {}
    print(f"acc {r['case']:20s} T={r['T']:5d} {r['variant']:8s} ok={r.get('ok')} "
          + " ".join(f"{n} {v:.1e}" for n, v in e.items())
          + (f" {r['error'].splitlines()[0]}" if r.get("error") else ""))
  fwd_of = {(r["d_head"], r["T"], r["impl"]): r["fwd_ms"] for r in res["rows"] if r.get("fwd_ms")}
  for r in res["rows"]:
    f = r.get("fwd_ms") or fwd_of.get((r["d_head"], r["T"], r["impl"]))
    bwd = r["fwdbwd_ms"] - f if f and r.get("fwdbwd_ms") else float("nan")
    print(f"{r['case']:24s} T={r['T']:6d} fwd {r.get('fwd_ms', float('nan')):8.3f} ms  "
          f"fwd+bwd {r.get('fwdbwd_ms', float('nan')):8.3f} ms  bwd~ {bwd:7.3f} ms  "
          f"x_cudnn {r.get('fwdbwd_x_vs_cudnn', float('nan')):.2f}  "
          f"fwd_x_cudnn {r.get('fwd_x_vs_cudnn', float('nan')):.2f}  "
          f"{(r.get('error') or '').splitlines()[0] if r.get('error') else ''}")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
