"""Supervised fine-tuning on conversations: next-token loss on the assistant's turns.

Each conversation is rendered with the run's chat template (data/chat.py)
after an EOS (where every pretraining document started), and the loss mask
covers the assistant's content and end-of-turn tokens only: the prompt, the
role headers and the user's turns are context, never targets. Conversations
are first-fit packed into rows (segment ids and positions restart per
conversation; attention never crosses one). Longer conversations than
`data.max_length` are dropped and counted, never cut.

Data (`data.corpus`): `chitchat` (human conversations of the PyPI package
chitchat-dataset, cut into windows of `data.max_turns` turns; the first
speaker is the user) or `jsonl` (`data.files.<split>`: {"messages": [...]}
or {"prompt", "completion"} lines). Evaluation: cross-entropy, perplexity
and accuracy on the eval split's assistant tokens, and a reply to
`sample.prompt`.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from data import chat, pipeline
from data import tokenizer as tokenizers
from data.errors import UserError
from train import objectives
from train.tasks import base
from train.tasks.lm import DecoderTask


@base.register
class SFT(DecoderTask):
  """Instruction tuning: a DecoderLM learns the assistant's side of conversations."""
  name = 'sft'
  batch_keys = pipeline.SEQUENCE_KEYS

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    if self.tokenizer is not None and self.chat_template is None:
      raise UserError('task sft needs a chat template: set '
                      '--config.data.chat_template=simple (or chatml)')

  def synthetic_length(self) -> int:
    return self.config.data.max_length

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, dummy, dummy)['params']

  # -- objective --------------------------------------------------------------
  def loss(self, params, frozen, batch, rng):
    t = self.config.train
    outputs = self.outputs(params, batch['inputs'],
                           batch['inputs_segmentation'],
                           batch['inputs_position'], rng)
    return objectives.token_loss(outputs, batch['targets'], batch['loss_mask'],
                                 label_smoothing=t.label_smoothing,
                                 z_loss=t.z_loss)

  def eval_loss(self, params, frozen, batch, rng=None):
    outputs = self.outputs(params, batch['inputs'],
                           batch['inputs_segmentation'],
                           batch['inputs_position'], None)
    return objectives.token_loss(outputs, batch['targets'], batch['loss_mask'])

  def eval_metrics(self, m):
    return base.token_eval_metrics(m)

  # -- data -----------------------------------------------------------------
  def conversations(self, split: str) -> list[list[dict]]:
    d = self.config.data
    if d.corpus == 'chitchat':
      return chat.chitchat_conversations(split, d.max_turns)
    if d.corpus == 'jsonl':
      paths = base.split_files(d, split, 'FILE.jsonl[,FILE.jsonl...]')
      return [c for path in paths for c in chat.read_sft(path)]
    raise UserError(f'data.corpus={d.corpus!r} is not one of chitchat, jsonl '
                    f'for task sft')

  def examples(self, split: str) -> list[dict]:
    """Rendered conversations that fit data.max_length: inputs, targets and
    the loss mask, each one shorter than the rendered ids."""
    convs = self.conversations(split)
    out = []
    for ids, mask in self.chat_template.render_batch(self.tokenizer, convs):
      start = tokenizers.document_start(self.tokenizer)
      ids, mask = start + ids, [0] * len(start) + mask
      out.append({'inputs': ids[:-1], 'targets': ids[1:],
                  'loss_mask': mask[1:]})
    kept, dropped = pipeline.fit_length(
        out, self.config.data.max_length, f'sft {self.config.data.corpus} '
        f'{split}')
    if not kept:
      raise UserError(f'sft {split}: none of the {len(out)} conversations '
                      f'fits data.max_length={self.config.data.max_length}')
    logging.info('sft %s: %d conversations (%d longer than %d tokens '
                 'dropped)', split, len(kept), dropped,
                 self.config.data.max_length)
    return kept

  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    d, t = self.config.data, self.config.train
    return pipeline.sequence_train(
        self.examples(d.train_split), batch_size=batch_size,
        max_length=d.max_length, seed=t.seed, pack=d.pack,
        shard_index=shard_index, shard_count=shard_count)

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    return None, pipeline.sequence_eval_batches(
        self.examples(split), batch_size=batch_size,
        max_length=self.config.data.max_length, shard_index=shard_index,
        shard_count=shard_count)
