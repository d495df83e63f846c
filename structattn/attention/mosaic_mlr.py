"""Fused MLR attention in Pallas Mosaic GPU (FA3-style, warp specialised), forward and backward.

Usage (same contract as `pallas_mlr.mlr_attention_pallas`):

  from structattn.attention.kernel_config import KernelConfig
  from structattn.attention.mosaic_mlr import mlr_attention_mosaic
  out_BTHV = mlr_attention_mosaic(q_BTHK, k_BTHK, v_BTHV, pat)                 # H100
  out_BTHV = mlr_attention_mosaic(q_BTHK, k_BTHK, v_BTHV, pat, interpret=True)  # CPU check
  out_BTHV = mlr_attention_mosaic(q_BTHK, k_BTHK, v_BTHV, pat,
                                  KernelConfig.for_mosaic(block_k=128))

Forward: adapted from JAX's `pallas/ops/gpu/attention_mgpu.py` (FlashAttention 3).  A CTA
holds 2 compute warpgroups of 64 query rows each plus one memory warpgroup streaming
key/value tiles of `block_k` rows through a TMA pipeline of `slots` slots.  Each compute
warpgroup walks its key tiles in order, split into static loops (`mlr_tiling.ranges`): a
*far* loop per coarse level l (every pair of the tile pair has deepest shared level l)
contracts q and k over the first ceil(P_l / chunk) chunks of `chunk` columns only (q's
chunk cut by P_l is masked in registers); the *near* loop (the tile pairs touched by
sub-tile levels and the causal diagonal) computes one product per level segment and
combines them with per-element block masks.  Causal tiles after the diagonal are skipped.
Online softmax in base 2, fp32 accumulation, bf16/fp16 operands (float32 inputs are
rounded to bf16).  Level scales are folded into q by the caller; the per-level divisor
(divide='block'/'levels') is a static per-loop scale.

Backward: two Mosaic GPU kernels adapted from the same file, after delta = rowsum(dO * O)
in XLA.  dq: a CTA holds 2 x 64 query rows (q, dO, lse, delta resident), the memory
warpgroup streams 64-row key/value tiles; per tile pair it recomputes S over the level's
prefix chunks (as the forward), P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta) and
adds (dS / div) K to the dq chunks inside P_l (the chunk cut by P_l accumulates in a
temporary masked after the loop).  dk/dv: a CTA holds 2 x 64 key rows (k, v resident),
q / dO / lse / delta tiles are streamed; S^T, P^T, dV += P^T dO, dP^T = V dO^T,
dK += (dS^T / div) Q, with the same level ranges (rows = keys:
`mlr_tiling.ranges(..., rows_are_queries=False)`).  Near tiles compute one product per
level segment; segment [P_{l-1}, P_l) of the gradient gets only the pairs whose deepest
shared level is >= l, each with its own divisor (the maths of the Triton backward).

Layout: q and k stay (B, T, H, W) in memory and reach the kernels as the free view
(B, T, H, C, chunk) (C = padded width / chunk): each tile's chunk is its own TMA box and
wgmma operand (C copies on one barrier of C arrivals), so no transpose runs around the
kernels; v stays (B, T, H, Wv).  `chunk` is 32 (the default: 64-byte swizzle, so a prefix
such as P_0 = 32 of the d64 8-level paper config contracts 32 columns instead of 64) or 64
(128-byte swizzled bf16 rows).  Only the q/k (dq/dk) chunk buffers change; v, dO and P
keep their layouts (the SMEM staging of dS, used only with register A operands off, takes
the chunk swizzle: a wgmma's A and B share one swizzle).  Timings: docs/performance.md.

Causal inputs are zero-padded in time to a multiple of the coarsest block and of 128;
non-causal inputs need T divisible by the block sizes and by 128.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from structattn.attention import mlr_tiling
from structattn.attention.kernel_config import KernelConfig
from structattn.attention.mlr_tiling import LOG2E, MIN_WIDTH, NEG, Levels, Plan
from structattn.attention.pattern import Pattern

try:  # Mosaic GPU Pallas (jax >= 0.5); interpret mode needs a recent jax (>= 0.11)
  import jax.experimental.pallas.mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

BQ = 64  # query rows per compute warpgroup (one wgmma M tile)
WGS = 2  # compute warpgroups per CTA
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def available() -> bool:
  """Whether this jax has Pallas Mosaic GPU."""
  return plgpu is not None


def interpret_supported() -> bool:
  """Whether this jax has Mosaic GPU interpret mode (runs the kernel on CPU)."""
  return plgpu is not None and hasattr(plgpu, "InterpretGPUParams")


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one kernel call; hashable, the kernels are jitted on it.

  levels: the padded levels (wk: q/k width, a multiple of the chunk; wv: a multiple of 64).
  interpret: Mosaic GPU interpret mode (CPU).  It reads wgmma A operands from SMEM only
  and accumulates into fresh accumulators, so `reg_a` and `acc_init` follow it."""
  levels: Levels
  config: KernelConfig
  interpret: bool = False

  @property
  def block_k(self) -> int:
    return self.config.fwd.block_k

  @property
  def chunk(self) -> int:
    return self.config.chunk

  @property
  def slots(self) -> int:
    return self.config.slots

  @property
  def schedule_barrier(self) -> bool:
    return self.config.schedule_barrier

  @property
  def acc_init(self) -> bool:
    """PV and gradient products accumulate in place (run_state); else fresh ACC + add."""
    return not self.interpret

  @property
  def reg_a(self) -> bool:
    """Register wgmma A operands (P, masked q, dS); else staged through SMEM."""
    return not self.interpret

  def interpret_params(self):
    return plgpu.InterpretGPUParams() if self.interpret else None


