"""Train any task: one pure train step, jitted once; the loop logs, evals, checkpoints.

    structattn-train --config=lm:tiny --workdir=runs/tiny [--config.a.b=v ...]
    python -m structattn.train --config=lm:paper-mlr-512 --workdir=runs/mlr512

The same command in the same workdir resumes from the last checkpoint (params, optimiser
state, step, best-so-far and the data iterator's position), so a killed run loses nothing.

Every run is a group of M >= 1 members that differ only in seed and train.lr (`train_group`;
`train(config, workdir)` is a group of one).  The state carries a leading member axis, the
step is mapped over it (`over_members`) and compiled once; each member writes its own run
directory, checkpoints included, exactly as a separate run would.

Scale-out (docs/scaling-out.md): `config.mesh` (data, fsdp, tensor; -1 = the rest) builds a
device mesh, parameters and optimiser state are sharded by their logical axis names
(`config.sharding.rules`), the step is compiled once with in/out shardings and donation, and
each host feeds its slice of the global batch.  Multi-host runs initialise
`jax.distributed` from the environment (SLURM, TPU pods) or --coordinator_address,
--num_processes, --process_id.  Without a mesh the same code runs on a mesh of one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from structattn import checkpoint as ckpt_lib
from structattn import configs as configs_lib
from structattn import hardware
from structattn import rundir as rundir_lib
from structattn import runtime
from structattn import sharding as sharding_lib
from structattn import tasks as tasks_lib
from structattn.lm.loss import cross_entropy, eval_step, loss_fn  # noqa: F401  (the LM's)
from structattn.optim import grad_norm as optim_grad_norm, make_optimizer, schedule, with_lr

MEMBER_FIELDS = ("seed", "train.lr")  # what the members of a group may differ in


class NonFiniteLoss(RuntimeError):
  pass


class LegacyCheckpointError(RuntimeError):
  pass


# ------------------------------------------------------------------------------ pure parts


def train_step(params, opt_state, batch, *, graphdef, rest, tx, accum: int = 1, loss=loss_fn):
  """One optimiser step on a batch of leading size accum * micro, gradient accumulation by
  scan.  `loss(params, graphdef, rest, batch)` defaults to the LM loss; tasks pass theirs."""

  def micro(carry, mb):
    value, grads = jax.value_and_grad(loss)(params, graphdef, rest, mb)
    acc_loss, acc_grads = carry
    return (acc_loss + value, jax.tree.map(jnp.add, acc_grads, grads)), None

  if accum == 1:
    value, grads = jax.value_and_grad(loss)(params, graphdef, rest, batch)
  else:
    mbs = jax.tree.map(lambda x: sharding_lib.constrain(
        x.reshape(accum, -1, *x.shape[1:]), (None, "batch") + (None,) * (x.ndim - 1)), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (value, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), mbs)
    value, grads = value / accum, jax.tree.map(lambda g: g / accum, grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  grad_norm = optim_grad_norm(grads, opt_state)  # a fused optimiser's own (computed once)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"train/loss": value, "grad_norm": grad_norm}


def multi_step(params, opt_state, seed, step0, num_steps, *, batch_fn, step_fn):
  """`num_steps` optimiser steps with batches drawn on device by batch_fn(seed, step): one
  compiled call for many steps (a while loop, so num_steps may vary without recompiling).
  Returns (params, opt_state, metrics of the last step plus `train/loss_mean` over the
  steps)."""

  def body(i, carry):
    p, o, _, total = carry
    p, o, m = step_fn(p, o, batch_fn(seed, step0 + i))
    return p, o, m, total + m["train/loss"]

  batch0 = jax.eval_shape(batch_fn, seed, step0)
  m0 = jax.eval_shape(step_fn, params, opt_state, batch0)[2]
  m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
  params, opt_state, m, total = jax.lax.fori_loop(
      0, num_steps, body, (params, opt_state, m0, jnp.zeros((), jnp.float32)))
  return params, opt_state, dict(m, **{"train/loss_mean": total / jnp.maximum(num_steps, 1)})


def over_members(fn, members: int, in_axes: Sequence[int | None]):
  """fn mapped over the leading member axis of the arguments whose in_axes entry is 0 (and of
  every output): `jax.vmap` for a group; for one member the axis is dropped before a plain
  call and restored after it, so a single run compiles exactly the unbatched program."""
  if members > 1:
    return jax.vmap(fn, in_axes=tuple(in_axes))

  def one(*args):
    args = [jax.tree.map(lambda x: x[0], a) if ax == 0 else a for a, ax in zip(args, in_axes)]
    return jax.tree.map(lambda x: x[None], fn(*args))
  return one


def evaluate(eval_fn, params, batches, summarizers, prefix="eval", fetch=jax.device_get):
  """Held-out metrics per member: per-example arrays (member axis first) concatenated over
  batches, then summarised by each member's `summarize`."""
  outs = [fetch(eval_fn(params, b)) for b in batches]
  arrays = {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}
  return [summarize({k: v[i] for k, v in arrays.items()}, prefix)
          for i, summarize in enumerate(summarizers)]


