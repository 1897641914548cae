"""Translation end to end: decoding with the real model, the CLI, experiments/wmt14.

1. A tiny EncoderDecoder trained for seconds to reverse its input (so its
   hypotheses follow the source and end at EOS at different steps): beam 1
   is greedy through the KV cache, and beam 4 with the cache equals beam 4
   recomputing the whole prefix every step.
2. One Multi30k smoke run, trained once for the module, serves every CLI test
   (`translate`, `average`, `eval`) and in-process checks of checkpoint
   selection, output order and the decoding-speed benchmark. Its 8 steps
   teach it little (every output is much the same), so output order is
   checked with a decoder that copies its source.
3. experiments/wmt14.py: paper-sized parameter counts by --dry_run, and the
   :smoke variant training end to end.
"""

import functools
import json
import os
import pathlib
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from data import tokenizer as tokenizers
from data.errors import UserError
from model import EncoderDecoder, generate, get_preset, init_cache
from train import evaluate, runs
from corpora import data_root

REPO = pathlib.Path(__file__).resolve().parents[1]
EOS = tokenizers.EOS_ID


# -- 1. the real model: greedy, beam and the KV cache ------------------------------

VOCAB, BATCH, SRC, MAX_LEN = 24, 6, 8, 12


def _segments(x):
  """Segment ids of the test's rows: their tokens, left-aligned and padded
  with 0 (1 on tokens, 0 on padding), as the pipeline writes them."""
  return (x > 0).astype(jnp.int32)


def _reverse_batch(rng, rows):
  """Sources of 1-7 random tokens + EOS; targets: the tokens reversed + EOS."""
  src = np.zeros((rows, SRC), np.int32)
  tgt = np.zeros((rows, SRC), np.int32)
  for r in range(rows):
    n = rng.randint(1, SRC)
    tokens = rng.randint(tokenizers.NUM_SPECIAL, VOCAB, n)
    src[r, :n + 1] = [*tokens, EOS]
    tgt[r, :n + 1] = [*tokens[::-1], EOS]
  return src, tgt


@pytest.fixture(scope='module')
def tiny():
  """(config, params, inputs): a tiny EncoderDecoder trained to reverse its input.

  A random model's outputs are one token repeated to the maximum length,
  which a stale or misordered cache would reproduce just as well. A hundred
  Adam steps (seconds) teach it to follow the source: hypotheses of different
  lengths, ending in EOS, that attend to the source and to their own prefix.
  """
  config = get_preset('tiny_encdec', vocab_size=VOCAB, max_len=32)
  model = EncoderDecoder(config)
  rng = np.random.RandomState(0)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), *_reverse_batch(rng, 2))['params'])
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, src, tgt):
    def loss(p):
      logits = model.apply({'params': p}, src, tgt, _segments(src),
                           _segments(tgt))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
      return jnp.sum(ce * (tgt > 0)) / jnp.sum(tgt > 0)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(100):
    params, opt_state = step(params, opt_state, *_reverse_batch(rng, 64))
  inputs, _ = _reverse_batch(np.random.RandomState(1), BATCH)
  return config, params, jnp.asarray(inputs)


def _encode_for_search(config, params, inputs):
  dmodel = EncoderDecoder(config.replace(decode=True))
  encoded = EncoderDecoder(config).apply({'params': params}, inputs,
                                         _segments(inputs),
                                         method=EncoderDecoder.encode)
  cache = init_cache(dmodel, inputs.shape[0], MAX_LEN,
                     source_len=inputs.shape[1])
  return cache, evaluate.cached_step(dmodel, params, encoded,
                                     _segments(inputs), VOCAB)


@functools.partial(jax.jit, static_argnames='config')
def _greedy(params, inputs, *, config):
  cache, step = _encode_for_search(config, params, inputs)
  # Sampling at temperature 0 is argmax decoding.
  return generate.temperature_sample(
      jnp.zeros((inputs.shape[0], MAX_LEN), jnp.int32), cache, step,
      jax.random.key(0), eos_id=EOS, temperature=0.0)


@functools.partial(jax.jit, static_argnames='config')
def _beam_one(params, inputs, alpha, *, config):
  cache, step = _encode_for_search(config, params, inputs)
  return generate.beam_search(cache, step, beam_size=1, alpha=alpha,
                              eos_id=EOS, max_decode_len=MAX_LEN)[0][:, 0]


