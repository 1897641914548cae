"""Decoding: beam search and temperature/top-k/top-p sampling (temperature 0: greedy).

Decoding never sees the network. The caller wraps one decoder step as

  tokens_to_logits(tokens: [n, 1] int32, cache) -> (logits: [n, vocab], cache)

where `cache` is a pytree whose leaves are either 0-d arrays shared by every row
(step counters such as `cache_index`) or arrays whose leading dimension is n
(batch rows, or batch*beam rows in beam search). Beam search repeats every
non-scalar leaf `beam_size` times along that dimension (row b owns rows
b*beam ... b*beam + beam - 1) and reorders them whenever beams are reselected.
Anything else the step needs per row (encoder outputs, padding masks) should be
closed over by `tokens_to_logits` after `expand_beams` for beam search.

The first decoder input is `start_id` (0, the pad id, by the shifted-right
convention); outputs never contain it. Everything jits with static sizes and
runs one `lax.while_loop`. Masked scores use a large finite negative, never
-inf, so no step can produce NaN.
"""
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
TokensToLogits = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]

# Finite stand-in for -inf in logits and log-prob scores.
NEG_INF = -1.0e10


def cached_step(dmodel, params: PyTree, *inputs, bias=None,
                **apply_kwargs) -> TokensToLogits:
  """tokens_to_logits through the KV cache, one new token per step.

  dmodel: a module built with decode=True; `inputs` come before the tokens
  in its call (an EncoderDecoder's encoded source and segmentation, with
  method=EncoderDecoder.decode in `apply_kwargs`); `bias` [vocab] is added
  to the logits (NEG_INF on ids that must never be chosen).
  """
  def tokens_to_logits(tokens, cache):
    logits, mut = dmodel.apply({'params': params, 'cache': cache}, *inputs,
                               tokens, mutable=['cache'], **apply_kwargs)
    logits = logits[:, 0]
    return (logits if bias is None else logits + bias), mut['cache']
  return tokens_to_logits


def length_penalty(length, alpha) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _batch_size(cache: PyTree, batch_size: int | None) -> int:
  """Rows of the cache (its non-scalar leaves' leading dim), or `batch_size`."""
  sizes = {x.shape[0] for x in jax.tree.leaves(cache) if jnp.ndim(x) > 0}
  if batch_size is not None:
    sizes.add(batch_size)
  if len(sizes) != 1:
    raise ValueError(
        f'Cannot tell the batch size: cache leading dims {sorted(sizes)}; '
        'every non-scalar cache leaf must lead with the batch dim, and '
        'batch_size= is required when the cache has no such leaf.')
  return sizes.pop()


def expand_beams(tree: PyTree, beam_size: int) -> PyTree:
  """Repeats every row beam_size times: [batch, ...] -> [batch * beam, ...].

  0-d leaves (shared step counters) are left alone.
  """
  return jax.tree.map(
      lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, beam_size, axis=0),
      tree)


def _gather_beams(x: jax.Array, parents: jax.Array) -> jax.Array:
  """x: [batch, beam, ...], parents: [batch, new_beam] -> [batch, new_beam, ...]."""
  return x[jnp.arange(x.shape[0])[:, None], parents]


def _gather_cache(cache: PyTree, parents: jax.Array) -> PyTree:
  """Reorders flattened [batch * beam, ...] cache rows to follow `parents`."""
  batch, beam = parents.shape

  def gather(x):
    if x.ndim == 0:
      return x
    x = x.reshape((batch, beam) + x.shape[1:])
    return _gather_beams(x, parents).reshape((batch * beam,) + x.shape[2:])

  return jax.tree.map(gather, cache)


class BeamState(NamedTuple):
  """Beam search loop state. Sequences hold start_id at position 0.

  index: number of tokens the live beams have generated (0-d int32).
  live_logprobs: [batch, beam] sum of log-probs of each live hypothesis.
  live_alive: [batch, beam] False for empty slots and beams that hit EOS.
  live_seqs: [batch, beam, max_decode_len + 1] int32.
  finished_scores: [batch, beam] length-penalised, sorted best first.
  finished_flags: [batch, beam] False for slots not yet filled.
  finished_seqs: [batch, beam, max_decode_len + 1] int32, 0 after EOS.
  cache: decoder cache with rows [batch * beam, ...].
  """
  index: jax.Array
  live_logprobs: jax.Array
  live_alive: jax.Array
  live_seqs: jax.Array
  finished_scores: jax.Array
  finished_flags: jax.Array
  finished_seqs: jax.Array
  cache: PyTree


