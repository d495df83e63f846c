"""One-shot H100 check of the Mosaic GPU MLR kernel (structattn.attention.mosaic_mlr).

  python3 scripts/gpu_check_mosaic.py --out $OUT/mosaic.json [--deadline-s 200] [--iters 5]

1. probes: compile + run the forward at T=1024 (8 levels, d64) with each kernel option
   (default, block_k=128, no schedule barrier, PV into a fresh accumulator), so a failure
   of one feature is told apart from the others;
2. accuracy: bf16 Mosaic forward / Triton backward vs the XLA MLR path in float32 on the
   same bf16-rounded inputs (relative max-abs error of out, dq, dk, dv): 8 levels
   32|8|6|4|4|4|4|2 at d_head 64 and 4 levels with prefix widths 16|32|64|128 (ranks
   16|16|32|64, benchmarks/attention.py MLR4_D128) at d_head 128 (block sizes
   T/2^(l-1), finest 8 tokens at T=1024), causal, plus a non-causal 3-level case;
3. timing: fwd and fwd+bwd of cuDNN dense (is_causal), the Mosaic MLR kernel and the
   Pallas-Triton MLR kernel for T in 1024, 4096, 8192, 16384 at B*T = 16384 tokens,
   12 heads at d64 / 6 heads at d128 (helpers of benchmarks/attention.py).
Every case runs in its own try/except; errors are recorded in the JSON, which is rewritten
after every step.  No new step starts after --deadline-s.
"""

from __future__ import annotations

import argparse
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

from structattn.attention import core  # noqa: E402

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
    return lambda q, k, v: mlr_attention_mosaic(q, k, v, pattern, **kw)
  if impl == "pallas":
    from structattn.attention.pallas_mlr import mlr_attention_pallas
    return lambda q, k, v: mlr_attention_pallas(q, k, v, pattern, **kw)
  if impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True,
                                                        implementation="cudnn")
  return lambda q, k, v: core.attention(q, k, v, pattern, impl)


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
    want = core.attention(*(x.astype(jnp.float32) for x in args), pattern, "xla")
    row["rel_err_out"] = float(jnp.abs(out.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    row["ok"] = row["rel_err_out"] < 2e-2
  except Exception as e:
    row.update(ok=False, error=err(e))
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  return row


def accuracy(name, cfg, d, t, causal=True, heads=2, **kw):
  row = dict(case=name, T=t, causal=causal, kwargs=kw)
  t0 = time.perf_counter()
  try:
    spec, pattern = spec_pattern(cfg, heads, d, t, causal)
    args = bench._pallas_inputs(spec, 1, t, jnp.bfloat16, seed=1)
    w = jax.random.normal(jax.random.key(2), args[2].shape, jnp.float32)

    def out_and_grads(fn, *a):
      out, vjp = jax.vjp(fn, *a)
      return (out,) + vjp(w.astype(out.dtype))

    got = jax.jit(lambda *a: out_and_grads(fn_of(pattern, "mosaic", **kw), *a))(*args)
    ref = jax.jit(lambda *a: out_and_grads(fn_of(pattern, "xla"), *a))(
        *(x.astype(jnp.float32) for x in args))
    errs = {n: float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
            for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    row.update(rel_err=errs, max_rel_err=max(errs.values()), ok=max(errs.values()) < 2e-2)
  except Exception as e:
    row.update(ok=False, error=err(e))
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  return row


def timing(name, t, args):
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
        r[f"fwd_x_vs_{tag}"] = r["fwd_ms"] / b["fwd_ms"]
        r[f"fwdbwd_x_vs_{tag}"] = r["fwdbwd_ms"] / b["fwdbwd_ms"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="mosaic.json")
  p.add_argument("--deadline-s", type=float, default=200.0)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--seq-lens", type=bench.ints, default=[1024, 4096, 8192, 16384])
  args = p.parse_args()
  start = time.perf_counter()
  late = lambda: time.perf_counter() - start > args.deadline_s
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

  def save():
    ratios(res["rows"])
    res["elapsed_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(res, indent=1) + "\n")

  def log(msg):
    print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

  steps = [("probe", n, kw) for n, kw in (
      ("default", {}), ("block_k=128", {"block_k": 128}),
      ("no_schedule_barrier", {"schedule_barrier": False}), ("acc_fresh", {"acc_init": False}))]
  steps += [("acc", "mlr8_d64", (bench._mlr(64, MLR8), 64, 1024, True)),
            ("acc", "mlr4_d128", (bench._mlr(128, MLR4), 128, 1024, True)),
            ("acc", "mlr3_d64_noncausal",
             ((("variant", "mlr"), ("d_head", 64), ("mlr_ranks", (32, 16, 16)),
               ("mlr_block_sizes", (0, 256, 16)), ("mlr_divide", "block")), 64, 512, False))]
  main_rows = ("dense_cudnn_d64", "mlr8_mosaic_d64", "mlr8_pallas_d64",
               "dense_cudnn_d128", "mlr4_mosaic_d128", "mlr4_pallas_d128")
  steps += [("time", n, t) for t in args.seq_lens for n in main_rows]
  steps += [("time", n, 4096) for n in ("mlr8_mosaic_bk128_d64", "mlr4_mosaic_bk128_d128",
                                        "dense_mosaic_d64", "mlr8_xla_d64")]
  for kind, name, a in steps:
    if late():
      log(f"deadline: stopping before {kind} {name}")
      res.setdefault("not_run", []).append(f"{kind} {name} {a if kind == 'time' else ''}")
      continue
    if kind == "probe":
      r = probe(name, a)
      res["probes"].append(r)
    elif kind == "acc":
      cfg, d, t, causal = a
      r = accuracy(name, dict(cfg), d, t, causal)
      res["accuracy"].append(r)
    else:
      r = timing(name, a, args)
      res["rows"].append(r)
    log(f"{kind} {name} {a if kind == 'time' else ''}: "
        + json.dumps({k: v for k, v in r.items() if k in (
            "ok", "rel_err", "rel_err_out", "fwd_ms", "fwdbwd_ms", "wall_s")})
        + (f" ERROR {r['error'].splitlines()[0]}" if r.get("error") else ""))
    save()
  save()
  for r in res["rows"]:
    print(f"{r['case']:24s} T={r['T']:6d} fwd {r.get('fwd_ms', float('nan')):8.3f} ms  "
          f"fwd+bwd {r.get('fwdbwd_ms', float('nan')):8.3f} ms  "
          f"x_cudnn {r.get('fwdbwd_x_vs_cudnn', float('nan')):.2f}  "
          f"fwd_x_cudnn {r.get('fwd_x_vs_cudnn', float('nan')):.2f}  "
          f"{(r.get('error') or '').splitlines()[0] if r.get('error') else ''}")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
