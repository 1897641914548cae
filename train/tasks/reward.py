"""A reward model from human rankings (InstructGPT, Ouyang et al. 2022, section 3.5).

The model is a DecoderLM body with a scalar head (model/heads.ScalarLM) that
reads each response at its last real token, the end of the assistant's
turn. It starts from an SFT (or pretraining) run with `train.init_from`; the
head starts fresh. A batch element is one prompt with K ranked responses
[K, length], each response one forward pass; the loss averages
-log sigmoid(r_better - r_worse) over all the ranking's comparisons
(objectives.ranking_loss; ties make no pair).

When training ends the head's bias is shifted so that the training responses
score 0 on average (InstructGPT normalises with labeler demonstrations)
before the last checkpoint is written; the offset goes to results.json.
The finished model is judged on held-out human pairs of each source (mean
ratings at least `reward.pair_gap` apart) beside the rule-based VADER
scorer (`pip install vaderSentiment`) on the very same pairs.

Data (`data.corpus`): `sentiment` (the human sentiment ratings, ranked K at a
time by mean rating: data/preferences.py) or `jsonl` (pairs or rankings,
`data.files.<split>`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data import pipeline, preferences
from data.errors import UserError
from model import ScalarLM
from train import metrics as metrics_lib, objectives, partitioning
from train import step as step_lib
from train.tasks import base

KEYS = ('inputs', 'inputs_segmentation', 'inputs_position', 'levels')


def rankings(config, root, split: str) -> list[preferences.Ranking]:
  """The preference data of a split (`data.corpus`: sentiment or jsonl);
  reward models train on the rankings, DPO on their pairs."""
  d, r = config.data, config.reward
  if d.corpus == 'sentiment':
    out, dropped = preferences.sentiment_rankings(
        root, split, r.sources.split(','), r.k, r.tie_margin, config.train.seed)
    logging.info('%s: %d rankings of %d; %d groups dropped (every rating '
                 'within %.2f)', split, len(out), r.k, dropped, r.tie_margin)
    return out
  if d.corpus == 'jsonl':
    paths = base.split_files(d, split, 'FILE.jsonl[,FILE.jsonl...]')
    return [x for path in paths for x in preferences.read_preferences(path)]
  raise UserError(f'data.corpus={d.corpus!r} is not one of sentiment, jsonl '
                  f'for task {config.task}')


class PreferenceData:
  """The data side of tasks that learn from preferences (reward, dpo): the
  rankings of a split, and `rows(split)` of fixed shape, batched whole."""

  def rankings(self, split: str) -> list[preferences.Ranking]:
    return rankings(self.config, self.root, split)

  def rows(self, split: str) -> list[dict]:
    raise NotImplementedError

  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    return pipeline.examples_train(
        self.rows(self.config.data.train_split), batch_size=batch_size,
        seed=self.config.train.seed, shard_index=shard_index,
        shard_count=shard_count)

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    return None, pipeline.examples_eval_batches(
        self.rows(split), batch_size=batch_size, shard_index=shard_index,
        shard_count=shard_count)


@base.register
class RewardModel(PreferenceData, base.Task):
  """A scalar reward model trained on K-way rankings."""
  name = 'reward'
  module_class = ScalarLM
  batch_keys = KEYS

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    self.chat_template = self.load_chat_template()
    if self.tokenizer is not None and self.chat_template is None:
      raise UserError('task reward needs a chat template: set '
                      '--config.data.chat_template=simple (or chatml)')
    self._score_step = None

  def meta(self):
    return {'chat_template': self.chat_template.to_json()
            if self.chat_template else None}

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, dummy, dummy)['params']

  # -- objective --------------------------------------------------------------
  def scores(self, params, batch, rng) -> jax.Array:
    """[b, K] rewards of a batch of rankings."""
    b, k, length = batch['inputs'].shape
    flat = {key: batch[key].reshape(b * k, length) for key in KEYS[:3]}
    rngs = {} if rng is None else {'dropout': rng}
    scores = self.module(train=rng is not None).apply(
        {'params': params}, flat['inputs'], flat['inputs_segmentation'],
        flat['inputs_position'], rngs=rngs, method=ScalarLM.score)
    return scores.reshape(b, k)

  def loss(self, params, frozen, batch, rng):
    loss_sum, weight, metrics = objectives.ranking_loss(
        self.scores(params, batch, rng), batch['levels'])
    metrics['tokens'] = objectives.Total(
        jnp.sum(batch['inputs_segmentation'] > 0).astype(jnp.float32))
    return loss_sum, weight, metrics

  # -- data -----------------------------------------------------------------
  def rows(self, split: str) -> list[dict]:
    rows, _ = preferences.ranking_rows(
        self.chat_template, self.tokenizer, self.rankings(split),
        k=self.config.reward.k, max_length=self.config.data.max_length,
        what=f'reward {split}')
    if not rows:
      raise UserError(f'reward {split}: no ranking fits data.max_length='
                      f'{self.config.data.max_length}')
    return rows

  # -- scoring texts ------------------------------------------------------------
  def score_texts(self, run, params, texts: list[str], prompt=()) -> np.ndarray:
    """Rewards of responses to one prompt (default: none), in order; NaN
    for a response longer than data.max_length (left out, not cut)."""
    ranking = preferences.Ranking(list(prompt), list(texts), [0] * len(texts))
    length = self.config.data.max_length
    rendered = preferences._render(self.chat_template, self.tokenizer,
                                   [ranking])[0]
    keep = [i for i, (ids, _) in enumerate(rendered) if len(ids) <= length]
    rows = []
    for i in keep:
      ids = np.asarray(rendered[i][0], np.int32)
      tokens, seg, pos = pipeline.pad_row(ids, length)
      rows.append({'inputs': tokens, 'inputs_segmentation': seg,
                   'inputs_position': pos})
    out = np.full(len(texts), np.nan)
    if not rows:
      return out
    batch_size = run.local_batch_size(self.config.train.eval_batch_size,
                                      'train.eval_batch_size')
    batches = pipeline.examples_eval_batches(
        rows, batch_size=batch_size, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    if self._score_step is None:
      def score(params, batch):
        return self.module().apply(
            {'params': params}, batch['inputs'], batch['inputs_segmentation'],
            batch['inputs_position'], method=ScalarLM.score)
      self._score_step = step_lib.Jitted(jax.jit(
          score, in_shardings=(run.shardings.params,
                               partitioning.batch_sharding(run.mesh)),
          out_shardings=partitioning.replicated(run.mesh)), run.mesh, run.rules)
    scores = []
    for index, batch in batches.indexed():
      got = np.asarray(self._score_step(params, run.global_batch(batch)))
      # Each process's rows are one slice of the global batch, in order.
      start = jax.process_index() * batch_size
      scores.append((index, got[start:start + batch_size]))
    flat = np.full(len(rows), np.nan)
    for index, got in scores:
      flat[index[index >= 0]] = got[index >= 0]
    out[keep] = flat
    return out

  # -- the finished model ---------------------------------------------------------
  def finalize(self, run, state, step):
    """InstructGPT's normalisation: the head's bias shifted so that the
    training responses score 0 on average; the offset is reported."""
    if not self.config.reward.normalise:
      return state, {}
    responses = sorted({t for x in self.rankings(self.config.data.train_split)
                        for t in x.responses})
    offset = float(np.nanmean(self.score_texts(run, state.params, responses)))
    params = jax.tree.map(lambda x: x, state.params)  # new containers
    params['head']['bias'] = params['head']['bias'] - offset
    return state.replace(params=params), {
        'reward/offset': offset,
        'reward/offset_reference': f'{len(responses)} training responses'}

  def at_end(self, run, state, step):
    """Held-out human pairs beside VADER (sentiment data), in results.json."""
    out: dict[str, Any] = dict(run.final_report)
    if self.config.data.corpus == 'sentiment':
      out['heldout'] = self.heldout_pairs(run, state.params)
    if jax.process_index() == 0:
      print(json.dumps(out, indent=1), flush=True)
      with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
        json.dump({'step': step, **out}, f, indent=2)
    return {}

  def heldout_pairs(self, run, params) -> dict[str, dict]:
    """Pairwise accuracy on each source's held-out human pairs, for this
    model and for VADER's compound score."""
    r = self.config.reward
    try:
      from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
      vader = SentimentIntensityAnalyzer()
    except ImportError:
      vader = None
      logging.warning('vaderSentiment is not installed (pip install -e '
                      '".[chat]"): no VADER comparison')
    out = {}
    for source in r.sources.split(','):
      items = preferences.sentiment_ratings(self.root, source, 'test')
      pairs = preferences.rated_pairs(items, r.pair_gap)
      scores = self.score_texts(run, params, [x.text for x in items])
      kept = [(b, w) for b, w in pairs
              if np.isfinite(scores[b]) and np.isfinite(scores[w])]
      out[source] = {'sentences': len(items), 'pairs': len(kept),
                     'reward_model': preferences.pairwise_accuracy(scores, kept)}
      if vader is not None:
        compound = [vader.polarity_scores(x.text)['compound'] for x in items]
        out[source]['vader'] = preferences.pairwise_accuracy(compound, kept)
    return out

  # -- cost ---------------------------------------------------------------------
  def count_tokens(self, batch):
    return float(np.sum(batch['inputs_segmentation'] > 0))

  def flops_per_step(self, batch, counts):
    """6N + attention per real token, N without the embedding table: a
    reward model looks tokens up but makes no logits over the vocabulary."""
    cfg = self.model_config
    return self.count_tokens(batch) * metrics_lib.transformer_train_flops_per_token(
        counts['total'] - counts.get('embedding', 0), cfg.num_decoder_layers,
        cfg.d_model, batch['inputs'].shape[-1])

  def synthetic_batch(self, rows: int):
    k, length = self.config.reward.k, self.config.data.max_length
    tokens = np.random.default_rng(0).integers(
        4, self.model_config.vocab_size, (rows, k, length), dtype=np.int32)
    return {'inputs': tokens,
            'inputs_segmentation': np.ones_like(tokens),
            'inputs_position': np.broadcast_to(
                np.arange(length, dtype=np.int32), tokens.shape).copy(),
            'levels': np.broadcast_to(np.arange(k, dtype=np.int32),
                                      (rows, k)).copy()}
