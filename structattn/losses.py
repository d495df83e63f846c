"""Language-model losses that never hold a float32 copy of the (B, T, O) logits.

    nll_BT = token_cross_entropy(logits_BTO, targets_BT)     # float32, per token
    loss = lm_loss(params, graphdef, rest, batch)             # as structattn.lm.loss.loss_fn

`token_cross_entropy` is a custom VJP: the forward takes the row maximum of the logits in
their own dtype (exact), then the sum of exp(logit - max) in float32, both reductions reading
the low-precision logits; the backward forms (softmax - onehot) * cotangent in float32 per
element and writes it in the logits' dtype, one elementwise pass.  The residuals are the
logits themselves (already kept for the LM head's backward), the float32 log-sum-exp per
token and the targets.  Values and gradients equal the float32 upcast-then-logsumexp
formulation to float32 rounding (the gradient is rounded to the logits' dtype, as the
autodiff of the upcast rounds it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _lse_and_target(logits, targets):
  m = jnp.max(logits, axis=-1).astype(jnp.float32)  # exact in the logits' dtype
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.sum(jnp.exp(logits.astype(jnp.float32) - m[..., None]), axis=-1)
  lse = m + jnp.log(s)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return lse, target


@jax.custom_vjp
def token_cross_entropy(logits_BTO, targets_BT):
  """-log softmax(logits)[target] per token, float32, shape targets.shape."""
  lse, target = _lse_and_target(logits_BTO, targets_BT)
  return lse - target


def _fwd(logits, targets):
  lse, target = _lse_and_target(logits, targets)
  return lse - target, (logits, targets, lse)


def _bwd(res, g):
  logits, targets, lse = res
  p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == \
      targets[..., None]
  d = (p - onehot.astype(jnp.float32)) * g.astype(jnp.float32)[..., None]
  return d.astype(logits.dtype), None


token_cross_entropy.defvjp(_fwd, _bwd)


def cross_entropy(logits_BTO, targets_BT):
  """Per-sequence mean token cross-entropy in float32, shape (B,) (as structattn.lm.loss)."""
  return token_cross_entropy(logits_BTO, targets_BT).mean(axis=-1)


def lm_loss(params, graphdef, rest, batch):
  """structattn.lm.loss.loss_fn with this cross-entropy."""
  model = nnx.merge(graphdef, params, rest)
  return cross_entropy(model(batch["inputs"]), batch["targets"]).mean()