def _chunks(p: int, chunk: int) -> int:
  """Chunks of `chunk` columns covering the prefix [0, p)."""
  return -(-p // chunk)


def _load_chunks(src, bi, rows, hi, dst, bar, nc: int):
  """TMA the nc (rows, chunk) chunks of head hi from src (B, T, H, C, chunk), the free view of
  the (B, T, H, W) array, into dst[c]; bar takes one arrival per chunk (num_arrivals=nc)."""
  for c in range(nc):
    plgpu.copy_gmem_to_smem(src.at[bi, rows, hi, c], dst.at[c], bar)


def _store_chunks(src, dst, bi, rows, hi, nc: int):
  """Write SMEM chunks src[c] (rows, chunk) to dst (B, T, H, C, chunk) and wait for them."""
  for c in range(nc):
    plgpu.copy_smem_to_gmem(src.at[c], dst.at[bi, rows, hi, c], commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _chunk_transforms(chunk: int, dtype):
  """SMEM transforms of a (rows, chunk) q/k chunk: one swizzle row per chunk row."""
  return (plgpu.TilingTransform((8, chunk)),
          plgpu.SwizzleTransform(chunk * jnp.dtype(dtype).itemsize))


# The three kernels are jitted on their static config: the identical attention layers of a
# model share one lowering of each (a private function and calls), not one per layer.
@functools.partial(jax.jit, static_argnums=(3,))
def _forward(qc, kc, v, cfg: Static):
  """qc, kc: (B, T, H, C, chunk); v: (B, T, H, Wv).  Returns o (B, T, H, Wv), lse (B, H, T)
  in base 2."""
  lv, bk, ch = cfg.levels, cfg.block_k, cfg.chunk
  b, t, h, nc, _ = qc.shape
  assert qc.shape[-1] == ch, (qc.shape, ch)
  wv = v.shape[-1]
  dtype = qc.dtype
  plan = Plan(lv, BQ, bk)
  g = plan.g
  segs = plan.segments
  n_steps = t // bk
  slots = max(1, min(cfg.slots, n_steps))
  cta_rows = WGS * BQ
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  wgmma_layout = plgpu.Layout.WGMMA

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
    bi = lax.axis_index("batch")
    hi_ = lax.axis_index("heads")
    (q_smem2, o_smem2, k_smem, v_smem, lse_smem2, stage), (k_bars, v_bars, q_bars), \
        (k_cons, v_cons), sched = scoped
    wg = lax.axis_index("wg")
    cta = lax.axis_index("q_seq")
    if lv.causal:
      cta_steps = pl.cdiv((cta + 1) * cta_rows, jnp.array(bk, jnp.int32))
    else:
      cta_steps = jnp.int32(n_steps)

    def sched_barrier():
      if cfg.schedule_barrier:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg]
      q0 = cta * cta_rows + wg * BQ
      _load_chunks(q_ref, bi, pl.ds(q0, BQ), hi_, q_smem, q_bars.at[wg], nc)
      plgpu.barrier_wait(q_bars.at[wg])

      def a_operand(x, name):
        """Register wgmma A operand; staged through SMEM where registers are not allowed
        (GPU interpret mode only reads A from SMEM)."""
        if cfg.reg_a:
          return x
        buf = stage[name].at[wg]
        buf[...] = x
        plgpu.commit_smem()
        return buf

      def q_chunk(c: int, lo: int, hi: int):
        """A operand: chunk c of the q tile with columns outside [lo, hi) zeroed."""
        lo, hi = max(0, lo - c * ch), min(ch, hi - c * ch)
        if lo == 0 and hi == ch:
          return q_smem.at[c]
        x = plgpu.load(q_smem.at[c], layout=wgmma_layout)
        col = plgpu.broadcasted_iota(jnp.int32, (BQ, ch), 1, layout=wgmma_layout)
        return a_operand(jnp.where((col >= lo) & (col < hi), x, jnp.zeros((), dtype)), "q")

      def product(slot, lo: int, hi: int):
        """q[:, lo:hi] . k[:, lo:hi]^T over the chunks overlapping [lo, hi)."""
        def f(acc_ref):
          for c in range(lo // ch, _chunks(hi, ch)):
            plgpu.wgmma(acc_ref, q_chunk(c, lo, hi), k_smem.at[slot, c].transpose((1, 0)))
          return acc_ref[...]
        return pl.run_scoped(f, plgpu.ACC((BQ, bk), jnp.float32))

      def iota2(dim):
        return plgpu.broadcasted_iota(jnp.int32, (BQ, bk), dim, layout=wgmma_layout)

      def same_block(qpos, kpos, size: int):
        if size & (size - 1) == 0:
          sh = size.bit_length() - 1
          sh = jnp.int32(sh)
          return lax.shift_right_logical(qpos, sh) == lax.shift_right_logical(kpos, sh)
        return lax.div(qpos, jnp.int32(size)) == lax.div(kpos, jnp.int32(size))

      def scores(step, slot, level):
        """Scores (log2 domain) of the tile pair; level None: near tile."""
        if level is not None:
          s = product(slot, 0, lv.prefix[level]) * (lv.mult(level) * LOG2E)
          sched_barrier()
          return s
        qpos = iota2(0) + q0
        kpos = iota2(1) + step * bk
        s = part = None
        for l, lo, hi in segs:
          d = product(slot, lo, hi)
          part = d if part is None else part + d
          sl = part * (lv.mult(l) * LOG2E)
          if l == g:
            s = sl
          else:
            same = same_block(qpos, kpos, lv.sizes[l])
            s = jnp.where(same, sl, NEG if s is None else s)
        sched_barrier()
        if lv.causal:
          s = jnp.where(qpos >= kpos, s, NEG)
        return s

      def kv_body(level, step, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(k_bars.at[slot])
        s = scores(step, slot, level)
        plgpu.barrier_arrive(k_cons.at[slot])
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = a_operand(p.astype(dtype), "p")
        plgpu.barrier_arrive(sched) if cfg.schedule_barrier else None
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_wait(sched) if cfg.schedule_barrier else None
        if cfg.acc_init:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            return acc_ref[...]
          acc = acc + pl.run_scoped(pv, plgpu.ACC((BQ, wv), jnp.float32))
        plgpu.barrier_arrive(v_cons.at[slot])
        return acc, m_new, l_i

      def skip_body(step, _):
        """A tile this warpgroup does not attend: keep the pipeline in step."""
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(k_bars.at[slot])
        plgpu.barrier_arrive(k_cons.at[slot])
        sched_barrier()
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_arrive(v_cons.at[slot])
        sched_barrier()

      def flush_body(step, _):
        """Tiles past this warpgroup's causal end (loaded for the CTA's other group)."""
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_arrive(k_cons.at[slot])
        plgpu.barrier_arrive(v_cons.at[slot])
        sched_barrier()
        sched_barrier()

      m_i = plgpu.layout_cast(jnp.full((BQ,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((BQ,), 0, jnp.float32), wgmma_layout.reduce(1))
      acc = plgpu.layout_cast(jnp.full((BQ, wv), 0, jnp.float32), wgmma_layout)
      carry = (acc, m_i, l_i)
      pl.when(wg == 1)(sched_barrier)
      far, (n_lo, n_hi) = mlr_tiling.ranges(plan, q0, BQ, bk, True)
      n_left = len(far) if lv.causal else g + 1
      loops = [(lo, hi, l) for lo, hi, l in far[:n_left]] + [(n_lo, n_hi, None)] + \
          [(lo, hi, l) for lo, hi, l in far[n_left:]]
      first = loops[0][0] if loops else n_lo
      lax.fori_loop(0, mlr_tiling.idiv(first, bk), skip_body, None)
      end = jnp.int32(first)
      for lo, hi, l in loops:
        carry = lax.fori_loop(mlr_tiling.idiv(lo, bk), mlr_tiling.idiv(hi, bk),
                              functools.partial(kv_body, l), carry)
        end = hi
      if lv.causal:
        lax.fori_loop(mlr_tiling.idiv(end, bk), cta_steps, flush_body, None)
      else:
        lax.fori_loop(mlr_tiling.idiv(end, bk), cta_steps, skip_body, None)
      pl.when(wg == 0)(sched_barrier)
      acc, m_i, l_i = carry
      o_smem = o_smem2.at[wg]
      o_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
      lse_smem = lse_smem2.at[wg]
      lse_smem[...] = m_i + jnp.log(l_i) * LOG2E
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, pl.ds(q0, BQ), hi_])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi_, pl.ds(q0, BQ)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(step, slot):
        rows = pl.ds(step * bk, bk)
        _load_chunks(k_ref, bi, rows, hi_, k_smem.at[slot], k_bars.at[slot], nc)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi_], v_smem.at[slot], v_bars.at[slot])

      _produce(load, (k_cons, v_cons), 0, cta_steps, slots, drain=False)

  def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
    tr, tc = (tiling, swizzle), _chunk_transforms(ch, dtype)
    bufs = (plgpu.SMEM((WGS, nc, BQ, ch), dtype, transforms=tc),
            plgpu.SMEM((WGS, BQ, wv), dtype, transforms=tr),
            plgpu.SMEM((slots, nc, bk, ch), dtype, transforms=tc),
            plgpu.SMEM((slots, bk, wv), dtype, transforms=tr),
            plgpu.SMEM((WGS, BQ), jnp.float32),
            {} if cfg.reg_a else {"q": plgpu.SMEM((WGS, BQ, ch), dtype, transforms=tc),
                                  "p": plgpu.SMEM((WGS, BQ, bk), dtype, transforms=tr)})
    pl.run_scoped(
        lambda *args: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, args),
        bufs,
        (plgpu.Barrier(num_arrivals=nc, num_barriers=slots), plgpu.Barrier(num_barriers=slots),
         plgpu.Barrier(num_arrivals=nc, num_barriers=WGS)),
        (plgpu.Barrier(num_arrivals=WGS, num_barriers=slots),) * 2,
        plgpu.Barrier(num_arrivals=WGS),
        collective_axes="wg",
    )

  kw = {"interpret": cfg.interpret_params()} if cfg.interpret else {}
  o, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct((b, t, h, wv), dtype),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      grid=(h, t // cta_rows, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kw,
  )(qc, kc, v)
  return o, lse


