"""The post-training losses against NumPy, and BERT's masking rule.

objectives.ranking_loss (InstructGPT's K-way loss), objectives.dpo_loss (DPO,
conservative DPO, IPO), objectives.token_logprobs / token_kl, and
train/tasks/mlm.mask_tokens. The same objectives through the tasks, on
trained models, are in test_chain.py.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import objectives
from train.tasks import mlm


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _ranking_reference(scores, levels):
  """Mean over rankings of the mean over explicitly enumerated pairs."""
  losses, right, pairs = [], 0.0, 0
  for s, lv in zip(scores, levels):
    comparisons = [(i, j) for i, j in itertools.permutations(range(len(s)), 2)
                   if lv[i] >= 0 and lv[j] >= 0 and lv[i] < lv[j]]
    if not comparisons:
      continue
    losses.append(np.mean([-_log_sigmoid(s[i] - s[j]) for i, j in comparisons]))
    right += sum((s[i] > s[j]) + 0.5 * (s[i] == s[j]) for i, j in comparisons)
    pairs += len(comparisons)
  return np.sum(losses), len(losses), right / pairs, pairs


def test_ranking_loss_is_the_mean_over_enumerated_pairs():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(6, 5)).astype(np.float32)
  levels = np.array([[0, 1, 2, 3, 4],      # a full ranking: C(5, 2) pairs
                     [1, 0, 1, 2, -1],     # a tie, a missing response
                     [0, 0, 0, 0, 0],      # all tie: no pair, no weight
                     [3, 2, 1, 0, -1],
                     [0, 1, -1, -1, -1],   # a pair
                     [2, 2, 0, 1, 1]])
  loss, weight, metrics = objectives.ranking_loss(jnp.asarray(scores),
                                                  jnp.asarray(levels))
  want_loss, want_weight, want_acc, want_pairs = _ranking_reference(scores,
                                                                    levels)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert float(weight) == want_weight == 5
  assert float(metrics['pairs'].value) == want_pairs == 10 + 5 + 6 + 1 + 8
  np.testing.assert_allclose(
      float(metrics['accuracy'].total / metrics['accuracy'].count), want_acc,
      rtol=1e-6)


def test_ranking_loss_does_not_depend_on_the_listing_order():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(3, 4)).astype(np.float32)
  levels = np.array([[0, 1, 1, 2], [2, 0, 1, -1], [0, 3, 1, 2]])
  perm = np.array([3, 1, 0, 2])
  a = objectives.ranking_loss(jnp.asarray(scores), jnp.asarray(levels))
  b = objectives.ranking_loss(jnp.asarray(scores[:, perm]),
                              jnp.asarray(levels[:, perm]))
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
  assert float(a[1]) == float(b[1])


def test_ties_make_no_pair():
  scores = jnp.asarray([[3.0, -1.0, 0.5]])
  _, weight, metrics = objectives.ranking_loss(scores, jnp.asarray([[0, 0, 1]]))
  assert float(metrics['pairs'].value) == 2 and float(weight) == 1
  loss, weight, metrics = objectives.ranking_loss(scores,
                                                  jnp.asarray([[1, 1, 1]]))
  assert float(metrics['pairs'].value) == 0 and float(weight) == 0
  assert float(loss) == 0.0


@pytest.mark.parametrize('loss_type,smoothing', [('sigmoid', 0.0),
                                                  ('sigmoid', 0.2),
                                                  ('ipo', 0.0)])
def test_dpo_loss_matches_numpy(loss_type, smoothing):
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = (rng.normal(size=8).astype(np.float32) * 3 for _ in range(4))
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 1])
  beta = 0.3
  loss, weight, m = objectives.dpo_loss(
      *map(jnp.asarray, (pc, pr, rc, rr, valid)), beta=beta,
      loss_type=loss_type, label_smoothing=smoothing)
  h = (pc - rc) - (pr - rr)
  if loss_type == 'ipo':
    want = (h - 1 / (2 * beta)) ** 2
  else:
    want = (-(1 - smoothing) * _log_sigmoid(beta * h)
            - smoothing * _log_sigmoid(-beta * h))
  np.testing.assert_allclose(float(loss), np.sum(want * valid), rtol=1e-5)
  assert float(weight) == 7
  np.testing.assert_allclose(float(m['margin']),
                             np.sum(beta * h * valid), rtol=1e-5)
  assert float(m['accuracy']) == np.sum((h > 0) * valid)


def test_dpo_at_the_reference_is_log_2_and_pushes_chosen_up():
  logp = jnp.asarray([-5.0, -7.0])
  loss, weight, _ = objectives.dpo_loss(logp[:1], logp[1:], logp[:1],
                                        logp[1:], jnp.ones(1), beta=0.1)
  np.testing.assert_allclose(float(loss / weight), math.log(2), rtol=1e-6)
  grad = jax.grad(lambda c, r: objectives.dpo_loss(
      c, r, logp[:1], logp[1:], jnp.ones(1), beta=0.1)[0], argnums=(0, 1))(
          logp[:1], logp[1:])
  assert float(grad[0][0]) < 0 < float(grad[1][0])  # descent raises chosen


def test_token_logprobs_and_kl_match_numpy():
  rng = np.random.default_rng(3)
  p = rng.normal(size=(2, 5, 11)).astype(np.float32)
  q = rng.normal(size=(2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  logp = p - np.log(np.exp(p).sum(-1, keepdims=True))
  logq = q - np.log(np.exp(q).sum(-1, keepdims=True))
  np.testing.assert_allclose(
      objectives.token_logprobs(jnp.asarray(p), jnp.asarray(targets)),
      np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-5)
  np.testing.assert_allclose(
      objectives.token_kl(jnp.asarray(p), jnp.asarray(q)),
      np.sum(np.exp(logp) * (logp - logq), -1), rtol=1e-5, atol=1e-6)


def test_mlm_masks_15_percent_of_real_tokens_80_10_10():
  tokens = jnp.asarray(np.random.default_rng(4).integers(10, 500, (64, 512)),
                       jnp.int32)
  real = jnp.arange(512)[None, :] < 400  # the last 112 positions: padding
  corrupted, chosen = mlm.mask_tokens(tokens, jnp.broadcast_to(real, (64, 512)),
                                      jax.random.PRNGKey(0), mask_id=4,
                                      vocab=(5, 600))
  corrupted, chosen, tokens = map(np.asarray, (corrupted, chosen, tokens))
  assert not chosen[:, 400:].any()
  assert abs(chosen[:, :400].mean() - 0.15) < 0.005
  picked = corrupted[chosen]
  as_mask = np.mean(picked == 4)
  kept = np.mean(picked == tokens[chosen])
  assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 + 0.002
  # Everything not chosen is left as it was.
  np.testing.assert_array_equal(corrupted[~chosen], tokens[~chosen])
