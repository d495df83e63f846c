"""Independent float64 NumPy reference of the attention layer, written from the definitions of
the scoring functions (README: Scoring functions).

It reads the raw weights out of an `Attention` module and recomputes the layer with
explicit per-level masks and explicit bilinear matrices; no code is shared with the
library's feature modules or cores.
"""

import numpy as np


def _ln(x, w, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w


def btt_matrices(core1, core2, heads, rank, factors):
  """M[h] (d_in, d_out) from BTT cores; input index (c, d) row-major, output (b, a)."""
  a, b, c, d = factors
  w1 = core1.reshape(c, d, heads, b, rank)
  w2 = core2.reshape(heads, b, a, c, rank)
  m = np.einsum("cdhbs,hbacs->hcdba", w1, w2)
  return m.reshape(heads, c * d, b * a)


def rms_cap(w, d_in, d_out):
  kappa = np.sqrt(min(d_in, d_out)) / d_in
  return w / max(1.0, np.sqrt(np.mean(w ** 2)) / kappa)


def block_diag_full(kernel):
  """(p, m, n) block kernel -> (p*m, p*n) dense matrix."""
  p, m, n = kernel.shape
  out = np.zeros((p * m, p * n))
  for g in range(p):
    out[g * m:(g + 1) * m, g * n:(g + 1) * n] = kernel[g]
  return out


def level_features(feat, lv, x, heads):
  """Per-level (q, k) of shape (B, T, H, W) from raw weights."""
  b_, t, d = x.shape
  if lv.kind == "btt":
    btt = feat.btt
    a, b, c, dd = btt.factors
    w1 = np.asarray(btt.core1[...], np.float64)
    w2 = np.asarray(btt.core2[...], np.float64)
    if btt.cap:
      w1 = rms_cap(w1, dd, b * lv.rank)
      w2 = rms_cap(w2, c * lv.rank, a)
    m = btt_matrices(w1, w2, heads, lv.rank, btt.factors)  # (H, D, D)
    q = np.repeat(x[:, :, None, :], heads, axis=2)
    k = np.einsum("btd,hde->bthe", x, m)
    return q, k
  p, r = lv.blocks, lv.rank
  outs = []
  for w in (feat.wq, feat.wk):
    kern = np.asarray(w.kernel[...], np.float64)
    full = kern if kern.ndim == 2 else block_diag_full(kern)  # (D, p*H*r)
    y = (x @ full).reshape(b_, t, p, heads, r)
    outs.append(np.swapaxes(y, 2, 3).reshape(b_, t, heads, p * r))
  return outs[0], outs[1]


def level_mask(lv, t):
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  if lv.seq == "global":
    return np.ones((t, t), bool)
  if lv.seq == "block":
    return (i // lv.size) == (j // lv.size)
  return np.abs(i - j) <= lv.size


def scale_for(scale, w):
  return {"mup": 8.0 / w, "standard": 1.0 / np.sqrt(w), "inverse": 1.0 / w}[scale]


def _softmax_rows(s, valid):
  s = np.where(valid, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def attention_layer(module, x):
  """Recompute Attention(x) in float64 from the module's weights."""
  spec = module.spec
  x = np.asarray(x, np.float64)
  b_, t, _ = x.shape
  h = spec.num_heads
  qs, ks = [], []
  edges = np.cumsum([0] + list(spec.widths))
  if module.wqkv is not None:  # fused Q|K|V projection of plain low-rank levels
    kern = np.asarray(module.wqkv.kernel[...], np.float64)
    hq = h * spec.d_qk
    q = (x @ kern[:, :hq]).reshape(b_, t, h, spec.d_qk)
    k = (x @ kern[:, hq:2 * hq]).reshape(b_, t, h, spec.d_qk)
    wv = kern[:, 2 * hq:]
    qs = [q[..., a:e] for a, e in zip(edges[:-1], edges[1:])]
    ks = [k[..., a:e] for a, e in zip(edges[:-1], edges[1:])]
  else:
    wv = np.asarray(module.wv.kernel[...], np.float64)
    for feat, lv in zip(module.features, spec.levels):
      q, k = level_features(feat, lv, x, h)
      qs.append(q)
      ks.append(k)
  if module.q_norm is not None:
    wq = np.asarray(module.q_norm[...], np.float64)
    wk = np.asarray(module.k_norm[...], np.float64)
    if spec.norm == "joint":
      qn = _ln(np.concatenate(qs, -1), wq)
      kn = _ln(np.concatenate(ks, -1), wk)
      edges = np.cumsum([0] + [q.shape[-1] for q in qs])
      qs = [qn[..., a:e] for a, e in zip(edges[:-1], edges[1:])]
      ks = [kn[..., a:e] for a, e in zip(edges[:-1], edges[1:])]
    else:
      edges = np.cumsum([0] + [q.shape[-1] for q in qs])
      qs = [_ln(q, wq[a:e]) for q, a, e in zip(qs, edges[:-1], edges[1:])]
      ks = [_ln(k, wk[a:e]) for k, a, e in zip(ks, edges[:-1], edges[1:])]
  causal = np.tril(np.ones((t, t), bool)) if spec.causal else np.ones((t, t), bool)
  masks = [level_mask(lv, t) for lv in spec.levels]
  per_level = [np.einsum("bihw,bjhw->bhij", q, k) * scale_for(spec.scale, q.shape[-1]) * m
               for q, k, m in zip(qs, ks, masks)]
  wo = np.asarray(module.wo.kernel[...], np.float64)
  v = (x @ wv).reshape(b_, t, h, spec.d_head)
  if spec.combine == "sum":
    o = sum(np.einsum("bhij,bjhd->bihd", _softmax_rows(s, m & causal), v)
            for s, m in zip(per_level, masks))
  else:
    s = sum(per_level)
    if spec.divide == "block":
      s = s / np.sum(masks, axis=0)
    elif spec.divide == "levels":
      s = s / len(masks)
    o = np.einsum("bhij,bjhd->bihd", _softmax_rows(s, masks[0] & causal), v)
  return o.reshape(b_, t, -1) @ wo
