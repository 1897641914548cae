"""train/objectives.py: the chunked cross-entropy equals the whole-logits one,
in value and gradient, and keeps only a slice of the logits in memory."""

import jax
import jax.numpy as jnp
import numpy as np

from train import objectives


def _problem(b=4, l=32, d=16, v=50, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  states = jax.random.normal(k[0], (b, l, d))
  embedding = jax.random.normal(k[1], (v, d)) * 0.3
  targets = jax.random.randint(k[2], (b, l), 1, v)
  targets = targets.at[1, 20:].set(0)  # padding: weight 0
  return states, embedding, targets


def _sums(states, embedding, targets, chunk, **kwargs):
  weights = (targets > 0).astype(jnp.float32)  # the problem's padding
  if not chunk:
    return objectives.token_sums(states @ embedding.T, targets, weights,
                                 **kwargs)
  hidden = objectives.Hidden(states, lambda h: h @ embedding.T, chunk)
  return objectives.token_sums(hidden, targets, weights, **kwargs)


def test_chunked_loss_equals_the_whole_logits_loss():
  states, embedding, targets = _problem()
  kwargs = {'label_smoothing': 0.1, 'z_loss': 1e-3}
  whole = _sums(states, embedding, targets, 0, **kwargs)
  assert float(whole['weight']) == 4 * 32 - 12
  for chunk in (1, 8, 32):
    chunked = _sums(states, embedding, targets, chunk, **kwargs)
    for key in whole:
      np.testing.assert_allclose(chunked[key], whole[key], rtol=2e-6,
                                 err_msg=f'{key}, chunk {chunk}')

  def loss(chunk):
    return lambda s, e: _sums(s, e, targets, chunk, **kwargs)['loss']
  g_whole = jax.grad(loss(0), argnums=(0, 1))(states, embedding)
  g_chunk = jax.grad(loss(8), argnums=(0, 1))(states, embedding)
  for a, b in zip(g_chunk, g_whole):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_keeps_one_slice_of_logits_in_memory():
  """GPT-2's vocabulary, 8 rows of 512: the float32 logits are 824 MB, and
  the compiled gradient's scratch memory holds about 4 copies of them (3.3
  GB on XLA:CPU); with chunks of 64 positions, about 4 slices (0.41 GB)."""
  b, l, d, v = 8, 512, 64, 50304
  states = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
  embedding = jax.ShapeDtypeStruct((v, d), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, l), jnp.int32)

  def temp_bytes(chunk):
    grad = jax.grad(lambda s, e, t: _sums(s, e, t, chunk)['loss'],
                    argnums=(0, 1))
    compiled = jax.jit(grad).lower(states, embedding, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = b * l * v * 4
  whole, chunked = temp_bytes(0), temp_bytes(64)
  assert whole >= logits_bytes
  assert chunked < whole / 4, (whole, chunked)


def _reference_sums(logits, targets, weights, label_smoothing, z_loss):
  """The losses by their definitions, in float64 numpy."""
  x = np.asarray(logits, np.float64)
  v = x.shape[-1]
  log_z = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
  log_p = x - log_z[..., None]
  onehot = np.arange(v) == np.asarray(targets)[..., None]
  q = np.where(onehot, 1.0 - label_smoothing, label_smoothing / (v - 1))
  entropy = -np.sum(np.where(q > 0, q * np.log(np.maximum(q, 1e-300)), 0), -1)
  loss = -np.sum(q * log_p, -1) - entropy + z_loss * log_z ** 2
  nll = -np.sum(np.where(onehot, log_p, 0.0), -1)
  correct = np.argmax(x, -1) == np.asarray(targets)
  w = np.asarray(weights, np.float64)
  return {'loss': np.sum(loss * w), 'nll': np.sum(nll * w),
          'correct': np.sum(correct * w), 'weight': np.sum(w)}


def test_cross_entropy_sums_match_their_definitions():
  # Values against float64 numpy; gradients against autodiff of the plain
  # log-softmax form (the custom VJP must give the same).
  states, embedding, targets = _problem(v=37)
  logits = states @ embedding.T
  # Make the label the largest logit in some rows: `correct` must count them.
  logits = logits.at[0, :10].add(
      jax.nn.one_hot(targets[0, :10], 37) * 10.0)
  weights = (targets > 0).astype(jnp.float32)
  for ls, z in ((0.0, 0.0), (0.1, 1e-3)):
    got = objectives.cross_entropy_sums(logits, targets, weights,
                                        label_smoothing=ls, z_loss=z)
    want = _reference_sums(logits, targets, weights, ls, z)
    assert float(want['correct']) >= 10
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5,
                                 err_msg=f'{key}, smoothing {ls}')

    def plain(logits):
      log_p = jax.nn.log_softmax(logits)
      q = jnp.where(jax.nn.one_hot(targets, 37) > 0, 1.0 - ls, ls / 36)
      log_z = jax.nn.logsumexp(logits, -1)
      return jnp.sum((-jnp.sum(q * log_p, -1) + z * log_z ** 2) * weights)

    def ours(logits):
      return objectives.cross_entropy_sums(
          logits, targets, weights, label_smoothing=ls, z_loss=z)['loss']

    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(plain)(logits),
                               rtol=1e-5, atol=1e-6)
    # bf16 logits (model.float32_logits=False): a bf16 cotangent, same math.
    g16 = jax.grad(ours)(logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    g32 = jax.grad(plain)(logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert (np.linalg.norm(np.asarray(g16, np.float32) - g32)
            / np.linalg.norm(g32)) < 1e-2


def test_accuracy_ties_go_to_the_lowest_id_as_argmax():
  # bf16 logits tie often at the row maximum; a tie must not count as a hit
  # unless the label is the tie's lowest id (argmax's choice).
  logits = jnp.zeros((1, 4, 6), jnp.bfloat16)
  logits = logits.at[0, :, 2].set(1.0).at[0, :, 4].set(1.0)  # tie: ids 2, 4
  targets = jnp.asarray([[2, 4, 1, 5]])
  weights = jnp.asarray([[1.0, 10.0, 100.0, 1000.0]])  # which rows hit
  sums = objectives.cross_entropy_sums(logits, targets, weights)
  assert float(sums['correct']) == 1.0
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 11)),
                  jnp.float32)
  m, i = objectives.max_and_argmax(x)
  np.testing.assert_array_equal(m, jnp.max(x, -1))
  np.testing.assert_array_equal(i, jnp.argmax(x, -1))


def test_softmax_stats_gradient_reads_negative_ids_like_the_forward():
  # take_along_axis reads id -1 as the last one; the backward's one-hot
  # must put the label's gradient there too.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9)), jnp.float32)
  targets = jnp.asarray([-1, 3])

  def label_sum(x):
    row_max = jax.lax.stop_gradient(jnp.max(x, -1))
    return jnp.sum(objectives.softmax_stats(x, targets, row_max)[1])

  want = jax.grad(lambda x: jnp.sum(
      jnp.take_along_axis(x, targets[:, None], -1)))(x)
  np.testing.assert_allclose(jax.grad(label_sum)(x), want)
  assert float(want[0, 8]) == 1.0
