"""Language-modelling configs (big_vision style).

    structattn-train --config=lm:tiny --workdir=runs/tiny
    structattn-train --config=lm:paper-mlr-512 --workdir=runs/mlr512 --config.train.lr=3e-3

Presets (`get_config(arg)`):
  tiny                 a 2-layer character model on Shakespeare; about a minute on a CPU.
  tiny-<variant>       the same with attention variant mha|swa|gswa|mlr|bilinear_mlr|bilinear_btt|
                       mlbtc (three levels: global BTT, blocks of 64 and 16 with low rank).
  paper-<variant>-<D>  the paper's LM setting: 6 layers, d_head 64, width D in 256/384/512/768,
                       T=1024, 32,768 tokens per step, muP, AdamW(0.9, 0.95), warmup 2000,
                       constant LR, clip 1.0; variants mha, swa (w=512), gswa (32|32, w=512),
                       mlr (32|8|6|4|4|4|4|2, block_divide).
  sweep-scaling-<tiny|short|paper>
                       the scaling sweep (a `sweep` list for structattn-sweep /
                       structattn-reproduce lm-scaling): mha, swa, gswa, mlr x widths (x LRs).
                       tiny: 2 layers, T=128, widths 32/64 (CPU pipeline check, ~2 min).
                       short: the paper's architecture (6 layers, T=1024, d_head 64) at
                       widths 256/384/512/768, one LR (3e-3), 16 sequences per step for 1500
                       steps (24.6M tokens, ~5 epochs of Shakespeare): about 8 minutes on
                       one H100. Points are ordered width-major, so a cut-off run loses the
                       widest models first.
                       paper: widths 256..768 x LRs {1e-3, 3e-3, 1e-2}, 20k steps.
"""

import ml_collections

from structattn.configs import common
from structattn.configs.presets import Presets

PAPER_WIDTHS = (256, 384, 512, 768)
PAPER_VARIANTS = ("mha", "swa", "gswa", "mlr")
TINY_VARIANTS = ("mha", "swa", "gswa", "mlr", "bilinear_mlr", "bilinear_btt", "mlbtc")
SCALES = ("tiny", "short", "paper")
PRESETS = Presets("lm", default="tiny")


def attention_config(variant: str = "mha") -> ml_collections.ConfigDict:
  return common.attention(variant)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, num_layers=2, seq_len=128, mlp_ratio=4, pos="learned", pos_init="normal",
      tie_embeddings=False, dtype="auto", attention_pattern=""))
  c.attention = attention_config("mha")
  c.data = ml_collections.ConfigDict(dict(
      corpus="shakespeare", corpus_dir="", tokenizer="char96", tfds_dir="", val_fraction=0.05,
      text_key="text",
      tfds_name=""))
  c.train = ml_collections.ConfigDict(dict(
      steps=500, batch_size=16, grad_accum=1, lr=1e-2, warmup_steps=20, schedule="constant",
      min_lr_ratio=0.0, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      parametrization="mup", base_width=768))
  c.eval = ml_collections.ConfigDict(dict(batches=8, batch_size=16))
  c.log_every = 10
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.progress = True
  return common.add_mesh(c)


@PRESETS.add("tiny")
def tiny() -> ml_collections.ConfigDict:
  """A 2-layer character model on Shakespeare (MHA); about a minute on a CPU."""
  return base_config()


# A small MLBTC scoring function (T=128, d_head 16): a global BTT level and two nested block
# levels with low-rank features.
TINY_MLBTC_LEVELS = (dict(seq="global", size=0, kind="btt", rank=1, blocks=1),
                     dict(seq="block", size=64, kind="lowrank", rank=8, blocks=1),
                     dict(seq="block", size=16, kind="lowrank", rank=4, blocks=1))


@PRESETS.add("tiny-{variant}", variant=TINY_VARIANTS)
def tiny_variant(variant: str) -> ml_collections.ConfigDict:
  """The tiny model with another attention variant (small windows, ranks and levels)."""
  c = base_config()
  c.attention = common.attention(variant, window=32, gswa_split=(8, 8), mlr_ranks=(8, 4, 2, 2),
                                 bmlr_ranks=(4, 4), levels=TINY_MLBTC_LEVELS)
  return c


@PRESETS.add("paper-{variant}-{width}", variant=PAPER_VARIANTS, width=PAPER_WIDTHS)
def paper(variant: str, width: int) -> ml_collections.ConfigDict:
  """The paper's LM setting: 6 layers, d_head 64, T=1024, 100k steps (a GPU)."""
  c = base_config()
  c.model.update(d_model=width, num_layers=6, seq_len=1024)
  c.attention = attention_config(variant)
  c.attention.update(num_heads=width // 64, d_head=64)
  c.train.update(steps=100_000, batch_size=32, lr=3e-3, warmup_steps=2000, eps=1e-20)
  c.eval_every = 2000
  c.eval.update(batches=16, batch_size=32)
  c.log_every = 100
  c.checkpoint_every = 2000
  return c


@PRESETS.add("sweep-scaling-{scale}", scale=SCALES,
             doc="The scaling sweep: mha, swa, gswa, mlr x widths (x LRs); for lm-scaling.")
def sweep_scaling(scale: str) -> ml_collections.ConfigDict:
  """The LM scaling sweep: variants x widths (x learning rates at paper scale); each run's
  eval curve against non-embedding compute feeds the frontier fit."""
  if scale == "tiny":
    c = tiny_variant("mha")
    c.model.update(num_layers=2, seq_len=128)
    c.train.update(steps=200, batch_size=16, warmup_steps=20)
    c.eval_every = 50
    c.eval.update(batches=4, batch_size=16)
    c.log_every, c.checkpoint_every = 50, 200
    widths, lrs = (32, 64), (1e-2,)
    variants = PAPER_VARIANTS
    c.attention.num_heads = 2
  elif scale == "short":
    c = paper("mha", 256)
    c.train.update(steps=1500, batch_size=16, warmup_steps=150)
    c.eval_every = 100
    c.eval.update(batches=8, batch_size=16)
    c.log_every, c.checkpoint_every = 50, 500
    c.progress = False
    widths, lrs = PAPER_WIDTHS, (3e-3,)
    variants = PAPER_VARIANTS
  else:
    c = paper("mha", 256)
    c.train.update(steps=20_000)
    widths, lrs = PAPER_WIDTHS, (1e-3, 3e-3, 1e-2)
    variants = PAPER_VARIANTS
  c.sweep_name = f"lm-scaling-{scale}"
  def per_width(w):  # heads (paper: d_head 64) and MLR ranks summing to the head width
    if scale == "tiny":
      h = w // 2
      return {"attention.mlr_ranks": (h // 2, h // 4, h // 8, h // 8)}
    return {"attention.num_heads": w // 64}

  # Width-major: every variant's narrow models run before any wider one.
  c.sweep = [{"attention.variant": v, "model.d_model": w, "train.lr": lr, **per_width(w)}
             for w in widths for v in variants for lr in lrs]
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return PRESETS.build(arg)
