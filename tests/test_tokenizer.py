"""Tests for data/tokenizer.py: determinism, exact round trips, special ids, I/O."""

import gzip

import numpy as np
import pytest

from data import sources
from data import tokenizer
from data.errors import UserError
import corpora
from corpora import data_root

# Small enough to train in well under a second; byte fallback needs 260 + alphabet.
_VOCAB = 600
_LINES = 2000


@pytest.fixture(scope='module')
def multi30k():
  """Train subset (en, de) and test_2016_flickr (en, de, fr) lines."""
  folder = data_root() / 'multi30k'
  train = {l: sources.read_lines(folder / f'train.{l}.gz')[:_LINES] for l in ('en', 'de')}
  test = {l: sources.read_lines(folder / f'test_2016_flickr.{l}.gz') for l in ('en', 'de', 'fr')}
  return train, test


@pytest.fixture(scope='module')
def sp(multi30k):
  train, _ = multi30k
  return tokenizer.train_tokenizer(train['en'] + train['de'], vocab_size=_VOCAB)


def test_special_ids_are_fixed():
  assert (tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.UNK_ID, tokenizer.BOS_ID) == (0, 1, 2, 3)


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_training_is_deterministic_and_files_equal_texts(multi30k, tmp_path, model_type):
  train, _ = multi30k
  plain, packed = tmp_path / 'train.en', tmp_path / 'train.de.gz'
  plain.write_text('\n'.join(train['en']) + '\n', encoding='utf-8')
  with gzip.open(packed, 'wt', encoding='utf-8') as f:
    f.write('\n'.join(train['de']) + '\n')
  from_texts = tokenizer.train_tokenizer(train['en'] + train['de'], vocab_size=_VOCAB,
                                         model_type=model_type)
  again = tokenizer.train_tokenizer(iter(train['en'] + train['de']), vocab_size=_VOCAB,
                                    model_type=model_type)
  from_files = tokenizer.train_tokenizer([plain, str(packed)], vocab_size=_VOCAB,
                                         model_type=model_type, path=tmp_path / 'm.model')
  assert from_texts.serialized == again.serialized == from_files.serialized
  assert (tmp_path / 'm.model').read_bytes() == from_files.serialized
  assert from_texts.vocab_size == _VOCAB


def test_round_trip_on_multi30k(sp, multi30k):
  """decode(encode(s)) == s on seen and unseen text (fr is never trained on)."""
  train, test = multi30k
  for lines in (train['en'][:500], train['de'][:500], test['en'], test['de'], test['fr']):
    ids = sp.encode(lines)
    assert all(row[-1] == tokenizer.EOS_ID for row in ids)
    assert sp.decode(ids) == lines
  # Whitespace, NFKC-sensitive and never-seen characters survive unchanged.
  odd = [' two  spaces ', 'ﬁ ligature ① ½', 'Ж 🙂 日本', 'tab\there']
  assert sp.decode(sp.encode(odd)) == odd


def test_char_model_type_round_trips(multi30k):
  train, test = multi30k
  chars = tokenizer.train_tokenizer(train['en'], vocab_size=400, model_type='char')
  assert chars.decode(chars.encode(test['fr'])) == test['fr']


def test_decode_stops_at_eos_and_drops_pad(sp):
  [ids] = sp.encode(['A dog runs.'], add_eos=False)
  row = [tokenizer.PAD_ID] + ids + [tokenizer.EOS_ID] + ids + [tokenizer.PAD_ID] * 3
  assert sp.decode([row, np.array(ids + [tokenizer.EOS_ID])]) == ['A dog runs.'] * 2
  assert sp.encode('A dog runs.', add_eos=False) == ids  # A bare str is one text.
  # Ids past the vocabulary (a padded model vocab) show up, never vanish.
  assert sp.decode([ids + [sp.vocab_size + 5]]) == ['A dog runs.\ufffd']


def test_save_load_and_serialized(sp, tmp_path):
  sp.save(tmp_path / 'sub' / 'spm.model')
  for loaded in (tokenizer.Tokenizer.load(tmp_path / 'sub' / 'spm.model'),
                 tokenizer.load(str(tmp_path / 'sub' / 'spm.model')),
                 tokenizer.Tokenizer.from_serialized(sp.serialized)):
    assert isinstance(loaded, tokenizer.Tokenizer)
    assert loaded.serialized == sp.serialized
    assert loaded.encode(['Ein Hund.']) == sp.encode(['Ein Hund.'])


def test_load_errors_name_the_file(tmp_path):
  missing = tmp_path / 'nope.model'
  with pytest.raises(UserError, match='nope.model'):
    tokenizer.Tokenizer.load(missing)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'\x00not a model')
  with pytest.raises(UserError, match='garbage.model'):
    tokenizer.load(garbage)


def test_too_small_vocab_is_a_user_error():
  with pytest.raises(UserError, match='vocab_size'):
    tokenizer.train_tokenizer(['a small corpus', 'of two lines'], vocab_size=50)


def test_char_tokenizer_on_tiny_shakespeare(tmp_path):
  path = data_root() / 'tinyshakespeare' / 'input.txt'
  if not path.exists():
    corpora.missing(str(path))
  text = sources.read_text(path)
  chars = tokenizer.CharTokenizer.from_text(text)
  assert chars.vocab_size == 4 + 65  # nanoGPT's 65 symbols, after the specials.
  ids = chars.encode(text, add_eos=False)
  assert len(ids) == len(text)  # One token per character, '\n' included.
  assert min(ids) == tokenizer.NUM_SPECIAL and max(ids) == chars.vocab_size - 1
  assert chars.decode([ids]) == [text]
  assert chars.encode(['\n']) == [[chars.encode('\n', add_eos=False)[0], tokenizer.EOS_ID]]
  # Sorted set of characters, like nanoGPT's stoi.
  stoi = {c: i + tokenizer.NUM_SPECIAL for i, c in enumerate(sorted(set(text)))}
  assert ids[:100] == [stoi[c] for c in text[:100]]


def test_char_tokenizer_io_and_errors(tmp_path):
  chars = tokenizer.CharTokenizer.from_text('hello\nworld')
  with pytest.raises(UserError, match="'Z'"):
    chars.encode('helloZ')
  chars.save(tmp_path / 'chars.json')
  for loaded in (tokenizer.load(tmp_path / 'chars.json'),
                 tokenizer.Tokenizer.load(tmp_path / 'chars.json'),
                 tokenizer.Tokenizer.from_serialized(chars.serialized)):
    assert isinstance(loaded, tokenizer.CharTokenizer)
    assert loaded.serialized == chars.serialized
  ids = chars.encode(['hello\n', 'world'])
  assert ids[0][-1] == tokenizer.EOS_ID
  assert chars.decode(ids + [[tokenizer.PAD_ID] + ids[1]]) == ['hello\n', 'world', 'world']
  (tmp_path / 'bad.json').write_text('{"format": "something else"}')
  with pytest.raises(UserError, match='bad.json'):
    tokenizer.load(tmp_path / 'bad.json')


def test_sentence_sample_is_seeded_and_used():
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghij'), size=rng.integers(2, 7)))
           for _ in range(300)]
  texts = [' '.join(rng.choice(words, size=8)) for _ in range(800)]
  train = lambda **kw: tokenizer.train_tokenizer(texts, vocab_size=300, **kw)
  sample = train(max_sentences=100)
  full = train()
  assert sample.serialized == train(max_sentences=100).serialized
  assert sample.serialized != full.serialized  # The sample, not everything.
  assert train(max_sentences=10_000).serialized == full.serialized
