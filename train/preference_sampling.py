"""Preference data from the model itself: K sampled replies, ranked by a reward model.

`data.corpus=sampled` (the DPO paper's controlled-sentiment setup, with our
reward model in the place of its sentiment classifier): for each prompt of
a split (chitchat's opening turns, or `data.files.<split>` JSONL prompts),
`dpo.samples` replies are sampled from the run's `train.init_from` model
(the SFT policy, which is also DPO's reference) at `dpo.sample_temperature`,
scored by `dpo.reward_model` (a `reward` run sharing the tokenizer, reading
the reply alone as chat.py's sentiment model was trained), and ranked by
score; every comparison then becomes a DPO pair (preferences.as_pairs).
Empty replies take no part, nor do replies cut at the length limit unless
`dpo.keep_unfinished` (smoke models seldom end a turn); both are counted.
a prompt left with fewer than 2 replies gives no ranking.

The rankings are written once to WORKDIR/sampled_preferences/<split>.jsonl
(the rankings JSONL format of data/preferences.py, with the scores) and
read back on resume, so a resumed run trains on the same pairs.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import numpy as np
from data import chat, preferences
from data.errors import UserError
from train.rl import rollout as rollout_lib

BATCH = 64


def _prompts(task, split: str) -> list[list[dict]]:
  d = task.config.data
  if d.files.get(split):
    from train.tasks import base
    return [m for path in base.split_files(d, split, 'FILE.jsonl')
            for m in chat.read_prompts(path)]
  return [[{'role': 'user', 'content': c[0]}]
          for c in chat.chitchat_chats(split)]


def rankings(task, split: str) -> list[preferences.Ranking]:
  """The split's sampled rankings (module docstring): from the workdir's
  file when there is one, else sampled now and written there."""
  path = os.path.join(task.workdir, 'sampled_preferences', f'{split}.jsonl')
  if os.path.exists(path):
    return preferences.read_preferences(path)
  rows = _sample(task, split)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
    os.replace(path + '.tmp', path)
  return [preferences.parse_preference(row, f'{path}:{i + 1}')
          for i, row in enumerate(rows)]


def _sample(task, split: str) -> list[dict]:
  from train.chat import ChatModel
  from train.rl import rewards
  c, d = task.config.dpo, task.config.data
  source = task.config.train.init_from
  if not source or not c.reward_model:
    raise UserError('data.corpus=sampled samples from train.init_from and '
                    'ranks with dpo.reward_model: set both (e.g. '
                    '--config.dpo.reward_model=runs/chat_reward)')
  if c.samples < 2:
    raise UserError(f'dpo.samples={c.samples}: a ranking needs at least 2')
  workdir, _, which = source.partition(':')
  policy = ChatModel(workdir, which or 'latest', 'train.init_from')
  width, length = c.max_prompt_length, c.max_response_length
  prompts, contexts, every = [], [], _prompts(task, split)
  for messages in every:
    ids = policy.context(messages)
    if len(ids) <= width:
      prompts.append(messages)
      contexts.append(ids)
  limit = c.train_prompts if split == d.train_split else c.eval_prompts
  dropped = len(every) - len(prompts)
  prompts, contexts = prompts[:limit or None], contexts[:limit or None]
  scorer = rewards.ModelReward(c.reward_model, policy.run, context='response',
                               length=-(-(width + length + 16) // 8) * 8)
  scorer.load(fresh=True, save=False)
  k = c.samples
  flat = [(i, ctx) for i, ctx in enumerate(contexts) for _ in range(k)]
  key = jax.random.fold_in(jax.random.PRNGKey(task.config.train.seed),
                           zlib.crc32(split.encode()))
  replies, ended = [], []
  for lo in range(0, len(flat), BATCH):
    part = [ctx for _, ctx in flat[lo:lo + BATCH]]
    n = len(part)
    part += [part[0]] * (BATCH - n)
    r = rollout_lib.sample_rows(
        policy.config, policy.params, policy.run.mesh, part,
        jax.random.fold_in(key, lo), width=width, length=length,
        temperature=c.sample_temperature, stop=policy.stop, never=policy.never)
    ids, done = rollout_lib.responses(r, width, policy.stop)
    replies += ids[:n]
    ended += done[:n].tolist()
  scores = np.concatenate([
      scorer([prompts[i] for i, _ in flat[lo:lo + BATCH]],
             replies[lo:lo + BATCH], np.asarray(ended[lo:lo + BATCH]))
      for lo in range(0, len(flat), BATCH)])
  texts = policy.tokenizer.decode(replies)
  rows, unusable = [], 0
  for p, messages in enumerate(prompts):
    keep = [j for j in range(p * k, (p + 1) * k)
            if (ended[j] or c.keep_unfinished) and texts[j].strip()]
    unusable += k - len(keep)
    if len(keep) < 2:
      continue
    order = sorted(keep, key=lambda j: -scores[j])
    rows.append({'prompt': messages[-1]['content'] if len(messages) == 1
                 else messages,
                 'responses': [texts[j] for j in keep],
                 'ranking': [keep.index(j) for j in order],
                 'scores': [round(float(scores[j]), 4) for j in keep]})
  if jax.process_index() == 0:
    print(f'{split}: {len(prompts)} prompts x {k} replies sampled from '
          f'{source}, ranked by {c.reward_model}: {len(rows)} rankings; '
          f'{unusable} replies empty{"" if c.keep_unfinished else f" or cut at {length} tokens"} left out; '
          f'{dropped} prompts longer than {width} tokens dropped', flush=True)
  if not rows:
    raise UserError(f'{split}: no prompt got 2 usable sampled replies; raise '
                    f'dpo.max_response_length or dpo.samples')
  return rows
