"""PPO's and GRPO's per-token losses, as sums over masked tokens.

Each returns (loss_sum, weight, metric_sums) like every task's loss
(train/step.py divides once by the weight): the sum over response tokens
and the number of tokens ('token' normalisation: every token of the batch
weighs the same, DAPO's and TRL's default), or, with `per_sequence`, each
sequence's token mean summed and the number of sequences (the original
GRPO's). Metric sums are `objectives.Mean`s, normalised by the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train.objectives import Mean

Array = jax.Array


def _reduce(per_token: Array, mask: Array, per_sequence: bool
            ) -> tuple[Array, Array]:
  mask = mask.astype(jnp.float32)
  if per_sequence:
    lengths = jnp.sum(mask, axis=-1)
    rows = lengths > 0
    return (jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(lengths, 1.0)),
            jnp.sum(rows.astype(jnp.float32)))
  return jnp.sum(per_token * mask), jnp.sum(mask)


def clipped_policy_loss(logp: Array, old_logp: Array, advantages: Array,
                        mask: Array, *, clip: float,
                        per_sequence: bool = False
                        ) -> tuple[Array, Array, dict]:
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token:
  max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp - old_logp).

  Metrics per token: clip fraction (the clipped branch was taken), the
  approximate KL to the sampling policy, E[(r - 1) - log r] (k3), and the
  mean ratio.
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  per_token = jnp.maximum(unclipped, clipped)
  loss_sum, weight = _reduce(per_token, mask, per_sequence)
  m = mask.astype(jnp.float32)
  tokens = jnp.sum(m)
  return loss_sum, weight, {
      'clip_fraction': Mean(jnp.sum((clipped > unclipped) * m), tokens),
      'approx_kl': Mean(jnp.sum(((ratio - 1.0) - log_ratio) * m), tokens),
      'ratio': Mean(jnp.sum(ratio * m), tokens)}


def clipped_value_loss(values: Array, old_values: Array, returns: Array,
                       mask: Array, *, clip: float) -> tuple[Array, Array, dict]:
  """PPO's clipped value loss (as in OpenAI's baselines and TRL):
  0.5 max((v - R)^2, (old_v + clip(v - old_v, -c, c) - R)^2) per token."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  per_token = 0.5 * jnp.maximum(jnp.square(values - returns),
                                jnp.square(clipped - returns))
  loss_sum, weight = _reduce(per_token, mask, False)
  m = mask.astype(jnp.float32)
  return loss_sum, weight, {
      'value_clip_fraction': Mean(
          jnp.sum((jnp.square(clipped - returns)
                   > jnp.square(values - returns)) * m), jnp.sum(m))}


def entropy(logits: Array) -> Array:
  """Entropy of each next-token distribution: [..., v] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
