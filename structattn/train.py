"""Train any task: one pure train step, jitted once; the loop logs, evals, checkpoints.

    structattn-train --config=lm:tiny --workdir=runs/tiny [--config.a.b=v ...]
    python -m structattn.train --config=lm:paper-mlr-512 --workdir=runs/mlr512

The same command in the same workdir resumes from the last checkpoint (params, optimiser
state, step and the data iterator's position), so a killed run loses nothing.

Scale-out (docs/scaling-out.md): `config.mesh` (data, fsdp, tensor; -1 = the rest) builds a
device mesh, parameters and optimiser state are sharded by their logical axis names
(`config.sharding.rules`), the step is compiled once with in/out shardings and donation, and
each host feeds its slice of the global batch.  Multi-host runs initialise
`jax.distributed` from the environment (SLURM, TPU pods) or --coordinator_address,
--num_processes, --process_id.  Without a mesh (the default) nothing changes.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from structattn import checkpoint as ckpt_lib
from structattn import configs as configs_lib
from structattn import rundir as rundir_lib
from structattn import sharding as sharding_lib
from structattn import tasks as tasks_lib
from structattn.models.gpt import GPT, GPTConfig
from structattn.optim import make_optimizer, schedule, with_lr

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
    mbs = jax.tree.map(lambda x: sharding_lib.constrain(
        x.reshape(accum, -1, *x.shape[1:]), (None, "batch") + (None,) * (x.ndim - 1)), batch)
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


def multi_step(params, opt_state, seed, step0, num_steps, *, batch_fn, step_fn):
  """`num_steps` optimiser steps with batches drawn on device by batch_fn(seed, step): one
  compiled call for many steps (a while loop, so num_steps may vary without recompiling).
  Returns (params, opt_state, metrics of the last step, mean train loss over the steps)."""

  def body(i, carry):
    p, o, _, total = carry
    p, o, m = step_fn(p, o, batch_fn(seed, step0 + i))
    return p, o, m, total + m["train/loss"]

  batch0 = jax.eval_shape(batch_fn, seed, step0)
  m0 = jax.eval_shape(step_fn, params, opt_state, batch0)[2]
  m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
  params, opt_state, m, total = jax.lax.fori_loop(
      0, num_steps, body, (params, opt_state, m0, jnp.zeros((), jnp.float32)))
  return params, opt_state, m, total / jnp.maximum(num_steps, 1)


def evaluate(eval_fn, params, batches, summarize, prefix="eval", members=None,
             fetch=jax.device_get):
  """Held-out metrics: per-example arrays concatenated over batches, then summarised (once
  per member when params are stacked over `members`)."""
  outs = [fetch(eval_fn(params, b)) for b in batches]
  arrays = {k: np.concatenate([o[k] for o in outs], axis=0 if members is None else 1)
            for k in outs[0]}
  if members is None:
    return summarize(arrays, prefix)
  return [summarize({k: v[i] for k, v in arrays.items()}, prefix) for i in range(members)]


# ----------------------------------------------------------------------------------- setup


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  cfg = GPTConfig.from_config(config, vocab_size)
  model = GPT(cfg, rngs=nnx.Rngs(config.seed))
  return cfg, model


def validate(config: ml_collections.ConfigDict) -> None:
  tc = config.train
  for field in ("batch_size", "grad_accum"):
    if int(tc.get(field, 0)) <= 0:
      raise ValueError(f"train.{field}={tc.get(field)!r} is invalid: must be a positive integer")
  if int(tc.get("steps", 0)) <= 0 and not float(tc.get("compute_budget", 0) or 0) > 0:
    raise ValueError(f"train.steps={tc.get('steps')!r} is invalid: must be a positive integer "
                     f"(or set train.compute_budget > 0)")
  if tc.batch_size % tc.grad_accum:
    raise ValueError(f"train.grad_accum={tc.grad_accum} must divide train.batch_size="
                     f"{tc.batch_size}")
  if int(tc.get("steps_per_call", 1)) <= 0:
    raise ValueError(f"train.steps_per_call={tc.get('steps_per_call')!r} is invalid: must be a "
                     f"positive integer")


def resolve(config: ml_collections.ConfigDict, setup: tasks_lib.TaskSetup
            ) -> ml_collections.ConfigDict:
  """An unlocked copy of config with train.steps set from train.compute_budget (forward
  non-embedding MACs, the paper's compute axis) when that is positive."""
  config = ml_collections.ConfigDict(config.to_dict())
  budget = float(config.train.get("compute_budget", 0) or 0)
  if budget > 0:
    per_step = setup.paper_macs_per_unit * setup.units_per_step
    config.train.steps = max(1, int(math.ceil(budget / per_step)))
  return config


MEMBER_FIELDS = ("seed", "train.lr")  # what vmapped members may differ in


def check_group(configs) -> None:
  """Members of one vmapped group may differ only in seed and train.lr."""
  from structattn.results import flatten
  ref = flatten(configs[0].to_dict())
  for i, c in enumerate(configs[1:], 1):
    flat = flatten(c.to_dict())
    diff = sorted(k for k in set(ref) | set(flat)
                  if k not in MEMBER_FIELDS and ref.get(k) != flat.get(k))
    if diff:
      raise ValueError(f"vmapped members must differ only in {MEMBER_FIELDS}; member {i} also "
                       f"differs in {diff}")


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _member(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _finished(result, config) -> bool:
  """A completed run of at least the configured length (or the same compute budget)."""
  if not result or result.get("status") != "completed":
    return False
  budget = float(config.train.get("compute_budget", 0) or 0)
  if budget > 0:
    return float(result.get("train/compute_budget", 0)) == budget
  return int(result.get("train/steps", 0)) >= int(config.train.steps)


def _build_setups(configs):
  """The tasks (model and data).  With several processes, process 0 prepares the data first
  (a dataset on a shared filesystem is built once, not by every host at the same time)."""
  if jax.process_count() == 1:
    return [tasks_lib.build(c) for c in configs]
  from jax.experimental import multihost_utils
  setups = [tasks_lib.build(c) for c in configs] if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("structattn: data prepared by process 0")
  return setups or [tasks_lib.build(c) for c in configs]


def _agree(flag: bool) -> bool:
  from structattn.distributed import agree
  return agree(flag)


def _check_layout(layout, config, setup) -> None:
  """Fail fast when the global batch cannot be split over the mesh's batch axes, or when a
  host's devices do not hold exactly the rows that host loads."""
  tc, n = config.train, layout.size("batch")
  if setup.train_batches is None:
    return  # batches drawn on device: constrained where they divide, replicated otherwise
  micro = int(tc.batch_size) // int(tc.grad_accum)
  if micro % n:
    raise ValueError(f"train.batch_size / train.grad_accum = {micro} must be divisible by the "
                     f"{n} batch shards of mesh {dict(layout.mesh.shape)}")
  procs = jax.process_count()
  if procs > 1:
    rows = int(tc.batch_size)
    per = rows // procs
    p = jax.process_index()
    if layout.process_rows(rows) != (p * per, (p + 1) * per):
      raise ValueError(f"mesh {dict(layout.mesh.shape)}: process {p} holds batch rows "
                       f"{layout.process_rows(rows)}, not its data shard "
                       f"[{p * per}, {(p + 1) * per}); keep the tensor axis within a host")


def shard_state(layout, params_state, params, opt_state, lead: int = 0):
  """Place params and optimiser state on the layout's mesh by the parameters' logical axis
  names (`params_state`: the model's nnx.Param state; `lead` replicated leading axes, e.g.
  the member axis of vmapped groups).  Returns (params, opt_state, param_shardings,
  opt_state_shardings)."""
  p_sh = layout.param_shardings(params_state, lead=lead)
  o_sh = layout.shardings_like(opt_state, params, p_sh)
  return layout.put(params, p_sh), layout.put(opt_state, o_sh), p_sh, o_sh


class ShardedStep:
  """`fn(params, opt_state, batch) -> (params, opt_state, metrics)` jitted once with in/out
  shardings and donation of params and optimiser state (the successor of pjit); the batch
  shardings are those of the first batch (placed by `Layout.put_batch`), metrics replicated.
  Activations are constrained by the layout while tracing."""

  def __init__(self, layout, fn, p_sh, o_sh):
    self.layout, self.fn, self.p_sh, self.o_sh = layout, fn, p_sh, o_sh
    self.jitted = None

  def jit(self, batch):
    """The jitted step for batches sharded like `batch` (built once)."""
    if self.jitted is None:
      b_sh = jax.tree.map(lambda x: x.sharding, batch)
      self.jitted = jax.jit(self.layout.traced(self.fn),
                            in_shardings=(self.p_sh, self.o_sh, b_sh),
                            out_shardings=(self.p_sh, self.o_sh, self.layout.replicated),
                            donate_argnums=(0, 1))
    return self.jitted

  def __call__(self, params, opt_state, batch):
    return self.jit(batch)(params, opt_state, batch)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) one training run; returns its result (also written to result.json)."""
  return _run([config], [workdir], vmapped=False)[0]


def train_group(configs, workdirs, group_dir: str | None = None) -> list[dict[str, Any]]:
  """Train several small models in one process, vmapped over members that differ only in
  seed and train.lr.  Each member writes its own run directory, equal to a separate run's;
  the stacked checkpoint lives in group_dir (default: `<first workdir>/../group-<names>`)."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("train_group needs one workdir per config (and at least one)")
  check_group(configs)
  if group_dir is None:
    first = Path(workdirs[0])
    group_dir = str(first.parent / ("group-" + "+".join(Path(w).name for w in workdirs))[:200])
  return _run(list(configs), list(workdirs), vmapped=True, group_dir=group_dir)


def _run(configs, workdirs, vmapped: bool, group_dir: str | None = None):
  configs = [configs_lib.migrate(c) for c in configs]  # older config keys (README: Configs)
  for c in configs:
    validate(c)
  t_start = time.time()
  rds = [rundir_lib.RunDir(w) for w in workdirs]
  previous = [rd.read_json("result.json") for rd in rds]
  if _agree(all(_finished(p, c) for p, c in zip(previous, configs))):
    return previous  # finished: nothing to do
  setups = _build_setups(configs)  # fails fast on bad data config
  resolved = [resolve(c, s) for c, s in zip(configs, setups)]
  setups = [s if int(r.train.steps) == int(c.train.get("steps", 0)) else tasks_lib.build(r)
            for c, r, s in zip(configs, resolved, setups)]  # schedules that need the length
  configs = resolved
  config, setup = configs[0], setups[0]
  members = len(configs) if vmapped else None
  graphdef, params_state, rest = nnx.split(setup.model, nnx.Param, ...)
  tx, _ = make_optimizer(config.train, params_state)
  scheds = [schedule(c.train) for c in configs]
  inits = []
  for c, s in zip(configs, setups):
    p = nnx.to_pure_dict(nnx.split(s.model, nnx.Param, ...)[1])
    inits.append((p, with_lr(tx.init(p), float(c.train.lr))))
  if vmapped:
    params, opt_state = _stack([i[0] for i in inits]), _stack([i[1] for i in inits])
  else:
    params, opt_state = inits[0]
  # Sharding: None (the default) is one device and the unsharded path.
  layout = sharding_lib.from_config(config)
  lead = 1 if vmapped else 0  # the member axis of vmapped groups stays replicated
  if layout is not None:
    _check_layout(layout, config, setup)
    params, opt_state, p_sh, o_sh = shard_state(layout, params_state, params, opt_state, lead)
  steps = int(config.train.steps)
  units = setup.units_per_step
  for c, rd in zip(configs, rds):
    rd.write_json("config.json", c.to_dict())

  ckpt_dir = Path(group_dir if vmapped else workdirs[0]) / "checkpoints"
  manager = ckpt_lib.Manager(ckpt_dir, keep=config.keep_checkpoints)
  step = 0
  # Best-validation selection (eval.select_best and a task metric, e.g. forecasting's
  # eval/mse): a second parameter set, checkpointed with the state; test metrics use it.
  select = setup.select if bool(config.eval.get("select_best", False)) else None
  best_params = jax.tree.map(jnp.copy, params) if select else None
  best_value, best_step = [math.inf] * len(configs), [0] * len(configs)
  restored = manager.restore_latest(params, opt_state, best=best_params)
  if restored is not None:
    step, params, opt_state, data_state = restored[:4]
    if select:
      best_params = restored[4]
      best_value = [float(v) for v in data_state["best_value"]]
      best_step, data_state = list(data_state["best_step"]), data_state["data"]
    if setup.train_batches is not None:
      for s, st in zip(setups, data_state if vmapped else [data_state]):
        s.train_batches.set_state(st)
    for rd in rds:
      rd.truncate_metrics(step)
  extra = {} if layout is None else {"mesh": layout.describe()}
  results = [dict(setup.info, **extra, status="running", device=rundir_lib.device_description(),
                  versions=rundir_lib.versions(), started=rundir_lib.now(), resumed_from=step,
                  unit=setup.unit, units_per_step=units,
                  **{"train/steps": steps,
                     "train/compute_budget": float(config.train.get("compute_budget", 0) or 0)})
             for _ in configs]
  failed = [None] * len(configs)
  for rd, r in zip(rds, results):
    rd.write_json("result.json", r)

  accum = config.train.grad_accum
  one_step = functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, accum=accum,
                               loss=setup.loss)
  def one_eval(params, batch):
    return setup.eval_metrics(params, graphdef, rest, batch)

  if setup.batch_fn is not None:
    batch_fn = setup.batch_fn
    if layout is not None:  # prompts drawn on device, split over the batch axes
      batch_fn = lambda seed, s, f=setup.batch_fn: sharding_lib.constrain_batch(f(seed, s))
    k_fn = functools.partial(multi_step, batch_fn=batch_fn, step_fn=one_step)
    if vmapped:
      k_fn = jax.vmap(k_fn, in_axes=(0, 0, 0, None, None))
    if layout is None:
      step_fn = jax.jit(k_fn, donate_argnums=(0, 1))
    else:
      rep = layout.replicated
      step_fn = jax.jit(layout.traced(k_fn), in_shardings=(p_sh, o_sh, rep, rep, rep),
                        out_shardings=(p_sh, o_sh, rep, rep), donate_argnums=(0, 1))
    seeds = np.asarray([int(c.seed) for c in configs], np.int32)
    seed_arg = seeds if vmapped else seeds[0]
  elif layout is None:
    step_fn = jax.jit(jax.vmap(one_step) if vmapped else one_step, donate_argnums=(0, 1))
  else:
    step_fn = ShardedStep(layout, jax.vmap(one_step) if vmapped else one_step, p_sh, o_sh)
  eval_fn = jax.jit(jax.vmap(one_eval) if vmapped else one_eval) if layout is None else \
      jax.jit(layout.traced(jax.vmap(one_eval) if vmapped else one_eval))
  fetch = jax.device_get if layout is None else layout.fetch

  def place(batch):  # host batch -> (global) device arrays
    return batch if layout is None else layout.put_batch(batch, lead)

  def stacked(batches_per_member):
    return place(_stack(batches_per_member) if vmapped else batches_per_member[0])

  eval_batches = [place(b) for b in (
      [_stack(bs) for bs in zip(*[s.eval_batches for s in setups])]
      if vmapped else list(setup.eval_batches))]

  def data_state():
    if setup.train_batches is None:
      state = {"step": step}
    else:
      states = [s.train_batches.get_state() for s in setups]
      state = states if vmapped else states[0]
    if select:
      return {"data": state, "best_value": best_value, "best_step": best_step}
    return state

  def keep_best(params, best_params, improved):
    """best_params with the improved members' parameters replaced by copies of params."""
    if not vmapped:
      return jax.tree.map(jnp.copy, params)
    mask = jnp.asarray(improved)
    return jax.tree.map(lambda p, b: jnp.where(mask.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
                        params, best_params)

  on_gpu = jax.default_backend() == "gpu"
  bar = None
  if config.get("progress", True) and rds[0].writer:
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)
  log_every, eval_every = int(config.log_every), int(config.eval_every)
  ckpt_every, per_call = int(config.checkpoint_every), int(config.train.get("steps_per_call", 1))

  def event(s):  # steps after which the host must see the state
    return s == 1 or s % log_every == 0 or s % eval_every == 0 or s % ckpt_every == 0 or \
        s == steps

  last_eval: list[dict] = [{} for _ in configs]
  last_loss = [None] * len(configs)
  window_t, window_steps = time.time(), 0
  try:
    while step < steps:
      if setup.batch_fn is not None:
        n = 1
        while n < per_call and step + n < steps and not event(step + n):
          n += 1
        params, opt_state, metrics, mean_loss = step_fn(params, opt_state, seed_arg, step, n)
      else:
        n = 1
        batch = stacked([next(s.train_batches) for s in setups])
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        mean_loss = None
      step += n
      window_steps += n
      is_last = step == steps
      # An eval step is also a log step, so `eval_every` need not be a multiple of log_every.
      if step % log_every == 0 or step % eval_every == 0 or is_last or step == 1:
        metrics = jax.device_get(metrics)
        dt = (time.time() - window_t) / window_steps
        window_t, window_steps = time.time(), 0
        do_eval = step % eval_every == 0 or is_last
        evals = (evaluate(eval_fn, params, eval_batches, setup.summarize, members=members,
                          fetch=fetch) if do_eval else None)
        rate = units * (members or 1) / dt if dt > 0 else 0.0
        for i, rd in enumerate(rds):
          if failed[i]:
            continue
          m = _member(metrics, i) if vmapped else metrics
          loss = last_loss[i] = float(m["train/loss"])
          row = {"step": step, setup.unit: step * units,
                 "compute/paper_macs": setup.paper_macs_per_unit * step * units,
                 "compute/train_flops": setup.train_flops_per_unit * step * units,
                 "lr": float(scheds[i](step - 1)), "train/loss": loss,
                 "grad_norm": float(m["grad_norm"]), "time/step_s": dt,
                 f"throughput/{setup.unit}_per_s": rate}
          if mean_loss is not None:
            ml = np.asarray(jax.device_get(mean_loss))
            row["train/loss_mean"] = float(ml[i] if vmapped else ml)
          if on_gpu:
            row["throughput/mfu"] = rate * setup.train_flops_per_unit / (
                H100_BF16_PEAK * (jax.device_count() if layout is None else layout.mesh.size))
          if evals is not None:
            last_eval[i] = evals[i] if vmapped else evals
            row.update(last_eval[i])
          rd.log(row)
          if not math.isfinite(loss):
            failed[i] = f"non-finite training loss {loss} at step {step}"
            if not vmapped:
              raise NonFiniteLoss(failed[i])
            results[i].update(status=f"failed: {failed[i]}", wall_time_s=time.time() - t_start)
            rd.write_json("result.json", results[i])
        if select and evals is not None:
          improved = [not failed[i] and float(last_eval[i][select]) < best_value[i]
                      for i in range(len(configs))]
          if any(improved):
            best_params = keep_best(params, best_params, improved)
            for i in np.flatnonzero(improved):
              best_value[i], best_step[i] = float(last_eval[i][select]), step
        if all(failed):
          raise NonFiniteLoss("every member: " + "; ".join(failed))
        if bar is not None:
          bar.set_postfix(loss=f"{last_loss[0]:.4g}", rate=f"{rate:.3g}")
      if bar is not None:
        bar.update(n)
      if step % ckpt_every == 0 or is_last:
        manager.save(step, params, opt_state, data_state(), best=best_params)
  except NonFiniteLoss as e:
    manager.save(step, params, opt_state, data_state(), force=True, best=best_params)
    manager.close()
    for i, rd in enumerate(rds):
      results[i].update(status=f"failed: {failed[i] or e}; stopped after a final checkpoint at "
                        f"step {step}", wall_time_s=time.time() - t_start)
      rd.write_json("result.json", results[i])
      rd.close()
    raise
  finally:
    if bar is not None:
      bar.close()
  manager.close()
  test_evals = None
  if setup.test_batches is not None:
    test_batches = [place(b) for b in (
        [_stack(bs) for bs in zip(*[s.test_batches for s in setups])]
        if vmapped else list(setup.test_batches))]
    test_evals = evaluate(eval_fn, best_params if select else params, test_batches,
                          setup.summarize, prefix="test", members=members, fetch=fetch)
  for i, rd in enumerate(rds):
    if failed[i]:
      rd.close()
      continue
    r = results[i]
    r.update(status="completed", **{setup.unit: step * units, "final/train_loss": last_loss[i],
             "compute/paper_macs": setup.paper_macs_per_unit * step * units,
             "compute/train_flops": setup.train_flops_per_unit * step * units},
             wall_time_s=time.time() - t_start, finished=rundir_lib.now())
    for key, final_key in setup.final.items():
      r[final_key] = last_eval[i].get(key)
    if test_evals is not None:
      r.update(test_evals[i] if vmapped else test_evals)
    if select:
      r.update({"select/metric": select, "select/best_step": best_step[i],
                "select/best_value": best_value[i]})
    rd.write_json("result.json", r)
    rd.close()
  return results


# ------------------------------------------------------------------------------------- CLI


def main(argv=None):
  from absl import app, flags, logging

  from structattn import configs
  configs.define_flag("config", example="lm:tiny", lock_config=True)
  configs.set_usage(__doc__, "structattn-train --config=lm:tiny --workdir=runs/tiny "
                    "--config.train.steps=100")
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
  flags.DEFINE_string("compilation_cache", "~/.cache/structattn/jax", "Persistent JAX "
                      "compilation cache directory ('' to disable).")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed: auto "
                    "(when coordinator flags are given or SLURM / Open MPI / a TPU pod is "
                    "detected), on (always, cluster auto-detected by jax) or off.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    del argv
    from structattn import distributed
    F = flags.FLAGS
    distributed.initialize(F.coordinator_address, F.num_processes, F.process_id,
                           mode=F.distributed)  # before anything touches the devices
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from structattn.sweep import enable_compilation_cache
    enable_compilation_cache(F.compilation_cache or None)
    result = train(F.config, F.workdir)
    if jax.process_index() == 0:
      print({k: v for k, v in result.items()
             if k == "status" or k.startswith(("final/", "test/")) or k == result.get("unit")})

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
