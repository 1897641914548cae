"""Losses and their weights: label-smoothed cross-entropy, z-loss, token accuracy.

Every function returns SUMS over tokens together with the total weight, so
that callers normalise once by the number of non-pad target tokens in the
whole (possibly accumulated) batch. That makes N micro-batches of b rows
exactly equal to one batch of N*b rows.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def target_weights(targets: Array) -> Array:
  """1.0 on real target tokens, 0.0 on padding (token id 0). [b, l] -> [b, l]."""
  return (targets > 0).astype(jnp.float32)


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
  non-GEMM time (README, Throughput). Reverse mode only (a custom VJP).
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


def normalise(sums: dict[str, Array]) -> dict[str, Array]:
  """Token sums -> per-token loss, nll, accuracy; keeps the token count."""
  denom = jnp.maximum(sums['weight'], 1.0)
  return {
      'loss': sums['loss'] / denom,
      'nll': sums['nll'] / denom,
      'accuracy': sums['correct'] / denom,
      'tokens': sums['weight'],
  }
