"""What scores a response: a frozen reward model, or a Python function.

  rl.reward_model=WORKDIR[:STEP|best]  a `reward` run (train/tasks/reward.py):
      its ScalarLM reads each (prompt, response) rendered with its own chat
      template, at the response's end-of-turn token, as it was trained.
      It must share the policy's tokenizer: the response ids go to it as
      they are, never re-tokenised, so a reward model with another
      vocabulary is refused with one error (never silently mis-scored).
      `rl.reward_context`: conversation (the prompt's turns, then the
      response: InstructGPT) or response (the response alone, for a reward
      model trained on responses without prompts, as chat.py's sentiment
      model is).
  rl.reward_fn=MODULE:FUNCTION  `FUNCTION(prompt: str, response: str) ->
      float` (verifiable rewards): the prompt's last user turn (or the
      plain prompt) and the response's text without its end token.

Either way a response cut at rl.max_response_length (no end token) scores
`rl.missing_eos_penalty` lower (TRL's option). A non-finite score stops the
run (train/rl/loop.py).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data import chat
from data import tokenizer as tokenizers
from data.errors import UserError
from model import ScalarLM, config_from_dict
from train import init_from, partitioning, sampling, state as state_lib
from train import step as step_lib

CONTEXTS = ('conversation', 'response')


def load_function(spec: str) -> Callable[[str, str], float]:
  """MODULE:FUNCTION -> the function (a UserError naming the spec if not)."""
  module_name, sep, name = spec.partition(':')
  if not sep or not module_name or not name:
    raise UserError(f'rl.reward_fn={spec!r} must be MODULE:FUNCTION, e.g. '
                    f'experiments.rewards:length')
  try:
    fn = getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError) as e:
    raise UserError(f'rl.reward_fn={spec!r}: {e}; give an importable '
                    f'MODULE:FUNCTION') from None
  if not callable(fn):
    raise UserError(f'rl.reward_fn={spec!r} is not a function')
  return fn


class FunctionReward:
  """Scores with a Python function of (prompt text, response text)."""

  def __init__(self, spec: str, tokenizer):
    self.fn, self.spec, self.tokenizer = load_function(spec), spec, tokenizer

  def __call__(self, prompts: list[list[dict]], responses: list[list[int]],
               ended: np.ndarray) -> np.ndarray:
    """Scores [b]; `responses`: each response's ids without its end token."""
    texts = self.tokenizer.decode(responses) if responses else []
    out = []
    for messages, text in zip(prompts, texts):
      prompt = messages[-1]['content'] if messages else ''
      try:
        out.append(float(self.fn(prompt, text)))
      except (TypeError, ValueError) as e:
        raise UserError(f'rl.reward_fn={self.spec}: returned no number for '
                        f'response {text!r} ({e})') from None
    return np.asarray(out, np.float64)


