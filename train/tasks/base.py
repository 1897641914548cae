"""What every task provides, and what they share: the tokenizer, model configs.

A task is the one place that knows its objective. The generic parts call:

  tokenizer, model_config         the vocabulary and the network's shape
  init_params(rng)                the trainable tree (logically boxed)
  frozen_sources()                frozen trees by name and where they come from
  loss(params, frozen, batch, rng) -> (loss_sum, weight, metric_sums)
  eval_loss(...)                  the same for evaluation (rng is None)
  eval_metrics(values)            reported names of the normalised eval sums
  train_dataset / eval_batches    host-local numpy batches (data/pipeline.py)
  periodic / at_end               the task's own evaluation (BLEU, samples, ...)
  flops_per_step(batch, counts)   model FLOPs of one train step on `batch`
  synthetic_batch(rows)           a batch of the right layout for `bench`

Every batch carries its loss mask (`loss_mask`, 1 where the loss counts)
and, when rows are packed, segment ids and positions; no task infers padding
from a token id.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import chat, sources
from data import tokenizer as tokenizers
from data.errors import UserError
from model import TransformerConfig, config_from_dict
from train import metrics as metrics_lib
from train import objectives

TOKENIZER_FILE = 'tokenizer.model'
# frozen_sources() value: the run's own train.init_from source.
INIT_FROM = 'init_from'


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


def token_eval_metrics(m: dict[str, float]) -> dict[str, float]:
  """Eval metrics of a token loss: plain cross-entropy, perplexity, accuracy."""
  return {'loss': m['nll'], 'perplexity': float(np.exp(m['nll'])),
          'accuracy': m['accuracy'], 'tokens': m['tokens']}


class Task:
  """Shared parts: tokenizer, model config, parameter init, default hooks.

  Subclasses set `name` (the registry key), `module_class` and
  `batch_keys`, and implement the objective and the datasets.
  """
  name = ''
  module_class: Any = None
  batch_keys: tuple[str, ...] = ()
  # Which loop trains it: 'supervised' (train/loop.py) or 'rl' (train/rl/).
  loop = 'supervised'
  # Its INIT_FROM frozen trees need train.init_from (else: the fresh params).
  needs_source = True

  def __init__(self, config, workdir: str | None, *, with_tokenizer=True,
               source=None):
    """`source`: the train.init_from run this fresh run starts from (its
    tokenizer is this run's), or None."""
    self.config = config
    self.workdir = workdir
    self.source = source
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
    """The workdir's tokenizer when resuming; else init_from's, the
    configured file's, or a newly trained one (saved into the workdir)."""
    tok_cfg = self.config.data.tokenizer
    saved = os.path.join(self.workdir, TOKENIZER_FILE) if self.workdir else None
    have = saved and os.path.exists(saved)
    if self.source is not None:
      tok = self.source.tokenizer()
      for other, what in ((saved if have else None, 'this workdir\'s'),
                          (tok_cfg.path or None, 'data.tokenizer.path')):
        if other and tokenizers.load(other).serialized != tok.serialized:
          raise UserError(
              f'vocabulary mismatch: {what} tokenizer {other} is not the one '
              f'of train.init_from={self.source.workdir}; a run started from '
              f'another run uses its tokenizer: remove {other} (or the '
              f'data.tokenizer.path override), or use a new --workdir')
    elif have:
      return tokenizers.load(saved)
    elif tok_cfg.path:
      tok = tokenizers.load(tok_cfg.path)
    else:
      tok = self._train_tokenizer(tok_cfg)
    if saved and not have and jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      tok.save(saved)
    return tok

  def load_chat_template(self):
    """data/chat.load_template for this run: the workdir's template, else the
    init_from source's, else data.chat_template's."""
    if self.tokenizer is None:
      return None
    inherited = self.source.meta.get('chat_template') if self.source else None
    return chat.load_template(
        self.workdir, self.config.data.get('chat_template', ''),
        self.tokenizer, inherited=inherited, save=jax.process_index() == 0)

  def _train_tokenizer(self, tok_cfg):
    raise UserError(f'task {self.name} does not train a tokenizer: give '
                    f'--config.data.tokenizer.path or --config.train.init_from')

  # -- model ----------------------------------------------------------------
  def module(self, *, train: bool = False, decode: bool = False):
    cfg = self.model_config.replace(deterministic=not train, decode=decode)
    return self.module_class(cfg)

  def init_params(self, rng):
    """The trainable params (boxed with logical axes) from a one-row dummy batch."""
    dummy = {k: jnp.ones((1, 8), jnp.int32) for k in self.batch_keys}
    return self.module().init(rng, *self._model_args(dummy))['params']

  def _model_args(self, batch) -> tuple:
    raise NotImplementedError

  def frozen_sources(self) -> dict[str, str]:
    """Frozen trees by name -> INIT_FROM or a WORKDIR[:STEP] spec. Each has
    the trainable tree's shapes (`init_params`) and is passed to `loss` in
    `frozen[name]`; none by default."""
    return {}

  def optimizer_steps(self, num_steps: int) -> int:
    """Optimizer updates in train.num_steps steps (the schedule's length)."""
    return num_steps

  # -- objective --------------------------------------------------------------
  def loss(self, params, frozen, batch, rng):
    """(loss_sum, weight, metric_sums); rng None = deterministic (eval)."""
    raise NotImplementedError

  def eval_loss(self, params, frozen, batch, rng=None):
    return self.loss(params, frozen, batch, rng)

  def eval_metrics(self, m: dict[str, float]) -> dict[str, float]:
    """Normalised eval sums -> the `eval/...` names to report (no prefix)."""
    return m

  # -- data -----------------------------------------------------------------
  def train_dataset(self, batch_size: int, shard_index: int, shard_count: int):
    raise NotImplementedError

  def eval_batches(self, split: str, batch_size: int, shard_index: int,
                   shard_count: int):
    """(corpus or None, pipeline.EvalBatches) of `split`."""
    raise NotImplementedError

  # -- evaluation beyond the loss ---------------------------------------------
  def periodic(self, run, params, step: int) -> dict[str, Any]:
    """Extra eval-time metrics (validation BLEU, a sample, ...)."""
    return {}

  def finalize(self, run, state, step: int):
    """(state, report): the last step's state as it is saved, and what to
    report of the change (a reward model's bias normalisation); runs once,
    when training reaches train.num_steps."""
    return state, {}

  def at_end(self, run, state, step: int) -> dict[str, Any]:
    """The final report of a finished run (test BLEU, a sample, ...)."""
    return {}

  def evaluate_split(self, run, params, split: str | None,
                     **options) -> dict[str, Any]:
    """`transflax eval`: the loss metrics over a whole split (default: the
    eval split); `options` are decoding flags some tasks take (beam_size)."""
    split = split or self.config.data.eval_split
    return {'split': split, **run.evaluate_loss(params, split, max_batches=0)}

  def meta(self) -> dict[str, Any]:
    """Task-specific entries of every checkpoint's meta (JSON)."""
    return {}

  # -- cost ---------------------------------------------------------------------
  def flops_per_step(self, batch: dict[str, np.ndarray],
                     counts: dict[str, int]) -> float:
    """Model FLOPs of one train step on `batch` (PaLM's 6N + attention, real
    tokens); `counts` is state.count_params of the trainable tree."""
    cfg = self.model_config
    tokens = float(np.sum(batch['loss_mask'] > 0))
    return tokens * metrics_lib.transformer_train_flops_per_token(
        counts['total'], cfg.num_decoder_layers, cfg.d_model,
        batch['inputs'].shape[-1])

  def synthetic_batch(self, rows: int) -> dict[str, np.ndarray]:
    """Full rows of random tokens in this task's batch layout (`bench`)."""
    rng = np.random.default_rng(0)
    length = self.synthetic_length()
    batch = {}
    for key in self.batch_keys:
      if key.endswith('_segmentation') or key == 'loss_mask':
        batch[key] = np.ones((rows, length), np.int32)
      elif key.endswith('_position'):
        batch[key] = np.broadcast_to(np.arange(length, dtype=np.int32),
                                     (rows, length)).copy()
      else:
        batch[key] = rng.integers(tokenizers.NUM_SPECIAL,
                                  self.model_config.vocab_size, (rows, length),
                                  dtype=np.int32)
    return batch

  def count_tokens(self, batch: dict[str, np.ndarray]) -> float:
    """The tokens a batch trains on, for tokens/s (`bench`)."""
    return float(np.sum(batch['loss_mask'] > 0))

  def synthetic_length(self) -> int:
    return self.config.data.seq_len

  def benchmark_extra(self, params, **options) -> dict[str, Any]:
    """More `bench` numbers beyond the train step (decode speed for LMs)."""
    return {}


REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls` the task `config.task == cls.name`."""
  if cls.name in REGISTRY:
    raise ValueError(f'task {cls.name!r} is registered twice')
  REGISTRY[cls.name] = cls
  return cls


__all__ = ['Task', 'model_config', 'split_files', 'token_eval_metrics',
           'INIT_FROM', 'TOKENIZER_FILE', 'objectives']
