"""Judge a chat model from outside: `transflax judge --workdir DIR`.

Replies to held-out prompts (the first 160 that fit of the opening turns of
chitchat's `test` chats, which no stage of experiments/chat.py trains or
evaluates on; `--num_prompts 0` for all; or
`--prompts FILE`: JSONL {"prompt"} / {"messages"} lines, or one prompt per
line) are sampled from the workdir's model (`--temperature`, 1 by default:
the policy's own distribution, so that the KL below is the policy's) and
scored by three judges, none of them trained by this codebase:

  positivity  VADER's compound score (vaderSentiment: rule-based, built and
              validated against human ratings by Hutto & Gilbert 2014), -1..1,
              averaged over the replies;
  fluency     the perplexity of the replies under an independent pretrained
              model (`--fluency_model`, an imported SmolLM2-135M-Instruct by
              default): each reply's text re-tokenised with its tokenizer,
              after the prompt rendered with its chat template; exp of the
              mean negative log-likelihood per reply token, over all replies;
  closeness   the KL of the policy to its reference (the run's frozen
              reference, i.e. its `train.init_from` for dpo/ppo/grpo runs;
              the model itself otherwise, KL 0; `--reference DIR` to choose):
              the exact KL of the two next-token distributions summed over
              each reply's tokens (its end token included), averaged over
              the replies (nats per reply).

With `--reward_model DIR` the replies are also scored by that reward model
(ours), to show whether its gain transfers to the outside judge.
The numbers are printed as one JSON line and written under "judge" into
the workdir's results.json (other keys kept), with a few sample replies.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import chat
from data import tokenizer as tokenizers
from data.errors import UserError
from train import objectives, runs, sampling
from train.chat import ChatModel
from train.rl import rollout as rollout_lib

DEFAULT_FLUENCY = 'runs/smollm2'
BATCH = 32


def held_out_prompts(path: str | None) -> list[list[dict]]:
  """The judged prompts: a file's, or chitchat's test openings."""
  if path:
    prompts = chat.read_prompts(path)
  else:
    prompts = [[{'role': 'user', 'content': c[0]}]
               for c in chat.chitchat_chats('test')]
  return prompts


def vader_scores(texts: list[str]) -> np.ndarray:
  try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  except ImportError:
    raise UserError('the positivity judge needs VADER: pip install -e '
                    '".[chat]" (vaderSentiment)') from None
  analyzer = SentimentIntensityAnalyzer()
  return np.asarray([analyzer.polarity_scores(t)['compound'] for t in texts])


@jax.jit
def _reply_kl(policy_logits, reference_logits, mask):
  """[b] sum over each reply's tokens of KL(policy || reference)."""
  kl = objectives.token_kl(policy_logits, reference_logits)
  return jnp.sum(kl * mask, axis=-1)


def _logits_fn(model: ChatModel, never, width: int):
  """The reply positions' logits as the sampler sees them (plus `never`,
  the judged model's never-sampled mask, for both models)."""
  def logits(params, tokens, segments, positions):
    out = model.module.apply({'params': params}, tokens, segments, positions)
    out = out[:, width - 1:-1].astype(jnp.float32)
    return out + sampling.logits_mask(never, model.config.vocab_size)
  return jax.jit(logits)


@functools.lru_cache(maxsize=2)
def _fluency_model(workdir: str) -> tuple[ChatModel, Any]:
  """The fluency model and its jitted NLL, loaded once per process (the
  judge of several runs reuses them)."""
  fluency = ChatModel(workdir, 'latest', '--fluency_model')

  @jax.jit
  def nll(params, tokens, segments, positions, mask):
    logits = fluency.module.apply({'params': params}, tokens, segments,
                                  positions).astype(jnp.float32)
    logp = objectives.token_logprobs(logits[:, :-1], tokens[:, 1:])
    return -jnp.sum(logp * mask[:, 1:], axis=-1)
  return fluency, nll


