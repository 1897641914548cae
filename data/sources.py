"""Corpus readers: from files on disk (or a download) to Python strings.

Two kinds of corpora:

* parallel text for translation, returned as a `ParallelCorpus` of
  (source, target) sentence pairs: Multi30k, any two line-aligned files,
  a TSV file, WMT through Hugging Face `datasets`;
* plain text for language modelling, returned as one `str`: any files,
  Tiny Shakespeare with nanoGPT's 90/10 train/val split.

Lines are kept exactly as written except for the line terminator ('\\n' or
'\\r\\n'), because BLEU is computed on this text. Pairs with an empty side are
dropped, counted and logged; everything else that looks wrong (misaligned
files, invalid UTF-8, a missing corpus without network) raises `UserError`.

Data directories are read-only inputs. Layout under the data root:

  <root>/multi30k/<split>.<lang>.gz      (or plain <split>.<lang>)
  <root>/tinyshakespeare/input.txt
"""

import dataclasses
import gzip
import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Sequence

from absl import logging

from data.errors import UserError

PathLike = str | os.PathLike

MULTI30K_SPLITS = ('train', 'val', 'test_2016_flickr', 'test_2017_flickr',
                   'test_2018_flickr', 'test_2017_mscoco')
MULTI30K_LANGS = ('en', 'de', 'fr', 'cs')
MULTI30K_URL = ('https://raw.githubusercontent.com/multi30k/dataset/master/'
                'data/task1/raw/{split}.{lang}.gz')
# sha256 of the official .gz files (github.com/multi30k/dataset, commit
# a3d2e0d2). Files not listed (cs, test_2017_*, test_2018_*) have no known
# checksum: a download of those is only checked to be a complete gzip stream.
MULTI30K_SHA256 = {
    'train.en.gz': 'd79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f',
    'train.de.gz': '726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6',
    'train.fr.gz': '622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c',
    'val.en.gz': '14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28',
    'val.de.gz': 'f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a',
    'val.fr.gz': 'ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9',
    'test_2016_flickr.en.gz': '611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9',
    'test_2016_flickr.de.gz': '9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8',
    'test_2016_flickr.fr.gz': '6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90',
}
TINYSHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/'
                       'master/data/tinyshakespeare/input.txt')
TINYSHAKESPEARE_SHA256 = (
    '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')
# Without network the resolver fails at once; with a dead route this bounds
# how long each attempt may hang before the user gets the error.
DOWNLOAD_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class ParallelCorpus:
  """Sentence pairs, after dropping pairs with an empty side.

  Attributes:
    pairs: (source, target) strings, in file order.
    dropped_empty: how many pairs were dropped because a side was empty.
    name: where the pairs came from, for logs and error messages.
  """
  pairs: list[tuple[str, str]]
  dropped_empty: int
  name: str

  def __len__(self) -> int:
    return len(self.pairs)


def data_root(configured: str | None = None) -> pathlib.Path:
  """The data root, one folder per corpus (multi30k/, tinyshakespeare/).

  `configured` (config.data.dir), else $TRANSFLAX_DATA, else ~/.cache/transflax.
  """
  root = configured or os.environ.get('TRANSFLAX_DATA') or '~/.cache/transflax'
  return pathlib.Path(root).expanduser()


def _cache_root() -> pathlib.Path:
  return pathlib.Path('~/.cache/transflax').expanduser()


# ---------------------------------------------------------------- reading


def _open(path: pathlib.Path) -> BinaryIO:
  """path (plain, or gzip if it ends in .gz) opened for reading bytes."""
  try:
    return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')
  except FileNotFoundError:
    raise UserError(f'{path}: file not found; check the path '
                    '(or config.data.dir / $TRANSFLAX_DATA).') from None
  except OSError as e:
    raise UserError(f'{path}: cannot read ({e}); check the path.') from e


def _unreadable(path: PathLike, e: Exception) -> UserError:
  # gzip.BadGzipFile is an OSError; a truncated gzip raises EOFError.
  return UserError(f'{path}: cannot read ({e}); replace the file.')


def _bad_utf8(path: PathLike, line: int, e: UnicodeDecodeError) -> UserError:
  return UserError(f'{path}: invalid UTF-8 on line {line} ({e.reason}); '
                   're-encode the file as UTF-8.')


def _read_bytes(path: PathLike) -> bytes:
  path = pathlib.Path(path)
  with _open(path) as f:
    try:
      return f.read()
    except (OSError, EOFError) as e:
      raise _unreadable(path, e) from e


def _decode(data: bytes, path: PathLike) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise _bad_utf8(path, data.count(b'\n', 0, e.start) + 1, e) from None


def stream_lines(path: PathLike, *, keep_newlines: bool = False
                 ) -> Iterator[str]:
  """The lines of a UTF-8 text file (plain or .gz), read one at a time.

  Split on '\\n' only, like `read_text(path).split('\\n')` (a '\\r' stays);
  with keep_newlines each line keeps its '\\n', so they join back into the
  text. For files larger than memory; errors as `read_text`'s.
  """
  path = pathlib.Path(path)
  with _open(path) as f:
    try:
      for number, line in enumerate(f, 1):
        try:
          text = line.decode('utf-8')
        except UnicodeDecodeError as e:
          raise _bad_utf8(path, number, e) from None
        yield text if keep_newlines else text.removesuffix('\n')
    except (OSError, EOFError) as e:
      raise _unreadable(path, e) from e


