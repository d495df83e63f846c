"""muP coordinate check: activation changes stay within 2x across widths 64..512 under muP,
while the standard-parametrisation control (one learning rate for all) drifts."""

import numpy as np
import pytest

from structattn.configs import lm as lm_configs
from structattn.coord_check import coord_check


def _config(parametrization):
  c = lm_configs.get_config("tiny")
  c.model.update(num_layers=2, seq_len=32, dtype="float32")
  c.attention.scale = "mup" if parametrization == "mup" else "standard"
  c.train.update(lr=3e-3, warmup_steps=0, clip_norm=0.0, parametrization=parametrization)
  return c


@pytest.mark.slow
def test_mup_coordinates_are_width_independent_and_sp_drifts():
  mup = np.array(list(coord_check(_config("mup")).values()))  # (widths, layers)
  sp = np.array(list(coord_check(_config("standard")).values()))
  assert np.all(mup > 0) and np.all(sp > 0)
  spread = mup.max(axis=0) / mup.min(axis=0)
  assert np.all(spread < 2.0), spread  # every layer within a factor 2 from width 64 to 512
  drift = sp[-1] / sp[0]
  assert np.all(drift > 4.0), drift  # SP: the change grows with width