# ------------------------------------------------------------------------------ backward


def _mma(cfg: Static, accs, pairs):
  """accs[i] += a_i . b_i for (a_i, b_i) = pairs[i] (wgmma, fp32 accumulators)."""
  if cfg.acc_init:
    def f(refs):
      for r, (a, b_) in zip(refs, pairs):
        plgpu.wgmma(r, a, b_)
    return list(pl.run_state(f)(tuple(plgpu.ACC.init(x) for x in accs)))

  def g(*refs):
    for r, (a, b_) in zip(refs, pairs):
      plgpu.wgmma(r, a, b_)
    return tuple(r[...] for r in refs)
  outs = pl.run_scoped(g, *[plgpu.ACC(x.shape, jnp.float32) for x in accs])
  return [x + o for x, o in zip(accs, outs)]


def _mm(shape, pairs):
  """sum_i a_i . b_i into a fresh fp32 accumulator."""
  def f(acc_ref):
    for a, b_ in pairs:
      plgpu.wgmma(acc_ref, a, b_)
    return acc_ref[...]
  return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))


def _same_block(a, b, size: int):
  if size & (size - 1) == 0:
    sh = jnp.int32(size.bit_length() - 1)
    return lax.shift_right_logical(a, sh) == lax.shift_right_logical(b, sh)
  return lax.div(a, jnp.int32(size)) == lax.div(b, jnp.int32(size))