def hash_split(key: str, percents: dict[str, tuple[int, int]]) -> str:
  """The split of an item by a hash of its key: `percents` maps each split
  to its [low, high) share of 100 buckets. Stable across runs, machines and
  corpus order, so held-out items stay held out."""
  bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
  for split, (low, high) in percents.items():
    if low <= bucket < high:
      return split
  raise ValueError(f'bucket {bucket} is in no split of {percents}')


def write_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename, so that a
  crash or a concurrent host never sees half a file; readable by all (0644)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
  os.replace(tmp, path)


def read_lines(path: PathLike) -> list[str]:
  """All lines of a UTF-8 text file (plain or .gz), without their '\\n' or '\\r\\n'.

  Splits on '\\n' only (not `str.splitlines`, which also splits on form feeds
  and U+2028 and would silently misalign parallel files).
  """
  lines = _decode(_read_bytes(path), path).split('\n')
  if lines[-1] == '':  # The terminator of the last line, not a line.
    lines.pop()
  return [l[:-1] if l.endswith('\r') else l for l in lines]


def _drop_empty(pairs: Iterable[tuple[str, str]], name: str) -> ParallelCorpus:
  """Drops (counts, logs) pairs with an empty or all-whitespace side."""
  pairs = list(pairs)
  kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
  dropped = len(pairs) - len(kept)
  if dropped:
    logging.warning('%s: dropped %d of %d pairs with an empty side.', name,
                    dropped, len(pairs))
  if not kept:
    raise UserError(f'{name}: no non-empty sentence pairs; check the files.')
  return ParallelCorpus(pairs=kept, dropped_empty=dropped, name=name)


def read_parallel(src_path: PathLike, tgt_path: PathLike) -> ParallelCorpus:
  """Line-aligned source and target files (plain or .gz) as sentence pairs."""
  src, tgt = read_lines(src_path), read_lines(tgt_path)
  if len(src) != len(tgt):
    raise UserError(
        f'Misaligned parallel files: {src_path} has {len(src)} lines but '
        f'{tgt_path} has {len(tgt)}; they must have one sentence per line, '
        'line by line translations of each other.')
  return _drop_empty(list(zip(src, tgt)), f'{src_path} + {tgt_path}')


def read_tsv(path: PathLike) -> ParallelCorpus:
  """A file (plain or .gz) of `source<TAB>target` lines as sentence pairs."""
  pairs = []
  for number, line in enumerate(read_lines(path), start=1):
    fields = line.split('\t')
    if len(fields) != 2 and line.strip():
      raise UserError(f'{path}: line {number} has {len(fields)} tab-separated '
                      'fields, expected 2 (source<TAB>target).')
    pairs.append((fields[0], fields[1]) if len(fields) == 2 else ('', ''))
  return _drop_empty(pairs, str(path))