def _assert_nontrivial(seqs):
  """Rows differ and end at EOS at different steps, with no PAD before it."""
  seqs = np.asarray(seqs)
  ends = set()
  for row in seqs:
    eos = np.flatnonzero(row == EOS)
    assert eos.size, f'no EOS in {row}'
    ends.add(int(eos[0]))
    assert np.all(row[:eos[0]] > 0) and not row[eos[0] + 1:].any(), row
  assert len(ends) >= 3, seqs
  assert len({tuple(row) for row in seqs}) == len(seqs), seqs


def test_the_tiny_model_has_learned_something(tiny):
  config, params, inputs = tiny
  out = np.asarray(_greedy(params, inputs, config=config))
  _assert_nontrivial(out)
  # Mostly the reversed source: the decoder really reads the encoder.
  src = np.asarray(inputs)
  right = [np.array_equal(o[:n], s[:n][::-1]) for o, s, n in
           zip(out, src, (src > 1).sum(1))]
  assert sum(right) >= BATCH // 2, (out, src)


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_beam_one_is_greedy_with_the_kv_cache(tiny, alpha):
  config, params, inputs = tiny
  np.testing.assert_array_equal(_beam_one(params, inputs, alpha, config=config),
                                _greedy(params, inputs, config=config))


def test_cached_beam_search_equals_recomputing_the_prefix(tiny):
  config, params, inputs = tiny
  decode = functools.partial(evaluate._beam_decode, params, inputs,
                             _segments(inputs), 0.6, config=config,
                             beam_size=4, max_len=MAX_LEN)
  cached, uncached = decode(cached=True), decode(cached=False)
  _assert_nontrivial(cached)
  np.testing.assert_array_equal(cached, uncached)


@functools.partial(jax.jit, static_argnames=('config', 'limit'))
def _first_step_logits(params, inputs, *, config, limit):
  """First-step logits of the cached and uncached steps masked at `limit`, and unmasked."""
  model = EncoderDecoder(config)
  segments = _segments(inputs)
  encoded = model.apply({'params': params}, inputs, segments,
                        method=EncoderDecoder.encode)
  dmodel = EncoderDecoder(config.replace(decode=True))
  cache = init_cache(dmodel, inputs.shape[0], MAX_LEN,
                     source_len=inputs.shape[1])
  start = jnp.zeros((inputs.shape[0], 1), jnp.int32)
  uncached, init = evaluate.uncached_step(model, params, encoded, segments,
                                          MAX_LEN, limit)
  return (evaluate.cached_step(dmodel, params, encoded, segments, limit)(
              start, cache)[0],
          uncached(start, init(inputs.shape[0]))[0],
          evaluate.cached_step(dmodel, params, encoded, segments, VOCAB)(
              start, cache)[0])


def test_pad_and_ids_past_the_tokenizer_are_never_chosen(tiny):
  config, params, inputs = tiny
  limit = 12  # as if model.vocab_size were padded past a 12-piece tokenizer
  *masked, full = _first_step_logits(params, inputs, config=config,
                                     limit=limit)
  for logits in masked:
    logits = np.asarray(logits)
    assert logits.shape == (BATCH, VOCAB)
    assert np.all(logits[:, 0] == generate.NEG_INF)
    assert np.all(logits[:, limit:] == generate.NEG_INF)
    assert np.all(logits[:, 1:limit] > generate.NEG_INF / 2)
  # Unmasked, the model would pick ids >= limit first (it echoes the source).
  assert np.any(np.argmax(full, axis=-1) >= limit)


# -- 2. a trained smoke workdir: CLI and translation ----------------------------


def _cli(*args, stdin=None, check=True):
  """Runs `python -m train ARGS` from outside the repo, as a user would.

  On one CPU device, as a user would: conftest's 8 simulated devices would
  shard the smoke model's batches eight ways on two cores, several times
  slower.
  """
  flags = os.environ.get('XLA_FLAGS', '').split()
  env = {**os.environ, 'TRANSFLAX_DATA': str(data_root()), 'XLA_FLAGS': ' '.join(
      f for f in flags if 'xla_force_host_platform_device_count' not in f)}
  proc = subprocess.run([sys.executable, '-m', 'train', *map(str, args)],
                        input=stdin, capture_output=True, text=True, env=env,
                        cwd='/', timeout=300)
  if check and proc.returncode:
    raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stderr}')
  return proc


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """multi30k.py:smoke trained once: checkpoints at steps 4 and 8, best 8.

  On the 1,014 validation pairs: the tokenizer trains and the corpus encodes
  in a third of the time the 29k training pairs take.
  """
  w = tmp_path_factory.mktemp('smoke')
  _cli('train', '--config', REPO / 'experiments/multi30k.py:smoke',
       '--workdir', w, '--config.data.train_split=val',
       '--config.decode.test_sentences=4')
  return w


