"""XLA attention cores: softmax attention over structured score patterns.

Every core takes per-head queries and keys whose level scales are already folded in
(q_BTHK, k_BTHK, K = sum of level widths) and values v_BTHV, and returns out_BTHV.  The
score pattern is a `pattern.Pattern`.  Choosing between these cores, cuDNN and the fused
kernels is `dispatch.attention`'s job; `xla_attention` picks the XLA core of a pattern.

Implementations
  * `reference_attention`: the maths as written, one dense TxT score matrix built as a
    sum of masked per-level products.  Simple and slow; the tests' oracle.
  * `dense_attention_xla` / `cudnn_attention`: one global level (or one window for cuDNN)
    through `jax.nn.dot_product_attention`.
  * `blocked_attention`: nested block levels.  Pairs are partitioned into pieces with a
    single contraction width (per level: each child block against each earlier sibling;
    at the finest level the causal diagonal blocks), each piece is a batched product
    with no masking, and pieces are merged by log-sum-exp.  FLOPs and memory follow the
    block sparsity; large pieces are processed in rematerialised query chunks, so the
    backward pass never holds more than a chunk of scores per head.
  * `windowed_attention`: causal (or symmetric) band of width w in query chunks: O(T*w).
  * global|window (GSWA): either one softmax over the summed scores (renorm) or the sum
    of two separately normalised softmaxes (the reference code's `sum`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from structattn.attention.pattern import Pattern

NEG = -1e30  # finite "minus infinity" keeps exp/merge NaN-free for empty rows.
QUERY_CHUNK = 512
MIN_TILE = 64


# ------------------------------------------------------------------------------ reference


def level_masks(pattern: Pattern, t: int):
  """(L, T, T) boolean: level l contains pair (i, j) (causality not applied).

  Built from iotas so that no TxT constant enters the compiled program."""
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  out = []
  for seq, size in zip(pattern.seqs, pattern.sizes):
    if seq == "global":
      out.append(jnp.ones((t, t), bool))
    elif seq == "block":
      out.append((i // size) == (j // size))
    else:
      out.append(jnp.abs(i - j) <= size)
  return jnp.stack(out)


def reference_attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern):
  """Masked-dense oracle: S_ij = sum_l 1[l covers (i,j)] <q_i^(l), k_j^(l)>, then divide."""
  t = q_BTHK.shape[1]
  masks = level_masks(pattern, t)
  ii, jj = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  causal = (jj <= ii) if pattern.causal else jnp.ones((t, t), bool)
  edges = (0,) + pattern.prefix
  parts = []
  for l in range(len(pattern.widths)):
    ql, kl = q_BTHK[..., edges[l]:edges[l + 1]], k_BTHK[..., edges[l]:edges[l + 1]]
    parts.append(jnp.einsum("bihd,bjhd->bhij", ql, kl) * masks[l])
  if pattern.combine == "sum":
    outs = []
    for l, s in enumerate(parts):
      valid = masks[l] & causal
      p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
      outs.append(jnp.einsum("bhij,bjhd->bihd", p, v_BTHV))
    return sum(outs)
  s = sum(parts)
  if pattern.divide != "none":
    covered = masks.sum(0, dtype=s.dtype)
    div = covered if pattern.divide == "block" else len(parts)
    s = s / div
  valid = masks[0] & causal
  p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhij,bjhd->bihd", p, v_BTHV)


# ------------------------------------------------------------------- log-sum-exp pieces


def _scores_to_stats(s, mask, v):
  """Unnormalised softmax statistics of one piece: o = sum_j exp(s-m) v_j, m, l."""
  if mask is not None:
    s = jnp.where(mask, s, NEG)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
  p = jnp.exp(s - m[..., None])
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("...qk,...kv->...qv", p.astype(v.dtype), v, preferred_element_type=_acc(v))
  return o, m, l


def _piece(q_BTK, k_BSK, v_BSV, mult: float, mask_fn=None, chunk: int = QUERY_CHUNK,
           score_fn=None):
  """Softmax statistics of queries q against keys k (batched over B), no normalisation.

  mask_fn: optional `f(qpos_T1, kpos_1S) -> bool (T, S)` over piece-local positions,
  evaluated from iotas inside the computation (no TxT constants).  Queries are processed
  in rematerialised chunks when T > chunk, so memory is O(B * chunk * S).  score_fn, if
  given, replaces `mult * q k^T` (used for the multi-level diagonal tiles).
  """
  n, nq, _ = q_BTK.shape
  nk = k_BSK.shape[1]

  def attend(q, start):
    qpos = start + jnp.arange(q.shape[1])[:, None]
    kpos = jnp.arange(nk)[None, :]
    if score_fn is not None:
      s = score_fn(q, k_BSK, qpos, kpos)
    else:
      s = jnp.einsum("nqd,nkd->nqk", q, k_BSK, preferred_element_type=_acc(q)) * mult
    mask = None
    if mask_fn is not None:
      mask = mask_fn(qpos, kpos)
    return _scores_to_stats(s, mask, v_BSV)

  if nq <= chunk or nq % chunk:
    return attend(q_BTK, 0)
  nc = nq // chunk
  q_chunks = jnp.moveaxis(q_BTK.reshape(n, nc, chunk, -1), 1, 0)  # (chunks, B, chunk, K)
  fn = jax.checkpoint(attend)
  o, m, l = jax.lax.map(lambda a: fn(a[0], a[1]), (q_chunks, jnp.arange(nc) * chunk))
  o = jnp.moveaxis(o, 0, 1).reshape(n, nq, -1)
  m = jnp.moveaxis(m, 0, 1).reshape(n, nq)
  l = jnp.moveaxis(l, 0, 1).reshape(n, nq)
  return o, m, l


def _merge(a, b):
  if a is None:
    return b
  oa, ma, la = a
  ob, mb, lb = b
  m = jnp.maximum(ma, mb)
  ca, cb = jnp.exp(ma - m), jnp.exp(mb - m)
  return oa * ca[..., None] + ob * cb[..., None], m, la * ca + lb * cb


def _acc(x):
  """Accumulation dtype: float32, or float64 when the inputs are float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _finish(stats, dtype):
  o, _, l = stats
  return (o / l[..., None]).astype(dtype)


