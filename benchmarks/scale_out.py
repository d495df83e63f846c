"""Sharded training on a multi-GPU machine, synthetic tokens, one JSON file.

    python benchmarks/scale_out.py --out scale_out.json            # 2+ GPUs
    python benchmarks/scale_out.py --out scale_out.json --time-limit 240   # stop in time
    python benchmarks/scale_out.py --smoke --out scale_out.json       # CPU, 8 fake devices

Sections, in this order (each written to the JSON as soon as it finishes; later ones are
skipped when they would not finish within `--time-limit` seconds, if one is given):
  equality    GPT (mha and mlr, bf16) trained `--steps` steps on meshes (2,1,1), (1,2,1),
              (1,1,2) against one device: per-step losses and the largest difference.
  checkpoint  a state trained on 2 devices (fsdp 2) saved with the run's orbax Manager,
              restored onto 1 GPU and onto the CPU (values must be identical), and training
              continued on 1 GPU against the 2-device run.
  throughput  GPT-2-small (12 x 768, T=1024, vocab 50,304, bf16) with mha: the unsharded step
              and the sharded step on a 1-device mesh (the sharded path's cost) and on
              (n,1,1) data parallel over all devices (tokens/s per device, scaling
              efficiency, MFU), timed in alternating rounds.
No dataset is read (the GPU image has no TFDS/grain): batches are seeded random tokens.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from structattn.configs import lm as lm_configs  # noqa: E402
from structattn import checkpoint as ckpt_lib  # noqa: E402
from structattn import sharding  # noqa: E402
from structattn import train as train_lib  # noqa: E402
from structattn.models.gpt import GPT, GPTConfig  # noqa: E402
from structattn.optim import make_optimizer  # noqa: E402

T0 = time.time()


def elapsed():
  return time.time() - T0


def small_config(variant, args):
  c = lm_configs.get_config(f"tiny-{variant}")
  c.model.update(d_model=args.width, num_layers=2, seq_len=args.seq_len, dtype=args.dtype)
  c.attention = lm_configs.attention_config(variant)
  c.attention.update(num_heads=args.width // 64, d_head=64)
  if args.seq_len < 256:  # the paper's 8 levels need blocks of >= 2 tokens at level 8
    c.attention.mlr_ranks = (32, 16, 8, 8)
  c.train.update(lr=3e-3, warmup_steps=5, steps=1000)
  return c


def build(c, vocab):
  model = GPT(GPTConfig.from_config(c, vocab), rngs=nnx.Rngs(0))
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, _ = make_optimizer(c.train, params_state)
  return graphdef, params_state, rest, params, tx


def token_batches(n, batch, seq_len, vocab, seed=0):
  toks = np.random.default_rng(seed).integers(0, vocab, (n, batch, seq_len + 1)).astype(np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in toks]


class Trainer:
  """The small model's train step, unsharded on one device or sharded on a mesh."""

  def __init__(self, c, vocab, mesh=None, device=None):
    graphdef, params_state, rest, params, tx = build(c, vocab)
    self.fn = functools.partial(train_lib.train_step, graphdef=graphdef, rest=rest, tx=tx)
    self.eval = functools.partial(train_lib.eval_step, graphdef=graphdef, rest=rest)
    opt_state = tx.init(params)
    self.layout = None
    if mesh is None:
      device = device or jax.devices()[0]
      self.state = jax.device_put((params, opt_state), device)
      self.step = jax.jit(self.fn, donate_argnums=(0, 1))
      self.place = lambda b: jax.device_put(b, device)
    else:
      devs = jax.devices()[:int(np.prod(mesh))]
      self.layout = sharding.Layout(sharding.make_mesh(mesh, devices=devs))
      params, opt_state, p_sh, o_sh = train_lib.shard_state(self.layout, params_state, params,
                                                            opt_state)
      self.state, self.p_sh, self.o_sh = (params, opt_state), p_sh, o_sh
      self.step = train_lib.ShardedStep(self.layout, self.fn, p_sh, o_sh)
      self.place = self.layout.put_batch

  def train(self, batches):
    params, opt_state = self.state
    losses = []
    for b in batches:
      params, opt_state, m = self.step(params, opt_state, self.place(b))
      losses.append(float(m["train/loss"]))
    self.state = (params, opt_state)
    return losses


