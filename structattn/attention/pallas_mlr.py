"""Fused MLR attention in Pallas (Triton backend): flash attention over nested block levels.

Usage:

  from structattn.attention import Pattern
  from structattn.attention.kernel_config import KernelConfig
  from structattn.attention.pallas_mlr import mlr_attention_pallas
  pat = Pattern(("global", "block", "block"), (0, 512, 8), (32, 16, 16), divide="block")
  out_BTHV = mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pat)                 # GPU (Triton)
  out_BTHV = mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pat, interpret=True)  # CPU check
  out_BTHV = mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pat, KernelConfig.for_pallas(64))

Same contract as `core.blocked_attention`: level scales already folded into q, K = sum of
level widths, the pair (i, j) scores S_ij = q_i[:P_λ] . k_j[:P_λ] / div(λ) with λ the
deepest level whose block holds both i and j and P the prefix widths; causal or not.
Differentiable (custom VJP: flash backward recomputing P from the saved log-sum-exp).

Tiling (`mlr_tiling`, shared with the Mosaic GPU kernel).  A level is *coarse* for a
kernel when its block size is a multiple of both tile sizes; coarse levels are levels
0..g.  For the row tile of a program (a query tile in the forward and dq kernels, a key
tile in the dk/dv kernel), the column tiles that share level l but not l+1 form
contiguous ranges, so the kernel runs one loop per coarse level, contracting over its
padded prefix width W_l (a power of two >= 16; the loop-invariant
operand is loaded with the columns past P_l zeroed, the divisor is static).  The
remaining "near" tiles - the fine (sub-tile) blocks touched by the row tile, and the
causal diagonal - are scored per pair: one product per level segment, selected by the
per-level block masks.  Gradients w.r.t. q and k accumulate in column bands [0, w0),
[w0, 2 w0), [2 w0, 4 w0), ... so a tile contributes only to the bands inside its prefix
(the band cut by P_l goes through a temporary masked once after the loop).  Memory is
O(T): the forward saves the output and the log-sum-exp.  Timings: docs/performance.md.

Inputs are zero-padded to power-of-two feature widths (>= 16); causal inputs are padded
in time to a multiple of the coarsest block and the tiles (future keys are never seen);
non-causal inputs need T divisible by the block sizes and by 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from structattn.attention import mlr_tiling as tiling
from structattn.attention.kernel_config import KernelConfig, KernelTiles
from structattn.attention.mlr_tiling import LOG2E, MIN_WIDTH, NEG, Levels, Plan
from structattn.attention.pattern import Pattern


# ------------------------------------------------------------------------ traced helpers


def _iota(n):
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _loop(lo, hi, tile: int, body, carry):
  return lax.fori_loop(tiling.idiv(lo, tile), tiling.idiv(hi, tile), body, carry)


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
  return tiling.idiv(qpos, size)[:, None] == tiling.idiv(kpos, size)[None, :]


def _dot(a, b):
  return plgpu.dot(a, b)


def _near_scores(plan: Plan, qpos, kpos, seg_dot):
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


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: Plan, nq: int):
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
  far, (n_lo, n_hi) = tiling.ranges(plan, q0, bq, bk, True)
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


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one kernel call: the padded levels, the (fitted) tiles and
  interpret mode.  Hashable: the kernels are jitted on it."""
  levels: Levels
  config: KernelConfig
  interpret: bool = False


# The kernels are jitted on their static config: the identical attention layers of a model
# share one lowering of each (a private function and calls), not one per layer.
@functools.partial(jax.jit, static_argnums=(3,))
def _forward(q, k, v, cfg: Static):
  """q, k: (B, T, H, Wk) padded; v: (B, T, H, Wv).  Returns o (B, T, H, Wv) and the base-2
  log-sum-exp (B, H, T)."""
  kt = cfg.config.fwd
  plan = Plan(cfg.levels, kt.block_q, kt.block_k)
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


