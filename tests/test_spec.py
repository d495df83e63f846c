"""Bad configurations raise a ValueError naming the field and the allowed values."""

import pytest

from structattn.attention.spec import from_config


def _spec(d_model=64, seq_len=64, **cfg):
  return from_config(cfg, d_model=d_model, seq_len=seq_len)


@pytest.mark.parametrize("cfg,field,allowed", [
    (dict(variant="mlr", num_heads=4, mlr_ranks=(8, 4)), "mlr_ranks", "sum to d_qk=16"),
    (dict(variant="mlr", num_heads=4, mlr_ranks=(8, 4, 4), mlr_block_sizes=(0, 24, 8)),
     "mlr_block_sizes", "divisible"),
    (dict(variant="mlr", num_heads=1, d_head=64, mlr_ranks=(32, 16, 16),
          mlr_block_sizes=(0, 32, 8)), "mlr_ranks", "exceeds its block size"),
    (dict(variant="mlr", num_heads=4, mlr_ranks=(8, 4, 4), mlr_block_sizes=(0, 32, 12)),
     "mlr_block_sizes", "divisible"),
    (dict(variant="mlr", num_heads=4, mlr_ranks=(8, 8), mlr_block_sizes=(0,)),
     "mlr_block_sizes", "one block size per level"),
    (dict(variant="mlr", num_heads=4, mlr_ranks=(8, 8), mlr_divide="sometimes"),
     "mlr_divide", "allowed values"),
    (dict(variant="bilinear_btt", num_heads=1), "d_model", "factoris"),
    (dict(variant="transformer"), "variant", "allowed values are ('mha'"),
    (dict(variant="mha", num_heads=3), "num_heads", "divide d_model"),
    (dict(variant="mha", num_heads=4, impl="tpu-magic"), "impl", "allowed values"),
    (dict(variant="mha", num_heads=4, scale="big"), "scale", "allowed values"),
    (dict(variant="swa", num_heads=4, window=0), "window", ">= 1"),
    (dict(variant="gswa", num_heads=4, gswa_combine="avg"), "gswa_combine", "allowed values"),
    (dict(variant="bilinear_mlr", num_heads=2, bmlr_ranks=(2, 2, 2, 2, 2, 2, 2, 2)), "bmlr_ranks",
     "divisible"),
    (dict(variant="mlbtc", num_heads=2), "levels", "non-empty list"),
    (dict(variant="mlbtc", num_heads=2, levels=[dict(kind="fourier")]), "levels[0].kind",
     "allowed values"),
    (dict(variant="mlbtc", num_heads=2, levels=[dict(seq="block", size=8, rank=2),
                                                dict(seq="global", rank=2)]), "levels",
     "coarse to fine"),
    (dict(variant="mlr", num_heads=4, mlr_ranks="8,x"), "mlr_ranks", "positive integers"),
])
def test_bad_configs_name_field_and_allowed_values(cfg, field, allowed):
  d_model = 61 if cfg.get("variant") == "bilinear_btt" else 64
  with pytest.raises(ValueError) as e:
    _spec(d_model=d_model, **cfg)
  msg = str(e.value)
  assert f"attention.{field}=" in msg, msg
  assert allowed in msg, msg


def test_good_configs_and_defaults():
  s = _spec(variant="mlr", num_heads=4, mlr_ranks="8|4|2|2", seq_len=64)
  assert s.block_sizes() == (64, 32, 16, 8)
  assert s.level_scales() == (1 / 8, 1 / 4, 1 / 2, 1 / 2)  # mlr default: 1/r_l
  assert _spec(variant="mha", num_heads=4).level_scales() == (8 / 16,)  # muP 8/d
  assert _spec(variant="mha", num_heads=4, scale="standard").level_scales() == (0.25,)
  paper = from_config(dict(variant="mlr", num_heads=12, mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2),
                           mlr_divide="block"), d_model=768, seq_len=1024)
  assert paper.block_sizes() == (1024, 512, 256, 128, 64, 32, 16, 8)
  b = _spec(variant="bilinear_mlr", num_heads=8, bmlr_ranks=(8, 4, 4, 16), d_model=256)
  assert b.widths == (8, 8, 16, 128) and b.d_qk == 160
