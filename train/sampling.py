"""Sampling from a trained language model: KV cache, tokens looped on device.

`generate_text` streams text as tokens arrive (the `transflax generate`
command), a few tokens per host round trip; the same seed gives the same text
and temperature 0 is greedy. The sampling algorithms themselves (temperature,
top-k, top-p) are in model/generate.py and shared with any other decoder.

Where the first token comes from depends on how the LM was trained:
character models (nanoGPT) saw one unbroken stream, so the prompt's first
character is the first input; SentencePiece LMs saw documents each followed
by EOS, so they start from EOS with the whole prompt forced, as at the start
of a training document. A chat model (a run with a chat template: sft, dpo)
reads the prompt as the user's turn, rendered with its template, and its
reply ends at the template's end-of-turn token; the text returned is the
reply.

Models with learned positions know max_len of them; longer samples continue
with a sliding window over the last max_len tokens, recomputed without the
cache, as nanoGPT's sample.py crops its context to the block size.
"""

from __future__ import annotations

import functools
import time
from typing import IO

import jax
import jax.numpy as jnp
import numpy as np

from data import chat
from data import tokenizer as tokenizers
from model import DecoderLM, generate, init_cache
from train import step as step_lib


def prompt_ids(tokenizer, prompt: str, template: chat.ChatTemplate | None = None
               ) -> tuple[int, list[int]]:
  """(start_id, forced ids): the first decoder input and the prompt after it."""
  if template is not None:  # the user's turn, then the assistant's header
    ids = template.prompt(tokenizer, chat.prompt_messages(prompt, 'the prompt'))
  else:
    ids = list(tokenizer.encode(prompt, add_eos=False)) if prompt else []
  # A document starts as training documents did (EOS for ours, BOS or
  # nothing for imported checkpoints); character models saw one unbroken
  # stream. An empty context starts after end-of-text.
  context = ids if isinstance(tokenizer, tokenizers.CharTokenizer) else (
      tokenizers.document_start(tokenizer) + ids)
  return (context[0], context[1:]) if context else (tokenizer.eos_id, [])


def never_sampled(tokenizer, template: chat.ChatTemplate | None = None
                  ) -> tuple[tuple[int, ...], int]:
  """(special ids, tokenizer size): what the sampler must never emit.

  PAD, UNK and BOS are never training targets, and ids past the tokenizer
  (a vocabulary padded for speed) mean nothing; neither is EOS for character
  models, which saw one unbroken stream (nanoGPT's vocabulary has no EOS), so
  their samples run to max_new_tokens, nor for chat models, whose replies
  end with the template's end-of-turn piece (the other control pieces, role
  headers, are never part of a reply either). An untrained model would
  otherwise sample them now and then. An imported tokenizer may give one id
  several roles (GPT-2's BOS is its EOS; SmolLM2 pads with <|im_end|>): the
  token that ends a sample is never banned.
  """
  specials = {i for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id)
              if i is not None}
  if isinstance(tokenizer, tokenizers.CharTokenizer):
    specials.add(tokenizers.EOS_ID)
  if template is not None:
    end = template.end_id(tokenizer)
    specials |= {tokenizer.eos_id} | {
        i for i in (chat.piece_id(tokenizer, p) for p in template.pieces)
        if i != end}
  if isinstance(tokenizer, tokenizers.BPETokenizer):
    specials.discard(stop_id(tokenizer, template))
  return tuple(sorted(specials)), tokenizer.vocab_size


def stop_id(tokenizer, template: chat.ChatTemplate | None = None) -> int:
  """The token that ends a sample: EOS, or a chat template's end of turn."""
  return template.end_id(tokenizer) if template else tokenizer.eos_id


def logits_mask(never: tuple[tuple[int, ...], int], vocab_size: int):
  """[vocab_size] float32 to add to logits: NEG_INF where never_sampled."""
  specials, size = never
  banned = np.zeros(vocab_size, bool)
  banned[list(specials)] = True
  banned[size:] = True
  return jnp.where(jnp.asarray(banned), generate.NEG_INF, 0.0)


