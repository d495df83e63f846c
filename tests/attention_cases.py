"""Attention test cases shared by the attention, decoding and sampling tests: small configs
of every variant, scoring patterns, random inputs and randomised float64 layers."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structattn.attention import Attention, core, from_config

D, T = 16, 32

VARIANTS = {
    "mha": dict(variant="mha", num_heads=2),
    "mha_dqk": dict(variant="mha", num_heads=2, d_qk=4, scale="standard"),
    "swa": dict(variant="swa", num_heads=2, window=5),
    "gswa_sum": dict(variant="gswa", num_heads=2, window=6, gswa_split=(4, 4)),
    "gswa_renorm": dict(variant="gswa", num_heads=2, window=6, gswa_split=(3, 5),
                        gswa_combine="renorm"),
    "mlr": dict(variant="mlr", num_heads=2, mlr_ranks=(4, 2, 2)),
    "mlr_block_divide": dict(variant="mlr", num_heads=2, mlr_ranks=(2, 2, 2, 2),
                             mlr_divide="block"),
    "mlr_levels_divide": dict(variant="mlr", num_heads=2, mlr_ranks=(4, 4), mlr_divide="levels",
                              mlr_block_sizes=(0, 4)),
    "mlr_ternary": dict(variant="mlr", num_heads=1, d_head=8, mlr_ranks=(4, 2, 2),
                        mlr_block_sizes=(0, 8, 2)),
    "bilinear_mlr": dict(variant="bilinear_mlr", num_heads=2, bmlr_ranks=(2, 1, 1)),
    "bilinear_btt": dict(variant="bilinear_btt", num_heads=2),
    "bilinear_btt_s2": dict(variant="bilinear_btt", num_heads=1, btt_rank=2, scale="inverse"),
    "mlbtc": dict(variant="mlbtc", num_heads=2, levels=[
        dict(seq="global", kind="btt", rank=1),
        dict(seq="block", size=8, kind="lowrank", rank=2, blocks=2),
        dict(seq="block", size=4, kind="lowrank", rank=4)]),
}


def randomise(module, seed=0, scale=1.0):
  """Replace every parameter by random normals (zero-init outputs would hide errors)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [rng.normal(size=x.shape) * scale / np.sqrt(max(1, x.shape[-1]))
         + (1.0 if x.ndim == 1 else 0.0)
         for x in leaves]
  nnx.update(module, jax.tree.unflatten(treedef, new))


def make(cfg, d_model=D, seq_len=T, causal=True, seed=0):
  spec = from_config(dict(cfg, causal=causal), d_model=d_model, seq_len=seq_len)
  m = Attention(spec, rngs=nnx.Rngs(seed), dtype=jnp.float64, zero_init_out=False)
  randomise(m, seed)
  return m


def run(m, x, impl=None):
  """Jitted layer call (one compiled program instead of op-by-op dispatch)."""
  graph, state = nnx.split(m)
  f = jax.jit(lambda state, x: nnx.merge(graph, state)(x, impl=impl))
  return np.asarray(f(state, x))


def x_of(b, t, d, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float64)


def random_qkv(b, t, h, k, v, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, k), jnp.float64) / np.sqrt(k),
          jax.random.normal(ks[1], (b, t, h, k), jnp.float64),
          jax.random.normal(ks[2], (b, t, h, v), jnp.float64))


PATTERNS = {
    "mlr3": core.Pattern(("global", "block", "block"), (0, 16, 4), (3, 2, 3)),
    "mlr3_block": core.Pattern(("global", "block", "block"), (0, 16, 4), (3, 2, 3), divide="block"),
    "mlr_noncausal": core.Pattern(("global", "block", "block"), (0, 16, 4), (3, 2, 3), causal=False),
    "mlr_4ary": core.Pattern(("global", "block", "block"), (0, 16, 4), (4, 2, 2)),
    "mlr_local": core.Pattern(("block", "block"), (16, 8), (3, 3)),
    "one_level": core.Pattern(("block",), (8,), (4,)),
    "swa": core.Pattern(("window",), (7,), (6,)),
    "swa_noncausal": core.Pattern(("window",), (7,), (6,), causal=False),
    "gswa": core.Pattern(("global", "window"), (0, 9), (3, 3)),
    "gswa_sum": core.Pattern(("global", "window"), (0, 9), (3, 3), combine="sum"),
    "gswa_block_divide": core.Pattern(("global", "window"), (0, 9), (3, 3), divide="block"),
    "gswa_levels_divide": core.Pattern(("global", "window"), (0, 70), (3, 3), divide="levels"),
}
