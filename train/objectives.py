"""Losses and their weights: label-smoothed cross-entropy, z-loss, token accuracy.

Every function returns SUMS together with the total weight, so that callers
normalise once by the weight of the whole (possibly accumulated) batch: the
loss-masked target tokens for token losses, comparisons or pairs for
preference losses. That makes N micro-batches of b rows exactly equal to one
batch of N*b rows.

A task's loss returns `(loss_sum, weight, metric_sums)` (train/tasks). Each
metric sum is one of three kinds, and `normalise` treats each its own way:

  a plain array   a sum per unit of `weight` (token accuracy: hits)
  Mean(total, n)  a sum over its own count (reward models: correct pairs
                  over pairs, while the weight counts rankings)
  Total(x)        a count reported as it is (tokens seen)

All three are pytrees, so micro-batches and eval batches add leaf by leaf.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Mean(NamedTuple):
  """A metric normalised by its own count: total / count."""
  total: Array
  count: Array


class Total(NamedTuple):
  """A metric reported as its sum (a count of tokens, pairs, ...)."""
  value: Array


def max_and_argmax(x: Array) -> tuple[Array, Array]:
  """The maximum over the last axis and its first index, in one reduction.

  jnp.max and jnp.argmax would each read all of x [..., v]; for the LM
  logits that is a pass over [tokens, vocab] apiece.
  """
  ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

  def pick(a, b):
    (a_val, a_id), (b_val, b_id) = a, b
    take_a = (a_val > b_val) | ((a_val == b_val) & (a_id < b_id))
    return jnp.where(take_a, a_val, b_val), jnp.where(take_a, a_id, b_id)

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
  return jax.lax.reduce((x, ids), init, pick, (x.ndim - 1,))


def _label_ids(targets: Array, vocab: int) -> Array:
  """Negative ids count from the end, as take_along_axis reads them."""
  return jnp.where(targets < 0, targets + vocab, targets)


@jax.custom_vjp
def softmax_stats(logits: Array, targets: Array,
                  row_max: Array) -> tuple[Array, Array, Array]:
  """What the losses need of logits [..., v]: log Z, the label's logit, sum.

  Returns float32 [...] each: log Z = logsumexp(logits), logits[target],
  and the sum of the logits over the vocabulary. row_max [...] (float32,
  not differentiated) is each row's maximum, the shift that keeps the
  exponentials finite; the caller computes it with the accuracy's argmax.
  The backward is written out as one element-wise pass, softmax * dlogZ +
  onehot * dlabel + dsum, computed in float32 and returned in the logits'
  dtype. Autodiff of the same forward instead scattered the label's
  cotangent into a zero [..., v] array and added it in separate passes: for
  a 50k vocabulary these passes over [tokens, v] are much of a GPU step's
  non-GEMM time (docs/performance/gpu.md). Reverse mode only (a custom VJP).
  """
  x = logits.astype(jnp.float32)
  shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  log_z = jnp.log(jnp.sum(jnp.exp(x - shift[..., None]), axis=-1)) + shift
  ids = _label_ids(targets, x.shape[-1])
  label = jnp.take_along_axis(x, ids[..., None], axis=-1)[..., 0]
  return log_z, label, jnp.sum(x, axis=-1)


def _softmax_stats_fwd(logits, targets, row_max):
  stats = softmax_stats(logits, targets, row_max)
  return stats, (logits, targets, stats[0])


def _softmax_stats_bwd(residuals, cotangents):
  logits, targets, log_z = residuals
  d_log_z, d_label, d_sum = (c[..., None] for c in cotangents)
  x = logits.astype(jnp.float32)
  ids = _label_ids(targets, x.shape[-1])
  onehot = jnp.arange(x.shape[-1]) == ids[..., None]
  dx = (jnp.exp(x - log_z[..., None]) * d_log_z
        + jnp.where(onehot, d_label, 0.0) + d_sum)
  # log Z does not depend on the shift: row_max gets no cotangent.
  return dx.astype(logits.dtype), None, None


softmax_stats.defvjp(_softmax_stats_fwd, _softmax_stats_bwd)


def cross_entropy_sums(logits: Array, targets: Array, weights: Array, *,
                       label_smoothing: float = 0.0,
                       z_loss: float = 0.0) -> dict[str, Array]:
  """Token-level sums for logits [b, l, v], targets/weights [b, l].

  Label smoothing (paper 5.4, eps_ls): the target distribution puts
  1 - eps on the label and eps / (v - 1) on every other token; the constant
  entropy of that distribution is subtracted, so a perfect model scores 0.
  z-loss (PaLM): z_loss * log(Z)^2 keeps the softmax normaliser near 1.

  Returns `loss` (the optimised objective), `nll` (plain cross-entropy, for
  perplexity), `correct` (argmax hits; a tie goes to the lowest id) and
  `weight` (token count), all sums. The whole [b, l, v] is read by two
  reductions (maximum with argmax, then the sums) and written once backward.
  """
  vocab = logits.shape[-1]
  row_max, argmax = max_and_argmax(
      jax.lax.stop_gradient(logits).astype(jnp.float32))
  log_z, label_logit, logit_sum = softmax_stats(logits, targets, row_max)
  nll = log_z - label_logit
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # sum_j q_j log p_j with q = low everywhere but `confidence` at the
    # label; sum_j log p_j = sum_j logits_j - v log Z.
    label_lp = -nll
    smooth = -(confidence * label_lp
               + low * (logit_sum - vocab * log_z - label_lp))
    normaliser = -(confidence * jnp.log(confidence)
                   + (vocab - 1) * low * jnp.log(low + 1e-20))
    loss = smooth - normaliser
  else:
    loss = nll
  if z_loss > 0.0:
    loss = loss + z_loss * jnp.square(log_z)
  correct = (argmax == targets).astype(jnp.float32)
  return {
      'loss': jnp.sum(loss * weights),
      'nll': jnp.sum(nll * weights),
      'correct': jnp.sum(correct * weights),
      'weight': jnp.sum(weights),
  }


class Hidden(NamedTuple):
  """A forward pass that stops before the logits: what `chunked_cross_entropy_sums`
  needs to make them a few positions at a time.

  states: final hidden states [b, l, d]; to_logits: [b, c, d] -> [b, c, v]
  float32; chunk: positions per chunk (divides l).
  """
  states: Array
  to_logits: Callable[[Array], Array]
  chunk: int


def chunked_cross_entropy_sums(hidden: Hidden, targets: Array, weights: Array,
                               **kwargs) -> dict[str, Array]:
  """`cross_entropy_sums` without the whole [b, l, v] logits in memory.

  The positions are cut into l / chunk slices of [b, chunk] (rows stay
  whole, so a batch sharded over rows stays sharded); a scan makes each
  slice's logits, sums its losses and drops them, and the backward pass
  makes them again (`jax.checkpoint`) instead of keeping them. For GPT-2's
  50,304-id vocabulary the float32 logits of 16 x 1024 tokens are 3.3 GB;
  with chunk 128 one slice is 1/8 of that. Same sums up to float rounding.

  Costs: making the logits twice adds 2 * d * v FLOPs per token (GPT-2
  small: ~10% of its 6N). And on a mesh with several data or fsdp devices,
  XLA:CPU reduces the output embedding's gradient across devices once per
  slice inside the loop, not once per step (seen in the compiled program);
  one device is unaffected. Summing it per device under `shard_map` would
  avoid that; not done yet.
  """
  b, l, d = hidden.states.shape
  c = hidden.chunk
  if l % c:
    raise ValueError(f'loss chunk {c} does not divide the length {l}')

  def split(x):  # [b, l, ...] -> [l / c, b, c, ...]
    return jnp.swapaxes(x.reshape(b, l // c, c, *x.shape[2:]), 0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan
  def slice_sums(states, t, w):
    return cross_entropy_sums(hidden.to_logits(states), t, w, **kwargs)

  def body(total, xs):
    sums = slice_sums(*xs)
    return jax.tree_util.tree_map(jnp.add, total, sums), None

  zeros = {k: jnp.zeros((), jnp.float32)
           for k in ('loss', 'nll', 'correct', 'weight')}
  total, _ = jax.lax.scan(
      body, zeros, (split(hidden.states), split(targets), split(weights)))
  return total


def token_sums(outputs: Array | Hidden, targets: Array, weights: Array,
               **kwargs) -> dict[str, Array]:
  """The loss sums of a forward pass: logits [b, l, v], or `Hidden`."""
  if isinstance(outputs, Hidden):
    return chunked_cross_entropy_sums(outputs, targets, weights, **kwargs)
  return cross_entropy_sums(outputs, targets, weights, **kwargs)


def normalise(sums: dict, weight: Array) -> dict:
  """Metric sums (the three kinds of the module docstring) -> reported values.

  Totals stay `Total`s, so that a log window can add them up (tokens seen
  in the window) while it averages the rest.
  """
  out = {}
  for name, value in sums.items():
    if isinstance(value, Mean):
      out[name] = value.total / jnp.maximum(value.count, 1.0)
    elif isinstance(value, Total):
      out[name] = value
    else:
      out[name] = value / jnp.maximum(weight, 1.0)
  return out


def token_loss(outputs: Array | Hidden, targets: Array, loss_mask: Array,
               **kwargs) -> tuple[Array, Array, dict]:
  """A task's `(loss_sum, weight, metric_sums)` for next-token prediction.

  outputs: logits [b, l, v] or `Hidden`; targets, loss_mask [b, l] (the
  mask is data: 1 on the positions the loss covers, 0 elsewhere). Metrics:
  nll (plain cross-entropy, whatever the smoothing), accuracy, tokens.
  """
  sums = token_sums(outputs, targets, loss_mask.astype(jnp.float32), **kwargs)
  return sums['loss'], sums['weight'], {
      'nll': sums['nll'], 'accuracy': sums['correct'],
      'tokens': Total(sums['weight'])}


# -- sequence log-probabilities --------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(target) at every position: logits [..., v], targets [...] -> [...]
  float32, through `softmax_stats` (one pass over the logits backward)."""
  row_max, _ = max_and_argmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
  log_z, label, _ = softmax_stats(logits, targets, row_max)
  return label - log_z


