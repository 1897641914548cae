"""Figures (train/plots.py): the sown attention weights, learning curves, heatmaps.

1. The weights each attention layer sows (model/attention.py) are
   softmax(q k^T / sqrt(d) + mask) recomputed in NumPy from the layer's own
   parameters and inputs (captured with capture_intermediates): encoder and
   decoder self-attention and cross-attention of an encoder-decoder, and a
   grouped-query causal LM. Rows sum to 1, nothing above the causal diagonal
   or on a padding key gets weight, and sowing leaves the logits unchanged.
2. plot_runs on a real tiny run's metrics.jsonl: a PNG with every run's
   curves; malformed or missing metrics and a missing matplotlib are
   UserErrors that say what to do.
3. plot_attention on trained tiny workdirs (a char LM; a Multi30k smoke
   translation run) writes one PNG per kind of attention.
"""

import functools
import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

import tiny_run
from corpora import data_root
from data.errors import UserError
from model import DecoderLM, EncoderDecoder, get_preset
from train import loop, plots

PNG = b'\x89PNG\r\n\x1a\n'


# -- 1. the sown weights are the attention's -----------------------------------

def _numpy_weights(p, x_q, x_kv, mask):
  """softmax(q k^T / sqrt(d) + mask) [b, h, q, s] in float64 from one
  attention layer's params `p`, inputs [b, q, d] and [b, s, d] and a boolean
  mask [b, q, s]. A masked logit is float32's most negative number, as in the
  model (so an all-masked padding row is uniform, not NaN)."""
  def project(name, x):
    y = np.einsum('bld,dhk->blhk', np.asarray(x, np.float64),
                  np.asarray(p[f'{name}_kernel'], np.float64))
    bias = p.get(f'{name}_bias')
    return y if bias is None else y + np.asarray(bias, np.float64)
  q, k = project('query', x_q), project('key', x_kv)
  group = q.shape[2] // k.shape[2]  # grouped-query: heads share a kv head
  k = np.repeat(k, group, axis=2)
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, np.finfo(np.float32).min)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _random_params(model, *args):
  """Random params of the model's shapes (biases and norms too), with no
  compiled init: on 2 CPU cores every compile counts."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype),
                      shapes['params'])


def _apply_capturing(model, params, *args):
  """(logits, state): every module's output captured, attention weights sown."""
  apply = functools.partial(model.apply, capture_intermediates=True,
                            mutable=['intermediates'])
  return jax.jit(apply)({'params': params}, *args)


def _captured(state, *path):
  node = state['intermediates']
  for p in path:
    node = node[p]
  return node['__call__'][0]


def _sown(state, *path):
  node = state['intermediates']
  for p in path:
    node = node[p]
  return np.asarray(node['attention_weights'][0])


def _assert_are_probabilities(w):
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


@pytest.fixture(scope='module')
def encdec():
  """(config, params, batch, logits, state) of a tiny post-norm (the
  paper's) EncoderDecoder applied with intermediates captured; the second
  row's source and target end in padding."""
  config = get_preset('tiny_encdec', vocab_size=24, max_len=16, use_bias=True,
                      num_encoder_layers=1)
  rng = np.random.RandomState(0)
  inputs = rng.randint(4, 24, (2, 7)).astype(np.int32)
  targets = rng.randint(4, 24, (2, 6)).astype(np.int32)
  src_seg = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)
  tgt_seg = np.array([[1] * 6, [1] * 3 + [0] * 3], np.int32)
  inputs, targets = inputs * src_seg, targets * tgt_seg
  model = EncoderDecoder(config)
  args = (inputs, targets, src_seg, tgt_seg)
  params = _random_params(model, *args)
  logits, state = _apply_capturing(model, params, *args)
  return config, params, (inputs, targets, src_seg, tgt_seg), logits, state


def test_encoder_self_attention_is_the_numpy_softmax(encdec):
  config, params, (_, _, src_seg, _), _, state = encdec
  x = _captured(state, 'encoder', 'encoder_positions')  # layer 0's input
  valid = src_seg > 0
  mask = valid[:, :, None] & valid[:, None, :]
  got = _sown(state, 'encoder', 'layer_0', 'self_attention')
  want = _numpy_weights(params['encoder']['layer_0']['self_attention'], x, x,
                        mask)
  np.testing.assert_allclose(got, want, atol=2e-6)
  _assert_are_probabilities(got)
  assert np.all(got[1, :, :4, 4:] == 0.0)  # real queries, padding keys


