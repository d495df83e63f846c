"""Forecasting splits as a TFDS array_record dataset (no TensorFlow, nothing downloaded).

    splits = load_splits("etth1", "/data/timeseries", seq_len=512, tfds_dir=None)

`StructattnForecast` writes one example per (split, channel): {'channel': name, 'values':
float32 (rows,) standardised with train statistics, 'mean', 'std'}, computed by
`splits.splits_from_csv`, under `tfds_dir/structattn_forecast/<dataset>_<sha12>_L<seq_len>_
<columns hash>/1.0.0/` (tfds_dir '' -> $STRUCTATTN_DATA_DIR or ~/.cache/structattn/tfds). It
is built once and read back with `as_data_source` (random access), giving arrays equal to
the CSV path's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from structattn.data.text import _progress_bars_off, resolve_data_dir
from structattn.forecast import splits as fdata

log = logging.getLogger(__name__)


class ForecastConfig(tfds.core.BuilderConfig):
  """One dataset at one look-back: the CSV, its channels, seq_len."""

  def __init__(self, *, dataset: str, data_dir: str, seq_len: int, columns=(), **kwargs):
    super().__init__(**kwargs)
    self.dataset, self.csv_dir, self.seq_len = dataset, str(data_dir), int(seq_len)
    self.columns = tuple(columns)


with tfds.core.registered.skip_registration():

  class StructattnForecast(tfds.core.GeneratorBasedBuilder):
    """Standardised LTSF splits, one example per channel (see module docstring)."""

    name = "structattn_forecast"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LTSF splits, train-statistics standardisation."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)  # as in structattn/data/text.py (editable installs)

    def _info(self) -> tfds.core.DatasetInfo:
      c = self.builder_config
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"{c.dataset}: LTSF splits at look-back {c.seq_len}, one example per "
                      f"channel, standardised with train statistics.",
          features=tfds.features.FeaturesDict({
              "channel": tfds.features.Text(),
              "values": tfds.features.Tensor(shape=(None,), dtype=np.float32),
              # float64 statistics as exact decimal text (TFDS stores floats as float32)
              "mean": tfds.features.Text(), "std": tfds.features.Text()}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      c = self.builder_config
      splits = fdata.splits_from_csv(c.dataset, c.csv_dir, c.seq_len, c.columns)
      return {name: self._generate_examples(splits, name) for name in fdata.SPLITS}

    def _generate_examples(self, splits, name):
      values_TC = splits[name]
      for i, channel in enumerate(splits.columns):
        yield i, {"channel": channel, "values": values_TC[:, i], "mean": repr(float(splits.mean[i])),
                  "std": repr(float(splits.std[i]))}


def config_name(dataset: str, sha256: str, seq_len: int, columns) -> str:
  cols = hashlib.sha256("\0".join(columns).encode()).hexdigest()[:8] if columns else "all"
  return f"{dataset}_{sha256[:12]}_L{seq_len}_{cols}"


def builder(dataset: str, csv_dir, seq_len: int, columns=(), tfds_dir=None):
  """The prepared builder of one dataset at one look-back; built on first use."""
  path = fdata.csv_path(dataset, csv_dir)
  info = fdata.dataset_info(dataset)
  fdata.check_columns(path, info.date, tuple(columns) or info.columns)  # before building
  config = ForecastConfig(name=config_name(dataset, fdata.file_sha256(path), seq_len, columns),
                          dataset=dataset, data_dir=str(fdata.resolve_csv_dir(csv_dir) or ""),
                          seq_len=seq_len, columns=columns, version=StructattnForecast.VERSION)
  root = resolve_data_dir(tfds_dir)
  b = StructattnForecast(config=config, data_dir=str(root), file_format="array_record")
  if not b.is_prepared():
    log.info("Building %s from %s.", b.data_dir, path)
    with _progress_bars_off():
      b.download_and_prepare(download_dir=str(Path(root) / "downloads"),
                             download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return b, path


def load_splits(dataset: str, csv_dir, seq_len: int, columns=(), tfds_dir=None) -> fdata.Splits:
  """`splits.Splits` read back from the array_record dataset (built on first use)."""
  info = fdata.dataset_info(dataset)
  b, path = builder(dataset, csv_dir, seq_len, tuple(columns), tfds_dir)
  parts, means, stds, names = {}, None, None, None
  for split in fdata.SPLITS:
    source = b.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    names = tuple(_text(r["channel"]) for r in records)
    parts[split] = np.ascontiguousarray(np.stack([r["values"] for r in records], axis=1),
                                        np.float32)
    means = np.asarray([float(_text(r["mean"])) for r in records], np.float64)
    stds = np.asarray([float(_text(r["std"])) for r in records], np.float64)
  borders = _borders(info, parts, seq_len)
  return fdata.Splits(parts["train"], parts["val"], parts["test"], means, stds, names, borders,
                      "tfds", fdata.file_sha256(path))


def _borders(info, parts, seq_len):
  """Row ranges of the stored splits (their lengths determine the file's row count)."""
  n_train = parts["train"].shape[0]
  n_val = parts["val"].shape[0] - seq_len
  n_test = parts["test"].shape[0] - seq_len
  return fdata.split_borders(info.split, n_train + n_val + n_test, seq_len, info.name)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
