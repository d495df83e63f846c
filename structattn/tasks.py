"""What the shared training loop needs from a task (LM, in-context regression, forecasting),
and the registry of tasks.

A task turns a run config into a `TaskSetup`: the model, its training loss and held-out
metrics as pure functions of (params, graphdef, rest, batch), the data, and the compute
accounting.  `structattn.train.train(config, workdir)` runs any registered task:

    setup = tasks.build(config)          # dispatches on config.task ('lm' | 'icr' | 'forecast')

Each task lives in its own package (`structattn.lm`, `structattn.icr`, `structattn.forecast`)
and imports this module, never the loop.  The loop builds each setup once; a setup that
depends on the run length computes it with `train_steps` (a compute budget sets it).

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
    "lm": "structattn.lm.task:build",
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


def train_steps(config: ml_collections.ConfigDict, macs_per_step: float) -> int:
  """The run length: train.steps, or ceil(train.compute_budget / macs_per_step) when a budget
  (forward non-embedding MACs, the paper's compute axis) is positive.  A task whose setup
  depends on the length (a curriculum) calls this with its own per-step MACs."""
  budget = float(config.train.get("compute_budget", 0) or 0)
  if budget > 0:
    return max(1, int(math.ceil(budget / macs_per_step)))
  return int(config.train.steps)


def mean_and_sem(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  n = len(values)
  sem = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return float(values.mean()), sem
