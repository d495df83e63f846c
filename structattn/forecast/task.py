"""The forecasting task for the shared loop (config.task='forecast').

    structattn-train --config=forecast:etth1-96-mlr --workdir=runs/etth1-96-mlr
    setup = build(config)   # structattn.tasks.TaskSetup

Training loss: MSE over (windows, horizon, channels) of the standardised series, dropout
`model.dropout` keyed by the batch's (seed, stream position). Train batches are gathered on
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


def make_loss(dropout_rate: float):
  def loss(params, graphdef, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    key = _key(batch) if dropout_rate > 0 else None
    pred_BHC = model(batch["x_BLC"], key, dropout_rate)
    return jnp.mean(jnp.square(pred_BHC - batch["y_BHC"].astype(jnp.float32)))
  return loss


def eval_metrics(params, graphdef, rest, batch):
  model = nnx.merge(graphdef, params, rest)
  err_BHC = model(batch["x_BLC"]) - batch["y_BHC"].astype(jnp.float32)
  return {"se": jnp.mean(jnp.square(err_BHC), axis=(1, 2)),
          "ae": jnp.mean(jnp.abs(err_BHC), axis=(1, 2)), "valid": batch["valid_B"]}


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
      attention_pattern=m.get("attention_pattern", ""))


def build(config: ml_collections.ConfigDict) -> tasks_lib.TaskSetup:
  d = config.data
  seq_len, horizon = int(d.seq_len), int(d.horizon)
  info = fdata.dataset_info(d.dataset)
  pipeline = d.get("pipeline", "host")  # configs written before data.pipeline: host batches
  if pipeline not in fdata.PIPELINES:
    raise ValueError(f"data.pipeline={pipeline!r} is invalid: allowed values are "
                     f"{fdata.PIPELINES}")
  # Cheap checks before any file is parsed or any model built: the CSV, its columns, the
  # split arithmetic of the documented row count.
  path = fdata.csv_path(d.dataset, d.data_dir)
  fdata.check_columns(path, info.date, tuple(d.columns) or info.columns)
  model = build_model(config)
  splits = fdata.load_splits(d.dataset, d.data_dir, seq_len, tuple(d.columns), d.source,
                             d.get("tfds_dir", "") or None)
  fdata.check_horizon(horizon, splits.borders, seq_len, d.dataset)
  windows = {k: fdata.Windows(splits[k], seq_len, horizon) for k in fdata.SPLITS}
  bs, ebs = int(config.train.batch_size), int(config.eval.batch_size)
  if pipeline == "device":
    data = {"batch_fn": fdata.device_batch_fn(windows["train"], bs)}
  else:
    data = {"train_batches": fdata.TrainBatches(windows["train"], bs, int(config.seed))}
  c = len(splits.columns)
  macs = model.macs_per_series()
  counts = model.param_counts()
  naive = fdata.repeat_last_baseline(windows["test"], drop_last_batch=bs)
  return tasks_lib.TaskSetup(
      model=model, loss=make_loss(float(config.model.get("dropout", 0.0))),
      eval_metrics=eval_metrics, summarize=functools.partial(summarize, drop_last_batch=bs),
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
            "model/num_patches": model.n,
            "baseline/test_mse_repeat_last": naive["mse"],
            "baseline/test_mae_repeat_last": naive["mae"],
            "baseline/test_mse_repeat_last_drop_last": naive.get("mse_drop_last"),
            "compute/paper_macs_per_window": c * macs["paper"],
            "compute/train_flops_per_window": 6 * c * macs["true_fwd"]})
