"""A pre-LN GPT whose attention layers take any scoring function, per layer.

    logits_BTO = GPT(cfg)(tokens_BT)

Per-layer patterns: `model.attention_pattern='mha|swa|swa'` cycles variants over layers
(each variant takes its options from the `attention` config section).  Positions: learned
absolute embeddings (the paper), rotary (`pos='rope'`, per level segment) or none.  Head: untied (zero init, muP) or tied
to the token embedding.  Compute dtype `model.dtype` (bf16 on GPU), parameters float32; the
residual stream is float32 unless `model.residual_dtype` says otherwise ('bfloat16' or
'compute': the blocks' inputs and the residual adds in that dtype, LayerNorm statistics still
float32).

Sharding (structattn.sharding): parameters carry logical axis names (embed, mlp, vocab, heads)
and activations are constrained to (batch, seq, act_embed | mlp | vocab) when a layout is
active; without one the model runs exactly as unsharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from structattn.attention import Attention, AttentionSpec, from_config
from structattn.attention.layer import layer_norm
from structattn.linear import Dense
from structattn.sharding import constrain, param

POSITIONS = ("learned", "rope", "none")
POS_INITS = ("normal", "sinusoidal")


def sinusoidal_table(seq_len: int, d: int, std: float = 0.02):
  """The Transformer's sin/cos position table (T, D), scaled to RMS `std`: frequencies
  10000^(-2i/D), sines in the even columns, cosines in the odd.  As the initial value of
  learned positions it puts relative offsets within a linear map's reach (sin/cos pairs rotate
  with the offset), so attention can find nearby characters from the first steps."""
  pos_T1 = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (D/2,)
  angle = pos_T1 * freq[None]  # (T, D/2)
  table_TD = jnp.zeros((seq_len, d), jnp.float32)
  table_TD = table_TD.at[:, 0::2].set(jnp.sin(angle))
  table_TD = table_TD.at[:, 1::2].set(jnp.cos(angle[:, : d // 2]))
  return table_TD * (std / jnp.sqrt(jnp.mean(table_TD ** 2)))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name: str):
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} is invalid: allowed values are ('auto', "
                     f"{', '.join(repr(k) for k in DTYPES)})")
  return DTYPES[name]


RESIDUAL_DTYPES = ("", "compute", *DTYPES)


def residual_dtype(name: str, compute):
  """The residual stream's dtype: '' (default) that of the embeddings (float32), 'compute' the
  compute dtype, or a dtype name.  LayerNorm statistics are float32 whatever it is."""
  if name not in RESIDUAL_DTYPES:
    raise ValueError(f"model.residual_dtype={name!r} is invalid: allowed values are "
                     f"{RESIDUAL_DTYPES}")
  return None if not name else compute if name == "compute" else DTYPES[name]


def layer_specs(model_cfg: Any, attn_cfg: Any) -> tuple[AttentionSpec, ...]:
  """One validated AttentionSpec per layer (pattern cycled over layers)."""
  pattern = model_cfg.get("attention_pattern", "") or attn_cfg.get("variant", "mha")
  variants = [v.strip() for v in str(pattern).split("|") if v.strip()]
  specs = []
  for i in range(model_cfg.num_layers):
    cfg = dict(attn_cfg.to_dict() if hasattr(attn_cfg, "to_dict") else attn_cfg)
    cfg["variant"] = variants[i % len(variants)]
    specs.append(from_config(cfg, d_model=model_cfg.d_model, seq_len=model_cfg.seq_len))
  return tuple(specs)


class LayerNorm(nnx.Module):
  def __init__(self, d: int):
    self.weight = nnx.Param(jnp.ones((d,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))

  def __call__(self, x, dtype):
    return (layer_norm(x, self.weight[...]) + self.bias[...]).astype(dtype)


class MLP(nnx.Module):
  def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs, dtype):
    self.up = Dense(d, hidden, rngs=rngs, dtype=dtype, axes=("embed", "mlp"))
    self.down = Dense(hidden, d, rngs=rngs, dtype=dtype, zero_init=True, axes=("mlp", "embed"))

  def __call__(self, x):
    h = constrain(self.up(x), ("batch", "seq", "mlp"))
    return self.down(jax.nn.gelu(h))


class Block(nnx.Module):
  def __init__(self, spec: AttentionSpec, d_mlp: int, *, rngs: nnx.Rngs, dtype,
               rope: bool = False):
    d = spec.d_model
    self.dtype = dtype
    self.ln1, self.ln2 = LayerNorm(d), LayerNorm(d)
    self.attn = Attention(spec, rngs=rngs, dtype=dtype, rope=rope)
    self.mlp = MLP(d, d_mlp, rngs=rngs, dtype=dtype)

  def __call__(self, x_BTD):
    x_BTD = x_BTD + self.attn(self.ln1(x_BTD, self.dtype)).astype(x_BTD.dtype)
    return x_BTD + self.mlp(self.ln2(x_BTD, self.dtype)).astype(x_BTD.dtype)

  def decode(self, x_BTD, cache):
    y, cache = self.attn.decode(self.ln1(x_BTD, self.dtype), cache)
    x_BTD = x_BTD + y.astype(x_BTD.dtype)
    return x_BTD + self.mlp(self.ln2(x_BTD, self.dtype)).astype(x_BTD.dtype), cache


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  seq_len: int
  d_mlp: int
  pos: str = "learned"
  pos_init: str = "normal"  # learned positions: N(0, 0.02^2) (the paper) or 'sinusoidal'
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  specs: tuple[AttentionSpec, ...] = ()
  residual_dtype: Any = None  # None: the embeddings' dtype (float32 parameters: float32)

  @classmethod
  def from_config(cls, config: Any, vocab_size: int) -> "GPTConfig":
    m = config.model
    if m.get("pos", "learned") not in POSITIONS:
      raise ValueError(f"model.pos={m.pos!r} is invalid: allowed values are {POSITIONS}")
    if m.get("pos_init", "normal") not in POS_INITS:
      raise ValueError(f"model.pos_init={m.pos_init!r} is invalid: allowed values are "
                       f"{POS_INITS}")
    for field in ("d_model", "num_layers", "seq_len"):
      if int(m.get(field, 0)) <= 0:
        raise ValueError(f"model.{field}={m.get(field)!r} is invalid: must be a positive integer")
    dtype = compute_dtype(m.get("dtype", "auto"))
    return cls(vocab_size=vocab_size, d_model=m.d_model, num_layers=m.num_layers,
               seq_len=m.seq_len, d_mlp=int(m.get("mlp_ratio", 4) * m.d_model),
               pos=m.get("pos", "learned"), pos_init=m.get("pos_init", "normal"),
               tie_embeddings=bool(m.get("tie_embeddings", False)),
               dtype=dtype, specs=layer_specs(m, config.attention),
               residual_dtype=residual_dtype(m.get("residual_dtype", ""), dtype))


class GPT(nnx.Module):
  """Token embedding (+ learned positions) -> pre-LN blocks -> final LN -> LM head."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.embed = param(jax.random.normal(rngs.params(), (cfg.vocab_size, d)) * 0.02,
                       ("vocab", "embed"))
    if cfg.pos == "learned":
      key = rngs.params()  # drawn either way, so the other parameters' draws do not move
      table = (sinusoidal_table(cfg.seq_len, d) if cfg.pos_init == "sinusoidal"
               else jax.random.normal(key, (cfg.seq_len, d)) * 0.02)
      self.pos = param(table, (None, "embed"))
    else:
      self.pos = None
    self.blocks = nnx.List([Block(s, cfg.d_mlp, rngs=rngs, dtype=cfg.dtype,
                                  rope=cfg.pos == "rope") for s in cfg.specs])
    self.ln_f = LayerNorm(d)
    self.head = None if cfg.tie_embeddings else Dense(d, cfg.vocab_size, rngs=rngs,
                                                      dtype=cfg.dtype, zero_init=True,
                                                      axes=("embed", "vocab"))

  def embed_tokens(self, tokens_BT, start=0):
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0)
    if self.pos is not None:
      t = tokens_BT.shape[1]
      pos = jax.lax.dynamic_slice_in_dim(self.pos[...], start, t, axis=0)
      x_BTD = x_BTD + pos[None]
    if self.cfg.residual_dtype is not None:
      x_BTD = x_BTD.astype(self.cfg.residual_dtype)
    return x_BTD

  def logits(self, x_BTD):
    x = self.ln_f(x_BTD, self.cfg.dtype)
    if self.head is None:
      out = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(self.cfg.dtype))
    else:
      out = self.head(x)
    return constrain(out, ("batch", "seq", "vocab"))

  def __call__(self, tokens_BT):
    if tokens_BT.shape[1] > self.cfg.seq_len and self.pos is not None:
      raise ValueError(f"sequence length {tokens_BT.shape[1]} exceeds model.seq_len="
                       f"{self.cfg.seq_len} (learned positions); use model.pos='none' to "
                       f"run at other lengths")
    act = ("batch", "seq", "act_embed")
    x_BTD = constrain(self.embed_tokens(tokens_BT), act)
    for block in self.blocks:
      x_BTD = constrain(block(x_BTD), act)
    return self.logits(x_BTD)

  # --- cached decoding ------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int):
    return [b.attn.init_cache(batch, max_len) for b in self.blocks]

  def decode(self, tokens_BT, caches, start):
    """Logits for new tokens at absolute positions start.., updating the per-layer caches."""
    x_BTD = self.embed_tokens(tokens_BT, start)
    new = []
    for block, cache in zip(self.blocks, caches):
      x_BTD, cache = block.decode(x_BTD, cache)
      new.append(cache)
    return self.logits(x_BTD), new


def param_counts(model: GPT) -> dict[str, int]:
  """Total and non-embedding parameter counts (token and position embeddings excluded)."""
  state = nnx.state(model, nnx.Param)
  total = sum(int(x.size) for x in jax.tree.leaves(state))
  emb = int(model.embed.size) + (int(model.pos.size) if model.pos is not None else 0)
  return {"total": total, "non_embedding": total - emb}
