"""Language-modelling batches: tokenised splits, windows of T+1 tokens, grain pipelines.

A split's documents are tokenised once, each followed by the tokeniser's separator
('\\n' for char96/bytes, '<|endoftext|>' for gpt2), into one 1-D int32 array `tokens`, cached as
`<tfds dataset dir>/tokens/<tokenizer>-<split>.npy` (+ .json stats) and memory-mapped after.
Window w is tokens[w*T : w*T + T + 1] (non-overlapping starts at multiples of T); a batch is
{'inputs': window[:, :-1], 'targets': window[:, 1:]}, both int32 of shape (B, T).

Train: this host's windows (every shard_count-th, from shard_index) -> shuffle(seed), a new
permutation every epoch -> repeated forever -> batches of B. Its iterator (`lm_train_iterator`)
has JSON-serialisable `get_state()` / `set_state(state)`; a restored iterator continues with
exactly the batches the saved one would have produced.
Validation: the first windows of the split in order, a fixed list of batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import grain
import numpy as np

from structattn.data.text import DEFAULT_VAL_FRACTION, Documents, corpus_spec, load_documents
from structattn.data.tokenizers import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

TOKEN_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------
# Tokenised splits
# ----------------------------------------------------------------------------------------


def tokenize_documents(texts, tokenizer: Tokenizer) -> tuple[np.ndarray, dict]:
  """(tokens, 1-D int32; stats): every text's ids followed by the separator, concatenated.

  stats: num_documents, num_tokens, num_chars, num_replaced (tokeniser's lossy replacements).
  """
  separator = np.asarray(tokenizer.separator_ids, np.int32)
  pieces, num_chars, num_replaced = [], 0, 0
  for text in texts:
    pieces += [tokenizer.encode(text), separator]
    num_chars += len(text)
    num_replaced += tokenizer.count_replaced(text)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  stats = {"num_documents": len(pieces) // 2, "num_tokens": int(tokens.size),
           "num_chars": num_chars, "num_replaced": num_replaced}
  return tokens.astype(np.int32, copy=False), stats


def token_cache_paths(cache_dir: Path, tokenizer_name: str, split: str) -> tuple[Path, Path]:
  """(.npy tokens, .json stats) paths of a split's token cache."""
  stem = f"{tokenizer_name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}-v{TOKEN_CACHE_VERSION}"
  return cache_dir / "tokens" / f"{stem}.npy", cache_dir / "tokens" / f"{stem}.json"


def _write_atomic(path: Path, write) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _save_cache(npy: Path, meta: Path, tokens: np.ndarray, stats: dict) -> None:
  try:
    npy.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(npy, lambda f: np.save(f, tokens))
    _write_atomic(meta, lambda f: f.write(json.dumps(stats, indent=1).encode()))
  except OSError as e:
    log.warning("Could not cache tokens at %s (%s); they will be recomputed next time.", npy, e)


def documents_tokens(documents: Documents, tokenizer: Tokenizer,
                     split: str) -> tuple[np.ndarray, dict]:
  """(tokens, stats) of a split, from its cache or tokenised now and cached."""
  npy, meta = token_cache_paths(documents.cache_dir, tokenizer.name, split)
  if npy.exists() and meta.exists():
    return np.load(npy, mmap_mode="r"), json.loads(meta.read_text())
  tokens, stats = tokenize_documents(documents.texts(), tokenizer)
  stats = {**stats, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
           "split": split}
  log.info("Tokenised %s: %s", split, stats)
  _save_cache(npy, meta, tokens, stats)
  return tokens, stats


def split_tokens(corpus: str, split: str, tokenizer: Tokenizer, *,
                 val_fraction: float = DEFAULT_VAL_FRACTION, data_dir=None,
                 text_key: str = "text", corpus_dir=None) -> tuple[np.ndarray, dict]:
  """(tokens, 1-D int32; stats) of one split of a corpus (see `text.load_documents`)."""
  documents = load_documents(corpus, split, val_fraction=val_fraction, data_dir=data_dir,
                             text_key=text_key, corpus_dir=corpus_dir)
  return documents_tokens(documents, tokenizer, split)


# ----------------------------------------------------------------------------------------
# Windows and grain pipelines
# ----------------------------------------------------------------------------------------


class TokenWindows:
  """Random-access windows of T+1 tokens: [w] = tokens[w*T : w*T + T + 1], int32 (T+1,)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1.")
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - 1) // self.seq_len)

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range [0, {len(self)})")
    start = index * self.seq_len
    return np.array(self.tokens[start:start + self.seq_len + 1], np.int32)

  def __repr__(self) -> str:
    return f"TokenWindows(num_tokens={len(self.tokens)}, seq_len={self.seq_len})"


def to_lm_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
  """{'inputs': (B, T), 'targets': (B, T)} int32 from windows (B, T+1); targets = next token."""
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:])}


def _shard_windows(tokens: np.ndarray, seq_len: int, shard_index: int,
                   shard_count: int) -> grain.MapDataset:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  return grain.MapDataset.source(TokenWindows(tokens, seq_len))[shard_index::shard_count]


def lm_train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                     shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Endless shuffled LM batches (see module docstring); element: `to_lm_batch` dict."""
  windows = _shard_windows(tokens, seq_len, shard_index, shard_count)
  if len(windows) < batch_size:
    raise ValueError(f"Only {len(windows)} train windows of seq_len+1={seq_len + 1} tokens "
                     f"on this shard, fewer than batch_size={batch_size}.")
  return (windows.shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True).map(to_lm_batch))