class ModelReward:
  """A frozen reward model (a `reward` run's ScalarLM), sharded like a
  policy and written once into the RL workdir (frozen/reward)."""

  def __init__(self, spec: str, run, *, context: str, length: int):
    if context not in CONTEXTS:
      raise UserError(f'rl.reward_context={context!r} is not one of '
                      f'{", ".join(CONTEXTS)}')
    self.spec, self.context, self.length = spec, context, length
    self.source = init_from.resolve(spec)
    meta = self.source.meta
    if meta.get('task') != 'reward':
      raise UserError(f'rl.reward_model={spec} holds a {meta.get("task")!r} '
                      f'run; give the workdir of a `reward` run')
    theirs, ours = meta.get('tokenizer_sha'), run.meta['tokenizer_sha']
    if theirs != ours:
      raise UserError(
          f'rl.reward_model={spec} has another tokenizer than the policy '
          f'({theirs} there, {ours} here): responses are scored as token ids, '
          f'so the reward model must share the policy\'s vocabulary; train '
          f'it from the same SFT run (train.init_from)')
    self.template = (chat.ChatTemplate.from_json(meta['chat_template'])
                     if meta.get('chat_template') else None)
    if self.template is None:
      raise UserError(f'rl.reward_model={spec} has no chat template in its '
                      f'checkpoint meta; retrain it with data.chat_template')
    self.tokenizer = run.task.tokenizer
    self.model_config = config_from_dict(
        {**meta['model'], 'deterministic': True, 'decode': False,
         'dropout_rate': 0.0, 'attention_dropout_rate': 0.0})
    self.module = ScalarLM(self.model_config)
    self.abstract, self.shardings = state_lib.abstract_params(
        self.init_params, 0, run.mesh, run.rules)
    self.run = run
    self._score = None

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module.init(rng, dummy, dummy, dummy)['params']

  def load(self, fresh: bool, save: bool = True):
    """The params: from the source on a fresh run (then written into the
    workdir unless `save` is False), else the workdir's copy."""
    workdir = self.run.workdir
    if not fresh:
      self.params = state_lib.load_frozen(workdir, 'reward', self.abstract)
      return self.params
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype,
                                             device=a.sharding), self.abstract)
    params, report = init_from.load_params(
        self.source, zeros, workdir=workdir, model=self.model_config.to_dict(),
        require_all=True)
    if jax.process_index() == 0:
      print(f'reward model: {report}', flush=True)
    if save:
      state_lib.save_frozen(workdir, 'reward', params)
    self.params = params
    return params

  def rows(self, prompts: list[list[dict]], responses: list[list[int]],
           ended: np.ndarray) -> dict[str, np.ndarray]:
    """The reward model's input [b, length]: its document start, the prompt
    (or nothing) and the assistant header as its template renders them,
    the response's ids (without its end token), then its end of turn and
    separator."""
    tok, t = self.tokenizer, self.template
    start = tokenizers.document_start(tok)
    sep = t._ids(tok, t.separator)
    out = {k: np.zeros((len(responses), self.length), np.int32)
           for k in ('inputs', 'inputs_segmentation', 'inputs_position')}
    for r, (messages, response) in enumerate(zip(prompts, responses)):
      context = messages if self.context == 'conversation' else []
      ids = start + t.prompt(tok, context) + list(response) + [
          t.end_id(tok)] + sep
      limit = self.length
      if self.model_config.positions == 'learned':
        limit = min(limit, self.model_config.max_len)
      if len(ids) > limit:
        raise UserError(
            f'a response rendered for rl.reward_model={self.spec} has '
            f'{len(ids)} tokens, more than it reads ({limit}); '
            f'lower rl.max_prompt_length or rl.max_response_length, or use '
            f'rl.reward_context=response')
      out['inputs'][r, :len(ids)] = ids
      out['inputs_segmentation'][r, :len(ids)] = 1
      out['inputs_position'][r, :len(ids)] = np.arange(len(ids))
    return out

  def __call__(self, prompts, responses, ended) -> np.ndarray:
    run = self.run
    if self._score is None:
      def score(params, batch):
        return self.module.apply(
            {'params': params}, batch['inputs'], batch['inputs_segmentation'],
            batch['inputs_position'], method=ScalarLM.score)
      self._score = step_lib.Jitted(jax.jit(
          score, in_shardings=(self.shardings,
                               partitioning.batch_sharding(run.mesh)),
          out_shardings=partitioning.replicated(run.mesh),
          compiler_options=step_lib.compiler_options()), run.mesh, run.rules)
    n = len(responses)
    # Rows split evenly over the mesh's data axes: pad with the first row.
    shards = run.mesh.shape.get('data', 1) * run.mesh.shape.get('fsdp', 1)
    pad = (-n) % shards
    rows = self.rows(list(prompts) + [prompts[0]] * pad,
                     list(responses) + [responses[0]] * pad, ended)
    rows = {k: sampling.global_rows(run.mesh, v) for k, v in rows.items()}
    return np.asarray(self._score(self.params, rows), np.float64)[:n]


def make(config, run):
  """The run's reward: exactly one of rl.reward_model, rl.reward_fn."""
  r = config.rl
  if bool(r.reward_model) == bool(r.reward_fn):
    raise UserError('give exactly one of --config.rl.reward_model=WORKDIR (a '
                    'reward run) and --config.rl.reward_fn=MODULE:FUNCTION')
  if r.reward_fn:
    return FunctionReward(r.reward_fn, run.task.tokenizer)
  length = -(-(r.max_prompt_length + r.max_response_length + 16) // 8) * 8
  return ModelReward(r.reward_model, run, context=r.reward_context,
                     length=length)


def finite_or_raise(scores: np.ndarray, what: str) -> None:
  bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
  if bad:
    raise NonFiniteReward(f'{what}: response {bad[0]} scored {scores[bad[0]]}')


class NonFiniteReward(UserError):
  """A reward was NaN or infinite."""


__all__ = ['make', 'FunctionReward', 'ModelReward', 'CONTEXTS']