# ----------------------------------------------------------------------------------- setup


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
  config.train.steps = tasks_lib.train_steps(
      config, setup.paper_macs_per_unit * setup.units_per_step)
  return config


def check_group(configs) -> None:
  """Members of one group may differ only in seed and train.lr."""
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


def _finished(result, config) -> bool:
  """A completed run of at least the configured length (or the same compute budget)."""
  if not result or result.get("status") != "completed":
    return False
  budget = float(config.train.get("compute_budget", 0) or 0)
  if budget > 0:
    return float(result.get("train/compute_budget", 0)) == budget
  return int(result.get("train/steps", 0)) >= int(config.train.steps)


def _build_setups(configs):
  """The tasks (model and data), built once.  With several processes, process 0 prepares the
  data first (a dataset on a shared filesystem is built once, not by every host at once)."""
  if jax.process_count() == 1:
    return [tasks_lib.build(c) for c in configs]
  from jax.experimental import multihost_utils
  setups = [tasks_lib.build(c) for c in configs] if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("structattn: data prepared by process 0")
  return setups or [tasks_lib.build(c) for c in configs]


def _layout(config) -> tuple[sharding_lib.Layout, dict]:
  """The run's layout and its result.json entry: the configured mesh, or (no mesh) a mesh of
  one local device, the same code path."""
  layout = sharding_lib.from_config(config)
  if layout is not None:
    return layout, {"mesh": layout.describe()}
  if jax.process_count() > 1:
    raise ValueError("a multi-process run needs a device mesh: set config.mesh (e.g. "
                     "--config.mesh.data=-1)")
  mesh = sharding_lib.make_mesh((1,) * len(sharding_lib.MESH_AXES),
                                devices=jax.local_devices()[:1])
  return sharding_lib.Layout(mesh, sharding_lib.rules_from(config)), {}


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
  the member axis).  Returns (params, opt_state, param_shardings, opt_state_shardings)."""
  p_sh = layout.param_shardings(params_state, lead=lead)
  o_sh = layout.shardings_like(opt_state, params, p_sh)
  return layout.put(params, p_sh), layout.put(opt_state, o_sh), p_sh, o_sh


class ShardedStep:
  """`fn(params, opt_state, *args) -> (params, opt_state, metrics)` jitted once with in/out
  shardings and donation of params and optimiser state (the successor of pjit); the shardings
  of `args` are those of the first call's (placed arrays; anything else replicated), metrics
  replicated.  Activations are constrained by the layout while tracing."""

  def __init__(self, layout, fn, p_sh, o_sh):
    self.layout, self.fn, self.p_sh, self.o_sh = layout, fn, p_sh, o_sh
    self.jitted = None

  def jit(self, *args):
    """The jitted step for arguments sharded like `args` (built once)."""
    if self.jitted is None:
      a_sh = jax.tree.map(
          lambda x: x.sharding if isinstance(x, jax.Array) else self.layout.replicated, args)
      self.jitted = jax.jit(self.layout.traced(self.fn),
                            in_shardings=(self.p_sh, self.o_sh, *a_sh),
                            out_shardings=(self.p_sh, self.o_sh, self.layout.replicated),
                            donate_argnums=(0, 1))
    return self.jitted

  def __call__(self, params, opt_state, *args):
    return self.jit(*args)(params, opt_state, *args)


# ------------------------------------------------------------------------------- the data


class HostFeed:
  """Batches from each member's checkpointable host iterator (`TaskSetup.train_batches`),
  stacked over members and placed on the mesh: one optimiser step per call."""
  in_axes = (0,)

  def __init__(self, setups, layout):
    self.iterators, self.layout, self.per_call = [s.train_batches for s in setups], layout, 1

  def wrap(self, step_fn):
    return step_fn

  def args(self, step: int, n: int):
    return (self.layout.put_batch(_stack([next(it) for it in self.iterators]), lead=1),)

  def state(self) -> list:
    return [it.get_state() for it in self.iterators]

  def restore(self, states) -> None:
    for it, s in zip(self.iterators, states):
      it.set_state(s)


class DeviceFeed:
  """Batches drawn inside the compiled step by the task's pure `batch_fn(seed, step)`:
  `train.steps_per_call` optimiser steps per call; the position is the step itself."""
  in_axes = (0, None, None)

  def __init__(self, setups, configs):
    self.batch_fn = setups[0].batch_fn
    self.seeds = np.asarray([int(c.seed) for c in configs], np.int32)
    self.per_call = int(configs[0].train.get("steps_per_call", 1))

  def wrap(self, step_fn):
    def batch_fn(seed, step):  # split over the mesh's batch axes where they divide
      return sharding_lib.constrain_batch(self.batch_fn(seed, step))
    return functools.partial(multi_step, batch_fn=batch_fn, step_fn=step_fn)

  def args(self, step: int, n: int):
    return (self.seeds, step, n)

  def state(self) -> list:
    return [None] * len(self.seeds)

  def restore(self, states) -> None:
    pass


# ------------------------------------------------------------------------------ the state


@dataclasses.dataclass
class MemberState:
  """One member's bookkeeping.  `failed`, the best-so-far and `data` (its host iterator's
  position) are checkpointed; the last loss and evaluation are what result.json reports."""
  failed: str | None = None
  best_value: float = math.inf
  best_step: int = 0
  data: Any = None
  last_loss: float | None = None
  last_eval: dict = dataclasses.field(default_factory=dict)

  def meta(self) -> dict:
    return {"format": 2, "failed": self.failed, "best_value": self.best_value,
            "best_step": self.best_step, "data": self.data}

  @classmethod
  def from_meta(cls, meta) -> "MemberState":
    if isinstance(meta, dict) and meta.get("format") == 2:
      return cls(failed=meta["failed"], best_value=float(meta["best_value"]),
                 best_step=int(meta["best_step"]), data=meta["data"])
    # Older single runs stored the iterator state itself ({'step': n} for batch_fn tasks),
    # or {data, best_value: [v], best_step: [s]} with best-validation selection.
    if isinstance(meta, dict) and set(meta) == {"data", "best_value", "best_step"}:
      return cls(best_value=float(meta["best_value"][0]), best_step=int(meta["best_step"][0]),
                 data=meta["data"])
    return cls(data=meta)


@dataclasses.dataclass
class RunState:
  """What a checkpoint holds: the step, the arrays (leading member axis M) and each member's
  bookkeeping.  `best` is the best-validation parameter set when eval.select_best is on."""
  step: int
  params: Any
  opt_state: Any
  best: Any
  members: list[MemberState]

  def arrays(self) -> dict[str, Any]:
    out = {"params": self.params, "opt_state": self.opt_state}
    return out if self.best is None else dict(out, best=self.best)


@dataclasses.dataclass
class Member:
  """One run of the group: its config, task, run directory, checkpoints and result."""
  config: ml_collections.ConfigDict
  setup: tasks_lib.TaskSetup
  rundir: rundir_lib.RunDir
  checkpoints: ckpt_lib.Manager
  result: dict

  def write_result(self, **updates) -> None:  # the one writer of result.json
    self.result.update(updates)
    self.rundir.write_json("result.json", self.result)


class Group:
  """The static parts of a run: members, mesh, model split, optimiser, compiled functions."""

  def __init__(self, configs, setups, rundirs):
    config, setup = configs[0], setups[0]
    self.steps, self.size = int(config.train.steps), len(configs)
    self.layout, self.mesh_info = _layout(config)
    _check_layout(self.layout, config, setup)
    self.graphdef, params_state, self.rest = nnx.split(setup.model, nnx.Param, ...)
    self.tx, _ = make_optimizer(config.train, params_state)
    self.members = [Member(c, s, rd, ckpt_lib.Manager(rd.path / "checkpoints",
                                                      keep=c.keep_checkpoints), {})
                    for c, s, rd in zip(configs, setups, rundirs)]
    self.select = setup.select if bool(config.eval.get("select_best", False)) else None
    self.feed = HostFeed(setups, self.layout) if setup.batch_fn is None \
        else DeviceFeed(setups, configs)
    # Shardings of one member's state (checkpoints) and of the group's (leading member axis).
    p0 = nnx.to_pure_dict(params_state)
    o0 = self.tx.init(p0)
    self.p_sh = self.layout.param_shardings(params_state, lead=1)
    def lead(tree):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), tree)
    self.o_sh = self.layout.shardings_like(lead(o0), lead(p0), self.p_sh)
    p_sh0 = self.layout.param_shardings(params_state)
    self.member_sh = {"params": p_sh0, "opt_state": self.layout.shardings_like(o0, p0, p_sh0),
                      "best": p_sh0}
    self.member_shapes = {"params": jax.eval_shape(lambda: p0),
                          "opt_state": jax.eval_shape(lambda: o0),
                          "best": jax.eval_shape(lambda: p0)}
    one_step = functools.partial(train_step, graphdef=self.graphdef, rest=self.rest, tx=self.tx,
                                 accum=config.train.grad_accum, loss=setup.loss)
    self.step_fn = ShardedStep(self.layout, over_members(
        self.feed.wrap(one_step), self.size, (0, 0) + self.feed.in_axes), self.p_sh, self.o_sh)

    def one_eval(params, batch):
      return setup.eval_metrics(params, self.graphdef, self.rest, batch)
    self.eval_fn = jax.jit(self.layout.traced(over_members(one_eval, self.size, (0, 0))))
    self.eval_batches = self.place_batches([s.eval_batches for s in setups])

  def place_batches(self, per_member):
    """Each member's batches, stacked over members and placed on the mesh."""
    return [self.layout.put_batch(_stack(bs), lead=1) for bs in zip(*per_member)]

  def evaluate(self, params, batches, prefix="eval"):
    return evaluate(self.eval_fn, params, batches, [m.setup.summarize for m in self.members],
                    prefix=prefix, fetch=self.layout.fetch)

  def test(self, state: RunState) -> list[dict]:
    """Each member's test metrics (with its best-validation parameters when selecting), or
    nothing when the task has no test split."""
    if self.members[0].setup.test_batches is None:
      return [{} for _ in self.members]
    batches = self.place_batches([m.setup.test_batches for m in self.members])
    return self.evaluate(state.best if self.select else state.params, batches, prefix="test")

  def init_state(self, setups) -> RunState:
    params = [nnx.to_pure_dict(nnx.split(s.model, nnx.Param, ...)[1]) for s in setups]
    opt = [with_lr(self.tx.init(p), float(m.config.train.lr))
           for p, m in zip(params, self.members)]
    params = self.layout.put(_stack(params), self.p_sh)
    opt = self.layout.put(_stack(opt), self.o_sh)
    best = jax.tree.map(jnp.copy, params) if self.select else None
    return RunState(0, params, opt, best, [MemberState() for _ in self.members])

  @functools.cached_property
  def _split(self):  # group arrays -> one tree per member, on the member shardings
    names = ["params", "opt_state"] + (["best"] if self.select else [])
    sh = {k: self.member_sh[k] for k in names}
    return jax.jit(lambda t: [jax.tree.map(lambda x: x[i], t) for i in range(self.size)],
                   out_shardings=[sh] * self.size)

  def _join(self, trees):  # one tree per member -> group arrays
    sh = {"params": self.p_sh, "opt_state": self.o_sh, "best": self.p_sh}
    return jax.jit(lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts),
                   out_shardings={k: sh[k] for k in trees[0]})(trees)

  @functools.cached_property
  def keep_best(self):
    """best with the members in `improved` (a bool per member) replaced by their params."""
    def fn(params, best, improved):
      return jax.tree.map(
          lambda p, b: jnp.where(improved.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
          params, best)
    return jax.jit(fn, out_shardings=self.p_sh, donate_argnums=(1,))

  def save(self, state: RunState, force: bool = False) -> None:
    """Each member's slice of the state into its own checkpoints/ (every process calls it)."""
    for ms, data in zip(state.members, self.feed.state()):
      ms.data = data
    for m, ms, arrays in zip(self.members, state.members, self._split(state.arrays())):
      if state.step not in m.checkpoints.steps():  # e.g. a failure right after a restore
        m.checkpoints.write(state.step, arrays, ms.meta(), force=force)

  def restore(self, state: RunState, legacy_dir: Path | None) -> RunState:
    """The state at the newest step every member has a checkpoint of (checkpoints past it are
    removed: a member killed ahead of the others), or `state` when there is none."""
    steps = [set(m.checkpoints.steps()) for m in self.members]
    if legacy_dir is not None and not any(steps):
      _refuse_legacy_group(legacy_dir)
    common = set.intersection(*steps)
    step = max(common) if common else 0
    for m in self.members:
      m.checkpoints.delete_after(step)
    if not common:
      return state
    names = list(state.arrays())
    shapes = {k: self.member_shapes[k] for k in names}
    shardings = {k: self.member_sh[k] for k in names}
    reads = [m.checkpoints.read(step, shapes, shardings) for m in self.members]
    arrays = self._join([items for items, _ in reads])
    members = [MemberState.from_meta(meta) for _, meta in reads]
    self.feed.restore([ms.data for ms in members])
    return RunState(step, arrays["params"], arrays["opt_state"], arrays.get("best"), members)

  def close(self) -> None:
    for m in self.members:
      m.checkpoints.close()
      m.rundir.close()


def _refuse_legacy_group(group_dir: Path) -> None:
  """Older versions kept a vmapped group's stacked checkpoints in one group directory."""
  ckpt = group_dir / "checkpoints"
  if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
    raise LegacyCheckpointError(
        f"{ckpt} holds the stacked checkpoints of an older version; this version keeps each "
        f"member's checkpoints in its own run directory and cannot resume from them: finish "
        f"the group with the older version, or delete {group_dir} to train it afresh")


# ------------------------------------------------------------------------------- the loop


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) one training run; returns its result (also written to result.json)."""
  return _run([config], [workdir])[0]


def train_group(configs, workdirs, group_dir: str | None = None) -> list[dict[str, Any]]:
  """Train several small models in one process, vmapped over members that differ only in
  seed and train.lr.  Each member writes its own run directory (checkpoints included), equal
  to a separate run's.  `group_dir` (default `<first workdir>/../group-<names>`) is where
  older versions kept the group's stacked checkpoints: resuming from those is refused."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("train_group needs one workdir per config (and at least one)")
  if group_dir is None:
    first = Path(workdirs[0])
    group_dir = str(first.parent / ("group-" + "+".join(Path(w).name for w in workdirs))[:200])
  return _run(list(configs), list(workdirs), Path(group_dir))


