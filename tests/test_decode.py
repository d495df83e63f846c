"""KV-cache decoding equals the full causal forward, token by token and in chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structattn.attention import core, decode
from tests import reference
from tests.attention_cases import PATTERNS, VARIANTS, make, x_of
from tests.attention_cases import random_qkv as _random_qkv

D, T_TRAIN, T_DECODE = 16, 32, 40  # decode past the training length
CHUNKS = (7, 1, 1, 5, 7, 5, 7, 7)  # chunked prefill mixed with single steps; sums to 40


def decoder(m):
  """Jitted `decode` step of module m, with a Python counter of its traces."""
  graph, state = nnx.split(m)
  traces = []

  def step(state, x_BTD, cache):
    traces.append(x_BTD.shape[1])
    return nnx.merge(graph, state).decode(x_BTD, cache)

  fn = jax.jit(step)
  return (lambda x, cache: fn(state, x, cache)), traces


def decode_in_chunks(step, cache, x_BTD, chunks):
  outs, start = [], 0
  for n in chunks:
    y, cache = step(x_BTD[:, start:start + n], cache)
    start += n
    assert int(cache["index"]) == start
    outs.append(np.asarray(y))
  return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decode_matches_full_forward(name):
  m = make(VARIANTS[name], d_model=D, seq_len=T_TRAIN, causal=True)
  x = x_of(2, T_DECODE, D)
  want = np.asarray(jax.jit(lambda x: m(x, impl="reference"))(x))
  # the library oracle at T != seq_len agrees with the independent NumPy reference
  np.testing.assert_allclose(want, reference.attention_layer(m, np.asarray(x)), rtol=1e-9,
                             atol=1e-9)
  step, traces = decoder(m)
  cache = m.init_cache(2, 48)
  assert int(cache["index"]) == 0 and cache["k"].dtype == jnp.float64
  got, cache = decode_in_chunks(step, cache, x, (1,) * T_DECODE)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name} token by token")
  assert traces == [1]  # one compiled T=1 step, reused for every position
  got, cache = decode_in_chunks(step, m.init_cache(2, 48), x, CHUNKS)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name} chunked")
  assert sorted(traces) == [1, 5, 7]
  assert np.abs(want).max() > 1e-3


CACHED_PATTERNS = sorted(n for n, p in PATTERNS.items() if p.causal) + ["mlr_levels", "gswa_block"]
EXTRA = {
    "mlr_levels": core.Pattern(("global", "block", "block"), (0, 16, 4), (3, 2, 3),
                               divide="levels"),
    "gswa_block": core.Pattern(("global", "window"), (0, 9), (3, 3), divide="block"),
}


@pytest.mark.parametrize("name", CACHED_PATTERNS)
def test_cached_attention_core_matches_reference(name):
  """Core-level check on every pattern (also a first level that is a block, divide
  options) at a length that is no multiple of the blocks, one prefill then steps."""
  pat = EXTRA.get(name) or PATTERNS[name]
  t = 45
  q, k, v = _random_qkv(2, t, 2, sum(pat.widths), 5)
  want = core.reference_attention(q, k, v, pat)
  fn = jax.jit(lambda q, k, v, c: decode.cached_attention(q, k, v, c, pat))
  cache = decode.init_cache(2, 64, 2, sum(pat.widths), 5, jnp.float64)
  outs, start = [], 0
  for n in (20,) + (1,) * 5 + (20,):
    y, cache = fn(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], cache)
    outs.append(y)
    start += n
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-10, atol=1e-10)
  assert int(cache["index"]) == t
  np.testing.assert_array_equal(cache["k"][:, :t], k)
  np.testing.assert_array_equal(cache["v"][:, t:], 0.0)


def test_global_level_is_global_beyond_training_length():
  """A global level covers every causal pair at T > seq_len (no block of the old T)."""
  pat = core.Pattern(("global", "block"), (0, 8), (2, 2))
  masks = np.asarray(core.level_masks(pat, 40))
  assert masks[0].all()
  np.testing.assert_array_equal(masks[1][20], np.arange(40) // 8 == 2)


def test_noncausal_decoding_is_refused():
  m = make(VARIANTS["mlr"], causal=False)
  with pytest.raises(ValueError, match="causal"):
    m.decode(x_of(1, 1, D), m.init_cache(1, 8))


def test_jitted_step_with_donated_cache():
  m = make(VARIANTS["gswa_sum"])
  graph, state = nnx.split(m)
  step = jax.jit(lambda s, x, c: nnx.merge(graph, s).decode(x, c), donate_argnums=2)
  x = x_of(1, 6, D)
  cache = m.init_cache(1, 8)
  ys = []
  for i in range(6):
    y, cache = step(state, x[:, i:i + 1], cache)
    ys.append(y)
  want = np.asarray(m(x, impl="reference"))
  np.testing.assert_allclose(np.concatenate(ys, 1), want, rtol=1e-9, atol=1e-9)
  assert int(cache["index"]) == 6
