"""Shared checks of the fused MLR kernels against the float64 masked-dense oracle.

A helper module, not a test module: the kernel test modules import it (no test module
imports another)."""

import jax
import jax.numpy as jnp
import numpy as np

from structattn.attention import core


def random_qkv(b, t, h, k, dv, seed, round_bf16=False):
  """q (scaled by 2 / sqrt(k)), k, v and an output cotangent w, float32.  round_bf16: q, k
  and v rounded to bfloat16 first, so an oracle sees the operands a bf16 kernel computes on."""
  ks = jax.random.split(jax.random.key(seed), 4)
  rnd = (lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)) if round_bf16 else (lambda x: x)
  q = rnd(jax.random.normal(ks[0], (b, t, h, k), jnp.float32) * float(2 / np.sqrt(k)))
  k_ = rnd(jax.random.normal(ks[1], (b, t, h, k), jnp.float32))
  v = rnd(jax.random.normal(ks[2], (b, t, h, dv), jnp.float32))
  w = jax.random.normal(ks[3], (b, t, h, dv), jnp.float32)
  return q, k_, v, w


def check_against_oracle(fast, pat, q, k, v, w, tol, grads=True):
  """fast(q, k, v) on float32 inputs against `core.reference_attention` in float64: the
  output, and with grads the gradients of sum(out * w) w.r.t. q, k and v (each relative to
  the largest reference entry)."""
  ref = lambda q, k, v: core.reference_attention(q, k, v, pat)
  loss = lambda f, w: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
  a64 = [x.astype(jnp.float64) for x in (q, k, v)]
  w64 = w.astype(jnp.float64)
  if grads:
    out, g_fast = jax.jit(lambda *a: (fast(*a), jax.grad(loss(fast, w), argnums=(0, 1, 2))(*a)))(
        q, k, v)
    want, g_ref = jax.jit(lambda *a: (ref(*a), jax.grad(loss(ref, w64), argnums=(0, 1, 2))(*a)))(
        *a64)
  else:
    out, want = jax.jit(fast)(q, k, v), jax.jit(ref)(*a64)
  assert out.shape == want.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
  if grads:
    for name, a, r in zip("qkv", g_fast, g_ref):
      scale = float(jnp.abs(r).max())
      assert scale > 1e-3
      np.testing.assert_allclose(a / scale, r / scale, rtol=tol, atol=tol, err_msg=f"d{name}")


def lower_cuda(f, *args, skip):
  """StableHLO text of jit(f) lowered for CUDA (no GPU needed); skip(reason) when this
  jaxlib cannot lower for CUDA."""
  try:
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except Exception as e:  # noqa: BLE001
    if "cuda" in str(e).lower() and "platform" in str(e).lower():
      skip(f"no CUDA lowering in this jaxlib: {e}")
    raise