# --------------------------------------------------------------------------- block levels


def _blocked_stats(q_BHTK, k_BHTK, v_BHTV, pattern: Pattern, chunk: int, min_tile: int):
  """Stats (o, m, l) of nested block levels, shapes (B,H,T,V), (B,H,T), (B,H,T)."""
  b, h, t, _ = q_BHTK.shape
  dv = v_BHTV.shape[-1]
  sizes = [t if s == "global" else size for s, size in zip(pattern.seqs, pattern.sizes)]
  prefix = pattern.prefix
  nlev = len(sizes)
  # Tile level g: the finest level whose blocks hold at least MIN_TILE positions (or the
  # coarsest, for short sequences).  Finer levels are resolved inside its diagonal tiles:
  # tiny blocks (the paper's 8-token level) make batched products too small to be efficient.
  g = max([l for l in range(nlev) if sizes[l] >= min_tile] or [0])
  stats = None
  for l in range(g):
    parent, child = sizes[l], sizes[l + 1]
    k_ratio = parent // child
    d = prefix[l]
    mult = 1.0 / pattern.level_divisor(l)
    npar = t // parent
    q6 = q_BHTK[..., :d].reshape(b, h, npar, k_ratio, child, d)
    k6 = k_BHTK[..., :d].reshape(b, h, npar, k_ratio, child, d)
    v6 = v_BHTV.reshape(b, h, npar, k_ratio, child, dv)
    offsets = list(range(1, k_ratio))
    if not pattern.causal:
      offsets += [-o for o in range(1, k_ratio)]
    for off in offsets:
      if off > 0:
        qs, ks, vs = q6[:, :, :, off:], k6[:, :, :, :-off], v6[:, :, :, :-off]
      else:
        qs, ks, vs = q6[:, :, :, :off], k6[:, :, :, -off:], v6[:, :, :, -off:]
      groups = k_ratio - abs(off)
      o, m, lsum = _piece(qs.reshape(-1, child, d), ks.reshape(-1, child, d),
                          vs.reshape(-1, child, dv), mult, None, chunk)
      o = o.reshape(b, h, npar, groups, child, dv)
      m = m.reshape(b, h, npar, groups, child)
      lsum = lsum.reshape(b, h, npar, groups, child)
      pad = (abs(off), 0) if off > 0 else (0, abs(off))
      o = jnp.pad(o, [(0, 0)] * 3 + [pad, (0, 0), (0, 0)])
      m = jnp.pad(m, [(0, 0)] * 3 + [pad, (0, 0)], constant_values=NEG)
      lsum = jnp.pad(lsum, [(0, 0)] * 3 + [pad, (0, 0)])
      stats = _merge(stats, (o.reshape(b, h, t, dv), m.reshape(b, h, t), lsum.reshape(b, h, t)))
  # Diagonal tiles of level g at full width; levels finer than g are resolved inside the
  # tile by selecting, per pair, the prefix product of its deepest shared level.
  tile = sizes[g]
  mask_fn = (lambda i, j: j <= i) if pattern.causal else None
  score_fn = None
  if g < nlev - 1:
    score_fn = functools.partial(_tile_scores, pattern=pattern, sizes=tuple(sizes), g=g)
  o, m, lsum = _piece(q_BHTK.reshape(-1, tile, q_BHTK.shape[-1]),
                      k_BHTK.reshape(-1, tile, k_BHTK.shape[-1]),
                      v_BHTV.reshape(-1, tile, dv), 1.0 / pattern.level_divisor(g), mask_fn,
                      chunk, score_fn)
  return _merge(stats, (o.reshape(b, h, t, dv), m.reshape(b, h, t), lsum.reshape(b, h, t)))


