"""The tiling plan of nested block levels that both fused MLR kernels share.

A kernel program owns a *row tile* (query rows in the forward and dq kernels, key rows in
the dk/dv kernel) and walks the *column tiles* of the other side.  A level is *coarse* for
a plan when its block size is a multiple of both tile sizes; coarse levels are 0..g.
For a row tile, the column tiles that share level l but not l+1 form contiguous *far*
ranges, one per coarse level, where every pair has deepest shared level l: the kernels
contract them over the prefix width P_l only, with a static divisor.  The remaining
*near* range (the fine, sub-tile blocks touched by the row tile and the causal diagonal)
is scored per pair: one product per feature *segment* ([0, P_g), then each finer level),
selected by per-level block masks.

`levels_and_length` validates a `Pattern` for the kernels and pads it to a static `Levels`;
`Plan` fixes the tile sizes; `ranges` gives a row tile's far and near column ranges.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from structattn.attention.pattern import Pattern

LOG2E = math.log2(math.e)
NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(NEG - m) == 0, no NaN
MIN_WIDTH = 16  # every dot operand dimension is >= 16 (Triton; wgmma K granularity)


def pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Levels:
  """Static nested-level description at the padded length t (global levels have size t)."""
  t: int
  sizes: tuple[int, ...]
  prefix: tuple[int, ...]  # P_l, cumulative feature widths
  causal: bool
  divide: str
  wk: int  # padded q/k width
  wv: int  # padded v width

  @property
  def n(self) -> int:
    return len(self.sizes)

  def width(self, l: int) -> int:
    """Padded contraction width of level l's prefix (power of two, >= MIN_WIDTH)."""
    return min(self.wk, max(MIN_WIDTH, pow2(self.prefix[l])))

  def mult(self, l: int) -> float:
    """1 / divisor of a pair whose deepest shared level is l (Pattern.level_divisor)."""
    if self.divide == "block":
      return 1.0 / (l + 1)
    if self.divide == "levels":
      return 1.0 / self.n
    return 1.0

  @property
  def bands(self) -> tuple[tuple[int, int], ...]:
    """Column bands (start, width) [0,w0), [w0,2w0), [2w0,4w0), ... covering [0, wk)."""
    w0 = self.width(0)
    out, c = [(0, w0)], w0
    while c < self.wk:
      out.append((c, c))
      c *= 2
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Plan:
  """One kernel's tiling of the levels: query tiles of bq rows, key tiles of bk rows."""
  lv: Levels
  bq: int
  bk: int

  @property
  def g(self) -> int:
    """Deepest coarse level (block size a multiple of both tiles); -1 if none."""
    ok = [l for l, b in enumerate(self.lv.sizes) if b % self.bq == 0 and b % self.bk == 0]
    return max(ok, default=-1)

  @property
  def segments(self) -> tuple[tuple[int, int, int], ...]:
    """Near-tile feature segments (level, first col, end col): [0, P_g) then each fine level."""
    lv, g = self.lv, self.g
    out = [(g, 0, lv.prefix[g])] if g >= 0 else []
    for l in range(g + 1, lv.n):
      out.append((l, lv.prefix[l - 1] if l else 0, lv.prefix[l]))
    return tuple(out)


# --------------------------------------------------------------- traced index arithmetic


def idiv(x, n: int):
  """Integer division of a non-negative int32 scalar/array by a static n."""
  return lax.div(jnp.asarray(x).astype(jnp.int32), jnp.int32(n))


def floor_to(x, n: int):
  """x rounded down to a multiple of the static n."""
  return x if n == 1 else idiv(x, n) * n


def ceil_to(x, n: int):
  """x rounded up to a multiple of the static n."""
  return x if n == 1 else idiv(x + (n - 1), n) * n


def ranges(plan: Plan, r0, rsize: int, csize: int, rows_are_queries: bool):
  """Column ranges seen by the row tile [r0, r0+rsize): far ranges (lo, hi, l) where every
  pair's deepest shared level is the coarse level l, and the near range (lo, hi); all
  multiples of the column tile.  Far ranges before the row tile come first (coarse to
  fine), then those after it (fine to coarse)."""
  lv, g = plan.lv, plan.g
  a = [floor_to(r0, lv.sizes[l]) for l in range(g + 1)]  # start of the row tile's block
  r = [a[l] + lv.sizes[l] for l in range(g + 1)]  # its end
  if g == lv.n - 1 and not lv.causal:
    near = (a[g], a[g])  # nothing finer than a tile and no diagonal: all far
  else:
    f = lv.sizes[g + 1] if g + 1 < lv.n else 1
    lo = floor_to(floor_to(r0, f), csize)
    hi = ceil_to(ceil_to(r0 + rsize, f), csize)
    if lv.causal and rows_are_queries:
      hi = ceil_to(r0 + rsize, csize)  # keys after the tile are masked anyway
    elif lv.causal:
      lo = floor_to(r0, csize)  # queries before the key tile see none of it
    near = (lo, hi)
  far = []
  if rows_are_queries or not lv.causal:  # columns before the row tile
    far += [(a[l], a[l + 1] if l < g else near[0], l) for l in range(g + 1)]
  if not rows_are_queries or not lv.causal:  # columns after it
    far += [(r[l + 1] if l < g else near[1], r[l], l) for l in reversed(range(g + 1))]
  return far, near


# ----------------------------------------------------------------------------- validation


def levels_and_length(pattern: Pattern, t: int, k: int, v: int, tile: int,
                      kernel: str = "the fused MLR kernel") -> tuple[int, Levels]:
  """Validate `pattern` for a fused kernel; the padded length and the static Levels.

  t: sequence length; k, v: q/k and v widths; tile: the length must be a multiple of it
  (causal inputs are padded in time to a multiple of it and of the coarsest block: future
  keys are never attended; non-causal inputs must already divide).  The padded widths are
  powers of two >= MIN_WIDTH (a kernel may widen them further)."""
  if any(s not in ("global", "block") for s in pattern.seqs):
    raise ValueError(f"{kernel} serves global/block levels only, got {pattern.seqs}")
  if sum(pattern.widths) != k:
    raise ValueError(f"q/k width {k} != sum of level widths {pattern.widths}")
  blocks = [b for s, b in zip(pattern.seqs, pattern.sizes) if s == "block" and b < t]
  for a, c in zip(blocks, blocks[1:]):
    if a % c:
      raise ValueError(f"block sizes must nest (each a multiple of the next): {blocks}")
  if pattern.causal:
    m = math.lcm(blocks[0], tile) if blocks else tile
    tp = -(-t // m) * m
  else:
    if any(t % b for b in blocks) or t % tile:
      raise ValueError(f"non-causal {kernel} needs T={t} divisible by the block sizes "
                       f"{blocks} and by {tile}")
    tp = t
  sizes = tuple(tp if (s == "global" or b >= t) else b for s, b in zip(pattern.seqs, pattern.sizes))
  wk, wv = max(MIN_WIDTH, pow2(k)), max(MIN_WIDTH, pow2(v))
  return tp, Levels(tp, sizes, pattern.prefix, pattern.causal, pattern.divide, wk, wv)