def _run(configs, workdirs, legacy_dir: Path | None = None):
  configs = [configs_lib.migrate(c) for c in configs]  # older config keys (README: Configs)
  for c in configs:
    validate(c)
  check_group(configs)
  t_start = time.time()
  rundirs = [rundir_lib.RunDir(w) for w in workdirs]
  previous = [rd.read_json("result.json") for rd in rundirs]
  if runtime.agree(all(_finished(p, c) for p, c in zip(previous, configs))):
    return previous  # finished: nothing to do
  setups = _build_setups(configs)  # once; fails fast on a bad data config
  configs = [resolve(c, s) for c, s in zip(configs, setups)]
  g = Group(configs, setups, rundirs)
  state = g.restore(g.init_state(setups), legacy_dir)
  for m in g.members:
    m.rundir.write_json("config.json", m.config.to_dict())
    m.rundir.truncate_metrics(state.step)  # rows past the restored step are logged again
    m.write_result(**m.setup.info, **g.mesh_info, status="running", resumed_from=state.step,
                   device=rundir_lib.device_description(), versions=rundir_lib.versions(),
                   started=rundir_lib.now(), unit=m.setup.unit,
                   units_per_step=m.setup.units_per_step, **{
                       "train/steps": g.steps, "train/compute_budget": float(
                           m.config.train.get("compute_budget", 0) or 0)})
  every = Every.of(configs[0])
  bar, window = _progress(configs[0], rundirs[0], g.steps, state.step), _Window()
  try:
    _fail_if_all_failed(state)
    while state.step < g.steps:
      n = every.call_length(state.step, g.feed.per_call)
      state.params, state.opt_state, metrics = g.step_fn(
          state.params, state.opt_state, *g.feed.args(state.step, n))
      state.step += n
      window.add(n)
      bar.update(n)
      if every.log(state.step):
        evals = g.evaluate(state.params, g.eval_batches) if every.eval(state.step) else None
        _log(g, state, jax.device_get(metrics), evals, window.per_step(), t_start)
        _fail_if_all_failed(state)
        bar.set_postfix(loss=f"{state.members[0].last_loss:.4g}")
      if every.save(state.step):
        g.save(state)
  except NonFiniteLoss as e:
    g.save(state, force=True)
    for m, ms in zip(g.members, state.members):
      m.write_result(status=f"failed: {ms.failed or e}; stopped after a final checkpoint at "
                     f"step {state.step}", wall_time_s=time.time() - t_start)
    raise
  finally:
    bar.close()
    g.close()
  for m, ms, test in zip(g.members, state.members, g.test(state)):
    if not ms.failed:  # a failed member's result already says why
      m.write_result(**_final(m, ms, state.step, g.select), **test,
                     wall_time_s=time.time() - t_start, finished=rundir_lib.now())
  return [m.result for m in g.members]


