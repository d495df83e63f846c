"""In-context regression configs (big_vision style).

    structattn-train --config=icr:tiny --workdir=runs/icr-tiny
    structattn-train --config=icr:paper-bilinear_mlr-64-256 --workdir=runs/icr

Presets (`get_config(arg)`):
  tiny                       d_input 8, width 32, 3 layers, MHA with 1 head; ~2 min on a CPU.
  tiny-<variant>             the same with variant mha|bilinear_btt|bilinear_mlr.
  paper-<variant>-<d>-<D>    the paper's setting: 6 pre-LN layers of width D, d_input d, N = 2d,
                             batch 64, curriculum from d=4, N=8 raised every 2000 steps and
                             complete by 6% of training, warmup 1000, constant LR, AdamW(0.9,
                             0.95), muP; MHA 8 heads, bilinear BTT 8 heads, bilinear MLR.
muP here takes base width 64 (the LR is the one tuned at width 64; measured on CPU, the
LM's base 768 over-scales hidden LRs of these narrow models) and treats the read-in as an
input embedding (base LR: its fan-in is d_input, not the width).
Sweeps (a config with a `sweep` list of override sets, run by `structattn-sweep`); the
`paper` sweeps keep the paper's model and task but train 8000 steps (sized for one H100 and a
few minutes; `--set train.steps=500000` restores the paper's length):
  sweep-head-dim-<tiny|paper>   finding (a): MHA error against head dim r = D / heads for
                                several d_input.
  sweep-compute-<tiny|paper>    finding (b): error against compute for MHA, bilinear BTT and
                                bilinear MLR at several widths.
"""

import itertools

import ml_collections

from structattn.configs import common
from structattn.configs.presets import Presets

VARIANTS = ("mha", "bilinear_btt", "bilinear_mlr")
SCALES = ("tiny", "paper")
PRESETS = Presets("icr", default="tiny", label="ICR")


def attention_config(variant: str = "mha", num_heads: int = 8) -> ml_collections.ConfigDict:
  return common.attention(variant, num_heads=num_heads, qk_norm=False, window=0,
                          gswa_split=(4, 4), mlr_ranks=(), mlr_divide="none",
                          bmlr_ranks=(8, 4, 2, 2))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "icr"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(d_model=32, num_layers=3, mlp_ratio=4,
                                           attention_pattern=""))
  c.attention = attention_config("mha", num_heads=1)
  c.icr = ml_collections.ConfigDict(dict(
      d_input=8, n_points=0, d_start=4, n_start=8, curriculum_every=2000, curriculum_end=0.06,
      noise_std=0.0, pool_size=0))
  c.train = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=64, grad_accum=1, lr=1e-3, warmup_steps=100, schedule="constant",
      min_lr_ratio=0.0, clip_norm=0.0, b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.0,
      parametrization="mup", base_width=64, compute_budget=0.0, steps_per_call=250))
  c.eval = ml_collections.ConfigDict(dict(batches=1, batch_size=1024, seed=1234,
                                          baselines=True))
  c.log_every = 250
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.progress = True
  return common.add_mesh(c)


@PRESETS.add("tiny")
def tiny() -> ml_collections.ConfigDict:
  """d_input 8, width 32, 3 layers, MHA with 1 head; about 2 minutes on a CPU."""
  return base_config()


@PRESETS.add("tiny-{variant}", variant=VARIANTS)
def tiny_variant(variant: str) -> ml_collections.ConfigDict:
  """The tiny model with another attention variant."""
  return with_variant(base_config(), variant)


def with_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"ICR variant {variant!r} is invalid: allowed values are {VARIANTS}")
  c.attention.variant = variant
  return c


@PRESETS.add("paper-{variant}-{d_input}-{width}", variant=VARIANTS)
def paper(variant: str, d_input: int, width: int) -> ml_collections.ConfigDict:
  """The paper's setting: 6 layers of width D, d_input d, N = 2d, 500k steps."""
  c = base_config()
  c.model.update(d_model=width, num_layers=6)
  c.icr.d_input = d_input
  c = with_variant(c, variant)
  c.attention.num_heads = 8
  c.attention.bmlr_ranks = bmlr_ranks(width)
  c.train.update(steps=500_000, lr=1e-3, warmup_steps=1000, steps_per_call=500)
  c.eval.update(batches=2, batch_size=1024)
  c.icr.pool_size = 32_000_000
  c.eval_every = 5000
  c.log_every = 1000
  c.checkpoint_every = 10_000
  return c


def bmlr_ranks(width: int) -> tuple:
  """Bilinear-MLR level ranks for width D (the paper's D=256 example is 8|8|8|8): four levels
  whose finest splits D into 8 blocks, total rank D/8."""
  r = max(1, width // 32)
  return (r, r, r, r)


# ------------------------------------------------------------------------------------ sweeps


@PRESETS.add("sweep-head-dim-{scale}", scale=SCALES)
def sweep_head_dim(scale: str) -> ml_collections.ConfigDict:
  """Finding (a): MHA, width D fixed, heads H varied so the head dim r = D/H crosses d_input."""
  if scale == "tiny":
    c = base_config()
    c.model.update(d_model=32, num_layers=3)
    c.train.update(steps=3000, lr=1e-3, warmup_steps=100)
    c.eval_every = 500
    c.eval.update(batches=1, batch_size=512)
    d_inputs, heads, seeds = (16,), (8, 2, 1), (0,)
  else:
    c = paper("mha", 32, 128)
    c.train.update(steps=8000, lr=1e-3)
    c.eval_every = 1000
    d_inputs, heads, seeds = (16, 32), (32, 8, 4, 1), (0,)
  c.sweep_name = f"icr-head-dim-{scale}"
  c.sweep = [{"icr.d_input": d, "attention.num_heads": h, "seed": s}
             for d, h, s in itertools.product(d_inputs, heads, seeds)]
  return c


@PRESETS.add("sweep-compute-{scale}", scale=SCALES,
             doc="Finding (b): error against compute for MHA, bilinear BTT and bilinear MLR.")
def sweep_compute(scale: str) -> ml_collections.ConfigDict:
  """Finding (b): error against compute for MHA, bilinear BTT and bilinear MLR at several
  widths; each run's eval curve is one error-vs-compute line."""
  if scale == "tiny":
    c = base_config()
    c.model.update(num_layers=3)
    c.icr.d_input = 16
    c.train.update(steps=2000, lr=1e-3, warmup_steps=100)
    c.eval_every = 250
    c.eval.update(batches=1, batch_size=512)
    widths, lrs = (32,), (1e-3,)  # width 16 learns nothing in 2000 steps (measured)
  else:
    c = paper("mha", 32, 128)
    c.train.update(steps=8000, lr=1e-3)
    c.eval_every = 500
    widths, lrs = (64, 128, 256), (1e-3,)
  c.attention.num_heads = 8  # the paper's MHA and bilinear BTT use 8 heads
  c.sweep_name = f"icr-compute-{scale}"
  c.sweep = [{"attention.variant": v, "model.d_model": w, "attention.bmlr_ranks": bmlr_ranks(w),
              "train.lr": lr}
             for v, w, lr in itertools.product(VARIANTS, widths, lrs)]
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return PRESETS.build(arg)
