"""Tasks: what differs between translation and language modelling.

A task turns the experiment config into a tokenizer, a model, datasets and a
`forward(params, batch, rngs) -> (logits, targets)`; the loop, the steps and
the checkpoints are shared. Later objectives (reward models, DPO) are further
tasks with their own forward and datasets.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data import pipeline, sources
from data import tokenizer as tokenizers
from data import tokens as token_files
from data.errors import UserError
from model import DecoderLM, EncoderDecoder, TransformerConfig, config_from_dict
from train import objectives

TOKENIZER_FILE = 'tokenizer.model'


def model_config(config, vocab_size: int) -> TransformerConfig:
  """TransformerConfig from `config.model`; vocab_size 0 means the tokenizer's."""
  fields = config.model.to_dict()
  if fields.get('vocab_size', 0) in (0, None):
    fields['vocab_size'] = vocab_size
  elif fields['vocab_size'] < vocab_size:
    raise UserError(f'model.vocab_size={fields["vocab_size"]} is smaller than '
                    f'the tokenizer\'s {vocab_size}; set model.vocab_size=0 '
                    f'to use the tokenizer\'s size')
  try:
    cfg = config_from_dict(fields)
  except ValueError as e:
    raise UserError(f'model: {e}') from None
  if cfg.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise UserError(f'model.attention_impl=cudnn needs an NVIDIA GPU with '
                    f'cuDNN, and JAX runs on {jax.default_backend()!r} here; '
                    f'give --config.model.attention_impl=xla')
  return cfg


def split_files(data_config, split: str, form: str) -> list[str]:
  """The comma-separated paths of `data.files.<split>` (corpus parallel/text);
  a UserError naming the override to give when there are none."""
  paths = [p for p in str(data_config.files.to_dict().get(split) or '').split(',')
           if p]
  if not paths:
    raise UserError(f'data.files has no entry for split {split!r}; give '
                    f'--config.data.files.{split}={form}')
  return paths


class Task:
  """Shared parts: tokenizer, model configs, parameter init."""
  kind = ''

  def __init__(self, config, workdir: str | None, *, with_tokenizer=True):
    self.config = config
    self.workdir = workdir
    self.root = sources.data_root(config.data.dir or None)
    if with_tokenizer:
      self.tokenizer = self._tokenizer()
      vocab_size = self.tokenizer.vocab_size
    else:  # Shapes only (--dry_run): the vocabulary size must be configured.
      self.tokenizer, vocab_size = None, config.model.vocab_size
      if not vocab_size:
        raise UserError('model.vocab_size=0 means "the tokenizer\'s size", '
                        'which needs the data; set --config.model.vocab_size')
    self.model_config = model_config(config, vocab_size)

  # -- tokenizer ----------------------------------------------------------
  def _tokenizer(self):
    """Loads workdir/tokenizer.model when resuming, else trains or loads one."""
    tok_cfg = self.config.data.tokenizer
    saved = os.path.join(self.workdir, TOKENIZER_FILE) if self.workdir else None
    if saved and os.path.exists(saved):
      return tokenizers.load(saved)
    if tok_cfg.path:
      tok = tokenizers.load(tok_cfg.path)
    else:
      tok = self._train_tokenizer(tok_cfg)
    if saved and jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      tok.save(saved)
    return tok

  def _train_tokenizer(self, tok_cfg):
    raise NotImplementedError

  # -- model ----------------------------------------------------------------
  def module(self, *, train: bool = False, decode: bool = False):
    cfg = self.model_config.replace(deterministic=not train, decode=decode)
    return self.module_class(cfg)

  def init_params(self, rng):
    """The model's params (boxed with logical axes), from a one-row dummy batch."""
    dummy = {k: jnp.ones((1, 8), jnp.int32) for k in self.batch_keys}
    return self.module().init(rng, *self._model_args(dummy))['params']

  def forward(self, params, batch, rngs):
    """(logits [b, l, v] float32, targets [b, l]); dropout iff rngs has 'dropout'."""
    m = self.module(train='dropout' in rngs)
    logits = m.apply({'params': params}, *self._model_args(batch), rngs=rngs)
    return logits, batch['targets']


