"""Training throughput and MFU of a GPT-2-small-sized model with each attention variant.

    python benchmarks/train_throughput.py                       # GPU defaults
    python benchmarks/train_throughput.py --variants mha,mlr --layers 12 --width 768
    python benchmarks/train_throughput.py --variants mha,mlr,mlr_pallas,mlr_mosaic   # fused MLR kernels

Model: 12 layers, width 768, 12 heads x 64, T=1024, GPT-2 vocabulary (50,257 padded to
50,304), tied embeddings, bf16 compute with fp32 parameters and AdamW, synthetic tokens (the
input pipeline is not measured).  One train step = the library's jitted `train_step` with
donation.  MFU = tokens/s x true training FLOPs per token (6 x forward MACs with causal pair
counts, LM head included; `structattn.flops.model_flops`) / (the card's dense bf16 peak,
`structattn.hardware.peak_flops` by device kind, x devices); no MFU (null) on an unknown card.
Prints one table and writes JSON (default benchmarks/results/train-<backend>.json).

    python benchmarks/train_throughput.py --variants mha --mesh 1,1,1     # sharded-path cost
    python benchmarks/train_throughput.py --variants mha --mesh 2,1,1     # 2 GPUs, data parallel

Speed options (`--options`, timed in alternating rounds in one process; see --help for what
each removes) and XLA flags (`--xla-flags`, set before jax starts; one process per flag set:
benchmarks/throughput_matrix.py drives the whole matrix):

    python benchmarks/train_throughput.py --variants mha --options baseline,fused_opt,all
    python benchmarks/train_throughput.py --variants mha --options all \
        --xla-flags=--xla_gpu_enable_latency_hiding_scheduler=true

`--mesh data,fsdp,tensor` times the unsharded step on one device and the sharded step
(`structattn.sharding`, `train.ShardedStep`) on that mesh in the same run, in alternating rounds,
with args.batch sequences per batch shard; it reports the overhead (mesh of one device) or the
scaling efficiency (tokens/s per device against the one-device unsharded step).
"""

from __future__ import annotations

import os
import sys


def _xla_flags_from_argv(argv):
  """The value of --xla-flags in argv (or None): XLA reads XLA_FLAGS once, when jax starts."""
  for i, a in enumerate(argv):
    if a.startswith("--xla-flags="):
      return a.split("=", 1)[1]
    if a == "--xla-flags" and i + 1 < len(argv):
      return argv[i + 1]
  return None


if __name__ == "__main__" and _xla_flags_from_argv(sys.argv[1:]):
  os.environ["XLA_FLAGS"] = " ".join(
      x for x in (os.environ.get("XLA_FLAGS", ""), _xla_flags_from_argv(sys.argv[1:])) if x)

import argparse
import datetime
import functools
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structattn.configs import lm as lm_configs
from structattn import flops as flops_lib
from structattn import losses
from structattn import profiling
from structattn import sharding
from structattn.models.gpt import GPT, GPTConfig, param_counts
from structattn.optim import make_optimizer
from structattn.hardware import peak_flops
from structattn.train import ShardedStep, loss_fn, shard_state, train_step

VARIANTS = {
    "mha": dict(variant="mha"),
    "mlr": dict(variant="mlr", mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2), mlr_divide="block"),
    "mlr_pallas": dict(variant="mlr", mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2), mlr_divide="block",
                       impl="pallas"),  # the fused Pallas-Triton MLR kernel
    "mlr_mosaic": dict(variant="mlr", mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2), mlr_divide="block",
                       impl="mosaic"),  # Mosaic GPU forward and backward
    "swa": dict(variant="swa", window=512),
    "gswa": dict(variant="gswa", gswa_split=(32, 32), window=512, gswa_combine="sum"),
}


# Speed options: config overrides, each measurable alone and together.
OPTIONS = {
    "baseline": {},
    "fused_opt": {"train.fused_optimizer": True},
    "fused_xent": {"train.fused_xent": True},
    "bf16_residual": {"model.residual_dtype": "bfloat16"},
}
OPTIONS["all"] = {k: v for name in ("fused_opt", "fused_xent", "bf16_residual")
                  for k, v in OPTIONS[name].items()}
