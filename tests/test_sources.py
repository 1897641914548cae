"""Tests for data/sources.py: exact reading, documented errors, download fallback."""

import gzip
import hashlib
import io
import logging
import pathlib
import sys
import time
import urllib.error

import pytest

from data import sources
from data.errors import UserError
import corpora
from corpora import data_root


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.write_bytes(gzip.compress(data) if path.suffix == '.gz' else data)
  return path


def test_data_root_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv('TRANSFLAX_DATA', str(tmp_path / 'env'))
  assert sources.data_root(str(tmp_path / 'cfg')) == tmp_path / 'cfg'
  assert sources.data_root(None) == tmp_path / 'env'
  monkeypatch.delenv('TRANSFLAX_DATA')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert sources.data_root(None) == tmp_path / 'home' / '.cache' / 'transflax'


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_parallel_keeps_text_exact(tmp_path, suffix, caplog):
  src = _write(tmp_path / f'a.en{suffix}', b' lead  and trail \r\nx\n\nfoo\x0cbar\nlast')
  tgt = _write(tmp_path / f'a.de{suffix}', 'Ü\u2028ber\ny\nz\n \n\tletzte\n'.encode())
  with caplog.at_level(logging.WARNING):
    corpus = sources.read_parallel(src, tgt)
  # Only '\n' / '\r\n' are removed; form feed and U+2028 do not split lines.
  assert corpus.pairs == [(' lead  and trail ', 'Ü\u2028ber'), ('x', 'y'), ('last', '\tletzte')]
  assert corpus.dropped_empty == 2 and len(corpus) == 3
  assert 'dropped 2 of 5' in caplog.text and str(src) in caplog.text


def test_misaligned_files_name_both_files_and_counts(tmp_path):
  src = _write(tmp_path / 'a.en', b'1\n2\n3\n')
  tgt = _write(tmp_path / 'a.de.gz', b'1\n2\n')
  with pytest.raises(UserError) as e:
    sources.read_parallel(src, tgt)
  assert all(s in str(e.value) for s in (str(src), str(tgt), ' 3 ', ' 2'))


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
  bad = _write(tmp_path / f'bad.de{suffix}', b'ok\nstill ok\nbroken \xff here\n')
  good = _write(tmp_path / 'good.en', b'a\nb\nc\n')
  with pytest.raises(UserError, match=f'{bad}: invalid UTF-8 on line 3'):
    sources.read_parallel(good, bad)
  with pytest.raises(UserError, match='line 3'):
    sources.read_text([good, bad])


def test_missing_and_corrupt_files_are_named(tmp_path):
  with pytest.raises(UserError, match='nope.en'):
    sources.read_parallel(tmp_path / 'nope.en', tmp_path / 'nope.de')
  (tmp_path / 'corrupt.gz').write_bytes(b'not gzip')
  with pytest.raises(UserError, match='corrupt.gz'):
    sources.read_text(tmp_path / 'corrupt.gz')


def test_read_tsv(tmp_path):
  path = _write(tmp_path / 'p.tsv.gz', b'a b\tA B\r\n\t\nc\tC\n')
  corpus = sources.read_tsv(path)
  assert corpus.pairs == [('a b', 'A B'), ('c', 'C')] and corpus.dropped_empty == 1
  _write(tmp_path / 'bad.tsv', b'a\tA\nno tab here\n')
  with pytest.raises(UserError, match='bad.tsv: line 2'):
    sources.read_tsv(tmp_path / 'bad.tsv')


def test_read_text_concatenates(tmp_path):
  a = _write(tmp_path / 'a.txt', b'First\n')
  b = _write(tmp_path / 'b.txt.gz', 'zweite\r\n'.encode())
  assert sources.read_text([a, b]) == 'First\nzweite\r\n'  # As is, '\r' too.


def test_multi30k_real_splits_and_checksums():
  root = data_root()
  for split, n in (('train', 29000), ('val', 1014), ('test_2016_flickr', 1000)):
    corpus = sources.multi30k(split, 'en', 'de', root=root)
    assert len(corpus) + corpus.dropped_empty == n
    assert corpus.name == f'multi30k/{split}.en-de'
  assert corpus.pairs[0][0] == 'A man in an orange hat starring at something.'
  for path in (root / 'multi30k').glob('*.gz'):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sources.MULTI30K_SHA256[path.name]


