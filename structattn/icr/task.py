"""The in-context linear-regression task: y = x.w + noise, fresh w per prompt.

x ~ N(0, I/d_active) on the first d_active coordinates and zero beyond (d_max is the padded
input width, fixed over the curriculum); w ~ N(0, I_{d_active}), zero beyond; so E[y^2] = 1
without noise.  Everything is a pure function of integer seeds: a training batch depends only
on (seed, step), a pooled prompt only on (seed, index), the eval set only on its own seed, and
the three streams are separated by a first `fold_in` (0 train, 1 eval, 2 pool), so the eval set
is never a training batch (the reference code re-scored the batch it had just trained on).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

TRAIN, EVAL, POOL = 0, 1, 2


def _stream(seed: int, tag: int) -> jax.Array:
  """Base key of one stream (train/eval/pool) of `seed`."""
  return jax.random.fold_in(jax.random.key(seed), tag)


def sample_prompt(key, n_points: int, d_max: int, d_active, noise_std: float = 0.0):
  """One prompt (x_NI, y_N, w_I) from one key; d_active may be traced (a mask, not a shape)."""
  kx, kw, kn = jax.random.split(key, 3)
  mask_I = (jnp.arange(d_max) < d_active).astype(jnp.float32)
  w_I = jax.random.normal(kw, (d_max,), jnp.float32) * mask_I
  x_NI = jax.random.normal(kx, (n_points, d_max), jnp.float32) * mask_I
  x_NI = x_NI / jnp.sqrt(jnp.asarray(d_active, jnp.float32))
  y_N = x_NI @ w_I + noise_std * jax.random.normal(kn, (n_points,), jnp.float32)
  return x_NI, y_N, w_I


def _prompts(keys_B, n_points, d_max, d_active, noise_std):
  x_BNI, y_BN, w_BI = jax.vmap(
      lambda k: sample_prompt(k, n_points, d_max, d_active, noise_std))(keys_B)
  return {"x_BNI": x_BNI, "y_BN": y_BN, "w_BI": w_BI}


def sample_batch(seed: int, step, batch: int, n_points: int, d_max: int, d_active,
                 noise_std: float = 0.0, pool_size: int | None = None) -> dict:
  """A training batch {x_BNI, y_BN, w_BI}, a pure function of (seed, step).

  With `pool_size`, each prompt is one of a finite seeded pool: its index is drawn uniformly
  from [0, pool_size) with the step's key, and the prompt is generated from
  fold_in(pool_key(seed), index), so the pool is never materialised and an index always
  gives the same w (and the same x, y for the same n_points, d_active)."""
  key = jax.random.fold_in(_stream(seed, TRAIN), step)
  if pool_size is None:
    keys_B = jax.random.split(key, batch)
  else:
    idx_B = jax.random.randint(key, (batch,), 0, pool_size)
    pool = _stream(seed, POOL)
    keys_B = jax.vmap(lambda i: jax.random.fold_in(pool, i))(idx_B)
  return _prompts(keys_B, n_points, d_max, d_active, noise_std)


def eval_set(seed: int, num: int, n_points: int, d: int, d_max: int | None = None,
             noise_std: float = 0.0) -> dict:
  """A fixed held-out set of `num` prompts with d active coordinates, from its own stream."""
  keys_B = jax.random.split(_stream(seed, EVAL), num)
  return _prompts(keys_B, n_points, d if d_max is None else d_max, d, noise_std)


def curriculum(step: int, total_steps: int, d_start: int = 4, d_end: int = 4, n_start: int = 8,
               n_end: int | None = None, every: int = 2000,
               end_fraction: float = 0.06) -> tuple[int, int]:
  """(d_active, n_points) at `step`: raised by fixed increments every `every` steps.

  Rule: the curriculum must finish within B = max(1, floor(end_fraction * total_steps))
  steps.  The interval is e = min(every, B) (shrunk only if not even one raise fits), giving
  K = B // e raises; d grows by ceil((d_end - d_start) / K) and N by
  ceil((n_end - n_start) / K) at each multiple of e, clipped at d_end and n_end
  (n_end = 2 d_end by default).  So d(step) = min(d_end, d_start + inc_d * (step // e)):
  monotone, (d_start, n_start) at step 0, (d_end, n_end) from step K * e <= B on.
  """
  e, inc_d, inc_n, n_end = curriculum_rule(total_steps, d_start, d_end, n_start, n_end, every,
                                           end_fraction)
  k = int(step) // e
  return int(min(d_end, d_start + inc_d * k)), int(min(n_end, n_start + inc_n * k))


def curriculum_rule(total_steps: int, d_start: int = 4, d_end: int = 4, n_start: int = 8,
                    n_end: int | None = None, every: int = 2000,
                    end_fraction: float = 0.06) -> tuple[int, int, int, int]:
  """(interval e, d increment, N increment, n_end) of `curriculum` (its docstring has the rule)."""
  n_end = 2 * d_end if n_end is None else n_end
  budget = max(1, int(math.floor(end_fraction * total_steps)))
  e = max(1, min(every, budget))
  raises = max(1, budget // e)
  inc_d = -(-max(0, d_end - d_start) // raises)
  inc_n = -(-max(0, n_end - n_start) // raises)
  return e, inc_d, inc_n, n_end


def curriculum_traced(step, total_steps: int, d_start: int = 4, d_end: int = 4,
                      n_start: int = 8, n_end: int | None = None, every: int = 2000,
                      end_fraction: float = 0.06):
  """`curriculum` for a traced step (int32 arrays), for batches drawn inside a jitted step."""
  e, inc_d, inc_n, n_end = curriculum_rule(total_steps, d_start, d_end, n_start, n_end, every,
                                           end_fraction)
  k = jnp.asarray(step, jnp.int32) // e
  return jnp.minimum(d_end, d_start + inc_d * k), jnp.minimum(n_end, n_start + inc_n * k)


def interleave(x_BNI: jax.Array, y_BN: jax.Array) -> jax.Array:
  """Tokens (x_1, [y_1, 0..0], x_2, [y_2, 0..0], ...) of shape (B, 2N, I)."""
  b, n, d = x_BNI.shape
  y_BNI = jnp.zeros_like(x_BNI).at[..., 0].set(y_BN.astype(x_BNI.dtype))
  return jnp.stack([x_BNI, y_BNI], axis=2).reshape(b, 2 * n, d)
