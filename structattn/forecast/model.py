"""A patch-based, channel-independent transformer forecaster (PatchTST-style), any attention.

    model = PatchForecaster(seq_len=512, horizon=96, d_model=16, num_layers=3, d_mlp=128,
                            attention={"variant": "mlr", "num_heads": 4, "causal": False,
                                       "mlr_ranks": (2, 1, 1)}, rngs=nnx.Rngs(0))
    y_BFC = model(x_BXC)                                   # eval
    y_BFC = model(x_BXC, key=k, dropout_rate=0.3)          # training, dropout on

Shape letters (the package legend): B windows, X look-back steps, F forecast steps (the
horizon), C channels, U series (B*C: one per channel of each window), T patches, I the
values of one patch (`patch_len`), D model width, H heads, K query/key width per head,
V value width per head, L levels.

Every channel of every window is its own series (channel independence): optional RevIN-style
instance normalisation without affine parameters (mean and sqrt(var + 1e-5) over the
look-back, undone on the forecast), the series padded at the end with `stride` copies of its
last value and cut into T = (seq_len - patch_len)/stride + 2 patches of `patch_len` values
(PatchTST's padding_patch='end'; seq_len=512, patch_len=16, stride=8 gives 64), a patch
embedding Linear(I -> D) with bias plus learned positions (uniform(-0.02, 0.02) init,
PatchTST's pe='zeros', learn_pe=True), dropout, `num_layers` encoder layers and a flatten
head Linear(T*D -> F) with bias.
Attention is bidirectional: the `attention` config section must have causal=False
(non-causal MLR scores pairs in the same block on either side of the diagonal; a sliding
window is the symmetric band |i - j| <= w in patches). Float32.

Two encoders (`encoder`):
  * 'gpt': `models.gpt.Block` layers (the attention package's layer and cores, QK-normable,
    no biases, muP-style init) with LayerNorm, pre- or post-norm, dropout on the residual
    branches.
  * 'patchtst': PatchTST's TSTEncoderLayer: Q/K/V/O and MLP Linears with biases and
    PyTorch's default init (weights and biases uniform(+-1/sqrt(fan_in)), also for the
    patch embedding and head); the attention projection's output dropout and the residual
    dropout in series, dropout after the MLP's GELU (exact erf) and on its residual branch;
    `norm` 'batch' (BatchNorm over D with statistics over the U*T patch rows, PyTorch's
    BatchNorm1d(d_model) on (B*C, D, T): eps 1e-5, running statistics with momentum 0.1 in
    eval mode) or 'layer'; post-norm x = norm(x + drop(attn x)), x = norm(x + drop(mlp x)),
    or pre-norm; and `residual_attention` (PatchTST's res_attention=True): each layer's
    pre-softmax scores, previous layers' included, are added to the next layer's. Scores are
    built densely (T x T per head, T = 64) from the attention spec's pattern: the sum over
    levels of the level-scaled products q^(l) . k^(l) on the pairs each level covers (MHA:
    one global level, scale K^-0.5 as PatchTST's lsa=False; SWA: the band; MLR: nested
    blocks), then softmax over the pairs the coarsest level covers.

BatchNorm statistics: `model(x, key, rate, train=True)` normalises with the batch's
statistics and updates the running ones (a module state outside the parameters, `nnx.
BatchStat`); eval mode (`train=False`, the default without a key) uses the running ones.
`set_batch_stats(x, key, rate)` replaces the running statistics by one train-mode pass's
batch statistics over `x` (what an evaluation uses when the training loop does not carry the
module state; see `structattn.forecast.task`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structattn import flops as flops_lib
from structattn.attention import AttentionSpec, from_config, pattern_of
from structattn.attention.core import NEG, level_masks
from structattn.linear import Dense
from structattn.models.gpt import Block

REVIN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # flax convention (running = m * running + (1 - m) * batch): PyTorch's 0.1
ENCODERS = ("gpt", "patchtst")
NORMS = ("layer", "batch")


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


def _split(key, n: int):
  return [None] * n if key is None else list(jax.random.split(key, n))


class EncoderBlock(Block):
  """`models.gpt.Block` with residual-branch dropout and a post-norm option:
  pre:  x + drop(attn(LN1 x)), then + drop(mlp(LN2 x));
  post: LN1(x + drop(attn x)), then LN2(x + drop(mlp x))."""

  def __init__(self, spec: AttentionSpec, d_mlp: int, *, rngs: nnx.Rngs, pre_norm: bool):
    super().__init__(spec, d_mlp, rngs=rngs, dtype=jnp.float32)
    self.pre_norm = pre_norm

  def __call__(self, x_BTD, key=None, rate: float = 0.0):
    k1, k2 = _split(key, 2)
    if self.pre_norm:
      x_BTD = x_BTD + dropout(self.attn(self.ln1(x_BTD, self.dtype)), rate, k1)
      return x_BTD + dropout(self.mlp(self.ln2(x_BTD, self.dtype)), rate, k2)
    x_BTD = self.ln1(x_BTD + dropout(self.attn(x_BTD), rate, k1), self.dtype)
    return self.ln2(x_BTD + dropout(self.mlp(x_BTD), rate, k2), self.dtype)


# ------------------------------------------------------------------------- PatchTST layers


class TorchLinear(nnx.Module):
  """y = x W + b with PyTorch nn.Linear's default init: W, b ~ uniform(+-1/sqrt(d_in))."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(d_in)
    self.d_in, self.d_out = d_in, d_out
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (d_in, d_out), jnp.float32,
                                               -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (d_out,), jnp.float32,
                                             -bound, bound))

  def __call__(self, x):
    return jnp.einsum("...i,io->...o", x.astype(jnp.float32), self.kernel[...]) + self.bias[...]


