"""Tokenizers: SentencePiece subwords for translation, characters for nanoGPT
parity, and imported checkpoints' byte-level BPE (`BPETokenizer`).

Special ids are fixed for every tokenizer, so the model, the loss and the
pipeline can rely on them without a tokenizer at hand:

  PAD_ID = 0  padding; loss weights are `targets != PAD_ID`
  EOS_ID = 1  end of sentence; appended by `encode(add_eos=True)`
  UNK_ID = 2  unknown piece (SentencePiece only; byte fallback makes it rare)
  BOS_ID = 3  reserved (the decoder shifts targets right with 0, not BOS)

`Tokenizer` wraps a SentencePiece model trained with identity normalisation,
no whitespace collapsing and byte fallback, so `decode(encode(s)) == s` for
any text: BLEU is computed on the decoded strings, and NFKC or collapsed
spaces would change them. Training is deterministic: one thread, every input
sentence, a fixed seed, so the same inputs and options give byte-identical
models.

`CharTokenizer` is nanoGPT's character model (Tiny Shakespeare: 65 symbols,
newline included, which SentencePiece cannot represent as its own token): ids
4.. are the sorted corpus characters.

Both serialise to bytes (`serialized`) for checkpoints, and `load` /
`from_serialized` return the right class from the content alone.
"""

import io
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from data import sources
from data.errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3
NUM_SPECIAL = 4

_CHAR_FORMAT = 'transflax.CharTokenizer'
_SEED = 0
# Shown for ids the tokenizer does not know (e.g. a model whose vocab was
# padded to a multiple of 128 samples id 8100): visible, never dropped.
_UNKNOWN_ID_TEXT = '\ufffd'


