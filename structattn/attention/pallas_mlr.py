"""Fused MLR attention in Pallas (Triton backend): flash attention over nested block levels.

Usage:

  from structattn.attention import core
  from structattn.attention.pallas_mlr import mlr_attention_pallas
  pat = core.Pattern(("global", "block", "block"), (0, 512, 8), (32, 16, 16), divide="block")
  out_BTHV = mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pat)                 # GPU (Triton)
  out_BTHV = mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pat, interpret=True)  # CPU check

Same contract as `core.blocked_attention`: level scales already folded into q, K = sum of
level widths, the pair (i, j) scores S_ij = q_i[:P_λ] . k_j[:P_λ] / div(λ) with λ the
deepest level whose block holds both i and j and P the prefix widths; causal or not.
Differentiable (custom VJP: flash backward recomputing P from the saved log-sum-exp).

Tiling.  A level is *coarse* for a kernel when its block size is a multiple of both tile
sizes; coarse levels are levels 0..g.  For the row tile of a program (a query tile in
the forward and dq kernels, a key tile in the dk/dv kernel), the column tiles that share
level l but not l+1 form contiguous ranges, so the kernel runs one loop per coarse level,
contracting over its padded prefix width W_l (a power of two >= 16; the loop-invariant
operand is loaded with the columns past P_l zeroed, the divisor is static).  The
remaining "near" tiles - the fine (sub-tile) blocks touched by the row tile, and the
causal diagonal - are scored per pair: one product per level segment, selected by the
per-level block masks.  Gradients w.r.t. q and k accumulate in column bands [0, w0),
[w0, 2 w0), [2 w0, 4 w0), ... so a tile contributes only to the bands inside its prefix
(the band cut by P_l goes through a temporary masked once after the loop).  Memory is
O(T): the forward saves the output and the log-sum-exp.  H100 results: docs/performance.md.

Inputs are zero-padded to power-of-two feature widths (>= 16); causal inputs are padded
in time to a multiple of the coarsest block and the tiles (future keys are never seen);
non-causal inputs need T divisible by the block sizes and by 16.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from structattn.attention.core import Pattern

LOG2E = math.log2(math.e)
NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(NEG - m) == 0, no NaN
MIN_WIDTH = 16  # Triton dot operands need every dimension >= 16


@dataclasses.dataclass(frozen=True)
class KernelTiles:
  """Tile sizes (rows of q, rows of k per step) and Triton launch parameters of one kernel."""
  block_q: int
  block_k: int
  num_warps: int | None = None
  num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiles of the forward, dq and dk/dv kernels."""
  fwd: KernelTiles
  dq: KernelTiles
  dkdv: KernelTiles

  @staticmethod
  def default(width: int) -> "Tiles":
    """Tiles for H100 at a padded q/k/v width, the best of a small search at T=4096
    (benchmarks/attention.py --pallas), checked for register spills with ptxas (Triton 3.6)."""
    if width <= 64:
      return Tiles(KernelTiles(128, 64, 4, 3), KernelTiles(128, 64, 8, 3),
                   KernelTiles(64, 64, 8, 3))
    return Tiles(KernelTiles(64, 64, 4, 3), KernelTiles(128, 32, 8, 2), KernelTiles(64, 64, 8, 2))

  def with_blocks(self, block_q: int | None, block_k: int | None) -> "Tiles":
    """Override the q/k tile sizes of every kernel."""
    if block_q is None and block_k is None:
      return self
    f = lambda kt: dataclasses.replace(kt, block_q=block_q or kt.block_q,
                                       block_k=block_k or kt.block_k)
    return Tiles(f(self.fwd), f(self.dq), f(self.dkdv))


def _pow2(n: int) -> int:
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
    """Padded contraction width of level l's prefix (power of two, >= 16)."""
    return min(self.wk, max(MIN_WIDTH, _pow2(self.prefix[l])))

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
class _Plan:
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


# ------------------------------------------------------------------------ traced helpers


def _iota(n):
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _idiv(x, n: int):
  """Integer division of a non-negative int32 scalar/array by a static n."""
  return lax.div(x.astype(jnp.int32), jnp.int32(n))


def _floor(x, n: int):
  return x if n == 1 else _idiv(x, n) * n


def _ceil(x, n: int):
  return x if n == 1 else _idiv(x + (n - 1), n) * n


