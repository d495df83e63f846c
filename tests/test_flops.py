"""Tests for structattn.flops: hand counts and brute-force pair counts (pure Python/numpy)."""

import numpy as np
import pytest

from structattn import flops
from structattn.attention.spec import from_config

PAPER_MLR = dict(variant="mlr", num_heads=12, d_head=64, mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2),
                 mlr_divide="block")


def _brute_pairs(T, mask_fn):
  i = np.arange(T)[:, None]
  j = np.arange(T)[None, :]
  return int(np.broadcast_to(mask_fn(i, j), (T, T)).sum())


# ----------------------------------------------------------------------------- ratios


def test_paper_mlr_qk_ratio():
  spec = from_config(PAPER_MLR, d_model=768, seq_len=1024)
  # sum_l b_l r_l = 1024*32 + 512*8 + 256*6 + 128*4 + 64*4 + 32*4 + 16*4 + 8*2
  assert sum(b * r for b, r in zip(spec.block_sizes(), spec.widths)) == 39376
  assert flops.qk_mac_ratio(spec) == pytest.approx(0.6008, abs=1e-4)
  assert flops.attention_macs(spec)["scores"] == 12 * 1024 * 39376
  # PV stays dense in the paper convention: all T*T pairs are scored.
  assert flops.attention_macs(spec)["pv"] == 12 * 64 * 1024 * 1024


