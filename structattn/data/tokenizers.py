"""Tokenisers for the language-modelling data: 'char96', 'bytes' and offline 'gpt2'.

Every tokeniser has
  * `name`: its registry name (also the key of the on-disk token caches),
  * `vocab_size`: number of ids; ids lie in [0, vocab_size),
  * `encode(text) -> np.ndarray[int32]` of shape (N,),
  * `decode(ids) -> str`,
  * `count_replaced(text) -> int`: characters `encode` cannot represent and replaces (lossy),
  * `separator_ids`: the ids put between documents when a corpus is concatenated.

Get one with `get_tokenizer(name)`. Nothing here touches the network: the GPT-2 BPE is built
from the vendored `assets/gpt2/{vocab.bpe,encoder.json}` (see assets/gpt2/PROVENANCE.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Protocol

import numpy as np

TOKENIZER_NAMES = ("char96", "bytes", "gpt2")


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokeniser."""

  name: str
  vocab_size: int
  separator_ids: tuple[int, ...]

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def count_replaced(self, text: str) -> int: ...


# ----------------------------------------------------------------------------------------
# char96
# ----------------------------------------------------------------------------------------

# The 96 symbols in code-point order: '\n' (id 0), then ' ' .. '~' (ids 1 .. 95).
CHAR96_SYMBOLS = "\n" + "".join(chr(c) for c in range(0x20, 0x7F))
_CHAR96_SET = frozenset(CHAR96_SYMBOLS)
_CHAR96_CODES = np.frombuffer(CHAR96_SYMBOLS.encode("ascii"), np.uint8)
_CHAR96_IDS_BY_BYTE = np.full(128, -1, np.int32)
_CHAR96_IDS_BY_BYTE[_CHAR96_CODES] = np.arange(96, dtype=np.int32)

# Explicit replacements, applied before Unicode decomposition. '' means "drop".
_CHAR96_TABLE = {
  "\t": " ", "\v": "\n", "\f": "\n", "\x85": "\n", "\u2028": "\n", "\u2029": "\n",
  "\u00a0": " ", "\u2007": " ", "\u202f": " ",  # no-break spaces
  "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
  "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
  "\u00ab": '"', "\u00bb": '"', "\u2039": "'", "\u203a": "'",
  "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "--", "\u2015": "--",
  "\u2212": "-", "\u2026": "...", "\u2022": "*", "\u00b7": ".", "\u2044": "/",
  "\u00d7": "x", "\u00f7": "/",
  "\u00ad": "", "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "", "\ufeff": "",
}
_NOT_CHAR96 = re.compile(r"[^\n\x20-\x7e]")


def _ascii_equivalent(ch: str) -> str | None:
  """char96 text for one non-char96 character, or None when it has no ASCII equivalent."""
  if ch in _CHAR96_TABLE:
    return _CHAR96_TABLE[ch]
  decomposed = unicodedata.normalize("NFKD", ch)
  kept = "".join(_CHAR96_TABLE.get(c, c) for c in decomposed if not unicodedata.combining(c))
  if kept and all(c in _CHAR96_SET for c in kept):
    return kept
  return None


@functools.lru_cache(maxsize=65536)
def _char96_replacement(ch: str) -> tuple[str, bool]:
  """(replacement, lossy) for one character outside the 96 symbols."""
  equivalent = _ascii_equivalent(ch)
  return ("?", True) if equivalent is None else (equivalent, False)


