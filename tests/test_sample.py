"""Cached sampling: logits from the KV cache equal full recomputation, every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structattn.configs import lm as lm_configs
from structattn import sample as sample_lib
from structattn.models.gpt import GPT, GPTConfig
from tests.attention_cases import randomise


def tiny_gpt(variant, pos="learned", seq_len=32):
  c = lm_configs.get_config("tiny-mha" if variant == "mixed" else f"tiny-{variant}")
  c.model.update(d_model=16, num_layers=2, seq_len=seq_len, dtype="float64", pos=pos,
                 attention_pattern="" if variant != "mixed" else "mha|swa")
  c.attention.update(num_heads=2, window=5, mlr_ranks=(4, 2, 1, 1), gswa_split=(4, 4),
                     bmlr_ranks=(4, 4))
  if variant == "mixed":
    c.attention.variant = "mha"
  cfg = GPTConfig.from_config(c, vocab_size=11)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  randomise(model, seed=3, scale=1.0)
  return model


@pytest.mark.parametrize("variant,pos", [(v, "learned") for v in (
    "mha", "swa", "gswa", "mlr", "bilinear_mlr", "bilinear_btt", "mixed")] + [
        ("mha", "rope"), ("mlr", "rope"), ("gswa", "rope")])
def test_cached_logits_equal_full_recomputation(variant, pos):
  model = tiny_gpt(variant, pos=pos)
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 11)
  full = np.asarray(jax.jit(lambda t: model(t))(tokens))
  caches = model.init_cache(2, 32)
  step = jax.jit(lambda tok, caches, start: model.decode(tok, caches, start))
  logits, caches = step(tokens[:, :9], caches, jnp.int32(0))  # prefill
  outs = [np.asarray(logits)]
  for i in range(9, 32):
    logits, caches = step(tokens[:, i:i + 1], caches, jnp.int32(i))
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("variant,pos", [("mlr", "none"), ("swa", "none"), ("mlr", "rope"),
                                         ("bilinear_btt", "rope")])
def test_sampling_beyond_training_length(variant, pos):
  model = tiny_gpt(variant, pos=pos, seq_len=32)
  prompt = jnp.asarray([[1, 2, 3, 4]])
  ids = sample_lib.generate(model, prompt, 44, temperature=0.0, max_len=48)
  assert ids.shape == (1, 48)
  full = np.asarray(model(jnp.asarray(ids)))  # greedy: each token is the argmax of the prefix
  np.testing.assert_array_equal(ids[0, 4:], full[0, 3:-1].argmax(-1))


def test_learned_positions_cap_the_length():
  model = tiny_gpt("mha")
  with pytest.raises(ValueError, match="model.seq_len"):
    sample_lib.generate(model, jnp.asarray([[1, 2]]), 40)


def test_rope_scores_depend_on_relative_position_only():
  from structattn.attention.rope import apply_rope
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 7)))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 7)))
  widths = (4, 3)  # two level segments, the second of odd width
  def score(i, j, upto):
    qi = apply_rope(q, jnp.full((1, 1), i), widths)[..., :upto]
    kj = apply_rope(k, jnp.full((1, 1), j), widths)[..., :upto]
    return float(jnp.sum(qi * kj))
  for upto in (4, 7):  # every prefix of levels keeps the relative-position property
    assert abs(score(5, 2, upto) - score(13, 10, upto)) < 1e-9
    assert abs(score(5, 2, upto) - score(5, 4, upto)) > 1e-6
