"""In-context regression configs (big_vision style; SPEC section 4).

    structattn-train --config=configs/icr.py:tiny --workdir=runs/icr-tiny
    structattn-train --config=configs/icr.py:paper-bilinear_mlr-64-256 --workdir=runs/icr

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

from structattn import sharding

VARIANTS = ("mha", "bilinear_btt", "bilinear_mlr")


def attention_config(variant: str = "mha", num_heads: int = 8) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant=variant, num_heads=num_heads, d_head=0, d_qk=0, qk_norm=False, scale="",
      causal=True, impl="auto", window=0, mlr_ranks=(), mlr_block_sizes=(), mlr_divide="none",
      bmlr_ranks=(8, 4, 2, 2), btt_rank=1, btt_rms_cap=True))


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
  c.eval = ml_collections.ConfigDict(dict(every=500, num_prompts=1024, batch_size=1024,
                                          seed=1234, baselines=True))
  c.log_every = 250
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.progress = True
  # Scale-out (docs/scaling-out.md): mesh sizes data/fsdp/tensor (-1 = the rest of the
  # devices; all 1 = one device, unsharded), `devices` = use only the first n devices (0 =
  # all), and the logical axis rules (structattn.sharding.DEFAULT_RULES).
  c.mesh, c.sharding = sharding.config_sections()
  return c


def with_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"ICR variant {variant!r} is invalid: allowed values are {VARIANTS}")
  c.attention.variant = variant
  return c


def paper(variant: str, d_input: int, width: int) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(d_model=width, num_layers=6)
  c.icr.d_input = d_input
  c = with_variant(c, variant)
  c.attention.num_heads = 8
  c.attention.bmlr_ranks = bmlr_ranks(width)
  c.train.update(steps=500_000, lr=1e-3, warmup_steps=1000, steps_per_call=500)
  c.eval.update(num_prompts=2048, batch_size=1024)
  c.icr.pool_size = 32_000_000
  c.eval.update(every=5000)
  c.log_every = 1000
  c.checkpoint_every = 10_000
  return c


def bmlr_ranks(width: int) -> tuple:
  """Bilinear-MLR level ranks for width D (the paper's D=256 example is 8|8|8|8): four levels
  whose finest splits D into 8 blocks, total rank D/8."""
  r = max(1, width // 32)
  return (r, r, r, r)


# ------------------------------------------------------------------------------------ sweeps


def sweep_head_dim(scale: str) -> ml_collections.ConfigDict:
  """Finding (a): MHA, width D fixed, heads H varied so the head dim r = D/H crosses d_input."""
  if scale == "tiny":
    c = base_config()
    c.model.update(d_model=32, num_layers=3)
    c.train.update(steps=3000, lr=1e-3, warmup_steps=100)
    c.eval.update(every=500, num_prompts=512, batch_size=512)
    d_inputs, heads, seeds = (16,), (8, 2, 1), (0,)
  else:
    c = paper("mha", 32, 128)
    c.train.update(steps=8000, lr=1e-3)
    c.eval.update(every=1000)
    d_inputs, heads, seeds = (16, 32), (32, 8, 4, 1), (0,)
  c.sweep_name = f"icr-head-dim-{scale}"
  c.sweep = [{"icr.d_input": d, "attention.num_heads": h, "seed": s}
             for d, h, s in itertools.product(d_inputs, heads, seeds)]
  return c


def sweep_compute(scale: str) -> ml_collections.ConfigDict:
  """Finding (b): error against compute for MHA, bilinear BTT and bilinear MLR at several
  widths; each run's eval curve is one error-vs-compute line."""
  if scale == "tiny":
    c = base_config()
    c.model.update(num_layers=3)
    c.icr.d_input = 16
    c.train.update(steps=2000, lr=1e-3, warmup_steps=100)
    c.eval.update(every=250, num_prompts=512, batch_size=512)
    widths, lrs = (32,), (1e-3,)  # width 16 learns nothing in 2000 steps (measured)
  else:
    c = paper("mha", 32, 128)
    c.train.update(steps=8000, lr=1e-3)
    c.eval.update(every=500)
    widths, lrs = (64, 128, 256), (1e-3,)
  c.attention.num_heads = 8  # the paper's MHA and bilinear BTT use 8 heads
  c.sweep_name = f"icr-compute-{scale}"
  c.sweep = [{"attention.variant": v, "model.d_model": w, "attention.bmlr_ranks": bmlr_ranks(w),
              "train.lr": lr}
             for v, w, lr in itertools.product(VARIANTS, widths, lrs)]
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  arg = (arg or "tiny").strip()
  parts = arg.split("-")
  if parts[0] == "tiny" and len(parts) <= 2:
    c = base_config()
    return with_variant(c, parts[1]) if len(parts) == 2 else c
  if parts[0] == "paper" and len(parts) == 4:
    try:
      return paper(parts[1], int(parts[2]), int(parts[3]))
    except ValueError as e:
      raise ValueError(f"ICR preset {arg!r}: {e}") from None
  if arg.startswith("sweep-head-dim-") and parts[-1] in ("tiny", "paper"):
    return sweep_head_dim(parts[-1])
  if arg.startswith("sweep-compute-") and parts[-1] in ("tiny", "paper"):
    return sweep_compute(parts[-1])
  raise ValueError(
      f"unknown ICR preset {arg!r}: allowed are tiny, tiny-<variant>, "
      f"paper-<variant>-<d_input>-<width> (variant in {VARIANTS}), sweep-head-dim-<tiny|paper>, "
      f"sweep-compute-<tiny|paper>")