def _state_sharding(params, rows: int = 1) -> jax.sharding.Sharding:
  """Where a sampling state of `rows` rows lives: over the devices that hold
  `params`, its rows split over the mesh's data and fsdp axes when they
  divide evenly (a batch of rollouts), else replicated (one chat)."""
  sharding = jax.tree_util.tree_leaves(params)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh = sharding.mesh
    shards = mesh.shape.get('data', 1) * mesh.shape.get('fsdp', 1)
    spec = (jax.sharding.PartitionSpec(('data', 'fsdp'))
            if rows % shards == 0 and set(mesh.axis_names) >= {'data', 'fsdp'}
            else jax.sharding.PartitionSpec())
    return jax.sharding.NamedSharding(mesh, spec)
  return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))


def _leaf_shardings(tree, sharding):
  """Per leaf of a sampling state: `sharding` for [rows, ...] arrays, the
  same devices replicated for 0-d counters and the PRNG key."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return jax.tree.map(lambda _: sharding, tree)
  whole = jax.sharding.NamedSharding(sharding.mesh,
                                     jax.sharding.PartitionSpec())
  out = jax.tree.map(lambda x: whole if jnp.ndim(x) == 0 else sharding, tree)
  if isinstance(tree, generate.SamplingState):  # one key for every row
    out = out._replace(rng=whole)
  return out


def _constrain(state, sharding):
  """The state's leaves pinned to `_leaf_shardings` inside a jitted
  function, so that its output lands where its input came from and one
  program serves every call."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return state
  return jax.tree.map(jax.lax.with_sharding_constraint, state,
                      _leaf_shardings(state, sharding))


# Tokens sampled per device call while streaming: text appears in small
# bursts, at a fraction of one round trip per token.
STREAM_TOKENS = 8


@functools.lru_cache(maxsize=16)
def _jitted_steps(model_config, start_id: int, top_k: int, top_p: float,
                  never: tuple[tuple[int, ...], int],
                  sharding: jax.sharding.Sharding, eos_id: int,
                  window: bool = False):
  """steps(params, state, temperature, stop) -> state: sampling steps in a
  device loop until state.index == stop or every row has ended; one compile
  per model and settings. Looping on the device rather than the host saves a
  dispatch and a device-to-host sync per token (most of a small model's time).

  window=False: one token through the KV cache. window=True: the state's
  cache is instead the last max_len tokens fed, shifted by one per step, and
  the full model re-reads them (nanoGPT's sample.py crops the context to its
  block size the same way); learned positions allow no more.
  Params are an argument, not a closure: closed-over arrays would be baked
  into the program as constants (GPT-2's 500 MB) and recompiled per call.
  The state stays on `sharding` in and out, so one program serves every step.
  The temperature is traced (greedy included); top-k and top-p shape the
  program and are static.
  """
  # One query per step has no [len, len] matrix for a fused kernel to save,
  # and XLA's attention takes any dtype and cache length.
  cfg = model_config.replace(deterministic=True, attention_impl='xla')
  dmodel = DecoderLM(cfg.replace(decode=True))
  full = DecoderLM(cfg)

  def step(params, state, temperature):
    mask = logits_mask(never, model_config.vocab_size)

    def windowed(tokens, fed):
      fed = jnp.concatenate([fed[:, 1:], tokens], axis=1)
      return full.apply({'params': params}, fed)[:, -1] + mask, fed

    return generate.sample_step(
        state, windowed if window else generate.cached_step(
            dmodel, params, bias=mask), eos_id=eos_id,
        temperature=temperature, top_k=top_k, top_p=top_p, start_id=start_id)

  def steps(params, state, temperature, stop):
    return _constrain(jax.lax.while_loop(
        lambda s: (s.index < stop) & ~jnp.all(s.ended),
        lambda s: _constrain(step(params, s, temperature), sharding), state),
        sharding)
  # XLA:CPU's Eigen dots (as for training; step_lib.compiler_options): a
  # decode step's few-row matmuls run faster on them than on YNNPACK.
  return jax.jit(steps, donate_argnums=(1,),
                 compiler_options=step_lib.compiler_options())


