r"""Pre-tokenized LM corpora: one flat token file per split, memory-mapped.

OpenWebText (~9B GPT-2 tokens) or FineWeb do not fit in memory as text, and
tokenizing them at every start would take hours. As nanoGPT's
data/openwebtext/prepare.py does, documents are tokenized once into a flat
file of token ids per split, which training memory-maps and reads block by
block (data/pipeline.lm_train): nothing is loaded whole.

  # An HF dataset (extra `hf`), streamed; every 2000th document validates
  # (nanoGPT holds out 0.05% of OpenWebText):
  python -m data.tokens --tokenizer gpt2_bpe.model --out fineweb \
      --hf_dataset HuggingFaceFW/fineweb --hf_config sample-10BT \
      --val_every 2000
  python -m data.tokens --tokenizer gpt2_bpe.model --out owt \
      --hf_dataset Skylion007/openwebtext --val_every 2000
  # Local text, one document per line (plain or .gz):
  python -m data.tokens --tokenizer gpt2_bpe.model --out mine \
      --files train=a.txt,b.txt.gz --files val=c.txt

(OpenWebText on the Hub has been a loading script, which `datasets` >= 4
refuses to run (nanoGPT issue #633); if it still is, try the Hub's Parquet
conversion with `--hf_revision refs/convert/parquet`, or datasets < 4. Neither
download was tried here: this machine has no network.) Then train with
`--config.data.corpus=tokens
--config.data.files.train=owt/train.bin --config.data.files.val=owt/val.bin
--config.data.tokenizer.path=gpt2_bpe.model`.

A split is two files: `<split>.bin`, the ids as little-endian uint16 when the
vocabulary fits (GPT-2's 50,257 does) or uint32; and `<split>.json`, written
last, with the token and document counts, the dtype and the tokenizer's
sha256. Documents are separated as `LanguageModel.tokens` separates them, so
a token file trains exactly like the text it came from (`data.corpus=text`
joins several files as they are, so they must end with a newline for the
two to agree): each document is followed by EOS, except with a character
tokenizer, whose model reads one unbroken stream (nanoGPT's
shakespeare_char; HF documents then end with a newline). Empty documents
are skipped. Preparing again replaces a split only once its new file is
complete.
`load` refuses a split whose .json is missing (an unfinished prepare), whose
.bin has the wrong size, or that another tokenizer made.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from data import sources
from data import tokenizer as tokenizers
from data import errors
from data.errors import UserError

FORMAT = 'transflax.tokens/1'
_DOCS_PER_BATCH = 1024  # documents per tokenizer call


def tokenizer_sha256(tokenizer) -> str:
  return hashlib.sha256(tokenizer.serialized).hexdigest()


def _dtype(tokenizer) -> np.dtype:
  return np.dtype('<u2' if tokenizer.vocab_size <= 2**16 else '<u4')


def _meta_path(bin_path: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(bin_path).with_suffix('.json')


class _Writer:
  """Appends token ids to a temporary file next to `<split>.bin`; `commit`
  renames it and then writes the .json that makes the split complete, so an
  interrupted or failed prepare leaves the previous split as it was."""

  def __init__(self, path: pathlib.Path, tokenizer):
    self.path, self.tokenizer = path, tokenizer
    self.dtype = _dtype(tokenizer)
    self.stream = isinstance(tokenizer, tokenizers.CharTokenizer)
    self.num_tokens = self.num_documents = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, self._tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    self._file = os.fdopen(fd, 'wb')
    self._pending: list[str] = []

  def add(self, document: str) -> None:
    if document:
      self._pending.append(document)
      if len(self._pending) >= _DOCS_PER_BATCH:
        self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    rows = self.tokenizer.encode(self._pending, add_eos=not self.stream)
    ids = np.concatenate([np.asarray(r, np.int64) for r in rows])
    self._file.write(ids.astype(self.dtype).tobytes())
    self.num_tokens += len(ids)
    self.num_documents += len(self._pending)
    self._pending = []

  def finish(self) -> dict:
    """Tokenizes what is pending and closes the file; the split's meta."""
    self._flush()
    self._file.close()
    return {'format': FORMAT, 'num_tokens': self.num_tokens,
            'num_documents': self.num_documents, 'dtype': self.dtype.str,
            'vocab_size': self.tokenizer.vocab_size,
            'tokenizer_sha256': tokenizer_sha256(self.tokenizer),
            'eos_after_each_document': not self.stream}

  def abort(self) -> None:
    """Drops the unfinished file."""
    self._file.close()
    pathlib.Path(self._tmp).unlink(missing_ok=True)

  def commit(self, meta: dict) -> None:
    meta_path = _meta_path(self.path)
    meta_path.unlink(missing_ok=True)  # The old split is gone from here on.
    os.chmod(self._tmp, 0o644)  # mkstemp's 0600 would hide it from other users
    os.replace(self._tmp, self.path)
    sources.write_atomic(meta_path, (json.dumps(meta, indent=2) + '\n').encode())


