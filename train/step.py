"""The generic train_step and eval_step around a task's loss, jitted with shardings.

A task (train/tasks) owns its objective:

  loss(params, frozen, batch, rng) -> (loss_sum, weight, metric_sums)

`params` is the trainable tree, `frozen` a dict of parameter trees that are
read but never trained (a DPO reference, a reward model), `rng` the dropout
key (None: evaluation, deterministic). The step differentiates `loss_sum`
with respect to `params` only and divides the gradient once by the whole
batch's `weight`, so `grad_accum_steps` micro-batches make the same update
as one large batch; the metric sums are normalised the same way
(`objectives.normalise`).
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

# (params, frozen, batch, rng or None) -> (loss_sum, weight, metric_sums)
Loss = Callable[[Any, dict, dict, Any], tuple[jax.Array, jax.Array, dict]]


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def _rows_constraint(x):
  """Keeps a micro-batch sharded over its rows: [b, ...] -> ('batch', None...)."""
  return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


def make_train_step(loss_fn: Loss, schedule: optax.Schedule, *,
                    grad_accum_steps: int = 1):
  """Returns train_step(state, frozen, batch) -> (state, metrics).

  Dropout uses fold_in(state.rng, step) (micro-batch i: fold_in of that, i).
  Metrics: `loss` (loss_sum / weight), the task's normalised metrics,
  `grad_norm` and `learning_rate`.
  """

  def objective(params, frozen, batch, rng):
    loss_sum, weight, sums = loss_fn(params, frozen, batch, rng)
    return loss_sum, (weight, sums)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss_sum, (weight, sums)), grads = grad_fn(state.params, frozen, batch,
                                                  rng)
    else:
      n = grad_accum_steps
      # Micro-batch j takes rows j, j+n, j+2n, ...: every device keeps a
      # share of every micro-batch instead of idling through most of them.
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]),
                                 0, 1), batch)

      def body(carry, xs):
        i, mb = xs
        mb = jax.tree_util.tree_map(_rows_constraint, mb)
        (l, (w, s)), g = grad_fn(state.params, frozen, mb,
                                 jax.random.fold_in(rng, i))
        return _tree_add(carry, (g, l, w, s)), None

      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      loss_shape, (weight_shape, sums_shape) = jax.eval_shape(
          objective, state.params, frozen, first, rng)
      zeros = jax.tree_util.tree_map(
          lambda s: jnp.zeros(s.shape, s.dtype),
          (state.params, loss_shape, weight_shape, sums_shape))
      (grads, loss_sum, weight, sums), _ = jax.lax.scan(
          body, zeros, (jnp.arange(n), micro))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    metrics = {'loss': loss_sum / denom, **objectives.normalise(sums, weight)}
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['learning_rate'] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.apply_gradients(grads), metrics

  return train_step


def make_eval_step(eval_fn: Loss):
  """Returns eval_step(params, frozen, batch) -> (loss_sum, weight, sums):
  the task's evaluation sums, deterministic (rng None), to be added over
  batches and normalised once (`normalise_eval`)."""

  def eval_step(params, frozen, batch):
    return eval_fn(params, frozen, batch, None)

  return eval_step


def normalise_eval(totals) -> dict[str, float]:
  """Summed eval_step outputs -> {'loss', metrics...} as Python floats."""
  loss_sum, weight, sums = totals
  out = {'loss': loss_sum / jnp.maximum(weight, 1.0),
         **objectives.normalise(sums, weight)}
  return {k: float(v.value if isinstance(v, objectives.Total) else v)
          for k, v in out.items()}


# XLA:CPU hands dots to YNNPACK by default; for the float32 matmuls of a
# training step its Eigen path is faster, above all for the batched attention
# matmuls (the step times: docs/performance/cpu.md). An empty
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


class Jitted:
  """A jitted step called under the mesh and the logical-axis rules.

  `jitted` is the `jax.jit` object (its `_cache_size()` counts compiled
  programs: the tests check a run compiles its eval step once).
  """

  def __init__(self, jitted, mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, *args):
    with self.mesh, nn.logical_axis_rules(self.rules):
      return self.jitted(*args)


def jit_train_step(train_step, state_shardings, frozen_shardings, mesh, rules
                   ) -> Jitted:
  """jit with explicit shardings and the state donated (updated in place);
  the frozen trees are read, never donated."""
  batch = partitioning.batch_sharding(mesh)
  jitted = jax.jit(train_step,
                   in_shardings=(state_shardings, frozen_shardings, batch),
                   out_shardings=(state_shardings, partitioning.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=compiler_options())
  return Jitted(jitted, mesh, rules)


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


def jit_eval_step(eval_step, params_shardings, frozen_shardings, mesh,
                  rules) -> Jitted:
  batch = partitioning.batch_sharding(mesh)
  jitted = jax.jit(eval_step,
                   in_shardings=(params_shardings, frozen_shardings, batch),
                   out_shardings=partitioning.replicated(mesh),
                   compiler_options=compiler_options())
  return Jitted(jitted, mesh, rules)
