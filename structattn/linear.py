"""Structured linear maps as Flax NNX modules: dense, low rank, block diagonal, BTT.

Every map reports
  * `num_params()`: its parameter count,
  * `macs_per_token()`: forward multiply-adds for one input vector,
  * `fan_in()`: the fan-in of each parameter, the quantity muP scales the init and the
    Adam learning rate by (init N(0, 1/fan_in), lr * base_width / fan_in).
Each parameter also carries its fan-in as Variable metadata (`param.fan_in`) so the
optimiser can build per-parameter learning rates from the state alone.

Every map takes x of shape (..., I), any leading axes, and returns (..., O); BTT returns
one such output per head, (..., heads, O).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from structattn.factors import btt_factors
from structattn.sharding import param


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, zero: bool) -> jax.Array:
  if zero:
    return jnp.zeros(shape, jnp.float32)
  return jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)


def _param(value: jax.Array, fan_in: int, axes=None) -> nnx.Param:
  """A parameter with its fan-in and (optionally) logical axis names (`structattn.sharding`)."""
  return param(value, axes, fan_in=fan_in)


def rms_cap(w: jax.Array, d_in: int, d_out: int) -> jax.Array:
  """W / max(1, RMS(W) / kappa), kappa = sqrt(min(d_in, d_out)) / d_in (spectral-init scale)."""
  kappa = math.sqrt(min(d_in, d_out)) / d_in
  rms = jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.promote_types(w.dtype, jnp.float32)))))
  return w / jnp.maximum(1.0, rms / kappa).astype(w.dtype)


class Dense(nnx.Module):
  """y = x W, W of shape (d_in, d_out).  `axes`: logical names of W's two axes (sharding)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, zero_init: bool = False,
               dtype=jnp.float32, axes: tuple[str | None, str | None] | None = None):
    self.d_in, self.d_out, self.dtype = d_in, d_out, dtype
    self.kernel = _param(_normal(rngs, (d_in, d_out), d_in, zero_init), d_in, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))

  def num_params(self) -> int:
    return self.d_in * self.d_out

  def macs_per_token(self) -> int:
    return self.d_in * self.d_out

  def fan_in(self) -> dict[str, int]:
    return {"kernel": self.d_in}

  def dense_matrix(self) -> jax.Array:
    return self.kernel[...]


class LowRank(nnx.Module):
  """y = x U V with U (d_in, rank), V (rank, d_out)."""

  def __init__(self, d_in: int, d_out: int, rank: int, *, rngs: nnx.Rngs, zero_init: bool = False,
               dtype=jnp.float32):
    if rank <= 0:
      raise ValueError(f"LowRank rank={rank} must be a positive integer")
    self.d_in, self.d_out, self.rank, self.dtype = d_in, d_out, rank, dtype
    self.u = _param(_normal(rngs, (d_in, rank), d_in, False), d_in)
    self.v = _param(_normal(rngs, (rank, d_out), rank, zero_init), rank)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.einsum("...i,ir->...r", x.astype(self.dtype), self.u[...].astype(self.dtype))
    return jnp.einsum("...r,ro->...o", h, self.v[...].astype(self.dtype))

  def num_params(self) -> int:
    return self.rank * (self.d_in + self.d_out)

  def macs_per_token(self) -> int:
    return self.num_params()

  def fan_in(self) -> dict[str, int]:
    return {"u": self.d_in, "v": self.rank}

  def dense_matrix(self) -> jax.Array:
    return self.u[...] @ self.v[...]


