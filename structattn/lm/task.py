"""The LM task for the shared loop (config.task = 'lm', the default).

    structattn-train --config=configs/lm.py:tiny --workdir=runs/tiny
    setup = build(config)   # structattn.tasks.TaskSetup

Batches come from the checkpointable host iterator of `structattn.lm.data`; held-out metrics
are the mean per-sequence cross-entropy and its standard error; compute is counted per token
(`structattn.flops.model_flops`).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from structattn import flops as flops_lib
from structattn.lm import data as data_lib
from structattn.lm.loss import eval_step, loss_fn
from structattn.models.gpt import GPT, GPTConfig, param_counts
from structattn.tasks import TaskSetup, mean_and_sem


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  """(GPTConfig, GPT) of a run config, initialised from config.seed."""
  cfg = GPTConfig.from_config(config, vocab_size)
  model = GPT(cfg, rngs=nnx.Rngs(config.seed))
  return cfg, model


def eval_metrics(params, graphdef, rest, batch):
  """Per-sequence held-out cross-entropy."""
  return {"loss": eval_step(params, batch, graphdef=graphdef, rest=rest)}


def summarize(arrays: dict[str, np.ndarray], prefix: str = "eval") -> dict[str, float]:
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


def _loss(config):
  """The training loss: `train.fused_xent=True` takes structattn.losses' cross-entropy (no
  float32 copy of the logits), else loss_fn."""
  if config.train.get("fused_xent", False):
    from structattn.losses import lm_loss
    return lm_loss
  return loss_fn


def build(config: ml_collections.ConfigDict) -> TaskSetup:
  data = data_lib.build(config)  # validates the data config; fails fast on a missing corpus
  cfg, model = build_model(config, data.vocab_size)
  fl = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, data.vocab_size)
  counts = param_counts(model)
  return TaskSetup(
      model=model, loss=_loss(config), eval_metrics=eval_metrics, summarize=summarize,
      eval_batches=data.eval_batches(), train_batches=_LazyTrainIterator(data),
      units_per_step=config.train.batch_size * cfg.seq_len, unit="tokens",
      paper_macs_per_unit=fl["paper_macs_per_token"],
      train_flops_per_unit=fl["train_flops_per_token"],
      final={"eval/loss": "final/eval_loss", "eval/loss_sem": "final/eval_loss_sem"},
      info={"params/total": counts["total"], "params/non_embedding": counts["non_embedding"],
            "compute/paper_macs_per_token": fl["paper_macs_per_token"],
            "compute/train_flops_per_token": fl["train_flops_per_token"]})
