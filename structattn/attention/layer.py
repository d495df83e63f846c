"""The attention layer: one interface for every scoring function.

    y_BTD = Attention(spec)(x_BTD)

q/k features come from one feature module per level (features.py), are QK-LayerNormed
(weights shared across heads; jointly over the concatenated head width, or per level),
scaled per level (scale_for_width), and handed with V = x W_V to an attention core
chosen by `impl` (dispatch.py).  The output projection is zero-initialised (muP).

Sharding (structattn.sharding): under an active layout q, k, v and the core's output are
constrained to (batch, seq, heads, -): batch and heads are split over devices, T never, so
every core (dense, MLR blocks, sliding window) runs locally on its shard.  With heads split,
the fused Q|K|V kernel (stored as (D, [q heads | k heads | v heads])) is used through its
head-major view (D, H, 2 d_qk + d_head), so each shard projects only its own heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structattn.attention import dispatch
from structattn.attention.features import FEATURES
from structattn.attention.pattern import pattern_of
from structattn.attention.rope import apply_rope
from structattn.attention.spec import IMPLS, AttentionSpec
from structattn.linear import Dense
from structattn.sharding import constrain, local, shards


def layer_norm(x, weight, eps: float = 1e-6):
  """LayerNorm over the last axis in float32, no bias."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  return (x32 - mu) * jax.lax.rsqrt(var + eps) * weight


def per_level_layer_norm(x, weight, widths, eps: float = 1e-6):
  """LayerNorm of each segment of the last axis (segments of `widths`, in order), concatenated.

  A fused alternative (masked sibling reductions over the whole axis, no slices) was slower:
  docs/performance.md (benchmarks/qk_norm.py)."""
  widths = tuple(int(w) for w in widths)
  if sum(widths) != x.shape[-1]:
    raise ValueError(f"level widths {widths} sum to {sum(widths)}, not the feature width "
                     f"{x.shape[-1]}")
  edges = np.cumsum((0,) + widths)
  return jnp.concatenate([layer_norm(x[..., a:b], weight[a:b])
                          for a, b in zip(edges[:-1], edges[1:])], axis=-1)