@dataclasses.dataclass(frozen=True)
class Every:
  """After which steps the host logs, evaluates and checkpoints (always after the first and
  the last).  An eval step is also a log step, so eval_every need not divide log_every."""
  steps: int
  log_every: int
  eval_every: int
  ckpt_every: int

  @classmethod
  def of(cls, config) -> "Every":
    return cls(int(config.train.steps), int(config.log_every), int(config.eval_every),
               int(config.checkpoint_every))

  def log(self, s: int) -> bool:
    return s == 1 or s == self.steps or s % self.log_every == 0 or s % self.eval_every == 0

  def eval(self, s: int) -> bool:
    return s == self.steps or s % self.eval_every == 0

  def save(self, s: int) -> bool:
    return s == self.steps or s % self.ckpt_every == 0

  def call_length(self, step: int, per_call: int) -> int:
    """Optimiser steps in the next compiled call: up to `per_call`, ending at the next step
    after which the host must see the state."""
    n = 1
    while n < per_call and step + n < self.steps and not (
        self.log(step + n) or self.save(step + n)):
      n += 1
    return n


class _Window:
  """Wall time per optimiser step since the last logged step."""

  def __init__(self):
    self.start, self.steps = time.time(), 0

  def add(self, n: int) -> None:
    self.steps += n

  def per_step(self) -> float:
    now = time.time()
    dt, self.start, self.steps = (now - self.start) / max(self.steps, 1), now, 0
    return dt