# --------------------------------------------------------------------------------- sections


def equality(args, out):
  n = len(jax.devices())
  meshes = [(2, 1, 1), (1, 2, 1), (1, 1, 2)] if n >= 2 else []
  res = {"steps": args.steps, "batch": args.small_batch, "seq_len": args.seq_len,
         "width": args.width, "dtype": args.dtype, "tolerance": args.tol, "runs": {}}
  out["equality"] = res
  data = token_batches(args.steps, args.small_batch, args.seq_len, args.small_vocab)
  for variant in ("mha", "mlr"):
    c = small_config(variant, args)
    t = time.time()
    ref = Trainer(c, args.small_vocab).train(data)
    res["runs"][f"{variant}/1"] = dict(losses=ref, seconds=time.time() - t)
    for mesh in meshes:
      if elapsed() > args.time_limit * 0.75:
        res["runs"][f"{variant}/{mesh}"] = "skipped (time limit)"
        continue
      t = time.time()
      got = Trainer(c, args.small_vocab, mesh).train(data)
      diff = np.abs(np.asarray(got) - np.asarray(ref))
      res["runs"][f"{variant}/{','.join(map(str, mesh))}"] = dict(
          losses=got, max_abs_diff=float(diff.max()), final_abs_diff=float(diff[-1]),
          within_tol=bool(diff.max() <= args.tol), seconds=time.time() - t)
  diffs = [r["max_abs_diff"] for r in res["runs"].values() if isinstance(r, dict)
           and "max_abs_diff" in r]
  res["max_abs_diff"] = max(diffs) if diffs else None
  res["passed"] = bool(diffs) and max(diffs) <= args.tol


def checkpoint(args, out):
  res = {}
  out["checkpoint"] = res
  if len(jax.devices()) < 2:
    res["skipped"] = "needs 2 devices"
    return
  c = small_config("mha", args)
  data = token_batches(8, args.small_batch, args.seq_len, args.small_vocab, seed=1)
  two = Trainer(c, args.small_vocab, (1, 2, 1))  # fsdp over 2 devices
  two.train(data[:5])
  saved = jax.tree.map(lambda x: np.asarray(two.layout.fetch(x)), two.state)
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(two.state)})
  d = Path(tempfile.mkdtemp()) / "checkpoints"
  mgr = ckpt_lib.Manager(d)
  mgr.save(5, *two.state, {"step": 5})
  mgr.close()
  res.update(saved_on="mesh data=1 fsdp=2 tensor=1", saved_specs=specs)
  cont_two = two.train(data[5:])
  c_cpu = small_config("mha", args)
  c_cpu.attention.impl = "xla"  # the cuDNN dispatch looks at the default backend (the GPU)
  for name, device in (("gpu1", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
    # a fresh state is the restore template (its shardings are where the arrays go)
    target = Trainer(c if name == "gpu1" else c_cpu, args.small_vocab, device=device)
    step, params, opt_state, data_state = ckpt_lib.Manager(d).restore_latest(*target.state)
    got = jax.tree.map(np.asarray, (params, opt_state))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)))
    on = sorted({str(x.sharding) for x in jax.tree.leaves(params)})[:1]
    row = dict(step=step, identical=bool(same), device=str(device), sharding=on,
               data_state=data_state)
    if name == "gpu1":
      target.state = (params, opt_state)
      cont = target.train(data[5:])
      row.update(continued_losses=cont, two_device_losses=cont_two,
                 max_abs_diff=float(np.max(np.abs(np.subtract(cont, cont_two)))))
    else:
      with jax.default_device(device):
        loss = float(jnp.mean(jax.jit(target.eval)(params, jax.device_put(data[5], device))))
      row.update(cpu_eval_loss_at_step5=loss)
    res[name] = row


