"""The forecasting task for the shared loop (config.task='forecast').

    structattn-train --config=forecast:etth1-96-mlr --workdir=runs/etth1-96-mlr
    setup = build(config)   # structattn.tasks.TaskSetup

Training loss: MSE over (windows, forecast steps, channels) of the standardised series,
dropout `model.dropout` keyed by the batch's (seed, stream position), the model in train mode
(BatchNorm on batch statistics). Train batches are gathered on
device inside the compiled step (`data.pipeline='device'`, `data.device_batch_fn`) or built
on the host (`'host'`, `data.TrainBatches`; also what configs without the field get).
Held-out metrics per window (MSE and MAE over horizon x channels); `summarize` gives
`{prefix}/mse`, `{prefix}/mae`, their standard errors over windows (windows overlap, so the
SEM understates the uncertainty), the window count, and the same MSE / MAE without the last
partial batch of `train.batch_size` windows (`*_drop_last`, the reference code's protocol).
The loop evaluates the val split during training (`eval/...`) and the full test split once
at the end (`test/mse`, `test/mae` in result.json). Compute: per window (all channels),
`paper_macs_per_unit` = forward MACs of the encoder (paper convention, patch embedding and
head excluded), `train_flops_per_unit` = 6 x exact forward MACs including embedding and
head.

BatchNorm (`model.norm='batch'`, `model.encoder='patchtst'`): the loop's `loss(params,
graphdef, rest, batch)` returns the loss only and holds the non-parameter state `rest`
fixed, so running statistics cannot be carried through it. Evaluation therefore recomputes
them (`model.bn_stats_windows` = R > 0): before scoring a batch, the model makes one
train-mode pass (dropout on, a fixed key) over R train windows drawn once with the run's
seed, and its BatchNorm layers use those batch statistics (what PyTorch's running
statistics with momentum 0.1 average over the last ~10 training batches; R = 1280 is ten
batches of 128). `make_loss_and_rest` is the same loss returning (loss, rest updated by the
batch), for a loop that threads `rest`; with it, `model.bn_stats_windows=0` evaluates on the
carried running statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from structattn import tasks as tasks_lib
from structattn.forecast import data as fdata
from structattn.forecast.model import PatchForecaster


def _key(batch):
  """Dropout key from the batch's first (seed, stream position) row (distinct per step and
  per gradient-accumulation micro-batch)."""
  seed_B2 = batch["seed_B2"]
  return jax.random.fold_in(jax.random.key(seed_B2[0, 0]), seed_B2[0, 1])


def make_loss_and_rest(dropout_rate: float):
  """loss_and_rest(params, graphdef, rest, batch) -> (MSE, rest after the train-mode pass)."""
  def loss_and_rest(params, graphdef, rest, batch):
    # copy: fresh Variables at this trace level, so BatchNorm may update its statistics
    # even when `rest` is a constant of an outer trace (the loop closes over it)
    model = nnx.merge(graphdef, params, rest, copy=True)
    key = _key(batch) if dropout_rate > 0 else None
    pred_BFC = model(batch["x_BXC"], key, dropout_rate, train=True)
    loss = jnp.mean(jnp.square(pred_BFC - batch["y_BFC"].astype(jnp.float32)))
    return loss, nnx.state(model, nnx.Not(nnx.Param))
  return loss_and_rest


def make_loss(dropout_rate: float):
  loss_and_rest = make_loss_and_rest(dropout_rate)

  def loss(params, graphdef, rest, batch):
    return loss_and_rest(params, graphdef, rest, batch)[0]
  return loss


def make_eval_metrics(reference_x=None, dropout_rate: float = 0.0, seed: int = 0):
  """Per-window squared and absolute errors; with `reference_x` (train windows, x_BXC)
  BatchNorm layers first take the statistics of a train-mode pass over them."""
  def metrics(params, graphdef, rest, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)  # see make_loss_and_rest
    if reference_x is not None:
      key = jax.random.fold_in(jax.random.key(seed), 0x5EED) if dropout_rate > 0 else None
      model.set_batch_stats(jnp.asarray(reference_x), key, dropout_rate)
    err_BFC = model(batch["x_BXC"], train=False) - batch["y_BFC"].astype(jnp.float32)
    return {"se": jnp.mean(jnp.square(err_BFC), axis=(1, 2)),
            "ae": jnp.mean(jnp.abs(err_BFC), axis=(1, 2)), "valid": batch["valid_B"]}
  return metrics


eval_metrics = make_eval_metrics()


def reference_windows(windows: fdata.Windows, count: int, seed: int) -> np.ndarray:
  """x_BXC of `count` train windows drawn without replacement with `seed` (all if fewer)."""
  rng = np.random.default_rng([int(seed), 0xB47C])
  idx = np.sort(rng.permutation(len(windows))[:min(int(count), len(windows))])
  return windows.batch(idx)[0]


def summarize(arrays, prefix: str = "eval", drop_last_batch: int = 0) -> dict[str, float]:
  """Mean per-window MSE / MAE over the real (unpadded) windows, with standard errors.

  drop_last_batch=B > 0 also reports `{prefix}/mse_drop_last` and `mae_drop_last` over the
  first floor(N / B) * B windows only: what the PatchTST reference code scores (its test
  loader keeps shuffle off and drop_last on at the training batch size), for comparison with
  published numbers."""
  valid = np.asarray(arrays["valid"]) > 0
  se, ae = np.asarray(arrays["se"])[valid], np.asarray(arrays["ae"])[valid]
  mse, mse_sem = tasks_lib.mean_and_sem(se)
  mae, mae_sem = tasks_lib.mean_and_sem(ae)
  out = {f"{prefix}/mse": mse, f"{prefix}/mse_sem": mse_sem, f"{prefix}/mae": mae,
         f"{prefix}/mae_sem": mae_sem, f"{prefix}/windows": int(valid.sum())}
  kept = fdata.drop_last_count(len(se), drop_last_batch)
  if kept:
    out.update({f"{prefix}/mse_drop_last": float(np.mean(se[:kept])),
                f"{prefix}/mae_drop_last": float(np.mean(ae[:kept])),
                f"{prefix}/windows_drop_last": int(kept)})
  return out


def build_model(config, num_channels: int | None = None) -> PatchForecaster:
  m, d = config.model, config.data
  for field in ("d_model", "num_layers", "mlp_ratio"):
    if float(m.get(field, 0)) <= 0:
      raise ValueError(f"model.{field}={m.get(field)!r} is invalid: must be a positive integer")
  if not 0.0 <= float(m.get("dropout", 0.0)) < 1.0:
    raise ValueError(f"model.dropout={m.dropout!r} is invalid: allowed values are [0, 1)")
  attn = config.attention.to_dict() if hasattr(config.attention, "to_dict") else config.attention
  return PatchForecaster(
      int(d.seq_len), int(d.horizon), int(m.d_model), int(m.num_layers),
      int(m.mlp_ratio * m.d_model), attn,
      rngs=nnx.Rngs(int(config.seed)), patch_len=int(m.patch_len), stride=int(m.stride),
      revin=bool(m.revin), pre_norm=bool(m.pre_norm),
      attention_pattern=m.get("attention_pattern", ""), encoder=m.get("encoder", "gpt"),
      norm=m.get("norm", "layer"), residual_attention=bool(m.get("residual_attention", False)))


def build(config: ml_collections.ConfigDict) -> tasks_lib.TaskSetup:
  d = config.data
  seq_len, horizon = int(d.seq_len), int(d.horizon)
  info = fdata.dataset_info(d.dataset)
  pipeline = d.get("pipeline", "host")  # configs written before data.pipeline: host batches
  if pipeline not in fdata.PIPELINES:
    raise ValueError(f"data.pipeline={pipeline!r} is invalid: allowed values are "
                     f"{fdata.PIPELINES}")
  drop_last = bool(d.get("drop_last", False))
  if drop_last and pipeline != "device":
    raise ValueError(f"data.drop_last=True is invalid with data.pipeline={pipeline!r}: "
                     f"allowed values are ('device',)")
  # Cheap checks before any file is parsed or any model built: the CSV, its columns, the
  # split arithmetic of the documented row count.
  csv_dir = fdata.csv_dir_of(d)
  path = fdata.csv_path(d.dataset, csv_dir)
  fdata.check_columns(path, info.date, tuple(d.columns) or info.columns)
  model = build_model(config)
  splits = fdata.load_splits(d.dataset, csv_dir, seq_len, tuple(d.columns), d.source,
                             d.get("tfds_dir", "") or None)
  fdata.check_horizon(horizon, splits.borders, seq_len, d.dataset)
  windows = {k: fdata.Windows(splits[k], seq_len, horizon) for k in fdata.SPLITS}
  bs, ebs = int(config.train.batch_size), int(config.eval.batch_size)
  if pipeline == "device":
    data = {"batch_fn": fdata.device_batch_fn(windows["train"], bs, drop_last)}
  else:
    data = {"train_batches": fdata.TrainBatches(windows["train"], bs, int(config.seed))}
  c = len(splits.columns)
  macs = model.macs_per_series()
  counts = model.param_counts()
  naive = fdata.repeat_last_baseline(windows["test"], drop_last_batch=bs)
  rate = float(config.model.get("dropout", 0.0))
  ref_count = int(config.model.get("bn_stats_windows", 0)) if model.has_batch_norm else 0
  ref_x = reference_windows(windows["train"], ref_count, int(config.seed)) if ref_count else None
  return tasks_lib.TaskSetup(
      model=model, loss=make_loss(rate),
      eval_metrics=make_eval_metrics(ref_x, rate, int(config.seed)),
      summarize=functools.partial(summarize, drop_last_batch=bs),
      eval_batches=fdata.eval_batches(windows["val"], ebs), **data,
      test_batches=fdata.eval_batches(windows["test"], ebs),
      units_per_step=bs, unit="windows",
      paper_macs_per_unit=c * macs["paper"], train_flops_per_unit=6 * c * macs["true_fwd"],
      final={"eval/mse": "final/val_mse", "eval/mae": "final/val_mae",
             "eval/mse_sem": "final/val_mse_sem", "eval/mae_sem": "final/val_mae_sem"},
      select="eval/mse",
      info={"params/total": counts["total"], "params/non_embedding": counts["non_embedding"],
            "params/encoder": counts["encoder"], "params/head": counts["head"],
            "data/source": splits.source, "data/sha256": splits.sha256,
            "data/pipeline": pipeline,
            "data/channels": list(splits.columns), "data/borders": splits.borders,
            "data/windows": {k: len(w) for k, w in windows.items()},
            "model/num_patches": model.n, "model/bn_stats_windows": ref_count,
            "data/drop_last": drop_last,
            "baseline/test_mse_repeat_last": naive["mse"],
            "baseline/test_mae_repeat_last": naive["mae"],
            "baseline/test_mse_repeat_last_drop_last": naive.get("mse_drop_last"),
            "compute/paper_macs_per_window": c * macs["paper"],
            "compute/train_flops_per_window": 6 * c * macs["true_fwd"]})
