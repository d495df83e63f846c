"""structattn.losses: the cross-entropy without a float32 copy of the logits against a float64
reference (values and gradients), including large logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structattn import losses
from structattn import train
from structattn.lm import task as lm_task


def _reference(x, t):
  """float64 per-sequence mean cross-entropy and its gradient (sum over sequences)."""
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
  nll = lse - np.take_along_axis(x, t[..., None], -1)[..., 0]
  p = np.exp(x - lse[..., None])
  onehot = np.eye(x.shape[-1])[t]
  return nll.mean(-1), (p - onehot) / x.shape[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (8.0, 0.0), (30.0, 1e4), (100.0, -3e4)])
def test_cross_entropy_matches_float64(dtype, scale, offset):
  key = jax.random.key(int(scale))
  x = (scale * jax.random.normal(key, (3, 5, 97)) + offset).astype(dtype)
  t = jax.random.randint(jax.random.key(1), (3, 5), 0, 97)
  ref, ref_grad = _reference(np.asarray(x.astype(jnp.float32)), np.asarray(t))
  val = losses.cross_entropy(x, t)
  assert val.dtype == jnp.float32
  # float32 arithmetic on exactly represented inputs; |offset| up to 3e4 costs ~ulp(3e4)
  np.testing.assert_allclose(np.asarray(val), ref, rtol=1e-5, atol=4e-3 if offset else 1e-5)
  grad = jax.grad(lambda x: losses.cross_entropy(x, t).sum())(x)
  assert grad.dtype == dtype
  # bf16: the gradient is rounded to bf16; a large offset: the float32 log-sum-exp carries
  # ulp(|offset|) ~ 2e-3 absolute error, a relative error of exp(x - lse)
  tol = 2.0 ** -7 if dtype == jnp.bfloat16 else (4e-3 if offset else 1e-5)
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), ref_grad,
                             rtol=tol, atol=tol * np.abs(ref_grad).max() * 1e-2 + 1e-12)
  # and the trainer's formulation agrees
  np.testing.assert_allclose(np.asarray(val), np.asarray(train.cross_entropy(x, t)),
                             rtol=1e-5, atol=1e-5 if not offset else 4e-3)


def test_lm_loss_is_train_loss_fn():
  from flax import nnx
  from structattn.configs import lm as lm_configs
  c = lm_configs.get_config("tiny")
  c.model.update(num_layers=1, d_model=32, seq_len=16, dtype="bfloat16")
  c.attention.update(num_heads=2, d_head=16)
  _, model = lm_task.build_model(c, 64)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  toks = jax.random.randint(jax.random.key(0), (2, 17), 0, 64)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  a, ga = jax.value_and_grad(train.loss_fn)(params, graphdef, rest, batch)
  b, gb = jax.value_and_grad(losses.lm_loss)(params, graphdef, rest, batch)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-2, atol=1e-6)
