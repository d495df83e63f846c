"""Train a language model: one pure train step, jitted once; the loop logs, evals, checkpoints.

    structattn-train --config=configs/lm.py:tiny --workdir=runs/tiny [--config.a.b=v ...]
    python -m structattn.train --config=configs/lm.py:paper-mlr-512 --workdir=runs/mlr512

The same command in the same workdir resumes from the last checkpoint (params, optimiser
state, step and the data iterator's position), so a killed run loses nothing.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from structattn import checkpoint as ckpt_lib
from structattn import flops as flops_lib
from structattn import rundir as rundir_lib
from structattn.models.gpt import GPT, GPTConfig, param_counts
from structattn.optim import make_optimizer

H100_BF16_PEAK = 989e12


class NonFiniteLoss(RuntimeError):
  pass


# ------------------------------------------------------------------------------ pure parts


def cross_entropy(logits_BTV, targets_BT):
  """Per-sequence mean token cross-entropy in float32, shape (B,).

  logsumexp minus the target logit: XLA fuses the float32 upcast into the reductions, so no
  float32 copy of the (B, T, V) logits is materialised."""
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return (lse - target).mean(axis=-1)


def loss_fn(params, graphdef, rest, batch):
  model = nnx.merge(graphdef, params, rest)
  return cross_entropy(model(batch["inputs"]), batch["targets"]).mean()


def train_step(params, opt_state, batch, *, graphdef, rest, tx, accum: int = 1, loss=loss_fn):
  """One optimiser step on a batch of leading size accum * micro, gradient accumulation by
  scan.  `loss(params, graphdef, rest, batch)` defaults to the LM loss; tasks pass theirs."""
  loss_fn_ = loss

  def micro(carry, mb):
    loss, grads = jax.value_and_grad(loss_fn_)(params, graphdef, rest, mb)
    acc_loss, acc_grads = carry
    return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads)), None

  if accum == 1:
    loss, grads = jax.value_and_grad(loss_fn_)(params, graphdef, rest, batch)
  else:
    mbs = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), mbs)
    loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
  grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"train/loss": loss, "grad_norm": grad_norm}


def eval_step(params, batch, *, graphdef, rest):
  model = nnx.merge(graphdef, params, rest)
  return cross_entropy(model(batch["inputs"]), batch["targets"])


def evaluate(eval_fn, params, batches) -> dict[str, float]:
  """Mean held-out loss over sequences and its standard error."""
  losses = np.concatenate([np.asarray(eval_fn(params, b)) for b in batches])
  n = len(losses)
  sem = float(losses.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return {"eval/loss": float(losses.mean()), "eval/loss_sem": sem, "eval/sequences": n}


# ----------------------------------------------------------------------------------- setup


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  cfg = GPTConfig.from_config(config, vocab_size)
  model = GPT(cfg, rngs=nnx.Rngs(config.seed))
  return cfg, model


def validate(config: ml_collections.ConfigDict) -> None:
  tc = config.train
  for field in ("steps", "batch_size", "grad_accum"):
    if int(tc.get(field, 0)) <= 0:
      raise ValueError(f"train.{field}={tc.get(field)!r} is invalid: must be a positive integer")
  if tc.batch_size % tc.grad_accum:
    raise ValueError(f"train.grad_accum={tc.grad_accum} must divide train.batch_size="
                     f"{tc.batch_size}")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) training; returns the final result dict (also written to result.json)."""
  validate(config)
  rd = rundir_lib.RunDir(workdir)
  t_start = time.time()
  from structattn import lm_data  # the data stack (TFDS, grain) only where data is read
  data = lm_data.build(config)  # validates data config, fails fast on a missing corpus
  cfg, model = build_model(config, data.vocab_size)
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, sched = make_optimizer(config.train, params_state)
  opt_state = tx.init(params)
  counts = param_counts(model)
  fl = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, data.vocab_size)
  tokens_per_step = config.train.batch_size * cfg.seq_len
  rd.write_json("config.json", config.to_dict())

  manager = ckpt_lib.Manager(rd.path / "checkpoints", keep=config.keep_checkpoints)
  step = 0
  train_iter = data.train_iterator()
  restored = manager.restore_latest(params, opt_state)
  previous = rd.read_json("result.json")
  if restored is not None and restored[0] >= config.train.steps and previous and \
      previous.get("status") == "completed":
    manager.close()
    return previous  # a finished run: nothing to do
  if restored is not None:
    step, params, opt_state, data_state = restored
    train_iter.set_state(data_state)
    rd.truncate_metrics(step)
  result = {"status": "running", "params/total": counts["total"],
            "params/non_embedding": counts["non_embedding"], "device": rundir_lib.device_description(),
            "versions": rundir_lib.versions(), "started": rundir_lib.now(), "resumed_from": step,
            "compute/paper_macs_per_token": fl["paper_macs_per_token"],
            "compute/train_flops_per_token": fl["train_flops_per_token"]}
  rd.write_json("result.json", result)

  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx,
                                      accum=config.train.grad_accum), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, rest=rest))
  eval_batches = data.eval_batches()
  on_gpu = jax.default_backend() == "gpu"
  bar = None
  if config.get("progress", True) and rd.writer:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.train.steps, initial=step, desc="train", dynamic_ncols=True)

  last_eval: dict[str, float] = {}
  last_loss = None
  window_t, window_steps = time.time(), 0
  try:
    while step < config.train.steps:
      batch = next(train_iter)
      params, opt_state, metrics = step_fn(params, opt_state, batch)
      step += 1
      window_steps += 1
      is_last = step == config.train.steps
      if step % config.log_every == 0 or is_last or step == 1:
        metrics = jax.device_get(metrics)
        loss = last_loss = float(metrics["train/loss"])
        dt = (time.time() - window_t) / window_steps
        window_t, window_steps = time.time(), 0
        row = {"step": step, "tokens": step * tokens_per_step,
               "compute/paper_macs": fl["paper_macs_per_token"] * step * tokens_per_step,
               "compute/train_flops": fl["train_flops_per_token"] * step * tokens_per_step,
               "lr": float(sched(step - 1)), "train/loss": loss,
               "grad_norm": float(metrics["grad_norm"]), "time/step_s": dt,
               "throughput/tokens_per_s": tokens_per_step / dt if dt > 0 else 0.0}
        if on_gpu:
          row["throughput/mfu"] = row["throughput/tokens_per_s"] * fl["train_flops_per_token"] / (
              H100_BF16_PEAK * jax.device_count())
        if not math.isfinite(loss):
          raise NonFiniteLoss(f"non-finite training loss {loss} at step {step}")
        if step % config.eval.every == 0 or is_last:
          last_eval = evaluate(eval_fn, params, eval_batches)
          row.update(last_eval)
        rd.log(row)
        if bar is not None:
          bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['throughput/tokens_per_s']:.3g}")
      if bar is not None:
        bar.update(1)
      if step % config.checkpoint_every == 0 or is_last:
        manager.save(step, params, opt_state, train_iter.get_state())
  except NonFiniteLoss as e:
    manager.save(step, params, opt_state, train_iter.get_state(), force=True)
    manager.close()
    result.update(status=f"failed: {e}; stopped after a final checkpoint at step {step}",
                  wall_time_s=time.time() - t_start)
    rd.write_json("result.json", result)
    rd.close()
    raise
  finally:
    if bar is not None:
      bar.close()
  manager.close()
  result.update(
      status="completed", tokens=step * tokens_per_step,
      **{"final/train_loss": last_loss,
         "final/eval_loss": last_eval.get("eval/loss"),
         "final/eval_loss_sem": last_eval.get("eval/loss_sem"),
         "compute/paper_macs": fl["paper_macs_per_token"] * step * tokens_per_step,
         "compute/train_flops": fl["train_flops_per_token"] * step * tokens_per_step},
      wall_time_s=time.time() - t_start, finished=rundir_lib.now())
  rd.write_json("result.json", result)
  rd.close()
  return result


# ------------------------------------------------------------------------------------- CLI


def main(argv=None):
  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    print({k: result[k] for k in ("status", "final/train_loss", "final/eval_loss", "tokens")})

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