@functools.lru_cache(maxsize=16)
def _jitted_prefill(model_config, top_k: int, top_p: float,
                    never: tuple[tuple[int, ...], int],
                    sharding: jax.sharding.Sharding, eos_id: int):
  """prefill(params, state, tokens, real, temperature) -> state: the whole
  context [b, c] through the KV cache in one call, then the first sampled
  token from its last position's logits (state.index must be c - 1).

  `real` [b, c] is False on a left-padded row's padding. One compile per
  context length; the sampling steps that follow are `_jitted_steps`'.
  """
  cfg = model_config.replace(deterministic=True, attention_impl='xla',
                             decode=True)
  dmodel = DecoderLM(cfg)

  def prefill(params, state, tokens, real, temperature):
    logits, mut = dmodel.apply({'params': params, 'cache': state.cache},
                               tokens, real.astype(jnp.int32), last_only=True,
                               mutable=['cache'])
    last = logits[:, 0] + logits_mask(never, model_config.vocab_size)
    state = state._replace(cache=mut['cache'])
    # The step's own logic picks the token (same rng stream as stepping).
    return _constrain(generate.sample_step(
        state, lambda tokens, cache: (last, cache), eos_id=eos_id,
        temperature=temperature, top_k=top_k, top_p=top_p), sharding)
  return jax.jit(prefill, donate_argnums=(1,),
                 compiler_options=step_lib.compiler_options())


def to_host(x: jax.Array) -> np.ndarray:
  """A global array's whole value on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_rows(mesh, rows: np.ndarray) -> jax.Array:
  """Rows that every process holds -> a global array split over the
  mesh's data x fsdp axes; each device takes its own rows, wherever the
  mesh put it."""
  rows = np.asarray(rows)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  return jax.make_array_from_callback(rows.shape, sharding,
                                      lambda index: rows[index])


def left_pad(contexts: list[list[int]], width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, real) [b, width] int32 / bool: contexts right-aligned after
  padding (width: the longest context by default)."""
  width = width or max(len(x) for x in contexts)
  tokens = np.zeros((len(contexts), width), np.int32)
  real = np.zeros((len(contexts), width), bool)
  for r, ids in enumerate(contexts):
    if not 0 < len(ids) <= width:
      raise ValueError(f'context {r} has {len(ids)} tokens; 1 to {width} fit')
    tokens[r, width - len(ids):] = ids
    real[r, width - len(ids):] = True
  return tokens, real


def start_sampling(model_config, params, contexts, *, total: int,
                   settings: tuple, temperature, seed,
                   cache_len: int | None = None) -> generate.SamplingState:
  """The sampling state after prefilling `contexts` and sampling the first
  token. `contexts`: lists of ids, each the tokens fed before the first
  sample (different lengths are left-padded), or `left_pad`'s (tokens,
  real) arrays (host numpy, or global arrays already on the devices).

  Row r's sequence holds its context after the first token (left-padded)
  then samples: with c the context width, position c - 1 is the first
  sample and `total` >= c is the sequence length; the cache has `total`
  slots (or `cache_len`: a sliding window takes over there).
  `settings`: (top_k, top_p, never, sharding, eos_id); `seed`: an int or
  a PRNG key.
  """
  tokens, real = (contexts if isinstance(contexts, tuple)
                  else left_pad(contexts))
  b, c = tokens.shape
  sharding = settings[3]
  cache = init_cache(DecoderLM(model_config.replace(decode=True)), b,
                     cache_len or total)
  # A copy: the state is donated to the prefill, the caller's key is not.
  rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else jnp.copy(seed)
  state = generate.SamplingState(
      index=jnp.int32(c - 1), sequences=jnp.zeros((b, total), jnp.int32),
      ended=jnp.zeros((b,), bool), cache=cache, rng=rng,
      logprobs=jnp.zeros((b, total), jnp.float32))
  state = jax.device_put(state, _leaf_shardings(state, sharding))
  tokens, real = (jax.device_put(x, _leaf_shardings(x, sharding))
                  if isinstance(x, np.ndarray) else x for x in (tokens, real))
  # The context after its first token is what the sequence starts with.
  state = state._replace(sequences=_with_context(state.sequences, tokens))
  return _jitted_prefill(model_config, *settings)(
      params, state, tokens, real, temperature)