class Attention(nnx.Module):
  """Multi-head attention whose score is any multi-level structured bilinear form."""

  def __init__(self, spec: AttentionSpec, *, rngs: nnx.Rngs, dtype=jnp.float32,
               zero_init_out: bool = True, rope: bool = False, rope_base: float = 10000.0):
    self.spec = spec
    self.rope, self.rope_base = rope, rope_base
    self.dtype = dtype
    self.pattern = pattern_of(spec)
    hv = spec.num_heads * spec.d_head
    if all(lv.kind == "lowrank" and lv.blocks == 1 for lv in spec.levels):
      # Plain low-rank levels (MHA, SWA, GSWA, sequence MLR): one fused Q|K|V projection;
      # a head's q/k is the concatenation of its levels' features (same maps and init).
      self.wqkv = Dense(spec.d_model, 2 * spec.num_heads * spec.d_qk + hv, rngs=rngs,
                        dtype=dtype, axes=("embed", "qkv"))
      self.features = self.wv = None
    else:
      self.wqkv = None
      feats = []
      for lv in spec.levels:
        cls = FEATURES[lv.kind]
        kwargs = {"rms_cap": spec.btt_rms_cap} if lv.kind == "btt" else {}
        feats.append(cls(lv, spec.d_model, spec.num_heads, rngs=rngs, dtype=dtype, **kwargs))
      self.features = nnx.List(feats)
      self.wv = Dense(spec.d_model, hv, rngs=rngs, dtype=dtype, axes=("embed", "heads"))
    if spec.qk_norm and spec.norm != "none":
      self.q_norm = nnx.Param(jnp.ones((spec.d_qk,), jnp.float32))
      self.k_norm = nnx.Param(jnp.ones((spec.d_qk,), jnp.float32))
    else:
      self.q_norm = self.k_norm = None
    self.wo = Dense(hv, spec.d_model, rngs=rngs, dtype=dtype, zero_init=zero_init_out,
                    axes=("heads", "embed"))

  # -- pieces ---------------------------------------------------------------------------

  def _normalise(self, f_BTHK, weight):
    if weight is None:
      return f_BTHK.astype(jnp.promote_types(f_BTHK.dtype, jnp.float32))
    w = weight[...]
    if self.spec.norm == "joint":
      return layer_norm(f_BTHK, w)
    return per_level_layer_norm(f_BTHK, w, self.spec.widths)

  def qkv(self, x_BTD, positions_BT=None):
    """Scaled, normalised per-head queries and keys (levels concatenated) and values.

    With rope, q and k are rotated per level segment by `positions_BT` (default 0..T-1)."""
    h, dqk, dh = self.spec.num_heads, self.spec.d_qk, self.spec.d_head
    if self.wqkv is not None and shards("heads") > 1:
      q_BTHK, k_BTHK, v = self._qkv_head_major(x_BTD)
    elif self.wqkv is not None:
      y = self.wqkv(x_BTD)
      lead = y.shape[:-1]
      q_BTHK = y[..., :h * dqk].reshape(*lead, h, dqk)
      k_BTHK = y[..., h * dqk:2 * h * dqk].reshape(*lead, h, dqk)
      v = y[..., 2 * h * dqk:]
    else:
      qs, ks = zip(*(f(x_BTD) for f in self.features))
      q_BTHK, k_BTHK = jnp.concatenate(qs, axis=-1), jnp.concatenate(ks, axis=-1)
      v = self.wv(x_BTD)
    q_BTHK = self._normalise(q_BTHK, self.q_norm)
    k_BTHK = self._normalise(k_BTHK, self.k_norm)
    if self.rope:
      if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
      q_BTHK = apply_rope(q_BTHK, positions_BT, self.spec.widths, self.rope_base)
      k_BTHK = apply_rope(k_BTHK, positions_BT, self.spec.widths, self.rope_base)
    scales = np.concatenate([np.full(w, s, np.float64)
                             for w, s in zip(self.spec.widths, self.spec.level_scales())])
    q_BTHK = (q_BTHK * jnp.asarray(scales, q_BTHK.dtype)).astype(self.dtype)
    k_BTHK = k_BTHK.astype(self.dtype)
    v_BTHV = v.reshape(*v.shape[:-1], h, dh)
    return q_BTHK, k_BTHK, v_BTHV

  def _qkv_head_major(self, x_BTD):
    """The fused projection through the kernel's head-major view, split over heads."""
    h, dqk, dh = self.spec.num_heads, self.spec.d_qk, self.spec.d_head
    w = self.wqkv.kernel[...]
    d = w.shape[0]
    w_DHK = jnp.concatenate([w[:, :h * dqk].reshape(d, h, dqk),
                             w[:, h * dqk:2 * h * dqk].reshape(d, h, dqk),
                             w[:, 2 * h * dqk:].reshape(d, h, dh)], axis=-1)
    w_DHK = constrain(w_DHK, (None, "heads", None))
    dt = self.wqkv.dtype
    y = jnp.einsum("...d,dhk->...hk", x_BTD.astype(dt), w_DHK.astype(dt))
    return y[..., :dqk], y[..., dqk:2 * dqk], y[..., 2 * dqk:].reshape(*y.shape[:-2], h * dh)

  def __call__(self, x_BTD, impl: str | None = None):
    impl = impl or self.spec.impl
    if impl not in IMPLS:
      raise ValueError(f"attention.impl={impl!r} is invalid: allowed values are {IMPLS}")
    names = ("batch", "seq", "heads", None)
    q, k, v = (constrain(a, names) for a in self.qkv(x_BTD))
    attend = local(functools.partial(dispatch.attention, pattern=self.pattern, impl=impl), names)
    out_BTHV = constrain(attend(q, k, v), names)
    return self.wo(out_BTHV.reshape(*out_BTHV.shape[:-2], -1))

  # -- KV-cache decoding (causal) -------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache for `decode`: keys (B, S, H, d_qk), values (B, S, H, d_head), index 0."""
    from structattn.attention import decode as kv
    s = self.spec
    return kv.init_cache(batch, max_len, s.num_heads, s.d_qk, s.d_head, dtype or self.dtype)

  def decode(self, x_BTD, cache: dict):
    """Process T new tokens (T=1: one step; T>1: prefill) against a KV cache.

    Returns (y_BTD, new_cache); y equals the full causal forward at these positions."""
    from structattn.attention import decode as kv
    kv.check_pattern(self.pattern)
    t = x_BTD.shape[1]
    positions = jnp.broadcast_to(cache["index"] + jnp.arange(t), x_BTD.shape[:2])
    q, k, v = self.qkv(x_BTD, positions)
    out_BTHV, cache = kv.cached_attention(q, k, v, cache, self.pattern)
    return self.wo(out_BTHV.reshape(*out_BTHV.shape[:-2], -1)), cache
