"""muP coordinate check: how much each layer's activations move after a few steps, by width.

Under muP the RMS change of every layer's output after t Adam steps is roughly the same at
every width (the learning rate transfers); under standard parametrisation with one global
learning rate it grows with width.  `coord_check` returns, per width, the RMS change of each
block's output and of the logits on a fixed batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structattn.models.gpt import GPT, GPTConfig
from structattn.optim import make_optimizer
from structattn.train import train_step


def activations(graphdef, params, rest, tokens_BT):
  model = nnx.merge(graphdef, params, rest)
  x = model.embed_tokens(tokens_BT)
  out = []
  for block in model.blocks:
    x = block(x)
    out.append(x)
  out.append(model.logits(x))
  return out


def activation_change(config, vocab_size: int = 64, steps: int = 5, batch: int = 8,
                      seed: int = 0) -> list[float]:
  """RMS of (activation after `steps` steps - at init), per block output and the logits."""
  cfg = GPTConfig.from_config(config, vocab_size)
  model = GPT(cfg, rngs=nnx.Rngs(seed))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(state)
  tx, _ = make_optimizer(config.train, state)
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab_size, size=(batch, cfg.seq_len + 1)).astype(np.int32)
  data = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
  before = activations(graphdef, params, rest, data["inputs"])
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, accum=1))
  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state, data)
  after = activations(graphdef, params, rest, data["inputs"])
  return [float(jnp.sqrt(jnp.mean(jnp.square(b - a)))) for a, b in zip(before, after)]


def coord_check(base_config, widths=(64, 128, 256, 512), head_dim: int = 32, **kw):
  """{width: [RMS change per layer]} for copies of base_config at each width."""
  out = {}
  for w in widths:
    c = base_config.copy_and_resolve_references()
    c.model.d_model = w
    c.attention.num_heads = w // head_dim
    c.attention.d_head = head_dim
    out[w] = activation_change(c, **kw)
  return out
