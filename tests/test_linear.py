"""Structured linear maps: explicit matrices, counts, fan-in, BTT full rank and RMS cap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structattn.attention.spec import btt_factors
from structattn.linear import BTT, BlockDiagonal, Dense, LowRank, rms_cap
from tests import reference


@pytest.mark.parametrize("d,ab", [(16, (2, 8)), (64, (4, 16)), (256, (8, 32)), (768, (24, 32)),
                                  (1024, (16, 64)), (12, (3, 4))])
def test_btt_factorisation_rule(d, ab):
  assert btt_factors(d) == ab


@pytest.mark.parametrize("d", [2, 3, 13, 97])
def test_btt_factorisation_rejects_prime_or_tiny(d):
  with pytest.raises(ValueError, match="d_model"):
    btt_factors(d)


def _x(n, d, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(3, n, d)))


def test_dense_lowrank_blockdiag_match_explicit_matrices():
  rngs = nnx.Rngs(0)
  for mod in (Dense(12, 8, rngs=rngs), LowRank(12, 8, 3, rngs=rngs),
              BlockDiagonal(12, 8, 4, rngs=rngs)):
    x = _x(5, 12)
    m = np.asarray(mod.dense_matrix())
    np.testing.assert_allclose(np.asarray(mod(x)), np.asarray(x) @ m, rtol=1e-5, atol=1e-5)
    assert mod.num_params() == sum(int(np.prod(p.shape)) for p in
                                   jax.tree.leaves(nnx.state(mod, nnx.Param)))
    assert mod.macs_per_token() == mod.num_params()
  bd = BlockDiagonal(12, 8, 4, rngs=rngs)
  m = np.asarray(bd.dense_matrix())
  assert np.count_nonzero(m) == 4 * 3 * 2  # only the diagonal blocks
  assert np.linalg.matrix_rank(np.asarray(LowRank(12, 8, 3, rngs=rngs).dense_matrix())) == 3


def test_fan_in_metadata_and_init_scale():
  rngs = nnx.Rngs(0)
  d = Dense(512, 256, rngs=rngs)
  assert d.fan_in() == {"kernel": 512} and d.kernel.fan_in == 512
  assert abs(float(jnp.std(d.kernel[...])) * np.sqrt(512) - 1.0) < 0.05
  lr = LowRank(64, 32, 4, rngs=rngs)
  assert lr.fan_in() == {"u": 64, "v": 4} and lr.v.fan_in == 4
  assert BlockDiagonal(64, 32, 4, rngs=rngs).fan_in() == {"kernel": 16}
  b = BTT(64, rank=2, heads=3, rngs=rngs)  # a, b = 4, 16; c, d = 4, 16
  assert b.fan_in() == {"core1": 16, "core2": 8}
  assert b.core1.shape == (4, 16, 3 * 16 * 2) and b.core2.shape == (3 * 16, 4, 4 * 2)
  assert Dense(8, 8, rngs=rngs, zero_init=True).kernel[...].sum() == 0


@pytest.mark.parametrize("d,heads,rank", [(16, 1, 1), (64, 2, 1), (36, 3, 2)])
def test_btt_matches_independent_construction_and_is_full_rank(d, heads, rank):
  b = BTT(d, rank=rank, heads=heads, rngs=nnx.Rngs(1), rms_cap=False)
  mats = np.asarray(b.dense_matrix())
  w1, w2 = (np.asarray(c) for c in b.cores())
  np.testing.assert_allclose(reference.btt_matrices(w1, w2, heads, rank, b.factors), mats,
                             rtol=1e-5, atol=1e-5)
  x = _x(4, d)
  np.testing.assert_allclose(np.asarray(b(x)), np.einsum("bnd,hde->bnhe", np.asarray(x), mats),
                             rtol=1e-4, atol=1e-4)
  for h in range(heads):
    assert np.linalg.matrix_rank(mats[h]) == d
  a_, b_ = btt_factors(d)
  assert b.num_params() == heads * rank * d * (a_ + b_) == b.macs_per_token()


def test_rms_cap():
  w = jnp.ones((4, 8)) * 10.0
  capped = rms_cap(w, 4, 8)
  kappa = np.sqrt(4) / 4
  assert abs(float(jnp.sqrt(jnp.mean(capped ** 2))) - kappa) < 1e-6
  small = jnp.ones((4, 8)) * 0.01
  np.testing.assert_allclose(rms_cap(small, 4, 8), small)  # below the cap: unchanged
  b = BTT(16, rngs=nnx.Rngs(0), rms_cap=True)
  b.core1[...] = b.core1[...] * 100
  w1, _ = b.cores()
  assert float(jnp.sqrt(jnp.mean(w1 ** 2))) <= np.sqrt(min(8, 8)) / 8 + 1e-6