def _ranges(plan: _Plan, r0, rsize: int, csize: int, rows_are_queries: bool):
  """Column ranges seen by the row tile [r0, r0+rsize): far ranges (lo, hi, l) where every
  pair's deepest shared level is the coarse level l, and the near range (lo, hi); all
  multiples of the column tile."""
  lv, g = plan.lv, plan.g
  a = [_floor(r0, lv.sizes[l]) for l in range(g + 1)]  # start of the row tile's block
  r = [a[l] + lv.sizes[l] for l in range(g + 1)]  # its end
  if g == lv.n - 1 and not lv.causal:
    near = (a[g], a[g])  # nothing finer than a tile and no diagonal: all far
  else:
    f = lv.sizes[g + 1] if g + 1 < lv.n else 1
    lo = _floor(_floor(r0, f), csize)
    hi = _ceil(_ceil(r0 + rsize, f), csize)
    if lv.causal and rows_are_queries:
      hi = _ceil(r0 + rsize, csize)  # keys after the tile are masked anyway
    elif lv.causal:
      lo = _floor(r0, csize)  # queries before the key tile see none of it
    near = (lo, hi)
  far = []
  if rows_are_queries or not lv.causal:  # columns before the row tile
    far += [(a[l], a[l + 1] if l < g else near[0], l) for l in range(g + 1)]
  if not rows_are_queries or not lv.causal:  # columns after it
    far += [(r[l + 1] if l < g else near[1], r[l], l) for l in reversed(range(g + 1))]
  return far, near


def _loop(lo, hi, tile: int, body, carry):
  return lax.fori_loop(_idiv(lo, tile), _idiv(hi, tile), body, carry)


def _level_bands(lv: Levels, l: int):
  """Gradient bands touched by level l's prefix [0, P_l): the fully covered ones and the
  one cut by P_l (or None)."""
  p = lv.prefix[l]
  full = [n for n, (c0, wb) in enumerate(lv.bands) if c0 + wb <= p]
  cut = [n for n, (c0, wb) in enumerate(lv.bands) if c0 < p < c0 + wb]
  return full, (cut[0] if cut else None)


def _mask_cols(x, c0: int, lo: int, hi, hi_min: int | None = None):
  """Zero the columns of x (global columns c0..c0+w) outside [lo, hi).  hi may be traced,
  with hi_min a static lower bound that lets fully covered tiles skip the select."""
  w = x.shape[-1]
  hi_s = hi if isinstance(hi, int) else hi_min
  need_hi = hi_s is None or hi_s < c0 + w
  need_lo = lo > c0
  if not (need_hi or need_lo):
    return x
  col = c0 + _iota(w)
  keep = (col < hi) if need_hi else None
  if need_lo:
    keep = (col >= lo) if keep is None else keep & (col >= lo)
  return jnp.where(keep[None, :], x, jnp.zeros((), x.dtype))


def _load_cols(ref, rows, c0: int, wb: int, hi: int):
  """ref[rows, c0:c0+wb] with the columns >= hi read as zeros (masked load: the tile can go
  straight to shared memory as a dot operand)."""
  if hi >= c0 + wb:
    return ref[rows, pl.ds(c0, wb)]
  keep = (c0 + _iota(wb) < hi)[None, :]
  return plgpu.load(ref.at[rows, pl.ds(c0, wb)], mask=keep, other=0.0)


def _same(qpos, kpos, size: int):
  return _idiv(qpos, size)[:, None] == _idiv(kpos, size)[None, :]


def _dot(a, b):
  return plgpu.dot(a, b)


