"""AdamW with muP per-parameter learning rates, schedules and clipping (optax).

muP (see the README): a matrix parameter with fan-in n gets learning rate lr * base_width / n;
embeddings, positions, LayerNorm weights and biases (no `fan_in` metadata) get lr.  Inits
(N(0, 1/fan_in), zero output projections) live in the modules.  `parametrization='standard'`
gives every parameter the same lr (the control in the muP coordinate check).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SCHEDULES = ("constant", "cosine", "linear", "step_decay")
PARAMETRIZATIONS = ("mup", "standard")


def lr_multipliers(params: nnx.State, parametrization: str, base_width: int) -> Any:
  """Pure-dict tree (like `nnx.to_pure_dict(params)`) of per-parameter lr multipliers."""
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"train.parametrization={parametrization!r} is invalid: allowed values are "
                     f"{PARAMETRIZATIONS}")

  def mult(v):
    fan_in = getattr(v, "fan_in", None)
    if parametrization == "standard" or not fan_in:
      return 1.0
    return float(base_width) / float(fan_in)

  tree = jax.tree.map(mult, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree)


def unit_schedule(tc) -> optax.Schedule:
  """The schedule's shape with peak 1: linear warmup then constant, cosine (to
  `min_lr_ratio`), linear decay, or step_decay: constant until `train.decay_start`, then
  multiplied by `train.decay_rate` every `train.decay_every` steps (PatchTST's 'type3': the
  lr for the first epochs, then x0.9 per epoch).  The learning rate is lr * unit_schedule(step).
  `train.initial_steps` = k > 0 replaces the first k steps' value by `train.initial_lr_ratio`
  (PatchTST's first epoch at max_lr / 25, from a OneCycleLR built but never stepped)."""
  kind = tc.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ValueError(f"train.schedule={kind!r} is invalid: allowed values are {SCHEDULES}")
  warm, steps = int(tc.get("warmup_steps", 0)), int(tc.steps)
  end = float(tc.get("min_lr_ratio", 0.0))
  warmup = optax.linear_schedule(0.0, 1.0, max(1, warm))
  decay_steps = max(1, steps - warm)
  if kind == "constant":
    after = optax.constant_schedule(1.0)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(1.0, decay_steps, alpha=end)
  elif kind == "linear":
    after = optax.linear_schedule(1.0, end, decay_steps)
  else:
    every, rate = int(tc.get("decay_every", 0)), float(tc.get("decay_rate", 0.0))
    if every <= 0 or not 0.0 < rate <= 1.0:
      raise ValueError(f"train.schedule='step_decay' needs train.decay_every > 0 (got {every}) "
                       f"and train.decay_rate in (0, 1] (got {rate})")
    after = optax.exponential_decay(1.0, every, rate, max(0, int(tc.get("decay_start", 0)) - warm),
                                    staircase=True)
  out = optax.join_schedules([warmup, after], [warm]) if warm else after
  first, ratio = int(tc.get("initial_steps", 0)), float(tc.get("initial_lr_ratio", 1.0))
  if first > 0:
    return lambda step, f=out: jnp.where(step < first, jnp.float32(ratio), f(step))
  return out


def schedule(tc) -> optax.Schedule:
  """lr(step) = train.lr * unit_schedule(step) (for logging; the optimiser reads its lr from
  its state)."""
  lr, unit = float(tc.lr), unit_schedule(tc)
  return lambda step: lr * unit(step)


class ScaleByLRState(NamedTuple):
  count: jax.Array
  lr: jax.Array  # the peak learning rate: state, so that vmapped members may differ


def scale_by_lr(lr: float, unit: optax.Schedule) -> optax.GradientTransformation:
  """updates * -(lr * unit(count)), with lr held in the optimiser state (float32)."""

  def init(params):
    del params
    return ScaleByLRState(jnp.zeros((), jnp.int32), jnp.asarray(lr, jnp.float32))

  def update(updates, state, params=None):
    del params
    step_size = -(state.lr * unit(state.count))
    updates = jax.tree.map(lambda u: u * step_size.astype(u.dtype), updates)
    return updates, ScaleByLRState(state.count + 1, state.lr)

  return optax.GradientTransformation(init, update)


class ScaleByTreeState(NamedTuple):
  pass


def scale_by_tree(mults) -> optax.GradientTransformation:
  """Multiply each update leaf by a fixed per-leaf scalar."""

  def init(params):
    del params
    return ScaleByTreeState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state

  return optax.GradientTransformation(init, update)


class FusedAdamState(NamedTuple):
  count: jax.Array  # int32, Adam's step count (bias correction)
  mu: tuple[jax.Array, ...]  # first moments: one flat vector per parameter dtype
  nu: tuple[jax.Array, ...]  # second moments, laid out like mu
  grad_norm: jax.Array  # global norm of the last update's gradients (before clipping)


def _groups(leaves):
  """Leaf indices grouped by dtype, in order of first appearance."""
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(jnp.dtype(x.dtype), []).append(i)
  return list(groups.values())


def _flat(leaves, idx):
  return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])