def _tile_scores(q_BTK, k_BSK, i, j, *, pattern: Pattern, sizes: tuple[int, ...], g: int):
  """Scores inside diagonal tiles of level g: S_ij = q_i[:d_λ] . k_j[:d_λ] / div(λ), λ the
  deepest level (>= g) whose block holds both i and j (tile-local positions suffice because
  the tile size is a multiple of every finer block size)."""
  acc = _acc(q_BTK)
  prefix = (0,) + pattern.prefix
  part = jnp.einsum("nqd,nkd->nqk", q_BTK[..., :prefix[g + 1]], k_BSK[..., :prefix[g + 1]],
                    preferred_element_type=acc)
  s = part / pattern.level_divisor(g)
  for l in range(g + 1, len(sizes)):
    a, e = prefix[l], prefix[l + 1]
    part = part + jnp.einsum("nqd,nkd->nqk", q_BTK[..., a:e], k_BSK[..., a:e],
                             preferred_element_type=acc)
    same = (i // sizes[l]) == (j // sizes[l])
    s = jnp.where(same, part / pattern.level_divisor(l), s)
  return s


def blocked_attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern, chunk: int = QUERY_CHUNK,
                      min_tile: int = MIN_TILE):
  """Nested block levels (MLR), O(sum_l T*b_l*d_l) FLOPs; see module docstring."""
  t = q_BTHK.shape[1]
  sizes = [size for s, size in zip(pattern.seqs, pattern.sizes) if s == "block"]
  pad = 0
  if sizes and t % sizes[0]:
    if not pattern.causal:
      raise ValueError(f"non-causal block attention needs T={t} divisible by the block size "
                       f"{sizes[0]}")
    pad = sizes[0] - t % sizes[0]  # causal: future padding is never attended to.
  if pad:
    padw = [(0, 0), (0, pad), (0, 0), (0, 0)]
    q_BTHK, k_BTHK, v_BTHV = (jnp.pad(x, padw) for x in (q_BTHK, k_BTHK, v_BTHV))
  # A level whose block covers the whole (padded) sequence is global.
  tt = q_BTHK.shape[1]
  seqs = tuple("global" if (s == "global" or size >= tt) else s
               for s, size in zip(pattern.seqs, pattern.sizes))
  sizes = tuple(tt if s == "global" else size for s, size in zip(seqs, pattern.sizes))
  pattern = dataclasses.replace(pattern, seqs=seqs, sizes=sizes)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTHK, k_BTHK, v_BTHV))
  if tt > chunk and tt % chunk == 0:
    ch = chunk
  else:
    ch = tt  # no chunking when the length does not tile
  out = _finish(_blocked_stats(q, k, v, pattern, ch, min_tile), v_BTHV.dtype)
  out = jnp.swapaxes(out, 1, 2)
  return out[:, :t] if pad else out


