"""KV-cache decoding for every causal scoring function.

    cache = init_cache(batch, max_len, num_heads, d_qk, d_head, dtype)
    out_BTHV, cache = cached_attention(q_BTHK, k_BTHK, v_BTHV, cache, pattern)

The cache is a plain pytree {'k': (B, S, H, K), 'v': (B, S, H, V), 'index': int32 scalar}
holding the keys/values of positions [0, index).  A call with T new tokens writes them at
[index, index + T) and scores the T queries (absolute positions index .. index + T - 1)
against every cached position with the pattern's structure built from absolute-position
iotas: global levels cover every pair, block levels pairs with floor(i/b) == floor(j/b),
window levels the band i - w <= j <= i; causality j <= i also hides the unfilled tail.
T = 1 is one decoding step, T > 1 a (chunked) prefill; `index` may be traced, so one
compiled program serves every step of a given T.  Cost O(T * S * K) per call.

Block sizes are absolute token counts, so decoding past the training length keeps fixed
blocks and global levels global.  Writing past max_len is not checked under jit
(`dynamic_update_slice` clamps the start); size the cache for the longest sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from structattn.attention.core import NEG
from structattn.attention.pattern import Pattern


def init_cache(batch: int, max_len: int, num_heads: int, d_qk: int, d_head: int,
               dtype=jnp.float32) -> dict:
  """Empty cache: zero keys (B, S, H, K), values (B, S, H, V) and index 0."""
  return {
      "k": jnp.zeros((batch, max_len, num_heads, d_qk), dtype),
      "v": jnp.zeros((batch, max_len, num_heads, d_head), dtype),
      "index": jnp.zeros((), jnp.int32),
  }


def check_pattern(pattern: Pattern) -> None:
  if not pattern.causal:
    raise ValueError("KV-cache decoding needs a causal pattern (attention.causal=True); "
                     "non-causal attention sees future tokens that a cache does not hold")


def update_cache(cache: dict, k_BTHK, v_BTHV) -> dict:
  """Write T new keys/values at positions [index, index + T); advance the index."""
  index = cache["index"]
  start = (jnp.zeros((), jnp.int32), index, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  k = jax.lax.dynamic_update_slice(cache["k"], k_BTHK.astype(cache["k"].dtype), start)
  v = jax.lax.dynamic_update_slice(cache["v"], v_BTHV.astype(cache["v"].dtype), start)
  return {"k": k, "v": v, "index": index + k_BTHK.shape[1]}


def level_masks_at(pattern: Pattern, i_T1, j_1S):
  """(L, T, S) boolean: level l covers (i, j) at absolute positions (causality not applied)."""
  out = []
  for seq, size in zip(pattern.seqs, pattern.sizes):
    if seq == "global":
      out.append(jnp.broadcast_to(True, (i_T1.shape[0], j_1S.shape[1])))
    elif seq == "block":
      out.append((i_T1 // size) == (j_1S // size))
    else:  # window: the causal band (j > i is removed by the causal mask)
      out.append(i_T1 - j_1S <= size)
  return jnp.stack(out)


def level_scores(q_BTHK, k_BSHK, widths):
  """(L, B, H, T, S) per-level products <q_i^(l), k_j^(l)> in the accumulation dtype."""
  acc = jnp.promote_types(q_BTHK.dtype, jnp.float32)
  parts, a = [], 0
  for w in widths:
    parts.append(jnp.einsum("bthd,bshd->bhts", q_BTHK[..., a:a + w], k_BSHK[..., a:a + w],
                            preferred_element_type=acc))
    a += w
  return jnp.stack(parts)


def masked_softmax_out(s_BHTS, valid_TS, v_BSHV):
  """softmax over valid keys, then the value mix: (B, T, H, V) in the accumulation dtype."""
  s = jnp.where(valid_TS, s_BHTS, NEG)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(valid_TS, p, 0.0)
  return jnp.einsum("bhts,bshv->bthv", p, v_BSHV.astype(p.dtype))


def structured_out(parts_LBHTS, masks_LTS, causal_TS, v_BSHV, pattern: Pattern):
  """Attention output from per-level scores: renorm (one softmax, divide) or sum."""
  if pattern.combine == "sum":
    return sum(masked_softmax_out(s, m & causal_TS, v_BSHV)
               for s, m in zip(parts_LBHTS, masks_LTS))
  m_LTS = masks_LTS[:, None, None]
  s = jnp.sum(jnp.where(m_LTS, parts_LBHTS, 0.0), axis=0)
  if pattern.divide == "block":
    s = s / jnp.maximum(jnp.sum(masks_LTS, axis=0), 1).astype(s.dtype)
  elif pattern.divide == "levels":
    s = s / len(pattern.widths)
  return masked_softmax_out(s, jnp.any(masks_LTS, axis=0) & causal_TS, v_BSHV)


def cached_attention(q_BTHK, k_BTHK, v_BTHV, cache: dict, pattern: Pattern):
  """Attention of T new tokens against the cache; returns (out_BTHV, new_cache)."""
  check_pattern(pattern)
  t, max_len = q_BTHK.shape[1], cache["k"].shape[1]
  if t > max_len:
    raise ValueError(f"{t} new tokens do not fit a cache of max_len={max_len}")
  new_cache = update_cache(cache, k_BTHK, v_BTHV)
  i_T1 = cache["index"] + jnp.arange(t, dtype=jnp.int32)[:, None]
  j_1S = jnp.arange(max_len, dtype=jnp.int32)[None, :]
  masks_LTS = level_masks_at(pattern, i_T1, j_1S)
  parts = level_scores(q_BTHK, new_cache["k"], pattern.widths)
  out = structured_out(parts, masks_LTS, j_1S <= i_T1, new_cache["v"], pattern)
  return out.astype(v_BTHV.dtype), new_cache
