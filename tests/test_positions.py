"""Learned positions: the paper's N(0, 0.02^2) start and the sinusoidal start."""

import jax
import numpy as np
import pytest
from flax import nnx

from structattn.configs import lm as lm_configs
from structattn.lm import task as lm_task
from structattn.models import gpt


def test_sinusoidal_table_has_the_embedding_scale_and_depends_on_offsets_only():
  t, d = 256, 64
  table = np.asarray(gpt.sinusoidal_table(t, d), np.float64)
  assert table.shape == (t, d)
  assert np.sqrt(np.mean(table ** 2)) == pytest.approx(0.02, rel=1e-5)
  # sin/cos pairs: p_i . p_j = sum_f cos(w_f (i - j)), a function of i - j alone.
  gram = table @ table.T
  for offset in (1, 5, 37):
    diag = np.diagonal(gram, offset)
    np.testing.assert_allclose(diag, diag[0], rtol=0, atol=1e-6 * gram[0, 0])
  # ... and it falls off with the offset, so nearby positions are the most alike.
  assert gram[100, 101] > gram[100, 110] > gram[100, 200]


def _model(pos_init, d=32, t=16):
  c = lm_configs.get_config("tiny")
  c.model.update(d_model=d, num_layers=1, seq_len=t, pos_init=pos_init)
  c.attention.update(num_heads=2, d_head=d // 2)
  _, model = lm_task.build_model(c, 40)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_pos_init_changes_the_position_table_and_nothing_else():
  normal, sin = _model("normal"), _model("sinusoidal")
  np.testing.assert_allclose(np.asarray(sin["pos"]), np.asarray(gpt.sinusoidal_table(16, 32)))
  assert not np.allclose(np.asarray(normal["pos"]), np.asarray(sin["pos"]))
  flat_n = dict(jax.tree_util.tree_flatten_with_path(normal)[0])
  flat_s = dict(jax.tree_util.tree_flatten_with_path(sin)[0])
  others = [k for k in flat_n if "pos" not in jax.tree_util.keystr(k)]
  assert others
  for k in others:  # the other parameters draw the same random numbers either way
    np.testing.assert_array_equal(np.asarray(flat_n[k]), np.asarray(flat_s[k]))


def test_unknown_pos_init_names_the_field_and_the_choices():
  with pytest.raises(ValueError, match=r"model.pos_init='uniform'.*normal.*sinusoidal"):
    _model("uniform")