@jax.jit
def _with_context(sequences, tokens):
  return jax.lax.dynamic_update_slice_in_dim(sequences, tokens[:, 1:], 0, 1)


def sample_batch(model_config, params, contexts, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed=0, eos_id: int,
                 never: tuple[tuple[int, ...], int] | None = None
                 ) -> generate.SamplingState:
  """The finished sampling state of a batch of contexts: one prefill call
  (left-padded; the padding is never attended to and positions count real
  tokens only), then up to `max_new_tokens` - 1 cached steps, all rows at
  once, its rows spread over the mesh's data axes when they divide evenly.

  With c the context width, `sequences[:, c - 1:]` [b, max_new_tokens] are
  the new tokens (a row stops after `eos_id`, then 0s) and `logprobs[:, c -
  1:]` their log-probs (model/generate.py `_choose_tokens`). `contexts` as
  for `start_sampling`; `never`: ids never sampled (`never_sampled`;
  default none). Fixed shapes: the same context width and max_new_tokens
  reuse one compiled program. Rotary or sinusoidal positions, or learned
  ones within max_len (no sliding window here).
  """
  cfg = model_config
  tokens = contexts[0] if isinstance(contexts, tuple) else None
  b, c = tokens.shape if tokens is not None else (
      len(contexts), max(len(x) for x in contexts))
  if c < 1 or max_new_tokens < 1:
    raise ValueError('every context needs a token, and max_new_tokens >= 1')
  total = c - 1 + max_new_tokens
  if cfg.positions == 'learned' and total > cfg.max_len:
    raise ValueError(f'{total} positions are past the model\'s {cfg.max_len} '
                     f'learned ones; generate_text slides a window instead')
  sharding = _state_sharding(params, b)
  settings = (int(top_k), float(top_p), never or ((), cfg.vocab_size),
              sharding, int(eos_id))
  temp = jax.device_put(jnp.float32(temperature),
                        _leaf_shardings(jnp.float32(0), sharding))
  state = start_sampling(cfg, params, contexts, total=total,
                         settings=settings, temperature=temp, seed=seed)
  steps = _jitted_steps(cfg, 0, *settings)
  return steps(params, state, temp, np.int32(total))


def stream_batch(model_config, params, contexts: list[list[int]], *,
                 max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed=0, eos_id: int,
                 never: tuple[tuple[int, ...], int] | None = None,
                 width: int | None = None, rows: int | None = None,
                 chunk: int = STREAM_TOKENS, live=None):
  """`sample_batch`, yielding as it goes (chat and serve stream replies).

  Yields (new, ended) on the host after the prefill and after every `chunk`
  cached steps: `new` [b, n] the tokens sampled so far (0 after a row's
  `eos_id`), `ended` [b] bool. Stops at `max_new_tokens`, when every row
  has ended, or when `live()` (a [b] bool array: False for a row nobody
  reads any more) leaves no live row unended. `width` left-pads the contexts
  wider and `rows` adds dummy rows, so that nearby requests share one
  compiled program. Closing the generator early is safe.
  """
  cfg, b = model_config, len(contexts)
  width = width or max(len(x) for x in contexts)
  padded = list(contexts) + [contexts[0]] * ((rows or b) - b)
  tokens, real = left_pad(padded, width)
  total = width - 1 + max_new_tokens
  if cfg.positions == 'learned' and total > cfg.max_len:
    raise ValueError(f'{total} positions are past the model\'s {cfg.max_len}')
  sharding = _state_sharding(params, len(padded))
  settings = (int(top_k), float(top_p), never or ((), cfg.vocab_size),
              sharding, int(eos_id))
  temp = jax.device_put(jnp.float32(temperature),
                        _leaf_shardings(jnp.float32(0), sharding))
  state = start_sampling(cfg, params, (tokens, real), total=total,
                         settings=settings, temperature=temp, seed=seed)
  steps = _jitted_steps(cfg, 0, *settings)
  index = width   # the prefill sampled the token at width - 1
  while True:
    new = np.asarray(state.sequences)[:b, width - 1:index]
    ended = np.asarray(state.ended)[:b]
    yield new, ended
    alive = ~ended if live is None else (~ended & np.asarray(live(), bool))
    if index >= total or not alive.any():
      return
    state = steps(params, state, temp, np.int32(min(index + chunk, total)))
    index = int(state.index)