def read_text(paths: PathLike | Sequence[PathLike]) -> str:
  """The UTF-8 text of one or more files (plain or .gz), concatenated as is."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  return ''.join(_decode(_read_bytes(p), p) for p in paths)


# ---------------------------------------------------------------- download


def _is_writable(folder: pathlib.Path) -> bool:
  """Whether `folder` exists and is writable, or could be created.

  A folder without any write permission bit counts as read-only even for root
  (whom `os.access` always allows): that is how data dirs are marked read-only.
  """
  while not folder.exists():
    folder = folder.parent
  return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _fetch(url: str, target: pathlib.Path, sha256: str | None) -> None:
  """Downloads `url` to `target` atomically, verifying it first."""
  with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
    data = response.read()
  if sha256 is not None:
    if hashlib.sha256(data).hexdigest() != sha256:
      raise UserError(f'{url}: downloaded file does not match its sha256 '
                      f'{sha256}; retry, or put a verified copy at {target}.')
  elif target.suffix == '.gz':
    try:
      gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise UserError(f'{url}: download is not a complete gzip file ({e}); '
                      f'retry, or put a copy at {target}.') from e
  write_atomic(target, data)
  logging.info('Downloaded %s to %s.', url, target)


class _Remote(NamedTuple):
  """A corpus file: its name, an accepted plain-text name, its URL and sha256."""
  name: str
  plain: str
  url: str
  sha256: str | None


def _ensure(files: Sequence[_Remote], folders: Sequence[pathlib.Path],
            corpus: str) -> list[pathlib.Path]:
  """Paths of `files`, looked up in `folders`; downloads missing ones.

  Downloads go into the first writable folder. Without network (or a writable
  folder) raises one UserError listing every missing URL and the target.
  """
  found = []
  for f in files:
    hits = [d / n for d in folders for n in (f.name, f.plain) if (d / n).exists()]
    found.append(hits[0] if hits else None)
  missing = [f for f, p in zip(files, found) if p is None]
  if not missing:
    return found
  target = next((d for d in folders if _is_writable(d)), None)
  try:
    if target is None:
      raise OSError(f'none of {", ".join(map(str, folders))} is writable')
    for f in missing:
      _fetch(f.url, target / f.name, f.sha256)
  except (OSError, urllib.error.URLError) as e:  # URLError is an OSError.
    raise UserError(
        f'{corpus}: {", ".join(f.name for f in missing)} not found in '
        f'{" or ".join(map(str, folders))} and the download failed ({e}). '
        f'Download {" ".join(f.url for f in missing)} into '
        f'{target or folders[0]}, or set config.data.dir / $TRANSFLAX_DATA '
        'to a folder that has them.') from e
  return [p or target / f.name for p, f in zip(found, files)]


def _corpus_folders(root: pathlib.Path, corpus: str) -> list[pathlib.Path]:
  """Where a corpus may live: the root, else (read-only root) the user cache."""
  folders = [root / corpus]
  if not _is_writable(root / corpus) and _cache_root() != root:
    folders.append(_cache_root() / corpus)
  return folders


# ---------------------------------------------------------------- corpora


def multi30k(split: str, src_lang: str, tgt_lang: str,
             root: PathLike | None = None) -> ParallelCorpus:
  """Multi30k task 1 sentence pairs (29,000 train, 1,014 val, 1,000 test_2016_flickr).

  Args:
    split: one of MULTI30K_SPLITS.
    src_lang, tgt_lang: two of MULTI30K_LANGS.
    root: the data root (see `data_root`); None means `data_root(None)`.
  """
  if split not in MULTI30K_SPLITS:
    raise UserError(f'Multi30k split {split!r} unknown; use one of {MULTI30K_SPLITS}.')
  for lang in (src_lang, tgt_lang):
    if lang not in MULTI30K_LANGS:
      raise UserError(f'Multi30k language {lang!r} unknown; use one of {MULTI30K_LANGS}.')
  root = data_root(None if root is None else str(root))
  files = [_Remote(f'{split}.{l}.gz', f'{split}.{l}',
                   MULTI30K_URL.format(split=split, lang=l),
                   MULTI30K_SHA256.get(f'{split}.{l}.gz')) for l in (src_lang, tgt_lang)]
  src, tgt = _ensure(files, _corpus_folders(root, 'multi30k'), 'Multi30k')
  corpus = read_parallel(src, tgt)
  return dataclasses.replace(corpus, name=f'multi30k/{split}.{src_lang}-{tgt_lang}')


def tinyshakespeare(split: str, root: PathLike | None = None) -> str:
  """Tiny Shakespeare with nanoGPT's split: first 90% of characters 'train', rest 'val'."""
  if split not in ('train', 'val'):
    raise UserError(f"Tiny Shakespeare split {split!r} unknown; use 'train' or 'val'.")
  root = data_root(None if root is None else str(root))
  folders = _corpus_folders(root, 'tinyshakespeare')
  remote = _Remote('input.txt', 'input.txt', TINYSHAKESPEARE_URL,
                   TINYSHAKESPEARE_SHA256)
  [path] = _ensure([remote], folders, 'Tiny Shakespeare')
  text = read_text(path)
  n = int(len(text) * 0.9)  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
  return text[:n] if split == 'train' else text[n:]


def wmt(pair: str = 'de-en', split: str = 'train', src_lang: str | None = None,
        tgt_lang: str | None = None, *, dataset: str = 'wmt14',
        cache_dir: PathLike | None = None) -> ParallelCorpus:
  """WMT sentence pairs through Hugging Face `datasets` (extra `hf`).

  Args:
    pair: the dataset config, e.g. 'de-en' (`load_dataset('wmt14', 'de-en')`).
    split: 'train', 'validation' or 'test'.
    src_lang, tgt_lang: direction; default: the pair as written ('de' -> 'en').
    dataset: the Hugging Face dataset name.
    cache_dir: where `datasets` keeps its download (default: its own cache).
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (optional extra)
  except ImportError:
    raise UserError('WMT data needs Hugging Face datasets: '
                    'pip install -e ".[hf]"') from None
  langs = pair.split('-')
  src_lang = src_lang or langs[0]
  tgt_lang = tgt_lang or langs[-1]
  if sorted((src_lang, tgt_lang)) != sorted(langs):
    raise UserError(f'WMT languages {src_lang}-{tgt_lang} do not match pair {pair!r}.')
  try:
    rows = datasets.load_dataset(dataset, pair, split=split,
                                 cache_dir=None if cache_dir is None else str(cache_dir))
  except Exception as e:  # Offline, unknown split, ...: all user-fixable.
    raise UserError(f'load_dataset({dataset!r}, {pair!r}, split={split!r}) '
                    f'failed: {e}. Check the network and the names.') from e
  pairs = [(r[src_lang], r[tgt_lang]) for r in rows['translation']]
  return _drop_empty(pairs, f'{dataset}/{pair}/{split}')