def _grad_chunks(lv: Levels, l: int, chunk: int):
  """Gradient chunks of a far tile pair of level l: the full ones and the one cut by P_l."""
  p = lv.prefix[l]
  return list(range(p // chunk)), (p // chunk if p % chunk else None)


class _Ops:
  """Per-warpgroup helpers shared by the dq and dk/dv kernels."""

  def __init__(self, cfg: Static, stage, wg, dtype):
    self.cfg, self.stage, self.wg, self.dtype = cfg, stage, wg, dtype
    self.chunk = cfg.chunk
    self.layout = plgpu.Layout.WGMMA

  def a_operand(self, x, name):
    """Register wgmma A operand (staged through SMEM in interpret mode)."""
    if self.cfg.reg_a:
      return x
    buf = self.stage[name].at[self.wg]
    buf[...] = x
    plgpu.commit_smem()
    return buf

  def iota(self, shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.layout)

  def mask_cols(self, x, lo: int, hi: int):
    """Zero the columns of a (rows, chunk) chunk outside [lo, hi) (chunk-local bounds)."""
    lo, hi = max(0, lo), min(self.chunk, hi)
    if lo == 0 and hi == self.chunk:
      return x
    col = self.iota(x.shape, 1)
    return jnp.where((col >= lo) & (col < hi), x, jnp.zeros((), x.dtype))

  def fixed_chunk(self, ref, c: int, lo: int, hi: int, name):
    """A operand: chunk c of a fixed (SMEM) tile with the columns outside [lo, hi) zeroed."""
    lo, hi = lo - c * self.chunk, hi - c * self.chunk
    if lo <= 0 and hi >= self.chunk:
      return ref.at[c]
    x = plgpu.load(ref.at[c], layout=self.layout)
    return self.a_operand(self.mask_cols(x, lo, hi), name)

  def scores(self, lv: Levels, segs, g, fixed, streamed, shape, rpos, cpos, level, qk_rows):
    """Scores (log2 domain) of a tile pair and the gradient factor: for a far pair of
    level l, (s, None); for a near pair (s, sel) with sel(ds) -> [(level, lo, hi, G)] the
    per-segment operands G (ds times the pair's divisor, zero where the pair's level is
    coarser than the segment's).  fixed: SMEM (C, rows, chunk) of the program's rows;
    streamed: SMEM (C, cols, chunk).  qk_rows: rows are queries (causal mask q >= k)."""
    ch = self.chunk

    def product(lo: int, hi: int):
      return _mm(shape, [(self.fixed_chunk(fixed, c, lo, hi, "fix"),
                          streamed.at[c].transpose((1, 0)))
                         for c in range(lo // ch, _chunks(hi, ch))])

    if level is not None:
      return product(0, lv.prefix[level]) * (lv.mult(level) * LOG2E), None
    s = part = None
    sames = {}
    for l, lo, hi in segs:
      d = product(lo, hi)
      part = d if part is None else part + d
      sl = part * (lv.mult(l) * LOG2E)
      if l == g:
        s = sl
      else:
        sames[l] = _same_block(rpos, cpos, lv.sizes[l])
        s = jnp.where(sames[l], sl, NEG if s is None else s)
    if lv.causal:
      s = jnp.where(rpos >= cpos if qk_rows else cpos >= rpos, s, NEG)

    def sel(ds):
      dsm = None
      for l, _, _ in segs:
        x = ds * lv.mult(l)
        if l == g:
          dsm = x
        else:
          dsm = jnp.where(sames[l], x, jnp.zeros((), jnp.float32) if dsm is None else dsm)
      out = []
      for l, lo, hi in segs:
        gl = dsm if l == g else jnp.where(sames[l], dsm, jnp.zeros((), jnp.float32))
        out.append((l, lo, hi, gl))
      return out
    return s, sel

  def grad_update(self, lv: Levels, level, sel, ds, other, accs, tmp, zero):
    """Add the tile pair's contribution ds . other (other: SMEM (C, cols, chunk)) to the chunk
    accumulators; a far pair's chunk cut by P_l goes to tmp (masked after its loop).
    zero: a traced int32 0; in-place accumulation (pl.run_state) cannot lower a static
    chunk index of a closed-over ref (a literal where an ir.Value is needed), so the
    chunk index is made dynamic."""
    if level is not None:
      full, cut = _grad_chunks(lv, level, self.chunk)
      g16 = self.a_operand((ds * lv.mult(level)).astype(self.dtype), "ds")
      targets = [accs[c] for c in full] + ([tmp] if cut is not None else [])
      chunks = full + ([cut] if cut is not None else [])
      idx = (lambda c: zero + c) if self.cfg.acc_init else (lambda c: c)
      new = _mma(self.cfg, targets, [(g16, other.at[idx(c)]) for c in chunks])
      accs = list(accs)
      for c, x in zip(full, new):
        accs[c] = x
      return accs, (new[-1] if cut is not None else tmp)
    accs, ch = list(accs), self.chunk
    for _, lo, hi, gl in sel(ds):
      g16 = self.a_operand(gl.astype(self.dtype), "ds")
      for c in range(lo // ch, _chunks(hi, ch)):
        d = _mm(accs[c].shape, [(g16, other.at[c])])
        accs[c] = accs[c] + self.mask_cols(d, lo - c * ch, hi - c * ch)
    return accs, tmp


def _produce(load, consumed, s0, s1, slots: int, drain: bool = True):
  """The memory warpgroup's pipeline over steps [s0, s1): prefetch the first `slots` tiles,
  then load step + slots into a slot once every `consumed` barrier of that slot has been
  arrived at.  drain: also wait for the last releases (the jax 0.11 GPU interpreter checks
  that every barrier phase is observed).  With s0 == 0 (a Python int) the prefetch slots are
  static."""
  slot_of = lambda st: lax.rem(st, jnp.array(slots, st.dtype))
  for i in range(slots):
    @pl.when(s0 + i < s1)
    def _():
      if isinstance(s0, int) and s0 == 0:
        load(jnp.int32(i), i)
      else:
        load(s0 + i, slot_of(s0 + i))

  @pl.loop(s0, jnp.maximum(s1 - slots, s0))
  def _(step):
    nxt = step + slots
    slot = slot_of(step)
    for bar in consumed:
      plgpu.barrier_wait(bar.at[slot])
    load(nxt, slot)

  if drain:
    @pl.loop(jnp.maximum(s1 - slots, s0), s1)
    def _(step):
      for bar in consumed:
        plgpu.barrier_wait(bar.at[slot_of(step)])


def _far_tmp(lv: Levels, level, rows: int, layout, chunk: int):
  if level is None or _grad_chunks(lv, level, chunk)[1] is None:
    return None
  return plgpu.layout_cast(jnp.full((rows, chunk), 0, jnp.float32), layout)


@functools.partial(jax.jit, static_argnums=(6,))
def _bwd_dq(qc, kc, v, do, lse, delta, cfg: Static):
  """dq (B, T, H, C, chunk): program = 2 x 64 query rows, key/value tiles streamed."""
  lv, bk, ch = cfg.levels, 64, cfg.chunk
  b, t, h, nc, _ = qc.shape
  assert qc.shape[-1] == ch, (qc.shape, ch)
  wv = v.shape[-1]
  dtype = qc.dtype
  plan = Plan(lv, BQ, bk)
  g = plan.g
  segs = plan.segments
  n_steps = t // bk
  slots = max(1, min(cfg.slots, n_steps))
  cta_rows = WGS * BQ
  tiling, swizzle = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)
  L = plgpu.Layout.WGMMA

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped):
    bi, hi_ = lax.axis_index("batch"), lax.axis_index("heads")
    (q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, stage), \
        (k_bars, v_bars), (q_bars, do_bars, lse_bars, delta_bars), (k_cons, v_cons) = scoped
    wg = lax.axis_index("wg")
    cta = lax.axis_index("q_seq")
    if lv.causal:
      cta_steps = pl.cdiv((cta + 1) * cta_rows, jnp.array(bk, jnp.int32))
    else:
      cta_steps = jnp.int32(n_steps)

    @pl.when(wg < WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      ops = _Ops(cfg, stage, wg, dtype)
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q0 = cta * cta_rows + wg * BQ
      rows = pl.ds(q0, BQ)
      _load_chunks(q_ref, bi, rows, hi_, q_smem, q_bars.at[wg], nc)
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi_], do_smem, do_bars.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi_, rows], lse_smem2.at[wg], lse_bars.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi_, rows], delta_smem2.at[wg],
                              delta_bars.at[wg])
      for bars in (q_bars, do_bars, lse_bars, delta_bars):
        plgpu.barrier_wait(bars.at[wg])
      lse_r = plgpu.load(lse_smem2.at[wg], layout=L.reduce(1))
      delta_r = plgpu.load(delta_smem2.at[wg], layout=L.reduce(1))
      qpos = ops.iota((BQ, bk), 0) + q0

      def body(level, step, carry):
        (accs, extra), tmp = carry
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(k_bars.at[slot])
        s, sel = ops.scores(lv, segs, g, q_smem, k_smem.at[slot], (BQ, bk), qpos,
                            ops.iota((BQ, bk), 1) + step * bk, level, True)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse_r, s.shape, [0]))
        plgpu.barrier_wait(v_bars.at[slot])
        dp = _mm((BQ, bk), [(do_smem, v_smem.at[slot].transpose((1, 0)))])
        plgpu.barrier_arrive(v_cons.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(delta_r, s.shape, [0]))
        accs, tmp = ops.grad_update(lv, level, sel, ds, k_smem.at[slot], accs, tmp, step * 0)
        plgpu.barrier_arrive(k_cons.at[slot])
        return (accs, extra), tmp

      def skip(step, _):
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(k_bars.at[slot])
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_arrive(v_cons.at[slot])
        plgpu.barrier_arrive(k_cons.at[slot])

      accs = [plgpu.layout_cast(jnp.full((BQ, ch), 0, jnp.float32), L) for _ in range(nc)]
      accs, _ = _walk(plan, q0, True, jnp.int32(0), cta_steps, bk, body, skip, (accs, ()),
                      lambda l: _far_tmp(lv, l, BQ, L, ch), ops)
      for c in range(nc):
        q_smem.at[c][...] = accs[c].astype(dtype)
      plgpu.commit_smem()
      _store_chunks(q_smem, dq_ref, bi, rows, hi_, nc)

    @pl.when(wg == WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(step, slot):
        r = pl.ds(step * bk, bk)
        _load_chunks(k_ref, bi, r, hi_, k_smem.at[slot], k_bars.at[slot], nc)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, r, hi_], v_smem.at[slot], v_bars.at[slot])

      _produce(load, (k_cons, v_cons), 0, cta_steps, slots)

  def entry(*refs):
    tr, tc = (tiling, swizzle), _chunk_transforms(ch, dtype)
    bufs = (plgpu.SMEM((WGS, nc, BQ, ch), dtype, transforms=tc),
            plgpu.SMEM((WGS, BQ, wv), dtype, transforms=tr),
            plgpu.SMEM((WGS, BQ), jnp.float32), plgpu.SMEM((WGS, BQ), jnp.float32),
            plgpu.SMEM((slots, nc, bk, ch), dtype, transforms=tc),
            plgpu.SMEM((slots, bk, wv), dtype, transforms=tr),
            {} if cfg.reg_a else {"fix": plgpu.SMEM((WGS, BQ, ch), dtype, transforms=tc),
                                  "ds": plgpu.SMEM((WGS, BQ, bk), dtype, transforms=tc)})
    pl.run_scoped(
        lambda *args: kernel(*refs, args), bufs,
        (plgpu.Barrier(num_arrivals=nc, num_barriers=slots), plgpu.Barrier(num_barriers=slots)),
        (plgpu.Barrier(num_arrivals=nc, num_barriers=WGS),)
        + (plgpu.Barrier(num_barriers=WGS),) * 3,
        (plgpu.Barrier(num_arrivals=WGS, num_barriers=slots),) * 2,
        collective_axes="wg")

  kw = {"interpret": cfg.interpret_params()} if cfg.interpret else {}
  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct(qc.shape, dtype),
      grid=(h, t // cta_rows, b), grid_names=("heads", "q_seq", "batch"),
      num_threads=WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), **kw,
  )(qc, kc, v, do, lse, delta)


