"""Sampling from a trained language model: KV cache, one jitted step per token.

`generate_text` streams text as tokens arrive (the `transflax generate`
command); the same seed gives the same text and temperature 0 is greedy. The
sampling algorithms themselves (temperature, top-k, top-p) are in
model/generate.py and shared with any other decoder.
"""

from __future__ import annotations

import functools
from typing import IO

import jax
import jax.numpy as jnp
import numpy as np

from data import tokenizer as tokenizers
from data.errors import UserError
from model import generate, init_cache


def generate_text(run, params, prompt: str, *, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int,
                  stream: IO[str] | None = None) -> str:
  """Samples a continuation of `prompt` with the KV cache, one jitted step per token.

  With `stream`, text is written as tokens arrive. The same seed gives the
  same text; temperature 0 is greedy.
  """
  tok = run.task.tokenizer
  ids = tok.encode(prompt, add_eos=False) if prompt else []
  # The LM was trained without a start token: the first prompt token is the
  # first input, the rest are forced; an empty prompt starts from EOS.
  start_id = ids[0] if ids else tokenizers.EOS_ID
  forced = ids[1:]
  total = len(forced) + max_new_tokens
  if total + 1 > run.model_config.max_len and run.model_config.positions == 'learned':
    raise UserError(f'prompt ({len(ids)} tokens) + max_new_tokens '
                    f'({max_new_tokens}) exceed model.max_len '
                    f'{run.model_config.max_len}')
  dmodel = run.task.module(decode=True)
  cache = init_cache(dmodel, 1, total)

  def tokens_to_logits(tokens, cache):
    logits, mut = dmodel.apply({'params': params, 'cache': cache}, tokens,
                               mutable=['cache'])
    return logits[:, 0], mut['cache']

  step = jax.jit(functools.partial(
      generate.sample_step, tokens_to_logits=tokens_to_logits,
      eos_id=tokenizers.EOS_ID, temperature=temperature, top_k=top_k,
      top_p=top_p, start_id=start_id))
  prompt_arr = jnp.asarray([forced or [0]], jnp.int32)[:, :len(forced)]
  state = generate.init_sampling(prompt_arr, cache, jax.random.PRNGKey(seed),
                                 max_decode_len=total)
  shown = ''
  if stream is not None:
    stream.write(prompt)
    stream.flush()
  while not bool(generate.sampling_done(state)):
    state = step(state)
    index = int(state.index)
    if stream is not None and index > len(forced):
      text = tok.decode(np.asarray(state.sequences[:, len(forced):index]))[0]
      stream.write(text[len(shown):])
      stream.flush()
      shown = text
  text = tok.decode(np.asarray(state.sequences[:, len(forced):]))[0]
  if stream is not None:
    stream.write(text[len(shown):] + '\n')
    stream.flush()
  return prompt + text


def generate_samples(run, params, prompt: str, *, num_samples: int = 1,
             stream: IO[str] | None = None, seed: int = 0, **kwargs) -> list[str]:
  """`num_samples` continuations (seeds seed, seed+1, ...), streamed in turn."""
  out = []
  for i in range(num_samples):
    if stream is not None and num_samples > 1:
      stream.write(f'--- sample {i + 1}/{num_samples}\n')
    out.append(generate_text(run, params, prompt, seed=seed + i, stream=stream,
                             **kwargs))
  return out