def _write(documents: Iterable[str], tokenizer,
           paths: dict[str, pathlib.Path], route) -> dict[str, dict]:
  """Feeds document i to the writer of split route(i); all splits or none."""
  writers: dict[str, _Writer] = {}
  try:
    for split, path in paths.items():
      writers[split] = _Writer(path, tokenizer)
    for i, doc in enumerate(documents):
      writers[route(i)].add(doc)
    metas = {split: w.finish() for split, w in writers.items()}
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  for split, w in writers.items():
    w.commit(metas[split])
  return metas


def write(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike, *,
          val_every: int = 0) -> dict[str, dict]:
  """Tokenizes `documents` into out_dir/train.bin (and val.bin); their metas.

  val_every > 1 sends documents 0, val_every, 2 * val_every, ... to val.
  """
  if val_every == 1 or val_every < 0:
    raise UserError(f'val_every={val_every}: use 0 (no val split) or N >= 2 '
                    '(every Nth document validates)')
  out = pathlib.Path(out_dir)
  paths = {'train': out / 'train.bin'}
  if val_every:
    paths['val'] = out / 'val.bin'
  return _write(documents, tokenizer, paths,
                lambda i: 'val' if val_every and i % val_every == 0 else 'train')


def write_split(documents: Iterable[str], tokenizer, path: str | os.PathLike
                ) -> dict:
  """Tokenizes `documents` into one split's `path` (.bin) and its .json."""
  return _write(documents, tokenizer, {'split': pathlib.Path(path)},
                lambda i: 'split')['split']


def load(path: str | os.PathLike, tokenizer) -> np.memmap:
  """The token ids [n] of a prepared split, memory-mapped read-only."""
  path = pathlib.Path(path)
  meta_path = _meta_path(path)
  fix = 'prepare it with `python -m data.tokens` (see data/tokens.py)'
  if not path.exists():
    raise UserError(f'{path}: token file not found; check the path or {fix}.')
  try:
    meta = json.loads(meta_path.read_text())
  except FileNotFoundError:
    raise UserError(f'{meta_path} not found: {path} is not a finished token '
                    f'file (an interrupted prepare?); {fix}.') from None
  except ValueError as e:
    raise UserError(f'{meta_path}: not valid JSON ({e}); {fix}.') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise UserError(f'{meta_path}: not a {FORMAT} description; {fix}.')
  dtype = np.dtype(meta['dtype'])
  expected = meta['num_tokens'] * dtype.itemsize
  if path.stat().st_size != expected:
    raise UserError(f'{path}: {path.stat().st_size} bytes, but {meta_path} '
                    f'says {meta["num_tokens"]} {dtype.name} tokens '
                    f'({expected} bytes); the file is damaged: {fix}.')
  if meta['tokenizer_sha256'] != tokenizer_sha256(tokenizer):
    raise UserError(
        f'{path} was tokenized with another tokenizer (sha256 '
        f'{meta["tokenizer_sha256"][:12]}..., vocabulary {meta["vocab_size"]})'
        f' than this run\'s ({tokenizer_sha256(tokenizer)[:12]}..., '
        f'{tokenizer.vocab_size}, which is the workdir\'s tokenizer.model '
        f'when resuming, else data.tokenizer.path); set data.tokenizer.path '
        f'to the one it was made with in a new workdir, or {fix} with this '
        f'run\'s tokenizer.')
  if meta['num_tokens'] < 2:
    raise UserError(f'{path}: {meta["num_tokens"]} tokens, too few to train '
                    f'or score; {fix} from more text.')
  return np.memmap(path, dtype=dtype, mode='r', shape=(meta['num_tokens'],))