def _walk(plan: Plan, r0, rows_are_queries: bool, s0, s1, tile: int, body, skip, state,
          make_tmp, ops: "_Ops"):
  """Walk the streamed tiles [s0, s1) in order: `skip` the unused ones, `body(l)` the far
  ranges of level l and `body(None)` the near range.  state = (chunk accumulators, extra);
  a far loop accumulates the chunk cut by P_l in a temporary, masked and added after it."""
  lv = plan.lv
  far, (n_lo, n_hi) = mlr_tiling.ranges(plan, r0, BQ, tile, rows_are_queries)
  if not lv.causal:
    n_left = plan.g + 1
  else:
    n_left = len(far) if rows_are_queries else 0
  loops = far[:n_left] + [(n_lo, n_hi, None)] + far[n_left:]
  lax.fori_loop(s0, mlr_tiling.idiv(jnp.int32(loops[0][0]), tile), skip, None)
  for lo, hi, l in loops:
    (accs, extra), tmp = lax.fori_loop(mlr_tiling.idiv(jnp.int32(lo), tile),
                                       mlr_tiling.idiv(jnp.int32(hi), tile),
                                       functools.partial(body, l), (state, make_tmp(l)))
    if tmp is not None:
      c = lv.prefix[l] // ops.chunk
      accs = list(accs)
      accs[c] = accs[c] + ops.mask_cols(tmp, 0, lv.prefix[l] - c * ops.chunk)
    state = (accs, extra)
  lax.fori_loop(mlr_tiling.idiv(jnp.int32(loops[-1][1]), tile), s1, skip, None)
  return state


