"""Per-level query/key feature structures (the "scoring function" building blocks).

A feature structure maps tokens x_BTD to per-head features (q_BTHW, k_BTHW) of width W,
so that its level contributes <q_i, k_j> to the score of each pair in its sequence extent.
The bilinear matrix of the level is then x_i^T (Wq Wk^T) x_j for some structured Wq Wk^T.

To add a new structure, write one small NNX module with

  * `__init__(self, level, d_model, num_heads, *, rngs, dtype)`,
  * `__call__(self, x_BTD) -> (q_BTHW, k_BTHW)`,
  * class methods `width(level, d_model)` and `num_params(level, d_model, num_heads)`,

and decorate it with `@register_feature("name")`; configs can then use
`levels=[dict(kind="name", ...)]` with `variant='mlbtc'`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from structattn.attention.spec import FEATURES, Level, btt_factors
from structattn.linear import BTT, BlockDiagonal, Dense


def register_feature(name: str):
  def wrap(cls):
    FEATURES[name] = cls
    return cls
  return wrap


@register_feature("lowrank")
class LowRankFeatures(nnx.Module):
  """q = x Wq, k = x Wk with (block-diagonal) projections.

  With `blocks = p`, the D features split into p contiguous groups of m = D/p; group g has
  its own (m, H*r) projection, and a head's feature is the concatenation over groups (width
  p*r).  The level's bilinear matrix per head is blockdiag_g(Wq_g Wk_g^T) of rank <= p*r.
  p = 1 is the ordinary MHA projection.
  """

  def __init__(self, level: Level, d_model: int, num_heads: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.h, self.p, self.r = num_heads, level.blocks, level.rank
    out = self.p * num_heads * self.r
    if self.p == 1:
      self.wq = Dense(d_model, out, rngs=rngs, dtype=dtype)
      self.wk = Dense(d_model, out, rngs=rngs, dtype=dtype)
    else:
      self.wq = BlockDiagonal(d_model, out, self.p, rngs=rngs, dtype=dtype)
      self.wk = BlockDiagonal(d_model, out, self.p, rngs=rngs, dtype=dtype)

  def _heads(self, y):
    lead = y.shape[:-1]
    y = y.reshape(*lead, self.p, self.h, self.r)
    return jnp.swapaxes(y, -3, -2).reshape(*lead, self.h, self.p * self.r)

  def __call__(self, x_BTD):
    return self._heads(self.wq(x_BTD)), self._heads(self.wk(x_BTD))

  @classmethod
  def width(cls, level: Level, d_model: int) -> int:
    return level.rank * level.blocks

  @classmethod
  def num_params(cls, level: Level, d_model: int, num_heads: int) -> int:
    return 2 * d_model * num_heads * level.rank


@register_feature("btt")
class BTTFeatures(nnx.Module):
  """Full-rank bilinear scoring: q = x, k_h = M_h^T x with a BTT matrix M_h per head.

  Width D per head; score cost T*H*D per query; params H*s*D*(a+b).
  """

  def __init__(self, level: Level, d_model: int, num_heads: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, rms_cap: bool = True):
    btt_factors(d_model)  # validates
    self.h = num_heads
    self.btt = BTT(d_model, d_model, level.rank, num_heads, rngs=rngs, rms_cap=rms_cap,
                   dtype=dtype)

  def __call__(self, x_BTD):
    q = jnp.broadcast_to(x_BTD[..., None, :], (*x_BTD.shape[:-1], self.h, x_BTD.shape[-1]))
    return q.astype(self.btt.dtype), self.btt(x_BTD)

  @classmethod
  def width(cls, level: Level, d_model: int) -> int:
    return d_model

  @classmethod
  def num_params(cls, level: Level, d_model: int, num_heads: int) -> int:
    a, b = btt_factors(d_model)
    return num_heads * level.rank * d_model * (a + b)