def test_decoder_self_attention_is_causal_and_the_numpy_softmax(encdec):
  config, params, (_, _, _, tgt_seg), _, state = encdec
  x = _captured(state, 'decoder', 'decoder_positions')
  valid = tgt_seg > 0
  causal = np.tril(np.ones((6, 6), bool))
  mask = valid[:, :, None] & valid[:, None, :] & causal
  got = _sown(state, 'decoder', 'layer_0', 'self_attention')
  want = _numpy_weights(params['decoder']['layer_0']['self_attention'], x, x,
                        mask)
  np.testing.assert_allclose(got, want, atol=2e-6)
  _assert_are_probabilities(got)
  for layer in range(config.num_decoder_layers):
    w = _sown(state, 'decoder', f'layer_{layer}', 'self_attention')
    assert np.all(np.triu(w[0], k=1) == 0.0)  # exactly nothing from the future
    assert np.all(w[1, :, :3, 3:] == 0.0)


def test_cross_attention_is_the_numpy_softmax(encdec):
  config, params, (_, _, src_seg, tgt_seg), _, state = encdec
  # Post-norm: the cross-attention's queries are the self-attention block's
  # output, its keys the encoder's output.
  x_q = _captured(state, 'decoder', 'layer_0', 'attention_block')
  encoded = _captured(state, 'encoder')
  mask = (tgt_seg > 0)[:, :, None] & (src_seg > 0)[:, None, :]
  got = _sown(state, 'decoder', 'layer_0', 'cross_attention')
  want = _numpy_weights(params['decoder']['layer_0']['cross_attention'], x_q,
                        encoded, mask)
  assert got.shape == (2, config.num_heads, 6, 7)
  np.testing.assert_allclose(got, want, atol=2e-6)
  _assert_are_probabilities(got)
  assert np.all(got[1, :, :3, 4:] == 0.0)


def test_sowing_changes_neither_logits_nor_params(encdec):
  config, params, batch, logits, _ = encdec
  model = EncoderDecoder(config)
  plain = jax.jit(model.apply)({'params': params}, *batch)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
  # init never stores intermediates: the params tree is the model's own.
  variables = jax.eval_shape(model.init, jax.random.key(0), *batch)
  assert set(variables) == {'params'}


def test_grouped_query_causal_lm_weights():
  """4 query heads on 2 kv heads, pre-norm: layer 0 reads its norm's output."""
  config = get_preset('tiny_lm', vocab_size=24, num_kv_heads=2, max_len=16)
  model = DecoderLM(config)
  tokens = np.array([[5, 6, 7, 8, 9], [5, 9, 7, 0, 0]], np.int32)
  segments = (tokens > 0).astype(np.int32)
  params = _random_params(model, tokens)
  _, state = _apply_capturing(model, params, tokens, segments)
  x = _captured(state, 'decoder', 'layer_0', 'attention_block', 'norm')
  valid = segments > 0
  mask = valid[:, :, None] & valid[:, None, :] & np.tril(np.ones((5, 5), bool))
  got = _sown(state, 'decoder', 'layer_0', 'self_attention')
  want = _numpy_weights(params['decoder']['layer_0']['self_attention'], x, x,
                        mask)
  assert got.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(got, want, atol=2e-6)
  _assert_are_probabilities(got)
  assert np.all(np.triu(got[0], k=1) == 0.0)
  # The padded row's real queries: nothing from the future or from padding.
  assert np.all(np.triu(got[1, :, :3], k=1) == 0.0)


# -- 2. learning curves ------------------------------------------------------------

@pytest.fixture(scope='module')
def lm_workdir(tmp_path_factory):
  """tests/tiny_run.py's char LM trained 2 steps (checkpoint at 2; no eval,
  to spare its compile)."""
  root = tmp_path_factory.mktemp('plots_lm')
  config = tiny_run.load_config(
      tiny_run.write_experiment(root / 'data'),
      **{'train.num_steps': 2, 'train.eval_every': 0,
         'train.checkpoint_every': 2})
  loop.train_and_evaluate(config, str(root / 'run'), evaluate_at_end=False,
                          devices=jax.devices()[:1])
  return root / 'run'


