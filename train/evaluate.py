"""Evaluation: beam-search translation, sacreBLEU/chrF, perplexity, sampling.

Translation sorts sentences by length (fewer pad tokens, fewer shapes to
compile), decodes in batches with the KV cache and returns outputs in input
order. BLEU is sacreBLEU's corpus BLEU on detokenised text (cased, 13a), the
signature reported with it. Language models report eval loss/perplexity and
stream samples.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from data import tokenizer as tokenizers
from data.errors import UserError
from model import EncoderDecoder, generate, init_cache
from train import checkpoint, sampling


def _round_up(n: int, multiple: int = 8) -> int:
  return max(multiple, -(-n // multiple) * multiple)


# -- loading -------------------------------------------------------------------

def load(workdir: str, which: str = 'latest'):
  """(Run, params) of a trained workdir; which = latest | best | average | STEP."""
  from train import cli, loop
  run = loop.Run(cli.load_workdir_config(workdir), workdir, for_training=False)
  ckpt = run.ckpt
  step: Any = 'latest'
  if which == 'average':
    ckpt = checkpoint.Checkpointer(workdir, subdir='checkpoints_avg',
                                   best_metric=None, read_only=True)
  elif which == 'best':
    step = 'best'
  elif which.isdigit():
    step = int(which)
  elif which != 'latest':
    raise UserError(f'--checkpoint={which!r}: use latest, best, average or a '
                    f'step number')
  restored = ckpt.restore(run.abstract_state, step=step)
  if restored is None:
    hint = ('run `transflax average` first' if which == 'average'
            else 'train first')
    raise UserError(f'no checkpoint in {ckpt.directory}; {hint}')
  return run, restored[1].params


def average(workdir: str, last_n: int) -> int:
  from train import cli, loop
  run = loop.Run(cli.load_workdir_config(workdir), workdir, for_training=False)
  return checkpoint.save_average(workdir, last_n, run.abstract_state)


# -- translation -----------------------------------------------------------------

def uncached_step(module, params, encoded, inputs, max_len: int):
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
      logits = module.apply({'params': params}, encoded, inputs, targets,
                            method=EncoderDecoder.decode)
    logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    return logits, {'history': history, 'index': index + 1}

  def init(batch: int):
    return {'history': jnp.zeros((batch, max_len), jnp.int32),
            'index': jnp.zeros((), jnp.int32)}
  return tokens_to_logits, init


@functools.partial(jax.jit, static_argnames=('task', 'beam_size',
                                              'max_len', 'cached'))
def _beam_decode(params, inputs, alpha, *, task, beam_size: int, max_len: int,
                 cached: bool = True):
  """inputs [b, s] -> best hypotheses [b, max_len]."""
  model = task.module()
  encoded = model.apply({'params': params}, inputs, method=EncoderDecoder.encode)
  enc_b = generate.expand_beams(encoded, beam_size)
  inp_b = generate.expand_beams(inputs, beam_size)
  if cached:
    dmodel = task.module(decode=True)
    cache = init_cache(dmodel, inputs.shape[0], max_len, source_len=inputs.shape[1])

    def tokens_to_logits(tokens, cache):
      logits, mut = dmodel.apply({'params': params, 'cache': cache}, enc_b,
                                 inp_b, tokens, method=EncoderDecoder.decode,
                                 mutable=['cache'])
      return logits[:, 0], mut['cache']
  else:
    tokens_to_logits, init = uncached_step(model, params, enc_b, inp_b, max_len)
    cache = init(inputs.shape[0])
    # The beam search expands the cache; encoder outputs are pre-expanded.
  seqs, _ = generate.beam_search(
      cache, tokens_to_logits, beam_size=beam_size, alpha=alpha,
      eos_id=tokenizers.EOS_ID, max_decode_len=max_len,
      batch_size=inputs.shape[0])
  return seqs[:, 0]


def translate(run, params, lines: list[str], *, beam_size: int | None = None,
              alpha: float | None = None, batch_size: int | None = None,
              cached: bool = True) -> list[str]:
  """Translates `lines` (one output per input line; empty in, empty out)."""
  d = run.config.decode
  beam = beam_size or d.beam_size
  alpha = d.alpha if alpha is None else alpha
  bs = batch_size or d.batch_size
  tok = run.task.tokenizer
  out = [''] * len(lines)
  todo = [i for i, line in enumerate(lines) if line.strip()]
  ids = dict(zip(todo, tok.encode([lines[i] for i in todo])))
  cap = run.model_config.max_len
  todo.sort(key=lambda i: -len(ids[i]))  # longest first: OOM shows early
  for start in range(0, len(todo), bs):
    chunk = todo[start:start + bs]
    src_len = min(_round_up(max(len(ids[i]) for i in chunk)), cap)
    inputs = np.zeros((bs, src_len), np.int32)
    for r, i in enumerate(chunk):
      row = ids[i][:src_len]
      inputs[r, :len(row)] = row
    # Paper 6.1: maximum output length = input length + 50.
    max_len = min(src_len + d.max_extra_len, cap)
    best = _beam_decode(params, jnp.asarray(inputs), float(alpha),
                        task=run.task, beam_size=beam, max_len=max_len,
                        cached=cached)
    for i, text in zip(chunk, tok.decode(np.asarray(best)[:len(chunk)])):
      out[i] = text
  return out


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
  """sacreBLEU corpus BLEU (cased, 13a) and chrF, with signatures."""
  b, c = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
  bs, cs = b.corpus_score(hypotheses, [references]), c.corpus_score(
      hypotheses, [references])
  return {'bleu': bs.score, 'chrf': cs.score,
          'bleu_signature': str(b.get_signature()),
          'chrf_signature': str(c.get_signature())}


def evaluate_split(run, params, split: str | None = None, *,
                   beam_size=None, alpha=None, batch_size=None,
                   max_sentences: int = 0) -> dict[str, Any]:
  """BLEU/chrF and sentences/s (translation), or loss/perplexity (LM) on a split."""
  if run.task.kind == 'lm':
    split = split or run.config.data.eval_split
    return {'split': split, **run.evaluate_loss(params, split)}
  split = split or run.config.data.test_split
  pairs = run.task.corpus(split).pairs[:max_sentences or None]
  sources = [s for s, _ in pairs]
  refs = [t for _, t in pairs]
  start = time.perf_counter()
  hyps = translate(run, params, sources, beam_size=beam_size, alpha=alpha,
                   batch_size=batch_size)
  seconds = time.perf_counter() - start
  return {'split': split, 'sentences': len(hyps),
          'sentences_per_sec': len(hyps) / seconds, **bleu(hyps, refs)}


# -- hooks for the training loop ---------------------------------------------------

def periodic(run, params, step: int) -> dict[str, float]:
  """Extra eval-time metrics: validation BLEU (translation) or a sample (LM)."""
  config = run.config
  if run.task.kind == 'lm':
    s = config.sample
    text = sampling.generate_text(run, params, s.prompt, max_new_tokens=s.max_new_tokens,
                         temperature=s.temperature, top_k=s.top_k,
                         top_p=s.top_p, seed=step)
    if jax.process_index() == 0:
      with open(os.path.join(run.workdir, 'samples.txt'), 'a') as f:
        f.write(f'--- step {step}\n{text}\n')
    return {}
  d = config.decode
  if not d.bleu_every or step % d.bleu_every:
    return {}
  corpus = run.task.corpus(config.data.eval_split)
  pairs = corpus.pairs[:d.bleu_sentences] if d.bleu_sentences else corpus.pairs
  hyps = translate(run, params, [s for s, _ in pairs])
  return {'eval/bleu': bleu(hyps, [t for _, t in pairs])['bleu']}


def at_end(run, state, step: int) -> dict[str, Any]:
  """Final report: test BLEU and example translations, or a sample of the LM."""
  config = run.config
  out: dict[str, Any] = {}
  if run.task.kind == 'lm':
    s = config.sample
    if jax.process_index() == 0:
      print(f'--- sample after {step} steps:', flush=True)
    sampling.generate_samples(run, state.params, s.prompt, max_new_tokens=s.max_new_tokens,
             temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=0,
             stream=sys.stdout if jax.process_index() == 0 else None)
    return out
  params = state.params
  if config.train.average_last:
    run.ckpt.wait()
    checkpoint.save_average(run.workdir, config.train.average_last,
                            run.abstract_state)
    avg = checkpoint.Checkpointer(run.workdir, subdir='checkpoints_avg',
                                  best_metric=None, read_only=True)
    params = avg.restore(run.abstract_state)[1].params
    out['averaged_last'] = config.train.average_last
  result = evaluate_split(run, params, config.data.test_split,
                          max_sentences=config.decode.test_sentences)
  out.update({f'test/{k}': v for k, v in result.items() if k != 'split'})
  if jax.process_index() == 0:
    corpus = run.task.corpus(config.data.test_split)
    examples = translate(run, params, [s for s, _ in corpus.pairs[:3]])
    print(f'test {config.data.test_split}: BLEU {result["bleu"]:.2f} chrF '
          f'{result["chrf"]:.2f} ({result["bleu_signature"]})', flush=True)
    for (src, ref), hyp in zip(corpus.pairs[:3], examples):
      print(f'  src: {src}\n  ref: {ref}\n  hyp: {hyp}', flush=True)
    with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
      json.dump({'step': step, **out}, f, indent=2)
  return out