def test_multi30k_without_network_fails_fast_with_urls(tmp_path):
  """An empty root: either no network (one clear error, fast) or a real, verified download."""
  start = time.monotonic()
  try:
    corpus = sources.multi30k('val', 'en', 'fr', root=tmp_path)
  except UserError as e:
    message = str(e)
    assert time.monotonic() - start < 2 * sources.DOWNLOAD_TIMEOUT_S + 5
    for lang in ('en', 'fr'):
      assert sources.MULTI30K_URL.format(split='val', lang=lang) in message
    assert str(tmp_path / 'multi30k') in message
  else:  # A machine with network: the download was checksummed.
    assert len(corpus) == 1014


def test_multi30k_download_verifies_checksums(tmp_path, monkeypatch):
  real = data_root() / 'multi30k'
  served = []

  def urlopen(url, timeout):
    assert timeout == sources.DOWNLOAD_TIMEOUT_S
    served.append(url)
    name = url.rsplit('/', 1)[1]
    data = (real / name).read_bytes() if name.startswith('val') else b'tampered'
    return io.BytesIO(data)

  monkeypatch.setattr(sources.urllib.request, 'urlopen', urlopen)
  corpus = sources.multi30k('val', 'de', 'en', root=tmp_path)
  assert len(corpus) == 1014 and len(served) == 2
  assert sorted(p.name for p in (tmp_path / 'multi30k').iterdir()) == ['val.de.gz', 'val.en.gz']
  with pytest.raises(UserError, match='sha256'):
    sources.multi30k('test_2016_flickr', 'de', 'en', root=tmp_path)
  assert not (tmp_path / 'multi30k' / 'test_2016_flickr.de.gz').exists()


def test_unknown_checksum_checks_gzip_and_plain_files_are_accepted(tmp_path, monkeypatch):
  monkeypatch.setattr(sources.urllib.request, 'urlopen',
                      lambda url, timeout: io.BytesIO(b'truncated, not gzip'))
  (tmp_path / 'multi30k').mkdir()
  _write(tmp_path / 'multi30k' / 'test_2017_flickr.en', b'plain\n')
  with pytest.raises(UserError, match='test_2017_flickr.cs.gz'):
    sources.multi30k('test_2017_flickr', 'en', 'cs', root=tmp_path)
  _write(tmp_path / 'multi30k' / 'test_2017_flickr.cs', 'prostý\n'.encode())
  assert sources.multi30k('test_2017_flickr', 'en', 'cs', root=tmp_path).pairs == [
      ('plain', 'prostý')]


def test_read_only_root_downloads_to_user_cache(tmp_path, monkeypatch):
  root = tmp_path / 'readonly'
  (root / 'multi30k').mkdir(parents=True)
  (root / 'multi30k').chmod(0o555)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setattr(sources.urllib.request, 'urlopen', lambda url, timeout: (
      _ for _ in ()).throw(urllib.error.URLError('no network')))
  with pytest.raises(UserError) as e:
    sources.multi30k('val', 'en', 'de', root=root)
  assert str(tmp_path / 'home' / '.cache' / 'transflax' / 'multi30k') in str(e.value)
  assert 'no network' in str(e.value)


def test_bad_names_are_user_errors():
  with pytest.raises(UserError, match='test_2019'):
    sources.multi30k('test_2019', 'en', 'de')
  with pytest.raises(UserError, match="'xx'"):
    sources.multi30k('val', 'en', 'xx')
  with pytest.raises(UserError, match='split'):
    sources.tinyshakespeare('test')


def test_tinyshakespeare_nanogpt_split():
  root = data_root()
  if not (root / 'tinyshakespeare' / 'input.txt').exists():
    corpora.missing('tinyshakespeare/input.txt')
  train, val = sources.tinyshakespeare('train', root), sources.tinyshakespeare('val', root)
  assert len(train) + len(val) == 1115394
  assert len(train) == int(1115394 * 0.9)
  assert train.startswith('First Citizen:\n') and (train + val).endswith('\n')


def test_wmt_without_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # Makes `import datasets` fail.
  with pytest.raises(UserError, match=r'pip install -e "\.\[hf\]"'):
    sources.wmt('de-en', 'validation')


def test_a_missing_corpus_fails_where_the_data_is_required(monkeypatch):
  """tests/corpora.py: .ci/run sets TRANSFLAX_REQUIRE_DATA, so there a lost
  corpus fails its tests; elsewhere they skip."""
  monkeypatch.delenv('CI', raising=False)
  monkeypatch.setenv('TRANSFLAX_REQUIRE_DATA', '1')
  with pytest.raises(pytest.fail.Exception, match='requires the data'):
    corpora.missing('multi30k')
  monkeypatch.delenv('TRANSFLAX_REQUIRE_DATA')
  with pytest.raises(pytest.skip.Exception, match='multi30k not found'):
    corpora.missing('multi30k')
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(pytest.fail.Exception):
    corpora.missing('multi30k')