def _near_scores(plan: _Plan, qpos, kpos, seg_dot):
  """Scores of a near tile (log2 domain) and the per-pair 1/divisor: the prefix product of
  each pair's deepest level, NEG where invalid.  seg_dot(i) = product over segment i."""
  lv = plan.lv
  bq, bk = qpos.shape[0], kpos.shape[0]
  s = jnp.full((bq, bk), NEG, jnp.float32)
  mult = jnp.zeros((bq, bk), jnp.float32)
  part = None
  sames = []
  for i, (l, _, _) in enumerate(plan.segments):
    d = seg_dot(i)
    part = d if part is None else part + d
    if l == plan.g:  # every near pair shares the coarse levels
      s = part * (lv.mult(l) * LOG2E)
      mult = jnp.full((bq, bk), lv.mult(l), jnp.float32)
      sames.append(None)
    else:
      same = _same(qpos, kpos, lv.sizes[l])
      s = jnp.where(same, part * (lv.mult(l) * LOG2E), s)
      mult = jnp.where(same, lv.mult(l), mult)
      sames.append(same)
  if lv.causal:
    s = jnp.where(qpos[:, None] >= kpos[None, :], s, NEG)
  return s, mult, sames


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: _Plan, nq: int):
  lv, bq, bk = plan.lv, plan.bq, plan.bk
  pid = pl.program_id(0)
  q0 = ((nq - 1 - pid) if lv.causal else pid) * bq  # causal: longest rows first
  qpos = q0 + _iota(bq)
  qw = {w: q_ref[:, pl.ds(0, w)] for w in {lv.width(l) for l, _, _ in plan.segments}}

  def step(s, k0, carry):
    o, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[pl.ds(k0, bk), :]
    o = o * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return o, m_new, l * alpha + jnp.sum(p, axis=1)

  def far_body(l):
    w, scale = lv.width(l), lv.mult(l) * LOG2E
    ql = _load_cols(q_ref, slice(None), 0, w, lv.prefix[l])  # loop-invariant prefix

    def body(j, carry):
      k0 = j * bk
      s = _dot(ql, k_ref[pl.ds(k0, bk), pl.ds(0, w)].T) * scale
      return step(s, k0, carry)
    return body

  def near_body(j, carry):
    k0 = j * bk
    kpos = k0 + _iota(bk)
    kw = {}

    def seg_dot(i):
      l, c_lo, c_hi = plan.segments[i]
      w = lv.width(l)
      if w not in kw:
        kw[w] = k_ref[pl.ds(k0, bk), pl.ds(0, w)]
      return _dot(qw[w], _mask_cols(kw[w], 0, c_lo, c_hi).T)

    s, _, _ = _near_scores(plan, qpos, kpos, seg_dot)
    return step(s, k0, carry)

  carry = (jnp.zeros((bq, lv.wv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  far, (n_lo, n_hi) = _ranges(plan, q0, bq, bk, True)
  n_left = len(far) if lv.causal else plan.g + 1
  for lo, hi, l in far[:n_left]:
    carry = _loop(lo, hi, bk, far_body(l), carry)
  carry = _loop(n_lo, n_hi, bk, near_body, carry)
  for lo, hi, l in far[n_left:]:
    carry = _loop(lo, hi, bk, far_body(l), carry)
  o, m, l = carry
  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # base 2


def _params(kt: KernelTiles):
  return plgpu.CompilerParams(num_warps=kt.num_warps or 4, num_stages=kt.num_stages or 2)


def _forward(q, k, v, cfg: "_Config"):
  kt = cfg.tiles.fwd
  plan = _Plan(cfg.levels, kt.block_q, kt.block_k)
  b, t, h, wk = q.shape
  wv = v.shape[-1]
  nq = t // kt.block_q
  qi = (lambda i: nq - 1 - i) if cfg.levels.causal else (lambda i: i)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, nq=nq),
      grid=(nq, b, h),
      in_specs=[pl.BlockSpec((None, kt.block_q, None, wk), lambda i, j, n: (j, qi(i), n, 0)),
                pl.BlockSpec((None, t, None, wk), lambda i, j, n: (j, 0, n, 0)),
                pl.BlockSpec((None, t, None, wv), lambda i, j, n: (j, 0, n, 0))],
      out_specs=[pl.BlockSpec((None, kt.block_q, None, wv), lambda i, j, n: (j, qi(i), n, 0)),
                 pl.BlockSpec((None, None, kt.block_q), lambda i, j, n: (j, n, qi(i)))],
      out_shape=[jax.ShapeDtypeStruct((b, t, h, wv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=_params(kt), interpret=cfg.interpret, name="mlr_fwd",
  )(q, k, v)


# ------------------------------------------------------------------------------ backward


def _far_grad_body(lv: Levels, l: int, rows_fixed, ref, tile: int, grads):
  """Loop body over the column tiles of a far range of level l (dq or dk kernel).

  rows_fixed: bands of the program's own rows (q for dq, k for dk/dv), loaded masked to
  the prefix P_l; ref: the other operand, loaded per tile; grads(s, c0, extra) -> (ds,
  extra).  Carry (extra, accs, cut): the band accumulators of the program's gradient and
  a temporary for the band cut by P_l (masked once, after the loop)."""
  full, cut = _level_bands(lv, l)
  scale, mult = lv.mult(l) * LOG2E, lv.mult(l)
  used = full + ([cut] if cut is not None else [])

  def body(j, carry):
    extra, accs, tmp = carry
    c0 = j * tile
    other = {n: ref[pl.ds(c0, tile), pl.ds(*lv.bands[n])] for n in used}
    s = None
    for n in used:
      d = _dot(rows_fixed[n], other[n].T)
      s = d if s is None else s + d
    ds, extra = grads(s * scale, c0, extra)
    ds = (ds * mult).astype(ref.dtype)
    accs = tuple(a + _dot(ds, other[n]) if n in full else a for n, a in enumerate(accs))
    if cut is not None:
      tmp = tmp + _dot(ds, other[cut])
    return extra, accs, tmp
  return body


def _far_grad_loop(lv: Levels, l: int, lo, hi, tile: int, rows_ref, ref, grads, extra, accs):
  """Run one far range of level l; add the cut band's masked temporary at the end."""
  full, cut = _level_bands(lv, l)
  p = lv.prefix[l]
  fixed = {n: _load_cols(rows_ref, slice(None), *lv.bands[n], p)
           for n in full + ([cut] if cut is not None else [])}
  tmp = jnp.zeros((accs[0].shape[0], lv.bands[cut][1]), jnp.float32) if cut is not None else ()
  body = _far_grad_body(lv, l, fixed, ref, tile, grads)
  extra, accs, tmp = _loop(lo, hi, tile, body, (extra, accs, tmp))
  if cut is not None:
    accs = list(accs)
    accs[cut] = accs[cut] + _mask_cols(tmp, lv.bands[cut][0], 0, p)
    accs = tuple(accs)
  return extra, accs


def _near_grad(plan: _Plan, qpos, kpos, qb, kb, grads, transpose: bool):
  """Near tile: scores per pair, then the gradient of the program's operand per band.

  qb, kb: all bands of the q and k tiles.  transpose=False: dq (rows = queries, the
  contribution is G . k); True: dk (G^T . q).  Returns (per-band contributions, extra)."""
  lv, bands = plan.lv, plan.lv.bands

  def seg_band(x, i, n):
    _, c_lo, c_hi = plan.segments[i]
    c0, wb = bands[n]
    if c_hi <= c0 or c_lo >= c0 + wb:
      return None
    return _mask_cols(x[n], c0, c_lo, c_hi)

  def seg_dot(i):
    s = None
    for n in range(len(bands)):
      kk = seg_band(kb, i, n)
      if kk is not None:
        d = _dot(qb[n], kk.T)
        s = d if s is None else s + d
    return s

  s, mult, sames = _near_scores(plan, qpos, kpos, seg_dot)
  ds, extra = grads(s)
  dsm = ds * mult
  other = qb if transpose else kb
  out = [None] * len(bands)
  for i, same in enumerate(sames):  # columns of segment i get the pairs with λ >= its level
    gi = (dsm if same is None else jnp.where(same, dsm, 0.0)).astype(other[0].dtype)
    if transpose:
      gi = gi.T
    for n in range(len(bands)):
      x = seg_band(other, i, n)
      if x is not None:
        d = _dot(gi, x)
        out[n] = d if out[n] is None else out[n] + d
  return out, extra


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: _Plan,
               nq: int):
  lv, bq, bk = plan.lv, plan.bq, plan.bk
  bands = lv.bands
  pid = pl.program_id(0)
  q0 = ((nq - 1 - pid) if lv.causal else pid) * bq
  qpos = q0 + _iota(bq)
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def grads(s, k0, extra):
    v = v_ref[pl.ds(k0, bk), :]
    p = jnp.exp2(s - lse[:, None])
    return p * (_dot(do, v.T) - delta[:, None]), extra

  def near_body(j, accs):
    k0 = j * bk
    kb = [k_ref[pl.ds(k0, bk), pl.ds(c0, wb)] for c0, wb in bands]
    qb = [q_ref[:, pl.ds(c0, wb)] for c0, wb in bands]
    out, _ = _near_grad(plan, qpos, k0 + _iota(bk), qb, kb, lambda s: grads(s, k0, ()), False)
    return tuple(a if d is None else a + d for a, d in zip(accs, out))

  accs = tuple(jnp.zeros((bq, wb), jnp.float32) for _, wb in bands)
  far, (n_lo, n_hi) = _ranges(plan, q0, bq, bk, True)
  for lo, hi, l in far:
    _, accs = _far_grad_loop(lv, l, lo, hi, bk, q_ref, k_ref, grads, (), accs)
  accs = _loop(n_lo, n_hi, bk, near_body, accs)
  for (c0, wb), a in zip(bands, accs):
    dq_ref[:, pl.ds(c0, wb)] = a.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 plan: _Plan):
  lv, bq, bk = plan.lv, plan.bq, plan.bk
  bands = lv.bands
  k0 = pl.program_id(0) * bk
  kpos = k0 + _iota(bk)
  v = v_ref[...]

  def grads_t(sT, q0, dv):
    """sT: (k, q) scores of the key tile against queries q0..q0+bq."""
    rows = pl.ds(q0, bq)
    pT = jnp.exp2(sT - lse_ref[rows][None, :])
    do = do_ref[rows, :]
    dv = dv + _dot(pT.astype(do.dtype), do)
    return pT * (_dot(v, do.T) - delta_ref[rows][None, :]), dv

  def grads(s, q0, dv):
    rows = pl.ds(q0, bq)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    do = do_ref[rows, :]
    dv = dv + _dot(p.astype(do.dtype).T, do)
    return p * (_dot(do, v.T) - delta_ref[rows][:, None]), dv

  def near_body(i, carry):
    dv, dks = carry
    q0 = i * bq
    qb = [q_ref[pl.ds(q0, bq), pl.ds(c0, wb)] for c0, wb in bands]
    kb = [k_ref[:, pl.ds(c0, wb)] for c0, wb in bands]
    out, dv = _near_grad(plan, q0 + _iota(bq), kpos, qb, kb, lambda s: grads(s, q0, dv), True)
    return dv, tuple(a if d is None else a + d for a, d in zip(dks, out))

  dv = jnp.zeros((bk, lv.wv), jnp.float32)
  dks = tuple(jnp.zeros((bk, wb), jnp.float32) for _, wb in bands)
  far, (n_lo, n_hi) = _ranges(plan, k0, bk, bq, False)
  dv, dks = _loop(n_lo, n_hi, bq, near_body, (dv, dks))
  for lo, hi, l in far:  # rows = keys: scores are computed transposed, (k, q)
    dv, dks = _far_grad_loop(lv, l, lo, hi, bq, k_ref, q_ref, grads_t, dv, dks)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for (c0, wb), a in zip(bands, dks):
    dk_ref[:, pl.ds(c0, wb)] = a.astype(dk_ref.dtype)


def _backward(cfg: "_Config", res, do):
  q, k, v, o, lse = res
  b, t, h, wk = q.shape
  wv = v.shape[-1]
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(v.dtype)
  kt = cfg.tiles.dq
  nq = t // kt.block_q
  qi = (lambda i: nq - 1 - i) if cfg.levels.causal else (lambda i: i)
  full = lambda w: pl.BlockSpec((None, t, None, w), lambda i, j, n: (j, 0, n, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=_Plan(cfg.levels, kt.block_q, kt.block_k), nq=nq),
      grid=(nq, b, h),
      in_specs=[pl.BlockSpec((None, kt.block_q, None, wk), lambda i, j, n: (j, qi(i), n, 0)),
                full(wk), full(wv),
                pl.BlockSpec((None, kt.block_q, None, wv), lambda i, j, n: (j, qi(i), n, 0)),
                pl.BlockSpec((None, None, kt.block_q), lambda i, j, n: (j, n, qi(i))),
                pl.BlockSpec((None, None, kt.block_q), lambda i, j, n: (j, n, qi(i)))],
      out_specs=pl.BlockSpec((None, kt.block_q, None, wk), lambda i, j, n: (j, qi(i), n, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(kt), interpret=cfg.interpret, name="mlr_dq",
  )(q, k, v, do, lse, delta)
  kt = cfg.tiles.dkdv
  vec = pl.BlockSpec((None, None, t), lambda i, j, n: (j, n, 0))
  blk = lambda w: pl.BlockSpec((None, kt.block_k, None, w), lambda i, j, n: (j, i, n, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=_Plan(cfg.levels, kt.block_q, kt.block_k)),
      grid=(t // kt.block_k, b, h),
      in_specs=[full(wk), blk(wk), blk(wv), full(wv), vec, vec],
      out_specs=[blk(wk), blk(wv)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(kt), interpret=cfg.interpret, name="mlr_dkdv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------ custom VJP


@dataclasses.dataclass(frozen=True)
class _Config:
  levels: Levels
  tiles: Tiles
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlr(q, k, v, cfg: _Config):
  return _forward(q, k, v, cfg)[0]


def _mlr_fwd(q, k, v, cfg: _Config):
  o, lse = _forward(q, k, v, cfg)
  return o, (q, k, v, o, lse)


_mlr.defvjp(_mlr_fwd, _backward)


# ------------------------------------------------------------------------------- wrapper


def _levels_and_length(pattern: Pattern, t: int, k: int, v: int, tile: int):
  """Validate the pattern; the padded length and the static Levels."""
  if any(s not in ("global", "block") for s in pattern.seqs):
    raise ValueError(f"mlr_attention_pallas serves global/block levels only, got {pattern.seqs}")
  if sum(pattern.widths) != k:
    raise ValueError(f"q/k width {k} != sum of level widths {pattern.widths}")
  blocks = [b for s, b in zip(pattern.seqs, pattern.sizes) if s == "block" and b < t]
  for a, c in zip(blocks, blocks[1:]):
    if a % c:
      raise ValueError(f"block sizes must nest (each a multiple of the next): {blocks}")
  if pattern.causal:  # pad the future: never attended
    m = math.lcm(blocks[0], tile) if blocks else tile
    tp = -(-t // m) * m
  else:
    if any(t % b for b in blocks) or t % tile:
      raise ValueError(f"non-causal mlr_attention_pallas needs T={t} divisible by the block "
                       f"sizes {blocks} and by {tile}")
    tp = t
  sizes = tuple(tp if (s == "global" or b >= t) else b for s, b in zip(pattern.seqs, pattern.sizes))
  wk, wv = max(MIN_WIDTH, _pow2(k)), max(MIN_WIDTH, _pow2(v))
  return tp, Levels(tp, sizes, pattern.prefix, pattern.causal, pattern.divide, wk, wv)


def _fit_tiles(tiles: Tiles, t: int) -> Tiles:
  """Shrink tiles to the largest power of two dividing the (padded) length."""
  low = t & -t
  f = lambda kt: dataclasses.replace(kt, block_q=min(kt.block_q, low),
                                     block_k=min(kt.block_k, low))
  return Tiles(f(tiles.fwd), f(tiles.dq), f(tiles.dkdv))


def mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern, *, interpret: bool = False,
                         block_q: int | None = None, block_k: int | None = None,
                         tiles: Tiles | None = None):
  """Fused nested-block (MLR) attention; same result as `core.blocked_attention`.

  q_BTHK, k_BTHK: level-scaled features (K = sum(pattern.widths)); v_BTHV values.
  block_q / block_k override every kernel's tiles (powers of two >= 16); `tiles` sets
  them per kernel (forward, dq, dk/dv) with Triton warps and stages.  interpret=True runs
  the kernels in the Pallas interpreter (CPU).  float32/bfloat16/float16 inputs,
  float32 accumulation; the output has v's dtype.
  """
  b, t, h, k = q_BTHK.shape
  dv = v_BTHV.shape[-1]
  dtype = jnp.result_type(q_BTHK, k_BTHK, v_BTHV)
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"mlr_attention_pallas needs float32/bfloat16/float16 inputs, got {dtype}")
  tiles = (tiles or Tiles.default(max(_pow2(k), _pow2(dv)))).with_blocks(block_q, block_k)
  for kt in (tiles.fwd, tiles.dq, tiles.dkdv):
    for n in (kt.block_q, kt.block_k):
      if n < MIN_WIDTH or n & (n - 1):
        raise ValueError(f"tile sizes must be powers of two >= {MIN_WIDTH}, got {kt}")
  tile = max(max(kt.block_q, kt.block_k) for kt in (tiles.fwd, tiles.dq, tiles.dkdv))
  tile = min(tile, max(MIN_WIDTH, _pow2(t))) if pattern.causal else MIN_WIDTH
  tp, levels = _levels_and_length(pattern, t, k, dv, tile)
  tiles = _fit_tiles(tiles, tp)
  pad = lambda x, w: jnp.pad(x.astype(dtype), [(0, 0), (0, tp - t), (0, 0), (0, w - x.shape[-1])])
  q, kk, v = pad(q_BTHK, levels.wk), pad(k_BTHK, levels.wk), pad(v_BTHV, levels.wv)
  out = _mlr(q, kk, v, _Config(levels, tiles, bool(interpret)))
  return out[:, :t, :, :dv]