def _log(g: Group, state: RunState, metrics, evals, dt: float, t_start: float) -> None:
  """One metrics row per member that has not failed; tracks the best evaluation."""
  step, rate = state.step, g.members[0].setup.units_per_step * g.size / dt if dt > 0 else 0.0
  peak = hardware.peak_flops(g.layout.mesh.devices.flat[0])
  for i, (m, ms) in enumerate(zip(g.members, state.members)):
    if ms.failed:
      continue
    s, units = m.setup, step * m.setup.units_per_step
    row = {"step": step, s.unit: units, "compute/paper_macs": s.paper_macs_per_unit * units,
           "compute/train_flops": s.train_flops_per_unit * units,
           "lr": float(schedule(m.config.train)(step - 1)),
           **{k: float(v[i]) for k, v in metrics.items()},
           "time/step_s": dt, f"throughput/{s.unit}_per_s": rate}
    if peak:
      row["throughput/mfu"] = rate * s.train_flops_per_unit / (peak * g.layout.mesh.size)
    if evals is not None:
      ms.last_eval = evals[i]
      row.update(evals[i])
    m.rundir.log(row)
    ms.last_loss = row["train/loss"]
    if not math.isfinite(ms.last_loss):
      ms.failed = f"non-finite training loss {ms.last_loss} at step {step}"
      m.write_result(status=f"failed: {ms.failed}", wall_time_s=time.time() - t_start)
  if g.select and evals is not None:
    improved = np.asarray([not ms.failed and float(ms.last_eval[g.select]) < ms.best_value
                           for ms in state.members])
    if improved.any():
      state.best = g.keep_best(state.params, state.best, improved)
      for i in np.flatnonzero(improved):
        ms = state.members[i]
        ms.best_value, ms.best_step = float(ms.last_eval[g.select]), step


