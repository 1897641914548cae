"""A tiny post-training chain for the tests: pretrain -> sft -> reward / dpo.

Generated data in a temporary directory (no corpus needed): sentences of a
small vocabulary for pretraining, conversations where the assistant repeats
what the user asked for, and preferences where the repetition is chosen
over a wrong answer. The config lives in a real experiment file
(`tiny_chat.py`, stages after the colon) so that in-process runs and `python
-m train` subprocesses train exactly the same thing.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import tiny_run

WORDS = ('the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'ran', 'far', 'and',
         'red', 'blue', 'big', 'small', 'sun', 'moon')

CONFIG_FILE = '''\
"""Tiny chat chain on generated data (written by tests/tiny_chat.py)."""
from experiments import defaults

FILES = {files!r}


def get_config(arg='pretrain'):
  c = defaults.get_config('gpt2_small')
  c.model.update(vocab_size=0, d_model=32, num_heads=4, mlp_dim=64,
                 num_encoder_layers=0, num_decoder_layers=2, max_len=64,
                 dropout_rate=0.1, attention_dropout_rate=0.0,
                 positions='learned', norm_position='pre', activation='gelu',
                 scale_embeddings=False, use_bias=False)
  c.data.chat_template = 'simple'
  c.data.tokenizer.vocab_size = 296
  c.data.max_length = 48
  c.data.seq_len = 16
  c.optimizer.update(schedule='constant', learning_rate=3e-3, warmup_steps=0)
  c.train.update(num_steps=12, batch_size=8, log_every=1, eval_every=0,
                 checkpoint_every=4, keep_checkpoints=10, best_metric='',
                 label_smoothing=0.0, eval_batch_size=8, max_eval_batches=1)
  c.sample.update(prompt='repeat: sun', max_new_tokens=6, num_samples=0)
  if arg in ('pretrain', 'mlm'):
    c.task, c.data.corpus = ('lm' if arg == 'pretrain' else 'mlm'), 'text'
    c.data.files.train, c.data.files.val = FILES['text'], FILES['text']
    if arg == 'mlm':  # the Encoder, BERT's objective
      c.model.update(num_encoder_layers=2, norm_position='post')
      c.data.tokenizer.vocab_size = 280
      c.train.update(num_steps=30, eval_every=30)
      c.model.dropout_rate = 0.0
  else:
    c.task, c.data.corpus = arg, 'jsonl'
    data = FILES['sft' if arg == 'sft' else 'prefs']
    c.data.files.train, c.data.files.val = data, data
    c.data.test_split = 'val'
    c.train.init_from = FILES['source_' + arg]
    if arg == 'dpo':
      c.dpo.beta = 0.5
      c.optimizer.learning_rate = 1e-3
  return c
'''


def _sentence(rng, n) -> str:
  return ' '.join(str(w) for w in rng.choice(WORDS, n))


def write(directory: pathlib.Path, *, sources: dict[str, str]) -> str:
  """Writes the corpora and tiny_chat.py; returns the config path.

  sources: 'source_sft', 'source_reward', 'source_dpo' -> the workdir each
  stage starts from (train.init_from).
  """
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  text = directory / 'text.txt'
  text.write_text('\n'.join(_sentence(rng, rng.integers(3, 9))
                            for _ in range(300)) + '\n')
  sft, prefs = directory / 'sft.jsonl', directory / 'prefs.jsonl'
  with open(sft, 'w') as f:
    for _ in range(64):
      ask = _sentence(rng, rng.integers(1, 4))
      turns = [{'role': 'user', 'content': f'repeat: {ask}'},
               {'role': 'assistant', 'content': ask}]
      if rng.random() < 0.5:  # multi-turn
        more = _sentence(rng, 2)
        turns += [{'role': 'user', 'content': f'repeat: {more}'},
                  {'role': 'assistant', 'content': more}]
      f.write(json.dumps({'messages': turns}) + '\n')
  with open(prefs, 'w') as f:
    for i in range(48):
      ask = _sentence(rng, rng.integers(1, 4))
      wrong = _sentence(rng, 3)
      if i % 2:
        f.write(json.dumps({'prompt': f'repeat: {ask}', 'chosen': ask,
                            'rejected': wrong}) + '\n')
      else:  # a ranking of 3 with the repetition first
        f.write(json.dumps({'prompt': f'repeat: {ask}',
                            'responses': [wrong, ask, f'{ask} {wrong}'],
                            'ranking': [1, 2, 0]}) + '\n')
  files = {'text': str(text), 'sft': str(sft), 'prefs': str(prefs), **sources}
  path = directory / 'tiny_chat.py'
  path.write_text(CONFIG_FILE.format(files=files))
  return str(path)


def load_config(path: str, stage: str, **overrides):
  """get_config(stage) of the experiment file, with dotted-key overrides."""
  return tiny_run.load_config(path, stage, **overrides)