class Translation(Task):
  """Encoder-decoder translation on parallel text (Multi30k, WMT, files)."""
  kind = 'translation'
  module_class = EncoderDecoder
  batch_keys = pipeline.TRANSLATION_KEYS

  def __init__(self, config, workdir: str | None, *, with_tokenizer=True):
    if config.train.get('loss_chunk', 0):
      raise UserError('train.loss_chunk is for language models (task=lm); '
                      'set it to 0')
    super().__init__(config, workdir, with_tokenizer=with_tokenizer)

  def _model_args(self, b):
    return (b['inputs'], b['targets'], b['inputs_segmentation'],
            b['targets_segmentation'], b['inputs_position'],
            b['targets_position'])

  def corpus(self, split: str):
    d = self.config.data
    if d.corpus == 'multi30k':
      return sources.multi30k(split, d.src_lang, d.tgt_lang, root=self.root)
    if d.corpus == 'wmt':
      return sources.wmt(d.wmt_pair, split, d.src_lang, d.tgt_lang,
                         dataset=d.wmt_dataset)
    if d.corpus == 'parallel':
      paths = split_files(d, split, 'SRC_FILE,TGT_FILE or a .tsv')
      return (sources.read_tsv(paths[0]) if len(paths) == 1
              else sources.read_parallel(*paths))
    raise UserError(f'data.corpus={d.corpus!r} is not one of multi30k, wmt, '
                    f'parallel for task translation')

  def _train_tokenizer(self, tok_cfg):
    corpus = self.corpus(self.config.data.train_split)
    texts = [s for pair in corpus.pairs for s in pair]  # shared vocabulary
    return tokenizers.train_tokenizer(
        texts, vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
        character_coverage=tok_cfg.character_coverage,
        max_sentences=tok_cfg.max_sentences)

  def encode(self, corpus):
    src = self.tokenizer.encode([s for s, _ in corpus.pairs])
    tgt = self.tokenizer.encode([t for _, t in corpus.pairs])
    return list(zip(src, tgt))

  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    d, t = self.config.data, self.config.train
    corpus = self.corpus(d.train_split)
    ds = pipeline.translation_train(
        self.encode(corpus), batch_size=batch_size, max_length=d.max_length,
        seed=t.seed, pack=d.pack, shard_index=shard_index,
        shard_count=shard_count)
    logging.info('%s: %d pairs (%d empty dropped), %d longer than %d tokens '
                 'dropped', corpus.name, len(corpus), corpus.dropped_empty,
                 ds.num_dropped, d.max_length)
    return ds

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    corpus = self.corpus(split)
    return corpus, pipeline.translation_eval_batches(
        self.encode(corpus), batch_size=batch_size, shard_index=shard_index,
        shard_count=shard_count)