def _near_grad(plan: Plan, qpos, kpos, qb, kb, grads, transpose: bool):
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


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: Plan,
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
  far, (n_lo, n_hi) = tiling.ranges(plan, q0, bq, bk, True)
  for lo, hi, l in far:
    _, accs = _far_grad_loop(lv, l, lo, hi, bk, q_ref, k_ref, grads, (), accs)
  accs = _loop(n_lo, n_hi, bk, near_body, accs)
  for (c0, wb), a in zip(bands, accs):
    dq_ref[:, pl.ds(c0, wb)] = a.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 plan: Plan):
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
  far, (n_lo, n_hi) = tiling.ranges(plan, k0, bk, bq, False)
  dv, dks = _loop(n_lo, n_hi, bq, near_body, (dv, dks))
  for lo, hi, l in far:  # rows = keys: scores are computed transposed, (k, q)
    dv, dks = _far_grad_loop(lv, l, lo, hi, bq, k_ref, q_ref, grads_t, dv, dks)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for (c0, wb), a in zip(bands, dks):
    dk_ref[:, pl.ds(c0, wb)] = a.astype(dk_ref.dtype)


def _backward(cfg: Static, res, do):
  """Custom-VJP backward: delta = rowsum(dO * O), then the dq and dk/dv kernels."""
  q, k, v, o, lse = res
  return _backward_kernels(q, k, v, o, lse, do, cfg)


@functools.partial(jax.jit, static_argnums=(6,))
def _backward_kernels(q, k, v, o, lse, do, cfg: Static):
  b, t, h, wk = q.shape
  wv = v.shape[-1]
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(v.dtype)
  kt = cfg.config.dq
  nq = t // kt.block_q
  qi = (lambda i: nq - 1 - i) if cfg.levels.causal else (lambda i: i)
  full = lambda w: pl.BlockSpec((None, t, None, w), lambda i, j, n: (j, 0, n, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=Plan(cfg.levels, kt.block_q, kt.block_k), nq=nq),
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
  kt = cfg.config.dkdv
  vec = pl.BlockSpec((None, None, t), lambda i, j, n: (j, n, 0))
  blk = lambda w: pl.BlockSpec((None, kt.block_k, None, w), lambda i, j, n: (j, i, n, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=Plan(cfg.levels, kt.block_q, kt.block_k)),
      grid=(t // kt.block_k, b, h),
      in_specs=[full(wk), blk(wk), blk(wv), full(wv), vec, vec],
      out_specs=[blk(wk), blk(wv)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(kt), interpret=cfg.interpret, name="mlr_dkdv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlr(q, k, v, cfg: Static):
  return _forward(q, k, v, cfg)[0]


def _mlr_fwd(q, k, v, cfg: Static):
  o, lse = _forward(q, k, v, cfg)
  return o, (q, k, v, o, lse)


_mlr.defvjp(_mlr_fwd, _backward)


# ------------------------------------------------------------------------------- wrapper

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def mlr_attention_pallas(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern,
                         config: KernelConfig | None = None, *, interpret: bool = False,
                         block_q: int | None = None, block_k: int | None = None):
  """Fused nested-block (MLR) attention; same result as `core.blocked_attention`.

  q_BTHK, k_BTHK: level-scaled features (K = sum(pattern.widths)); v_BTHV values.
  config: the tiles of the three kernels with Triton warps and stages (default
  `KernelConfig.for_pallas` at the padded width); block_q / block_k override every
  kernel's tiles (powers of two >= 16).  interpret=True runs the kernels in the Pallas
  interpreter (CPU).  float32/bfloat16/float16 inputs, float32 accumulation; the output
  has v's dtype.
  """
  b, t, h, k = q_BTHK.shape
  dv = v_BTHV.shape[-1]
  dtype = jnp.result_type(q_BTHK, k_BTHK, v_BTHV)
  if dtype not in DTYPES:
    raise ValueError(f"mlr_attention_pallas needs float32/bfloat16/float16 inputs, got {dtype}")
  width = max(tiling.pow2(k), tiling.pow2(dv))
  config = (config or KernelConfig.for_pallas(width)).with_blocks(block_q, block_k)
  tile = config.max_tile
  tile = min(tile, max(MIN_WIDTH, tiling.pow2(t))) if pattern.causal else MIN_WIDTH
  tp, levels = tiling.levels_and_length(pattern, t, k, dv, tile, "mlr_attention_pallas")
  pad = lambda x, w: jnp.pad(x.astype(dtype), [(0, 0), (0, tp - t), (0, 0), (0, w - x.shape[-1])])
  q, kk, v = pad(q_BTHK, levels.wk), pad(k_BTHK, levels.wk), pad(v_BTHV, levels.wv)
  out = _mlr(q, kk, v, Static(levels, config.fit(tp), bool(interpret)))
  return out[:, :t, :, :dv]
