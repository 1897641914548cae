"""Talking to a chat model: `transflax chat --workdir DIR`.

`ChatModel` is a chat workdir's model ready to answer (an sft, dpo, ppo or
grpo run, or an imported chat checkpoint such as SmolLM2-Instruct): its
parameters, tokenizer and chat template, what its replies may never
contain, conversation -> context ids within its context length, and
replies streamed as text. The terminal chat here, the HTTP server
(train/serve.py) and the judge (train/judge.py) all use it.

The terminal chat is multi-turn: every turn is rendered with the workdir's
template, the reply streams token by token, and the history is kept within
the model's context (max_len minus --max_new_tokens): when it no longer
fits, the oldest turns are dropped (and that is said once). Ctrl-C stops
the reply being written (what was written stays in the history); Ctrl-C
at the prompt, Ctrl-D or /quit leaves; /reset forgets the history.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Iterator

import jax
import numpy as np

from data import chat
from data.errors import UserError
from model import DecoderLM
from train import sampling


class ContextTooLong(UserError):
  """The latest turn alone does not fit the model's context."""


class ChatModel:
  """A chat workdir's model for answering (module docstring)."""

  def __init__(self, workdir: str, which: str | None = None,
               what: str = '--workdir', system: str | None = None,
               need_template: bool = True):
    from train import runs
    if not os.path.isdir(workdir):
      raise UserError(f'{what} {workdir} not found; train it (README, "The '
                      f'ChatGPT recipe") or import a chat model there')
    self.workdir = workdir
    self.run, self.params = runs.load(workdir, which)
    task = self.run.task
    self.tokenizer = getattr(task, 'tokenizer', None)
    self.template = getattr(task, 'chat_template', None)
    if self.template is None and self.tokenizer is not None:
      self.template = chat.load_template(workdir, '', self.tokenizer,
                                         save=False)
    if self.template is None and need_template:
      raise UserError(f'{what} {workdir} holds a {self.run.config.task!r} run '
                      f'without a chat template; give a chat run (sft, dpo, '
                      f'ppo, grpo or an imported chat model)')
    self.config = self.run.model_config
    if self.template is not None:
      self.stop = sampling.stop_id(self.tokenizer, self.template)
      self.never = sampling.never_sampled(self.tokenizer, self.template)
    self.module = DecoderLM(self.config.replace(
        deterministic=True, dropout_rate=0.0, attention_dropout_rate=0.0))
    self.system = system
    self.name = os.path.basename(os.path.normpath(workdir))

  def context(self, messages) -> list[int]:
    """The ids fed before the reply's first token."""
    start, forced = sampling.prompt_ids(self.tokenizer, messages,
                                        self.template)
    return [start] + forced

  def fit(self, messages: list[dict], max_new_tokens: int
          ) -> tuple[list[int], int]:
    """(context ids, turns dropped): `messages` (after a --system turn)
    without as many of the oldest non-system turns as it takes for the
    context and `max_new_tokens` to fit the model's max_len."""
    limit = self.config.max_len - max_new_tokens + 1
    system = ([{'role': 'system', 'content': self.system}]
              if self.system else [])
    head = [m for m in messages[:1] if m['role'] == 'system'] or system
    turns = [m for m in messages if m['role'] != 'system' or m is not
             messages[0]]
    dropped = 0
    while True:
      ids = self.context(head + turns)
      if len(ids) <= limit:
        return ids, dropped
      if len(turns) <= 1:
        raise ContextTooLong(
            f'the message is {len(ids)} tokens with the template; this model '
            f'reads {self.config.max_len} and keeps {max_new_tokens} for the '
            f'reply: write less, or lower --max_new_tokens')
      # A user turn and its reply go together.
      cut = 2 if len(turns) > 2 and turns[1]['role'] == 'assistant' else 1
      turns, dropped = turns[cut:], dropped + cut

  def stream(self, contexts: list[list[int]], *, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, **kwargs) -> Iterator[tuple[list[list[int]],
                                                        np.ndarray]]:
    """sampling.stream_batch for these contexts: yields (each row's reply
    ids so far, up to and without its end token; ended)."""
    for new, ended in sampling.stream_batch(
        self.config, self.params, contexts, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_id=self.stop, never=self.never, **kwargs):
      yield [_reply(row, self.stop) for row in new], ended

  def text(self, ids) -> str:
    return self.tokenizer.decode([list(ids)])[0] if len(ids) else ''


def _reply(row: np.ndarray, stop: int) -> list[int]:
  """A row of new tokens up to (without) its end token."""
  ids = sampling._until_stop(row, stop).tolist()  # pylint: disable=protected-access
  return ids[:-1] if ids and ids[-1] == stop else ids


def terminal(model: ChatModel, *, max_new_tokens: int, temperature: float,
             top_p: float, top_k: int = 0, seed: int = 0,
             stdin: IO[str] | None = None, stdout: IO[str] | None = None
             ) -> None:
  """The interactive loop (module docstring)."""
  stdin, out = stdin or sys.stdin, stdout or sys.stdout
  params = sum(int(np.prod(x.shape))
               for x in jax.tree_util.tree_leaves(model.params))
  out.write(f'transflax chat: {model.workdir} ({params:,} parameters, '
            f'{model.run.config.task}). Ctrl-C stops a reply; Ctrl-D or '
            f'/quit leaves; /reset forgets the conversation.\n')
  out.flush()
  messages: list[dict] = []
  trimmed_said = False
  turn = 0
  while True:
    try:
      out.write('> ')
      out.flush()
      line = stdin.readline()
    except KeyboardInterrupt:
      out.write('\n')
      return
    if not line:
      out.write('\n')
      return
    line = line.strip()
    if not line:
      continue
    if line == '/quit':
      return
    if line == '/reset':
      messages, trimmed_said = [], False
      out.write('(conversation forgotten)\n')
      continue
    messages.append({'role': 'user', 'content': line})
    try:
      context, dropped = model.fit(messages, max_new_tokens)
    except ContextTooLong as e:
      messages.pop()
      out.write(f'({e})\n')
      continue
    if dropped and not trimmed_said:
      out.write(f'(the oldest turns no longer fit the model\'s '
                f'{model.config.max_len}-token context and are dropped from '
                f'now on)\n')
      trimmed_said = True
    messages = messages[dropped:] if dropped else messages
    deltas, ids = sampling.TextDeltas(model.text), []
    try:
      for rows, _ in model.stream([context], max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=seed + turn):
        ids = rows[0]
        out.write(deltas(ids))
        out.flush()
      out.write(deltas(ids, final=True))
    except KeyboardInterrupt:
      out.write(' [stopped]')
    out.write('\n')
    out.flush()
    messages.append({'role': 'assistant', 'content': model.text(ids)})
    turn += 1