_LOADED = {}


def _load(w, which):
  """evaluate.load, once per (workdir, checkpoint): each restore takes seconds."""
  if (w, which) not in _LOADED:
    _LOADED[w, which] = runs.load(str(w), which)
  return _LOADED[w, which]


LINES = ['A dog.', 'Two men are playing soccer in a big green park.',
         'A woman sings.', 'A child in a red shirt runs on the beach.',
         'The cat sleeps on a warm chair.', 'Two people walk.']


def test_average_last_beyond_the_checkpoints_averages_what_exists(
    tmp_path, caplog, monkeypatch):
  """multi30k.py:smoke stopped at step 2 has one checkpoint, not the
  average_last=2 to average: a warning, not a failure at the very end."""
  import logging
  from experiments import multi30k
  from train import loop
  monkeypatch.setenv('TRANSFLAX_DATA', str(data_root()))
  config = multi30k.get_config('smoke')
  config.train.num_steps = 2
  config.decode.test_sentences = 2
  config.lock()
  with caplog.at_level(logging.WARNING):
    final = loop.train_and_evaluate(config, str(tmp_path / 'w'))
  assert final['averaged_last'] == 1
  assert 'train.average_last=2 but' in caplog.text
  assert (tmp_path / 'w' / 'checkpoints_avg' / '2').is_dir()


def test_translate_file_one_line_per_line(workdir, tmp_path):
  """Without --checkpoint, translate uses the model the run reported test
  BLEU from (multi30k.py:smoke averages its last 2) and says so."""
  lines = ['A man sleeps.', '', 'Two dogs run in the park.', '   ', 'Hello',
           '']
  src, dst = tmp_path / 'src.txt', tmp_path / 'hyp.txt'
  src.write_text(''.join(l + '\n' for l in lines), encoding='utf-8')
  proc = _cli('translate', '--workdir', workdir, '--input', src, '--output',
              dst, '--beam_size', 1)
  assert json.loads((workdir / 'results.json').read_text())['checkpoint'] == (
      'average')
  assert f'loaded {workdir}/checkpoints_avg step 8 (average) (the model the ' \
      'run reported' in proc.stderr, proc.stderr
  out = dst.read_text(encoding='utf-8').split('\n')
  assert out[-1] == '' and len(out) - 1 == len(lines)
  out = out[:-1]
  # Blank lines stay blank (a smoke model may also put EOS first on a real
  # line, so only this direction is a property); the rest is translated as
  # evaluate.translate does, line by line.
  for line, hyp in zip(lines, out):
    if not line.strip():
      assert hyp == ''
  run, params = _load(workdir, 'average')
  assert out == evaluate.translate(run, params, lines, beam_size=1)


def test_translate_stdin_to_stdout_with_a_step(workdir):
  proc = _cli('translate', '--workdir', workdir, '--checkpoint', 4,
              '--beam_size', 1, stdin=''.join(l + '\n' for l in LINES))
  out = proc.stdout.split('\n')
  assert out[-1] == '' and len(out) - 1 == len(LINES)
  run, params = _load(workdir, '4')
  assert out[:-1] == evaluate.translate(run, params, LINES, beam_size=1)


def test_checkpoint_choices_load_the_right_params(workdir):
  leaves = lambda which: jax.tree.leaves(_load(workdir, which)[1])
  latest, four, eight = leaves('latest'), leaves('4'), leaves('8')
  for a, b in zip(latest, eight):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(four, eight))
  # Only the final eval (step 8) measured eval/loss, so it is the best.
  for a, b in zip(leaves('best'), eight):
    np.testing.assert_array_equal(a, b)


