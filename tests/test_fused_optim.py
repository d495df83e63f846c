"""The fused optimiser (`train.fused_optimizer`) gives the unfused chain's updates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from structattn.optim import grad_norm, make_optimizer, with_lr


class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 16)), fan_in=8)
    self.v = nnx.Param(jax.random.normal(rngs.params(), (16, 4)), fan_in=16)
    self.b = nnx.Param(jnp.zeros((4,)))
    self.e = nnx.Param(jax.random.normal(rngs.params(), (5, 3)))


def _tc(**kw):
  d = dict(lr=3e-2, warmup_steps=2, steps=10, schedule="cosine", clip_norm=1.0, b1=0.9,
           b2=0.95, eps=1e-8, weight_decay=0.0, parametrization="mup", base_width=16)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _pair(**kw):
  state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)
  ref, _ = make_optimizer(_tc(**kw), state)
  fused, _ = make_optimizer(_tc(fused_optimizer=True, **kw), state)
  return params, ref, fused


def _grads(params, key, scale):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def _close(a, b, rtol=2e-6, scale_atol=1e-5):
  """Equal to float32 rounding: the fused global norm sums in another order (an ulp of the
  clip factor), which an element whose moments nearly cancel amplifies, hence an absolute
  tolerance relative to the leaf's largest entry.  Without clipping the match is closer."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=scale_atol * np.abs(y).max() + 1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(clip_norm=0.0),
                                dict(eps=1e-20, parametrization="standard")])
def test_fused_updates_match_unfused(kw):
  params, ref, fused = _pair(**kw)
  s_ref, s_fused = ref.init(params), fused.init(params)
  p_ref = p_fused = params
  upd_ref, upd_fused = jax.jit(ref.update), jax.jit(fused.update)
  for step in range(6):
    # scale 3: the global norm is above clip_norm=1 (clipping active); 0.01: below it
    g = _grads(params, jax.random.key(step), 3.0 if step % 2 == 0 else 0.01)
    u_ref, s_ref = upd_ref(g, s_ref, p_ref)
    u_fused, s_fused = upd_fused(g, s_fused, p_fused)
    _close(u_ref, u_fused)
    np.testing.assert_allclose(float(grad_norm(g, s_fused)), float(grad_norm(g, s_ref)),
                               rtol=1e-6)
    p_ref = jax.tree.map(jnp.add, p_ref, u_ref)
    p_fused = jax.tree.map(jnp.add, p_fused, u_fused)
  _close(p_ref, p_fused)


def test_fused_vmapped_members_with_different_lrs():
  params, ref, fused = _pair(weight_decay=0.05)
  lrs = (1e-3, 3e-2, 1e-1)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  p = stack([params] * len(lrs))
  s_ref = stack([with_lr(ref.init(params), lr) for lr in lrs])
  s_fused = stack([with_lr(fused.init(params), lr) for lr in lrs])
  p_ref = p_fused = p
  for step in range(4):
    g = stack([_grads(params, jax.random.key(10 * step + i), 3.0) for i in range(len(lrs))])
    u_ref, s_ref = jax.vmap(ref.update)(g, s_ref, p_ref)
    u_fused, s_fused = jax.vmap(fused.update)(g, s_fused, p_fused)
    _close(u_ref, u_fused)
    p_ref = jax.tree.map(jnp.add, p_ref, u_ref)
    p_fused = jax.tree.map(jnp.add, p_fused, u_fused)
  # the members' updates scale with their own lr
  w = np.asarray(p_fused["w"] - p["w"])
  assert np.abs(w[2]).mean() > 10 * np.abs(w[0]).mean()
