"""Sharded TrainState creation, the optimizer and learning-rate schedules.

The state is built abstractly first (`jax.eval_shape`), its logical partition
specs become NamedShardings through the rules table, and `init` is jitted with
those `out_shardings`: parameters are never materialised unsharded, so a
model larger than one device's memory initialises fine.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from data.errors import UserError
from train import partitioning


class TrainState(flax.struct.PyTreeNode):
  """step, params, optimizer state, and the run's base PRNG key.

  Dropout keys are `fold_in(rng, step)`, so a resumed run draws the same
  randomness as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def make_schedule(opt: Any, d_model: int, num_steps: int) -> optax.Schedule:
  """Learning rate per step from config `optimizer`.

  rsqrt (paper 5.3): lr = scale * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5),
    s = step + 1, with scale = optimizer.learning_rate (1.0 is the paper).
  cosine: linear warmup to learning_rate, cosine decay to
    learning_rate * min_lr_ratio at num_steps (decay_steps if set).
  constant: linear warmup, then flat.
  """
  name, lr, warmup = opt.schedule, opt.learning_rate, opt.warmup_steps
  if name == 'rsqrt':
    def rsqrt(step):
      s = jnp.asarray(step, jnp.float32) + 1.0
      return lr * d_model ** -0.5 * jnp.minimum(
          s ** -0.5, s * max(warmup, 1) ** -1.5)
    return rsqrt
  if name == 'cosine':
    decay_steps = opt.get('decay_steps') or num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=lr * opt.min_lr_ratio)
  if name == 'constant':
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
        [warmup])
  raise UserError(f'optimizer.schedule={name!r} is not one of rsqrt, cosine, '
                  f'constant')


def make_optimizer(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on biases, norms, gains."""
  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  parts = []
  if opt.grad_clip and opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def _state_init(init_params: Callable[[jax.Array], Any],
                tx: optax.GradientTransformation):
  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    params = init_params(params_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=dropout_rng, tx=tx)
  return init


def abstract_train_state(init_params, tx, seed: int, mesh, rules):
  """(ShapeDtypeStructs carrying shardings, shardings); allocates nothing.

  `init_params(rng)` returns the model's (logically boxed) params.
  """
  return abstract_params(_state_init(init_params, tx), seed, mesh, rules)


def create_train_state(init_params, tx, seed: int, mesh,
                       rules) -> tuple[TrainState, Any]:
  """Initialises a TrainState directly into its shardings over `mesh`."""
  _, shardings = abstract_train_state(init_params, tx, seed, mesh, rules)
  init = _state_init(init_params, tx)
  # This program runs once. On a CPU, building it without LLVM optimisation
  # (a threefry loop per parameter) saves compile time and costs less than
  # that at run time (docs/performance/cpu.md).
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  with mesh, nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings,
                    compiler_options=options)(jax.random.PRNGKey(seed))
  return state, shardings


def count_params(params) -> dict[str, int]:
  """Parameter count per top-level module, and 'total'."""
  params = nn.unbox(params)
  counts = {k: sum(int(x.size) for x in jax.tree_util.tree_leaves(v))
            for k, v in params.items()}
  counts['total'] = sum(counts.values())
  return counts


# -- frozen trees ----------------------------------------------------------------
#
# A reference policy or a reward model is read by the loss but never trained:
# sharded like the trainable tree, passed beside the TrainState, with no
# optimizer state and no gradient. A run writes each one once, at its start,
# to workdir/frozen/<name> (not into every checkpoint), and reads it from
# there when it resumes.

FROZEN_DIR = 'frozen'


def abstract_params(init_params, seed: int, mesh, rules):
  """(ShapeDtypeStructs with shardings, shardings) of `init_params(rng)`,
  whose result is logically boxed; allocates nothing."""
  boxed = jax.eval_shape(init_params, jax.random.PRNGKey(seed))
  shardings = partitioning.logical_to_sharding(
      nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(boxed), shardings)
  return abstract, shardings


def _frozen_path(workdir: str, name: str) -> str:
  return os.path.abspath(os.path.join(workdir, FROZEN_DIR, name))


def save_frozen(workdir: str, name: str, tree) -> None:
  """Writes a frozen tree once (collective over processes)."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(_frozen_path(workdir, name), tree, force=True)


def load_frozen(workdir: str, name: str, abstract):
  """The frozen tree `name` of a workdir, in `abstract`'s shardings."""
  path = _frozen_path(workdir, name)
  if not os.path.isdir(path):
    raise UserError(f'{path} not found: this workdir\'s frozen {name!r} tree '
                    f'is written when its run starts; restart the run from '
                    f'its train.init_from (move {workdir} away)')
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, abstract)
