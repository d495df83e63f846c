"""Language-modelling configs (big_vision style).

    structattn-train --config=configs/lm.py:tiny --workdir=runs/tiny
    structattn-train --config=configs/lm.py:paper-mlr-512 --workdir=runs/mlr512 \\
        --config.train.lr=3e-3

Presets (`get_config(arg)`):
  tiny                 a 2-layer character model on Shakespeare; about a minute on a CPU.
  tiny-<variant>       the same with attention variant mha|swa|gswa|mlr|bilinear_mlr|bilinear_btt.
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

from structattn import sharding

PAPER_WIDTHS = (256, 384, 512, 768)
PAPER_VARIANTS = ("mha", "swa", "gswa", "mlr")


def attention_config(variant: str = "mha") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant=variant, num_heads=4, d_head=0, d_qk=0, qk_norm=True, scale="", causal=True,
      impl="auto", window=512, gswa_split=(32, 32), gswa_combine="sum",
      mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2), mlr_block_sizes=(), mlr_divide="block",
      bmlr_ranks=(8, 8, 8, 8), btt_rank=1, btt_rms_cap=True))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, num_layers=2, seq_len=128, mlp_ratio=4, pos="learned", tie_embeddings=False,
      dtype="auto", attention_pattern=""))
  c.attention = attention_config("mha")
  c.data = ml_collections.ConfigDict(dict(
      corpus="shakespeare", tokenizer="char96", data_dir="", val_fraction=0.05, text_key="text",
      tfds_name=""))
  c.train = ml_collections.ConfigDict(dict(
      steps=500, batch_size=16, grad_accum=1, lr=1e-2, warmup_steps=20, schedule="constant",
      min_lr_ratio=0.0, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      parametrization="mup", base_width=768))
  c.eval = ml_collections.ConfigDict(dict(every=250, batches=8, batch_size=16))
  c.log_every = 10
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.progress = True
  # Scale-out (docs/scaling-out.md): mesh sizes data/fsdp/tensor (-1 = the rest of the
  # devices; all 1 = one device, unsharded), `devices` = use only the first n devices (0 =
  # all), and the logical axis rules (structattn.sharding.DEFAULT_RULES).
  c.mesh, c.sharding = sharding.config_sections()
  return c


def paper(variant: str, width: int) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(d_model=width, num_layers=6, seq_len=1024)
  c.attention = attention_config(variant)
  c.attention.update(num_heads=width // 64, d_head=64)
  c.train.update(steps=100_000, batch_size=32, lr=3e-3, warmup_steps=2000, eps=1e-20)
  c.eval.update(every=2000, batches=16, batch_size=32)
  c.log_every = 100
  c.checkpoint_every = 2000
  return c


def sweep_scaling(scale: str) -> ml_collections.ConfigDict:
  """The LM scaling sweep: variants x widths (x learning rates at paper scale); each run's
  eval curve against non-embedding compute feeds the frontier fit."""
  if scale == "tiny":
    c = get_config("tiny-mha")
    c.model.update(num_layers=2, seq_len=128)
    c.train.update(steps=200, batch_size=16, warmup_steps=20)
    c.eval.update(every=50, batches=4, batch_size=16)
    c.log_every, c.checkpoint_every = 50, 200
    widths, lrs = (32, 64), (1e-2,)
    variants = PAPER_VARIANTS
    c.attention.num_heads = 2
  elif scale == "short":
    c = paper("mha", 256)
    c.train.update(steps=1500, batch_size=16, warmup_steps=150)
    c.eval.update(every=100, batches=8, batch_size=16)
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
  arg = (arg or "tiny").strip()
  if arg in ("sweep-scaling-tiny", "sweep-scaling-short", "sweep-scaling-paper"):
    return sweep_scaling(arg.rsplit("-", 1)[1])
  parts = arg.split("-")
  if parts[0] == "tiny" and len(parts) <= 2:
    c = base_config()
    if len(parts) == 2:
      c.attention = attention_config(parts[1])
      c.attention.window = 32
      c.attention.gswa_split = (8, 8)
      c.attention.mlr_ranks = (8, 4, 2, 2)
      c.attention.bmlr_ranks = (4, 4)
    return c
  if parts[0] == "paper" and len(parts) == 3 and parts[1] in PAPER_VARIANTS:
    try:
      width = int(parts[2])
    except ValueError:
      width = -1
    if width in PAPER_WIDTHS:
      return paper(parts[1], width)
  raise ValueError(
      f"unknown preset {arg!r} for configs/lm.py: allowed presets are 'tiny', "
      f"'tiny-<variant>', 'paper-<variant>-<width>' with variant in {PAPER_VARIANTS} and "
      f"width in {PAPER_WIDTHS}, 'sweep-scaling-tiny', 'sweep-scaling-short' and 'sweep-scaling-paper'")