def generate_ids(run_or_config, params, contexts: list[list[int]], *,
                 max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int, never: tuple[tuple[int, ...], int] | None = None
                 ) -> list[list[int]]:
  """New ids for a batch of contexts of any lengths (`sample_batch`), each
  row up to and including its `eos_id`."""
  cfg = getattr(run_or_config, 'model_config', run_or_config)
  c = max(len(x) for x in contexts)
  state = sample_batch(cfg, params, contexts, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eos_id=eos_id, never=never)
  out = []
  for row in to_host(state.sequences)[:, c - 1:]:
    ids = row.tolist()
    out.append(ids[:ids.index(eos_id) + 1] if eos_id in ids else ids)
  return out


def _until_stop(ids: np.ndarray, stop: int) -> np.ndarray:
  """ids up to and including the first `stop` (what follows is fill: 0,
  which an imported tokenizer may read as a real token)."""
  hits = np.flatnonzero(ids == stop)
  return ids[:hits[0] + 1] if hits.size else ids


class _Detokenizer:
  """Text of the generated ids, decoded together with the prompt.

  Decoding the continuation alone loses what depends on its left context
  (SentencePiece drops a leading space; a character split across byte pieces
  shows as U+FFFD until its last byte arrives), so the prompt's ids are
  decoded with it and the prompt's text cut off.
  """

  def __init__(self, tokenizer, context: list[int]):
    self.tok, self.context = tokenizer, context
    self.prefix = self._decode([])

  def _decode(self, ids) -> str:
    return self.tok.decode([self.context + [int(i) for i in ids]])[0]

  def __call__(self, ids) -> str:
    text = self._decode(ids)
    if text.startswith(self.prefix):
      return text[len(self.prefix):]
    return self.tok.decode([list(ids)])[0]


class TextDeltas:
  """Ids as they grow -> the new text each time, for streaming: whole
  characters only (one split across byte pieces waits for its last byte,
  unless `final`). `decode`: ids -> text."""

  def __init__(self, decode):
    self.decode, self.shown = decode, ''

  def __call__(self, ids, final: bool = False) -> str:
    text = self.decode(ids)
    if not final:
      text = text.rstrip('\ufffd')
    if not text.startswith(self.shown):
      return ''
    delta, self.shown = text[len(self.shown):], text
    return delta