def normalize_char96_with_count(text: str) -> tuple[str, int]:
  """`normalize_char96(text)` and the number of characters it replaced by '?'."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  num_lossy = 0

  def substitute(match: re.Match) -> str:
    nonlocal num_lossy
    replacement, lossy = _char96_replacement(match.group())
    num_lossy += lossy
    return replacement

  return _NOT_CHAR96.sub(substitute, text), num_lossy


def normalize_char96(text: str) -> str:
  """Map arbitrary text onto the 96 char96 symbols (printable ASCII 0x20..0x7E and '\\n').

  Rules, in order:
    1. '\\r\\n' and '\\r' become '\\n'.
    2. Characters already among the 96 symbols are kept.
    3. A table of common cases: tab -> ' '; vertical tab, form feed, NEL, U+2028/U+2029 -> '\\n';
       no-break spaces -> ' '; curly/low/angle quotes and primes -> ' or "; hyphens, en dash,
       minus -> '-'; em dash, horizontal bar -> '--'; ellipsis -> '...'; bullet -> '*';
       middle dot -> '.'; fraction slash, division sign -> '/'; multiplication sign -> 'x';
       soft hyphen, zero-width (non-)joiners/spaces, word joiner, BOM -> dropped.
    4. Otherwise the character is NFKD-decomposed and its combining marks are dropped (accents:
       'e-acute' -> 'e'; compatibility forms: 'fi' ligature -> 'fi', full-width 'A' -> 'A');
       the result is kept when it consists of char96 symbols only (after rule 3).
    5. Anything left (CJK, emoji, 'sharp s', control characters, ...) becomes '?'; such
       characters are counted by `count_char96_replaced`.
  """
  return normalize_char96_with_count(text)[0]


def count_char96_replaced(text: str) -> int:
  """Number of characters of `text` char96 cannot represent and replaces by '?' (rule 5)."""
  return normalize_char96_with_count(text)[1]


class Char96Tokenizer:
  """The paper's 96-symbol character vocabulary; see `normalize_char96` for other text.

  Ids are code-point order: '\\n' -> 0, chr(c) -> c - 31 for c in 0x20..0x7E.
  """

  name = "char96"
  vocab_size = 96
  separator_ids = (0,)  # '\n'

  def encode(self, text: str) -> np.ndarray:
    """1-D int32 ids of the normalised text."""
    codes = np.frombuffer(normalize_char96(text).encode("ascii"), np.uint8)
    return _CHAR96_IDS_BY_BYTE[codes]

  def decode(self, ids) -> str:
    return _CHAR96_CODES[np.asarray(ids, np.int64)].tobytes().decode("ascii")

  def count_replaced(self, text: str) -> int:
    return count_char96_replaced(text)


# ----------------------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------------------


class BytesTokenizer:
  """UTF-8 bytes, vocab 256; lossless for any str without lone surrogates.

  Decoding replaces invalid UTF-8 (e.g. a window cut inside a character) by U+FFFD.
  """

  name = "bytes"
  vocab_size = 256
  separator_ids = (10,)  # '\n'

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return np.asarray(ids, np.uint8).tobytes().decode("utf-8", errors="replace")

  def count_replaced(self, text: str) -> int:
    del text
    return 0


# ----------------------------------------------------------------------------------------
# gpt2
# ----------------------------------------------------------------------------------------

GPT2_ASSETS_DIR = Path(__file__).parent / "assets" / "gpt2"
GPT2_SHA256 = {
  "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
  "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's form of the GPT-2 split pattern (equivalent to the original
# r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", faster).
GPT2_PAT_STR = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                r"""|\s+(?!\S)|\s""")
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256


def _check_sha256(path: Path, expected: str) -> None:
  actual = hashlib.sha256(path.read_bytes()).hexdigest()
  if actual != expected:
    raise ValueError(f"{path}: sha256 {actual} != expected {expected} (corrupt GPT-2 asset?)")


@contextlib.contextmanager
def _tiktoken_cache_disabled():
  """Stop tiktoken.load from copying the local files into its temp-dir cache."""
  previous = os.environ.get("TIKTOKEN_CACHE_DIR")
  os.environ["TIKTOKEN_CACHE_DIR"] = ""
  try:
    yield
  finally:
    if previous is None:
      del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
      os.environ["TIKTOKEN_CACHE_DIR"] = previous


@functools.lru_cache(maxsize=None)
def gpt2_encoding(assets_dir: str = str(GPT2_ASSETS_DIR)):
  """The GPT-2 `tiktoken.Encoding`, built from local vocab.bpe + encoder.json (no network)."""
  import tiktoken
  import tiktoken.load

  vocab_bpe, encoder_json = Path(assets_dir) / "vocab.bpe", Path(assets_dir) / "encoder.json"
  for path in (vocab_bpe, encoder_json):
    _check_sha256(path, GPT2_SHA256[path.name])
  with _tiktoken_cache_disabled():
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
  return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                           special_tokens={GPT2_EOT: GPT2_EOT_ID}, explicit_n_vocab=50257)


class GPT2Tokenizer:
  """GPT-2 byte-level BPE (50,257 ids; '<|endoftext|>' = 50256 separates documents).

  `encode` treats '<|endoftext|>' inside the text as ordinary text, never as the special id.
  """

  name = "gpt2"
  vocab_size = 50257
  separator_ids = (GPT2_EOT_ID,)

  def __init__(self):
    self._encoding = gpt2_encoding()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._encoding.encode_ordinary(text), np.int32)

  def decode(self, ids) -> str:
    return self._encoding.decode(np.asarray(ids, np.int64).tolist())

  def count_replaced(self, text: str) -> int:
    del text
    return 0


_TOKENIZERS = {"char96": Char96Tokenizer, "bytes": BytesTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name: str) -> Tokenizer:
  """The tokeniser called `name` (config field `data.tokenizer`): one of TOKENIZER_NAMES."""
  if name not in _TOKENIZERS:
    raise ValueError(f"Unknown tokenizer data.tokenizer={name!r}; allowed values: "
                     f"{', '.join(repr(n) for n in TOKENIZER_NAMES)}.")
  return _TOKENIZERS[name]()