@functools.partial(jax.jit, static_argnums=(6,))
def _bwd_dkdv(qc, kc, v, do, lse, delta, cfg: Static):
  """dk (B, T, H, C, chunk), dv (B, T, H, Wv): program = 2 x 64 key rows, query tiles (q,
  dO, lse, delta) streamed."""
  lv, bq, ch = cfg.levels, 64, cfg.chunk
  b, t, h, nc, _ = qc.shape
  assert qc.shape[-1] == ch, (qc.shape, ch)
  wv = v.shape[-1]
  dtype = qc.dtype
  plan = Plan(lv, bq, BQ)  # rows = keys (BQ of them per warpgroup), columns = queries
  g = plan.g
  segs = plan.segments
  n_steps = t // bq
  slots = max(1, min(cfg.slots, n_steps))
  cta_rows = WGS * BQ
  tiling, swizzle = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)
  L = plgpu.Layout.WGMMA

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, scoped):
    bi, hi_ = lax.axis_index("batch"), lax.axis_index("heads")
    (k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, stage), \
        (k_bars, v_bars), (q_bars, do_bars, lse_bars, delta_bars), cons = scoped
    wg = lax.axis_index("wg")
    cta = lax.axis_index("kv_seq")
    s0 = mlr_tiling.idiv(cta * cta_rows, bq) if lv.causal else jnp.int32(0)
    s1 = jnp.int32(n_steps)

    @pl.when(wg < WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      ops = _Ops(cfg, stage, wg, dtype)
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k0 = cta * cta_rows + wg * BQ
      rows = pl.ds(k0, BQ)
      _load_chunks(k_ref, bi, rows, hi_, k_smem, k_bars.at[wg], nc)
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi_], v_smem, v_bars.at[wg])
      plgpu.barrier_wait(k_bars.at[wg])
      plgpu.barrier_wait(v_bars.at[wg])
      kpos = ops.iota((BQ, bq), 0) + k0

      def body(level, step, carry):
        (accs, dv), tmp = carry
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        plgpu.barrier_wait(q_bars.at[slot])
        sT, sel = ops.scores(lv, segs, g, k_smem, q_smem.at[slot], (BQ, bq), kpos,
                             ops.iota((BQ, bq), 1) + step * bq, level, False)
        plgpu.barrier_wait(lse_bars.at[slot])
        lse_r = plgpu.load(lse_smem.at[slot], layout=L.reduce(0))
        pT = jnp.exp2(sT - lax.broadcast_in_dim(lse_r, sT.shape, [1]))
        p16 = ops.a_operand(pT.astype(dtype), "p")
        plgpu.barrier_wait(do_bars.at[slot])
        zeros = plgpu.layout_cast(jnp.full((BQ, bq), 0, jnp.float32), L)
        dv, dpT = _mma(cfg, [dv, zeros], [(p16, do_smem.at[slot]),
                                          (v_smem, do_smem.at[slot].transpose((1, 0)))])
        plgpu.barrier_wait(delta_bars.at[slot])
        delta_r = plgpu.load(delta_smem.at[slot], layout=L.reduce(0))
        dsT = pT * (dpT - lax.broadcast_in_dim(delta_r, sT.shape, [1]))
        accs, tmp = ops.grad_update(lv, level, sel, dsT, q_smem.at[slot], accs, tmp,
                                    step * 0)
        plgpu.barrier_arrive(cons.at[slot])
        return (accs, dv), tmp

      def skip(step, _):
        slot = lax.rem(step, jnp.array(slots, step.dtype))
        for bars in (q_bars, lse_bars, do_bars, delta_bars):
          plgpu.barrier_wait(bars.at[slot])
        plgpu.barrier_arrive(cons.at[slot])

      zero = lambda w: plgpu.layout_cast(jnp.full((BQ, w), 0, jnp.float32), L)
      state = ([zero(ch) for _ in range(nc)], zero(wv))
      state = _walk(plan, k0, False, s0, s1, bq, body, skip, state,
                    lambda l: _far_tmp(lv, l, BQ, L, ch), ops)
      accs, dv = state
      for c in range(nc):
        k_smem.at[c][...] = accs[c].astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      for c in range(nc):
        plgpu.copy_smem_to_gmem(k_smem.at[c], dk_ref.at[bi, rows, hi_, c], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, rows, hi_], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(step, slot):
        r = pl.ds(step * bq, bq)
        _load_chunks(q_ref, bi, r, hi_, q_smem.at[slot], q_bars.at[slot], nc)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, r, hi_], do_smem.at[slot], do_bars.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi_, r], lse_smem.at[slot], lse_bars.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi_, r], delta_smem.at[slot],
                                delta_bars.at[slot])

      _produce(load, (cons,), s0, s1, slots)

  def entry(*refs):
    tr, tc = (tiling, swizzle), _chunk_transforms(ch, dtype)
    bufs = (plgpu.SMEM((WGS, nc, BQ, ch), dtype, transforms=tc),
            plgpu.SMEM((WGS, BQ, wv), dtype, transforms=tr),
            plgpu.SMEM((slots, nc, bq, ch), dtype, transforms=tc),
            plgpu.SMEM((slots, bq, wv), dtype, transforms=tr),
            plgpu.SMEM((slots, bq), jnp.float32), plgpu.SMEM((slots, bq), jnp.float32),
            {} if cfg.reg_a else {"fix": plgpu.SMEM((WGS, BQ, ch), dtype, transforms=tc),
                                  "p": plgpu.SMEM((WGS, BQ, bq), dtype, transforms=tr),
                                  "ds": plgpu.SMEM((WGS, BQ, bq), dtype, transforms=tc)})
    pl.run_scoped(
        lambda *args: kernel(*refs, args), bufs,
        (plgpu.Barrier(num_arrivals=nc, num_barriers=WGS), plgpu.Barrier(num_barriers=WGS)),
        (plgpu.Barrier(num_arrivals=nc, num_barriers=slots),)
        + (plgpu.Barrier(num_barriers=slots),) * 3,
        plgpu.Barrier(num_arrivals=WGS, num_barriers=slots),
        collective_axes="wg")

  kw = {"interpret": cfg.interpret_params()} if cfg.interpret else {}
  return plgpu.kernel(
      entry, out_type=[jax.ShapeDtypeStruct(kc.shape, dtype),
                       jax.ShapeDtypeStruct(v.shape, dtype)],
      grid=(h, t // cta_rows, b), grid_names=("heads", "kv_seq", "batch"),
      num_threads=WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), **kw,
  )(qc, kc, v, do, lse, delta)


