"""The LM task's data, from a run config (thin glue over `structattn.data`)."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from structattn import data as data_lib


@dataclasses.dataclass
class RunData:
  lm: data_lib.LMData

  @property
  def vocab_size(self) -> int:
    return self.lm.vocab_size

  @property
  def tokenizer(self):
    return self.lm.tokenizer

  def train_iterator(self):
    """The endless, checkpointable train iterator (`get_state` / `set_state`)."""
    return self.lm.train

  def eval_batches(self):
    return self.lm.eval_batches


def tokenizer_for(config: ml_collections.ConfigDict):
  return data_lib.get_tokenizer(config.data.tokenizer)


def build(config: ml_collections.ConfigDict) -> RunData:
  """Tokenise (cached) and batch the configured corpus; per-host slices of each batch."""
  d, n = config.data, jax.process_count()
  if config.train.batch_size % n or config.eval.batch_size % n:
    raise ValueError(f"train.batch_size={config.train.batch_size} and eval.batch_size="
                     f"{config.eval.batch_size} must be divisible by the process count {n}")
  lm = data_lib.lm_data(
      corpus=d.corpus, tokenizer=d.tokenizer, seq_len=config.model.seq_len,
      batch_size=config.train.batch_size // n, seed=config.seed, val_fraction=d.val_fraction,
      data_dir=d.get("tfds_dir") or None, text_key=d.get("text_key", "text"),
      tfds_name=d.get("tfds_name") or None, eval_batch_size=config.eval.batch_size // n,
      num_eval_batches=config.eval.batches, shard_index=jax.process_index(), shard_count=n,
      corpus_dir=d.get("corpus_dir") or None)
  return RunData(lm)
