"""The RL loop (tasks ppo and grpo): read top to bottom.

  train(config, workdir)

1. `train.loop.Run` builds the mesh, the policy task (tokenizer, chat
   template, prompts) and the policy's sharded TrainState, and writes the
   frozen reference (the init_from SFT parameters) into the workdir once.
2. The reward (train/rl/rewards.py: a frozen reward model, also written
   once, or a Python function) and, for PPO, the value model: a ScalarLM
   with its own optimizer, initialised from the reward model (InstructGPT)
   or from the policy (`rl.value_init`).
3. Per iteration: rollouts of a batch of prompts (train/rl/rollout.py) ->
   scores -> `Learner.prepare` (reference log-probs, KL, advantages) ->
   `Learner.update` (epochs of minibatch updates) -> metrics; the adaptive
   KL coefficient follows the measured KL. Every train.eval_every
   iterations (and before the first): rollouts on held-out prompts,
   `eval/reward_mean` and `eval/kl`.
4. A checkpoint (every train.checkpoint_every iterations, at the end, on
   SIGTERM) holds the policy's TrainState (its `params` where every run's
   are, so `generate`, `export` and `init_from` read it like any run's),
   the value model's TrainState, the KL coefficient and the prompt
   iterator's position; iteration i's randomness is fold_in(seed key, i),
   so a resumed run repeats the uninterrupted one bit for bit. A non-finite
   score or loss stops the run before anything is saved.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data.errors import UserError
from model import ScalarLM
from train import checkpoint, loop as loop_lib, metrics as metrics_lib
from train import partitioning, sampling, state as state_lib
from train.rl import advantages, rollout as rollout_lib, rewards as rewards_lib
from train.rl.learner import Learner

VALUE_INITS = ('reward', 'policy')


class PromptIterator:
  """Prompts in a seeded shuffled order, epoch after epoch; its state (epoch,
  index) is checkpointed like a data iterator's."""

  def __init__(self, count: int, seed: int):
    self.count, self.seed, self.epoch, self.index = count, seed, 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.count)

  def take(self, n: int) -> list[int]:
    out = []
    while len(out) < n:
      order = self._order(self.epoch)
      k = min(n - len(out), self.count - self.index)
      out += order[self.index:self.index + k].tolist()
      self.index += k
      if self.index == self.count:
        self.epoch, self.index = self.epoch + 1, 0
    return out

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'index': self.index}

  def set_state(self, state: dict) -> None:
    self.epoch, self.index = int(state['epoch']), int(state['index'])


class ValueModel:
  """PPO's critic: a ScalarLM (the reward model's shape, or the policy's)
  with its own AdamW (rl.value_learning_rate, 0: the policy's)."""

  def __init__(self, run, reward):
    config, r = run.config, run.config.rl
    if r.value_init not in VALUE_INITS:
      raise UserError(f'rl.value_init={r.value_init!r} is not one of '
                      f'{", ".join(VALUE_INITS)}')
    if r.value_init == 'reward' and not isinstance(reward,
                                                   rewards_lib.ModelReward):
      raise UserError('rl.value_init=reward needs rl.reward_model (a reward '
                      'function has no network to start from); set '
                      'rl.value_init=policy')
    cfg = (reward.model_config if r.value_init == 'reward'
           else run.model_config).replace(deterministic=True, dropout_rate=0.0,
                                          attention_dropout_rate=0.0)
    length = r.max_prompt_length + r.max_response_length
    if cfg.positions == 'learned' and length > cfg.max_len:
      raise UserError(f'the value model (rl.value_init={r.value_init}) has '
                      f'{cfg.max_len} learned positions, fewer than '
                      f'rl.max_prompt_length + rl.max_response_length = '
                      f'{length}; lower them')
    self.module = ScalarLM(cfg)
    opt = ml_collections.ConfigDict(config.optimizer.to_dict())
    opt.learning_rate = r.value_learning_rate or opt.learning_rate
    steps = run.task.optimizer_steps(config.train.num_steps)
    self.tx = state_lib.make_optimizer(
        opt, state_lib.make_schedule(opt, cfg.d_model, steps))
    self.run = run
    self.abstract_state, self.shardings = state_lib.abstract_train_state(
        self.init_params, self.tx, config.train.seed + 1, run.mesh, run.rules)

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module.init(rng, dummy, dummy, dummy)['params']

  def init(self, start_from):
    """A fresh TrainState whose params are copied from `start_from` (the
    reward model's, or the policy's body, the head then fresh)."""
    run = self.run
    state, _ = state_lib.create_train_state(
        self.init_params, self.tx, run.config.train.seed + 1, run.mesh,
        run.rules)
    params = dict(state.params)
    for name, tree in start_from.items():
      if name in params and jax.tree.map(jnp.shape, tree) == jax.tree.map(
          jnp.shape, params[name]):
        params[name] = jax.tree.map(
            lambda x, s: jax.device_put(jnp.copy(x), s), tree,
            self.shardings.params[name])
    # Adam's moments start at zero whatever the params: the jitted init's
    # optimizer state stands (sharded as the update step expects).
    return state.replace(params=params)


