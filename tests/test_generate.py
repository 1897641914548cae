"""Decoding against a toy decoder whose answers numpy can enumerate.

The toy's logits depend on the step, the fed token and a hash of every token
fed so far that lives in the cache, so a beam whose cache rows are not
reordered with it decodes the wrong distribution.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import generate

VOCAB, EOS, HASH, STEPS = 5, 1, 7, 10


class Toy:
  """tokens_to_logits over a random table [STEPS, VOCAB, VOCAB] plus hash term."""

  def __init__(self, seed, scale=2.0):
    rng = np.random.RandomState(seed)
    self.table = rng.randn(STEPS, VOCAB, VOCAB).astype(np.float32) * scale
    self.mix = rng.randn(STEPS, HASH, VOCAB).astype(np.float32) * scale

  @staticmethod
  def init_cache(hash0):
    """Rows start from different hashes: batch rows must not mix."""
    hash0 = jnp.asarray(hash0, jnp.int32)
    return {'index': jnp.array(0, jnp.int32), 'hash': hash0,
            'history': jnp.zeros((hash0.shape[0], STEPS), jnp.int32)}

  def __call__(self, tokens, cache):
    i, token = cache['index'], tokens[:, 0]
    h = (cache['hash'] * 3 + token) % HASH
    logits = jnp.asarray(self.table)[i, token] + jnp.asarray(self.mix)[i, h]
    history = cache['history'].at[:, i].set(token)
    return logits, {'index': i + 1, 'hash': h, 'history': history}

  def logprobs(self, fed, hash0):
    """Next-token log-probs [VOCAB] after feeding `fed` (start token first)."""
    h = hash0
    for token in fed:
      h = (h * 3 + token) % HASH
    logits = (self.table[len(fed) - 1, fed[-1]] + self.mix[len(fed) - 1, h])
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def score(toy, hash0, seq, alpha):
  """Brute-force score of a generated sequence (trailing 0s after EOS)."""
  fed, logprob = [0], 0.0
  for token in seq:
    logprob += toy.logprobs(fed, hash0)[token]
    fed.append(int(token))
    if token == EOS:
      break
  return logprob / penalty(len(fed) - 1, alpha)


def exhaustive(toy, hash0, alpha, max_len):
  """Best (score, sequence) over all sequences ending in EOS or at max_len."""
  best = (-np.inf, None)

  def visit(fed, logprob):
    nonlocal best
    logprobs = toy.logprobs(fed, hash0)
    for token in range(VOCAB):
      seq = fed[1:] + [token]
      if token == EOS or len(seq) == max_len:
        s = (logprob + logprobs[token]) / penalty(len(seq), alpha)
        best = max(best, (s, seq + [0] * (max_len - len(seq))))
      else:
        visit(fed + [token], logprob + logprobs[token])

  visit([0], 0.0)
  return best


def numpy_beam(toy, hash0, alpha, beam_size, max_len):
  """The beam search algorithm run to max_len with no early stopping."""
  live, finished = [(0.0, [0])], []
  for t in range(max_len):
    extensions = [(logprob + step_logprob, fed + [token])
                  for logprob, fed in live
                  for token, step_logprob in enumerate(toy.logprobs(fed, hash0))]
    kept = sorted(extensions, key=lambda c: -c[0])[:beam_size]
    finished += [(logprob / penalty(t + 1, alpha), fed[1:]) for logprob, fed in kept
                 if fed[-1] == EOS or t + 1 == max_len]
    live = [c for c in kept if c[1][-1] != EOS]
  finished = sorted(finished, key=lambda c: -c[0])[:beam_size]
  return ([s for s, _ in finished],
          [seq + [0] * (max_len - len(seq)) for _, seq in finished])


def numpy_greedy(toy, hash0, max_len):
  fed = [0]
  while len(fed) <= max_len and fed[-1] != EOS:
    fed.append(int(np.argmax(toy.logprobs(fed, hash0))))
  return fed[1:] + [0] * (max_len + 1 - len(fed))


@functools.partial(jax.jit, static_argnames=('toy', 'beam_size', 'max_len'))
def beam(toy, hash0, alpha, beam_size, max_len):
  return generate.beam_search(
      Toy.init_cache(hash0), toy, beam_size=beam_size, alpha=alpha,
      eos_id=EOS, max_decode_len=max_len)


@functools.partial(jax.jit, static_argnames=('toy', 'max_len'))
def greedy(toy, hash0, max_len):
  # Sampling at temperature 0 is argmax decoding.
  return generate.temperature_sample(
      jnp.zeros((hash0.shape[0], max_len), jnp.int32), Toy.init_cache(hash0),
      toy, jax.random.key(0), eos_id=EOS, temperature=0.0)


@functools.partial(jax.jit, static_argnames=(
    'toy', 'eos_id', 'temperature', 'top_k', 'top_p', 'max_len'))
def sample(toy, prompt, hash0, rng, eos_id=EOS, temperature=1.0, top_k=0,
           top_p=1.0, max_len=None):
  return generate.temperature_sample(
      prompt, Toy.init_cache(hash0), toy, rng, eos_id=eos_id,
      temperature=temperature, top_k=top_k, top_p=top_p,
      max_decode_len=max_len)


TOY = Toy(0)
HASH0 = np.array([0, 3, 5, 6])


def test_greedy_matches_numpy():
  out = np.asarray(greedy(TOY, HASH0, 8))
  for row, h in enumerate(HASH0):
    np.testing.assert_array_equal(out[row], numpy_greedy(TOY, int(h), 8))


@pytest.mark.parametrize('alpha', [0.0, 0.6, 3.0])
def test_beam_one_is_greedy(alpha):
  seqs, scores = beam(TOY, HASH0, alpha, 1, 8)
  np.testing.assert_array_equal(seqs[:, 0], greedy(TOY, HASH0, 8))
  for row, h in enumerate(HASH0):
    assert scores[row, 0] == pytest.approx(
        score(TOY, int(h), seqs[row, 0], alpha), abs=1e-4)


@pytest.mark.parametrize('alpha', [0.0, 0.6, 3.0])
def test_wide_beam_is_exhaustive(alpha):
  # 128 beams hold every live prefix of length <= 3 (4**3 non-EOS prefixes).
  seqs, scores = beam(TOY, HASH0, alpha, 128, 4)
  for row, h in enumerate(HASH0):
    best, best_seq = exhaustive(TOY, int(h), alpha, 4)
    assert scores[row, 0] == pytest.approx(best, abs=1e-4)
    np.testing.assert_array_equal(seqs[row, 0], best_seq)


def late_bloomer():
  """[EOS] is likeliest, but [3, 2, 2, ...] wins second place once alpha pays.

  After [3, 2] the pool is full ([EOS], [3, EOS]) and the live beam's log-prob
  over the *current* length penalty cannot beat it; only the bound over the
  longest reachable length keeps the search going.
  """
  toy = Toy(1)
  toy.mix[:] = 0
  toy.table[:] = 0
  toy.table[0, 0] = [-20, -0.3, -20, -1.5, -20]
  toy.table[1, 3] = [-20, 0, -2.2, -20, -20]
  toy.table[2:, 2] = [-20, -20, 0, -20, -20]
  return toy


@pytest.mark.parametrize('toy, alpha, beam_size', [
    (TOY, 0.0, 3), (TOY, 0.6, 3), (TOY, 3.0, 3), (late_bloomer(), 3.0, 2)])
def test_early_stopping_is_exact(toy, alpha, beam_size):
  seqs, scores = beam(toy, HASH0, alpha, beam_size, 8)
  for row, h in enumerate(HASH0):
    want_scores, want_seqs = numpy_beam(toy, int(h), alpha, beam_size, 8)
    np.testing.assert_allclose(scores[row], want_scores, atol=1e-4)
    np.testing.assert_array_equal(seqs[row], want_seqs)


def test_early_stopping_stops():
  calls = []

  def step(tokens, cache):
    jax.debug.callback(lambda: calls.append(1))
    logits = jnp.zeros((tokens.shape[0], VOCAB)).at[:, EOS].set(10.0)
    return logits, cache

  seqs, _ = jax.jit(functools.partial(
      generate.beam_search, tokens_to_logits=step, beam_size=2, alpha=0.0,
      eos_id=EOS, max_decode_len=50))({'rows': jnp.zeros(3)})
  jax.effects_barrier()
  # Step 1 fills the pool with [EOS] and [x, EOS]; nothing live beats them.
  assert len(calls) == 2
  np.testing.assert_array_equal(seqs[:, 0, :2], [[EOS, 0]] * 3)


def test_beam_scores_sequences_and_order():
  seqs, scores = map(np.asarray, beam(TOY, HASH0, 0.6, 4, 6))
  assert seqs.shape == (4, 4, 6) and scores.shape == (4, 4)
  assert np.all(np.diff(scores, axis=1) <= 0), 'best first'
  for row, h in enumerate(HASH0):
    assert scores[row, 0] <= exhaustive(TOY, int(h), 0.6, 6)[0] + 1e-4
    for seq, s in zip(seqs[row], scores[row]):
      assert s == pytest.approx(score(TOY, int(h), seq, 0.6), abs=1e-4)
      # EOS at most once, then padding; without it, truncated at max length.
      ends = np.flatnonzero(seq == EOS)
      assert ends.size <= 1
      if ends.size:
        assert not seq[ends[0] + 1:].any()
    assert len({tuple(seq) for seq in seqs[row]}) == 4, 'no duplicate beams'


def test_beam_needs_batch_size_without_row_leaves():
  def step(tokens, cache):
    return jnp.zeros((tokens.shape[0], VOCAB)).at[:, EOS].set(5.0), cache

  cache = {'index': jnp.array(0)}
  with pytest.raises(ValueError, match='batch_size'):
    generate.beam_search(cache, step, beam_size=2, alpha=0.6, eos_id=EOS,
                         max_decode_len=3)
  seqs, _ = generate.beam_search(cache, step, beam_size=2, alpha=0.6,
                                 eos_id=EOS, max_decode_len=3, batch_size=3)
  np.testing.assert_array_equal(seqs[:, 0], [[EOS, 0, 0]] * 3)


def test_top_k_filter_keeps_exactly_k():
  logits = jax.random.normal(jax.random.key(0), (6, 11))
  kept = np.asarray(generate.top_k_filter(logits, 3)) > generate.NEG_INF / 2
  assert np.all(kept.sum(-1) == 3)
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  assert np.all(np.take_along_axis(kept, top3, axis=-1))
  np.testing.assert_array_equal(generate.top_k_filter(logits, 0), logits)


@pytest.mark.parametrize('p', [0.0, 0.3, 0.75, 0.95])
def test_top_p_filter_keeps_the_nucleus(p):
  logits = np.asarray(jax.random.normal(jax.random.key(1), (6, 11))) * 2
  kept = np.asarray(generate.top_p_filter(logits, p)) > generate.NEG_INF / 2
  for row, keep in zip(logits, kept):
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    order = np.argsort(-probs)
    n = max(1, int(np.searchsorted(np.cumsum(probs[order]), p) + 1))
    n = 1 if p == 0 else n
    assert set(np.flatnonzero(keep)) == set(order[:n])


def test_sampling_distribution_after_filters():
  probs = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
  temperature, top_k, top_p = 0.7, 4, 0.8

  def step(tokens, cache):
    return jnp.broadcast_to(jnp.log(probs), (tokens.shape[0], VOCAB)), cache

  batch = 4000
  out = jax.jit(functools.partial(
      generate.temperature_sample, tokens_to_logits=step, eos_id=-1,
      temperature=temperature, top_k=top_k, top_p=top_p))(
          jnp.zeros((batch, 1), jnp.int32), {'rows': jnp.zeros(batch)},
          rng=jax.random.key(2))
  expected = probs ** (1 / temperature)
  expected[np.argsort(-expected)[top_k:]] = 0
  expected /= expected.sum()
  order = np.argsort(-expected)
  outside = np.cumsum(expected[order]) - expected[order] >= top_p
  expected[order[outside]] = 0
  expected /= expected.sum()
  frequency = np.bincount(np.asarray(out[:, 0]), minlength=VOCAB) / batch
  np.testing.assert_allclose(frequency, expected, atol=0.03)


def test_sampling_limits_are_greedy():
  empty, rng = jnp.zeros((4, 8), jnp.int32), jax.random.key(3)
  want = greedy(TOY, HASH0, 8)
  np.testing.assert_array_equal(sample(TOY, empty, HASH0, rng, top_k=1), want)
  np.testing.assert_array_equal(
      sample(TOY, empty, HASH0, rng, temperature=0.0), want)
  np.testing.assert_array_equal(sample(TOY, empty, HASH0, rng, top_p=1e-6),
                                want)
  # A traced temperature of 0 takes the same greedy path.
  traced = jax.jit(lambda t: generate.temperature_sample(
      empty, Toy.init_cache(HASH0), TOY, rng, eos_id=EOS, temperature=t))
  np.testing.assert_array_equal(traced(0.0), want)


def test_step_i_samples_with_fold_in_rng_i():
  logits = jnp.array([0.5, -1.0, 2.0, 0.0, 1.0])
  rng = jax.random.key(7)
  out = generate.temperature_sample(
      jnp.zeros((1, 6), jnp.int32), {'rows': jnp.zeros(1)},
      lambda tokens, cache: (logits[None], cache), rng, eos_id=-1,
      temperature=0.5)
  want = [jax.random.categorical(jax.random.fold_in(rng, i), logits / 0.5)
          for i in range(6)]
  np.testing.assert_array_equal(out[0], want)


def test_sampling_is_a_function_of_the_rng():
  empty, hash0 = jnp.zeros((8, 8), jnp.int32), np.arange(8) % HASH
  a = sample(TOY, empty, hash0, jax.random.key(4), eos_id=-1, temperature=2.0)
  b = sample(TOY, empty, hash0, jax.random.key(4), eos_id=-1, temperature=2.0)
  c = sample(TOY, empty, hash0, jax.random.key(5), eos_id=-1, temperature=2.0)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


def test_prompts_are_forced_through_the_cache_in_order():
  # Variable lengths; row 2's prompt contains EOS, which must not end it.
  prompt = np.array([[0, 0, 0], [3, 2, 0], [4, EOS, 2]], np.int32)
  hash0, rng = np.array([1, 2, 3]), jax.random.key(6)
  step = jax.jit(functools.partial(generate.sample_step, tokens_to_logits=TOY,
                                   eos_id=EOS, temperature=1.5))
  state = generate.init_sampling(prompt, Toy.init_cache(hash0), rng,
                                 max_decode_len=STEPS)
  while not generate.sampling_done(state):
    state = step(state)
  out = np.asarray(state.sequences)
  np.testing.assert_array_equal(
      out, sample(TOY, prompt, hash0, rng, temperature=1.5, max_len=STEPS))
  assert out.shape == (3, STEPS)
  np.testing.assert_array_equal(out[1:, :2], prompt[1:, :2])
  np.testing.assert_array_equal(out[2, :3], prompt[2])
  n = int(state.index)
  fed = np.asarray(state.cache['history'])[:, :n]
  np.testing.assert_array_equal(fed[:, 0], 0)
  np.testing.assert_array_equal(fed[:, 1:], out[:, :n - 1])
  lengths = [0, 2, 3]
  for row, length in enumerate(lengths):
    ends = np.flatnonzero(out[row, length:] == EOS)
    if ends.size:
      assert not out[row, length + ends[0] + 1:].any(), 'padding after EOS'
    else:
      assert n == STEPS