def fused_adamw(mults, *, clip_norm: float, b1: float, b2: float, eps: float,
                weight_decay: float) -> optax.GradientTransformation:
  """clip_by_global_norm -> scale_by_adam -> add_decayed_weights over all leaves at once.

  The gradient leaves of each dtype are raveled and concatenated into one vector, the Adam
  moments are flat vectors of the same layout, the global norm is one reduction over the flat
  gradients (kept in the state for logging: `grad_norm`), and the per-leaf multiplier tree
  `mults` (python floats) scales each leaf's slice when the flat update is split back into
  leaves.  The update of every element is the same sequence of float operations as the
  unfused optax chain; only the global norm sums in another order.  The state of the moments
  is flat, so this optimiser's state is replicated on a mesh (no FSDP of the moments)."""
  mult_leaves = jax.tree.leaves(mults)

  def init(params):
    leaves = jax.tree.leaves(params)
    def zeros():  # distinct buffers for mu and nu (both are donated)
      return tuple(jnp.zeros((sum(int(leaves[i].size) for i in g),), leaves[g[0]].dtype)
                   for g in _groups(leaves))
    return FusedAdamState(jnp.zeros([], jnp.int32), zeros(), zeros(), jnp.zeros([], jnp.float32))

  def update(grads, state, params=None):
    leaves, treedef = jax.tree.flatten(grads)
    if len(leaves) != len(mult_leaves):
      raise ValueError(f"fused_adamw: {len(leaves)} gradient leaves, {len(mult_leaves)} "
                       f"multipliers")
    groups = _groups(leaves)
    flat = [_flat(leaves, g) for g in groups]
    g_norm = jnp.sqrt(sum(jnp.sum(jnp.square(f)) for f in flat))
    if clip_norm:
      trigger = jnp.squeeze(g_norm < clip_norm)
      flat = [jax.lax.select(trigger, f, (f / g_norm.astype(f.dtype)) * clip_norm)
              for f in flat]
    mu = tuple((1 - b1) * (f ** 1) + b1 * m for f, m in zip(flat, state.mu))
    nu = tuple((1 - b2) * (f ** 2) + b2 * v for f, v in zip(flat, state.nu))
    count_inc = optax.safe_increment(state.count)
    c1, c2 = 1 - b1 ** count_inc, 1 - b2 ** count_inc
    out = [(m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype) + 0.0) + eps)
           for m, v in zip(mu, nu)]
    if weight_decay:
      if params is None:
        raise ValueError("fused_adamw with weight decay needs params")
      p_leaves = treedef.flatten_up_to(params)
      out = [u + weight_decay * _flat(p_leaves, g) for u, g in zip(out, groups)]
    new = [None] * len(leaves)
    for u, g in zip(out, groups):
      off = 0
      for i in g:
        n = int(leaves[i].size)
        new[i] = jax.lax.slice_in_dim(u, off, off + n).reshape(leaves[i].shape)
        off += n
    return (jax.tree.unflatten(treedef, new),
            FusedAdamState(count_inc, mu, nu, g_norm.astype(jnp.float32)))

  return optax.GradientTransformation(init, update)


def scale_by_lr_and_tree(lr: float, unit: optax.Schedule, mults) -> optax.GradientTransformation:
  """`scale_by_lr` then `scale_by_tree` in one pass over the leaves (state: ScaleByLRState)."""
  lr_part = scale_by_lr(lr, unit)

  def update(updates, state, params=None):
    del params
    step_size = -(state.lr * unit(state.count))
    updates = jax.tree.map(
        lambda u, m: (u * step_size.astype(u.dtype)) * jnp.asarray(m, u.dtype), updates, mults)
    return updates, ScaleByLRState(state.count + 1, state.lr)

  return optax.GradientTransformation(lr_part.init, update)


def grad_norm(grads, opt_state) -> jax.Array:
  """The global norm of grads: read from a fused optimiser's state after its update (computed
  once), else computed."""
  found = [s.grad_norm for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, FusedAdamState))
      if isinstance(s, FusedAdamState)]
  if found:
    return found[0]
  return optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)


def make_optimizer(tc, params: nnx.State) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> Adam -> (decoupled weight decay) -> -lr(t) * per-parameter multiplier.

  The transformation acts on pure-dict parameter trees (`nnx.to_pure_dict`).  The peak lr is
  part of the optimiser state, so `tx.update` of one transformation serves members with
  different learning rates (`with_lr(opt_state, lr)` sets it).

  `train.fused_optimizer=True`: the same update as few large kernels over flat vectors
  (`fused_adamw`, then `scale_by_lr_and_tree`); its state differs from the unfused one, so a
  checkpoint of one does not restore into the other."""
  mults = lr_multipliers(params, tc.get("parametrization", "mup"), int(tc.get("base_width", 768)))
  sched = schedule(tc)
  if tc.get("fused_optimizer", False):
    return optax.chain(
        fused_adamw(mults, clip_norm=float(tc.get("clip_norm", 0.0) or 0.0),
                    b1=float(tc.get("b1", 0.9)), b2=float(tc.get("b2", 0.95)),
                    eps=float(tc.get("eps", 1e-8)),
                    weight_decay=float(tc.get("weight_decay", 0.0) or 0.0)),
        scale_by_lr_and_tree(float(tc.lr), unit_schedule(tc), mults)), sched
  parts = []
  if tc.get("clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(float(tc.clip_norm)))
  parts.append(optax.scale_by_adam(b1=float(tc.get("b1", 0.9)), b2=float(tc.get("b2", 0.95)),
                                   eps=float(tc.get("eps", 1e-8))))
  if tc.get("weight_decay", 0.0):
    parts.append(optax.add_decayed_weights(float(tc.weight_decay)))
  parts.append(scale_by_lr(float(tc.lr), unit_schedule(tc)))
  parts.append(scale_by_tree(mults))
  return optax.chain(*parts), sched


def with_lr(opt_state, lr) -> Any:
  """opt_state with the peak learning rate of its `scale_by_lr` part replaced by lr."""
  return jax.tree.map(
      lambda s: s._replace(lr=jnp.asarray(lr, jnp.float32)) if isinstance(s, ScaleByLRState)
      else s, opt_state, is_leaf=lambda s: isinstance(s, ScaleByLRState))