class _Base:
  """What every tokenizer shares: batching conventions, EOS/PAD handling, I/O.

  The special ids are attributes: ours are the fixed ids above; an imported
  tokenizer (`BPETokenizer`) has its checkpoint's, and may have no PAD.
  """

  vocab_size: int
  serialized: bytes
  pad_id: int | None = PAD_ID
  eos_id: int = EOS_ID
  bos_id: int | None = BOS_ID
  unk_id: int | None = UNK_ID
  # Whether an LM's documents start with BOS (imported Llama-family
  # checkpoints say; ours start a document after EOS instead).
  add_bos: bool = False

  def _encode(self, texts: list[str], add_eos: bool) -> list[list[int]]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, texts: str | Sequence[str],
             add_eos: bool = True) -> list[list[int]] | list[int]:
    """Token ids of each text, ending with EOS_ID if `add_eos`.

    A bare `str` is one text (e.g. a whole LM corpus) and gives one list of
    ids; a sequence of strings gives one list per string.
    """
    if isinstance(texts, str):
      return self._encode([texts], add_eos)[0]
    return self._encode(list(texts), add_eos)

  def decode(self, ids: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    """Texts of id rows `ids` [batch, length]: each stops at its first EOS, PADs dropped."""
    texts = []
    for row in ids:
      row = np.asarray(row, dtype=np.int64).reshape(-1)
      eos = np.flatnonzero(row == self.eos_id)
      row = row[:eos[0]] if eos.size else row
      if self.pad_id is not None:
        row = row[row != self.pad_id]
      texts.append(self._decode(row.tolist()))
    return texts

  def save(self, path: str | os.PathLike) -> None:
    """Writes `serialized` to `path` (atomically: a crash leaves no half file)."""
    sources.write_atomic(path, self.serialized)

  @staticmethod
  def load(path: str | os.PathLike) -> 'Tokenizer | CharTokenizer':
    """The tokenizer saved at `path` (either class, told apart by content)."""
    try:
      data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
      raise UserError(f'Tokenizer file {path} not found; train one with '
                      'train_tokenizer(..., path=...) or fix the path.') from None
    return _Base.from_serialized(data, name=str(path))

  @staticmethod
  def from_serialized(data: bytes, name: str = '<bytes>'):
    """The tokenizer whose `serialized` is `data`.

    A SentencePiece model is a protobuf starting with field 1 (tag 0x0a); a
    CharTokenizer or BPETokenizer is JSON starting with '{' whose "format"
    names the class.
    """
    if data[:1] == b'{':
      if data.startswith(b'{"format": "' + _BPE_FORMAT.encode()):
        return BPETokenizer._from_json(data, name)
      return CharTokenizer._from_json(data, name)
    return Tokenizer(data, name=name)


class Tokenizer(_Base):
  """A SentencePiece subword tokenizer with the fixed special ids."""

  def __init__(self, model_proto: bytes, name: str = '<bytes>'):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise UserError(f'{name} is not a SentencePiece model nor a '
                      f'CharTokenizer ({e}); retrain the tokenizer.') from e
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
      raise UserError(f'{name}: special ids (pad, eos, unk, bos) are {ids}, '
                      f'expected {(PAD_ID, EOS_ID, UNK_ID, BOS_ID)}; retrain it '
                      'with data.tokenizer.train_tokenizer.')
    self.serialized = bytes(model_proto)
    self.vocab_size = self._sp.vocab_size()

  def _encode(self, texts, add_eos):
    return self._sp.encode(texts, out_type=int, add_eos=add_eos)

  def piece_id(self, piece: str) -> int | None:
    """The id of a reserved control piece (`train_tokenizer(control_symbols=)`),
    or None if the tokenizer has no such control piece."""
    i = self._sp.piece_to_id(piece)
    return i if i != self._sp.unk_id() and self._sp.is_control(i) else None

  def _decode(self, ids):
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if not bad:
      return self._sp.decode(ids)
    # Decode the known runs and mark each unknown id visibly.
    out, run = [], []
    for i in ids:
      if 0 <= i < self.vocab_size:
        run.append(i)
      else:
        out += [self._sp.decode(run), _UNKNOWN_ID_TEXT]
        run = []
    return ''.join(out + [self._sp.decode(run)])


class CharTokenizer(_Base):
  """One token per character (newline included); ids NUM_SPECIAL.. are `chars` in order."""

  def __init__(self, chars: Iterable[str]):
    self.chars = ''.join(sorted(set(chars)))
    if any(len(c) != 1 for c in self.chars):
      raise UserError('CharTokenizer takes single characters.')
    self._ids = {c: NUM_SPECIAL + i for i, c in enumerate(self.chars)}
    self.vocab_size = NUM_SPECIAL + len(self.chars)
    self.serialized = json.dumps(
        {'format': _CHAR_FORMAT, 'version': 1, 'chars': self.chars},
        sort_keys=True, ensure_ascii=True).encode('ascii')

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    """The vocabulary of `text`: its sorted set of characters (nanoGPT's prepare.py)."""
    return cls(set(text))

  @classmethod
  def _from_json(cls, data: bytes, name: str) -> 'CharTokenizer':
    try:
      spec = json.loads(data)
      assert spec['format'] == _CHAR_FORMAT, spec['format']
      return cls(spec['chars'])
    except (ValueError, KeyError, AssertionError, TypeError) as e:
      raise UserError(f'{name} looks like JSON but is not a saved '
                      f'CharTokenizer ({e!r}); retrain the tokenizer.') from e

  def _encode(self, texts, add_eos):
    try:
      rows = [[self._ids[c] for c in t] for t in texts]
    except KeyError as e:
      raise UserError(
          f'Character {e.args[0]!r} is not in the CharTokenizer vocabulary '
          f'({len(self.chars)} characters); build it with '
          'CharTokenizer.from_text over all text it must encode.') from None
    return [r + [EOS_ID] for r in rows] if add_eos else rows

  def piece_id(self, piece: str) -> None:
    """Character tokenizers reserve no control pieces."""
    return None

  def _decode(self, ids):
    return ''.join(
        self.chars[i - NUM_SPECIAL] if NUM_SPECIAL <= i < self.vocab_size
        else '' if i == BOS_ID else _UNKNOWN_ID_TEXT for i in ids)


_BPE_FORMAT = 'transflax.BPETokenizer'


class BPETokenizer(_Base):
  """A pretrained checkpoint's tokenizer (byte-level BPE: GPT-2, Llama 3,
  SmolLM2), run by Hugging Face `tokenizers` from its `tokenizer.json`.

  Ids are the checkpoint's own, special ids included (`eos_id`, ...; `pad_id`
  may be None: GPT-2 has none, and its id 0 is "!"). `piece_id` finds the
  special tokens a chat template uses (`<|im_start|>`); encoding text never
  produces them (`encode` does not parse special tokens out of text), so a
  user who types "<|im_end|>" types text, as with our control pieces.
  Decoding skips special tokens, as SentencePiece does control pieces.
  """

  def __init__(self, tokenizer_json: str, *, eos_id: int,
               bos_id: int | None = None, pad_id: int | None = None,
               unk_id: int | None = None, add_bos: bool = False,
               vocab_size: int | None = None, name: str = '<bytes>'):
    from tokenizers import Tokenizer as _HFTokenizer
    try:
      self._tok = _HFTokenizer.from_str(tokenizer_json)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{name}: not a Hugging Face tokenizer.json ({e})') from None
    self.vocab_size = vocab_size or self._tok.get_vocab_size(
        with_added_tokens=True)
    self.eos_id, self.bos_id, self.pad_id, self.unk_id = (eos_id, bos_id,
                                                          pad_id, unk_id)
    self.add_bos = add_bos
    self._json = tokenizer_json
    self.serialized = json.dumps(
        {'format': _BPE_FORMAT, 'version': 1, 'eos_id': eos_id,
         'bos_id': bos_id, 'pad_id': pad_id, 'unk_id': unk_id,
         'add_bos': add_bos, 'vocab_size': self.vocab_size,
         'tokenizer': tokenizer_json}, ensure_ascii=True).encode('ascii')

  @classmethod
  def _from_json(cls, data: bytes, name: str) -> 'BPETokenizer':
    try:
      spec = json.loads(data)
      keys = ('eos_id', 'bos_id', 'pad_id', 'unk_id', 'add_bos', 'vocab_size')
      return cls(spec['tokenizer'], name=name, **{k: spec[k] for k in keys})
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'{name} is not a saved BPETokenizer ({e!r}); import '
                      f'the checkpoint again (`transflax import`).') from None

  @property
  def tokenizer_json(self) -> str:
    """The Hugging Face tokenizer.json it runs (written by `export`)."""
    return self._json

  def _encode(self, texts, add_eos):
    rows = [e.ids for e in self._tok.encode_batch(texts,
                                                  add_special_tokens=False)]
    return [r + [self.eos_id] for r in rows] if add_eos else rows

  def token(self, i: int) -> str | None:
    """The vocabulary entry of id `i` (byte-level spelling)."""
    return self._tok.id_to_token(i)

  def piece_id(self, piece: str) -> int | None:
    """The id of special token `piece` (a chat template's), or None."""
    i = self._tok.token_to_id(piece)
    return i if i is not None and piece in self._specials() else None

  def _specials(self) -> set[str]:
    return {t.content for t in self._tok.get_added_tokens_decoder().values()
            if t.special}

  def _decode(self, ids):
    known = [i for i in ids if 0 <= i < self._tok.get_vocab_size(True)]
    text = self._tok.decode(known, skip_special_tokens=True)
    return text if len(known) == len(ids) else text + _UNKNOWN_ID_TEXT


