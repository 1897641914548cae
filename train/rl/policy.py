"""The policy of an RL run (tasks `ppo` and `grpo`): its model, its prompts.

A policy task is a DecoderLM task like sft: it takes its tokenizer, chat
template and parameters from `train.init_from` (the SFT run), and that
run's parameters are also the frozen reference (`frozen['reference']`).
Without init_from the policy starts fresh and the reference is its first
parameters (toy runs, tests). It trains with train/rl/loop.py, not the
supervised loop (`loop = 'rl'`).

Prompts (`data.corpus`): `chitchat` (each chat's opening user turn) or
`jsonl` (`data.files.<split>`: {"prompt": "..." or [turns]} or
{"messages": [turns]} lines, a trailing assistant turn dropped). A chat run
reads a prompt as the user's turn(s) rendered with its template, then the
assistant header; a run without a template continues the plain text. A
prompt longer than `rl.max_prompt_length` tokens is dropped and counted,
never cut.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from data import chat
from data.errors import UserError
from train import sampling
from train.rl import advantages
from train.tasks import base
from train.tasks.lm import DecoderTask


@dataclasses.dataclass(frozen=True)
class Prompt:
  messages: list[dict]   # the turns (a plain prompt: one user turn)
  ids: list[int]         # what the policy is fed before its first sample


class Policy(DecoderTask):
  """A DecoderLM policy trained by reinforcement learning."""
  loop = 'rl'
  needs_source = False
  batch_keys = ('inputs',)
  algorithm = ''

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    r = config.rl
    if r.kl_estimator not in advantages.KL_ESTIMATORS:
      raise UserError(f'rl.kl_estimator={r.kl_estimator!r} is not one of '
                      f'{", ".join(advantages.KL_ESTIMATORS)}')
    if r.loss_norm not in ('token', 'sequence'):
      raise UserError(f'rl.loss_norm={r.loss_norm!r} is not one of token, '
                      f'sequence')
    for key, low in (('temperature', 1e-6), ('minibatch_size', 1),
                     ('epochs', 1), ('kl_horizon', 1), ('max_prompt_length', 1),
                     ('max_response_length', 1)):
      if not r[key] >= low:
        raise UserError(f'rl.{key}={r[key]} must be at least {low}')
    if self.group_size() < 1 or (self.algorithm == 'grpo'
                                 and self.group_size() < 2):
      raise UserError(f'rl.group_size={r.group_size}: GRPO compares at least '
                      f'2 responses per prompt')
    if r.top_k or r.top_p < 1:
      logging.warning('rl.top_k=%s / rl.top_p=%s: the loss recomputes the '
                      'unfiltered distribution, so importance ratios are off '
                      'from the first step (docs/rl.md)', r.top_k, r.top_p)
    t = config.train
    if t.eval_every and t.eval_batch_size % self.group_size():
      raise UserError(f'train.eval_batch_size={t.eval_batch_size} must be '
                      f'divisible by rl.group_size={r.group_size}')
    b = config.train.batch_size
    if b % r.minibatch_size or b % self.group_size():
      raise UserError(f'train.batch_size={b} (responses per iteration) must '
                      f'be divisible by rl.minibatch_size={r.minibatch_size}'
                      f' and the group size {self.group_size()}')
    cfg = self.model_config
    if (cfg.positions == 'learned'
        and r.max_prompt_length + r.max_response_length > cfg.max_len):
      raise UserError(
          f'rl.max_prompt_length + rl.max_response_length = '
          f'{r.max_prompt_length + r.max_response_length} is more than the '
          f'model\'s {cfg.max_len} learned positions; lower them')

  def group_size(self) -> int:
    return 1

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, dummy, dummy)['params']

  def frozen_sources(self):
    return {'reference': base.INIT_FROM}

  def optimizer_steps(self, iterations: int) -> int:
    """Optimizer updates in `iterations` RL iterations (the schedule's
    length): epochs x minibatches per iteration."""
    r = self.config.rl
    return iterations * r.epochs * (self.config.train.batch_size
                                    // r.minibatch_size)

  # -- prompts ------------------------------------------------------------------
  def stop_id(self) -> int:
    """The token that ends a response (-1, none, with rl.ignore_eos)."""
    if self.config.rl.ignore_eos:
      return -1
    return sampling.stop_id(self.tokenizer, self.chat_template)

  def never(self):
    """What is never sampled (sampling.never_sampled); with rl.ignore_eos
    the end token too, so every response runs to its length limit."""
    specials, size = sampling.never_sampled(self.tokenizer, self.chat_template)
    if self.config.rl.ignore_eos:
      end = sampling.stop_id(self.tokenizer, self.chat_template)
      specials = tuple(sorted(set(specials) | {end}))
    return specials, size

  def _prompt_messages(self, split: str) -> list[list[dict]]:
    d = self.config.data
    if d.corpus == 'chitchat':
      return [[{'role': 'user', 'content': c[0]}]
              for c in chat.chitchat_chats(split)]
    if d.corpus == 'jsonl':
      return [messages for path in base.split_files(
          d, split, 'FILE.jsonl[,FILE.jsonl...]')
              for messages in chat.read_prompts(path)]
    raise UserError(f'data.corpus={d.corpus!r} is not one of chitchat, jsonl '
                    f'for task {self.name}')

  def prompts(self, split: str) -> list[Prompt]:
    """The prompts of a split that fit rl.max_prompt_length (the rest are
    counted and logged)."""
    limit = self.config.rl.max_prompt_length
    out, dropped = [], 0
    for messages in self._prompt_messages(split):
      text = messages if self.chat_template else ' '.join(
          m['content'] for m in messages)
      start, forced = sampling.prompt_ids(self.tokenizer, text,
                                          self.chat_template)
      ids = [start] + forced
      if len(ids) > limit:
        dropped += 1
        continue
      out.append(Prompt(messages, ids))
    logging.info('%s prompts: %d kept, %d longer than rl.max_prompt_length=%d '
                 'dropped', split, len(out), dropped, limit)
    if not out:
      raise UserError(f'no {split} prompt fits rl.max_prompt_length={limit}')
    return out

  def evaluate_split(self, run, params, split=None, **options):
    raise UserError(f'task {self.name} is evaluated while it trains (eval/'
                    f'reward_mean and eval/kl in {run.workdir}/metrics.jsonl);'
                    f' sample it with `transflax generate --workdir '
                    f'{run.workdir} --chat`')

  def train_dataset(self, batch_size, shard_index, shard_count):
    raise UserError(f'task {self.name} trains with the RL loop (rollouts), '
                    f'not from a dataset')


@base.register
class PPO(Policy):
  """PPO with a value model and a KL penalty in the reward (InstructGPT)."""
  name = 'ppo'
  algorithm = 'ppo'


@base.register
class GRPO(Policy):
  """GRPO: G samples per prompt, group-normalised rewards, KL in the loss."""
  name = 'grpo'
  algorithm = 'grpo'

  def group_size(self) -> int:
    return self.config.rl.group_size
