"""The learner: a rollout's rewards -> advantages -> epochs of minibatch updates.

Two jitted programs per run, with explicit shardings over the mesh:

  prepare(reference, value_params, batch, scores, kl_coef)
      the reference's log-probs of the sampled tokens, the per-token KL,
      and the advantages: PPO's GAE over the KL-penalised token rewards and
      the value model's estimates (then whitened), or GRPO's group-normalised
      scores.
  update(policy, value, batch, key, kl_coef, ptx)
      rl.epochs passes over the batch in shuffled minibatches of
      rl.minibatch_size rows, all inside one `lax.scan` (no host round trip
      between optimizer steps): the clipped surrogate (plus GRPO's k3 KL to
      the reference, with the KL coefficient: rl.kl_coef or its adaptive
      value) for the policy and the
      clipped value loss for the value model, each with its own optimizer.
      PPO-ptx (InstructGPT eq. 2): with rl.ptx_coef > 0, each policy step
      also takes a next-token loss on its own minibatch of pretraining rows
      (`ptx`), weighted by rl.ptx_coef.

The policy's log-probs are recomputed exactly as the sampler drew: logits
plus the never-sampled mask, over rl.temperature (top-k and top-p off), from
a full forward pass of the rollout rows, so the first minibatch's importance
ratio is 1 up to float rounding. The old log-probs are the sampler's own;
there is no extra forward pass for them. Dropout is off (TRL's default).
Shape legend: b rows, p prompt width, r response length, v vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from model import DecoderLM
from train import objectives, partitioning, sampling
from train import step as step_lib
from train.objectives import Mean
from train.rl import advantages as adv_lib
from train.rl import losses

ROLLOUT_KEYS = ('tokens', 'segments', 'positions', 'mask', 'logprobs')


def _rows(x):
  return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


class Learner:
  """prepare and update for one run (`run.task` is a train/rl/policy task)."""

  def __init__(self, run, value=None):
    self.run, self.value = run, value
    task, c = run.task, run.config.rl
    self.c, self.algorithm = c, task.algorithm
    self.width = c.max_prompt_length
    self.group = task.group_size()
    self.policy = DecoderLM(task.model_config.replace(
        deterministic=True, dropout_rate=0.0, attention_dropout_rate=0.0))
    self.never = task.never()
    self.vocab = task.model_config.vocab_size
    self._prepare = self._update = None

  # -- per-token quantities -----------------------------------------------------
  def scores(self, params, batch):
    """[b, r, v] the sampling distribution's logits at each response token
    and [b, r] the sampled tokens' log-probs under it (0 off the mask)."""
    p = self.width
    hidden = self.policy.apply({'params': params}, batch['tokens'],
                               batch['segments'], batch['positions'],
                               return_hidden=True)
    logits = self.policy.apply({'params': params}, hidden[:, p - 1:-1],
                               method=DecoderLM.logits)
    logits = logits.astype(jnp.float32) + sampling.logits_mask(self.never,
                                                               self.vocab)
    logits = logits / self.c.temperature
    logp = objectives.token_logprobs(logits, batch['tokens'][:, p:])
    # The fill after a response's end may be a never-sampled id (log-prob
    # -1e10): 0 there keeps every ratio and KL finite.
    return logits, jnp.where(batch['mask'] > 0, logp, 0.0)

  def values(self, params, batch):
    """[b, r] the value of the state each response token was chosen in."""
    p = self.width
    v = self.value.module.apply({'params': params}, batch['tokens'],
                                batch['segments'], batch['positions'])
    return v[:, p - 1:-1] * batch['mask']

  # -- prepare ------------------------------------------------------------------
  def _prepare_fn(self, reference, value_params, batch, scores, kl_coef):
    c, mask = self.c, batch['mask'].astype(jnp.float32)
    _, ref = self.scores(reference, batch)
    ref = ref * mask
    kl = adv_lib.kl_estimate(batch['logprobs'], ref, c.kl_estimator) * mask
    kl_seq = jnp.sum(kl, -1)
    out = {'ref_logprobs': ref}
    metrics = {'kl': jnp.mean(kl_seq),
               'kl_k3': jnp.mean(jnp.sum(adv_lib.kl_estimate(
                   batch['logprobs'], ref, 'k3') * mask, -1)),
               'response_length': jnp.mean(jnp.sum(mask, -1)),
               'ended': jnp.mean(batch['ended'].astype(jnp.float32))}
    if self.algorithm == 'ppo':
      values = self.values(value_params, batch)
      rewards = adv_lib.token_rewards(scores, kl, mask, kl_coef)
      adv, returns = adv_lib.gae(rewards, values, mask, gamma=c.gamma,
                                 lam=c.lam)
      residual = jnp.where(mask > 0, returns - values, 0.0)
      var_ret = adv_lib.masked_mean(jnp.square(
          returns - adv_lib.masked_mean(returns, mask)), mask)
      var_res = adv_lib.masked_mean(jnp.square(
          residual - adv_lib.masked_mean(residual, mask)), mask)
      metrics.update(
          value_mean=adv_lib.masked_mean(values, mask),
          returns_mean=adv_lib.masked_mean(returns, mask),
          explained_variance=1.0 - var_res / jnp.maximum(var_ret, 1e-8),
          non_score_reward=jnp.mean(-kl_coef * kl_seq))
      out.update(old_values=values, returns=returns)
    else:
      adv = adv_lib.group_advantages(scores, self.group,
                                     scale=c.scale_rewards)[:, None] * mask
    metrics.update(advantage_mean=adv_lib.masked_mean(adv, mask),
                   advantage_std=jnp.sqrt(adv_lib.masked_mean(jnp.square(
                       adv - adv_lib.masked_mean(adv, mask)), mask)))
    if self.algorithm == 'ppo' and c.whiten_advantages:
      adv = adv_lib.whiten(adv, mask)
    out['advantages'] = adv
    return out, metrics

  def prepare(self, reference, value_params, batch, scores, kl_coef):
    if self._prepare is None:
      run = self.run
      rows, whole = (partitioning.batch_sharding(run.mesh),
                     partitioning.replicated(run.mesh))
      self._prepare = step_lib.Jitted(jax.jit(
          self._prepare_fn,
          in_shardings=(run.frozen_shardings['reference'],
                        self.value.shardings.params if self.value else None,
                        rows, rows, whole),
          out_shardings=(rows, whole),
          compiler_options=step_lib.compiler_options()), run.mesh, run.rules)
    return self._prepare(reference, value_params, batch, scores, kl_coef)

  # -- update -------------------------------------------------------------------
  def _policy_loss(self, params, mb, kl_coef, ptx=None):
    c, mask = self.c, mb['mask']
    logits, logp = self.scores(params, mb)
    per_seq = c.loss_norm == 'sequence'
    loss_sum, weight, m = losses.clipped_policy_loss(
        logp, mb['logprobs'], mb['advantages'], mask, clip=c.clip,
        per_sequence=per_seq)
    tokens = jnp.sum(mask.astype(jnp.float32))
    if self.algorithm == 'grpo' and c.kl_coef:
      kl = adv_lib.kl_estimate(logp, mb['ref_logprobs'], 'k3')
      kl_sum, _ = losses._reduce(kl, mask, per_seq)
      loss_sum = loss_sum + kl_coef * kl_sum
      m['kl'] = Mean(jnp.sum(kl * mask), tokens)
    m['entropy'] = Mean(jnp.sum(jax.lax.stop_gradient(
        losses.entropy(logits)) * mask), tokens)
    m['policy_loss'] = Mean(loss_sum, weight)
    loss = loss_sum / jnp.maximum(weight, 1.0)
    if ptx is not None:
      logits = self.policy.apply({'params': params}, ptx['inputs'], None,
                                 ptx['inputs_position'])
      ptx_sum, ptx_weight, _ = objectives.token_loss(
          logits, ptx['targets'], ptx['loss_mask'])
      ptx_loss = ptx_sum / jnp.maximum(ptx_weight, 1.0)
      m['ptx_loss'] = Mean(ptx_loss, jnp.float32(1.0))
      loss = loss + c.ptx_coef * ptx_loss
    return loss, m

  def _value_loss(self, params, mb):
    loss_sum, weight, m = losses.clipped_value_loss(
        self.values(params, mb), mb['old_values'], mb['returns'], mb['mask'],
        clip=self.c.value_clip)
    m['value_loss'] = Mean(loss_sum, weight)
    return loss_sum / jnp.maximum(weight, 1.0), m

  def _update_fn(self, policy, value, batch, key, kl_coef, ptx):
    c = self.c
    b = batch['mask'].shape[0]
    per_epoch = b // c.minibatch_size
    steps = c.epochs * per_epoch
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e),
                                                    b) for e in range(c.epochs)])
    order = order.reshape(steps, c.minibatch_size)
    if ptx is not None:  # [steps * rows, l] -> one [rows, l] batch per step
      ptx = jax.tree.map(lambda x: x.reshape(steps, -1, *x.shape[1:]), ptx)

    def body(carry, xs):
      policy, value = carry
      idx, ptx_mb = xs
      mb = jax.tree.map(lambda x: _rows(x[idx]), batch)
      if ptx_mb is not None:
        ptx_mb = jax.tree.map(_rows, ptx_mb)
      (_, m), grads = jax.value_and_grad(self._policy_loss, has_aux=True)(
          policy.params, mb, kl_coef, ptx_mb)
      m = objectives.normalise(m, jnp.float32(1.0))
      m['policy_grad_norm'] = optax.global_norm(grads)
      policy = policy.apply_gradients(grads)
      if value is not None:
        (_, vm), vgrads = jax.value_and_grad(self._value_loss, has_aux=True)(
            value.params, mb)
        m.update(objectives.normalise(vm, jnp.float32(1.0)))
        m['value_grad_norm'] = optax.global_norm(vgrads)
        value = value.apply_gradients(vgrads)
      return (policy, value), m

    (policy, value), metrics = jax.lax.scan(body, (policy, value),
                                            (order, ptx))
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    # The first minibatch of the first epoch runs on the sampling policy:
    # its ratio is 1 and nothing is clipped (a check of the log-probs).
    out['first_clip_fraction'] = metrics['clip_fraction'][0]
    out['first_ratio'] = metrics['ratio'][0]
    return policy, value, out

  def update(self, policy, value, batch, key, kl_coef, ptx=None):
    if self._update is None:
      run = self.run
      rows, whole = (partitioning.batch_sharding(run.mesh),
                     partitioning.replicated(run.mesh))
      vshard = self.value.shardings if self.value else None
      self._update = step_lib.Jitted(jax.jit(
          self._update_fn,
          in_shardings=(run.shardings, vshard, rows, whole, whole,
                        rows if ptx is not None else None),
          out_shardings=(run.shardings, vshard, whole), donate_argnums=(0, 1),
          compiler_options=step_lib.compiler_options()), run.mesh, run.rules)
    return self._update(policy, value, batch, key, kl_coef, ptx)
