"""Rollouts: a batch of prompts -> sampled responses with their log-probs.

One call of the shared sampler (train/sampling.py `sample_batch`: prefill,
then a device loop of cached single-token steps; the same function behind
`transflax generate` and chat) on fixed shapes: prompts left-padded to
rl.max_prompt_length P, responses of rl.max_response_length R. Its rows
are split over the mesh's data axes; the same key and parameters give the
same rollouts on one device or eight (`jax_threefry_partitionable`).

The rollout is laid out for the learner as one sequence per row, [b, P +
R]: the left-padded prompt, then the response. `segments` is 1 on real
tokens (prompt and response up to its end token) and 0 on padding and the
fill after the end; `positions` count real tokens only, exactly as the
sampler's prefill numbered them, so a full forward pass of the sequence
sees what the sampler saw.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from model import generate
from train import sampling


class Rollout(NamedTuple):
  tokens: jax.Array      # [b, P + R] int32
  segments: jax.Array    # [b, P + R] int32
  positions: jax.Array   # [b, P + R] int32
  mask: jax.Array        # [b, R] int32: the response's real tokens
  logprobs: jax.Array    # [b, R] float32: under the sampling distribution
  ended: jax.Array       # [b] bool: the response has its end token


@jax.jit
def _layout(prompt, real, sequences, logprobs, stop):
  """The sampler's state -> the learner's rows (module docstring)."""
  p = prompt.shape[1]
  responses = sequences[:, p - 1:]
  mask = generate.response_mask(responses, stop)
  tokens = jnp.concatenate([prompt, responses], axis=1)
  segments = jnp.concatenate([real.astype(jnp.int32), mask], axis=1)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  return (tokens, segments, positions * segments, mask,
          logprobs[:, p - 1:] * mask, jnp.any(responses == stop, axis=1))


def sample(task, params, mesh, contexts: list[list[int]], key, *,
           width: int, length: int, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> Rollout:
  """Rollouts of `contexts` (every process passes all rows): width P,
  response length R = `length`, `key` the sampling key."""
  return sample_rows(task.model_config, params, mesh, contexts, key,
                     width=width, length=length, temperature=temperature,
                     top_k=top_k, top_p=top_p, stop=task.stop_id(),
                     never=task.never())


def sample_rows(model_config, params, mesh, contexts: list[list[int]], key, *,
                width: int, length: int, temperature: float, stop: int,
                never, top_k: int = 0, top_p: float = 1.0) -> Rollout:
  """`sample` for any decoder: `stop` ends a response, `never`
  (sampling.never_sampled) is never sampled."""
  tokens, real = sampling.left_pad(contexts, width)
  tokens, real = (sampling.global_rows(mesh, tokens),
                  sampling.global_rows(mesh, real))
  state = sampling.sample_batch(
      model_config, params, (tokens, real), max_new_tokens=length,
      temperature=temperature, top_k=top_k, top_p=top_p, seed=key,
      eos_id=stop, never=never)
  return Rollout(*_layout(tokens, real, state.sequences, state.logprobs,
                          jnp.int32(stop)))


def responses(rollout: Rollout, width: int, stop: int
              ) -> tuple[list[list[int]], np.ndarray]:
  """(each response's ids without its end token, whether it ended), on host."""
  tokens, mask = sampling.to_host(rollout.tokens), sampling.to_host(rollout.mask)
  ended = sampling.to_host(rollout.ended)
  out = []
  for row, m, done in zip(tokens[:, width:], mask, ended):
    ids = row[:int(m.sum())].tolist()
    out.append(ids[:-1] if done else ids)
  return out, ended
