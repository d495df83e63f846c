"""Rotary position embeddings applied per level segment of the query/key features.

Each level's features are rotated on their own (pairs (2i, 2i+1) inside the segment, an odd
last dim left as is), so rotations never mix features of different levels and the nested
prefix structure of MLR scores is preserved: q_i[:d] . k_j[:d] still depends only on i - j.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _rotate(x_BTHW, pos_BT, base: float):
  w = x_BTHW.shape[-1]
  half = w // 2
  if half == 0:
    return x_BTHW
  dt = jnp.promote_types(x_BTHW.dtype, jnp.float32)
  inv = jnp.asarray(base ** (-np.arange(half) * 2.0 / (2 * half)), dt)
  ang = pos_BT.astype(dt)[..., None] * inv  # (B, T, half)
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x = x_BTHW.astype(dt)
  pairs = x[..., :2 * half].reshape(*x.shape[:-1], half, 2)
  a, b = pairs[..., 0], pairs[..., 1]
  rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(*x.shape[:-1], 2 * half)
  out = jnp.concatenate([rot, x[..., 2 * half:]], axis=-1) if w % 2 else rot
  return out.astype(x_BTHW.dtype)


def apply_rope(x_BTHK, pos_BT, widths: tuple[int, ...], base: float = 10000.0):
  """Rotate each level segment of x (widths sum to K) by absolute positions pos (B, T)."""
  edges = np.cumsum((0,) + tuple(widths))
  parts = [_rotate(x_BTHK[..., a:e], pos_BT, base) for a, e in zip(edges[:-1], edges[1:])]
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
