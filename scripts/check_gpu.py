"""Accuracy of the bf16 fast paths on an accelerator against a float32 masked-dense oracle.

    python scripts/check_gpu.py [--seq-len 1024] [--out results.json]

For every variant: the layer's attention core in bf16 with impl auto / xla / cudnn against
the float32 `reference` core on the same q, k, v; relative errors of the output and of the
q, k, v gradients (max-abs error / max-abs reference).  The cuDNN rows are the only check of
the cuDNN dispatch (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from structattn.attention import core, dispatch, from_config, pattern_of

CASES = {
    "mha_d64": dict(variant="mha", num_heads=4, d_head=64),
    "swa_d64": dict(variant="swa", num_heads=4, d_head=64, window=256),
    "gswa_sum_d64": dict(variant="gswa", num_heads=4, d_head=64, window=256, gswa_split=(32, 32)),
    "gswa_renorm_d64": dict(variant="gswa", num_heads=4, d_head=64, window=256,
                            gswa_split=(32, 32), gswa_combine="renorm"),
    "mlr8_d64": dict(variant="mlr", num_heads=4, d_head=64, mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2),
                     mlr_divide="block"),
    "mlr4_d128": dict(variant="mlr", num_heads=2, d_head=128, mlr_ranks=(16, 16, 32, 64)),
}


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(name, cfg, t, b):
  spec = from_config(cfg, d_model=cfg["num_heads"] * cfg["d_head"], seq_len=t)
  pat = pattern_of(spec)
  h, dq, dv = spec.num_heads, spec.d_qk, spec.d_head
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, dq)) / np.sqrt(dq) * 4
  k = jax.random.normal(ks[1], (b, t, h, dq))
  v = jax.random.normal(ks[2], (b, t, h, dv))
  w = jax.random.normal(ks[3], (b, t, h, dv))

  # Inputs rounded to bf16 once, so the errors measure the kernels, not the input rounding.
  q, k, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v))

  def loss_and_grads(impl, dtype):
    def loss(q, k, v):
      out = dispatch.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), pat, impl)
      return jnp.sum(out.astype(jnp.float32) * w), out
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, g

  ref_out, ref_g = loss_and_grads("reference", jnp.float32)
  rows = []
  for impl in ("auto", "xla", "cudnn"):
    ok, why = core.cudnn_supported(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                   v.astype(jnp.bfloat16), pat)
    served = "cudnn" if (impl in ("auto", "cudnn") and ok) else "xla"
    out, g = loss_and_grads(impl, jnp.bfloat16)
    row = dict(case=name, T=t, impl=impl, served_by=served, out=rel(out, ref_out),
               dq=rel(g[0], ref_g[0]), dk=rel(g[1], ref_g[1]), dv=rel(g[2], ref_g[2]),
               note=why if served == "xla" and impl != "xla" else "")
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = []
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__}")
  print(f"{'case':18s} {'T':>6s} {'impl':6s} {'served':7s} {'out':>9s} {'dq':>9s} {'dk':>9s} {'dv':>9s}")
  worst = 0.0
  for name, cfg in CASES.items():
    new = check(name, cfg, args.seq_len, args.batch)
    rows += new
    for r in new:
      print(f"{r['case']:18s} {r['T']:6d} {r['impl']:6s} {r['served_by']:7s} {r['out']:9.2e} "
            f"{r['dq']:9.2e} {r['dk']:9.2e} {r['dv']:9.2e} {r['note']}", flush=True)
      worst = max(worst, r["out"], r["dq"], r["dk"], r["dv"])
  print(f"worst relative error {worst:.3e} (bf16 target < 1e-2)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f,
                indent=1)
  return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
  sys.exit(main())