def _policy_tree(state) -> dict:
  """A policy TrainState as the checkpoint's top-level fields."""
  return {'step': state.step, 'params': state.params,
          'opt_state': state.opt_state, 'rng': state.rng}


def _abstract(run, value) -> dict:
  whole = partitioning.replicated(run.mesh)
  tree = _policy_tree(run.abstract_state)
  tree['kl_coef'] = jax.ShapeDtypeStruct((), jnp.float32, sharding=whole)
  if value is not None:
    tree['value'] = value.abstract_state
  return tree


def _restore_tree(run, tree):
  """(policy TrainState, value TrainState or None, kl_coef) of a checkpoint."""
  policy = run.abstract_state.replace(
      step=tree['step'], params=tree['params'], opt_state=tree['opt_state'],
      rng=tree['rng'])
  return policy, tree.get('value'), tree['kl_coef']


def _state_tree(policy, value, kl_coef) -> dict:
  tree = _policy_tree(policy)
  tree['kl_coef'] = kl_coef
  if value is not None:
    tree['value'] = value
  return tree


def ptx_dataset(run):
  """PPO-ptx's pretraining rows (rl.ptx_corpus through the `lm` task's
  pipeline, with the policy's tokenizer): each item holds one policy
  step's minibatch of rl.ptx_length-token rows for every step of an
  iteration; None when rl.ptx_coef is 0."""
  config, r = run.config, run.config.rl
  if not r.ptx_coef:
    return None
  if not r.ptx_corpus:
    raise UserError('rl.ptx_coef > 0 needs rl.ptx_corpus (chitchat, '
                    'tinyshakespeare or text with rl.ptx_files)')
  from train import tasks  # the lm task (train.tasks imports this package)
  c = ml_collections.ConfigDict(config.to_dict())
  c.task, c.data.corpus, c.data.seq_len = 'lm', r.ptx_corpus, r.ptx_length
  c.data.files.train = r.ptx_files
  task = tasks.make_task(c, run.workdir, source=run.source)
  per_step = run.local_batch_size(r.minibatch_size, 'rl.minibatch_size')
  steps = run.task.optimizer_steps(1)
  return task.train_dataset(per_step * steps, jax.process_index(),
                            jax.process_count())


class NonFinite(UserError):
  """A score or loss became NaN/inf; the last good checkpoint is kept."""


def train(config, workdir: str, *, devices: Sequence[jax.Device] | None = None
          ) -> dict[str, Any]:
  """Runs RL iterations up to train.num_steps (resuming if possible);
  returns the last metrics."""
  run = loop_lib.Run(config, workdir, devices=devices)
  try:
    return _train(run, config, workdir)
  finally:
    run.ckpt.wait()
    run.ckpt.close()