# ------------------------------------------------------------------------------ band levels


def _band_stats(q_BHTK, k_BHTK, v_BHTV, window: int, causal: bool, mult: float, chunk: int,
                outside: bool = False):
  """Stats of pairs inside the band (|i-j| <= w, j <= i if causal), or, with outside=True,
  of the complementary pairs (j < i - w causal; |i-j| > w otherwise) via masked dense."""
  b, h, t, d = q_BHTK.shape
  dv = v_BHTV.shape[-1]
  if outside:
    if causal:
      mask_fn = lambda i, j: j < i - window
    else:
      mask_fn = lambda i, j: jnp.abs(i - j) > window
    ch = chunk if (t > chunk and t % chunk == 0) else t
    o, m, l = _piece(q_BHTK.reshape(-1, t, d), k_BHTK.reshape(-1, t, d),
                     v_BHTV.reshape(-1, t, dv), mult, mask_fn, ch)
    return o.reshape(b, h, t, dv), m.reshape(b, h, t), l.reshape(b, h, t)
  c = min(chunk, t)
  if t % c:
    c = t
  nb = t // c
  before = -(-window // c)  # key chunks needed behind the query chunk
  after = 0 if causal else before
  span = before + 1 + after
  if span * c >= t:  # the padded span holds all T keys or more: one chunk of every real key
    c, nb, before, after, span = t, 1, 0, 0, 1
  padw = [(0, 0), (0, 0), (before * c, after * c), (0, 0)]
  kp, vp = jnp.pad(k_BHTK, padw), jnp.pad(v_BHTV, padw)
  idx = jnp.arange(nb)[:, None] * c + jnp.arange(span * c)[None, :]  # (nb, span*c), padded
  k_win = jnp.take(kp, idx, axis=2)  # (B, H, nb, span*c, d)
  v_win = jnp.take(vp, idx, axis=2)
  q_n = q_BHTK.reshape(b, h, nb, c, d)

  def attend(q, kw, vw):
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", q, kw, preferred_element_type=_acc(q)) * mult
    qi = jnp.arange(c)[:, None] + before * c  # query position inside its padded window
    kj = jnp.arange(span * c)[None, :]
    rel = qi - kj  # i - j
    band = ((rel >= 0) & (rel <= window)) if causal else (jnp.abs(rel) <= window)
    # Keys in the padding (before position 0 or after T-1) are masked per chunk.
    pos = jnp.arange(nb)[:, None, None] * c + kj[None] - before * c
    valid = band[None] & (pos >= 0) & (pos < t)  # (nb, c, span*c)
    return _scores_to_stats(s, valid, vw)

  o, m, l = jax.checkpoint(attend)(q_n, k_win, v_win)
  return o.reshape(b, h, t, dv), m.reshape(b, h, t), l.reshape(b, h, t)


def sum_parts(pattern: Pattern) -> tuple[Pattern, Pattern]:
  """The two single-level patterns of a global|window pattern with combine='sum' (two
  separately normalised softmaxes, added)."""
  a, w = pattern.widths
  return (Pattern(("global",), (0,), (a,), pattern.causal),
          Pattern(("window",), (pattern.sizes[-1],), (w,), pattern.causal))


def windowed_attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern, chunk: int = QUERY_CHUNK):
  """Sliding window (one level) or global|window (GSWA, renorm or sum)."""
  t = q_BTHK.shape[1]
  window = pattern.sizes[-1]
  causal = pattern.causal
  if pattern.combine == "sum":  # each part on its own (a wide window is dense)
    a = pattern.widths[0]
    glob, win = sum_parts(pattern)
    return (xla_attention(q_BTHK[..., :a], k_BTHK[..., :a], v_BTHV, glob)
            + windowed_attention(q_BTHK[..., a:], k_BTHK[..., a:], v_BTHV, win, chunk))
  if window >= t - 1:  # the band holds every pair: plain dense attention at full width
    return dense_attention_xla(q_BTHK / pattern.level_divisor(len(pattern.widths) - 1), k_BTHK,
                               v_BTHV, causal)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTHK, k_BTHK, v_BTHV))
  # Query chunks of about w/4 (>= 64): each chunk scores ~1.25 w keys instead of 2 w.
  bchunk = min(chunk, max(64, (1 << max(0, (window - 1).bit_length())) // 4))
  nlev = len(pattern.widths)
  inside = _band_stats(q, k, v, window, causal, 1.0 / pattern.level_divisor(nlev - 1), bchunk)
  if nlev == 1:
    out = _finish(inside, v.dtype)
  else:
    a = pattern.widths[0]
    outside = _band_stats(q[..., :a], k[..., :a], v, window, causal,
                          1.0 / pattern.level_divisor(0), chunk, outside=True)
    out = _finish(_merge(inside, outside), v.dtype)
  return jnp.swapaxes(out, 1, 2)


# ----------------------------------------------------------------------------------- dense


def dense_attention_xla(q_BTHK, k_BTHK, v_BTHV, causal: bool, window: int | None = None):
  """One global level via XLA's dot_product_attention (one TxT tensor per head)."""
  if q_BTHK.shape[-1] == v_BTHV.shape[-1] and q_BTHK.dtype != jnp.float64:
    return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHV, scale=1.0, is_causal=causal,
                                        local_window_size=window, implementation="xla")
  s = jnp.einsum("bihd,bjhd->bhij", q_BTHK, k_BTHK, preferred_element_type=_acc(q_BTHK))
  t = s.shape[-1]
  if causal:
    s = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v_BTHV.dtype)
  return jnp.einsum("bhij,bjhd->bihd", p, v_BTHV, preferred_element_type=_acc(v_BTHV)).astype(
      v_BTHV.dtype)


