"""From rewards to advantages: KL estimators, GAE, whitening, GRPO groups,
and the adaptive KL coefficient.

Per-token arrays are [b, t] over a rollout's response tokens with a mask
(1 on real tokens, 0 on the fill after a row's end); everything here is
plain jnp (jit-able, and equal to the NumPy references in tests/test_rl.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
KL_ESTIMATORS = ('k1', 'k3')


def kl_estimate(logp: Array, ref_logp: Array, estimator: str = 'k1') -> Array:
  """Per-token estimate of KL(policy || reference) from the sampled tokens'
  log-probs (Schulman, "Approximating KL divergence", 2020):

    k1  log p - log q                       unbiased, can be negative
    k3  (q / p) - 1 - log(q / p)            unbiased, always >= 0
  """
  if estimator == 'k1':
    return logp - ref_logp
  if estimator == 'k3':
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - 1.0 - log_ratio
  raise ValueError(f'KL estimator {estimator!r} is not one of {KL_ESTIMATORS}')


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis),
                                                    1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / std over the masked entries (0 elsewhere); without
  `shift_mean` the mean is added back (rewards keep their sign)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, 0.0)


def token_rewards(scores: Array, kl: Array, mask: Array, kl_coef) -> Array:
  """InstructGPT's per-token reward: -kl_coef * KL on every response token,
  plus the sequence's score on its last real token. scores [b]."""
  mask = mask.astype(jnp.float32)
  last = jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.int32) - 1, 0)
  at_end = jax.nn.one_hot(last, mask.shape[-1]) * scores[:, None]
  return (-kl_coef * kl + at_end) * mask


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float,
        lam: float, dones: Array | None = None) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016), right to left.

  rewards, values, mask [b, t]: token t's reward and the value of the state
  it was chosen in. An episode ends after its last masked token (nothing
  to bootstrap from after it) or where `dones` [b, t] is 1; masked-out
  tokens get 0. Returns (advantages, returns = advantages + values), 0
  where masked.
  """
  mask = mask.astype(jnp.float32)
  values = values * mask
  rewards = rewards * mask
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], 1)
  end = mask * (1.0 - next_mask)  # the last real token of a row
  if dones is not None:
    end = jnp.maximum(end, dones.astype(jnp.float32) * mask)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])],
                                1)
  deltas = rewards + gamma * next_values * (1.0 - end) - values

  def step(carry, xs):
    delta, stop, m = xs
    adv = (delta + gamma * lam * carry * (1.0 - stop)) * m
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]),
                        (deltas.T, end.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def group_advantages(scores: Array, group_size: int, *,
                     scale: bool = True, eps: float = 1e-4) -> Array:
  """GRPO (Shao et al. 2024): each sample's score minus its group's mean,
  over the group's std (+ eps) when `scale`. scores [b] with the G samples
  of a prompt consecutive (b = prompts * G). The std is the sample std
  (ddof 1), as TRL's and DeepSeekMath's."""
  groups = scores.reshape(-1, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale:
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    centred = centred / (std + eps)
  return centred.reshape(-1)


@dataclasses.dataclass
class KLController:
  """The KL coefficient beta: fixed, or adapted to a target KL per sequence
  (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) *
  n / horizon after each batch of n sequences. Its state is `value`."""
  value: float
  target: float | None = None
  horizon: int = 10000

  def update(self, kl: float, n: int) -> None:
    if self.target:
      error = min(max(kl / self.target - 1.0, -0.2), 0.2)
      # Kept in float32, as checkpointed: a resumed run continues from
      # exactly this value.
      self.value = float(np.float32(self.value * (1.0 + error * n
                                                  / self.horizon)))
