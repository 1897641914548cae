"""Tests for train/checkpoint.py: roundtrip, retention, resharding, damage."""

import logging
import os
import signal

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from data.errors import UserError
from train import checkpoint as ckpt_lib

AXES = ('data', 'fsdp', 'tensor')

# Orbax's async internals leave these behind after failed restores (damage
# tests); they are garbage-collection noise, not errors of this module.
pytestmark = [
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited'),
]


def make_mesh(shape):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), AXES)


SPECS = {'step': P(), 'params': {'w': P('fsdp', 'tensor'), 'b': P('tensor')},
         'opt_state': {'mu': P('fsdp', 'tensor')}}


def make_state(mesh, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  tree = {'step': np.int32(seed),
          'params': {'w': rng.normal(size=(8, 4)).astype(dtype),
                     'b': rng.normal(size=(4,)).astype(dtype)},
          'opt_state': {'mu': rng.normal(size=(8, 4)).astype(np.float32)}}
  return jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, SPECS)


def abstract(state, mesh):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, s)),
      state, SPECS)


def assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope='module')
def mesh8():
  return make_mesh((2, 2, 2))


def test_roundtrip_with_data_state_and_meta(tmp_path, mesh8):
  state = make_state(mesh8, seed=1)
  meta = {'config': {'model': {'num_layers': 2}}, 'vocab_size': 32,
          'tokenizer': 'AAEC'}
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore(abstract(state, mesh8)) is None
    assert ckpt.save(5, state, data_state={'pos': 3, 'seed': [1, 2]},
                     meta=meta)
    assert not ckpt.save(5, state, data_state=None, meta=meta)  # Already there.
    ckpt.wait()
    step, restored, data_state, meta_r = ckpt.restore(abstract(state, mesh8))
  assert (step, data_state, meta_r) == (5, {'pos': 3, 'seed': [1, 2]}, meta)
  assert_tree_equal(restored, state)
  assert restored['params']['w'].sharding == state['params']['w'].sharding
  assert (tmp_path / 'checkpoints' / '5').is_dir()


def test_a_relative_workdir_saves_and_restores(tmp_path, mesh8, monkeypatch):
  """`--workdir runs/x` as README writes it: Orbax takes absolute paths only."""
  monkeypatch.chdir(tmp_path)
  state = make_state(mesh8, seed=2)
  with ckpt_lib.Checkpointer('runs/x') as ckpt:
    ckpt.save(3, state, data_state=None, meta={})
    ckpt.wait()
    assert ckpt.restore(abstract(state, mesh8))[0] == 3
  assert (tmp_path / 'runs' / 'x' / 'checkpoints' / '3').is_dir()


def test_keep_last_k_plus_best(tmp_path, mesh8):
  state = make_state(mesh8)
  losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: None, 5: 2.0, 6: None}  # Best: step 2.
  with ckpt_lib.Checkpointer(tmp_path, keep=2) as ckpt:
    for step, loss in losses.items():
      metrics = None if loss is None else {'eval/loss': loss, 'train/loss': 9.}
      ckpt.save(step, state, data_state=None, meta={}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert ckpt.latest_step() == 6
  # A fresh manager reads the metrics back from disk and keeps honouring them.
  with ckpt_lib.Checkpointer(tmp_path, keep=2) as ckpt:
    assert ckpt.best_step() == 2
    ckpt.save(7, state, data_state=None, meta={}, metrics=None)
    ckpt.save(8, state, data_state=None, meta={}, metrics={'eval/loss': 0.5})
    ckpt.wait()
    assert ckpt.all_steps() == [7, 8]
    assert ckpt.restore(abstract(state, mesh8), step='best')[0] == 8


def test_best_mode_max_and_missing_metric(tmp_path, mesh8):
  state = make_state(mesh8)
  with ckpt_lib.Checkpointer(tmp_path, keep=1, best_metric='eval/bleu',
                             best_mode='max', async_save=False) as ckpt:
    assert ckpt.best_step() is None
    for step, bleu in [(1, 20.0), (2, 30.0), (3, 25.0), (4, float('nan'))]:
      ckpt.save(step, state, data_state=None, meta={},
                metrics={'eval/bleu': bleu, 'eval/loss': 1.0})
    ckpt.save(5, state, data_state=None, meta={}, metrics={'eval/loss': 0.1})
    assert ckpt.all_steps() == [2, 5]
    assert ckpt.best_step() == 2


@pytest.mark.parametrize('target_shape', [(1, 1, 1), (8, 1, 1)])
def test_restore_reshards(tmp_path, mesh8, target_shape):
  state = make_state(mesh8, seed=3)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=None, meta={})
  target = make_mesh(target_shape)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    _, restored, data_state, _ = ckpt.restore(abstract(state, target))
  assert data_state is None
  assert_tree_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.mesh.devices.shape == target_shape
  assert restored['params']['w'].sharding.spec == P('fsdp', 'tensor')


