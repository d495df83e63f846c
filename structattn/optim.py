"""AdamW with muP per-parameter learning rates, schedules and clipping (optax).

muP (SPEC section 3): a matrix parameter with fan-in n gets learning rate lr * base_width / n;
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


def make_optimizer(tc, params: nnx.State) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> Adam -> (decoupled weight decay) -> -lr(t) * per-parameter multiplier.

  The transformation acts on pure-dict parameter trees (`nnx.to_pure_dict`).  The peak lr is
  part of the optimiser state, so `tx.update` of one transformation serves members with
  different learning rates (`with_lr(opt_state, lr)` sets it)."""
  mults = lr_multipliers(params, tc.get("parametrization", "mup"), int(tc.get("base_width", 768)))
  sched = schedule(tc)
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