class LanguageModel(Task):
  """Decoder-only next-token prediction on plain text."""
  kind = 'lm'
  module_class = DecoderLM
  batch_keys = pipeline.LM_KEYS

  def __init__(self, config, workdir: str | None, *, with_tokenizer=True):
    super().__init__(config, workdir, with_tokenizer=with_tokenizer)
    chunk, length = config.train.get('loss_chunk', 0), config.data.seq_len
    if chunk and (not isinstance(chunk, int) or chunk < 0 or length % chunk):
      raise UserError(f'train.loss_chunk={chunk} must divide data.seq_len='
                      f'{length} (or be 0: all positions at once)')
    if chunk and not self.model_config.tie_output:
      raise UserError('train.loss_chunk needs tied output embeddings '
                      '(model.tie_output=True)')

  def _model_args(self, b):
    # Rows are contiguous blocks of one stream: causality alone is the right
    # mask (padding only ever trails, after every real query), and leaving
    # segments out lets a fused causal attention kernel run.
    return (b['inputs'], None, b['inputs_position'])

  def forward(self, params, batch, rngs):
    """As Task.forward; with train.loss_chunk, `objectives.Hidden` instead
    of the logits, which the loss then makes loss_chunk positions at a time."""
    chunk = self.config.train.get('loss_chunk', 0)  # absent: older workdirs
    if not chunk:
      return super().forward(params, batch, rngs)
    m = self.module(train='dropout' in rngs)
    states = m.apply({'params': params}, *self._model_args(batch), rngs=rngs,
                     return_hidden=True)

    def to_logits(h):
      return m.apply({'params': params}, h, method=DecoderLM.logits)
    return objectives.Hidden(states, to_logits, chunk), batch['targets']

  def text(self, split: str) -> str:
    d = self.config.data
    if d.corpus == 'tinyshakespeare':
      return sources.tinyshakespeare(split, root=self.root)
    if d.corpus == 'text':
      return sources.read_text(split_files(d, split, 'FILE[,FILE...]'))
    raise UserError(f'data.corpus={d.corpus!r} is not one of tinyshakespeare, '
                    f'text, tokens for task lm')

  def _train_tokenizer(self, tok_cfg):
    d = self.config.data
    if d.corpus == 'tokens':
      raise UserError('data.corpus=tokens reads ids, not text: set '
                      'data.tokenizer.path to the tokenizer the token files '
                      'were made with (`python -m data.tokens --tokenizer`)')
    if tok_cfg.type == 'char':
      # nanoGPT builds its vocabulary from the whole file.
      return tokenizers.CharTokenizer.from_text(
          self.text(d.train_split) + self.text(d.eval_split))
    text = self.text(d.train_split)
    return tokenizers.train_tokenizer(
        [line for line in text.split('\n') if line],
        vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type,
        character_coverage=tok_cfg.character_coverage,
        max_sentences=tok_cfg.max_sentences)

  def tokens(self, split: str) -> np.ndarray:
    d = self.config.data
    if d.corpus == 'tokens':  # prepared by data/tokens.py: memory-mapped
      paths = split_files(d, split, 'DIR/SPLIT.bin')
      if len(paths) != 1:
        raise UserError(f'data.files.{split}={",".join(paths)}: corpus=tokens '
                        'takes one token file per split')
      return token_files.load(paths[0], self.tokenizer)
    text = self.text(split)
    if isinstance(self.tokenizer, tokenizers.CharTokenizer):
      ids = self.tokenizer.encode(text, add_eos=False)
    else:
      # Documents are lines; each ends with EOS so the model learns breaks.
      ids = [i for row in self.tokenizer.encode(
          [l for l in text.split('\n') if l]) for i in row]
    ids = np.asarray(ids[0] if ids and isinstance(ids[0], list) else ids,
                     np.int32)
    return ids

  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    d, t = self.config.data, self.config.train
    tokens = self.tokens(d.train_split)
    try:
      return pipeline.lm_train(
          tokens, batch_size=batch_size, seq_len=d.seq_len, seed=t.seed,
          shard_index=shard_index, shard_count=shard_count)
    except UserError as e:  # too little text: say which
      source = d.files.to_dict().get(d.train_split) or d.corpus
      raise UserError(f'{source} ({d.train_split} split): {e}') from None

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    return None, pipeline.lm_eval_batches(
        self.tokens(split), batch_size=batch_size, seq_len=self.config.data.seq_len,
        shard_index=shard_index, shard_count=shard_count)


def make_task(config, workdir: str | None, *, with_tokenizer=True) -> Task:
  kinds = {'translation': Translation, 'lm': LanguageModel}
  if config.task not in kinds:
    raise UserError(f'task={config.task!r} is not one of {", ".join(kinds)}')
  return kinds[config.task](config, workdir, with_tokenizer=with_tokenizer)