def test_abstract_state_without_sharding_is_rejected(tmp_path, mesh8):
  state = make_state(mesh8)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=None, meta={})
    with pytest.raises(ValueError, match='sharding'):
      ckpt.restore(jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


def test_flax_train_state_with_adamw(tmp_path, mesh8):
  model = nn.Dense(4)
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(1e-3))
  grads = jax.tree.map(jnp.ones_like, state.params)
  state = state.apply_gradients(grads=grads)
  replicated = NamedSharding(mesh8, P())
  state = jax.device_put(state, replicated)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=None, meta={})
    step, restored, _, _ = ckpt.restore(abstract_state)
  assert step == 1 and isinstance(restored, train_state.TrainState)
  assert restored.apply_fn == model.apply
  assert_tree_equal(restored, state)


def _damage_delete_array_data(step_dir):
  for name in os.listdir(step_dir / 'state' / 'd'):
    os.remove(step_dir / 'state' / 'd' / name)


def _damage_garbage_manifest(step_dir):
  (step_dir / 'state' / 'manifest.ocdbt').write_bytes(b'garbage' * 9)


def _damage_no_commit_metadata(step_dir):
  os.remove(step_dir / '_CHECKPOINT_METADATA')


def _damage_garbage_metrics(step_dir):
  (step_dir / 'metrics' / 'metrics').write_text('{not json')


@pytest.mark.parametrize('damage', [
    _damage_delete_array_data, _damage_garbage_manifest,
    _damage_no_commit_metadata, _damage_garbage_metrics])
def test_damaged_latest_falls_back(tmp_path, mesh8, caplog, damage):
  states = {s: make_state(mesh8, seed=s) for s in (1, 2)}
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, data_state={'s': s}, meta={'s': s},
                metrics={'eval/loss': 1.0 / s})
  damage(tmp_path / 'checkpoints' / '2')
  with caplog.at_level(logging.WARNING):
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
      step, restored, data_state, meta = ckpt.restore(
          abstract(states[1], mesh8))
      assert (step, data_state, meta) == (1, {'s': 1}, {'s': 1})
      assert_tree_equal(restored, states[1])
      # The damaged step was moved aside, so training can save step 2 again.
      assert ckpt.all_steps() == [1]
      assert ckpt.save(2, states[2], data_state=None, meta={})
  assert 'step 2' in caplog.text
  assert (tmp_path / 'checkpoints' / '2.corrupt').is_dir()


def test_nothing_restorable_is_a_user_error(tmp_path, mesh8):
  state = make_state(mesh8)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=None, meta={})
  _damage_delete_array_data(tmp_path / 'checkpoints' / '1')
  with ckpt_lib.Checkpointer(tmp_path, read_only=True) as ckpt:
    with pytest.raises(UserError, match='checkpoints'):
      ckpt.restore(abstract(state, mesh8), step=1)
    with pytest.raises(UserError, match='move the directory away'):
      ckpt.restore(abstract(state, mesh8))
  assert (tmp_path / 'checkpoints' / '1').is_dir()  # read_only moved nothing.


def test_save_before_existing_newer_step_is_a_user_error(tmp_path, mesh8):
  state = make_state(mesh8)
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, state, data_state=None, meta={})
    with pytest.raises(UserError, match='new --workdir'):
      ckpt.save(3, state, data_state=None, meta={})


def test_check_compatible():
  saved = {'model': {'num_layers': 6, 'd_model': 512}, 'vocab_size': 100}
  ckpt_lib.check_compatible(saved, saved, ['model.num_layers', 'vocab_size'])
  current = {'model': {'num_layers': 12, 'd_model': 512}}
  with pytest.raises(UserError) as e:
    ckpt_lib.check_compatible(saved, current, ['model.num_layers',
                                               'model.d_model', 'vocab_size'])
  msg = str(e.value)
  assert 'model.num_layers: checkpoint=6, current=12' in msg
  assert 'vocab_size: checkpoint=100, current=<missing>' in msg
  assert 'd_model' not in msg and '--workdir' in msg


def test_average_last_n(tmp_path, mesh8):
  states = [make_state(mesh8, seed=s, dtype=jnp.bfloat16) for s in range(4)]
  abs_state = abstract(states[0], mesh8)
  with ckpt_lib.Checkpointer(tmp_path, keep=10) as ckpt:
    for s, state in enumerate(states):
      ckpt.save(s, state, data_state={'s': s}, meta={'v': 1})
  with pytest.raises(UserError, match='holds 4'):
    ckpt_lib.average_checkpoints(tmp_path, 5, abs_state)
  avg = ckpt_lib.average_checkpoints(tmp_path, 3, abs_state)
  expected = jax.tree.map(
      lambda *xs: np.mean([np.asarray(x, np.float32) for x in xs], 0),
      *[s['params'] for s in states[1:]])
  jax.tree.map(lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float32), e, rtol=1e-2), avg, expected)
  assert avg['w'].dtype == jnp.bfloat16
  assert avg['w'].sharding == states[0]['params']['w'].sharding

  assert ckpt_lib.save_average(tmp_path, 3, abs_state) == 3
  with ckpt_lib.Checkpointer(tmp_path, subdir='checkpoints_avg') as ckpt:
    step, restored, data_state, meta = ckpt.restore(abs_state)
  assert (step, data_state) == (3, {'s': 3})
  assert meta == {'v': 1, 'averaged_steps': [1, 2, 3]}
  assert_tree_equal(restored['params'], avg)
  assert_tree_equal(restored['opt_state'], states[3]['opt_state'])


def test_preemption_guard_catches_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
    assert guard.signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
