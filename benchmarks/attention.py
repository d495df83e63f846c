"""Attention benchmark: time and memory of the structured attention cores (or whole layers).

Usage (from the repository root):

  python benchmarks/attention.py                       # defaults for the local backend
  python benchmarks/attention.py --mode layer          # whole Attention layers
  python benchmarks/attention.py --variants mlr8_d64,dense_xla_d64 --seq-lens 1024

Reproduce the docs table (one H100, bf16, B*T = 16384 tokens per step):

  python benchmarks/attention.py --seq-lens 1024,2048,4096,8192,16384
  python benchmarks/attention.py --mode layer --seq-lens 1024,4096,8192

The masked-dense case (impl='reference', L dense TxT tensors) is skipped above
--masked-max-t (default 8192).  mlr4_d128 needs T >= 512 with the default block sizes
T/2^(l-1) (rank 64 <= T/8); shorter T are listed as skipped.

Conventions
  * core mode: random q, k (B, T, H, K) and v (B, T, H, V) with the score pattern of the
    case's spec (`pattern_of(from_config(...))`); level scales are taken as already folded
    into q, so q ~ N(0, 1)/sqrt(K) and k, v ~ N(0, 1).  Causal throughout.
  * layer mode: the whole `Attention` layer (d_model --d-model, heads of 64), input x_BTD;
    fwd+bwd is the gradient of sum(y) w.r.t. x and all parameters.
  * B = max(1, tokens // T), so every row does about the same number of tokens.
  * fwd_ms / fwdbwd_ms: median of --iters runs after one warm-up run (compilation is done
    ahead of time and reported separately as compile_s in the JSON); fwd+bwd is
    value_and_grad of sum(out.astype(float32)) w.r.t. q, k, v (core) or x and params (layer).
  * temp_MiB: XLA's compiled memory analysis of the fwd+bwd executable, temporaries plus
    outputs (inputs excluded); the same number on CPU and GPU.  On GPU, peak_MiB is the
    device allocator's `peak_bytes_in_use` (JSON peak_MiB_cum), a running maximum over the
    whole process: it never goes down, so only increases between rows are informative.
  * TFLOP/s (fwd+bwd): FlashAttention convention `kernel_flops(B, H, T, d, causal=True,
    backward=True)` = 3.5 x 2*B*H*T^2*d for *every* case, dense or not, so at one head dim the
    column is proportional to speed ("effective" TFLOP/s for SWA/GSWA/MLR, which do less work).
    Layer mode adds the dense projections, 6 * B*T * 4*D*H*d.
  * x_vs_cudnn: fwd+bwd time / dense cuDNN fwd+bwd time at the same head dim and T; where cuDNN
    did not run (CPU, float32) the baseline is dense XLA and the table marks the value with '*'
    (the JSON names the baseline in x_vs_baseline).
  * mem_vs_masked (MLR rows): temp_MiB / temp_MiB of the masked-dense MLR at the same T
    (impl='reference': dense TxT scores summed from L masked products, as the reference code).
  * vs_ref_code (layer mode, MLR): reference PyTorch MLR layer fwd+bwd ms / our ms, for the
    reference-code measurements at B*T = 16384 on an H100 (T = 1024, 4096, 8192).  Only
    meaningful on that hardware with --tokens 16384.
Results go to --out as JSON: a header (versions, device, backend, date, argv) and one dict per
row.  Failures (OOM, unsupported configurations) are recorded per row in `error`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
from flax import nnx

from structattn import flops
from structattn.attention import core, dispatch
from structattn.attention.layer import Attention, pattern_of
from structattn.attention.spec import from_config

MLR8 = (32, 8, 6, 4, 4, 4, 4, 2)  # the paper's LM setting (QK MACs 0.6008 x dense at T=1024)
# "MLR 16/32/64/128": the prefix widths d_l = 16, 32, 64, 128 (the contraction width at each
# level), i.e. per-level ranks 16|16|32|64 (they sum to d_head=128).
MLR4_D128 = (16, 16, 32, 64)
# Masked dense holds L TxT score tensors: skipped beyond this T (memory).
MASKED_MAX_T = 8192
# Reference-code (PyTorch) MLR-8 layer, fwd+bwd ms on an H100 at B*T = 16384.
REF_CODE_MS = {1024: 169.0, 4096: 654.0, 8192: 1301.0}
REF_CODE_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class Case:
  """One named benchmark case: an attention config plus the core implementation to run."""
  name: str
  cfg: tuple  # (key, value) pairs of the attention config, without num_heads
  impl: str
  heads: int
  d_head: int
  dense_rank: int | None = None  # x_vs_cudnn baseline preference: 0 cuDNN dense, 1 XLA dense
  masked: str | None = None  # name of the masked-dense case to compare memory with
  ref_code: bool = False


def _mha(d):
  return (("variant", "mha"), ("d_head", d))


def _mlr(d, ranks):
  return (("variant", "mlr"), ("d_head", d), ("mlr_ranks", ranks), ("mlr_divide", "block"))


SWA = (("variant", "swa"), ("d_head", 64), ("window", 512))
GSWA = (("variant", "gswa"), ("d_head", 64), ("gswa_split", (32, 32)), ("window", 512),
        ("gswa_combine", "sum"))

CORE_CASES = (
    Case("dense_cudnn_d64", _mha(64), "cudnn", 12, 64, dense_rank=0),
    Case("dense_xla_d64", _mha(64), "xla", 12, 64, dense_rank=1),
    Case("swa512_d64", SWA, "auto", 12, 64),
    Case("gswa_d64", GSWA, "auto", 12, 64),
    Case("mlr8_d64", _mlr(64, MLR8), "xla", 12, 64, masked="masked_dense_mlr8_d64"),
    Case("masked_dense_mlr8_d64", _mlr(64, MLR8), "reference", 12, 64),
    Case("dense_cudnn_d128", _mha(128), "cudnn", 6, 128, dense_rank=0),
    Case("dense_xla_d128", _mha(128), "xla", 6, 128, dense_rank=1),
    Case("mlr4_d128", _mlr(128, MLR4_D128), "xla", 6, 128),
    # the fused Mosaic GPU kernel (skipped where it cannot run: off GPU, float32)
    Case("mlr8_mosaic_d64", _mlr(64, MLR8), "mosaic", 12, 64),
    Case("mlr4_mosaic_d128", _mlr(128, MLR4_D128), "mosaic", 6, 128),
)

LAYER_CASES = (  # heads = d_model // 64, set from --d-model
    Case("layer_mha_cudnn", _mha(64), "cudnn", 0, 64, dense_rank=0),
    Case("layer_mha_xla", _mha(64), "xla", 0, 64, dense_rank=1),
    Case("layer_mlr8", _mlr(64, MLR8), "xla", 0, 64, ref_code=True),
    Case("layer_mlr8_mosaic", _mlr(64, MLR8), "mosaic", 0, 64, ref_code=True),
)


# ------------------------------------------------------------------------------ helpers


def spec_of(case: Case, t: int, d_model: int | None = None):
  heads = case.heads or d_model // case.d_head
  cfg = dict(case.cfg, num_heads=heads)
  return from_config(cfg, d_model or heads * case.d_head, t)


def skip_reason(case: Case, t: int, shapes, pattern, dtype, masked_max_t: int) -> str | None:
  """Why a case cannot run here (None when it can)."""
  if case.impl == "reference" and t > masked_max_t:
    return f"masked dense skipped above T={masked_max_t} (--masked-max-t)"
  if case.impl == "cudnn":
    q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in shapes)
    ok, why = core.cudnn_supported(q, k, v, pattern)
    if not ok:
      return f"cuDNN: {why}"
  if case.impl in dispatch.KERNEL_IMPLS:
    why = dispatch.kernel_unsupported(case.impl, pattern, dtype, jax.default_backend())
    if why:
      return f"{case.impl}: {why}"
  return None


def kernel_path(case: Case, shapes, pattern, dtype) -> str:
  """Which implementation serves the call: cudnn, reference, pallas, mosaic or xla (our JAX
  cores), as `dispatch.resolve` decides."""
  (_, _, _, dk), (_, _, _, dv) = shapes[0], shapes[2]
  return dispatch.resolve(case.impl, pattern, dtype, dk, dv, jax.default_backend())


def normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def compile_fn(fn, args):
  """Ahead-of-time compile; returns (executable, seconds, temp+output MiB or None)."""
  t0 = time.perf_counter()
  exe = jax.jit(fn).lower(*args).compile()
  secs = time.perf_counter() - t0
  mem = exe.memory_analysis()
  mib = None if mem is None else (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
  return exe, secs, mib


def median_ms(exe, args, iters: int) -> float:
  jax.block_until_ready(exe(*args))  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(exe(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def time_into(row: dict, tag: str, fn, inputs, iters: int) -> None:
  """Compile fn, then record its compile time, temp memory, median ms and TFLOP/s in row."""
  exe, secs, mib = compile_fn(fn, inputs)
  row[f"compile_s_{tag}"] = round(secs, 3)
  row[f"temp_MiB_{tag}"] = mib
  row[f"{tag}_ms"] = median_ms(exe, inputs, iters)
  row[f"tflops_{tag}"] = row[f"flops_{tag}"] / (row[f"{tag}_ms"] * 1e-3) / 1e12


def peak_mib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def short_error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"[:2000]


# ---------------------------------------------------------------------- problem builders


def core_problem(pattern, impl, b, t, h, dk, dv, dtype):
  """(fwd, fwdbwd, args) for the attention core on random q, k, v."""
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  args = (normal(kq, (b, t, h, dk), dtype, 1 / math.sqrt(dk)),
          normal(kk, (b, t, h, dk), dtype), normal(kv, (b, t, h, dv), dtype))

  def fwd(q, k, v):
    return dispatch.attention(q, k, v, pattern, impl)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32))

  return fwd, jax.value_and_grad(loss, argnums=(0, 1, 2)), args


def layer_problem(spec, impl, b, t, dtype):
  """(fwd, fwdbwd, args) for the whole Attention layer; args = (params state, x)."""
  model = Attention(spec, rngs=nnx.Rngs(0), dtype=dtype, zero_init_out=False)
  graphdef, state = nnx.split(model)
  x = normal(jax.random.key(1), (b, t, spec.d_model), dtype)

  def fwd(state, x_BTD):
    return nnx.merge(graphdef, state)(x_BTD, impl=impl)

  def loss(state, x_BTD):
    return jnp.sum(fwd(state, x_BTD).astype(jnp.float32))

  return fwd, jax.value_and_grad(loss, argnums=(0, 1)), (state, x)


# ---------------------------------------------------------------------------------- rows


def kernel_flops_of(spec, b: int, t: int, mode: str) -> tuple[int, int]:
  """(fwd, fwd+bwd) FLOPs: dense causal FlashAttention convention (+ projections in layers)."""
  h, d = spec.num_heads, spec.d_head
  fwd = flops.kernel_flops(b, h, t, d, causal=True)
  both = flops.kernel_flops(b, h, t, d, causal=True, backward=True)
  if mode == "layer":
    proj = 2 * b * t * 4 * spec.d_model * h * d
    fwd, both = fwd + proj, both + 3 * proj
  return fwd, both


def run_case(case: Case, t: int, args) -> dict:
  b = max(1, args.tokens // t)
  d_model = args.d_model if args.mode == "layer" else None
  row = dict(case=case.name, mode=args.mode, T=t, B=b, d_head=case.d_head, impl=case.impl,
             dtype=args.dtype)
  try:
    spec = spec_of(case, t, d_model)
  except ValueError as e:  # e.g. a rank larger than its block at this T
    return dict(row, H=case.heads or None, skipped=f"invalid at this T: {e}")
  h, dk, dv = spec.num_heads, spec.d_qk, spec.d_head
  pattern = pattern_of(spec)
  dtype = jnp.dtype(args.dtype)
  shapes = ((b, t, h, dk), (b, t, h, dk), (b, t, h, dv))
  flop = kernel_flops_of(spec, b, t, args.mode)
  row.update(H=h, qk_mac_ratio=flops.qk_mac_ratio(spec, t, "true_fwd"), flops_fwd=flop[0],
             flops_fwdbwd=flop[1])
  why = skip_reason(case, t, shapes, pattern, dtype, args.masked_max_t)
  if why:
    return dict(row, skipped=why)
  row["path"] = kernel_path(case, shapes, pattern, dtype)
  t0 = time.perf_counter()
  try:
    if args.mode == "layer":
      fwd, fwdbwd, inputs = layer_problem(spec, case.impl, b, t, dtype)
    else:
      fwd, fwdbwd, inputs = core_problem(pattern, case.impl, b, t, h, dk, dv, dtype)
    for tag, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
      time_into(row, tag, fn, inputs, args.iters)
  except Exception as e:  # OOM, unsupported configurations: record and go on.
    row["error"] = short_error(e)
  row["temp_MiB"] = row.get("temp_MiB_fwdbwd")
  row["peak_MiB_cum"] = peak_mib()
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  if case.ref_code and t in REF_CODE_MS and b * t == REF_CODE_TOKENS and "fwdbwd_ms" in row:
    row["ref_code_ms"] = REF_CODE_MS[t]
    row["vs_ref_code"] = REF_CODE_MS[t] / row["fwdbwd_ms"]
  return row


def add_ratios(rows: list[dict], cases: dict[str, Case]) -> None:
  """x_vs_cudnn (time vs the best dense baseline) and mem_vs_masked, in place."""
  ok = {(r["case"], r["T"]): r for r in rows if r.get("fwdbwd_ms")}
  for r in rows:
    case = cases[r["case"]]
    dense = sorted((c.dense_rank, c.name) for c in cases.values()
                   if c.dense_rank is not None and c.d_head == case.d_head
                   and (c.name, r["T"]) in ok)
    if dense and r.get("fwdbwd_ms"):
      base = ok[(dense[0][1], r["T"])]
      r["x_vs_baseline"] = base["case"]
      r["x_vs_cudnn"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
    masked = ok.get((case.masked, r["T"]))
    if masked and r.get("temp_MiB") and masked.get("temp_MiB"):
      r["mem_vs_masked"] = r["temp_MiB"] / masked["temp_MiB"]


# --------------------------------------------------------------------------------- output


def fmt(x, spec: str = ".1f") -> str:
  return "-" if x is None else format(x, spec)


def table(rows: list[dict], gpu: bool, layer: bool) -> str:
  cols = ["case", "T", "B", "path", "fwd_ms", "fwdbwd_ms", "temp_MiB"]
  cols += ["peak_MiB"] if gpu else []
  cols += ["TFLOP/s", "x_vs_cudnn", "mem_vs_masked"]
  cols += ["vs_ref_code"] if layer else []
  cols += ["note"]
  lines = []
  for r in rows:
    vs = r.get("x_vs_cudnn")
    vs_s = "-" if vs is None else f"{vs:.2f}" + ("" if "cudnn" in r["x_vs_baseline"] else "*")
    cell = dict(case=r["case"], T=str(r["T"]), B=str(r["B"]), path=r.get("path", "-"),
                fwd_ms=fmt(r.get("fwd_ms"), ".2f"), fwdbwd_ms=fmt(r.get("fwdbwd_ms"), ".2f"),
                temp_MiB=fmt(r.get("temp_MiB"), ".0f"), peak_MiB=fmt(r.get("peak_MiB_cum"), ".0f"),
                **{"TFLOP/s": fmt(r.get("tflops_fwdbwd"), ".3g"), "x_vs_cudnn": vs_s,
                   "mem_vs_masked": fmt(r.get("mem_vs_masked"), ".3f"),
                   "vs_ref_code": fmt(r.get("vs_ref_code"), ".2f"),
                   "note": (r.get("skipped") or r.get("error") or "")[:100]})
    lines.append([cell[c] for c in cols])
  widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c)
            for i, c in enumerate(cols)]
  out = ["  ".join(c.ljust(w) if i in (0, 3, len(cols) - 1) else c.rjust(w)
                   for i, (c, w) in enumerate(zip(cols, widths))).rstrip()]
  for l in lines:
    out.append("  ".join(s.ljust(w) if i in (0, 3, len(cols) - 1) else s.rjust(w)
                         for i, (s, w) in enumerate(zip(l, widths))).rstrip())
  return "\n".join(out)


def header(args) -> dict:
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              python=platform.python_version(), backend=jax.default_backend(),
              device_kind=dev.device_kind, device_count=jax.device_count(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              argv=sys.argv, config=vars(args))


# ------------------------------------------------------------------- fused Pallas kernel
#
#   python benchmarks/attention.py --pallas [--seq-lens ...] [--time-limit 230]
#
# The fused Pallas-Triton MLR kernel (structattn.attention.pallas_mlr) against
# cuDNN dense attention at the same head dim and the XLA MLR core, in one table, after a
# bf16 accuracy check (float32 masked-dense oracle on the same bf16-rounded inputs) and a
# small tile search at T=4096.  Rows are written to --out as they finish, so a run cut off
# by its time limit keeps what it measured; --time-limit stops starting new steps.

PALLAS_CASES = {  # name: (config, heads, d_head, impl)
    "dense_cudnn_d64": (_mha(64), 12, 64, "cudnn"),
    "mlr8_pallas_d64": (_mlr(64, MLR8), 12, 64, "pallas"),
    "mlr8_xla_d64": (_mlr(64, MLR8), 12, 64, "xla"),
    "dense_pallas_d64": (_mha(64), 12, 64, "pallas"),
    "dense_cudnn_d128": (_mha(128), 6, 128, "cudnn"),
    "mlr4_pallas_d128": (_mlr(128, MLR4_D128), 6, 128, "pallas"),
    "mlr4_xla_d128": (_mlr(128, MLR4_D128), 6, 128, "xla"),
    "dense_pallas_d128": (_mha(128), 6, 128, "pallas"),
}


def _pallas_tile_candidates(d_head: int):
  from structattn.attention.kernel_config import KernelConfig as KC, KernelTiles as KT
  if d_head <= 64:
    return [KC.for_pallas(64), KC(KT(128, 128, 8, 3), KT(128, 64, 8, 2), KT(32, 128, 8, 2)),
            KC(KT(128, 64, 8, 3), KT(128, 64, 8, 3), KT(64, 64, 8, 3))]
  return [KC.for_pallas(128), KC(KT(128, 64, 8, 2), KT(64, 64, 8, 3), KT(64, 64, 8, 3)),
          KC(KT(64, 64, 4, 3), KT(128, 32, 8, 2), KT(64, 64, 8, 2))]


def pallas_fn(pattern, impl: str, config=None, interpret: bool = False):
  if impl == "pallas":
    from structattn.attention.pallas_mlr import mlr_attention_pallas
    return lambda q, k, v: mlr_attention_pallas(q, k, v, pattern, config, interpret=interpret)
  return lambda q, k, v: dispatch.attention(q, k, v, pattern, impl)


def _pallas_inputs(spec, b, t, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  h, dk, dv = spec.num_heads, spec.d_qk, spec.d_head
  return (normal(kq, (b, t, h, dk), dtype, 1 / math.sqrt(dk)), normal(kk, (b, t, h, dk), dtype),
          normal(kv, (b, t, h, dv), dtype))


def pallas_accuracy(name: str, cfg, t: int, b: int = 1, heads: int = 2, causal: bool = True,
                    interpret: bool = False):
  """Relative max-abs error (bf16 kernel vs float32 oracle) of the output and q/k/v grads."""
  spec = from_config(dict(cfg, num_heads=heads, causal=causal), heads * dict(cfg)["d_head"], t)
  pattern = pattern_of(spec)
  args = _pallas_inputs(spec, b, t, jnp.bfloat16, seed=1)
  w = jax.random.normal(jax.random.key(2), args[2].shape, jnp.float32)

  def out_and_grads(fn, *a):
    out, vjp = jax.vjp(fn, *a)
    return (out,) + vjp(w.astype(out.dtype))

  got = jax.jit(lambda *a: out_and_grads(pallas_fn(pattern, "pallas", None, interpret), *a))(*args)
  ref = jax.jit(lambda *a: out_and_grads(pallas_fn(pattern, "reference"), *a))(
      *(x.astype(jnp.float32) for x in args))
  errs = {n: float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
          for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
  return dict(case=name, T=t, causal=causal, levels=len(spec.levels), rel_err=errs,
              max_rel_err=max(errs.values()), ok=max(errs.values()) < 1e-2)


def pallas_row(name: str, t: int, args, tiles=None) -> dict:
  cfg, heads, d, impl = PALLAS_CASES[name]
  b = max(1, args.tokens // t)
  row = dict(case=name, T=t, B=b, H=heads, d_head=d, impl=impl, dtype=args.dtype)
  try:
    spec = from_config(dict(cfg, num_heads=heads), heads * d, t)
  except ValueError as e:
    return dict(row, skipped=f"invalid at this T: {e}")
  pattern = pattern_of(spec)
  row.update(flops_fwd=flops.kernel_flops(b, heads, t, d, causal=True),
             flops_fwdbwd=flops.kernel_flops(b, heads, t, d, causal=True, backward=True))
  if impl == "pallas":
    from structattn.attention.kernel_config import KernelConfig
    tiles = tiles or KernelConfig.for_pallas(d)
    row["tiles"] = dataclasses.asdict(tiles)
  t0 = time.perf_counter()
  try:
    inputs = _pallas_inputs(spec, b, t, jnp.dtype(args.dtype))
    fwd = pallas_fn(pattern, impl, tiles, args.pallas_interpret)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    for tag, fn in (("fwd", fwd), ("fwdbwd", jax.value_and_grad(loss, argnums=(0, 1, 2)))):
      time_into(row, tag, fn, inputs, args.iters)
  except Exception as e:  # OOM, unsupported configurations, compile failures
    row["error"] = short_error(e)
  row["temp_MiB"] = row.get("temp_MiB_fwdbwd")
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  return row


def pallas_ratios(rows):
  base = {(r["d_head"], r["T"]): r for r in rows if r["impl"] == "cudnn" and r.get("fwdbwd_ms")}
  for r in rows:
    b = base.get((r["d_head"], r["T"]))
    if b and r.get("fwdbwd_ms"):
      r["x_vs_cudnn"] = r["fwdbwd_ms"] / b["fwdbwd_ms"]
      r["fwd_x_vs_cudnn"] = r["fwd_ms"] / b["fwd_ms"]


def pallas_table(rows) -> str:
  cols = ["case", "T", "B", "fwd_ms", "fwdbwd_ms", "temp_MiB", "TFLOP/s", "fwd_x", "x_vs_cudnn",
          "note"]
  lines = [cols]
  for r in sorted(rows, key=lambda r: (r["d_head"], r["T"], r["case"])):
    lines.append([r["case"], str(r["T"]), str(r["B"]), fmt(r.get("fwd_ms"), ".2f"),
                  fmt(r.get("fwdbwd_ms"), ".2f"), fmt(r.get("temp_MiB"), ".0f"),
                  fmt(r.get("tflops_fwdbwd"), ".3g"), fmt(r.get("fwd_x_vs_cudnn"), ".2f"),
                  fmt(r.get("x_vs_cudnn"), ".2f"), (r.get("skipped") or r.get("error") or "")[:90]])
  widths = [max(len(l[i]) for l in lines) for i in range(len(cols))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)


def recorder(out: Path, result: dict, start: float, finalize=lambda result: None):
  """(save, log) for a long GPU run: save() applies finalize, stamps the elapsed time and
  rewrites `out` (so a run cut off keeps what it measured); log(msg) prints it to stderr with
  the elapsed time."""

  def save():
    finalize(result)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")

  def log(msg):
    print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

  return save, log


def pallas_main(args) -> None:
  """Accuracy check, tile search at T=4096, then the timing table (see the section note)."""
  start = time.perf_counter()
  late = lambda: args.time_limit and time.perf_counter() - start > args.time_limit
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = dict(header=header(args), accuracy=[], tuning=[], rows=[])
  save, log = recorder(out, result, start, lambda r: pallas_ratios(r["rows"]))

  checks = [("mlr8_d64", _mlr(64, MLR8), 1024, True),
            ("mlr4_d128", _mlr(128, MLR4_D128), 1024, True),
            ("mlr3_d64_noncausal", (("variant", "mlr"), ("d_head", 64), ("mlr_ranks", (32, 16, 16)),
                                    ("mlr_block_sizes", (0, 256, 16)), ("mlr_divide", "block")),
             512, False)]
  if not args.skip_check:
    for name, cfg, t, causal in checks:
      try:
        acc = pallas_accuracy(name, dict(cfg), t, causal=causal, interpret=args.pallas_interpret)
      except Exception as e:
        acc = dict(case=name, T=t, causal=causal, error=short_error(e), ok=False)
      result["accuracy"].append(acc)
      log(f"accuracy {acc}")
      save()
  best = {}
  if args.tune_t and not late():
    for name, d in (("mlr8_pallas_d64", 64), ("mlr4_pallas_d128", 128)):
      cands = []
      for i, tiles in enumerate(_pallas_tile_candidates(d)):
        if late():
          break
        row = dict(pallas_row(name, args.tune_t, args, tiles), candidate=i)
        result["tuning"].append(row)
        cands.append((row, tiles))
        log(f"tune {name} #{i}: fwd {row.get('fwd_ms')} fwd+bwd {row.get('fwdbwd_ms')} "
            f"{row.get('error', '')}")
        save()
      ok = [(r, tl) for r, tl in cands if r.get("fwdbwd_ms")]
      if ok:  # best forward tiles and best backward tiles (fwd+bwd minus fwd)
        f = min(ok, key=lambda c: c[0]["fwd_ms"])[1]
        b = min(ok, key=lambda c: c[0]["fwdbwd_ms"] - c[0]["fwd_ms"])[1]
        best[name] = dataclasses.replace(b, fwd=f.fwd)
  order = [(t, n) for t in args.seq_lens for n in ("dense_cudnn_d64", "mlr8_pallas_d64",
                                                   "dense_cudnn_d128", "mlr4_pallas_d128")]
  if args.extra_rows is not None:  # "case@T,case@T"
    extra = [(int(e.split("@")[1]), e.split("@")[0]) for e in args.extra_rows.split(",") if e]
  else:
    extra = [(t, n) for t in args.seq_lens[:2] for n in ("mlr8_xla_d64", "mlr4_xla_d128")]
    extra += [(t, n) for t in args.seq_lens[:2] for n in ("dense_pallas_d64", "dense_pallas_d128")]
    extra += [(t, n) for t in args.seq_lens[2:] for n in ("mlr8_xla_d64", "mlr4_xla_d128")]
  for t, name in order + extra:
    if late():
      log(f"time limit: stopping before {name} T={t}")
      break
    row = pallas_row(name, t, args, best.get(name))
    result["rows"].append(row)
    log(f"{name} T={t}: fwd {fmt(row.get('fwd_ms'), '.2f')} ms, fwd+bwd "
        f"{fmt(row.get('fwdbwd_ms'), '.2f')} ms {row.get('error', row.get('skipped', ''))}")
    save()
  save()
  h = result["header"]
  print(f"\n{h['device_kind']} ({h['backend']}), jax {h['jax']}, dtype {args.dtype}, "
        f"B*T={args.tokens}, median of {args.iters}; x = time / cuDNN time at the same head dim")
  for acc in result["accuracy"]:
    print(f"accuracy {acc['case']} T={acc['T']}: {acc.get('rel_err', acc.get('error'))}")
  print(pallas_table(result["rows"]))
  print(f"wrote {out}")


# ----------------------------------------------------------------------------------- main


def ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
  gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq-lens", type=ints,
                 default=[1024, 2048, 4096, 8192, 16384] if gpu else [256, 512])
  p.add_argument("--tokens", type=int, default=16384 if gpu else 4096,
                 help="B*T per step; B = max(1, tokens // T)")
  p.add_argument("--variants", default=None, help="comma list of case names (default: all)")
  p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
  p.add_argument("--mode", choices=("core", "layer"), default="core")
  p.add_argument("--iters", type=int, default=10 if gpu else 3)
  p.add_argument("--masked-max-t", type=int, default=MASKED_MAX_T,
                 help="skip the masked-dense (impl='reference') case above this T")
  p.add_argument("--d-model", type=int, default=768, help="layer mode width (heads of 64)")
  p.add_argument("--pallas", action="store_true",
                 help="fused Pallas-Triton MLR kernel vs cuDNN and XLA MLR (see pallas_main)")
  p.add_argument("--time-limit", "--deadline-s", dest="time_limit", type=float, default=None,
                 help="--pallas: start no new step after this many seconds")
  p.add_argument("--tune-t", type=int, default=4096, help="--pallas: T of the tile search (0: off)")
  p.add_argument("--skip-check", action="store_true", help="--pallas: skip the accuracy check")
  p.add_argument("--extra-rows", default=None,
                 help="--pallas: rows after the main ones, 'case@T,...' (default: XLA MLR and "
                 "Pallas dense at the first two --seq-lens, then XLA MLR at the others)")
  p.add_argument("--pallas-interpret", action="store_true",
                 help="--pallas: Pallas interpreter (CPU dry run of the script)")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/attention[-layer]-<backend>.json)")
  args = p.parse_args(argv)
  cases = LAYER_CASES if args.mode == "layer" else CORE_CASES
  names = [c.name for c in cases]
  args.variants = args.variants.split(",") if args.variants else names
  unknown = [v for v in args.variants if v not in names]
  if unknown:
    p.error(f"unknown --variants {unknown} for --mode {args.mode}; choose from {names}")
  if args.mode == "layer" and args.d_model % 64:
    p.error(f"--d-model={args.d_model} must be a multiple of the head width 64")
  if args.out is None:
    stem = "attention-layer" if args.mode == "layer" else "attention"
    stem = "attention-pallas" if args.pallas else stem
    args.out = str(Path(__file__).resolve().parent / "results"
                   / f"{stem}-{jax.default_backend()}.json")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.pallas:
    return pallas_main(args)
  cases = {c.name: c for c in (LAYER_CASES if args.mode == "layer" else CORE_CASES)}
  selected = [cases[v] for v in args.variants]
  rows = []
  head = header(args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():  # after every row, so a run cut off by its time limit keeps what it measured
    add_ratios(rows, cases)
    out.write_text(json.dumps(dict(header=head, rows=rows), indent=1) + "\n")

  for t in args.seq_lens:
    for case in selected:
      row = run_case(case, t, args)
      rows.append(row)
      status = row.get("skipped") or row.get("error") or (
          f"fwd {fmt(row.get('fwd_ms'), '.2f')} ms, fwd+bwd {fmt(row.get('fwdbwd_ms'), '.2f')} ms")
      print(f"[{case.name} T={t} B={row['B']}] {status}", file=sys.stderr, flush=True)
      save()
  save()
  print(f"\n{head['device_kind']} ({head['backend']}), jax {head['jax']}, {args.mode} mode, "
        f"dtype {args.dtype}, B*T={args.tokens}, median of {args.iters}")
  print(table(rows, head["backend"] == "gpu", args.mode == "layer"))
  if any(r.get("x_vs_cudnn") is not None and "cudnn" not in r["x_vs_baseline"] for r in rows):
    print("* x_vs_cudnn relative to dense XLA (cuDNN did not run)")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