# Architecture, not speed: the paper's QK-LayerNorm off, as in nanoGPT-style peers (it is not
# in the FLOP count, so it lowers MFU without changing the work counted).
OPTIONS["no_qk_norm"] = {"attention.qk_norm": False}
OPTIONS["all_no_qk_norm"] = {**OPTIONS["all"], **OPTIONS["no_qk_norm"]}
OPTIONS_HELP = """comma-separated speed options, timed in alternating rounds in one process:
baseline (today's defaults); fused_opt (train.fused_optimizer: the Adam update over flat
vectors, a few large kernels instead of several per parameter, the global norm computed once for
the clip and the log); fused_xent (train.fused_xent: structattn.losses
cross-entropy, no float32 copy of the (B,T,V) logits, softmax - onehot written in bf16 in one
pass); bf16_residual (model.residual_dtype=bfloat16: the residual stream and its gradient in
bf16, no float32 adds and casts per layer; LayerNorm statistics still float32); all (the
three together); no_qk_norm (attention.qk_norm=False: an architecture change, the
queries' and keys' LayerNorm off as in nanoGPT-style models); all_no_qk_norm (both)"""


def options_for(names):
  """The option sets named in a comma-separated list (validated)."""
  out = [n.strip() for n in names.split(",") if n.strip()] or ["baseline"]
  bad = [n for n in out if n not in OPTIONS]
  if bad:
    raise SystemExit(f"unknown --options {bad}: allowed {sorted(OPTIONS)}")
  return out