def lm_eval_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                    num_batches: int | None = None, shard_index: int = 0,
                    shard_count: int = 1) -> grain.MapDataset:
  """The first `num_batches` (None: all full) batches of this shard's windows, in order."""
  windows = _shard_windows(tokens, seq_len, shard_index, shard_count)
  batches = windows.batch(batch_size, drop_remainder=True)
  if len(batches) == 0:
    raise ValueError(f"Only {len(windows)} validation windows of seq_len+1={seq_len + 1} "
                     f"tokens on this shard, fewer than batch_size={batch_size}.")
  return batches[:num_batches].map(to_lm_batch)


def lm_eval_batches(tokens: np.ndarray, **kwargs) -> list[dict[str, np.ndarray]]:
  """`lm_eval_dataset(tokens, **kwargs)` as a list of batches."""
  dataset = lm_eval_dataset(tokens, **kwargs)
  return [dataset[i] for i in range(len(dataset))]


def lm_train_iterator(dataset: grain.MapDataset, *, num_threads: int = 2,
                      prefetch: int = 8) -> grain.DatasetIterator:
  """In-process iterator over `dataset` (threads prefetch batches; no worker processes).

  `get_state()` returns a JSON-serialisable dict, `set_state(state)` resumes from it.
  """
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))


# ----------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LMData:
  """A run's data: tokeniser, endless train iterator, fixed eval batches, stats."""

  tokenizer: Tokenizer
  train: grain.DatasetIterator
  eval_batches: list[dict[str, np.ndarray]]
  stats: dict

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def dataset_stats(corpus: str, tokenizer: Tokenizer, *, splits=("train", "validation"),
                  val_fraction: float = DEFAULT_VAL_FRACTION, data_dir=None,
                  text_key: str = "text") -> dict:
  """{'corpus', 'tokenizer', 'vocab_size', split: {num_tokens, num_documents, num_chars,
  num_replaced, ...}} (tokenises and caches the splits when needed)."""
  stats = {"corpus": corpus, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}
  for split in splits:
    stats[split] = split_tokens(corpus, split, tokenizer, val_fraction=val_fraction,
                                data_dir=data_dir, text_key=text_key)[1]
  return stats


def lm_data(*, corpus: str = "shakespeare", tokenizer: str = "char96", seq_len: int,
            batch_size: int, seed: int, val_fraction: float = DEFAULT_VAL_FRACTION,
            data_dir=None, text_key: str = "text", tfds_name: str | None = None,
            eval_batch_size: int | None = None, num_eval_batches: int | None = None,
            shard_index: int = 0, shard_count: int = 1, train_split: str = "train",
            eval_split: str = "validation", corpus_dir=None) -> LMData:
  """Build (once) and load a corpus; return its train iterator and eval batches (per host;
  num_eval_batches None or 0: every full batch of the validation split).

  Arguments mirror the config fields data.corpus, data.tokenizer, data.val_fraction,
  data.tfds_dir (as `data_dir`; None or '': `text.default_data_dir()`), data.text_key,
  data.tfds_name (when set, overrides corpus: see `text.corpus_spec`), data.corpus_dir (the
  folder of a named corpus such as 'english'); batch sizes are per host.
  """
  tok = get_tokenizer(tokenizer)
  corpus = corpus_spec(corpus, tfds_name)
  common = dict(val_fraction=val_fraction, data_dir=data_dir, text_key=text_key,
                corpus_dir=corpus_dir)
  train_tokens, train_stats = split_tokens(corpus, train_split, tok, **common)
  eval_tokens, eval_stats = split_tokens(corpus, eval_split, tok, **common)
  shard = dict(shard_index=shard_index, shard_count=shard_count)
  train = lm_train_iterator(lm_train_dataset(train_tokens, seq_len=seq_len, batch_size=batch_size,
                                             seed=seed, **shard))
  eval_batches = lm_eval_batches(eval_tokens, seq_len=seq_len,
                                 batch_size=eval_batch_size or batch_size,
                                 num_batches=num_eval_batches or None, **shard)
  stats = {"corpus": corpus, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
           train_split: train_stats, eval_split: eval_stats}
  return LMData(tok, train, eval_batches, stats)
