"""Grain pipelines: token ids in, fixed-shape int32 numpy batches out.

Batch contract (the model and train step depend on it exactly; every array is
numpy int32 of shape [batch, length]; padding is marked by segment ids 0 and
the loss by `loss_mask`, never inferred from a token id):

  translation  inputs, targets            token ids; targets end with EOS (the
                                          model shifts them right itself)
               inputs_segmentation,       1, 2, ... per packed example within a
               targets_segmentation       row, 0 on padding; an example has the
                                          same segment id on both sides
               inputs_position,           0, 1, ... restarting for each packed
               targets_position           example, 0 on padding
               loss_mask                  1 on every target token, 0 on padding
  LM           inputs, targets            block i of the token stream is
                                          stream[i*L : i*L + L + 1]; inputs are
                                          its first L tokens, targets its last L
               inputs_segmentation        1 on real tokens, 0 on padding
               inputs_position            0 .. L-1
               loss_mask                  1 on real targets, 0 on padding

Training datasets are infinite Grain `IterDataset`s: epochs repeat, each one
reshuffled deterministically from the seed; `iter(ds).get_state()` is a JSON
-serialisable dict, and a fresh iterator after `set_state` yields the same
batches. Each host builds its own with `shard_index=jax.process_index()`,
`shard_count=jax.process_count()` and reads only its slice; `batch_size` is
per host. Translation packing is first-fit with `batch_size` bins, grain's
FirstFitPackIterDataset algorithm done a batch at a time (faster: see
docs/performance/cpu.md). To
overlap batch preparation with the train step, wrap the dataset in
`grain.experimental.ThreadPrefetchIterDataset`; its state restores exactly too.

Evaluation gives `EvalBatches`: the whole split in order, each example exactly
once, the last batch padded with all-zero rows, plus the example index of
every row so outputs can be mapped back.

Tokenisation happens once up front (`tokenizer.encode`); pipelines take ids.
"""

import functools
import itertools
import math
from typing import Iterator, Sequence

from absl import logging
import grain
import numpy as np

from data.errors import UserError

TRANSLATION_KEYS = ('inputs', 'targets', 'inputs_segmentation',
                    'targets_segmentation', 'inputs_position', 'targets_position',
                    'loss_mask')
LM_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'inputs_position',
           'loss_mask')
# Everything is in memory already, or memory-mapped (data/tokens.py) and read
# a block per row: reader threads would only contend for the GIL (grain's own
# advice for in-memory sources). Worker processes (mp_prefetch) would pickle
# the token array, a memory-mapped file included, into each worker.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class TrainDataset(grain.IterDataset):
  """A training `IterDataset` plus what was left out to build it.

  Attributes:
    num_examples: examples (translation pairs, LM blocks) per epoch on this shard.
    num_dropped: left out of training before sharding: pairs with a side
      longer than max_length or empty (translation); trailing tokens that do
      not fill a block (LM).
  """

  def __init__(self, parent: grain.IterDataset, *, num_examples: int, num_dropped: int):
    super().__init__(parent)
    self.num_examples = num_examples
    self.num_dropped = num_dropped

  def __iter__(self):
    return self._parent.__iter__()

  def __str__(self) -> str:
    return f'TrainDataset(num_examples={self.num_examples}, num_dropped={self.num_dropped})'


def _check(**kwargs) -> None:
  for name, value in kwargs.items():
    if not (isinstance(value, (int, np.integer)) and value > 0):
      raise UserError(f'{name} must be a positive integer, got {value!r}.')


def _check_shard(shard_index: int, shard_count: int) -> None:
  _check(shard_count=shard_count)
  if not 0 <= shard_index < shard_count:
    raise UserError(f'shard_index {shard_index} must be in [0, {shard_count}).')


def _check_seed(seed: int) -> None:
  if not 0 <= seed < 2**32:
    raise UserError(f'seed must be in [0, 2**32), got {seed}.')