def document_start(tokenizer) -> list[int]:
  """The ids fed before a document's first token: EOS for our tokenizers
  (an LM's training documents each follow an EOS), an imported checkpoint's
  BOS if its documents start with one, else none (SmolLM2, GPT-2)."""
  if isinstance(tokenizer, BPETokenizer):
    return ([tokenizer.bos_id] if tokenizer.add_bos
            and tokenizer.bos_id is not None else [])
  return [EOS_ID]


load = _Base.load
from_serialized = _Base.from_serialized


def _sentences(files_or_texts) -> Iterable[str]:
  """The training sentences: lines of files (plain or .gz) or the given texts.

  A path (str or os.PathLike) or a list of them names files; a list of str
  counts as files only when every item is an existing file, otherwise as
  texts. Any other iterable yields texts.
  """
  if isinstance(files_or_texts, (str, os.PathLike)):
    files_or_texts = [files_or_texts]
  if isinstance(files_or_texts, (list, tuple)) and files_or_texts and all(
      isinstance(x, os.PathLike) or (isinstance(x, str) and '\n' not in x
                                     and os.path.isfile(x))
      for x in files_or_texts):
    for path in files_or_texts:
      yield from sources.read_lines(path)
  else:
    yield from files_or_texts


def train_tokenizer(files_or_texts, *, vocab_size: int,
                    model_type: str = 'unigram', character_coverage: float = 1.0,
                    max_sentences: int = 0,
                    control_symbols: Sequence[str] = (),
                    path: str | os.PathLike | None = None) -> Tokenizer:
  """Trains a SentencePiece tokenizer; deterministic for the same inputs and options.

  For translation pass both sides' files: one shared source/target vocabulary
  (which also allows tied embeddings).

  Args:
    files_or_texts: file path(s) (plain or .gz, one sentence per line) or an
      iterable of sentences; see `_sentences` for how they are told apart.
    vocab_size: number of pieces including the 4 specials and, because of byte
      fallback, 256 byte pieces (so at least ~300 plus the alphabet).
    model_type: 'unigram', 'bpe' or 'char'.
    character_coverage: share of characters covered by pieces; the rest are
      spelled as bytes. 1.0 for small alphabets, ~0.9995 for CJK.
    max_sentences: train on a seeded uniform sample of this many sentences
      (0: all). WMT-sized corpora need it: SentencePiece holds every training
      sentence in memory.
    control_symbols: pieces reserved after the 4 specials (ids 4, 5, ...)
      that encoding text never produces, e.g. a chat template's turn
      markers (data/chat.py); `piece_id` finds them.
    path: if given, the model is also saved there.
  """
  if model_type not in ('unigram', 'bpe', 'char'):
    raise UserError(f"model_type {model_type!r} unknown; use 'unigram', 'bpe' or 'char'.")
  sentences = _sentences(files_or_texts)
  if max_sentences:
    sentences = list(sentences)
    if len(sentences) > max_sentences:
      keep = np.random.default_rng(_SEED).choice(len(sentences), max_sentences,
                                                 replace=False)
      sentences = [sentences[i] for i in np.sort(keep)]
  model = io.BytesIO()
  spm.set_random_generator_seed(_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model, model_type=model_type, vocab_size=vocab_size,
        character_coverage=character_coverage,
        # Text must survive encode/decode unchanged (BLEU is computed on it).
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        byte_fallback=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        **({'control_symbols': list(control_symbols)} if control_symbols
           else {}),
        # Determinism: one thread, every sentence, in input order.
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        # A char model's vocabulary is its alphabet; vocab_size is an upper bound.
        hard_vocab_limit=model_type != 'char', minloglevel=2)
  except RuntimeError as e:
    raise UserError(f'SentencePiece training failed: {e}. Adjust vocab_size '
                    '(config.data.vocab_size) to what the message allows.') from e
  tokenizer = Tokenizer(model.getvalue())
  if path is not None:
    tokenizer.save(path)
  return tokenizer
