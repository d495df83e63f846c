"""A patch-based, channel-independent transformer forecaster (PatchTST-style), any attention.

    model = PatchForecaster(seq_len=512, horizon=96, d_model=16, num_layers=3, d_mlp=128,
                            attention={"variant": "mlr", "num_heads": 4, "causal": False,
                                       "mlr_ranks": (2, 1, 1)}, rngs=nnx.Rngs(0))
    y_BHC = model(x_BLC)                         # eval
    y_BHC = model(x_BLC, key=k, dropout=0.3)     # training, dropout on

Every channel of every window is its own series (channel independence): optional RevIN-style
instance normalisation (mean / std over the look-back, undone on the forecast), the series
padded at the end with `stride` copies of its last value and cut into N = (L - P)/S + 2
patches of length P with stride S (PatchTST's padding_patch='end'; L=512, P=16, S=8 gives 64),
a patch embedding Linear(P -> D) with bias plus learned positions, `num_layers` blocks
(`models.gpt.Block`: QK-normable pluggable attention and a GELU MLP; pre- or post-LayerNorm),
and a flatten head Linear(N*D -> H). Attention is bidirectional: the `attention` config
section must have causal=False (non-causal MLR scores pairs in the same block on either side
of the diagonal; a sliding window is the symmetric band |i - j| <= w in patches). Float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from structattn import flops as flops_lib
from structattn.attention import AttentionSpec, from_config
from structattn.linear import Dense
from structattn.models.gpt import Block

REVIN_EPS = 1e-5


def num_patches(seq_len: int, patch_len: int, stride: int) -> int:
  """Patches of a look-back padded at the end by `stride` values."""
  if patch_len < 1 or stride < 1:
    raise ValueError(f"model.patch_len={patch_len} and model.stride={stride} must be positive")
  if patch_len > seq_len + stride:
    raise ValueError(f"model.patch_len={patch_len} is invalid: must be at most data.seq_len + "
                     f"model.stride = {seq_len + stride}")
  return (seq_len + stride - patch_len) // stride + 1


def forecast_specs(attention: Mapping[str, Any], d_model: int, num_layers: int, n: int,
                   attention_pattern: str = "") -> tuple[AttentionSpec, ...]:
  """One validated non-causal AttentionSpec per layer over N patches (pattern cycled)."""
  attention = dict(attention)
  if attention.get("causal", True):
    raise ValueError("attention.causal=True is invalid for forecasting: the encoder sees the "
                     "whole look-back; allowed values are (False,)")
  pattern = attention_pattern or attention.get("variant", "mha")
  variants = [v.strip() for v in str(pattern).split("|") if v.strip()]
  return tuple(from_config({**attention, "variant": variants[i % len(variants)]},
                           d_model=d_model, seq_len=n) for i in range(num_layers))


def dropout(x, rate: float, key):
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class EncoderBlock(Block):
  """`models.gpt.Block` with residual-branch dropout and a post-norm option:
  pre:  x + drop(attn(LN1 x)), then + drop(mlp(LN2 x));
  post: LN1(x + drop(attn x)), then LN2(x + drop(mlp x)) (PatchTST's order, LN for BN)."""

  def __init__(self, spec: AttentionSpec, d_mlp: int, *, rngs: nnx.Rngs, pre_norm: bool):
    super().__init__(spec, d_mlp, rngs=rngs, dtype=jnp.float32)
    self.pre_norm = pre_norm

  def __call__(self, x_BTD, key=None, rate: float = 0.0):
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    if self.pre_norm:
      x_BTD = x_BTD + dropout(self.attn(self.ln1(x_BTD, self.dtype)), rate, k1)
      return x_BTD + dropout(self.mlp(self.ln2(x_BTD, self.dtype)), rate, k2)
    x_BTD = self.ln1(x_BTD + dropout(self.attn(x_BTD), rate, k1), self.dtype)
    return self.ln2(x_BTD + dropout(self.mlp(x_BTD), rate, k2), self.dtype)


class PatchForecaster(nnx.Module):
  """x_BLC (look-back) -> y_BHC (forecast); see the module docstring."""

  def __init__(self, seq_len: int, horizon: int, d_model: int, num_layers: int, d_mlp: int,
               attention: Mapping[str, Any], *, rngs: nnx.Rngs, patch_len: int = 16,
               stride: int = 8, revin: bool = True, pre_norm: bool = False,
               attention_pattern: str = ""):
    self.seq_len, self.horizon, self.d_model = seq_len, horizon, d_model
    self.patch_len, self.stride, self.revin = patch_len, stride, revin
    self.n = num_patches(seq_len, patch_len, stride)
    self.specs = forecast_specs(attention, d_model, num_layers, self.n, attention_pattern)
    self.embed = Dense(patch_len, d_model, rngs=rngs)
    self.embed_bias = nnx.Param(jnp.zeros((d_model,), jnp.float32))
    self.pos = nnx.Param(jax.random.uniform(rngs.params(), (self.n, d_model), jnp.float32,
                                            -0.02, 0.02))
    self.blocks = nnx.List([EncoderBlock(s, d_mlp, rngs=rngs, pre_norm=pre_norm)
                            for s in self.specs])
    self.head = Dense(self.n * d_model, horizon, rngs=rngs)
    self.head_bias = nnx.Param(jnp.zeros((horizon,), jnp.float32))

  def patches(self, x_SL):
    """(S, N, P) patches of series (S, L), padded at the end with the last value."""
    x_SL = jnp.concatenate([x_SL, jnp.repeat(x_SL[:, -1:], self.stride, axis=1)], axis=1)
    idx_NP = jnp.arange(self.n)[:, None] * self.stride + jnp.arange(self.patch_len)[None]
    return x_SL[:, idx_NP]

  def __call__(self, x_BLC, key=None, dropout_rate: float = 0.0):
    b, l, c = x_BLC.shape
    if l != self.seq_len:
      raise ValueError(f"look-back of {l} steps, the model was built for data.seq_len="
                       f"{self.seq_len}")
    x_SL = jnp.swapaxes(x_BLC.astype(jnp.float32), 1, 2).reshape(b * c, l)
    if self.revin:
      mu_S1 = x_SL.mean(axis=1, keepdims=True)
      sd_S1 = jnp.sqrt(x_SL.var(axis=1, keepdims=True) + REVIN_EPS)
      x_SL = (x_SL - mu_S1) / sd_S1
    keys = [None] * (len(self.blocks) + 1)
    if key is not None:
      keys = list(jax.random.split(key, len(self.blocks) + 1))
    h_SND = self.embed(self.patches(x_SL)) + self.embed_bias[...] + self.pos[...][None]
    h_SND = dropout(h_SND, dropout_rate, keys[0])
    for block, k in zip(self.blocks, keys[1:]):
      h_SND = block(h_SND, k, dropout_rate)
    y_SH = self.head(h_SND.reshape(b * c, -1)) + self.head_bias[...]
    if self.revin:
      y_SH = y_SH * sd_S1 + mu_S1
    return jnp.swapaxes(y_SH.reshape(b, c, self.horizon), 1, 2)

  # -- accounting ------------------------------------------------------------------------

  def param_counts(self) -> dict[str, int]:
    def size(tree):
      return sum(int(x.size) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))
    emb = size(self.embed) + int(self.embed_bias.size) + int(self.pos.size)
    head = size(self.head) + int(self.head_bias.size)
    enc = size(self.blocks)
    return {"total": emb + head + enc, "embedding": emb, "head": head, "encoder": enc,
            "non_embedding": head + enc}

  def macs_per_series(self) -> dict[str, float]:
    """Forward MACs for one series (one channel of one window).

    paper: encoder only (attention in the paper convention at T=N patches + MLPs), patch
    embedding and head excluded as embeddings/LM head are; true_fwd: attention with the
    exact pair counts, MLPs, patch embedding and head."""
    n, d = self.n, self.d_model
    mlp = n * 2 * d * self.blocks[0].mlp.up.d_out
    paper = sum(flops_lib.attention_macs(s, n, "paper")["total"] + mlp for s in self.specs)
    true = sum(flops_lib.attention_macs(s, n, "true_fwd")["total"] + mlp for s in self.specs)
    true += n * self.patch_len * d + n * d * self.horizon
    return {"paper": float(paper), "true_fwd": float(true)}
