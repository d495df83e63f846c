"""Training throughput and MFU of a GPT-2-small-sized model with each attention variant.

    python benchmarks/train_throughput.py                       # GPU defaults
    python benchmarks/train_throughput.py --variants mha,mlr --layers 12 --width 768

Model: 12 layers, width 768, 12 heads x 64, T=1024, GPT-2 vocabulary (50,257 padded to
50,304), tied embeddings, bf16 compute with fp32 parameters and AdamW, synthetic tokens (the
input pipeline is not measured).  One train step = the library's jitted `train_step` with
donation.  MFU = tokens/s x true training FLOPs per token (6 x forward MACs with causal pair
counts, LM head included; `structattn.flops.model_flops`) / (989 TFLOP/s x devices).
Prints one table and writes JSON (default benchmarks/results/train-<backend>.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import lm as lm_configs
from structattn import flops as flops_lib
from structattn.models.gpt import GPT, GPTConfig, param_counts
from structattn.optim import make_optimizer
from structattn.train import H100_BF16_PEAK, train_step

VARIANTS = {
    "mha": dict(variant="mha"),
    "mlr": dict(variant="mlr", mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2), mlr_divide="block"),
    "swa": dict(variant="swa", window=512),
    "gswa": dict(variant="gswa", gswa_split=(32, 32), window=512, gswa_combine="sum"),
}


def config_for(variant, args):
  c = lm_configs.get_config(f"paper-{variant if variant in lm_configs.PAPER_VARIANTS else 'mha'}-768")
  c.model.update(d_model=args.width, num_layers=args.layers, seq_len=args.seq_len,
                 tie_embeddings=True, dtype=args.dtype)
  c.attention.update(num_heads=args.width // 64, d_head=64, **VARIANTS[variant])
  c.train.update(batch_size=args.batch, warmup_steps=10, steps=1000)
  return c


def bench(variant, args):
  config = config_for(variant, args)
  cfg = GPTConfig.from_config(config, args.vocab)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, _ = make_optimizer(config.train, params_state)
  opt_state = tx.init(params)
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, accum=1),
                 donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, args.vocab, size=(args.batch, args.seq_len + 1), dtype=np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
  t0 = time.time()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else None
  for _ in range(args.warmup):
    params, opt_state, m = step(params, opt_state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.iters):
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dt = statistics.median(times)
  tokens = args.batch * args.seq_len
  fl = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, args.vocab)
  tok_s = tokens / dt
  return dict(variant=variant, step_ms=dt * 1e3, tokens_per_s=tok_s,
              mfu=tok_s * fl["train_flops_per_token"] / (H100_BF16_PEAK * jax.device_count()),
              train_flops_per_token=fl["train_flops_per_token"],
              paper_macs_per_token=fl["paper_macs_per_token"], compile_s=compile_s,
              temp_MiB=temp_mib, loss=float(m["train/loss"]), params=param_counts(model))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default="mha,mlr")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=0, help="sequences per step (default 16 on GPU)")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  cpu = jax.default_backend() == "cpu"
  if cpu and args.layers == 12 and args.width == 768:  # keep the CPU smoke run small
    args.layers, args.width, args.seq_len, args.vocab, args.iters = 2, 128, 256, 512, 2
  args.batch = args.batch or (2 if cpu else 16)
  rows = []
  for v in args.variants.split(","):
    try:
      rows.append(bench(v.strip(), args))
    except Exception as e:  # noqa: BLE001  (record and continue)
      rows.append(dict(variant=v, error=f"{type(e).__name__}: {str(e)[:300]}"))
    r = rows[-1]
    print(json.dumps({k: v for k, v in r.items() if k != "params"}), flush=True)
  dev = jax.devices()[0]
  print(f"\n{getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}, "
        f"{args.layers} layers x {args.width}, T={args.seq_len}, batch {args.batch}")
  print(f"{'variant':8s} {'step_ms':>9s} {'tokens/s':>10s} {'MFU':>6s} {'compile_s':>9s}")
  for r in rows:
    if "error" in r:
      print(f"{r['variant']:8s} error: {r['error']}")
    else:
      print(f"{r['variant']:8s} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
            f"{100 * r['mfu']:5.1f}% {r['compile_s']:9.1f}")
  out = Path(args.out or f"benchmarks/results/train-{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      header=dict(jax=jax.__version__, device=getattr(dev, "device_kind", dev.platform),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  argv=sys.argv, config=vars(args)), rows=rows), indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
