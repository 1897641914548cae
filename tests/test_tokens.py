"""data/tokens.py: pre-tokenized, memory-mapped LM corpora.

A token file must hold exactly the ids `LanguageModel.tokens` makes from the
same text, so that training on it equals training on the text (checked
through the real training loop), whether it came from local files or from
an HF dataset (a stand-in `datasets` module: no network in tests); damaged,
unfinished or foreign token files are refused with the file named.
"""

import gzip
import json
import sys
import types

import numpy as np
import pytest

import tiny_run
from data import tokenizer as tokenizers
from data import tokens
from data.errors import UserError
from experiments import gpt2
from train import loop

_WORDS = ('the king shall speak of love and war to all his men before the '
          'sun goes down over the quiet sea').split()


def _document(rng) -> str:
  return ' '.join(rng.choice(_WORDS, rng.integers(3, 15)))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(folder, train.txt, val.txt, tokenizer): one document per line, with
  empty lines and a document with a newline-free non-ASCII word."""
  root = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  train = [_document(rng) for _ in range(600)]
  train[5] = ''
  train[7] = 'naïve café ' + train[7]
  val = [_document(rng) for _ in range(60)]
  (root / 'train.txt').write_text('\n'.join(train) + '\n')
  (root / 'val.txt').write_text('\n'.join(val) + '\n')
  tok = tokenizers.train_tokenizer(train, vocab_size=320, model_type='bpe',
                                   path=root / 'tok.model')
  return root, root / 'train.txt', root / 'val.txt', tok


def _expected(tok, documents, eos=True) -> np.ndarray:
  rows = tok.encode([d for d in documents if d], add_eos=eos)
  return np.concatenate([np.asarray(r) for r in rows])


def test_a_token_file_holds_the_documents_each_followed_by_eos(corpus,
                                                               tmp_path):
  _, train, _, tok = corpus
  meta = tokens.write_split(tokens.file_documents([str(train)], tok), tok,
                            tmp_path / 'train.bin')
  ids = tokens.load(tmp_path / 'train.bin', tok)
  lines = train.read_text().split('\n')
  want = _expected(tok, lines)
  assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
  np.testing.assert_array_equal(ids, want)
  assert meta['num_tokens'] == len(want)
  assert meta['num_documents'] == len([l for l in lines if l]) == 599
  assert (tmp_path / 'train.bin').stat().st_size == 2 * len(want)
  assert int(np.sum(ids == tokenizers.EOS_ID)) == 599


def test_a_character_tokenizer_makes_one_unbroken_stream(corpus, tmp_path):
  _, train, _, _ = corpus
  text = train.read_text()
  tok = tokenizers.CharTokenizer.from_text(text)
  tokens.write_split(tokens.file_documents([str(train)], tok), tok,
                     tmp_path / 'train.bin')
  np.testing.assert_array_equal(tokens.load(tmp_path / 'train.bin', tok),
                                tok.encode(text, add_eos=False))


def test_an_hf_dataset_streams_into_train_and_val(corpus, tmp_path,
                                                  monkeypatch):
  _, _, _, tok = corpus
  rng = np.random.default_rng(1)
  docs = [_document(rng) for _ in range(10)]
  calls = []

  def load_dataset(name, config, *, split, streaming):
    calls.append((name, config, split, streaming))
    return iter([{'text': d, 'id': i} for i, d in enumerate(docs)])

  monkeypatch.setitem(sys.modules, 'datasets',
                      types.SimpleNamespace(load_dataset=load_dataset))
  metas = tokens.write(tokens.hf_documents('openwebtext', None), tok,
                       tmp_path, val_every=4)
  assert calls == [('openwebtext', None, 'train', True)]
  assert sorted(metas) == ['train', 'val']
  np.testing.assert_array_equal(
      tokens.load(tmp_path / 'val.bin', tok), _expected(tok, docs[0::4]))
  np.testing.assert_array_equal(
      tokens.load(tmp_path / 'train.bin', tok),
      _expected(tok, [d for i, d in enumerate(docs) if i % 4]))
  with pytest.raises(UserError, match="no field 'content'.*--text_field"):
    list(tokens.hf_documents('openwebtext', field='content'))
  with pytest.raises(UserError, match="field 'id' is a int, not text"):
    list(tokens.hf_documents('openwebtext', field='id'))

  def dropped(*args, **kwargs):
    yield {'text': docs[0]}
    yield {'text': docs[1]}
    raise ConnectionError('connection reset')

  monkeypatch.setitem(sys.modules, 'datasets',
                      types.SimpleNamespace(load_dataset=dropped))
  with pytest.raises(UserError, match='failed after 2 rows .*connection '
                     'reset.*starts over'):
    tokens.write(tokens.hf_documents('openwebtext'), tok, tmp_path / 'cut',
                 val_every=4)
  assert not list((tmp_path / 'cut').iterdir())  # nothing half-written


def test_without_datasets_the_hf_path_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)
  with pytest.raises(UserError, match=r'pip install -e "\.\[hf\]"'):
    next(tokens.hf_documents('openwebtext'))


def test_damaged_unfinished_or_foreign_token_files_are_refused(corpus,
                                                              tmp_path):
  _, train, _, tok = corpus
  path = tmp_path / 'train.bin'
  with pytest.raises(UserError, match='train.bin: token file not found'):
    tokens.load(path, tok)
  tokens.write_split(tokens.file_documents([str(train)], tok), tok, path)
  other = tokenizers.CharTokenizer.from_text(train.read_text())
  with pytest.raises(UserError, match='train.bin was tokenized with another '
                     'tokenizer.*data.tokenizer.path'):
    tokens.load(path, other)
  data = path.read_bytes()
  path.write_bytes(data[:-2])
  with pytest.raises(UserError, match='train.bin: .* bytes, but .*damaged'):
    tokens.load(path, tok)
  path.write_bytes(data)
  tokens.load(path, tok)
  (tmp_path / 'train.json').unlink()
  with pytest.raises(UserError, match='train.json not found.*interrupted'):
    tokens.load(path, tok)


def test_local_files_stream_plain_or_gzipped_and_bad_utf8_is_named(
    corpus, tmp_path):
  _, train, _, tok = corpus
  packed = tmp_path / 'train.txt.gz'
  packed.write_bytes(gzip.compress(train.read_bytes()))
  assert (list(tokens.file_documents([str(packed)], tok))
          == train.read_text().split('\n')[:-1])
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'fine\nstill fine\nbroken \xff here\n')
  with pytest.raises(UserError, match='bad.txt: invalid UTF-8 on line 3'):
    tokens.write_split(tokens.file_documents([str(bad)], tok), tok,
                       tmp_path / 'bad.bin')
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'bad.txt', 'train.txt.gz']  # no half-written or temporary files


def test_a_failed_prepare_keeps_the_previous_split(corpus, tmp_path):
  """The failure comes from the last batch, tokenized when the split is
  finished: a character the character tokenizer does not know."""
  _, train, _, _ = corpus
  tok = tokenizers.CharTokenizer.from_text('abc \n')
  meta = tokens.write(['abc', 'cab'], tok, tmp_path, val_every=2)
  with pytest.raises(UserError):
    tokens.write(['abc', 'cab', 'abz'], tok, tmp_path, val_every=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'train.bin', 'train.json', 'val.bin', 'val.json']
  np.testing.assert_array_equal(tokens.load(tmp_path / 'val.bin', tok),
                                tok.encode('abc', add_eos=False))
  assert tokens.load(tmp_path / 'train.bin', tok).size == 3
  assert meta['val']['num_documents'] == 1
  with pytest.raises(UserError, match='val_every=1: use 0'):
    tokens.write(['abc'], tok, tmp_path, val_every=1)


def test_the_command_prepares_local_files(corpus, tmp_path, capsys):
  _, train, val, tok = corpus
  out = tmp_path / 'out'
  assert tokens.main(['--tokenizer', str(corpus[0] / 'tok.model'), '--out',
                      str(out), '--files', f'train={train}',
                      '--files', f'val={val}']) == 0
  assert 'train.bin: ' in capsys.readouterr().out
  np.testing.assert_array_equal(tokens.load(out / 'val.bin', tok),
                                _expected(tok, val.read_text().split('\n')))
  assert json.loads((out / 'val.json').read_text())['dtype'] == '<u2'
  assert tokens.main(['--tokenizer', str(corpus[0] / 'tok.model'), '--out',
                      str(out)]) == 2
  assert 'error: give either --hf_dataset or --files' in capsys.readouterr().err


def test_training_on_token_files_equals_training_on_the_text(corpus,
                                                             tmp_path):
  """Same batches, same losses: the token files are the text, tokenized."""
  root, train, val, _ = corpus
  base = {'data.corpus': 'text', 'data.files.train': str(train),
          'data.files.val': str(val), 'data.tokenizer.path': str(root / 'tok.model'),
          'data.tokenizer.vocab_size': 320, 'model.vocab_size': 320,
          'data.seq_len': 32, 'model.max_len': 32, 'train.num_steps': 4,
          'train.log_every': 1, 'train.eval_every': 4,
          'train.max_eval_batches': 0, 'train.checkpoint_every': 100}
  results = {}
  for corpus_kind in ('text', 'tokens'):
    overrides = dict(base)
    if corpus_kind == 'tokens':
      tok = tokenizers.load(root / 'tok.model')
      for split, path in (('train', train), ('val', val)):
        tokens.write_split(tokens.file_documents([str(path)], tok), tok,
                           tmp_path / f'{split}.bin')
      overrides.update({'data.corpus': 'tokens',
                        'data.files.train': str(tmp_path / 'train.bin'),
                        'data.files.val': str(tmp_path / 'val.bin')})
    config = gpt2.get_config('smoke')
    for key, value in overrides.items():
      *parents, leaf = key.split('.')
      node = config
      for name in parents:
        node = node[name]
      node[leaf] = value
    results[corpus_kind] = loop.train_and_evaluate(
        config, str(tmp_path / corpus_kind), evaluate_at_end=False)
    losses = tiny_run.losses(tiny_run.metrics(tmp_path / corpus_kind))
    results[corpus_kind]['losses'] = [losses[s] for s in range(1, 5)]
  text, from_tokens = results['text'], results['tokens']
  np.testing.assert_array_equal(from_tokens['losses'], text['losses'])
  assert from_tokens['eval/loss'] == text['eval/loss']
  assert from_tokens['eval/tokens'] == text['eval/tokens'] > 0