class _Ragged:
  """Variable-length int32 rows stored flat: row i is data[offsets[i]:offsets[i+1]]."""

  def __init__(self, rows: Sequence[Sequence[int]]):
    self.lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
    self.data = np.fromiter(itertools.chain.from_iterable(rows), np.int32, self.offsets[-1])

  def ones_like(self) -> '_Ragged':
    """Rows of 1s with this one's lengths (a loss mask covering every token)."""
    ones = _Ragged([])
    ones.lengths, ones.offsets = self.lengths, self.offsets
    ones.data = np.ones_like(self.data)
    return ones


def pad_row(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One example in its own row: (ids, segmentation, position), each [length]."""
  n = len(ids)
  padded = np.zeros((3, length), np.int32)
  padded[0, :n] = ids
  padded[1, :n] = 1
  padded[2, :n] = np.arange(n)
  return padded[0], padded[1], padded[2]


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order [num_examples] in which epoch `epoch` visits a shard's examples."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class _Packed(grain.IterDataset):
  """Endless batches from shuffled examples, first-fit packed.

  This is the algorithm of grain's FirstFitPackIterDataset (`batch_size` bins,
  no bin shuffling; tests check the two agree), done a batch at a time, so
  grain's per-element overhead is paid once per batch (docs/performance/
  cpu.md has the rates). Examples are drawn in `epoch_order` over
  an endless stream; the iterator state is the stream position of the first
  example not yet in a batch.

  `sides`: (side, {key: _Ragged}) pairs. An example fits a row when it fits
  on every side; the keys of one side share its layout and its
  `<side>_segmentation` and `<side>_position` arrays (translation: sides
  inputs and targets, the loss mask on the targets side; SFT: one side
  holding inputs, targets and loss_mask).
  """

  def __init__(self, sides: Sequence[tuple[str, dict[str, _Ragged]]],
               examples: np.ndarray, *, batch_size: int, max_length: int,
               seed: int, pack: bool):
    super().__init__()
    self.sides, self.examples = sides, examples
    self.lengths = [next(iter(fields.values())).lengths for _, fields in sides]
    self.batch_size, self.max_length, self.seed, self.pack = batch_size, max_length, seed, pack

  def __iter__(self):
    return _PackedIterator(self)


class _PackedIterator(grain.DatasetIterator):
  """Iterator of `_Packed`; state {'next_example': stream position}."""

  def __init__(self, ds: _Packed):
    super().__init__()
    self._ds = ds
    self._next = 0
    self._epoch, self._order = -1, None

  def get_state(self):
    return {'next_example': self._next}

  def set_state(self, state):
    self._next = int(state['next_example'])

  def _example(self, position: int) -> int:
    epoch, i = divmod(position, len(self._ds.examples))
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = self._ds.examples[epoch_order(len(self._ds.examples), self._ds.seed, epoch)]
    return int(self._order[i])

  def __next__(self) -> dict[str, np.ndarray]:
    ds = self._ds
    rows, length = ds.batch_size, ds.max_length
    used = [[0] * rows for _ in ds.sides]
    count = [0] * rows
    placed = []  # (example, row, segment, offset on each side)
    while True:
      ex = self._example(self._next)
      n = [int(lengths[ex]) for lengths in ds.lengths]
      for row in range(rows):  # First fit: the first row with room on every side.
        if (all(u[row] + k <= length for u, k in zip(used, n))
            and (ds.pack or not count[row])):
          break
      else:
        break  # Fits nowhere: the batch is full; this example starts the next.
      count[row] += 1
      placed.append((ex, row, count[row], *(u[row] for u in used)))
      for u, k in zip(used, n):
        u[row] += k
      self._next += 1
    ex, row, seg, *offsets = (np.array(c, np.int64) for c in zip(*placed))
    batch = {}
    for (side, fields), offset in zip(ds.sides, offsets):
      batch.update(_scatter(side, fields, ex, row, offset, seg, (rows, length)))
    return batch


def _scatter(side, fields, ex, row, offset, seg, shape) -> dict[str, np.ndarray]:
  """Writes examples `ex` of each field (ragged, one layout) at (row, offset)
  with segment ids `seg`, vectorised."""
  n = next(iter(fields.values())).lengths[ex]
  starts = np.repeat(np.cumsum(n) - n, n)
  position = np.arange(starts.size) - starts  # 0.. within each example
  dst = (np.repeat(row, n), np.repeat(offset, n) + position)
  out = {f'{side}_segmentation': np.zeros(shape, np.int32),
         f'{side}_position': np.zeros(shape, np.int32)}
  out[f'{side}_segmentation'][dst] = np.repeat(seg, n)
  out[f'{side}_position'][dst] = position
  for key, ragged in fields.items():
    out[key] = np.zeros(shape, np.int32)
    out[key][dst] = ragged.data[np.repeat(ragged.offsets[ex], n) + position]
  return out


def translation_train(pairs_ids: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                      batch_size: int, max_length: int, seed: int, pack: bool = True,
                      shard_index: int = 0, shard_count: int = 1) -> TrainDataset:
  """Infinite, shuffled translation batches [batch_size, max_length] (see module doc).

  Args:
    pairs_ids: (source ids, target ids) per example, as from `tokenizer.encode`
      (targets ending with EOS).
    batch_size: rows per batch on this host.
    max_length: row length. Pairs with a side longer than this (or empty)
      are dropped from training, counted in `num_dropped` and logged.
    seed: shuffle seed in [0, 2**32); epoch e is ordered by `epoch_order`.
    pack: first-fit several examples per row (`batch_size` bins per batch, as
      grain's FirstFitPackIterDataset); else one example per row.
    shard_index, shard_count: this host's slice (jax.process_index(), count).
  """
  _check(batch_size=batch_size, max_length=max_length)
  _check_shard(shard_index, shard_count)
  _check_seed(seed)
  inputs = _Ragged([s for s, _ in pairs_ids])
  targets = _Ragged([t for _, t in pairs_ids])
  # Filtered on the whole corpus before sharding, so every host agrees.
  # Empty sides are dropped too: they take no room, so could never fill a row.
  fits = ((inputs.lengths <= max_length) & (targets.lengths <= max_length)
          & (inputs.lengths > 0) & (targets.lengths > 0))
  keep = np.flatnonzero(fits)
  dropped = len(pairs_ids) - len(keep)
  if dropped:
    logging.warning('translation_train: dropped %d of %d pairs longer than '
                    'max_length=%d tokens (or empty) on a side.', dropped,
                    len(pairs_ids), max_length)
  shard = keep[shard_index::shard_count]
  if not len(shard):
    raise UserError(f'No training pairs for shard {shard_index} of {shard_count}: '
                    f'{len(keep)} of {len(pairs_ids)} pairs fit max_length={max_length}; '
                    'raise max_length or check the corpus.')
  # The loss covers every target token: a field of ones on the targets side.
  ds = _Packed([('inputs', {'inputs': inputs}),
                ('targets', {'targets': targets, 'loss_mask': targets.ones_like()})],
               shard, batch_size=batch_size, max_length=max_length, seed=seed,
               pack=pack)
  return TrainDataset(ds, num_examples=len(shard), num_dropped=dropped)


class _Block(grain.transforms.MapWithIndex):
  """(stream index, block i) -> LM example of L tokens starting near i*L.

  Epoch 0 uses the aligned grid stream[i*L : i*L+L+1]. Every later epoch
  shifts the whole grid by a seeded offset in [0, L), so training sees every
  window alignment over time, not the same num_blocks windows each epoch
  (a small corpus like Tiny Shakespeare otherwise overfits those few
  thousand windows; nanoGPT samples random offsets for the same reason). A
  block the shift would push past the end starts at the last full window.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, blocks_per_epoch: int,
               seed: int):
    self._tokens, self._len = tokens, seq_len
    self._per_epoch, self._seed = blocks_per_epoch, seed

  def map_with_index(self, index, i):
    offset = _epoch_offset(self._seed, index // self._per_epoch, self._len)
    start = min(i * self._len + offset, len(self._tokens) - 1 - self._len)
    block = self._tokens[start:start + self._len + 1].astype(np.int32)
    ones = np.ones(self._len, np.int32)
    return {'inputs': block[:-1], 'targets': block[1:],
            'inputs_segmentation': ones, 'loss_mask': ones,
            'inputs_position': np.arange(self._len, dtype=np.int32)}


@functools.lru_cache(maxsize=16)
def _epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
  """The block grid's shift in epoch `epoch` (see `_Block`), in [0, seq_len).

  Cached: a fresh Generator costs as much as the rest of a row.
  """
  if epoch == 0:
    return 0
  return int(np.random.default_rng([seed, epoch]).integers(seq_len))


def _lm_tokens(tokens) -> np.ndarray:
  """tokens as a 1-D integer array; token files (data/tokens.py) stay
  memory-mapped in their own dtype, rows are converted as they are read."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise UserError('LM tokens must be a 1-D integer array, got '
                    f'{tokens.dtype}{list(tokens.shape)}.')
  if tokens.dtype in (np.uint16, np.uint32):
    return tokens
  return tokens.astype(np.int32, copy=False)


def lm_train(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
             shard_index: int = 0, shard_count: int = 1) -> TrainDataset:
  """Infinite batches [batch_size, seq_len] of shuffled contiguous blocks of `tokens` [n].

  Each epoch visits every block of this shard once; epochs after the first
  shift the block grid by a seeded offset (see `_Block`).
  """
  _check(batch_size=batch_size, seq_len=seq_len)
  _check_shard(shard_index, shard_count)
  _check_seed(seed)
  tokens = _lm_tokens(tokens)
  num_blocks = max(len(tokens) - 1, 0) // seq_len
  if num_blocks < shard_count:
    raise UserError(f'{len(tokens)} tokens make {num_blocks} blocks of seq_len='
                    f'{seq_len}, fewer than the {shard_count} shards; use more '
                    'text or a shorter seq_len.')
  # Block i needs one token past its end; the tail that cannot is unused.
  dropped = len(tokens) - 1 - num_blocks * seq_len
  logging.info('lm_train: %d blocks of %d tokens; %d trailing tokens unused.',
               num_blocks, seq_len, dropped)
  blocks = grain.MapDataset.range(num_blocks)[shard_index::shard_count]
  ds = (blocks.shuffle(seed=seed).repeat()
        .map_with_index(_Block(tokens, seq_len, len(blocks), seed))
        .batch(batch_size, drop_remainder=True).to_iter_dataset(_READ))
  return TrainDataset(ds, num_examples=len(blocks), num_dropped=dropped)


class EvalBatches:
  """A re-iterable, finite, ordered sequence of eval batches (see module doc).

  Row r of batch b holds example `example_index[b][r]`, or is all zeros with
  index -1 (padding to fill the last batch). With several shards, batch b on
  shard h holds rows h*batch_size.. of global batch b, and every shard has the
  same number of batches (hosts must step together).

  Attributes:
    num_examples: examples in the whole split (all shards).
    length: row length (translation: max over the split rounded up to a
      multiple of 8, unless max_length was given).
    num_truncated: examples cut to `length` (only if max_length was given).
  """

  def __init__(self, make_row, num_examples: int, length: int, keys: Sequence[str], *,
               batch_size: int, shard_index: int, shard_count: int, num_truncated: int = 0,
               row_shapes: dict[str, tuple[int, ...]] | None = None):
    """row_shapes: each key's shape within a row (default [length])."""
    _check(batch_size=batch_size)
    _check_shard(shard_index, shard_count)
    self._make_row, self._keys = make_row, tuple(keys)
    self._shapes = {k: (row_shapes or {}).get(k, (length,)) for k in self._keys}
    self._batch_size, self._shard_index, self._shard_count = batch_size, shard_index, shard_count
    self.num_examples, self.length, self.num_truncated = num_examples, length, num_truncated

  def __len__(self) -> int:
    return math.ceil(self.num_examples / (self._batch_size * self._shard_count))

  def example_index(self, b: int) -> np.ndarray:
    """Example index of each row of batch b [batch] int32; -1 on padding rows."""
    start = (b * self._shard_count + self._shard_index) * self._batch_size
    index = np.arange(start, start + self._batch_size, dtype=np.int32)
    return np.where(index < self.num_examples, index, -1).astype(np.int32)

  def batch(self, b: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((self._batch_size, *self._shapes[k]), np.int32) for k in self._keys}
    for r, i in enumerate(self.example_index(b)):
      if i >= 0:
        for k, v in self._make_row(int(i)).items():
          out[k][r] = v
    return out

  def indexed(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields (example_index [batch], batch) in order."""
    for b in range(len(self)):
      yield self.example_index(b), self.batch(b)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return (self.batch(b) for b in range(len(self)))


def translation_eval_batches(pairs_ids: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                             batch_size: int, max_length: int | None = None,
                             shard_index: int = 0, shard_count: int = 1) -> EvalBatches:
  """Every pair once, in order, one per row, unpacked (segmentation 1, position 0..n-1).

  Args:
    max_length: None (default): rows as long as the longest side in the split,
      rounded up to a multiple of 8, so nothing is cut. An int: rows of exactly
      that length; longer sides are truncated, counted in `num_truncated` and
      logged (fixed shapes across corpora, at the cost of those examples).
  """
  longest = max((max(len(s), len(t)) for s, t in pairs_ids), default=1)
  length = max_length if max_length is not None else 8 * math.ceil(max(longest, 1) / 8)
  _check(max_length=length)
  truncated = sum(max(len(s), len(t)) > length for s, t in pairs_ids)
  if truncated:
    logging.warning('translation_eval_batches: truncated %d of %d pairs to '
                    'max_length=%d tokens.', truncated, len(pairs_ids), length)

  def make_row(i):
    out = {}
    for side, ids in zip(('inputs', 'targets'), pairs_ids[i]):
      ids = np.asarray(ids, np.int32)[:length]
      out[side], out[f'{side}_segmentation'], out[f'{side}_position'] = pad_row(ids, length)
    out['loss_mask'] = out['targets_segmentation']
    return out

  return EvalBatches(make_row, len(pairs_ids), length, TRANSLATION_KEYS, batch_size=batch_size,
                     shard_index=shard_index, shard_count=shard_count, num_truncated=truncated)


def lm_eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                    shard_index: int = 0, shard_count: int = 1) -> EvalBatches:
  """Blocks of `tokens` [n] in order, so each of tokens[1:] is a target exactly once.

  The last block may be short: its padding has inputs/targets/segmentation 0.
  """
  _check(seq_len=seq_len)
  tokens = _lm_tokens(tokens)
  num_blocks = math.ceil(max(len(tokens) - 1, 0) / seq_len)

  def make_row(i):
    block = tokens[i * seq_len:i * seq_len + seq_len + 1]
    n = len(block) - 1
    inputs, segmentation, position = pad_row(block[:-1], seq_len)
    targets = np.zeros(seq_len, np.int32)
    targets[:n] = block[1:]
    loss_mask = np.zeros(seq_len, np.int32)
    loss_mask[:n] = 1
    return {'inputs': inputs, 'targets': targets, 'loss_mask': loss_mask,
            'inputs_segmentation': segmentation, 'inputs_position': position}

  return EvalBatches(make_row, num_blocks, seq_len, LM_KEYS, batch_size=batch_size,
                     shard_index=shard_index, shard_count=shard_count)


# -- conversations and preferences ------------------------------------------------

SEQUENCE_KEYS = ('inputs', 'targets', 'loss_mask', 'inputs_segmentation',
                 'inputs_position')


def fit_length(examples: Sequence[dict], max_length: int, what: str
               ) -> tuple[list[dict], int]:
  """(examples whose 'inputs' fit max_length, how many did not). Longer
  ones are dropped whole and counted in the log, never truncated: a cut
  conversation would teach a reply without its end."""
  kept = [e for e in examples if len(e['inputs']) <= max_length]
  dropped = len(examples) - len(kept)
  if dropped:
    logging.warning('%s: dropped %d of %d longer than max_length=%d tokens',
                    what, dropped, len(examples), max_length)
  return kept, dropped


def sequence_train(examples: Sequence[dict], *, batch_size: int,
                   max_length: int, seed: int, pack: bool = True,
                   shard_index: int = 0, shard_count: int = 1) -> TrainDataset:
  """Infinite, shuffled, packed rows of token sequences with a loss mask.

  examples: dicts of equally long int sequences 'inputs', 'targets',
  'loss_mask' (SFT: a rendered conversation and its next tokens), each at
  most max_length (see `fit_length`). Batches: SEQUENCE_KEYS [batch_size,
  max_length]; packed examples are segments 1, 2, ... of a row, positions
  restart at 0, padding is 0 everywhere.
  """
  _check(batch_size=batch_size, max_length=max_length)
  _check_shard(shard_index, shard_count)
  _check_seed(seed)
  if any(len(e['inputs']) > max_length for e in examples):
    raise ValueError('sequence_train: examples longer than max_length; '
                     'drop them first (fit_length)')
  fields = {k: _Ragged([e[k] for e in examples])
            for k in ('inputs', 'targets', 'loss_mask')}
  shard = np.arange(len(examples))[shard_index::shard_count]
  if not len(shard):
    raise UserError(f'No training examples for shard {shard_index} of '
                    f'{shard_count} ({len(examples)} in all).')
  ds = _Packed([('inputs', fields)], shard, batch_size=batch_size,
               max_length=max_length, seed=seed, pack=pack)
  return TrainDataset(ds, num_examples=len(shard), num_dropped=0)


def sequence_eval_batches(examples: Sequence[dict], *, batch_size: int,
                          max_length: int, shard_index: int = 0,
                          shard_count: int = 1) -> EvalBatches:
  """Every example once, in order, one per row (SEQUENCE_KEYS)."""

  def make_row(i):
    e = examples[i]
    ids, seg, pos = pad_row(np.asarray(e['inputs'], np.int32), max_length)
    return {'inputs': ids, 'inputs_segmentation': seg, 'inputs_position': pos,
            'targets': pad_row(np.asarray(e['targets'], np.int32), max_length)[0],
            'loss_mask': pad_row(np.asarray(e['loss_mask'], np.int32),
                              max_length)[0]}

  return EvalBatches(make_row, len(examples), max_length, SEQUENCE_KEYS,
                     batch_size=batch_size, shard_index=shard_index,
                     shard_count=shard_count)


def examples_train(rows: Sequence[dict[str, np.ndarray]], *, batch_size: int,
                   seed: int, shard_index: int = 0,
                   shard_count: int = 1) -> TrainDataset:
  """Infinite batches of fixed-shape examples, reshuffled every epoch.

  rows: dicts of int32 arrays, the same shapes in every row (a ranking's K
  responses [K, length], a chosen/rejected pair [2, length]); a batch
  stacks batch_size of them.
  """
  _check(batch_size=batch_size)
  _check_shard(shard_index, shard_count)
  _check_seed(seed)
  examples = grain.MapDataset.source(list(rows))[shard_index::shard_count]
  if not len(examples):
    raise UserError(f'No training examples for shard {shard_index} of '
                    f'{shard_count} ({len(rows)} in all).')
  ds = (examples.shuffle(seed=seed).repeat()
        .batch(batch_size, drop_remainder=True).to_iter_dataset(_READ))
  return TrainDataset(ds, num_examples=len(examples), num_dropped=0)


def examples_eval_batches(rows: Sequence[dict[str, np.ndarray]], *,
                          batch_size: int, shard_index: int = 0,
                          shard_count: int = 1) -> EvalBatches:
  """Every fixed-shape example once, in order; padding rows are all 0."""
  if not rows:
    raise UserError('no evaluation examples')
  shapes = {k: v.shape for k, v in rows[0].items()}
  return EvalBatches(lambda i: rows[i], len(rows), 0, tuple(shapes),
                     batch_size=batch_size, shard_index=shard_index,
                     shard_count=shard_count, row_shapes=shapes)