def make_norm(kind: str, d: int, rngs: nnx.Rngs):
  if kind == "batch":
    return nnx.BatchNorm(d, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
  if kind == "layer":
    return nnx.LayerNorm(d, epsilon=BN_EPS, rngs=rngs)
  raise ValueError(f"model.norm={kind!r} is invalid: allowed values are {NORMS}")


def apply_norm(norm, x_UTD, train: bool):
  if isinstance(norm, nnx.BatchNorm):
    return norm(x_UTD, use_running_average=not train)
  return norm(x_UTD)


def check_dense_spec(spec: AttentionSpec) -> None:
  """The 'patchtst' encoder scores densely: sequence-level low-rank levels, one softmax."""
  bad = [lv for lv in spec.levels if lv.kind != "lowrank" or lv.blocks != 1]
  if bad or spec.combine == "sum" and len(spec.levels) > 1:
    raise ValueError(
        f"attention.variant={spec.variant!r} is invalid with model.encoder='patchtst': its "
        f"dense scores need sequence-level low-rank levels and one softmax; allowed variants "
        f"are mha, swa, gswa (gswa_combine='renorm') and mlr")


class PatchTSTLayer(nnx.Module):
  """PatchTST's TSTEncoderLayer over any sequence-level score pattern (module docstring)."""

  def __init__(self, spec: AttentionSpec, d_mlp: int, *, rngs: nnx.Rngs, norm: str,
               pre_norm: bool):
    check_dense_spec(spec)
    d, h = spec.d_model, spec.num_heads
    self.spec, self.pattern, self.pre_norm = spec, pattern_of(spec), pre_norm
    self.d_mlp = d_mlp
    self.wq = TorchLinear(d, h * spec.d_qk, rngs=rngs)
    self.wk = TorchLinear(d, h * spec.d_qk, rngs=rngs)
    self.wv = TorchLinear(d, h * spec.d_head, rngs=rngs)
    self.wo = TorchLinear(h * spec.d_head, d, rngs=rngs)
    self.ff1 = TorchLinear(d, d_mlp, rngs=rngs)
    self.ff2 = TorchLinear(d_mlp, d, rngs=rngs)
    self.norm_attn = make_norm(norm, d, rngs)
    self.norm_ffn = make_norm(norm, d, rngs)
    scales = np.concatenate([np.full(w, sc) for w, sc in zip(spec.widths, spec.level_scales())])
    self.level_scales = tuple(float(x) for x in scales)

  def scores(self, x_UTD):
    """Pre-softmax scores s_UHTT (zero on pairs no level covers) and the valid pairs."""
    sp = self.spec
    lead = x_UTD.shape[:-1]
    q_UTHK = self.wq(x_UTD).reshape(*lead, sp.num_heads, sp.d_qk)
    k_UTHK = self.wk(x_UTD).reshape(*lead, sp.num_heads, sp.d_qk)
    q_UTHK = q_UTHK * jnp.asarray(self.level_scales, jnp.float32)
    n = x_UTD.shape[-2]
    masks_LTT = level_masks(self.pattern, n)
    edges = (0,) + self.pattern.prefix
    s_UHTT = 0.0
    for l in range(len(sp.widths)):
      part = jnp.einsum("snhk,smhk->shnm", q_UTHK[..., edges[l]:edges[l + 1]],
                        k_UTHK[..., edges[l]:edges[l + 1]])
      s_UHTT = s_UHTT + jnp.where(masks_LTT[l], part, 0.0)
    if self.pattern.divide != "none":
      covered = masks_LTT.sum(0).astype(jnp.float32)
      div = covered if self.pattern.divide == "block" else float(len(sp.widths))
      s_UHTT = s_UHTT / jnp.maximum(div, 1.0)
    return s_UHTT, masks_LTT[0]

  def attention(self, x_UTD, prev_UHTT=None):
    """(y_UTD before the output projection's dropout, scores to hand to the next layer)."""
    sp = self.spec
    s_UHTT, valid_TT = self.scores(x_UTD)
    if prev_UHTT is not None:
      s_UHTT = s_UHTT + prev_UHTT
    p_UHTT = jax.nn.softmax(jnp.where(valid_TT, s_UHTT, NEG), axis=-1)
    v_UTHV = self.wv(x_UTD).reshape(*x_UTD.shape[:-1], sp.num_heads, sp.d_head)
    o_UTHV = jnp.einsum("shnm,smhv->snhv", p_UHTT, v_UTHV)
    return self.wo(o_UTHV.reshape(*x_UTD.shape[:-1], -1)), s_UHTT

  def __call__(self, x_UTD, prev_UHTT=None, key=None, rate: float = 0.0, train: bool = False):
    """(x_UTD, this layer's scores) for PatchTST's order of dropouts and norms."""
    k_proj, k_attn, k_hidden, k_ffn = _split(key, 4)
    src = apply_norm(self.norm_attn, x_UTD, train) if self.pre_norm else x_UTD
    y, s_UHTT = self.attention(src, prev_UHTT)
    y = dropout(dropout(y, rate, k_proj), rate, k_attn)  # to_out's Dropout, then dropout_attn
    x_UTD = src + y
    if not self.pre_norm:
      x_UTD = apply_norm(self.norm_attn, x_UTD, train)
    src = apply_norm(self.norm_ffn, x_UTD, train) if self.pre_norm else x_UTD
    hid = dropout(jax.nn.gelu(self.ff1(src), approximate=False), rate, k_hidden)
    x_UTD = src + dropout(self.ff2(hid), rate, k_ffn)
    if not self.pre_norm:
      x_UTD = apply_norm(self.norm_ffn, x_UTD, train)
    return x_UTD, s_UHTT


# ----------------------------------------------------------------------------- the model


class PatchForecaster(nnx.Module):
  """x_BXC (look-back) -> y_BFC (forecast); see the module docstring."""

  def __init__(self, seq_len: int, horizon: int, d_model: int, num_layers: int, d_mlp: int,
               attention: Mapping[str, Any], *, rngs: nnx.Rngs, patch_len: int = 16,
               stride: int = 8, revin: bool = True, pre_norm: bool = False,
               attention_pattern: str = "", encoder: str = "gpt", norm: str = "layer",
               residual_attention: bool = False):
    if encoder not in ENCODERS:
      raise ValueError(f"model.encoder={encoder!r} is invalid: allowed values are {ENCODERS}")
    if norm not in NORMS:
      raise ValueError(f"model.norm={norm!r} is invalid: allowed values are {NORMS}")
    if encoder == "gpt" and (norm != "layer" or residual_attention):
      raise ValueError(f"model.norm={norm!r} with model.residual_attention="
                       f"{residual_attention} is invalid with model.encoder='gpt' (LayerNorm "
                       f"only, no residual attention); use model.encoder='patchtst'")
    self.seq_len, self.horizon, self.d_model = seq_len, horizon, d_model
    self.patch_len, self.stride, self.revin = patch_len, stride, revin
    self.encoder, self.norm, self.residual_attention = encoder, norm, residual_attention
    self.d_mlp = d_mlp
    self.n = num_patches(seq_len, patch_len, stride)
    self.specs = forecast_specs(attention, d_model, num_layers, self.n, attention_pattern)
    if encoder == "gpt":
      self.embed = Dense(patch_len, d_model, rngs=rngs)
      self.embed_bias = nnx.Param(jnp.zeros((d_model,), jnp.float32))
    else:
      self.embed = TorchLinear(patch_len, d_model, rngs=rngs)
      self.embed_bias = None
    self.pos = nnx.Param(jax.random.uniform(rngs.params(), (self.n, d_model), jnp.float32,
                                            -0.02, 0.02))
    if encoder == "gpt":
      self.blocks = nnx.List([EncoderBlock(s, d_mlp, rngs=rngs, pre_norm=pre_norm)
                              for s in self.specs])
      self.head = Dense(self.n * d_model, horizon, rngs=rngs)
      self.head_bias = nnx.Param(jnp.zeros((horizon,), jnp.float32))
    else:
      self.blocks = nnx.List([PatchTSTLayer(s, d_mlp, rngs=rngs, norm=norm, pre_norm=pre_norm)
                              for s in self.specs])
      self.head = TorchLinear(self.n * d_model, horizon, rngs=rngs)
      self.head_bias = None

  @property
  def has_batch_norm(self) -> bool:
    return self.encoder == "patchtst" and self.norm == "batch"

  def patches(self, x_UX):
    """(U, T, I) patches of series (U, X), padded at the end with the last value."""
    x_UX = jnp.concatenate([x_UX, jnp.repeat(x_UX[:, -1:], self.stride, axis=1)], axis=1)
    idx_TI = jnp.arange(self.n)[:, None] * self.stride + jnp.arange(self.patch_len)[None]
    return x_UX[:, idx_TI]

  def __call__(self, x_BXC, key=None, dropout_rate: float = 0.0, train: bool | None = None):
    """Forecast y_BFC. Dropout when `key` is given; `train` (default: key is not None)
    selects BatchNorm's batch statistics (and their running update) over the running ones."""
    b, l, c = x_BXC.shape
    if l != self.seq_len:
      raise ValueError(f"look-back of {l} steps, the model was built for data.seq_len="
                       f"{self.seq_len}")
    train = key is not None if train is None else bool(train)
    x_UX = jnp.swapaxes(x_BXC.astype(jnp.float32), 1, 2).reshape(b * c, l)
    if self.revin:
      mu_U1 = x_UX.mean(axis=1, keepdims=True)
      sd_U1 = jnp.sqrt(x_UX.var(axis=1, keepdims=True) + REVIN_EPS)
      x_UX = (x_UX - mu_U1) / sd_U1
    keys = _split(key, len(self.blocks) + 1)
    h_UTD = self.embed(self.patches(x_UX))
    if self.embed_bias is not None:
      h_UTD = h_UTD + self.embed_bias[...]
    h_UTD = dropout(h_UTD + self.pos[...][None], dropout_rate, keys[0])
    if self.encoder == "gpt":
      for block, k in zip(self.blocks, keys[1:]):
        h_UTD = block(h_UTD, k, dropout_rate)
      y_UF = self.head(h_UTD.reshape(b * c, -1)) + self.head_bias[...]
    else:
      prev = None
      for block, k in zip(self.blocks, keys[1:]):
        h_UTD, s_UHTT = block(h_UTD, prev, k, dropout_rate, train)
        prev = s_UHTT if self.residual_attention else None
      # PatchTST's Flatten_Head flattens (D, T), D-major
      y_UF = self.head(jnp.swapaxes(h_UTD, 1, 2).reshape(b * c, -1))
    if self.revin:
      y_UF = y_UF * sd_U1 + mu_U1
    return jnp.swapaxes(y_UF.reshape(b, c, self.horizon), 1, 2)

  def batch_norms(self) -> list[nnx.BatchNorm]:
    if not self.has_batch_norm:
      return []
    return [n for blk in self.blocks for n in (blk.norm_attn, blk.norm_ffn)]

  def set_batch_stats(self, x_BXC, key=None, dropout_rate: float = 0.0) -> None:
    """Running BatchNorm statistics := the batch statistics of one train-mode pass over
    x_BXC (dropout with `key`, as the passes that accumulate PyTorch's running statistics);
    the parameters are untouched. No-op without BatchNorm."""
    norms = self.batch_norms()
    if not norms:
      return
    saved = [n.momentum for n in norms]
    for n in norms:
      n.momentum = 0.0
    try:
      self(x_BXC, key, dropout_rate, train=True)
    finally:
      for n, m in zip(norms, saved):
        n.momentum = m

  # -- accounting ------------------------------------------------------------------------

  def param_counts(self) -> dict[str, int]:
    def size(tree):
      return sum(int(x.size) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))
    emb = size(self.embed) + int(self.pos.size)
    head = size(self.head)
    if self.embed_bias is not None:
      emb += int(self.embed_bias.size)
      head += int(self.head_bias.size)
    enc = size(self.blocks)
    return {"total": emb + head + enc, "embedding": emb, "head": head, "encoder": enc,
            "non_embedding": head + enc}

  def macs_per_series(self) -> dict[str, float]:
    """Forward MACs for one series (one channel of one window).

    paper: encoder only (attention in the paper convention at T=N patches + MLPs), patch
    embedding and head excluded as embeddings/LM head are; true_fwd: attention with the
    exact pair counts, MLPs, patch embedding and head. (The 'patchtst' encoder scores every
    pair densely; its count follows the pattern, as for the structured cores.)"""
    n, d = self.n, self.d_model
    mlp = n * 2 * d * self.d_mlp
    paper = sum(flops_lib.attention_macs(s, n, "paper")["total"] + mlp for s in self.specs)
    true = sum(flops_lib.attention_macs(s, n, "true_fwd")["total"] + mlp for s in self.specs)
    true += n * self.patch_len * d + n * d * self.horizon
    return {"paper": float(paper), "true_fwd": float(true)}