def _train(run, config, workdir):
  t, r = config.train, config.rl
  task = run.task
  run.local_batch_size(t.batch_size, 'train.batch_size')
  if t.eval_every:
    run.local_batch_size(t.eval_batch_size, 'train.eval_batch_size')
  reward = rewards_lib.make(config, run)
  value = ValueModel(run, reward) if task.algorithm == 'ppo' else None
  run.check_workdir()
  restored = run.ckpt.restore(_abstract(run, value))
  fresh = restored is None
  if fresh:
    it, data_state = 0, None
    _, policy, _ = run.restore_or_init()
    kl_coef = jax.device_put(jnp.float32(r.kl_coef),
                             partitioning.replicated(run.mesh))
  else:
    it, tree, data_state, _ = restored
    policy, value_state, kl_coef = _restore_tree(run, tree)
    logging.info('restored iteration %d from %s', it, run.ckpt.directory)
  reward_params = (reward.load(fresh) if isinstance(
      reward, rewards_lib.ModelReward) else None)
  if value is not None and fresh:
    value_state = value.init(reward_params if r.value_init == 'reward'
                             else policy.params)
  elif value is None:
    value_state = None
  loop_lib.write_config(config, workdir, run.model_config)
  reference = run.frozen['reference']
  learner = Learner(run, value)
  chief = jax.process_index() == 0
  if chief:
    print(f'{task.name}: policy {run.num_params:,} parameters; mesh '
          f'{dict(run.mesh.shape)}; starting at iteration {it}', flush=True)

  train_prompts = task.prompts(config.data.train_split)
  eval_prompts = []
  if t.eval_every:  # the split's first prompts (repeated if it has fewer)
    held_out = task.prompts(config.data.eval_split)
    eval_prompts = [held_out[i % len(held_out)]
                    for i in range(t.eval_batch_size)]
  prompts = PromptIterator(len(train_prompts), t.seed)
  ptx = ptx_dataset(run)
  ptx_iter = iter(ptx) if ptx is not None else None
  if data_state is not None:
    prompts.set_state(data_state['prompts'])
    if ptx_iter is not None:
      ptx_iter.set_state(data_state['ptx'])

  def data_state_now():
    return {'prompts': prompts.get_state(),
            'ptx': ptx_iter.get_state() if ptx_iter is not None else None}
  group = task.group_size()
  base_key = jax.random.PRNGKey(t.seed)
  # Every evaluation samples with one key (iterations use the others).
  eval_key = jax.random.fold_in(base_key, 2**32 - 1)
  kl_ctl = advantages.KLController(float(kl_coef), r.kl_target or None,
                                   r.kl_horizon)
  writer = metrics_lib.MetricWriter(workdir, total_steps=t.num_steps,
                                    is_chief=chief)
  sample_kwargs = dict(width=r.max_prompt_length, length=r.max_response_length,
                       temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
  last_eval: dict[str, float] = {}
  evaluated_at = None
  last_good = run.ckpt.latest_step()
  out: dict[str, float] = {}

  def score(chosen, roll, what):
    responses, ended = rollout_lib.responses(roll, r.max_prompt_length,
                                             task.stop_id())
    scores = reward([p.messages for p in chosen], responses, ended)
    scores = scores - r.missing_eos_penalty * (~ended)
    if not np.all(np.isfinite(scores)):
      bad = int(np.flatnonzero(~np.isfinite(scores))[0])
      raise NonFinite(f'{what}: a non-finite reward ({scores[bad]}) for '
                      f'response {bad}; {_kept(last_good, run)}')
    return scores, responses, ended

  def evaluate(params, it):
    roll = rollout_lib.sample(task, params, run.mesh,
                              [p.ids for p in eval_prompts],
                              eval_key, **sample_kwargs)
    scores, _, _ = score(eval_prompts, roll, 'evaluation')
    batch = _batch(roll)
    _, m = learner.prepare(reference, value_state.params if value_state
                           else None, batch, _rows(run, scores), kl_coef)
    m = jax.device_get(m)
    return {'eval/reward_mean': float(np.mean(scores)),
            'eval/kl': float(m['kl']),
            'eval/response_length': float(m['response_length'])}

  def save(it, policy, value_state, kl_coef):
    run.ckpt.save(it, _state_tree(policy, value_state, kl_coef),
                  data_state=data_state_now(), meta=run.meta,
                  metrics=last_eval if evaluated_at == it else None)
    return it

  if t.eval_every and fresh:
    last_eval = evaluate(policy.params, 0)
    evaluated_at = 0
    writer.write(0, last_eval)
  with checkpoint.PreemptionGuard() as guard:
    while it < t.num_steps:
      key = jax.random.fold_in(base_key, it)
      chosen = [train_prompts[i] for i in prompts.take(t.batch_size // group)
                for _ in range(group)]
      start = time.perf_counter()
      roll = rollout_lib.sample(task, policy.params, run.mesh,
                                [p.ids for p in chosen],
                                jax.random.fold_in(key, 0), **sample_kwargs)
      scores, responses, ended = score(chosen, roll, f'iteration {it + 1}')
      rollout_time = time.perf_counter() - start
      batch = _batch(roll)
      extra, pm = learner.prepare(
          reference, value_state.params if value_state else None, batch,
          _rows(run, scores), kl_coef)
      batch.update(extra)
      ptx_batch = (run.global_batch(next(ptx_iter)) if ptx_iter is not None
                   else None)
      policy, value_state, um = learner.update(policy, value_state, batch,
                                               jax.random.fold_in(key, 1),
                                               kl_coef, ptx_batch)
      pm, um = jax.device_get((pm, um))
      update_time = time.perf_counter() - start - rollout_time
      it += 1
      bad = [k for k in ('policy_loss', 'value_loss')
             if k in um and not np.isfinite(um[k])]
      if bad:
        raise NonFinite(f'iteration {it}: non-finite {bad[0]} ({um[bad[0]]}); '
                        f'{_kept(last_good, run)}. Lower '
                        f'optimizer.learning_rate and resume.')
      kl_ctl.update(float(pm['kl']), t.batch_size)
      kl_coef = jax.device_put(jnp.float32(kl_ctl.value),
                               partitioning.replicated(run.mesh))
      tokens = float(np.sum([len(x) for x in responses]) + np.sum(ended))
      out = {'rollout/reward_mean': float(np.mean(scores)),
             'rollout/reward_std': float(np.std(scores)),
             'rollout/kl_coef': float(kl_ctl.value),
             **{f'rollout/{k}': float(v) for k, v in pm.items()},
             **{f'train/{k}': float(v) for k, v in um.items()},
             'rollout/tokens_per_sec': tokens / rollout_time,
             'train/update_tokens_per_sec': tokens * r.epochs / update_time,
             'time/rollout_seconds': rollout_time,
             'time/update_seconds': update_time,
             'time/rollout_share': rollout_time / (rollout_time + update_time)}
      if it % t.log_every == 0 or it == t.num_steps:
        writer.write(it, out)
      if t.eval_every and (it % t.eval_every == 0 or it == t.num_steps):
        last_eval = evaluate(policy.params, it)
        evaluated_at = it
        writer.write(it, last_eval)
      stop = guard.should_stop(it)
      if it % t.checkpoint_every == 0 or it == t.num_steps or stop:
        last_good = save(it, policy, value_state, kl_coef)
      if stop:
        logging.warning('signal received: saved iteration %d, exiting', it)
        break
  writer.close()
  if it == t.num_steps:
    task.at_end(run, policy, it)  # a reply to sample.prompt
  return {'step': it, **out, **last_eval}


def _batch(roll) -> dict:
  return dict(roll._asdict())


def _rows(run, scores: np.ndarray) -> jax.Array:
  """Scores every process holds -> a global [b] array over the data axes."""
  return sampling.global_rows(run.mesh, np.asarray(scores, np.float32))


def _kept(last_good, run) -> str:
  return (f'the last good checkpoint is iteration {last_good} in '
          f'{run.ckpt.directory}' if last_good is not None else
          'no checkpoint had been saved yet')