def beam_search(cache: PyTree,
                tokens_to_logits: TokensToLogits,
                *,
                beam_size: int,
                alpha: float,
                eos_id: int,
                max_decode_len: int,
                start_id: int = 0,
                batch_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with the GNMT length penalty.

  Each step extends every live hypothesis by every token and keeps the
  beam_size most probable extensions. Those that end in EOS, or reach
  max_decode_len, move to a pool of finished hypotheses scored
  log_prob / length_penalty(length, alpha); their live slots are refilled from
  the other beams' extensions at the next step. So beam_size=1 is exactly
  greedy search for every alpha, and a beam wider than the number of
  hypotheses is exhaustive search. The loop stops once no live hypothesis can
  beat the worst of a full finished pool: log-probs only fall, so a live
  score is bounded by its log-prob over the largest penalty still reachable.

  Args:
    cache: decoder cache for `batch` rows (not yet expanded to beams).
    tokens_to_logits: one decoder step, see the module docstring.
    beam_size: hypotheses kept per batch row (static).
    alpha: length penalty exponent; 0 ranks by raw log-probability.
    eos_id: end-of-sequence token.
    max_decode_len: generated tokens at most, EOS included (static).
    start_id: the first decoder input.
    batch_size: needed only when the cache has no non-scalar leaf.

  Returns:
    sequences: [batch, beam, max_decode_len] int32, best first, each ending in
      EOS (unless truncated at max_decode_len) followed by 0s.
    scores: [batch, beam] float32 length-penalised log-probs. Slots left empty
      (only when beam_size exceeds the number of possible hypotheses) hold
      NEG_INF and all-0 sequences.
  """
  batch = _batch_size(cache, batch_size)
  beam, width = beam_size, max_decode_len + 1
  first = jnp.arange(beam) == 0  # One live beam at first, else beams repeat.
  seqs0 = jnp.zeros((batch, beam, width), jnp.int32).at[:, :, 0].set(start_id)
  state = BeamState(
      index=jnp.array(0, jnp.int32),
      live_logprobs=jnp.broadcast_to(
          jnp.where(first, 0.0, NEG_INF).astype(jnp.float32), (batch, beam)),
      live_alive=jnp.broadcast_to(first, (batch, beam)),
      live_seqs=seqs0,
      finished_scores=jnp.full((batch, beam), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((batch, beam), jnp.bool_),
      finished_seqs=jnp.zeros((batch, beam, width), jnp.int32),
      cache=expand_beams(cache, beam))

  def can_improve(s: BeamState) -> jax.Array:
    best_penalty = jnp.maximum(length_penalty(s.index + 1, alpha),
                               length_penalty(max_decode_len, alpha))
    best_live = jnp.max(jnp.where(s.live_alive, s.live_logprobs, NEG_INF), 1)
    best_live = jnp.minimum(best_live, 0.0) / best_penalty
    # A pool with empty slots has worst score NEG_INF: any live beam can enter.
    worst_done = jnp.min(
        jnp.where(s.finished_flags, s.finished_scores, NEG_INF), axis=1)
    row_open = jnp.any(s.live_alive, axis=1) & (best_live > worst_done)
    return (s.index < max_decode_len) & jnp.any(row_open)

  def step(s: BeamState) -> BeamState:
    t = s.index
    tokens = lax.dynamic_index_in_dim(s.live_seqs, t, axis=2, keepdims=False)
    logits, cache = tokens_to_logits(tokens.reshape(batch * beam, 1), s.cache)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
    vocab = logprobs.shape[-1]
    # [batch, beam, vocab] -> [batch, beam * vocab]: extensions of all beams.
    cand = s.live_logprobs[..., None] + logprobs.reshape(batch, beam, vocab)
    cand = jnp.where(s.live_alive[..., None], cand, NEG_INF)
    top_logprobs, top = lax.top_k(cand.reshape(batch, beam * vocab), beam)
    parents, new_tokens = top // vocab, top % vocab
    valid = _gather_beams(s.live_alive, parents)
    seqs = lax.dynamic_update_index_in_dim(
        _gather_beams(s.live_seqs, parents), new_tokens, t + 1, axis=2)

    is_eos = new_tokens == eos_id
    done = valid & (is_eos | (t + 1 == max_decode_len))
    done_scores = jnp.where(
        done, top_logprobs / length_penalty(t + 1, alpha), NEG_INF)
    pool_scores, pool = lax.top_k(
        jnp.concatenate([s.finished_scores, done_scores], axis=1), beam)
    pool_flags = jnp.concatenate([s.finished_flags, done], axis=1)
    pool_seqs = jnp.concatenate([s.finished_seqs, seqs], axis=1)

    alive = valid & ~is_eos
    return BeamState(
        index=t + 1,
        live_logprobs=jnp.where(alive, top_logprobs, NEG_INF),
        live_alive=alive,
        live_seqs=seqs,
        finished_scores=pool_scores,
        finished_flags=_gather_beams(pool_flags, pool),
        finished_seqs=_gather_beams(pool_seqs, pool),
        cache=_gather_cache(cache, parents))

  state = lax.while_loop(can_improve, step, state)
  # Empty slots may have gathered a junk candidate's tokens.
  seqs = jnp.where(state.finished_flags[..., None], state.finished_seqs, 0)
  return seqs[:, :, 1:], state.finished_scores


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Masks all but the k largest logits [..., vocab] to NEG_INF.

  Ties with the k-th largest value are kept too. k <= 0 keeps everything.
  """
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
  """Nucleus filter: keeps the fewest most probable tokens with mass >= p.

  logits: [..., vocab]. The most probable token is always kept, so p <= 0 is
  greedy; ties with the least probable kept token are kept too.
  """
  ranked = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ranked.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < p) | (jnp.arange(logits.shape[-1]) == 0)
  # Dropped ranks take the top value so they cannot lower the threshold.
  threshold = jnp.min(
      jnp.where(keep, ranked, ranked[..., :1]), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, NEG_INF)