class BlockDiagonal(nnx.Module):
  """Block-diagonal map: the input splits into `blocks` contiguous groups of d_in/blocks
  features; group g maps through its own (d_in/blocks, d_out/blocks) matrix; outputs are
  concatenated in group order.  Kernel shape (blocks, d_in/blocks, d_out/blocks)."""

  def __init__(self, d_in: int, d_out: int, blocks: int, *, rngs: nnx.Rngs,
               zero_init: bool = False, dtype=jnp.float32):
    if blocks <= 0 or d_in % blocks or d_out % blocks:
      raise ValueError(f"BlockDiagonal blocks={blocks} must divide d_in={d_in} and d_out={d_out}")
    self.d_in, self.d_out, self.blocks, self.dtype = d_in, d_out, blocks, dtype
    m, n = d_in // blocks, d_out // blocks
    self.kernel = _param(_normal(rngs, (blocks, m, n), m, zero_init), m)

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.blocks
    x_blocks = x.reshape(*x.shape[:-1], p, self.d_in // p).astype(self.dtype)  # (..., P, I/P)
    y_blocks = jnp.einsum("...pm,pmn->...pn", x_blocks, self.kernel[...].astype(self.dtype))
    return y_blocks.reshape(*x.shape[:-1], self.d_out)

  def num_params(self) -> int:
    return self.d_in * self.d_out // self.blocks

  def macs_per_token(self) -> int:
    return self.num_params()

  def fan_in(self) -> dict[str, int]:
    return {"kernel": self.d_in // self.blocks}

  def dense_matrix(self) -> jax.Array:
    return jax.scipy.linalg.block_diag(*self.kernel[...])


class BTT(nnx.Module):
  """Block Tensor-Train map with `heads` independent output matrices.

  d_in = c*d and d_out = a*b (default: `btt_factors`, c=a, d=b for square maps).  Cores:
    core1 (c, d, heads*b*s): for each of the c input groups, map its d features to b*s,
    core2 (heads*b, a, c*s): for each head and output group b, map the c*s intermediates to a.
  The output has shape (..., heads, d_out), head h's feature index = b_idx * a + a_idx.
  With rank s=1 this is a Monarch-style matrix, full rank for generic cores.  Params and
  MACs per token: heads * s * (c*d*b + b*a*c) = heads*s*D*(a+b) for a square map.
  `rms_cap=True` rescales each core in the forward pass to RMS <= its spectral-init scale.
  """

  def __init__(self, d_in: int, d_out: int | None = None, rank: int = 1, heads: int = 1, *,
               rngs: nnx.Rngs, rms_cap: bool = True, dtype=jnp.float32):
    d_out = d_in if d_out is None else d_out
    if rank <= 0:
      raise ValueError(f"BTT rank={rank} must be a positive integer")
    a, b = btt_factors(d_out)
    c, d = btt_factors(d_in)
    self.d_in, self.d_out, self.rank, self.heads, self.dtype = d_in, d_out, rank, heads, dtype
    self.factors = (a, b, c, d)
    self.cap = rms_cap
    s = rank
    self.core1 = _param(_normal(rngs, (c, d, heads * b * s), d, False), d)
    self.core2 = _param(_normal(rngs, (heads * b, a, c * s), c * s, False), c * s)

  def cores(self) -> tuple[jax.Array, jax.Array]:
    a, b, c, d = self.factors
    w1, w2 = self.core1[...], self.core2[...]
    if self.cap:
      w1 = rms_cap(w1, d, b * self.rank)
      w2 = rms_cap(w2, c * self.rank, a)
    return w1, w2

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b, c, d = self.factors
    s, h = self.rank, self.heads
    lead = x.shape[:-1]
    w1, w2 = self.cores()
    # Shapes in the factors of the class docstring (h heads, s the rank).
    x_groups = x.reshape(*lead, c, d).astype(self.dtype)  # (..., c, d)
    y1 = jnp.einsum("...cd,cdk->...ck", x_groups, w1.astype(self.dtype))  # (..., c, h*b*s)
    y1 = jnp.moveaxis(y1.reshape(*lead, c, h, b, s), -4, -2)  # (..., h, b, c, s)
    y1 = y1.reshape(*lead, h * b, c * s)
    y2 = jnp.einsum("...gk,gak->...ga", y1, w2.astype(self.dtype))  # (..., h*b, a)
    return y2.reshape(*lead, h, b * a)

  def num_params(self) -> int:
    a, b, c, d = self.factors
    return self.heads * self.rank * (c * d * b + b * a * c)

  def macs_per_token(self) -> int:
    return self.num_params()

  def fan_in(self) -> dict[str, int]:
    a, b, c, d = self.factors
    return {"core1": d, "core2": c * self.rank}

  def dense_matrix(self) -> jax.Array:
    """The explicit (heads, d_in, d_out) matrices: y_h = x M_h."""
    eye = jnp.eye(self.d_in, dtype=jnp.float32)
    return jnp.moveaxis(self(eye), 0, 1)  # (d_in, heads, d_out) -> (heads, d_in, d_out)