def throughput(args, out):
  n = len(jax.devices())
  targs = argparse.Namespace(layers=args.gpt_layers, width=args.gpt_width, seq_len=args.gpt_seq,
                             batch=args.gpt_batch, vocab=args.gpt_vocab, dtype=args.dtype,
                             warmup=2, iters=args.iters, rounds=args.rounds)
  runners = [tt.Runner("mha", targs), tt.Runner("mha", targs, (1, 1, 1))]
  if n >= 2:
    runners.append(tt.Runner("mha", targs, (n, 1, 1)))
  t = time.time()
  for r in runners:  # one after the other: later ones reuse XLA's autotuning results
    r.compile()
  if n >= 2 and elapsed() < args.time_limit * 0.35:  # FSDP over all devices, if time allows
    runners.append(tt.Runner("mha", targs, (1, n, 1)).compile())
  compile_wall = time.time() - t
  for r in runners:
    r.run(targs.warmup, timed=False)
  for _ in range(targs.rounds):
    for r in runners:
      r.run(max(1, targs.iters // targs.rounds))
  rows = [r.result() for r in runners]
  base = rows[0]
  for r in rows[1:]:
    ratio = base["tokens_per_s"] / r["tokens_per_s_per_device"]
    r["vs_unsharded"] = dict(overhead=ratio - 1.0 if r["devices"] == 1 else None,
                             scaling_efficiency=1.0 / ratio)
  out["throughput"] = dict(config=vars(targs), compile_wall_s=compile_wall,
                           rows=[{k: v for k, v in r.items() if k != "params"} for r in rows],
                           params=rows[0]["params"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of the script)")
  p.add_argument("--time-limit", "--budget-s", dest="time_limit", type=float, default=0.0,
                 help="seconds the whole run should take at most: later sections are skipped "
                 "when they would not fit (0: no limit)")
  p.add_argument("--sections", default="throughput,equality,checkpoint")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--tol", type=float, default=2e-2, help="bf16 loss tolerance (absolute)")
  p.add_argument("--iters", type=int, default=15)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  args.time_limit = args.time_limit or float("inf")  # 0: no limit
  args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  args.width, args.seq_len, args.small_batch, args.small_vocab = 256, 256, 16, 512
  args.gpt_layers, args.gpt_width, args.gpt_seq, args.gpt_batch, args.gpt_vocab = \
      12, 768, 1024, 16, 50304
  if args.smoke:
    args.width, args.seq_len, args.small_batch, args.small_vocab = 128, 128, 8, 96
    args.gpt_layers, args.gpt_width, args.gpt_seq, args.gpt_batch, args.gpt_vocab = \
        2, 128, 256, 2, 512
    args.steps, args.iters, args.rounds = 5, 4, 2
  dev = jax.devices()[0]
  out = {"header": dict(jax=jax.__version__, backend=jax.default_backend(),
                        device=getattr(dev, "device_kind", dev.platform),
                        devices=len(jax.devices()),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"), argv=sys.argv)}
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  budget_start = {"throughput": 0.0, "equality": 0.6, "checkpoint": 0.85}
  for name in args.sections.split(","):
    if budget_start[name] > 0 and elapsed() > args.time_limit * budget_start[name]:
      out[name] = f"skipped: {elapsed():.0f}s elapsed of a {args.time_limit:.0f}s time limit"
    else:
      t = time.time()
      try:
        globals()[name](args, out)
      except Exception as e:  # noqa: BLE001  (record and go on)
        out[name] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}",
                         traceback=traceback.format_exc()[-4000:])
      if isinstance(out.get(name), dict):
        out[name]["section_s"] = time.time() - t
    out["header"]["elapsed_s"] = elapsed()
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"[{elapsed():.0f}s] {name}: {json.dumps(out[name], default=str)[:1500]}", flush=True)


if __name__ == "__main__":
  main()
