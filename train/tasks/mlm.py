"""Masked language modelling: BERT's pretraining objective on the Encoder.

Rows are blocks of a token stream (as task lm's; RoBERTa packs full
sentences across document boundaries the same way). In every row 15% of the
real tokens are chosen; of those 80% become the reserved `<mask>` piece, 10%
a random token of the vocabulary and 10% stay as they are; the loss is the
cross-entropy of the original token at the chosen positions only, through
the tied output embedding (model.MaskedLM). The choice is drawn on the
device from the step's key, so every epoch masks afresh (RoBERTa's dynamic
masking) and a resumed run masks exactly as the uninterrupted one;
evaluation draws from a fixed key. It is the contract's proof that an
objective need not predict the next token: the loss mask comes from the
objective, not from the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline
from data.errors import UserError
from model import MaskedLM
from train import metrics as metrics_lib, objectives
from train.tasks import base
from train.tasks.lm import TextCorpus

MASK_PIECE = '<mask>'
# BERT (Devlin et al. 2019, section 3.1): 15% chosen; 80% / 10% / 10%.
CHOSEN, AS_MASK, AS_RANDOM = 0.15, 0.8, 0.1


def mask_tokens(tokens: jax.Array, real: jax.Array, rng: jax.Array, *,
                mask_id: int, vocab: tuple[int, int]
                ) -> tuple[jax.Array, jax.Array]:
  """(corrupted tokens, chosen [b, l] bool) with BERT's 15% / 80-10-10 rule.

  real [b, l]: positions that hold a token (not padding); vocab: the
  [low, high) range random replacements come from.
  """
  pick, how, rand = jax.random.split(rng, 3)
  chosen = real & (jax.random.uniform(pick, tokens.shape) < CHOSEN)
  u = jax.random.uniform(how, tokens.shape)
  random_ids = jax.random.randint(rand, tokens.shape, *vocab, jnp.int32)
  corrupted = jnp.where(chosen & (u < AS_MASK), mask_id,
                        jnp.where(chosen & (u < AS_MASK + AS_RANDOM),
                                  random_ids, tokens))
  return corrupted, chosen


@base.register
class MaskedLanguageModel(TextCorpus, base.Task):
  """The Encoder learns to restore masked tokens (BERT's MLM)."""
  name = 'mlm'
  module_class = MaskedLM
  batch_keys = pipeline.LM_KEYS

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    if self.model_config.num_encoder_layers < 1:
      raise UserError('task mlm trains the Encoder: set '
                      'model.num_encoder_layers >= 1')
    if self.tokenizer is not None:
      self.mask_id = self.tokenizer.piece_id(MASK_PIECE)
      if self.mask_id is None:
        raise UserError(f'task mlm needs a SentencePiece tokenizer with the '
                        f'control piece {MASK_PIECE!r}, which it reserves when '
                        f'it trains its own: set data.tokenizer.type='
                        f'sentencepiece and leave data.tokenizer.path empty')

  def control_symbols(self):
    return (MASK_PIECE,)

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, dummy, dummy)['params']

  def loss(self, params, frozen, batch, rng):
    tokens, real = batch['inputs'], batch['inputs_segmentation'] > 0
    key = jax.random.PRNGKey(self.config.train.seed) if rng is None else rng
    corrupted, chosen = mask_tokens(
        tokens, real, jax.random.fold_in(key, 1), mask_id=self.mask_id,
        vocab=(self.mask_id + 1, self.tokenizer.vocab_size))
    rngs = {} if rng is None else {'dropout': rng}
    logits = self.module(train=rng is not None).apply(
        {'params': params}, corrupted, batch['inputs_segmentation'],
        batch['inputs_position'], rngs=rngs)
    return objectives.token_loss(logits, tokens, chosen,
                                 label_smoothing=self.config.train.label_smoothing)

  def eval_loss(self, params, frozen, batch, rng=None):
    return self.loss(params, frozen, batch, None)

  def eval_metrics(self, m):
    return base.token_eval_metrics(m)

  def flops_per_step(self, batch, counts):
    cfg = self.model_config
    tokens = float(np.sum(batch['inputs_segmentation'] > 0))
    return tokens * metrics_lib.transformer_train_flops_per_token(
        counts['total'], cfg.num_encoder_layers, cfg.d_model,
        batch['inputs'].shape[1])