def hf_documents(dataset: str, config: str | None = None, split: str = 'train',
                 field: str = 'text', revision: str | None = None
                 ) -> Iterator[str]:
  """The `field` of every row of an HF dataset split, streamed (extra `hf`)."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (optional extra)
  except ImportError:
    raise UserError('HF datasets need the `datasets` package: '
                    'pip install -e ".[hf]"') from None
  try:
    kwargs = {'revision': revision} if revision else {}
    rows = datasets.load_dataset(dataset, config, split=split, streaming=True,
                                 **kwargs)
  except Exception as e:  # noqa: BLE001 - network, name, config: say which
    raise UserError(f'load_dataset({dataset!r}, {config!r}, split={split!r}, '
                    f'streaming=True) failed: {e}. Check the name, config and '
                    'revision, and the network (or HF_DATASETS_CACHE).') from e
  n = 0
  try:
    for row in rows:
      if field not in row:
        raise UserError(f'{dataset} row {n} has no field {field!r} (it has '
                        f'{sorted(row)}); pass --text_field.')
      if not isinstance(row[field], str):
        raise UserError(f'{dataset} row {n}: field {field!r} is a '
                        f'{type(row[field]).__name__}, not text; pass the '
                        'text column as --text_field.')
      yield row[field]
      n += 1
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - a dropped connection mid-stream
    raise UserError(f'{dataset}: the stream failed after {n} rows ({e}); run '
                    'the command again (it starts over).') from e


def file_documents(paths: Sequence[str], tokenizer) -> Iterator[str]:
  """The documents of local text files (plain or .gz) as
  `LanguageModel.tokens` reads them: lines split on '\\n' only, or, for a
  character tokenizer, the text itself (yielded line by line, '\\n' kept).
  Streamed: a file larger than memory is fine."""
  keep = isinstance(tokenizer, tokenizers.CharTokenizer)
  for path in paths:
    yield from sources.stream_lines(path, keep_newlines=keep)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog='python -m data.tokens',
      description='Tokenize an LM corpus once into memory-mapped token files '
                  '(see data/tokens.py).')
  p.add_argument('--tokenizer', required=True,
                 help='the tokenizer file the run will use '
                      '(data.tokenizer.path)')
  p.add_argument('--out', required=True, help='folder for <split>.bin/.json')
  p.add_argument('--hf_dataset', help='an HF dataset name, streamed')
  p.add_argument('--hf_config', default=None, help='its config name')
  p.add_argument('--hf_split', default='train', help='its split to read')
  p.add_argument('--hf_revision', default=None,
                 help='a branch or commit of the dataset repository')
  p.add_argument('--text_field', default='text', help='the text column')
  p.add_argument('--val_every', type=int, default=0,
                 help='with --hf_dataset: every Nth document goes to val '
                      '(2000 = nanoGPT\'s 0.05%%); 0: no val split')
  p.add_argument('--files', action='append', default=[],
                 metavar='SPLIT=FILE[,FILE...]',
                 help='local text, one document per line; repeatable')
  args = p.parse_args(argv)
  try:
    tok = tokenizers.load(args.tokenizer)
    if bool(args.hf_dataset) == bool(args.files):
      raise UserError('give either --hf_dataset or --files SPLIT=FILE')
    if args.files and args.val_every:
      raise UserError('--val_every splits an --hf_dataset; with --files, '
                      'give the val file as --files val=FILE')
    if args.hf_dataset:
      docs = hf_documents(args.hf_dataset, args.hf_config, args.hf_split,
                          args.text_field, args.hf_revision)
      if isinstance(tok, tokenizers.CharTokenizer):
        # One stream, as a text file's lines keep their newlines.
        docs = (d + '\n' for d in docs)
      metas = write(docs, tok, args.out, val_every=args.val_every)
    else:
      metas = {}
      for spec in args.files:
        split, _, files = spec.partition('=')
        if not split or not files:
          raise UserError(f'--files {spec!r}: use SPLIT=FILE[,FILE...]')
        metas[split] = write_split(file_documents(files.split(','), tok), tok,
                                   pathlib.Path(args.out) / f'{split}.bin')
  except UserError as e:
    return errors.report(e)
  except OSError as e:  # --out unwritable, a full disk
    print(f'error: cannot write the token files in {args.out} ({e}); pick '
          'another --out or free space.', file=sys.stderr)
    return 2
  for split, meta in metas.items():
    print(f'{os.path.join(args.out, split)}.bin: {meta["num_tokens"]:,} '
          f'tokens, {meta["num_documents"]:,} documents, {meta["dtype"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