def _fail_if_all_failed(state: RunState) -> None:
  if all(ms.failed for ms in state.members):
    raise NonFiniteLoss("; ".join(ms.failed for ms in state.members))


def _final(m: Member, ms: MemberState, step: int, select: str | None) -> dict[str, Any]:
  """A completed member's result entries."""
  s, units = m.setup, step * m.setup.units_per_step
  out = {"status": "completed", s.unit: units, "final/train_loss": ms.last_loss,
         "compute/paper_macs": s.paper_macs_per_unit * units,
         "compute/train_flops": s.train_flops_per_unit * units}
  out.update({final_key: ms.last_eval.get(key) for key, final_key in s.final.items()})
  if select:
    out.update({"select/metric": select, "select/best_step": ms.best_step,
                "select/best_value": ms.best_value})
  return out


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


def _progress(config, rundir, steps: int, step: int):
  """A tqdm bar on process 0 when config.progress is on (the default)."""
  if not (config.get("progress", True) and rundir.writer):
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)


# ------------------------------------------------------------------------------------- CLI


def _define_flags(fv, sys_argv):
  from absl import flags

  from structattn import configs
  configs.define_flag("config", example="lm:tiny", lock_config=True, flag_values=fv,
                      sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has "
                      "checkpoints).", flag_values=fv)
  flags.DEFINE_string("compilation_cache", runtime.DEFAULT_CACHE, "Persistent JAX "
                      "compilation cache directory ('' to disable).", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", list(runtime.MODES), "jax.distributed: auto "
                    "(when coordinator flags are given or SLURM / Open MPI / a TPU pod is "
                    "detected), on (always, cluster auto-detected by jax) or off.",
                    flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).",
                       flag_values=fv)


def _run_flags(F):
  from absl import logging
  runtime.initialize_distributed(F.coordinator_address, F.num_processes, F.process_id,
                                 mode=F.distributed)  # before anything touches the devices
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.enable_compilation_cache(F.compilation_cache or None)
  result = train(F.config, F.workdir)
  if jax.process_index() == 0:
    print({k: v for k, v in result.items()
           if k == "status" or k.startswith(("final/", "test/")) or k == result.get("unit")})


def main(argv=None):
  """`structattn-train`; argv without the program name (default sys.argv[1:])."""
  from structattn import cli
  return cli.absl_main("structattn-train", __doc__, _define_flags, _run_flags, argv,
                       example="structattn-train --config=lm:tiny --workdir=runs/tiny "
                       "--config.train.steps=100", presets=True, required=("config", "workdir"))


if __name__ == "__main__":
  main()
