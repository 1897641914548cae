"""train_step and eval_step: pure functions of (state, batch), jitted with shardings.

`forward(params, batch, rngs) -> (logits [b, l, v], targets [b, l])` is the
only task-specific piece (train/tasks.py): translation feeds inputs and
targets to the EncoderDecoder, language modelling feeds tokens to DecoderLM.
With `train.loss_chunk` an LM returns `objectives.Hidden` instead of the
logits, and the loss makes them a slice at a time.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from train import objectives, partitioning

# (params, batch, rngs) -> (logits or objectives.Hidden, targets)
Forward = Callable[[Any, dict, dict],
                   tuple[jax.Array | objectives.Hidden, jax.Array]]


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def make_train_step(forward: Forward, schedule: optax.Schedule, *,
                    label_smoothing: float = 0.0, z_loss: float = 0.0,
                    grad_accum_steps: int = 1):
  """Returns train_step(state, batch) -> (state, metrics).

  The loss is summed over tokens and divided once by the non-pad target
  tokens of the whole batch, so `grad_accum_steps` micro-batches give the
  same update as one large batch. Dropout uses fold_in(state.rng, step).
  """

  def loss_sums(params, batch, rng):
    outputs, targets = forward(params, batch, {'dropout': rng})
    sums = objectives.token_sums(
        outputs, targets, objectives.target_weights(targets),
        label_smoothing=label_smoothing, z_loss=z_loss)
    return sums['loss'], sums

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, batch, rng)
    else:
      n = grad_accum_steps
      # Micro-batch j takes rows j, j+n, j+2n, ...: every device keeps a
      # share of every micro-batch instead of idling through most of them.
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]),
                                 0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        mb = jax.tree_util.tree_map(
            lambda x: nn.with_logical_constraint(x, ('batch', 'length')), mb)
        (_, s), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return _tree_add(carry, (g, s)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      zero_sums = {k: jnp.zeros((), jnp.float32)
                   for k in ('loss', 'nll', 'correct', 'weight')}
      (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums),
                                      (jnp.arange(n), micro))
    denom = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    metrics = objectives.normalise(sums)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.apply_gradients(grads), metrics

  return train_step


def make_eval_step(forward: Forward):
  """Returns eval_step(params, batch) -> token sums (loss = plain cross-entropy)."""

  def eval_step(params, batch):
    outputs, targets = forward(params, batch, {})
    return objectives.token_sums(outputs, targets,
                                 objectives.target_weights(targets))

  return eval_step


# XLA:CPU hands dots to YNNPACK by default; for the float32 matmuls of a
# training step its Eigen path is faster (shakespeare_char:full step 15.5 s ->
# 11.5 s on 2 cores: batched attention matmuls run 2x faster). An empty
# fusion-type list turns YNNPACK fusion off for one compilation.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def compiler_options() -> dict[str, str]:
  """XLA options for the jitted steps: the CPU tuning above, where this
  jaxlib knows the option (probed once), else none."""
  if jax.default_backend() != 'cpu':
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS)(jnp.zeros(()))
  except Exception:  # noqa: BLE001 - an XLA without the option: run untuned
    return {}
  return dict(_CPU_OPTIONS)


def jit_train_step(train_step, state_shardings, mesh, rules):
  """jit with explicit shardings and the state donated (updated in place)."""
  batch = partitioning.batch_sharding(mesh)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch),
                   out_shardings=(state_shardings, partitioning.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=compiler_options())

  def run(state, batch_arrays):
    with mesh, nn.logical_axis_rules(rules):
      return jitted(state, batch_arrays)
  return run


class InFlight:
  """Lets the host dispatch at most `limit` steps ahead of the devices.

  JAX returns from a jitted call before the device has run it, so a loop
  that only reads results every `log_every` steps queues that many steps.
  On a CPU host split into several devices (`mesh.cpu_devices`, or the
  tests' simulated devices), jax 0.10.2 then deadlocks in a collective's
  rendezvous and aborts the process after its 40 s timeout: a toy
  data-parallel step on 2 devices with 32 steps queued, and
  `transflax train --config experiments/shakespeare_char.py:cpu
  --config.train.log_every=1000`. With `limit` steps queued, waiting for
  the oldest costs nothing: the devices still have `limit` steps to run.

    window = InFlight()
    for batch in batches:
      state, metrics = train_step(state, batch)
      window.push(metrics)
  """

  def __init__(self, limit: int = 8):
    if limit < 1:
      raise ValueError(f'limit must be >= 1, got {limit}')
    self.limit = limit
    self._queue = collections.deque()

  def push(self, outputs: Any) -> None:
    """Records a dispatched step's outputs; waits for the oldest beyond `limit`."""
    self._queue.append(outputs)
    while len(self._queue) > self.limit:
      jax.block_until_ready(self._queue.popleft())


def jit_eval_step(eval_step, params_shardings, mesh, rules):
  batch = partitioning.batch_sharding(mesh)
  jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch),
                   out_shardings=partitioning.replicated(mesh),
                   compiler_options=compiler_options())

  def run(params, batch_arrays):
    with mesh, nn.logical_axis_rules(rules):
      return jitted(params, batch_arrays)
  return run
