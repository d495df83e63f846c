"""What the shared training loop needs from a task (LM, in-context regression, forecasting).

A task turns a run config into a `TaskSetup`: the model, its training loss and held-out
metrics as pure functions of (params, graphdef, rest, batch), the data, and the compute
accounting.  `structattn.train.train(config, workdir)` runs any registered task:

    setup = tasks.build(config)          # dispatches on config.task ('lm' | 'icr' | 'forecast')

Data comes either as a checkpointable host iterator (`train_batches`: `next()`,
`get_state()` -> JSON-able, `set_state(state)`), or as a pure, jittable
`batch_fn(seed, step) -> batch` that the loop fuses into the compiled step (in-context
regression draws its prompts on device, so tiny models are not bound by the host).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

# config.task -> "module:function" building a TaskSetup (imported lazily: each task's data
# stack is only imported where it is used).
TASKS = {
    "lm": "structattn.tasks:build_lm",
    "icr": "structattn.icr.train:build",
    "forecast": "structattn.forecast.task:build",
}

Batch = Mapping[str, Any]


@dataclasses.dataclass
class TaskSetup:
  """A task's model, losses, data and compute accounting (see the module docstring)."""
  model: nnx.Module
  # loss(params, graphdef, rest, batch) -> scalar float32 training loss.
  loss: Callable[..., jax.Array]
  # eval_metrics(params, graphdef, rest, batch) -> {name: per-example array (leading axis)}.
  eval_metrics: Callable[..., dict[str, jax.Array]]
  # summarize({name: per-example arrays concatenated over batches}, prefix) -> logged floats.
  summarize: Callable[[dict[str, np.ndarray], str], dict[str, float]]
  eval_batches: Sequence[Batch]
  units_per_step: int  # tokens (LM), prompts (ICR), windows (forecast) per optimiser step
  unit: str
  paper_macs_per_unit: float  # forward non-embedding MACs (the paper's compute axis)
  train_flops_per_unit: float  # true training FLOPs (6 x forward MACs incl. heads)
  train_batches: Iterator[Batch] | None = None
  batch_fn: Callable[[Any, Any], Batch] | None = None  # (seed, step) -> batch, jittable
  test_batches: Sequence[Batch] | None = None  # scored once at the end, keys 'test/...'
  final: Mapping[str, str] = dataclasses.field(default_factory=dict)  # eval key -> result key
  # The eval metric to minimise when config.eval.select_best is on: the test split is then
  # scored with the parameters of the best evaluation (early stopping), not the last ones.
  select: str | None = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # extra result.json entries

  def __post_init__(self):
    if (self.train_batches is None) == (self.batch_fn is None):
      raise ValueError("a TaskSetup needs exactly one of train_batches and batch_fn")


def build(config: ml_collections.ConfigDict) -> TaskSetup:
  name = config.get("task", "lm")
  if name not in TASKS:
    raise ValueError(f"task={name!r} is invalid: allowed values are {sorted(TASKS)}")
  module, fn = TASKS[name].split(":")
  from structattn.configs.renames import migrate  # configs with the older keys
  return getattr(importlib.import_module(module), fn)(migrate(config))


def mean_and_sem(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  n = len(values)
  sem = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return float(values.mean()), sem


# ----------------------------------------------------------------------------------- LM task


def lm_eval_metrics(params, graphdef, rest, batch):
  """Per-sequence held-out cross-entropy (`train.eval_step`)."""
  from structattn.train import eval_step
  return {"loss": eval_step(params, batch, graphdef=graphdef, rest=rest)}


def lm_summarize(arrays: dict[str, np.ndarray], prefix: str = "eval") -> dict[str, float]:
  """Mean held-out loss over sequences and its standard error."""
  mean, sem = mean_and_sem(arrays["loss"])
  return {f"{prefix}/loss": mean, f"{prefix}/loss_sem": sem,
          f"{prefix}/sequences": int(len(arrays["loss"]))}


class _LazyTrainIterator:
  """The LM train iterator, built on first use (resume sets the state before)."""

  def __init__(self, data):
    self._data, self._it = data, None

  def _get(self):
    if self._it is None:
      self._it = self._data.train_iterator()
    return self._it

  def __next__(self):
    return next(self._get())

  def get_state(self):
    return self._get().get_state()

  def set_state(self, state):
    self._get().set_state(state)


def build_lm(config: ml_collections.ConfigDict) -> TaskSetup:
  from structattn import flops as flops_lib
  from structattn import lm_data
  from structattn.models.gpt import param_counts
  from structattn.train import build_model, loss_fn
  data = lm_data.build(config)  # validates the data config; fails fast on a missing corpus
  cfg, model = build_model(config, data.vocab_size)
  fl = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, data.vocab_size)
  counts = param_counts(model)
  return TaskSetup(
      model=model, loss=loss_fn, eval_metrics=lm_eval_metrics, summarize=lm_summarize,
      eval_batches=data.eval_batches(), train_batches=_LazyTrainIterator(data),
      units_per_step=config.train.batch_size * cfg.seq_len, unit="tokens",
      paper_macs_per_unit=fl["paper_macs_per_token"],
      train_flops_per_unit=fl["train_flops_per_token"],
      final={"eval/loss": "final/eval_loss", "eval/loss_sem": "final/eval_loss_sem"},
      info={"params/total": counts["total"], "params/non_embedding": counts["non_embedding"],
            "compute/paper_macs_per_token": fl["paper_macs_per_token"],
            "compute/train_flops_per_token": fl["train_flops_per_token"]})