def _fluency_nll(workdir: str, prompts, replies: list[str]):
  """Per reply: (sum of negative log-likelihoods, tokens) under the
  fluency model, each reply after its prompt in that model's template."""
  fluency, nll = _fluency_model(workdir)
  tok, t = fluency.tokenizer, fluency.template
  rows = []
  for messages, reply in zip(prompts, replies):
    context = tokenizers.document_start(tok) + t.prompt(tok, messages)
    ids = list(tok.encode(reply, add_eos=False)) if reply.strip() else []
    rows.append((context, ids))

  out = np.zeros(len(rows)), np.zeros(len(rows), np.int64)
  for lo in range(0, len(rows), BATCH):
    part = rows[lo:lo + BATCH]
    width = max(len(c) + len(r) for c, r in part)
    width = -(-width // 32) * 32   # few shapes, few compiles
    arrays = {k: np.zeros((BATCH, width), np.int32)
              for k in ('tokens', 'segments', 'positions', 'mask')}
    for i, (context, reply) in enumerate(part):
      ids = context + reply
      arrays['tokens'][i, :len(ids)] = ids
      arrays['segments'][i, :len(ids)] = 1
      arrays['positions'][i, :len(ids)] = np.arange(len(ids))
      arrays['mask'][i, len(context):len(ids)] = 1
    sums = np.asarray(nll(fluency.params, arrays['tokens'], arrays['segments'],
                          arrays['positions'], arrays['mask']))
    out[0][lo:lo + len(part)] = sums[:len(part)]
    out[1][lo:lo + len(part)] = arrays['mask'][:len(part)].sum(axis=1)
  return out


def judge(workdir: str, *, prompts: str | None = None, checkpoint: str | None = None,
          reference: str | None = None, fluency_model: str | None = DEFAULT_FLUENCY,
          reward_model: str | None = None, num_prompts: int = 160,
          max_new_tokens: int = 48, max_prompt_length: int = 64,
          temperature: float = 1.0, seed: int = 0) -> dict:
  """The three judges' numbers for one chat workdir (module docstring)."""
  started = time.time()
  judged = ChatModel(workdir, checkpoint, '--workdir')
  run = judged.run
  if reference is None:
    has_reference = 'reference' in run.task.frozen_sources()
    reference = run.config.train.init_from if has_reference else ''
  ref = ChatModel(reference.split(':')[0],
                  reference.partition(':')[2] or 'latest', '--reference',
                  need_template=False) if reference else judged
  if ref is not judged and ref.run.meta.get('tokenizer_sha') != run.meta.get(
      'tokenizer_sha'):
    raise UserError(f'--reference {reference} has another tokenizer than '
                    f'{workdir}; the KL compares the same tokens under both '
                    f'models, so give a run they share a vocabulary with')
  width, length = max_prompt_length, max_new_tokens
  if (judged.config.positions == 'learned'
      and width + length > judged.config.max_len):
    raise UserError(f'--max_prompt_length + --max_new_tokens = {width + length}'
                    f' is past the model\'s {judged.config.max_len} positions')
  messages, contexts, dropped = [], [], 0
  for m in held_out_prompts(prompts):
    ids = judged.context(m)
    if len(ids) > width:
      dropped += 1
      continue
    messages.append(m)
    contexts.append(ids)
  if num_prompts:
    messages, contexts = messages[:num_prompts], contexts[:num_prompts]
  if not contexts:
    raise UserError(f'no prompt fits --max_prompt_length={width}')

  policy_logits = _logits_fn(judged, judged.never, width)
  ref_logits = (policy_logits if ref is judged
                else _logits_fn(ref, judged.never, width))
  key = jax.random.PRNGKey(seed)
  replies, kls, lengths, ended_all = [], [], [], []
  for lo in range(0, len(contexts), BATCH):
    part = contexts[lo:lo + BATCH]
    n = len(part)
    part = part + [part[0]] * (BATCH - n)   # one shape for every batch
    r = rollout_lib.sample_rows(
        judged.config, judged.params, run.mesh, part,
        jax.random.fold_in(key, lo), width=width, length=length,
        temperature=temperature, stop=judged.stop, never=judged.never)
    mask = r.mask.astype(jnp.float32)
    kl = _reply_kl(policy_logits(judged.params, r.tokens, r.segments,
                                 r.positions),
                   ref_logits(ref.params, r.tokens, r.segments, r.positions),
                   mask) if ref is not judged else jnp.zeros(BATCH)
    ids, ended = rollout_lib.responses(r, width, judged.stop)
    replies += ids[:n]
    kls += sampling.to_host(kl)[:n].tolist()
    lengths += sampling.to_host(r.mask).sum(axis=1)[:n].tolist()
    ended_all += ended[:n].tolist()
  texts = judged.tokenizer.decode(replies)
  positivity = vader_scores(texts)
  result = {
      'workdir': workdir,
      'checkpoint': checkpoint or runs.reported_checkpoint(workdir),
      'prompts': prompts or 'chitchat:test', 'num_prompts': len(texts),
      'num_prompts_limit': num_prompts,
      'prompts_too_long': dropped, 'temperature': temperature,
      'max_new_tokens': length, 'seed': seed,
      'positivity': float(positivity.mean()),
      'positivity_sem': float(positivity.std() / math.sqrt(len(texts))),
      'kl': float(np.mean(kls)), 'kl_sem': float(np.std(kls) / math.sqrt(
          len(kls))), 'reference': reference or workdir,
      'reply_tokens': float(np.mean(lengths)),
      'ended': float(np.mean(ended_all)),
  }
  if reward_model:
    from train.rl import rewards
    length_rm = -(-(width + length + 16) // 8) * 8
    scorer = rewards.ModelReward(reward_model, run, context='response',
                                 length=length_rm)
    scorer.load(fresh=True, save=False)
    scores = np.concatenate([scorer(messages[i:i + BATCH],
                                    replies[i:i + BATCH],
                                    np.asarray(ended_all[i:i + BATCH]))
                             for i in range(0, len(replies), BATCH)])
    result.update(reward_model=reward_model,
                  reward_mean=float(scores.mean()))
  if fluency_model:
    if not os.path.isdir(fluency_model):
      raise UserError(f'--fluency_model {fluency_model} not found: import '
                      f'SmolLM2 first (`transflax import --from ../shared/'
                      f'models/<the .gguf> --workdir {fluency_model}`), or '
                      f'give --fluency_model= to skip fluency')
    sums, counts = _fluency_nll(fluency_model, messages, texts)
    result.update(fluency_model=fluency_model,
                  fluency_ppl=float(math.exp(sums.sum() / max(counts.sum(), 1))),
                  fluency_empty_replies=int((counts == 0).sum()))
  result['seconds'] = round(time.time() - started, 1)
  result['samples'] = [{'prompt': m[-1]['content'], 'reply': t}
                       for m, t in list(zip(messages, texts))[:5]]
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'results.json')
    saved = {}
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
    saved['judge'] = result
    with open(path, 'w') as f:
      json.dump(saved, f, indent=2)
  return result