def _is_static(x, value) -> bool:
  return isinstance(x, (int, float)) and x == value


def _choose_tokens(logits, rng, temperature, top_k, top_p
                   ) -> tuple[jax.Array, jax.Array]:
  """logits: [batch, vocab] -> ([batch] int32 tokens, [batch] float32 log-probs).

  A sampled token's log-prob is under the distribution it was drawn from:
  log_softmax of the filtered logits / temperature (with top-k and top-p
  off, the model's own distribution at that temperature: what an RL loss
  recomputes). A greedy token's is under the model's temperature-1
  distribution (a point mass would say only 0).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def logprob_of(scores, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1),
                               tokens[:, None], axis=-1)[:, 0]

  def argmax():
    return greedy, logprob_of(logits, greedy)
  if _is_static(temperature, 0):
    return argmax()
  temperature = jnp.asarray(temperature, jnp.float32)

  def sample():
    filtered = top_k_filter(logits / temperature, top_k)
    if not (isinstance(top_p, (int, float)) and top_p >= 1):
      filtered = top_p_filter(filtered, top_p)
    tokens = jax.random.categorical(rng, filtered).astype(jnp.int32)
    return tokens, logprob_of(filtered, tokens)
  # A traced temperature may be 0 (greedy): then the random draw over the
  # whole vocabulary, a large part of a small model's step, is skipped.
  return lax.cond(temperature > 0, sample, argmax)


class SamplingState(NamedTuple):
  """Sampling loop state; one `sample_step` produces sequences[:, index].

  index: position produced next (0-d int32).
  sequences: [batch, length] int32, the prompt then samples, 0 after EOS.
    A nonzero entry at or after `index` is a prompt token still to be forced.
  ended: [batch] bool, True once the row sampled EOS.
  cache: decoder cache with rows [batch, ...].
  rng: base key; step i samples with fold_in(rng, i).
  logprobs: [batch, length] float32, each sampled token's log-prob under
    the distribution it was drawn from (`_choose_tokens`); 0 where a token
    was forced or the row had ended.
  """
  index: jax.Array
  sequences: jax.Array
  ended: jax.Array
  cache: PyTree
  rng: jax.Array
  logprobs: jax.Array


def init_sampling(prompt: jax.Array, cache: PyTree, rng: jax.Array, *,
                  max_decode_len: int | None = None) -> SamplingState:
  """Starts sampling from prompts [batch, length], left-aligned and 0-padded.

  max_decode_len (static) right-pads the prompt to that many positions;
  otherwise the output is as long as the prompt array.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if max_decode_len is not None:
    if max_decode_len < prompt.shape[1]:
      raise ValueError(f'max_decode_len={max_decode_len} is shorter than the '
                       f'prompt array ({prompt.shape[1]} positions).')
    prompt = jnp.pad(prompt, ((0, 0), (0, max_decode_len - prompt.shape[1])))
  return SamplingState(
      index=jnp.array(0, jnp.int32),
      sequences=prompt,
      ended=jnp.zeros(prompt.shape[:1], jnp.bool_),
      cache=cache,
      rng=rng,
      logprobs=jnp.zeros(prompt.shape, jnp.float32))


