"""The LM's training loss and held-out score: token cross-entropy of the merged GPT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def cross_entropy(logits_BTO, targets_BT):
  """Per-sequence mean token cross-entropy in float32, shape (B,).

  logsumexp minus the target logit: XLA fuses the float32 upcast into the reductions, so no
  float32 copy of the (B, T, O) logits is materialised."""
  logits = logits_BTO.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return (lse - target).mean(axis=-1)


def loss_fn(params, graphdef, rest, batch):
  """Mean cross-entropy of the batch {inputs, targets} (the LM training loss)."""
  model = nnx.merge(graphdef, params, rest)
  return cross_entropy(model(batch["inputs"]), batch["targets"]).mean()


def eval_step(params, batch, *, graphdef, rest):
  """Per-sequence held-out cross-entropy, shape (B,)."""
  model = nnx.merge(graphdef, params, rest)
  return cross_entropy(model(batch["inputs"]), batch["targets"])
