"""QK LayerNorm forward+backward: joint (MHA) against per level (MLR), alone.

    python benchmarks/qk_norm.py [--shape 16,1024,12,64] [--out benchmarks/results/qk-norm-gpu.json]

The per-level QK norm of MLR (8 levels 32|8|6|4|4|4|4|2) is part of the GPT-2-small MLR
training step; this times it alone at that step's shape (bf16 features in, LayerNorm in
float32, bf16 out, gradient of a weighted sum w.r.t. the features and the weight).
Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from structattn.attention.layer import layer_norm, per_level_layer_norm

WIDTHS = (32, 8, 6, 4, 4, 4, 4, 2)


CASES = {
    "joint": layer_norm,
    "per_level": lambda x, w: per_level_layer_norm(x, w, WIDTHS),
}


def time_case(fn, x, w, g, iters):
  loss = lambda x, w: jnp.sum((fn(x, w).astype(jnp.bfloat16) * g).astype(jnp.float32))
  step = jax.jit(jax.grad(loss, (0, 1)))
  jax.block_until_ready(step(x, w))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(step(x, w))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="16,1024,12,64")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default="")
  args = p.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  if shape[-1] != sum(WIDTHS):
    raise SystemExit(f"--shape: last dim must be {sum(WIDTHS)} (the level widths {WIDTHS})")
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, jnp.bfloat16)
  g = jax.random.normal(kg, shape, jnp.bfloat16)
  w = jnp.ones((shape[-1],), jnp.float32)
  rows = [dict(case=n, fwdbwd_ms=time_case(f, x, w, g, args.iters)) for n, f in CASES.items()]
  dev = jax.devices()[0]
  print(f"{getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}, shape {shape}")
  for r in rows:
    print(f"{r['case']:18s} {r['fwdbwd_ms']:8.3f} ms  x joint {r['fwdbwd_ms'] / rows[0]['fwdbwd_ms']:.2f}")
  out = Path(args.out or f"benchmarks/results/qk-norm-{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(header=dict(
      jax=jax.__version__, device=getattr(dev, "device_kind", dev.platform), shape=shape,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
      rows=rows), indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