def sampling_done(state: SamplingState) -> jax.Array:
  """True once every row ended or every position is filled (0-d bool)."""
  return (state.index >= state.sequences.shape[1]) | jnp.all(state.ended)


def sample_step(state: SamplingState,
                tokens_to_logits: TokensToLogits,
                *,
                eos_id: int,
                temperature=1.0,
                top_k: int = 0,
                top_p=1.0,
                start_id: int = 0) -> SamplingState:
  """Feeds the previous token, then forces the prompt or samples one token.

  Call only while `sampling_done(state)` is False. Jit it once (with the
  keyword arguments bound) to stream: the new token is
  `state.sequences[:, state.index - 1]`.

  Args:
    state: from `init_sampling` or the previous step.
    tokens_to_logits: one decoder step, see the module docstring.
    eos_id: a sampled (not prompted) EOS ends its row; later tokens are 0.
    temperature: logits are divided by it; 0 takes the argmax.
    top_k: sample among the k most probable tokens only; 0 disables (static).
    top_p: then among the nucleus of mass top_p; 1 disables.
    start_id: the decoder input before the first position.
  """
  i = state.index
  previous = lax.dynamic_index_in_dim(
      state.sequences, jnp.maximum(i - 1, 0), axis=1, keepdims=False)
  previous = jnp.where(i > 0, previous, start_id)
  logits, cache = tokens_to_logits(previous[:, None], state.cache)
  sampled, logprob = _choose_tokens(logits, jax.random.fold_in(state.rng, i),
                                    temperature, top_k, top_p)
  prompted = lax.dynamic_index_in_dim(state.sequences, i, axis=1,
                                      keepdims=False)
  forced = prompted != 0
  token = jnp.where(state.ended, 0, jnp.where(forced, prompted, sampled))
  logprob = jnp.where(state.ended | forced, 0.0, logprob)
  return SamplingState(
      index=i + 1,
      sequences=lax.dynamic_update_index_in_dim(state.sequences, token, i, 1),
      ended=state.ended | (~forced & (token == eos_id)),
      cache=cache,
      rng=state.rng,
      logprobs=lax.dynamic_update_index_in_dim(state.logprobs, logprob, i, 1))


def temperature_sample(prompt: jax.Array,
                       cache: PyTree,
                       tokens_to_logits: TokensToLogits,
                       rng: jax.Array,
                       *,
                       eos_id: int,
                       temperature=1.0,
                       top_k: int = 0,
                       top_p=1.0,
                       max_decode_len: int | None = None,
                       start_id: int = 0) -> jax.Array:
  """Continues prompts [batch, length] by sampling: `sample_step` in a loop.

  Prompt tokens are fed one per step through the cache; the first 0 of a row
  is its first sampled position. Same rng, same output.

  Returns:
    [batch, max_decode_len or length] int32: prompts, samples, 0 after EOS.
  """
  state = init_sampling(prompt, cache, rng, max_decode_len=max_decode_len)
  step = functools.partial(
      sample_step, tokens_to_logits=tokens_to_logits, eos_id=eos_id,
      temperature=temperature, top_k=top_k, top_p=top_p, start_id=start_id)
  return lax.while_loop(lambda s: ~sampling_done(s), step, state).sequences


def response_mask(responses: jax.Array, eos_id: int) -> jax.Array:
  """[batch, length] 1 on each row's sampled tokens up to and including its
  first `eos_id` (all of them when it has none), 0 on the fill after it."""
  is_eos = responses == eos_id
  after = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS seen before this token
  return (after == 0).astype(jnp.int32)
