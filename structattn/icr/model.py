"""The ICR transformer: read-in, learned positions, pre-LN blocks, read-out at x tokens.

    model = ICRModel(d_max=20, n_max=40, d_model=256, num_layers=6,
                     attention={"variant": "mha", "num_heads": 8}, rngs=nnx.Rngs(0))
    pred_BN = model(x_BNI, y_BN)   # pred_i read at token 2i (x_i), which sees only (x_j, y_j) j < i

The prompt is `task.interleave(x, y)` (2N tokens); attention is causal, so the x_i token
cannot see y_i.  Any scoring function: `attention` is an `attention` config section (see
`structattn.attention.spec.from_config`), `attention_pattern='mha|mlr'` cycles variants over
layers as in the GPT.  Computation in float32 (the paper's ICR runs are fp32).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from structattn.attention import AttentionSpec, from_config
from structattn.icr.task import interleave
from structattn.linear import Dense
from structattn.models.gpt import Block, LayerNorm


def icr_specs(attention: Mapping[str, Any], d_model: int, num_layers: int, seq_len: int,
              attention_pattern: str = "") -> tuple[AttentionSpec, ...]:
  """One validated AttentionSpec per layer, the variant pattern cycled over layers."""
  pattern = attention_pattern or attention.get("variant", "mha")
  variants = [v.strip() for v in str(pattern).split("|") if v.strip()]
  return tuple(from_config({**dict(attention), "variant": variants[i % len(variants)]},
                           d_model=d_model, seq_len=seq_len) for i in range(num_layers))


class ICRModel(nnx.Module):
  """Linear(d_max -> D) + learned positions -> Blocks -> LN -> Linear(D -> 1) (zero init)."""

  def __init__(self, d_max: int, n_max: int, d_model: int, num_layers: int,
               attention: Mapping[str, Any] | None = None, *, rngs: nnx.Rngs,
               d_mlp: int | None = None, attention_pattern: str = "",
               specs: tuple[AttentionSpec, ...] | None = None,
               read_in_as_embedding: bool = True):
    self.d_max, self.n_max, self.dtype = d_max, n_max, jnp.float32
    if specs is None:
      specs = icr_specs(attention or {"variant": "mha"}, d_model, num_layers, 2 * n_max,
                        attention_pattern)
    self.read_in = Dense(d_max, d_model, rngs=rngs)
    if read_in_as_embedding:  # muP: an input layer whose fan-in does not grow with width
      self.read_in.kernel = nnx.Param(self.read_in.kernel[...])  # base lr (no fan_in)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (2 * n_max, d_model),
                                           jnp.float32) * 0.02)
    self.blocks = nnx.List([Block(s, d_mlp or 4 * d_model, rngs=rngs, dtype=self.dtype)
                            for s in specs])
    self.ln_f = LayerNorm(d_model)
    self.read_out = Dense(d_model, 1, rngs=rngs, zero_init=True)

  def __call__(self, x_BNI: jax.Array, y_BN: jax.Array) -> jax.Array:
    """Predictions pred_BN, pred_i from the x_i token (sees x_1..x_i, y_1..y_{i-1})."""
    b, n, d = x_BNI.shape
    if n > self.n_max or d != self.d_max:
      raise ValueError(f"prompt (N={n}, d={d}) does not fit the model (n_max={self.n_max}, "
                       f"d_max={self.d_max})")
    tokens_BTI = interleave(x_BNI.astype(self.dtype), y_BN.astype(self.dtype))
    h_BTD = self.read_in(tokens_BTI) + self.pos[...][:2 * n][None]
    for block in self.blocks:
      h_BTD = block(h_BTD)
    h_BND = self.ln_f(h_BTD, self.dtype)[:, 0::2]
    return self.read_out(h_BND)[..., 0]


def icr_loss(pred_BN: jax.Array, y_BN: jax.Array, mask_BN: jax.Array | None = None
             ) -> jax.Array:
  """Mean squared error over all points and prompts (float32); with mask_BN, over the points
  where it is 1 (the curriculum's active points)."""
  se_BN = jnp.square(pred_BN.astype(jnp.float32) - y_BN.astype(jnp.float32))
  if mask_BN is None:
    return jnp.mean(se_BN)
  return jnp.sum(se_BN * mask_BN) / jnp.maximum(jnp.sum(mask_BN), 1.0)


def loss_fn(params, graphdef, rest, batch) -> jax.Array:
  """ICR loss of the merged model on a batch {x_BNI, y_BN}."""
  model = nnx.merge(graphdef, params, rest)
  return icr_loss(model(batch["x_BNI"], batch["y_BN"]), batch["y_BN"])


def predict(params, batch, *, graphdef, rest) -> jax.Array:
  """pred_BN of the merged model on a batch {x_BNI, y_BN}."""
  return nnx.merge(graphdef, params, rest)(batch["x_BNI"], batch["y_BN"])
