"""Translation: the encoder-decoder Transformer on parallel text (Vaswani et al. 2017).

Loss: label-smoothed cross-entropy over the target tokens of the batch's
`loss_mask` (paper 5.4). Evaluation: the plain cross-entropy over the eval
split, validation BLEU every `decode.bleu_every` steps, and at the end the
average of the last `train.average_last` checkpoints scored on the test split
with beam search and sacreBLEU (train/evaluate.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

from data import pipeline, sources
from data import tokenizer as tokenizers
from data.errors import UserError
from model import EncoderDecoder
from train import checkpoint, evaluate, metrics as metrics_lib, objectives
from train.tasks import base


@base.register
class Translation(base.Task):
  """Encoder-decoder translation on parallel text (Multi30k, WMT, files)."""
  name = 'translation'
  module_class = EncoderDecoder
  batch_keys = pipeline.TRANSLATION_KEYS

  def __init__(self, config, workdir, **kwargs):
    if config.train.get('loss_chunk', 0):
      raise UserError('train.loss_chunk is for language models (task=lm); '
                      'set it to 0')
    super().__init__(config, workdir, **kwargs)

  def _model_args(self, b):
    return (b['inputs'], b['targets'], b['inputs_segmentation'],
            b['targets_segmentation'], b['inputs_position'],
            b['targets_position'])

  # -- objective --------------------------------------------------------------
  def _logits(self, params, batch, rng):
    rngs = {} if rng is None else {'dropout': rng}
    return self.module(train=rng is not None).apply(
        {'params': params}, *self._model_args(batch), rngs=rngs)

  def loss(self, params, frozen, batch, rng):
    t = self.config.train
    return objectives.token_loss(
        self._logits(params, batch, rng), batch['targets'], batch['loss_mask'],
        label_smoothing=t.label_smoothing, z_loss=t.z_loss)

  def eval_loss(self, params, frozen, batch, rng=None):
    # Plain cross-entropy: eval/loss and perplexity mean what they say.
    return objectives.token_loss(self._logits(params, batch, None),
                                 batch['targets'], batch['loss_mask'])

  def eval_metrics(self, m):
    return base.token_eval_metrics(m)

  # -- data -----------------------------------------------------------------
  def corpus(self, split: str):
    d = self.config.data
    if d.corpus == 'multi30k':
      return sources.multi30k(split, d.src_lang, d.tgt_lang, root=self.root)
    if d.corpus == 'wmt':
      return sources.wmt(d.wmt_pair, split, d.src_lang, d.tgt_lang,
                         dataset=d.wmt_dataset)
    if d.corpus == 'parallel':
      paths = base.split_files(d, split, 'SRC_FILE,TGT_FILE or a .tsv')
      return (sources.read_tsv(paths[0]) if len(paths) == 1
              else sources.read_parallel(*paths))
    raise UserError(f'data.corpus={d.corpus!r} is not one of multi30k, wmt, '
                    f'parallel for task translation')

  def _train_tokenizer(self, tok_cfg):
    corpus = self.corpus(self.config.data.train_split)
    texts = [s for pair in corpus.pairs for s in pair]  # shared vocabulary
    return tokenizers.train_tokenizer(
        texts, vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
        character_coverage=tok_cfg.character_coverage,
        max_sentences=tok_cfg.max_sentences)

  def encode(self, corpus):
    src = self.tokenizer.encode([s for s, _ in corpus.pairs])
    tgt = self.tokenizer.encode([t for _, t in corpus.pairs])
    return list(zip(src, tgt))

  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    d, t = self.config.data, self.config.train
    corpus = self.corpus(d.train_split)
    ds = pipeline.translation_train(
        self.encode(corpus), batch_size=batch_size, max_length=d.max_length,
        seed=t.seed, pack=d.pack, shard_index=shard_index,
        shard_count=shard_count)
    logging.info('%s: %d pairs (%d empty dropped), %d longer than %d tokens '
                 'dropped', corpus.name, len(corpus), corpus.dropped_empty,
                 ds.num_dropped, d.max_length)
    return ds

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    corpus = self.corpus(split)
    return corpus, pipeline.translation_eval_batches(
        self.encode(corpus), batch_size=batch_size, shard_index=shard_index,
        shard_count=shard_count)

  # -- evaluation beyond the loss ---------------------------------------------
  def periodic(self, run, params, step):
    """Validation BLEU every decode.bleu_every steps."""
    d = self.config.decode
    if not d.bleu_every or step % d.bleu_every:
      return {}
    corpus = self.corpus(self.config.data.eval_split)
    pairs = corpus.pairs[:d.bleu_sentences] if d.bleu_sentences else corpus.pairs
    hyps = evaluate.translate(run, params, [s for s, _ in pairs])
    return {'eval/bleu': evaluate.bleu(hyps, [t for _, t in pairs])['bleu']}

  def at_end(self, run, state, step):
    """Test BLEU of the averaged last checkpoints, a few examples, results.json."""
    config = self.config
    out: dict[str, Any] = {}
    params = state.params
    if config.train.average_last:
      run.ckpt.wait()
      steps = run.ckpt.all_steps()
      n = min(config.train.average_last, len(steps))
      if n < config.train.average_last:
        logging.warning(
            'train.average_last=%d but %s holds %d checkpoint(s) (%s); '
            'averaging those', config.train.average_last, run.ckpt.directory,
            n, steps)
      checkpoint.save_average(run.workdir, n, run.abstract_state)
      avg = checkpoint.Checkpointer(run.workdir, subdir='checkpoints_avg',
                                    best_metric=None, read_only=True)
      params = avg.restore(run.abstract_state)[1].params
      out['averaged_last'] = n
    # The model these numbers are from: what `transflax translate` loads.
    out['checkpoint'] = 'average' if config.train.average_last else 'latest'
    # The examples are the first scored sentences: no second decode (another
    # compile, and on one process only, which sharded params cannot serve).
    result, pairs, hyps = evaluate.score_split(
        run, params, config.data.test_split,
        max_sentences=config.decode.test_sentences)
    out.update({f'test/{k}': v for k, v in result.items() if k != 'split'})
    if jax.process_index() == 0:
      print(f'test {config.data.test_split}: BLEU {result["bleu"]:.2f} chrF '
            f'{result["chrf"]:.2f} ({result["bleu_signature"]})', flush=True)
      for (src, ref), hyp in zip(pairs[:3], hyps[:3]):
        print(f'  src: {src}\n  ref: {ref}\n  hyp: {hyp}', flush=True)
      with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
        json.dump({'step': step, **out}, f, indent=2)
    return out

  def evaluate_split(self, run, params, split, **decode):
    """`transflax eval`: BLEU, chrF and sentences/s on a split (default: test)."""
    return evaluate.score_split(run, params, split, **decode)[0]

  # -- cost ---------------------------------------------------------------------
  def flops_per_step(self, batch, counts):
    cfg = self.model_config
    encoder = counts.get('encoder', 0)
    return metrics_lib.encoder_decoder_train_flops(
        encoder_params=encoder, decoder_params=counts['total'] - encoder,
        encoder_layers=cfg.num_encoder_layers,
        decoder_layers=cfg.num_decoder_layers, d_model=cfg.d_model,
        src_len=batch['inputs'].shape[1], tgt_len=batch['targets'].shape[1],
        src_tokens=float((batch['inputs_segmentation'] > 0).sum()),
        tgt_tokens=float((batch['loss_mask'] > 0).sum()))

  def synthetic_length(self) -> int:
    return self.config.data.max_length