def token_kl(logits_p: Array, logits_q: Array) -> Array:
  """KL(p || q) of the next-token distributions at every position:
  [..., v] twice -> [...] float32 (exact, over the whole vocabulary)."""
  logp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


# -- preferences ----------------------------------------------------------------------


def ranking_loss(scores: Array, levels: Array) -> tuple[Array, Array, dict]:
  """InstructGPT's reward-model loss over K-way rankings, as loss sums.

  scores [b, K] (the reward of each response), levels [b, K] int (rank
  level, 0 best; equal levels tie; -1 marks a missing response). Every pair
  (i, j) with levels[i] < levels[j] is a comparison, loss -log sigmoid(r_i -
  r_j); a ranking's comparisons are averaged (1 / C(K, 2) without ties), so
  each ranking is one batch element and K responses cost K forward passes,
  not C(K, 2) (InstructGPT section 3.5). Ties make no pair.

  Returns (loss_sum over rankings, weight = rankings with a comparison,
  metrics): accuracy (pairs ordered right; a tie of scores counts half) and
  margin (mean r_better - r_worse) per pair, pairs.
  """
  levels = levels.astype(jnp.int32)
  present = levels >= 0
  better = (present[:, :, None] & present[:, None, :]
            & (levels[:, :, None] < levels[:, None, :]))
  diff = scores[:, :, None] - scores[:, None, :]
  pair_loss = jnp.where(better, -jax.nn.log_sigmoid(diff), 0.0)
  pairs = jnp.sum(better, axis=(1, 2)).astype(jnp.float32)
  has_pairs = pairs > 0
  per_ranking = jnp.sum(pair_loss, axis=(1, 2)) / jnp.maximum(pairs, 1.0)
  right = jnp.where(better, (diff > 0) + 0.5 * (diff == 0), 0.0)
  total_pairs = jnp.sum(pairs)
  return (jnp.sum(jnp.where(has_pairs, per_ranking, 0.0)),
          jnp.sum(has_pairs.astype(jnp.float32)),
          {'accuracy': Mean(jnp.sum(right), total_pairs),
           'margin': Mean(jnp.sum(jnp.where(better, diff, 0.0)), total_pairs),
           'pairs': Total(total_pairs)})


