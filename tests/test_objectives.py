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
  weights = objectives.target_weights(targets)
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