def test_average_command_then_best_and_average_translate(workdir):
  proc = _cli('average', '--workdir', workdir, '--last', 2)
  assert 'checkpoints_avg' in proc.stdout
  _LOADED.pop((workdir, 'average'), None)
  avg = jax.tree.leaves(_load(workdir, 'average')[1])
  four = jax.tree.leaves(_load(workdir, '4')[1])
  eight = jax.tree.leaves(_load(workdir, '8')[1])
  for a, x, y in zip(avg, four, eight):
    np.testing.assert_allclose(a, (np.asarray(x) + np.asarray(y)) / 2,
                               rtol=1e-5, atol=1e-6)
  for which in ('best', 'average'):
    proc = _cli('translate', '--workdir', workdir, '--checkpoint', which,
                '--beam_size', 1, stdin=''.join(l + '\n' for l in LINES[:3]))
    run, params = _load(workdir, which)
    assert proc.stdout.split('\n')[:-1] == evaluate.translate(
        run, params, LINES[:3], beam_size=1), which


def test_missing_step_is_a_one_line_error(workdir):
  proc = _cli('translate', '--workdir', workdir, '--checkpoint', 7,
              stdin='A dog.\n', check=False)
  assert proc.returncode == 2, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'step 7' in last, proc.stderr
  assert 'available steps: [4, 8]' in last
  assert 'Traceback' not in proc.stderr
  with pytest.raises(UserError, match='use latest, best, average or a step'):
    runs.load(str(workdir), 'newest')


def test_eval_prints_bleu_chrf_signature_and_speed(workdir):
  proc = _cli('eval', '--workdir', workdir, '--split', 'val', '--beam_size', 1)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['split'] == 'val'
  # The smoke config scores decode.test_sentences of the split.
  assert result['sentences'] == 4
  assert 0 <= result['bleu'] <= 100 and 0 <= result['chrf'] <= 100
  assert re.match(r'nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|'
                  r'version:', result['bleu_signature'])
  assert result['chrf_signature'].startswith('nrefs:1|')
  assert result['sentences_per_sec'] > 0


def _echo_decode(params, inputs, segmentation, alpha, *, config, beam_size,
                 max_len, cached=True, vocab_limit=None):
  """A 'translation' that copies the source: output i shows which input it had."""
  inputs = np.asarray(inputs)[:, :max_len]
  return np.pad(inputs, ((0, 0), (0, max_len - inputs.shape[1])))


def test_outputs_come_back_in_input_order(workdir, monkeypatch):
  run, params = _load(workdir, 'latest')
  monkeypatch.setattr(evaluate, '_beam_decode', _echo_decode)
  lines = LINES + ['', 'A dog.', '  ', 'A second dog runs.']
  shuffled = random.Random(0).sample(lines, len(lines))
  for order in (shuffled, shuffled[::-1]):
    want = [l if l.strip() else '' for l in order]
    # batch_size 2: several length-sorted batches, including a short last one.
    assert evaluate.translate(run, params, order, batch_size=2) == want
  assert evaluate.translate(run, params, []) == []
  # Byte-fallback pieces can decode to a line break: outputs stay one line.
  assert evaluate.translate(run, params, ['A dog.\nA cat.']) == [
      'A dog. A cat.']


def test_real_outputs_permute_with_the_inputs(workdir):
  run, params = _load(workdir, 'latest')
  order = random.Random(1).sample(range(len(LINES)), len(LINES))
  forward = evaluate.translate(run, params, [LINES[i] for i in order],
                               beam_size=1)
  backward = evaluate.translate(run, params, [LINES[i] for i in order[::-1]],
                                beam_size=1)
  assert forward == backward[::-1]
  assert [forward[order.index(i)] for i in range(len(LINES))] == (
      evaluate.translate(run, params, LINES, beam_size=1))


def test_decode_speed_cached_and_uncached_agree(workdir):
  run, params = _load(workdir, 'latest')
  result = evaluate.decode_speed(run, params, LINES[:3], beam_size=1)
  assert result['same_outputs'] is True
  assert result['sentences'] == 3 and result['beam_size'] == 1
  assert result['cached_sentences_per_sec'] > 0
  assert result['uncached_sentences_per_sec'] > 0
  assert result['speedup'] == pytest.approx(
      result['cached_sentences_per_sec'] / result['uncached_sentences_per_sec'])


# -- 3. experiments/wmt14.py -------------------------------------------------------


def _dry_run_total(arg):
  proc = _cli('train', '--config', REPO / f'experiments/wmt14.py:{arg}',
              '--dry_run')
  total = re.search(r'^\s*total\s+([\d,]+) params', proc.stdout, re.M)
  assert total, proc.stdout
  return int(total.group(1).replace(',', ''))


