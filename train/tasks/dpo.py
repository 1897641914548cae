"""Direct Preference Optimisation (Rafailov et al. 2023) against a frozen reference.

The policy starts from an SFT run (`train.init_from`), and that run's
parameters are also the frozen reference (`frozen['reference']`: sharded
like the policy, never trained, written once into the workdir). A batch
element is a pair [2, length] (chosen, rejected); both go through the
policy in one forward pass, and through the reference in the same step
without gradients. Each response's log-probability is summed over its
tokens (the loss mask: the assistant's content and end of turn), and
objectives.dpo_loss turns the four sums into the loss: `dpo.loss_type`
sigmoid (with `dpo.label_smoothing`: conservative DPO) or ipo, with
`dpo.beta`. The policy runs without dropout (`dpo.disable_dropout`, TRL's
default), so at the start, policy = reference, the loss is exactly log 2.

Evaluation on held-out pairs: the loss, the implicit-reward accuracy and
margin, and the KL of the policy to the reference: the exact KL of their
next-token distributions, averaged over the response tokens of the held-out
pairs (`eval/kl_token`). Data (`data.corpus`): `sentiment` (every
comparison of the human sentiment rankings as a pair, data/preferences.py),
`jsonl` (pairs or rankings, `data.files.<split>`) or `sampled` (replies of
the SFT model ranked by a reward model: train/preference_sampling.py).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data import preferences
from data.errors import UserError
from train import metrics as metrics_lib, objectives
from train.tasks import base
from train.tasks.lm import DecoderTask
from train.tasks.reward import PreferenceData

KEYS = ('inputs', 'targets', 'loss_mask', 'inputs_segmentation',
        'inputs_position')


@base.register
class DPO(PreferenceData, DecoderTask):
  """A DecoderLM policy trained on preference pairs with DPO."""
  name = 'dpo'
  batch_keys = KEYS

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    if self.tokenizer is not None and self.chat_template is None:
      raise UserError('task dpo needs a chat template: set '
                      '--config.data.chat_template=simple (or chatml)')
    if config.dpo.loss_type not in objectives.DPO_LOSSES:
      raise UserError(f'dpo.loss_type={config.dpo.loss_type!r} is not one of '
                      f'{", ".join(objectives.DPO_LOSSES)}')

  def frozen_sources(self):
    return {'reference': base.INIT_FROM}

  def synthetic_length(self) -> int:
    return self.config.data.max_length - 1

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, dummy, dummy)['params']

  # -- objective --------------------------------------------------------------
  def _logits(self, params, batch, rng):
    """Policy (or reference) logits of both responses: [2b, length, v]."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    rngs = {} if rng is None else {'dropout': rng}
    return self.module(train=rng is not None).apply(
        {'params': params}, flat['inputs'], flat['inputs_segmentation'],
        flat['inputs_position'], rngs=rngs), flat

  def _sequence_logprobs(self, logits, flat):
    """[b, 2] log-probabilities of the responses (per token for IPO)."""
    mask = flat['loss_mask'].astype(jnp.float32)
    logp = jnp.sum(objectives.token_logprobs(logits, flat['targets']) * mask,
                   axis=-1)
    if self.config.dpo.loss_type == 'ipo':
      logp = logp / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return logp.reshape(-1, 2)

  def _pair_loss(self, policy_logits, reference_logits, flat, batch):
    d = self.config.dpo
    policy = self._sequence_logprobs(policy_logits, flat)
    reference = jax.lax.stop_gradient(
        self._sequence_logprobs(reference_logits, flat))
    valid = jnp.sum(batch['loss_mask'][:, 0], axis=-1) > 0  # not padding
    loss_sum, weight, metrics = objectives.dpo_loss(
        policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], valid,
        beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)
    metrics['tokens'] = objectives.Total(
        jnp.sum(flat['loss_mask']).astype(jnp.float32))
    return loss_sum, weight, metrics

  def loss(self, params, frozen, batch, rng):
    if self.config.dpo.disable_dropout:
      rng = None  # TRL's default: the implicit rewards without dropout noise
    policy_logits, flat = self._logits(params, batch, rng)
    reference_logits, _ = self._logits(frozen['reference'], batch, None)
    return self._pair_loss(policy_logits, reference_logits, flat, batch)

  def eval_loss(self, params, frozen, batch, rng=None):
    policy_logits, flat = self._logits(params, batch, None)
    reference_logits, _ = self._logits(frozen['reference'], batch, None)
    loss_sum, weight, metrics = self._pair_loss(policy_logits,
                                                reference_logits, flat, batch)
    mask = flat['loss_mask'].astype(jnp.float32)
    kl = objectives.token_kl(policy_logits, reference_logits)
    metrics['kl_token'] = objectives.Mean(jnp.sum(kl * mask), jnp.sum(mask))
    return loss_sum, weight, metrics

  def eval_metrics(self, m):
    return {k: v for k, v in m.items() if k != 'tokens'}

  # -- data -----------------------------------------------------------------
  def rankings(self, split: str):
    if self.config.data.corpus == 'sampled':
      from train import preference_sampling
      return preference_sampling.rankings(self, split)
    return super().rankings(split)

  def rows(self, split: str) -> list[dict]:
    """Every comparison of the split's rankings as a pair (chosen, rejected)."""
    rows, _ = preferences.pair_rows(
        self.chat_template, self.tokenizer,
        preferences.as_pairs(self.rankings(split)),
        max_length=self.config.data.max_length, what=f'dpo {split}')
    if not rows:
      raise UserError(f'dpo {split}: no pair fits data.max_length='
                      f'{self.config.data.max_length}')
    return rows

  # -- the finished model ---------------------------------------------------------
  def at_end(self, run, state, step):
    """Every held-out pair (data.test_split): implicit-reward accuracy, KL."""
    out = super().at_end(run, state, step)
    split = self.config.data.test_split
    if not split:  # e.g. sampled pairs: the test prompts are for judging
      return out
    held = run.evaluate_loss(state.params, split, max_batches=0)
    out.update({k.replace('eval/', 'test/'): v for k, v in held.items()})
    if jax.process_index() == 0:
      print(f'held-out pairs ({split}): ' + ', '.join(
          f'{k} {v:.4f}' for k, v in held.items()), flush=True)
      with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
        json.dump({'step': step, 'split': split, **out}, f, indent=2)
    return out

  # -- cost ---------------------------------------------------------------------
  def count_tokens(self, batch):
    return float(np.sum(batch['inputs_segmentation'] > 0))

  def flops_per_step(self, batch, counts):
    """Policy forward and backward (6N) plus the reference's forward (2N)
    on every real token, and the attention of both."""
    cfg = self.model_config
    length = batch['inputs'].shape[-1]
    per_token = (metrics_lib.transformer_train_flops_per_token(
        counts['total'], cfg.num_decoder_layers, cfg.d_model, length) * 4 / 3)
    return self.count_tokens(batch) * per_token

  def synthetic_batch(self, rows: int):
    flat = super().synthetic_batch(2 * rows)
    return {k: v.reshape(rows, 2, -1) for k, v in flat.items()}
