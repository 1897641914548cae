"""Tests for data/pipeline.py: the batch contract, packing, sharding, resume, eval order."""

import collections
import json
import logging

import grain
from grain import experimental as grain_x
import numpy as np
import pytest

from data import pipeline
from data.errors import UserError

_EOS = 1


def _pairs(n: int, max_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """n pairs; source i starts with the unique token 1000+i, targets end with EOS."""
  rng = np.random.default_rng(seed)
  return [([1000 + i] + rng.integers(4, 50, rng.integers(0, max_len)).tolist(),
           rng.integers(4, 50, rng.integers(0, max_len)).tolist() + [_EOS])
          for i in range(n)]


def _take(ds, steps: int) -> list[dict[str, np.ndarray]]:
  it = iter(ds)
  return [next(it) for _ in range(steps)]


def _check_contract(batch, keys, shape):
  assert sorted(batch) == sorted(keys)
  for v in batch.values():
    assert v.dtype == np.int32 and v.shape == shape


def _unpack(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """The examples in a packed translation batch, checking segment ids and positions."""
  examples = []
  for r in range(batch['inputs'].shape[0]):
    sides = []
    for side in ('inputs', 'targets'):
      ids, seg, pos = (batch[side + k][r] for k in ('', '_segmentation', '_position'))
      real = seg > 0
      n = real.sum()
      # Examples fill the row from the left; padding is all zeros.
      assert real[:n].all() and not (ids[n:] | seg[n:] | pos[n:]).any()
      assert (ids[:n] != 0).all()
      assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
      segments = [ids[seg == s] for s in range(1, seg.max() + 1)]
      for s in range(1, seg.max() + 1):
        assert (pos[seg == s] == np.arange((seg == s).sum())).all()
      sides.append(segments)
    assert len(sides[0]) == len(sides[1])  # Same segment ids on both sides.
    examples += [(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(*sides)]
  return examples


def test_packing_keeps_every_token_exactly_once():
  pairs = _pairs(n=50, max_len=12)
  ds = pipeline.translation_train(pairs, batch_size=4, max_length=16, seed=7)
  batches = _take(ds, 60)
  _check_contract(batches[0], pipeline.TRANSLATION_KEYS, (4, 16))
  seen = [ex for b in batches for ex in _unpack(b)]
  source = {i: (tuple(s), tuple(t)) for i, (s, t) in enumerate(pairs)}
  for ex in seen:  # Every packed example is a source example, token for token.
    assert ex == source[ex[0][0] - 1000]
  # Batches consume a prefix of the epoch stream: k full epochs plus r examples.
  k, r = divmod(len(seen), len(pairs))
  counts = collections.Counter(ex[0][0] for ex in seen)
  assert k >= 2 and sorted(counts.values()) == [k] * (len(pairs) - r) + [k + 1] * r
  assert len(seen) > 1.5 * len(batches) * 4  # Really packed: several per row.


def test_packing_matches_grain_first_fit():
  """Same stream in, same rows out as grain's FirstFitPackIterDataset."""
  pairs = _pairs(n=40, max_len=10, seed=1)
  ours = _take(pipeline.translation_train(pairs, batch_size=4, max_length=12, seed=3), 25)
  stream = np.concatenate([pipeline.epoch_order(40, 3, e) for e in range(10)])
  ref = grain.MapDataset.source(stream).map(lambda i: {
      'inputs': np.asarray(pairs[i][0], np.int32),
      'targets': np.asarray(pairs[i][1], np.int32)}).to_iter_dataset()
  ref = grain_x.FirstFitPackIterDataset(
      ref, length_struct={'inputs': 12, 'targets': 12}, num_packing_bins=4,
      shuffle_bins=False).batch(4)
  for a, b in zip(ours, _take(ref, 25)):
    for side in ('inputs', 'targets'):
      np.testing.assert_array_equal(a[side], b[side])
      np.testing.assert_array_equal(a[side + '_segmentation'], b[side + '_segment_ids'])
      np.testing.assert_array_equal(a[side + '_position'], b[side + '_positions'])


def test_unpacked_epochs_are_reshuffled_permutations():
  pairs = _pairs(n=12, max_len=6)
  rows = np.concatenate([b['inputs'][:, 0] for b in _take(
      pipeline.translation_train(pairs, batch_size=4, max_length=8, seed=0, pack=False), 6)])
  epoch1, epoch2 = rows[:12] - 1000, rows[12:] - 1000
  assert sorted(epoch1) == sorted(epoch2) == list(range(12))
  assert list(epoch1) != list(epoch2)
  b = _take(pipeline.translation_train(pairs, batch_size=4, max_length=8, seed=0, pack=False), 1)[0]
  assert (b['inputs_segmentation'].max(axis=1) == 1).all()


def test_seed_determines_order():
  pairs = _pairs(n=30, max_len=8)
  run = lambda seed: _take(
      pipeline.translation_train(pairs, batch_size=2, max_length=10, seed=seed), 5)
  assert all((a['inputs'] == b['inputs']).all() for a, b in zip(run(5), run(5)))
  assert any((a['inputs'] != b['inputs']).any() for a, b in zip(run(5), run(6)))


def test_length_filter_is_reported(caplog):
  pairs = _pairs(n=20, max_len=4) + [([2000] + [5] * 9, [_EOS]), ([2001], [5] * 12 + [_EOS])]
  with caplog.at_level(logging.WARNING):
    ds = pipeline.translation_train(pairs, batch_size=2, max_length=8, seed=0)
  assert ds.num_dropped == 2 and ds.num_examples == 20
  assert 'dropped 2 of 22' in caplog.text
  seen = {ex[0][0] for b in _take(ds, 20) for ex in _unpack(b)}
  assert 2000 not in seen and 2001 not in seen


@pytest.mark.parametrize('pack', [True, False])
def test_translation_shards_are_disjoint_and_cover(pack):
  pairs = _pairs(n=21, max_len=5)
  shards = []
  for shard in range(2):
    ds = pipeline.translation_train(pairs, batch_size=3, max_length=8, seed=0, pack=pack,
                                    shard_index=shard, shard_count=2)
    assert ds.num_examples == (11, 10)[shard]
    counts = collections.Counter(ex[0][0] for b in _take(ds, 12) for ex in _unpack(b))
    assert len(counts) == ds.num_examples and min(counts.values()) >= 2
    assert max(counts.values()) - min(counts.values()) <= 1  # Whole epochs of this shard.
    shards.append(set(counts))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(1000, 1021))


def test_lm_blocks_shards_and_contract():
  tokens = np.arange(5, 5 + 16 * 10 + 3)  # 10 blocks of 16, a short tail.
  rows = []
  for shard in range(2):
    ds = pipeline.lm_train(tokens, batch_size=5, seq_len=16, seed=0,
                           shard_index=shard, shard_count=2)
    assert ds.num_examples == 5 and ds.num_dropped == 2
    [batch] = _take(ds, 1)  # Exactly one epoch of this shard.
    _check_contract(batch, pipeline.LM_KEYS, (5, 16))
    assert (batch['inputs_segmentation'] == 1).all()
    assert (batch['inputs_position'] == np.arange(16)).all()
    rows += list(batch['inputs'])
    np.testing.assert_array_equal(batch['targets'], batch['inputs'] + 1)
  starts = sorted(int(r[0]) - 5 for r in rows)
  assert starts == [16 * i for i in range(10)]  # Block i = tokens[16i : 16i + 17].


def test_lm_later_epochs_shift_the_block_grid():
  tokens = np.arange(5, 5 + 16 * 10 + 3)
  ds = pipeline.lm_train(tokens, batch_size=10, seq_len=16, seed=0)
  epochs = [sorted(int(r[0]) - 5 for r in b['inputs']) for b in _take(ds, 6)]
  assert epochs[0] == [16 * i for i in range(10)]
  offsets = {e[0] for e in epochs[1:]}
  assert len(offsets) > 1  # The grid moves from epoch to epoch.
  for e in epochs:
    assert e[-1] + 17 <= len(tokens)  # Every window stays inside the stream.
    assert len(set(e)) == 10


@pytest.mark.parametrize('kind', ['packed', 'unpacked', 'lm', 'prefetched'])
def test_iterator_state_restores_exactly(kind):
  """After several epochs, a fresh iterator set to a saved state continues identically."""
  if kind == 'lm':
    ds = pipeline.lm_train(np.arange(1, 200), batch_size=3, seq_len=8, seed=4)  # 8 batches/epoch
  else:
    ds = pipeline.translation_train(_pairs(n=25, max_len=7), batch_size=3, max_length=12,
                                    seed=4, pack=kind != 'unpacked')
  if kind == 'prefetched':  # What a trainer may wrap it in to overlap with the step.
    ds = grain_x.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
  it = iter(ds)
  for _ in range(40):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  expected = [next(it) for _ in range(12)]
  restored = iter(ds)
  restored.set_state(state)
  for a, b in zip(expected, [next(restored) for _ in range(12)]):
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)


def test_translation_eval_every_example_once_in_order(caplog):
  pairs = _pairs(n=23, max_len=15)
  pairs[5] = ([1005] + [7] * 29, pairs[5][1])  # 30 tokens, twice the rest: kept.
  ev = pipeline.translation_eval_batches(pairs, batch_size=5)
  assert len(ev) == 5 and ev.length == 32 and ev.num_truncated == 0
  seen = []
  for index, batch in ev.indexed():
    _check_contract(batch, pipeline.TRANSLATION_KEYS, (5, 32))
    for r, i in enumerate(index):
      if i < 0:  # Padding rows: all zero, so zero weight.
        assert not any(v[r].any() for v in batch.values())
        continue
      seen.append(int(i))
      for side, ids in zip(('inputs', 'targets'), pairs[i]):
        n = len(ids)
        assert batch[side][r, :n].tolist() == ids and not batch[side][r, n:].any()
        assert (batch[side + '_segmentation'][r] == (np.arange(32) < n)).all()
        assert (batch[side + '_position'][r, :n] == np.arange(n)).all()
  assert seen == list(range(23)) and list(index) == [20, 21, 22, -1, -1]
  assert all((a['inputs'] == b['inputs']).all() for a, b in zip(ev, (b for _, b in ev.indexed())))
  with caplog.at_level(logging.WARNING):
    cut = pipeline.translation_eval_batches(pairs, batch_size=5, max_length=16)
  assert cut.num_truncated == 1 and 'truncated 1 of 23' in caplog.text
  assert next(iter(cut))['inputs'].shape == (5, 16)


def test_eval_shards_step_together_and_cover():
  pairs = _pairs(n=23, max_len=6)
  shards = [pipeline.translation_eval_batches(pairs, batch_size=4, shard_index=h, shard_count=2)
            for h in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  index = np.stack([np.concatenate([ix for ix, _ in s.indexed()]) for s in shards])
  # Global batch b is shard 0's rows then shard 1's: in order over hosts.
  glob = np.concatenate([index[h, b * 4:(b + 1) * 4] for b in range(3) for h in range(2)])
  assert glob[:23].tolist() == list(range(23)) and (glob[23:] == -1).all()


def test_lm_eval_predicts_every_token_once():
  tokens = np.arange(1, 100)
  ev = pipeline.lm_eval_batches(tokens, batch_size=4, seq_len=16)
  batches = list(ev)
  assert len(batches) == 2 and ev.num_examples == 7  # ceil(98 / 16) blocks.
  _check_contract(batches[0], pipeline.LM_KEYS, (4, 16))
  targets = np.concatenate([b['targets'].ravel() for b in batches])
  inputs = np.concatenate([b['inputs'].ravel() for b in batches])
  real = np.concatenate([b['inputs_segmentation'].ravel() for b in batches]) == 1
  assert targets[real].tolist() == tokens[1:].tolist()
  assert inputs[real].tolist() == tokens[:-1].tolist()
  assert not targets[~real].any() and not inputs[~real].any()
  assert (batches[1]['inputs_position'][2, :2] == [0, 1]).all()


def test_bad_arguments_are_user_errors():
  pairs = _pairs(n=4, max_len=3)
  with pytest.raises(UserError, match='seed'):
    pipeline.translation_train(pairs, batch_size=2, max_length=8, seed=-1)
  with pytest.raises(UserError, match='shard_index'):
    pipeline.translation_train(pairs, batch_size=2, max_length=8, seed=0,
                               shard_index=2, shard_count=2)
  with pytest.raises(UserError, match='batch_size'):
    pipeline.lm_train(np.arange(100), batch_size=0, seq_len=8, seed=0)
  with pytest.raises(UserError, match='seq_len'):
    pipeline.lm_train(np.arange(10), batch_size=2, seq_len=16, seed=0)
  with pytest.raises(UserError, match='max_length'):
    pipeline.translation_train([([5] * 9, [1])], batch_size=2, max_length=8, seed=0)