def cudnn_unsupported(pattern: Pattern, dtype, d_qk: int, d_v: int, backend: str) -> str:
  """Why cuDNN's fused attention cannot serve a call ('' when it can); pure in its inputs."""
  if backend != "gpu":
    return "not running on a GPU"
  if pattern.seqs not in (("global",), ("window",)):
    return "cuDNN serves dense and sliding-window patterns only"
  if not pattern.causal and pattern.seqs == ("window",):
    return "cuDNN sliding window is causal only here"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN needs bf16/fp16 inputs, got {jnp.dtype(dtype)}"
  if d_qk != d_v or d_qk % 8 or d_qk > 256:
    return f"cuDNN needs equal q/k/v head dims, a multiple of 8 and <= 256 (got {d_qk}, {d_v})"
  return ""


def cudnn_supported(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern) -> tuple[bool, str]:
  """Whether cuDNN's fused attention can serve this call, and why not."""
  why = cudnn_unsupported(pattern, q_BTHK.dtype, q_BTHK.shape[-1], v_BTHV.shape[-1],
                          jax.default_backend())
  return not why, why


def cudnn_attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern):
  window = (pattern.sizes[0], 0) if pattern.seqs == ("window",) else None
  return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHV, scale=1.0, is_causal=pattern.causal,
                                      local_window_size=window, implementation="cudnn")


# ---------------------------------------------------------------------------- XLA cores


def xla_attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern):
  """The XLA core that serves a pattern: dense, windowed, concatenated globals or blocks."""
  seqs = pattern.seqs
  if seqs == ("global",):
    return dense_attention_xla(q_BTHK, k_BTHK, v_BTHV, pattern.causal)
  if "window" in seqs:
    return windowed_attention(q_BTHK, k_BTHK, v_BTHV, pattern)
  if all(s == "global" for s in seqs):  # several global levels: one concatenated product
    if pattern.divide != "none":  # every pair is covered by all L levels
      q_BTHK = q_BTHK / len(seqs)
    return dense_attention_xla(q_BTHK, k_BTHK, v_BTHV, pattern.causal)
  return blocked_attention(q_BTHK, k_BTHK, v_BTHV, pattern)