def test_mha_ratio_is_one_and_causal_halves():
  spec = from_config(dict(variant="mha", num_heads=4, d_head=16), d_model=64, seq_len=128)
  assert flops.qk_mac_ratio(spec) == 1.0
  assert flops.qk_mac_ratio(spec, convention="true_fwd") == 1.0
  paper = flops.attention_macs(spec, convention="paper")
  true = flops.attention_macs(spec, convention="true_fwd")
  assert paper["scores"] == 4 * 128 * 128 * 16
  assert true["scores"] == 4 * (128 * 129 // 2) * 16
  assert true["proj_qk"] == paper["proj_qk"] == 128 * 2 * 64 * 64


# ----------------------------------------------------------------------------- pair counts


def test_swa_pairs_paper_and_true():
  T, w = 1024, 512
  spec = from_config(dict(variant="swa", num_heads=12, d_head=64, window=w), d_model=768,
                     seq_len=T)
  (paper,) = flops.pair_counts(spec, convention="paper")
  assert paper == T * (2 * w + 1) - w * (w + 1) == 786944
  assert paper == _brute_pairs(T, lambda i, j: np.abs(i - j) <= w)
  assert paper / T**2 == pytest.approx(0.7505, abs=1e-4)
  (true,) = flops.pair_counts(spec, convention="true_fwd")
  brute = _brute_pairs(T, lambda i, j: (j <= i) & (j >= i - w))
  assert true == brute == sum(min(i + 1, w + 1) for i in range(T))
  macs = flops.attention_macs(spec, convention="true_fwd")
  assert macs["scores"] == 12 * brute * 64
  assert macs["pv"] == 12 * 64 * brute


@pytest.mark.parametrize("T,w", [(16, 1), (16, 15), (16, 40), (33, 7)])
def test_window_pairs_small_and_capped(T, w):
  spec = from_config(dict(variant="swa", num_heads=1, d_head=4, window=w), d_model=4, seq_len=T)
  assert flops.pair_counts(spec, convention="paper")[0] == _brute_pairs(
      T, lambda i, j: np.abs(i - j) <= w)
  assert flops.pair_counts(spec, convention="true_fwd")[0] == _brute_pairs(
      T, lambda i, j: (j <= i) & (j >= i - w))


@pytest.mark.parametrize("T", [1, 7, 64, 1024])
def test_mha_causal_pairs(T):
  spec = from_config(dict(variant="mha", num_heads=2, d_head=8), d_model=16, seq_len=T)
  assert flops.pair_counts(spec, convention="true_fwd") == (T * (T + 1) // 2,)
  assert flops.pair_counts(spec, convention="true_fwd")[0] == _brute_pairs(T, lambda i, j: j <= i)
  assert flops.pair_counts(spec, convention="paper") == (T * T,)
  noncausal = from_config(dict(variant="mha", num_heads=2, d_head=8, causal=False), d_model=16,
                          seq_len=T)
  assert flops.pair_counts(noncausal, convention="true_fwd") == (T * T,)


def _mlr_prefix_width_brute(T, ranks, sizes, causal):
  i = np.arange(T)[:, None]
  j = np.arange(T)[None, :]
  width = np.zeros((T, T), dtype=np.int64)
  for r, b in zip(ranks, sizes):
    width += r * (i // b == j // b)
  if causal:
    width = np.where(j <= i, width, 0)
  return int(width.sum())


def test_mlr_block_counts_brute_force():
  T, ranks, H = 64, (8, 4, 4), 3
  spec = from_config(dict(variant="mlr", num_heads=H, d_head=16, mlr_ranks=ranks), d_model=48,
                     seq_len=T)
  assert spec.block_sizes() == (64, 32, 16)
  sizes = spec.block_sizes()
  true = flops.attention_macs(spec, convention="true_fwd")
  paper = flops.attention_macs(spec, convention="paper")
  assert true["scores"] == H * _mlr_prefix_width_brute(T, ranks, sizes, causal=True)
  assert paper["scores"] == H * _mlr_prefix_width_brute(T, ranks, sizes, causal=False)
  assert true["pv"] == H * 16 * (T * (T + 1) // 2)
  assert flops.pair_counts(spec, convention="true_fwd") == (
      T * (T + 1) // 2, 2 * 32 * 33 // 2, 4 * 16 * 17 // 2)


def test_uneven_blocks_counted_exactly():
  # T not a multiple of the block size: full blocks plus the remainder block.
  spec = from_config(dict(variant="mlr", num_heads=1, d_head=8, mlr_ranks=(4, 4),
                          mlr_block_sizes=(0, 16)), d_model=8, seq_len=64)
  T = 40
  assert flops.pair_counts(spec, T, "paper")[1] == _brute_pairs(T, lambda i, j: i // 16 == j // 16)
  assert flops.pair_counts(spec, T, "true_fwd")[1] == _brute_pairs(
      T, lambda i, j: (i // 16 == j // 16) & (j <= i))


def test_gswa_sum_counts_two_pv():
  T, w = 128, 16
  cfg = dict(variant="gswa", num_heads=2, d_head=8, gswa_split=(4, 4), window=w)
  spec = from_config(cfg, d_model=16, seq_len=T)
  assert spec.combine == "sum"
  g, win = flops.pair_counts(spec, convention="true_fwd")
  assert g == T * (T + 1) // 2
  assert win == _brute_pairs(T, lambda i, j: (j <= i) & (j >= i - w))
  macs = flops.attention_macs(spec, convention="true_fwd")
  assert macs["pv"] == 2 * 8 * (g + win)
  assert macs["scores"] == 2 * (g * 4 + win * 4)
  renorm = from_config(dict(cfg, gswa_combine="renorm"), d_model=16, seq_len=T)
  assert flops.attention_macs(renorm, convention="true_fwd")["pv"] == 2 * 8 * g


# ----------------------------------------------------------------------------- parameters


def test_mha_params_by_hand():
  spec = from_config(dict(variant="mha", num_heads=4, d_head=16), d_model=64, seq_len=32)
  p = flops.attention_params(spec)
  assert p == dict(qk=2 * 64 * 64, v=64 * 64, o=64 * 64, norm=2 * 16,
                   total=2 * 64 * 64 + 2 * 64 * 64 + 2 * 16)
  no_norm = from_config(dict(variant="mha", num_heads=4, d_head=16, qk_norm=False), d_model=64,
                        seq_len=32)
  assert flops.attention_params(no_norm)["norm"] == 0


def test_bilinear_btt_params_by_hand():
  spec = from_config(dict(variant="bilinear_btt", num_heads=2, d_head=32, btt_rank=1),
                     d_model=64, seq_len=32)
  p = flops.attention_params(spec)
  assert p["qk"] == 2 * 1 * 64 * (4 + 16)
  # core shapes (c, d, H*b*s) = (4, 16, 32) and (H*b, a, c*s) = (32, 4, 4)
  assert p["qk"] == 4 * 16 * 32 + 32 * 4 * 4
  assert p["v"] == p["o"] == 64 * 64
  assert p["norm"] == 2 * 64
  # Per token the key BTT map costs its parameter count; scores use width D per head.
  T = 32
  macs = flops.attention_macs(spec, convention="paper")
  assert macs["proj_qk"] == T * p["qk"]
  assert macs["scores"] == 2 * T * T * 64


def test_bilinear_mlr_params_by_hand():
  spec = from_config(dict(variant="bilinear_mlr", num_heads=2, d_head=32, bmlr_ranks=(4, 2)),
                     d_model=64, seq_len=32)
  p = flops.attention_params(spec)
  assert p["qk"] == 2 * (64 * 2 * 4 + 64 * 2 * 2)
  assert spec.d_qk == 4 * 1 + 2 * 2
  assert p["norm"] == 2 * 8
  assert p["total"] == p["qk"] + 2 * 64 * 64 + 16


# ----------------------------------------------------------------------------- summaries


def test_attention_flops_summary():
  spec = from_config(PAPER_MLR, d_model=768, seq_len=1024)
  out = flops.attention_flops(spec)
  paper, true = out["paper"], out["true_fwd"]
  for d in (paper, true):
    assert d["total"] == sum(v for k, v in d.items() if k != "total")
  assert out["paper_macs_per_token"] == paper["total"] / 1024
  assert out["train_flops_per_token"] == 6 * true["total"] / 1024
  assert out["params"] == flops.attention_params(spec)["total"]
  assert true["scores"] < paper["scores"] and true["pv"] < paper["pv"]
  # Evaluating at another T uses the stored block sizes.
  assert flops.attention_macs(spec, 2048)["proj_v"] == 2 * paper["proj_v"]


def test_kernel_flops_by_hand():
  assert flops.kernel_flops(1, 1, 1024, 64) == 2 * 1024 * 1024 * 64
  assert flops.kernel_flops(1, 1, 1024, 64, causal=False) == 4 * 1024 * 1024 * 64
  assert flops.kernel_flops(2, 3, 128, 32, causal=False, backward=True) == (
      int(3.5 * 4 * 2 * 3 * 128 * 128 * 32))
  assert flops.kernel_flops(1, 1, 1024, 64, backward=True) == 7 * 1024 * 1024 * 64


@pytest.mark.parametrize("fn", [
    lambda s: flops.attention_macs(s, convention="causal"),
    lambda s: flops.qk_mac_ratio(s, convention="true"),
    lambda s: flops.pair_counts(s, convention="Paper"),
])
def test_bad_convention_raises(fn):
  spec = from_config(dict(variant="mha", num_heads=2, d_head=8), d_model=16, seq_len=16)
  with pytest.raises(ValueError, match="convention"):
    fn(spec)


def test_bad_seq_len_raises():
  spec = from_config(dict(variant="mha", num_heads=2, d_head=8), d_model=16, seq_len=16)
  with pytest.raises(ValueError, match="T="):
    flops.attention_macs(spec, 0)