def config_for(variant, args, options="baseline"):
  base = variant.split("_")[0]
  c = lm_configs.get_config(f"paper-{base if base in lm_configs.PAPER_VARIANTS else 'mha'}-768")
  c.model.update(d_model=args.width, num_layers=args.layers, seq_len=args.seq_len,
                 tie_embeddings=True, dtype=args.dtype)
  c.attention.update(num_heads=args.width // 64, d_head=64, **VARIANTS[variant])
  c.train.update(batch_size=args.batch, warmup_steps=10, steps=1000)
  for key, value in OPTIONS[options].items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def mfu(flops_per_s: float, devices: int, device=None) -> float | None:
  """Model-FLOPs utilisation against the peak of the card in use (None when unknown)."""
  peak = peak_flops(device if device is not None else jax.devices()[0])
  return None if peak is None else flops_per_s / (peak * devices)


class Runner:
  """One jitted train step (unsharded, or on a (data, fsdp, tensor) mesh) and its state.

  On a mesh the global batch is args.batch sequences per batch shard (weak scaling), placed
  with `Layout.put_batch`; the step is `structattn.train.ShardedStep` (in/out shardings,
  donation).  With `mesh` of size 1 this is the sharded code path on one device."""

  def __init__(self, variant, args, mesh=None, options="baseline"):
    self.variant, self.mesh, self.options = variant, mesh, options
    config = config_for(variant, args, options)
    cfg = GPTConfig.from_config(config, args.vocab)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    self.counts = param_counts(model)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    tx, _ = make_optimizer(config.train, params_state)
    opt_state = tx.init(params)
    loss = losses.lm_loss if config.train.get("fused_xent", False) else loss_fn
    fn = functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, accum=1, loss=loss)
    self.layout = None
    shards = 1
    if mesh is not None:
      devices = jax.devices()[:math.prod(mesh)]
      self.layout = sharding.Layout(sharding.make_mesh(mesh, devices=devices))
      shards = self.layout.size("batch")
    self.devices = 1 if mesh is None else math.prod(mesh)
    self.batch_size = args.batch * shards
    rng = np.random.default_rng(0)
    toks = rng.integers(0, args.vocab, size=(self.batch_size, args.seq_len + 1), dtype=np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    if self.layout is None:
      self.step = jax.jit(fn, donate_argnums=(0, 1))
      batch = jax.tree.map(jnp.asarray, batch)
    else:
      params, opt_state, p_sh, o_sh = shard_state(self.layout, params_state, params, opt_state)
      batch = self.layout.put_batch(batch)
      self.step = ShardedStep(self.layout, fn, p_sh, o_sh).jit(batch)
    self.state, self.batch = (params, opt_state), batch
    self.tokens = self.batch_size * args.seq_len
    self.fl = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, args.vocab)
    self.times, self.pipelined, self.metrics, self.profile = [], [], None, None

  def compile(self):
    t0 = time.time()
    compiled = self.step.lower(*self.state, self.batch).compile()
    self.compile_s = time.time() - t0
    self.step = compiled  # run the AOT executable (no second compile on the first call)
    mem = compiled.memory_analysis()
    self.temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else None
    return self

  def run(self, n, timed=True):
    params, opt_state = self.state
    for _ in range(n):
      t = time.perf_counter()
      params, opt_state, m = self.step(params, opt_state, self.batch)
      jax.block_until_ready(m)
      if timed:
        self.times.append(time.perf_counter() - t)
    self.state, self.metrics = (params, opt_state), m
    return self

  def run_pipelined(self, n):
    """n steps dispatched back to back, one sync at the end (as the trainer runs between log
    steps): the step time without the host's dispatch latency exposed."""
    params, opt_state = self.state
    t = time.perf_counter()
    for _ in range(n):
      params, opt_state, m = self.step(params, opt_state, self.batch)
    jax.block_until_ready(m)
    self.pipelined.append((time.perf_counter() - t) / n)
    self.state, self.metrics = (params, opt_state), m
    return self

  def trace(self, n, log_dir):
    """Profile n untimed steps; keep the time per op on the device (ms per step, top 40 ops)."""
    self.run(1, timed=False)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      self.run(n, timed=False)
    backend = jax.default_backend()
    process = "/host:CPU" if backend == "cpu" else f"/device:{backend.upper()}:0"
    self.profile = profiling.op_times(profiling.load_trace(log_dir), n, process, top=40)
    return self

  def result(self):
    dt = statistics.median(self.times)
    tok_s = self.tokens / dt
    mesh = None if self.mesh is None else dict(zip(sharding.MESH_AXES, self.mesh))
    return dict(variant=self.variant, options=self.options, overrides=OPTIONS[self.options],
                mesh=mesh, devices=self.devices, batch=self.batch_size, step_ms=dt * 1e3,
                pipelined_step_ms=(statistics.median(self.pipelined) * 1e3 if self.pipelined
                                   else None),
                tokens_per_s=tok_s, tokens_per_s_per_device=tok_s / self.devices,
                mfu=mfu(tok_s * self.fl["train_flops_per_token"], self.devices),
                train_flops_per_token=self.fl["train_flops_per_token"],
                paper_macs_per_token=self.fl["paper_macs_per_token"], compile_s=self.compile_s,
                temp_MiB=self.temp_mib, loss=float(self.metrics["train/loss"]),
                timed_steps=len(self.times), params=self.counts,
                **({"profile": self.profile} if self.profile else {}))