def test_plot_runs_overlays_runs_in_a_png(lm_workdir, tmp_path):
  other = tmp_path / 'other'
  other.mkdir()
  shutil.copy(lm_workdir / 'metrics.jsonl', other / 'metrics.jsonl')
  path = plots.plot_runs([str(lm_workdir), str(other)])
  assert path == str(lm_workdir / 'curves.png')
  assert pathlib.Path(path).read_bytes()[:8] == PNG

  runs = {'run': tiny_run.metrics(lm_workdir), 'other': tiny_run.metrics(other)}
  fig = plots.curves(runs)
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  # This run logs loss, learning rate and accuracy; no BLEU, reward or KL.
  assert titles == ['loss', 'learning rate', 'accuracy']
  loss = fig.axes[0]
  assert sorted(line.get_label() for line in loss.get_lines()) == [
      'other train/loss', 'run train/loss']
  steps, values = loss.get_lines()[0].get_data()
  assert list(steps) == [1, 2]  # log_every=1
  assert values[0] == runs['run'][0]['train/loss']


def test_resumed_steps_keep_their_last_value():
  records = [{'step': 1, 'train/loss': 3.0}, {'step': 2, 'train/loss': 2.0},
             {'step': 2, 'train/loss': 2.5}, {'step': 3, 'train/loss': None}]
  assert plots._series(records, 'train/loss') == ([1, 2], [3.0, 2.5])


def test_malformed_metrics_line_names_the_line(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      json.dumps({'step': 1, 'train/loss': 2.0}) + '\n{"step": 2, "train/lo\n')
  with pytest.raises(UserError, match=r'metrics\.jsonl:2: .*mend that line'):
    plots.plot_runs([str(tmp_path)])


def test_missing_metrics_says_what_a_workdir_is(tmp_path):
  with pytest.raises(UserError, match=r'metrics\.jsonl not found.*--workdir'):
    plots.plot_runs([str(tmp_path)])


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.0}\n')
  for name in [m for m in sys.modules if m.startswith('matplotlib')]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(UserError, match=r'pip install -e "\.\[plot\]"'):
    plots.plot_runs([str(tmp_path)])
  assert not (tmp_path / 'curves.png').exists()


# -- 3. attention heatmaps of a workdir -------------------------------------------

def test_plot_attention_of_an_lm(lm_workdir):
  paths = plots.plot_attention(str(lm_workdir), 'the cat sat', checkpoint='2')
  assert paths == [str(lm_workdir / 'attention_decoder_self.png')]
  assert pathlib.Path(paths[0]).read_bytes()[:8] == PNG


def test_plot_attention_of_a_translation_run(tmp_path):
  from experiments import multi30k
  config = multi30k.get_config('smoke')
  config.data.dir = str(data_root())
  config.train.update(num_steps=1, log_every=1, eval_every=0,
                      checkpoint_every=1, average_last=0)
  loop.train_and_evaluate(config, str(tmp_path), evaluate_at_end=False,
                          devices=jax.devices()[:1])
  paths = plots.plot_attention(str(tmp_path), 'A dog runs.',
                               target='Ein Hund rennt.')
  assert paths == [str(tmp_path / f'attention_{kind}.png')
                   for kind in ('encoder_self', 'decoder_self', 'cross')]
  for path in paths:
    assert pathlib.Path(path).read_bytes()[:8] == PNG


def test_attention_weights_axes_follow_the_tokens(lm_workdir):
  from train import runs
  run, params = runs.load(str(lm_workdir), say=False)
  try:
    found = plots.attention_weights(run, params, 'the cat')
  finally:
    run.ckpt.close()
  entry = found['decoder_self']
  # A char LM reads its characters as one stream: no document-start token.
  assert entry['queries'] == entry['keys'] == list('the\u2581cat')
  assert entry['weights'].shape == (2, 4, 7, 7)
  _assert_are_probabilities(entry['weights'])
