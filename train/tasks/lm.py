"""Language modelling: a decoder-only Transformer predicting the next token (GPT).

Rows are contiguous blocks of one token stream (data/pipeline.lm_train), so
causality alone is the attention mask; the loss covers the batch's
`loss_mask` (every real target; the last eval block's padding is 0). With
`train.loss_chunk` the logits are made a slice of positions at a time
(objectives.Hidden). Evaluation: cross-entropy and perplexity over the whole
eval split, and a sample (train/sampling.py) at every evaluation and at the
end.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from data import chat, pipeline, sources
from data import tokenizer as tokenizers
from data import tokens as token_files
from data.errors import UserError
from model import DecoderLM
from train import objectives, sampling
from train.tasks import base


class DecoderTask(base.Task):
  """What the decoder-only tasks (lm, sft, dpo) share: the DecoderLM, its
  logits with or without `train.loss_chunk`, sampling."""
  module_class = DecoderLM

  def __init__(self, config, workdir, **kwargs):
    super().__init__(config, workdir, **kwargs)
    chunk, length = config.train.get('loss_chunk', 0), self.synthetic_length()
    if chunk and (not isinstance(chunk, int) or chunk < 0 or length % chunk):
      raise UserError(f'train.loss_chunk={chunk} must divide the row length '
                      f'{length} (or be 0: all positions at once)')
    if chunk and not self.model_config.tie_output:
      raise UserError('train.loss_chunk needs tied output embeddings '
                      '(model.tie_output=True)')
    self.chat_template = self._chat_template()

  def _chat_template(self) -> chat.ChatTemplate | None:
    return self.load_chat_template()

  def meta(self):
    return {'chat_template': self.chat_template.to_json()
            if self.chat_template else None}

  def outputs(self, params, tokens, segments, positions, rng):
    """logits [b, l, v] float32, or objectives.Hidden with train.loss_chunk."""
    rngs = {} if rng is None else {'dropout': rng}
    m = self.module(train=rng is not None)
    chunk = self.config.train.get('loss_chunk', 0)  # absent: older workdirs
    if not chunk:
      return m.apply({'params': params}, tokens, segments, positions,
                     rngs=rngs)
    states = m.apply({'params': params}, tokens, segments, positions,
                     rngs=rngs, return_hidden=True)

    def to_logits(h):
      return m.apply({'params': params}, h, method=DecoderLM.logits)
    return objectives.Hidden(states, to_logits, chunk)

  def benchmark_extra(self, params, *, decode_batches=(1, 32),
                      decode_tokens=64):
    """Cached decode tokens/s at each batch size (`transflax bench`)."""
    return {f'decode_tokens_per_sec_batch{b}': sampling.decode_speed(
        self.model_config, params, b, decode_tokens) for b in decode_batches}

  def sample(self, run, params, *, seed: int, stream=None) -> str:
    s = self.config.sample
    return sampling.generate_text(
        run, params, s.prompt, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed,
        stream=stream)

  def periodic(self, run, params, step):
    """A sample at every evaluation, appended to samples.txt."""
    text = self.sample(run, params, seed=step)
    if jax.process_index() == 0:
      with open(os.path.join(run.workdir, 'samples.txt'), 'a') as f:
        f.write(f'--- step {step}\n{text}\n')
    run.last_sample = (step, text)
    return {}

  def at_end(self, run, state, step):
    """Shows a sample (sample.num_samples 0: none): the last evaluation's if
    it ran at this step."""
    if not self.config.sample.num_samples:
      return {}
    chief = jax.process_index() == 0
    if chief:
      print(f'--- sample after {step} steps:', flush=True)
    if run.last_sample and run.last_sample[0] == step:
      if chief:
        print(run.last_sample[1], flush=True)
      return {}
    self.sample(run, state.params, seed=0, stream=sys.stdout if chief else None)
    return {}


class TextCorpus:
  """Plain-text corpora as one token stream in blocks of data.seq_len (the
  rows of tasks lm and mlm): the corpus, the tokenizer trained on it, the
  token ids, the train and eval pipelines."""

  def text(self, split: str) -> str:
    d = self.config.data
    if d.corpus == 'tinyshakespeare':
      return sources.tinyshakespeare(split, root=self.root)
    if d.corpus == 'text':
      return sources.read_text(base.split_files(d, split, 'FILE[,FILE...]'))
    if d.corpus == 'chitchat':
      return chat.chitchat_text(split)
    raise UserError(f'data.corpus={d.corpus!r} is not one of tinyshakespeare, '
                    f'text, chitchat, tokens for task lm')

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
        max_sentences=tok_cfg.max_sentences,
        control_symbols=self.control_symbols())

  def control_symbols(self) -> tuple[str, ...]:
    """Pieces the tokenizer reserves: a later chat's template pieces."""
    return chat.control_symbols(self.config.data.get('chat_template', ''))

  def tokens(self, split: str) -> np.ndarray:
    d = self.config.data
    if d.corpus == 'tokens':  # prepared by data/tokens.py: memory-mapped
      paths = base.split_files(d, split, 'DIR/SPLIT.bin')
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
        self.tokens(split), batch_size=batch_size,
        seq_len=self.config.data.seq_len, shard_index=shard_index,
        shard_count=shard_count)


@base.register
class LanguageModel(TextCorpus, DecoderTask):
  """Decoder-only next-token prediction on plain text."""
  name = 'lm'
  batch_keys = pipeline.LM_KEYS

  def _chat_template(self):
    # data.chat_template only reserves the template's pieces in the tokenizer
    # of a pretraining LM; it never saw the template, so prompts stay text
    # (`generate --chat` uses the workdir's template, see meta).
    return None

  def meta(self):
    # An imported chat model's template (in the workdir) goes to runs that
    # start from this one (train.init_from).
    path = os.path.join(self.workdir or '', chat.TEMPLATE_FILE)
    if self.workdir and os.path.exists(path) and self.tokenizer is not None:
      template = chat.load_template(self.workdir, '', self.tokenizer,
                                    save=False)
      return {'chat_template': template.to_json()}
    return super().meta()

  def loss(self, params, frozen, batch, rng):
    t = self.config.train
    # Rows are contiguous blocks of one stream: causality alone is the right
    # mask (padding only ever trails, after every real query), and leaving
    # segments out lets a fused causal attention kernel run.
    outputs = self.outputs(params, batch['inputs'], None,
                           batch['inputs_position'], rng)
    return objectives.token_loss(outputs, batch['targets'], batch['loss_mask'],
                                 label_smoothing=t.label_smoothing,
                                 z_loss=t.z_loss)

  def eval_loss(self, params, frozen, batch, rng=None):
    outputs = self.outputs(params, batch['inputs'], None,
                           batch['inputs_position'], None)
    return objectives.token_loss(outputs, batch['targets'], batch['loss_mask'])

  def eval_metrics(self, m):
    return base.token_eval_metrics(m)

  def init_params(self, rng):
    dummy = np.ones((1, 8), np.int32)
    return self.module().init(rng, dummy, None, dummy)['params']