def measure(runners, args):
  """Compile, warm up, then time the runners in alternating rounds (so drift hits all)."""
  for r in runners:
    r.compile().run(args.warmup, timed=False)
  rounds = max(1, args.rounds)
  for _ in range(rounds):
    for r in runners:
      r.run(max(1, args.iters // rounds))
      if args.pipelined:
        r.run_pipelined(args.pipelined)
  if args.profile:
    for r in runners:
      r.trace(3, Path(args.profile) / (f"{r.variant}-{r.options}-"
                                       f"{'x'.join(map(str, r.mesh or ())) or 'jit'}"))
  return [r.result() for r in runners]


def bench(variant, args, options="baseline"):
  return measure([Runner(variant, args, options=options)], args)[0]


def print_table(rows, header):
  """One line per row: variant, options, mesh, step time, tokens/s, MFU, compile, loss."""
  print(f"\n{header}")
  print(f"{'variant':8s} {'options':14s} {'xla':8s} {'mesh':>6s} {'step_ms':>8s} {'pipe_ms':>8s} "
        f"{'tokens/s':>9s} {'per dev':>9s} {'MFU':>6s} {'compile_s':>9s} {'loss':>8s}")
  for r in rows:
    name, opts, xla = r.get("variant", "?"), r.get("options", "-"), r.get("xla", "-") or "-"
    if "error" in r:
      print(f"{name:8s} {opts:14s} {xla:8s} error: {r['error']}")
      continue
    m = "-" if not r.get("mesh") else ",".join(str(x) for x in r["mesh"].values())
    pipe = r.get("pipelined_step_ms")
    print(f"{name:8s} {opts:14s} {xla:8s} {m:>6s} {r['step_ms']:8.2f} "
          f"{pipe if pipe is not None else float('nan'):8.2f} {r['tokens_per_s']:9.0f} "
          f"{r['tokens_per_s_per_device']:9.0f} "
          f"{'-' if r.get('mfu') is None else format(100 * r['mfu'], '.1f') + '%':>6s} "
          f"{r['compile_s']:9.1f} "
          f"{r['loss']:8.4f}" + (f"  vs unsharded: {r['vs_unsharded']}"
                                 if r.get("vs_unsharded") else ""))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="mha,mlr")
  p.add_argument("--options", default="baseline", help=OPTIONS_HELP)
  p.add_argument("--xla-flags", default="", help="XLA flags for this process (set in XLA_FLAGS "
                 "before jax starts; only when run as a script), e.g. "
                 "--xla-flags=--xla_gpu_enable_latency_hiding_scheduler=true")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=0, help="sequences per step (default 16 on GPU)")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=1, help="alternating timing rounds")
  p.add_argument("--pipelined", type=int, default=0, help="per round, also time this many steps "
                 "dispatched back to back with one sync at the end (column pipe_ms)")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor: also time the sharded step on "
                 "this mesh (first prod(mesh) devices) against the unsharded one")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="", help="a label for the xla column and the JSON rows")
  p.add_argument("--profile", default="", help="directory: also trace 3 steps per variant and "
                 "record the time per op on the device (ms per step) in the JSON")
  args = p.parse_args(argv)
  if args.xla_flags and args.xla_flags not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("--xla-flags takes effect only when this file runs as a script (XLA reads "
                     "XLA_FLAGS when jax starts)")
  options = options_for(args.options)
  cpu = jax.default_backend() == "cpu"
  if cpu and args.layers == 12 and args.width == 768:  # keep the CPU smoke run small
    args.layers, args.width, args.seq_len, args.vocab, args.iters = 2, 128, 256, 512, 2
  args.batch = args.batch or (2 if cpu else 16)
  rows = []
  mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
  for v in args.variants.split(","):
    v = v.strip()
    new = []
    try:
      runners = []
      for o in options:
        runners.append(Runner(v, args, options=o))
        if mesh is not None:
          runners.append(Runner(v, args, mesh, options=o))
      new = measure(runners, args)
      if mesh is not None:
        for base, sharded in zip(new[::2], new[1::2]):
          ratio = base["tokens_per_s"] / sharded["tokens_per_s_per_device"]
          sharded["vs_unsharded"] = dict(
              overhead=ratio - 1.0 if sharded["devices"] == 1 else None,
              scaling_efficiency=1.0 / ratio)
    except Exception as e:  # noqa: BLE001  (record and continue)
      new = [dict(variant=v, options=args.options, error=f"{type(e).__name__}: {str(e)[:300]}")]
    for r in new:
      r["xla"], r["xla_flags"] = args.tag, os.environ.get("XLA_FLAGS", "")
      print(json.dumps({k: x for k, x in r.items() if k not in ("params", "profile")}),
            flush=True)
      for op in r.get("profile", [])[:15]:
        print(f"  {op['ms_per_step']:8.3f} ms {op['calls']:6.1f}x  {op['thread'][:24]:24s} "
              f"{op['name'][:90]}")
    rows += new
  dev = jax.devices()[0]
  print_table(rows, f"{getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}, "
              f"{args.layers} layers x {args.width}, T={args.seq_len}, batch {args.batch}"
              + (f", XLA_FLAGS={os.environ.get('XLA_FLAGS')}" if os.environ.get("XLA_FLAGS")
                 else ""))
  out = Path(args.out or f"benchmarks/results/train-{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      header=dict(jax=jax.__version__, device=getattr(dev, "device_kind", dev.platform),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  argv=sys.argv if argv is None else list(argv), config=vars(args),
                  xla_flags=os.environ.get("XLA_FLAGS", "")), rows=rows), indent=1))
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