def generate_text(run, params, prompt: str, *, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int,
                  stream: IO[str] | None = None) -> str:
  """Samples a continuation of `prompt`: KV cache, steps looped on the device.

  Returns prompt + continuation (a chat model: its reply); with `stream`,
  the same text is written as tokens arrive (whole characters only). The
  same seed gives the same text; temperature 0 is greedy. Sampling stops at
  max_new_tokens or a sampled `stop_id` (EOS, never for character models;
  a chat template's end of turn); see never_sampled.
  """
  tok = run.task.tokenizer
  template = getattr(run.task, 'chat_template', None)
  start_id, forced = prompt_ids(tok, prompt, template)
  total = len(forced) + max_new_tokens
  if total == 0:
    if stream is not None:
      stream.write(prompt + '\n')
    return prompt
  cfg = run.model_config
  # Learned positions end at max_len: past it, a sliding window of the last
  # max_len tokens (no cache) continues the text.
  cached_len = min(total, cfg.max_len) if cfg.positions == 'learned' else total
  sharding = _state_sharding(params)
  settings = (int(start_id), int(top_k), float(top_p),
              never_sampled(tok, template), sharding, stop_id(tok, template))
  temperature = jnp.float32(temperature)
  temperature = jax.device_put(temperature,
                               _leaf_shardings(temperature, sharding))
  steps = _jitted_steps(cfg, *settings)
  if len(forced) < cached_len and max_new_tokens > 0:
    # The prompt in one call (prefill), then the first token sampled.
    state = start_sampling(cfg, params, [[start_id] + forced], total=total,
                           settings=settings[1:], temperature=temperature,
                           seed=seed, cache_len=cached_len)
  else:  # a prompt past learned positions' max_len: fed one per step
    cache = init_cache(DecoderLM(cfg.replace(decode=True)), 1, cached_len)
    prompt_arr = jnp.asarray([forced or [0]], jnp.int32)[:, :len(forced)]
    state = generate.init_sampling(prompt_arr, cache, jax.random.PRNGKey(seed),
                                   max_decode_len=total)
    state = jax.device_put(state, _leaf_shardings(state, sharding))
  # A reply is a turn of its own, decoded without the prompt's context.
  context = ([] if template or start_id == tok.eos_id
             else [start_id]) + ([] if template else forced)
  detok = _Detokenizer(tok, context)
  deltas = TextDeltas(detok)
  shown_prompt = '' if template else prompt
  if stream is not None:
    stream.write(shown_prompt)
    stream.flush()
  # Streamed text is read back every STREAM_TOKENS tokens, with numpy copies
  # on the host: slicing the device array to a new length would compile a
  # new program per length.
  chunk = STREAM_TOKENS if stream is not None else total
  index, ended = int(state.index), bool(np.asarray(state.ended).all())
  while index < total and not ended:
    if index == cached_len:
      steps = _jitted_steps(cfg, *settings, window=True)
      # The tokens fed so far: start_id, then every output but the last.
      fed = jnp.concatenate([jnp.full((1, 1), start_id, jnp.int32),
                             state.sequences[:, :cached_len - 1]], axis=1)
      state = state._replace(cache=jax.device_put(
          fed, _leaf_shardings(fed, sharding)))
    stop = min(index + chunk, cached_len if index < cached_len else total)
    state = steps(params, state, temperature, np.int32(stop))
    index, ended = int(state.index), bool(np.asarray(state.ended).all())
    if stream is not None and index > len(forced):
      sequence = np.asarray(state.sequences)[0]
      stream.write(deltas(_until_stop(sequence[len(forced):index],
                                      settings[-1])))
      stream.flush()
  ids = _until_stop(np.asarray(state.sequences)[0, len(forced):], settings[-1])
  if stream is not None:
    stream.write(deltas(ids, final=True) + '\n')
    stream.flush()
  return shown_prompt + detok(ids)


def generate_samples(run, params, prompt: str, *, num_samples: int = 1,
                     stream: IO[str] | None = None, seed: int = 0,
                     **kwargs) -> list[str]:
  """`num_samples` continuations (seeds seed, seed+1, ...), streamed in turn."""
  out = []
  for i in range(num_samples):
    if stream is not None and num_samples > 1:
      stream.write(f'--- sample {i + 1}/{num_samples}\n')
    out.append(generate_text(run, params, prompt, seed=seed + i, stream=stream,
                             **kwargs))
  return out


def decode_speed(model_config, params, batch: int, n: int) -> float:
  """Tokens/s of cached one-token decode steps (after compilation).

  `n` tokens per row (at most max_len) through the KV cache, every row
  decoding to the end; `transflax bench` reports batch 1 and 32.
  """
  n = min(n, model_config.max_len)
  # As generate_text decodes: XLA attention (one query per step).
  dmodel = DecoderLM(model_config.replace(decode=True, deterministic=True,
                                          attention_impl='xla'))

  # Params are an argument: closed over, they would become constants of the
  # program (GPT-2 small: 500 MB to embed and constant-fold).
  @jax.jit
  def run(params, rng):
    cache = init_cache(dmodel, batch, n)
    prompt = jnp.zeros((batch, n), jnp.int32)
    # eos_id -1: no row ends early, every step decodes all rows.
    return generate.temperature_sample(prompt, cache,
                                       generate.cached_step(dmodel, params), rng,
                                       eos_id=-1, temperature=1.0)

  jax.block_until_ready(run(params, jax.random.PRNGKey(0)))
  start = time.perf_counter()
  for seed in range(1, 4):
    jax.block_until_ready(run(params, jax.random.PRNGKey(seed)))
  return batch * n * 3 / (time.perf_counter() - start)