@pytest.mark.parametrize('arg, low, high', [
    ('base', 63e6, 65e6), ('big', 212e6, 215e6)])
def test_wmt14_parameter_counts_match_the_paper(arg, low, high):
  # Paper Table 3: 65M (base) and 213M (big) with a 37k shared vocabulary.
  assert low <= _dry_run_total(arg) <= high


# "Attention Is All You Need", written from the paper, not from the config:
# Table 3 (N, d_model, d_ff, h, d_k, d_v, P_drop, eps_ls, train steps),
# section 5.1 (a shared ~37k BPE vocabulary, ~25k tokens per batch),
# section 5.3 (Adam and the learning-rate formula) and section 6.1 (beam 4,
# alpha 0.6, output length input + 50, averaging the last 5 / 20
# checkpoints). Paper names on the left.
PAPER = {
    'base': dict(N=6, d_model=512, d_ff=2048, h=8, d_k=64, d_v=64, P_drop=0.1,
                 eps_ls=0.1, train_steps=100_000, averaged=5),
    'big': dict(N=6, d_model=1024, d_ff=4096, h=16, d_k=64, d_v=64, P_drop=0.3,
                eps_ls=0.1, train_steps=300_000, averaged=20),
}
ADAM = dict(beta1=0.9, beta2=0.98, epsilon=1e-9, warmup_steps=4000)


def paper_lrate(step_num, d_model, warmup_steps=4000):
  """Section 5.3, equation (3), with step_num counted from 1."""
  return d_model ** -0.5 * min(step_num ** -0.5,
                               step_num * warmup_steps ** -1.5)


@pytest.mark.parametrize('arg', ['base', 'big'])
def test_wmt14_recipe_is_the_papers(arg):
  """The model the recipe builds, its learning rate at several steps, its
  optimizer and its decoding against the paper's values."""
  from experiments import wmt14
  from model import config_from_dict
  from train import state as state_lib
  paper, c = PAPER[arg], wmt14.get_config(arg)
  m = config_from_dict({**c.model.to_dict(), 'vocab_size': 37000,
                        'attention_impl': 'xla'})
  assert m.num_encoder_layers == m.num_decoder_layers == paper['N']
  assert (m.d_model, m.mlp_dim, m.num_heads) == (
      paper['d_model'], paper['d_ff'], paper['h'])
  assert (m.head_dim or m.d_model // m.num_heads) == paper['d_k'] == paper['d_v']
  assert m.dropout_rate == paper['P_drop'] and m.activation == 'relu'
  assert (m.positions, m.norm_position, m.share_embeddings, m.tie_output,
          m.scale_embeddings) == ('sinusoidal', 'post', True, True, True)
  assert c.train.label_smoothing == paper['eps_ls']
  assert c.train.num_steps == paper['train_steps']
  assert c.train.average_last == paper['averaged']
  assert c.train.keep_checkpoints >= paper['averaged']
  assert c.data.tokenizer.vocab_size == 37000
  assert (c.data.wmt_dataset, c.data.src_lang, c.data.tgt_lang) == (
      'wmt14', 'en', 'de')
  assert 23_000 <= c.train.batch_size * c.data.max_length <= 27_000
  o = c.optimizer
  assert (o.b1, o.b2, o.eps, o.warmup_steps) == (
      ADAM['beta1'], ADAM['beta2'], ADAM['epsilon'], ADAM['warmup_steps'])
  schedule = state_lib.make_schedule(o, m.d_model, c.train.num_steps)
  for step_num in (1, 100, 3999, 4000, 4001, 50_000):
    assert float(schedule(step_num - 1)) == pytest.approx(
        paper_lrate(step_num, paper['d_model']), rel=1e-5)
  assert (c.decode.beam_size, c.decode.alpha, c.decode.max_extra_len) == (
      4, 0.6, 50)
  with pytest.raises(ValueError, match='unknown arg'):
    wmt14.get_config('huge')


def test_wmt14_smoke_trains_end_to_end(tmp_path):
  proc = _cli('train', '--config', REPO / 'experiments/wmt14.py:smoke',
              '--workdir', tmp_path)
  final = json.loads(proc.stdout.strip().splitlines()[-1])
  assert final['step'] == 6 and final['averaged_last'] == 2
  assert np.isfinite(final['eval/loss'])
  assert final['test/sentences'] == 8 and 'test/bleu' in final
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