# ------------------------------------------------------------------------------ custom VJP


def _to_chunks(x, chunk: int):
  """(B, T, H, W) -> (B, T, H, W / chunk, chunk): a free view (no data movement); the
  kernels TMA one (rows, chunk) box per chunk."""
  b, t, h, w = x.shape
  assert w % chunk == 0, (w, chunk)
  return x.reshape(b, t, h, w // chunk, chunk)


def _from_chunks(x, chunk: int):
  """(B, T, H, C, chunk) -> (B, T, H, C * chunk)."""
  b, t, h, c, w = x.shape
  assert w == chunk, (x.shape, chunk)
  return x.reshape(b, t, h, c * w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlr(q, k, v, cfg: Static):
  ch = cfg.chunk
  return _forward(_to_chunks(q, ch), _to_chunks(k, ch), v, cfg)[0]


def _mlr_fwd(q, k, v, cfg: Static):
  ch = cfg.chunk
  o, lse = _forward(_to_chunks(q, ch), _to_chunks(k, ch), v, cfg)
  return o, (q, k, v, o, lse)


def _backward(cfg: Static, res, do):
  """Mosaic GPU backward: delta = rowsum(dO * O), then the dq and dk/dv kernels."""
  q, k, v, o, lse = res
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(v.dtype)
  ch = cfg.chunk
  qc, kc = _to_chunks(q, ch), _to_chunks(k, ch)
  dq = _bwd_dq(qc, kc, v, do, lse, delta, cfg)
  dk, dv = _bwd_dkdv(qc, kc, v, do, lse, delta, cfg)
  return _from_chunks(dq, ch), _from_chunks(dk, ch), dv


_mlr.defvjp(_mlr_fwd, _backward)


# ------------------------------------------------------------------------------- wrapper


def compute_dtype(dtype):
  """The operand dtype the kernels compute in for inputs of `dtype`: float32 inputs are
  rounded to bfloat16 (wgmma has no float32 operands here)."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.bfloat16) if dtype == jnp.float32 else dtype


def mlr_attention_mosaic(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern,
                         config: KernelConfig | None = None, *, interpret: bool = False,
                         block_q: int | None = None, block_k: int | None = None,
                         chunk: int | None = None):
  """Fused nested-block (MLR) attention, Mosaic GPU forward and backward; same result as
  `core.blocked_attention` and `pallas_mlr.mlr_attention_pallas`.

  q_BTHK, k_BTHK: level-scaled features (K = sum(pattern.widths)); v_BTHV values.
  config: the tiles and layout knobs (default `KernelConfig.for_mosaic()`); block_q (None
  or 64), block_k (64 or 128) and chunk (32 or 64) override its fields.  q/k are
  zero-padded to a power-of-two width >= chunk, v to a width >= 64.  interpret=True runs
  the kernels in Mosaic GPU interpret mode on CPU.  bfloat16/float16 operands (float32
  inputs are rounded to bfloat16: `compute_dtype`), float32 accumulation; the output has
  v's dtype.
  """
  if plgpu is None:
    raise ImportError("mlr_attention_mosaic needs jax.experimental.pallas.mosaic_gpu")
  if interpret and not interpret_supported():
    raise NotImplementedError("this jax has no Mosaic GPU interpret mode (InterpretGPUParams)")
  b, t, h, k = q_BTHK.shape
  dv = v_BTHV.shape[-1]
  out_dtype = v_BTHV.dtype
  dtype = jnp.result_type(q_BTHK, k_BTHK, v_BTHV)
  if dtype not in DTYPES:
    raise ValueError(f"mlr_attention_mosaic needs float32/bfloat16/float16 inputs, got {dtype}")
  dtype = compute_dtype(dtype)
  config = config or KernelConfig.for_mosaic()
  if chunk is not None:
    config = dataclasses.replace(config, chunk=chunk)
  config = config.with_blocks(block_q, None)
  if block_k is not None:
    config = dataclasses.replace(config, fwd=dataclasses.replace(config.fwd, block_k=block_k))
  config.check_mosaic()
  tile = max(WGS * BQ, config.fwd.block_k)
  if not pattern.causal:
    tile = math.lcm(tile, MIN_WIDTH)
  tp, lv = mlr_tiling.levels_and_length(pattern, t, k, dv, tile, "mlr_attention_mosaic")
  wk = max(config.chunk, mlr_tiling.pow2(k))
  wv = max(64, mlr_tiling.pow2(dv))  # PV wgmma N / 128-byte swizzled v rows
  lv = dataclasses.replace(lv, wk=wk, wv=wv)
  pad = lambda x, w: jnp.pad(x.astype(dtype), [(0, 0), (0, tp - t), (0, 0), (0, w - x.shape[-1])])
  q, kk, v = pad(q_BTHK, wk), pad(k_BTHK, wk), pad(v_BTHV, wv)
  out = _mlr(q, kk, v, Static(lv, config, bool(interpret)))
  return out[:, :t, :, :dv].astype(out_dtype)
