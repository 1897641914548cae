r"""Measures input-pipeline throughput on the real corpora (CPU only, no model).

  python -m data.bench_pipeline --data_dir=../shared/data

Translation: Multi30k train en-de, a shared SentencePiece vocabulary, packed
batches of batch_size x max_length tokens (default 32 x 128 = 4096). LM: Tiny
Shakespeare characters, batches of 64 x 256. Prints batches/s, tokens/s and
the share of non-padding target tokens (packing efficiency). The train step's
rate is measured separately; the pipeline must stay well ahead of it.

  python -m data.bench_pipeline --lm_tokens=owt/train.bin \
      --lm_tokenizer=gpt2_bpe.model

also times a token file of data/tokens.py, memory-mapped, in GPT-2's
micro-batches of 96 x 1024, and prints the process's anonymous memory (the
file's pages the kernel maps are page cache, not copies).
"""

import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from data import pipeline
from data import sources
from data import tokenizer
from data import tokens as token_files

_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Data root (default: $TRANSFLAX_DATA, ~/.cache/transflax).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Translation rows per batch.')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 128, 'Translation row length.')
_VOCAB = flags.DEFINE_integer('vocab_size', 8000, 'SentencePiece vocabulary size.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Batches to time (after 10 warm-up batches).')
_PACK = flags.DEFINE_bool('pack', True, 'Pack several pairs per row.')
_LM_TOKENS = flags.DEFINE_string(
    'lm_tokens', None, 'A token file of data/tokens.py to time as well.')
_LM_TOKENIZER = flags.DEFINE_string(
    'lm_tokenizer', None, 'The tokenizer that --lm_tokens was made with.')


def _anon_mb() -> float:
  """This process's anonymous resident memory (Linux), MB."""
  with open('/proc/self/status') as f:
    fields = dict(line.split(':', 1) for line in f)
  return int(fields['RssAnon'].split()[0]) / 1024


def _time(ds, steps: int) -> tuple[float, float]:
  """(batches/s, share of non-padding targets) over `steps` batches of `ds`."""
  it = iter(ds)
  for _ in range(10):
    next(it)
  real = total = 0
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
    real += int(np.count_nonzero(batch['targets']))
    total += batch['targets'].size
  return steps / (time.perf_counter() - start), real / total


def main(argv):
  del argv
  root = sources.data_root(_DATA_DIR.value)
  train = sources.multi30k('train', 'en', 'de', root=root)
  with tempfile.TemporaryDirectory() as tmp:  # Texts only: nothing is kept.
    start = time.perf_counter()
    tok = tokenizer.train_tokenizer([s for s, _ in train.pairs] + [t for _, t in train.pairs],
                                    vocab_size=_VOCAB.value, path=f'{tmp}/spm.model')
    print(f'tokenizer: vocab {tok.vocab_size}, trained in {time.perf_counter() - start:.1f} s')
  start = time.perf_counter()
  src = tok.encode([s for s, _ in train.pairs])
  tgt = tok.encode([t for _, t in train.pairs])
  print(f'encode: {len(src)} pairs in {time.perf_counter() - start:.1f} s')

  start = time.perf_counter()
  ds = pipeline.translation_train(list(zip(src, tgt)), batch_size=_BATCH.value,
                                  max_length=_MAX_LENGTH.value, seed=0, pack=_PACK.value)
  print(f'translation_train built in {time.perf_counter() - start:.2f} s, '
        f'{ds.num_examples} pairs, {ds.num_dropped} dropped')
  rate, fill = _time(ds, _STEPS.value)
  tokens = _BATCH.value * _MAX_LENGTH.value
  print(f'translation: {rate:.1f} batches/s of {_BATCH.value}x{_MAX_LENGTH.value} '
        f'(pack={_PACK.value}), {rate * tokens * fill:,.0f} target tokens/s, '
        f'{fill:.1%} non-padding targets')

  text = sources.tinyshakespeare('train', root=root)
  chars = tokenizer.CharTokenizer.from_text(text)
  ids = np.asarray(chars.encode(text, add_eos=False), np.int32)
  ds = pipeline.lm_train(ids, batch_size=64, seq_len=256, seed=0)
  rate, _ = _time(ds, _STEPS.value)
  print(f'lm: {rate:.1f} batches/s of 64x256 ({rate * 64 * 256:,.0f} tokens/s)')

  if _LM_TOKENS.value:
    if not _LM_TOKENIZER.value:
      raise app.UsageError('--lm_tokens needs --lm_tokenizer, the tokenizer '
                           'the token file was made with')
    ids = token_files.load(_LM_TOKENS.value,
                           tokenizer.load(_LM_TOKENIZER.value))
    ds = pipeline.lm_train(ids, batch_size=96, seq_len=1024, seed=0)
    rate, _ = _time(ds, _STEPS.value)
    print(f'lm token file: {len(ids):,} tokens, {rate:.1f} batches/s of '
          f'96x1024 ({rate * 96 * 1024:,.0f} tokens/s); anonymous memory '
          f'{_anon_mb():,.0f} MB')


if __name__ == '__main__':
  app.run(main)
