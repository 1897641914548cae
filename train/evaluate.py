"""Beam-search translation and sacreBLEU/chrF (train/runs.py loads a workdir).

Translation sorts sentences by length (fewer pad tokens, fewer shapes to
compile), decodes in batches with the KV cache and returns outputs in input
order, one line each. Decoding never emits PAD or ids the tokenizer lacks.
`decode_speed` measures sentences/s with the cache against recomputing the
prefix at every step (the reference the tests compare the cache with). BLEU
is sacreBLEU's corpus BLEU on detokenised text (cased, 13a), the signature
reported with it. When a translation run evaluates is its task's business
(train/tasks/translation.py).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from data import tokenizer as tokenizers
from model import EncoderDecoder, generate, init_cache
from train import sampling


def _round_up(n: int, multiple: int = 8) -> int:
  return max(multiple, -(-n // multiple) * multiple)


# -- translation -----------------------------------------------------------------

def mask_unproducible(logits: jax.Array, vocab_limit: int) -> jax.Array:
  """logits [n, v] with PAD and ids >= vocab_limit set to NEG_INF.

  PAD is never a scored target and the tokenizer drops it from the text, so a
  hypothesis holding it would be ranked on a token nobody sees; the uncached
  reference would also read it as padding. Ids past the tokenizer's vocabulary
  exist when model.vocab_size is padded (e.g. to a multiple of 128) and
  cannot be detokenised.
  """
  return logits + _unproducible(vocab_limit, logits.shape[-1])


def _unproducible(vocab_limit: int, vocab_size: int) -> jax.Array:
  return sampling.logits_mask(((tokenizers.PAD_ID,), vocab_limit), vocab_size)


def cached_step(dmodel, params, encoded, segmentation, vocab_limit: int):
  """tokens_to_logits over the KV cache: one new token per step.

  dmodel: EncoderDecoder with decode=True; encoded [n, s, d] and the
  source's segmentation [n, s] (0 on padding) already expanded to the
  n = batch * beam rows the search feeds.
  """
  return generate.cached_step(
      dmodel, params, encoded, segmentation, method=EncoderDecoder.decode,
      bias=_unproducible(vocab_limit, dmodel.config.vocab_size))


def uncached_step(module, params, encoded, segmentation, max_len: int,
                  vocab_limit: int | None = None):
  """tokens_to_logits that re-runs the decoder over the whole prefix each step.

  The reference for the KV cache (tests) and the baseline of the decoding
  benchmark. Its 'cache' is just the token history [n, max_len] + index.
  """
  def tokens_to_logits(tokens, cache):
    index = cache['index']
    history = jax.lax.dynamic_update_slice(cache['history'], tokens, (0, index))
    # decode() shifts targets right, so pass the history shifted left; the
    # filler 1s keep unknown future positions valid (causality hides them).
    targets = jnp.concatenate(
        [history[:, 1:], jnp.ones_like(history[:, :1])], axis=1)
    targets = jnp.where(jnp.arange(max_len) < index, targets, 1)
    if encoded is None:
      logits = module.apply({'params': params}, history)
    else:
      logits = module.apply({'params': params}, encoded, segmentation,
                            targets, method=EncoderDecoder.decode)
    logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    if vocab_limit is not None:
      logits = mask_unproducible(logits, vocab_limit)
    return logits, {'history': history, 'index': index + 1}

  def init(batch: int):
    return {'history': jnp.zeros((batch, max_len), jnp.int32),
            'index': jnp.zeros((), jnp.int32)}
  return tokens_to_logits, init


@functools.partial(jax.jit, static_argnames=('config', 'beam_size', 'max_len',
                                              'cached', 'vocab_limit'))
def _beam_decode(params, inputs, segmentation, alpha, *, config,
                 beam_size: int, max_len: int, cached: bool = True,
                 vocab_limit: int | None = None):
  """inputs [b, s], their segmentation [b, s] (1 on tokens, 0 on padding)
  -> best hypotheses [b, max_len].

  config: the run's TransformerConfig (hashable, so reloading a checkpoint of
  the same model reuses the compiled search).
  """
  vocab_limit = vocab_limit or config.vocab_size
  model = EncoderDecoder(config.replace(deterministic=True, decode=False))
  encoded = model.apply({'params': params}, inputs, segmentation,
                        method=EncoderDecoder.encode)
  # Encoder outputs are expanded here; beam_search expands the cache itself.
  enc_b = generate.expand_beams(encoded, beam_size)
  inp_b = generate.expand_beams(segmentation, beam_size)
  if cached:
    dmodel = EncoderDecoder(config.replace(deterministic=True, decode=True))
    cache = init_cache(dmodel, inputs.shape[0], max_len,
                       source_len=inputs.shape[1])
    tokens_to_logits = cached_step(dmodel, params, enc_b, inp_b, vocab_limit)
  else:
    tokens_to_logits, init = uncached_step(model, params, enc_b, inp_b, max_len,
                                           vocab_limit)
    cache = init(inputs.shape[0])
  seqs, _ = generate.beam_search(
      cache, tokens_to_logits, beam_size=beam_size, alpha=alpha,
      eos_id=tokenizers.EOS_ID, max_decode_len=max_len,
      batch_size=inputs.shape[0])
  return seqs[:, 0]


def translate(run, params, lines: list[str], *, beam_size: int | None = None,
              alpha: float | None = None, batch_size: int | None = None,
              cached: bool = True) -> list[str]:
  """Translates `lines`: one single-line output per input, empty in, empty out.

  Sentences are decoded longest first in batches of similar length and the
  outputs returned in input order.
  """
  d = run.config.decode
  beam = beam_size or d.beam_size
  alpha = d.alpha if alpha is None else alpha
  bs = batch_size or d.batch_size
  tok = run.task.tokenizer
  out = [''] * len(lines)
  todo = [i for i, line in enumerate(lines) if line.strip()]
  ids = dict(zip(todo, tok.encode([lines[i] for i in todo])))
  cap = run.model_config.max_len
  # A few sentences need not pay for a full batch of beams.
  rows = min(bs, _round_up(len(todo)))
  todo.sort(key=lambda i: -len(ids[i]))  # longest first: OOM shows early
  for start in range(0, len(todo), rows):
    chunk = todo[start:start + rows]
    src_len = min(_round_up(max(len(ids[i]) for i in chunk)), cap)
    inputs = np.zeros((rows, src_len), np.int32)
    segmentation = np.zeros((rows, src_len), np.int32)
    for r, i in enumerate(chunk):
      row = ids[i][:src_len]
      inputs[r, :len(row)] = row
      segmentation[r, :len(row)] = 1
    # Paper 6.1: maximum output length = input length + 50.
    max_len = min(src_len + d.max_extra_len, cap)
    best = _beam_decode(params, jnp.asarray(inputs), jnp.asarray(segmentation),
                        float(alpha),
                        config=run.model_config, beam_size=beam,
                        max_len=max_len, cached=cached,
                        vocab_limit=tok.vocab_size)
    for i, text in zip(chunk, tok.decode(np.asarray(best)[:len(chunk)])):
      # Byte-fallback pieces can spell a line break; one line in, one out.
      out[i] = ' '.join(text.splitlines())
  return out


def decode_speed(run, params, lines: list[str], beam_size: int | None = None,
                 *, batch_size: int | None = None) -> dict[str, Any]:
  """Sentences/s translating `lines` with the KV cache and by recomputing the prefix.

  Each mode is run once untimed first, so compilation is not counted. E.g.
  beam 4 on Multi30k test_2016_flickr with a trained workdir:

    run, params = runs.load('runs/m30k', 'average')
    src = [s for s, _ in run.task.corpus('test_2016_flickr').pairs]
    print(evaluate.decode_speed(run, params, src, 4))
  """
  result: dict[str, Any] = {'sentences': len(lines),
                            'beam_size': beam_size or run.config.decode.beam_size}
  outputs = {}
  for mode, cached in (('cached', True), ('uncached', False)):
    kwargs = dict(beam_size=beam_size, batch_size=batch_size, cached=cached)
    translate(run, params, lines, **kwargs)  # compile every batch shape
    start = time.perf_counter()
    outputs[mode] = translate(run, params, lines, **kwargs)
    result[f'{mode}_sentences_per_sec'] = len(lines) / (
        time.perf_counter() - start)
  result['speedup'] = (result['cached_sentences_per_sec'] /
                       result['uncached_sentences_per_sec'])
  # Both must decode the same hypotheses; a mismatch is a cache bug.
  result['same_outputs'] = outputs['cached'] == outputs['uncached']
  return result


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
  """sacreBLEU corpus BLEU (cased, 13a) and chrF, with signatures."""
  b, c = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
  bs, cs = b.corpus_score(hypotheses, [references]), c.corpus_score(
      hypotheses, [references])
  return {'bleu': bs.score, 'chrf': cs.score,
          'bleu_signature': str(b.get_signature()),
          'chrf_signature': str(c.get_signature())}


def score_split(run, params, split, *, beam_size=None, alpha=None,
                batch_size=None, max_sentences=None):
  """(result, pairs, hypotheses): BLEU/chrF and sentences/s on a split.

  max_sentences: score the first N sentences; None takes the config's
  decode.test_sentences (0, all, except in :smoke configs); 0 is all.
  sentences/s includes compiling each batch shape once.
  """
  split = split or run.config.data.test_split
  if max_sentences is None:
    max_sentences = run.config.decode.test_sentences
  pairs = run.task.corpus(split).pairs[:max_sentences or None]
  sources = [s for s, _ in pairs]
  refs = [t for _, t in pairs]
  start = time.perf_counter()
  hyps = translate(run, params, sources, beam_size=beam_size, alpha=alpha,
                   batch_size=batch_size)
  seconds = time.perf_counter() - start
  return ({'split': split, 'sentences': len(hyps),
           'sentences_per_sec': len(hyps) / seconds, **bleu(hyps, refs)},
          pairs, hyps)