DPO_LOSSES = ('sigmoid', 'ipo')


def dpo_loss(policy_chosen: Array, policy_rejected: Array,
             reference_chosen: Array, reference_rejected: Array,
             valid: Array, *, beta: float, loss_type: str = 'sigmoid',
             label_smoothing: float = 0.0) -> tuple[Array, Array, dict]:
  """DPO (Rafailov et al. 2023) and variants over pairs, as loss sums.

  Inputs [b]: each response's log-probability under the policy and the
  frozen reference (summed over its tokens; for IPO, averaged per token, as
  TRL does); valid [b] is 0 on padding rows. With
  h = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid  -log sigmoid(beta h); with label_smoothing eps the conservative
             DPO of Mitchell (2023): -(1 - eps) log sigmoid(beta h)
             - eps log sigmoid(-beta h)
    ipo      (h - 1 / (2 beta))^2 (Azar et al. 2023)

  Returns (loss_sum, weight = pairs, metrics): the implicit rewards
  beta (pi - ref) of chosen and rejected, their margin, and accuracy
  (chosen's implicit reward above rejected's), per pair.
  """
  if loss_type not in DPO_LOSSES:
    raise ValueError(f'loss_type={loss_type!r} is not one of {DPO_LOSSES}')
  chosen = policy_chosen - reference_chosen
  rejected = policy_rejected - reference_rejected
  h = chosen - rejected
  if loss_type == 'ipo':
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  valid = valid.astype(jnp.float32)
  reward_c, reward_r = beta * chosen, beta * rejected
  return jnp.sum(losses * valid), jnp.sum(valid), {
      'rewards_chosen': jnp.sum(reward_c * valid),
      'rewards_rejected': jnp.sum(reward_r * valid),
      'margin': jnp.sum((reward_c - reward_r) * valid),
      'accuracy': jnp.sum((reward_c > reward_r) * valid)}
