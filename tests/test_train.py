"""The training loop end to end on a tiny LM: mesh invariance, gradient
accumulation, exact resume after SIGKILL, SIGTERM, damaged checkpoints and
restoring an 8-device run onto one device.

Every run repeats `reference`: 30 steps, data-parallel over the 8 simulated
devices, dropout 0.1, metrics every step, a checkpoint every 5 steps.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import tiny_run
from train import loop, step as step_lib

pytestmark = [
    # Orbax's async internals leave these behind after failed restores.
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited'),
]

# Metrics that measure the machine, not the computation.
TIMING_KEYS = ('train/step_time', 'train/tokens_per_sec', 'train/mfu')


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  return tiny_run.write_experiment(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def reference(experiment, tmp_path_factory):
  """(workdir, metrics records) of the uninterrupted 8-device run.

  Trained by the CLI like the runs that repeat it, so that those find its
  programs in the shared compilation cache.
  """
  workdir = tmp_path_factory.mktemp('reference') / 'w'
  config = tiny_run.load_config(experiment)
  assert config.mesh.data == -1 and config.model.dropout_rate > 0
  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in result.stdout
  records = tiny_run.metrics(workdir)
  losses = tiny_run.losses(records)
  assert sorted(losses) == list(range(1, 31))
  assert losses[30] < losses[1] - 0.5, 'the tiny model should learn'
  return workdir, records


def ref_losses(reference, steps):
  losses = tiny_run.losses(reference[1])
  return np.array([losses[s] for s in steps])


def copy_until(reference, step, target):
  """A copy of the reference workdir as it was after checkpoint `step`."""
  shutil.copytree(reference[0], target)
  for s in tiny_run.committed_steps(target):
    if s > step:
      shutil.rmtree(target / 'checkpoints' / str(s))
  records = [r for r in tiny_run.metrics(target) if r['step'] <= step]
  (target / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))
  return len(records)


def assert_params_equal(a, b, rtol=0.0):
  """Leaf-wise, to rtol of each leaf's largest entry: entries near zero
  carry the float noise of their larger neighbours' sums."""
  def check(x, y):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(y))))
  jax.tree.map(check, a, b)


# -- mesh invariance -------------------------------------------------------------


@pytest.mark.parametrize('mesh', [(1, 8, 1), (2, 2, 2), 'one device'])
def test_losses_do_not_depend_on_the_mesh(experiment, reference, tmp_path,
                                          mesh):
  """DP (reference), FSDP, DP x FSDP x TP and one device train alike, dropout
  included: the data, the dropout bits and the math are mesh-independent."""
  devices = None
  if mesh == 'one device':
    mesh, devices = (1, 1, 1), jax.devices()[:1]
  data, fsdp, tensor = mesh
  config = tiny_run.load_config(
      experiment, **{'train.num_steps': 20, 'mesh.data': data,
                     'mesh.fsdp': fsdp, 'mesh.tensor': tensor})
  loop.train_and_evaluate(config, str(tmp_path / 'w'), evaluate_at_end=False,
                          devices=devices)
  losses = tiny_run.losses(tiny_run.metrics(tmp_path / 'w'))
  assert sorted(losses) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in range(1, 21)],
                             ref_losses(reference, range(1, 21)), rtol=1e-4)


# -- steps queued on the devices --------------------------------------------------

# A data-parallel step on a CPU host split into 2 devices, dispatched N times
# with at most LIMIT steps queued (step.InFlight); without the limit, jax
# 0.10.2 deadlocks in the gradient all-reduce once ~32 steps are queued.
_QUEUE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from train import step as step_lib
    limit, n = int(sys.argv[1]), int(sys.argv[2])
    mesh = jax.make_mesh((2,), ('data',))
    rows, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

    def step(w, x):
      g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
      return w - 0.01 * g, jnp.sum(g)

    step = jax.jit(step, in_shardings=(rep, rows), out_shardings=(rep, rep),
                   donate_argnums=0)
    w = jax.device_put(jnp.ones((256, 256)), rep)
    x = jax.device_put(jnp.ones((1024, 256)), rows)
    in_flight = step_lib.InFlight(limit)
    for _ in range(n):
      w, m = step(w, x)
      in_flight.push(m)
    print('done', float(m))
""")


def test_queued_steps_do_not_deadlock_cpu_collectives():
  env = tiny_run.env(num_devices=2)
  # Abort a stuck collective after 5 s instead of 40 (the failure mode).
  env['XLA_FLAGS'] += ' --xla_cpu_collective_call_terminate_timeout_seconds=5'
  limit = step_lib.InFlight().limit
  result = subprocess.run(
      [sys.executable, '-c', _QUEUE_SCRIPT, str(limit), '100'],
      cwd=tiny_run.REPO, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'done' in result.stdout


def test_the_loop_and_eval_bound_their_queued_steps(experiment, tmp_path,
                                                    monkeypatch):
  """Every train and eval step goes through step.InFlight, also when
  metrics are read only every 100 steps."""
  pushed = []

  class Spy(step_lib.InFlight):
    def push(self, outputs):
      pushed.append(self.limit)
      super().push(outputs)

  monkeypatch.setattr(step_lib, 'InFlight', Spy)
  config = tiny_run.load_config(
      experiment, **{'train.num_steps': 3, 'train.log_every': 100,
                     'train.eval_every': 3, 'train.max_eval_batches': 1,
                     'train.checkpoint_every': 100, 'model.dropout_rate': 0.0})
  loop.train_and_evaluate(config, str(tmp_path / 'w'), evaluate_at_end=False)
  assert len(pushed) == 3 + 1 and max(pushed) <= 16  # 3 steps, 1 eval batch


# -- chunked loss -------------------------------------------------------------------


def test_chunked_loss_trains_like_the_whole_logits(experiment, reference,
                                                   tmp_path):
  """train.loss_chunk makes the logits 4 positions at a time: same losses
  (dropout included), and the same eval loss."""
  config = tiny_run.load_config(
      experiment, **{'train.num_steps': 10, 'train.loss_chunk': 4,
                     'train.eval_every': 10, 'train.max_eval_batches': 1})
  final = loop.train_and_evaluate(config, str(tmp_path / 'w'),
                                  evaluate_at_end=False)
  losses = tiny_run.losses(tiny_run.metrics(tmp_path / 'w'))
  np.testing.assert_allclose([losses[s] for s in range(1, 11)],
                             ref_losses(reference, range(1, 11)), rtol=1e-5)
  whole = tiny_run.load_config(
      experiment, **{'train.num_steps': 10, 'train.eval_every': 10,
                     'train.max_eval_batches': 1, 'train.checkpoint_every': 10})
  np.testing.assert_allclose(
      final['eval/loss'],
      loop.train_and_evaluate(whole, str(tmp_path / 'whole'),
                              evaluate_at_end=False)['eval/loss'], rtol=1e-5)


# -- gradient accumulation ---------------------------------------------------------


def test_gradient_accumulation_equals_one_large_batch(experiment, reference,
                                                      tmp_path):
  """4 micro-batches of 4 rows make the same update as one batch of 16."""
  results = {}
  for accum in (1, 4):
    config = tiny_run.load_config(
        experiment, **{'train.num_steps': 4, 'train.grad_accum_steps': accum,
                       'train.checkpoint_every': 100,
                       'model.dropout_rate': 0.0})
    workdir = tmp_path / f'accum{accum}'
    loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
    records = {r['step']: r for r in tiny_run.metrics(workdir)}
    results[accum] = records, tiny_run.final_params(config, workdir)[1]
  (one, params1), (four, params4) = results[1], results[4]
  assert sorted(one) == sorted(four) == [1, 2, 3, 4]
  for step in one:
    for key in ('train/loss', 'train/grad_norm', 'train/accuracy',
                'train/tokens'):
      np.testing.assert_allclose(four[step][key], one[step][key], rtol=1e-5,
                                 err_msg=f'{key} at step {step}')
  assert_params_equal(params4, params1, rtol=1e-5)
  # Same data as the reference, which differs only by its dropout: so the
  # reference really does draw dropout masks (the mesh test relies on it).
  assert abs(one[1]['train/loss'] - ref_losses(reference, [1])[0]) > 1e-3


# -- resume -------------------------------------------------------------------------


def _kill_after_checkpoint_15(experiment, workdir, tmp_path) -> int:
  """Runs the reference config until checkpoint 15 is committed, then kill -9.

  Returns the latest committed step, which the restarted run resumes from.
  """
  with open(tmp_path / 'killed.log', 'w') as log:
    proc = tiny_run.start_cli('train', '--config', experiment, '--workdir',
                              str(workdir), log=log)
    try:
      tiny_run.wait_for(lambda: 15 in tiny_run.committed_steps(workdir), proc,
                        timeout=240, what='checkpoint 15')
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(60) == -signal.SIGKILL
    except AssertionError:
      if 30 not in tiny_run.committed_steps(workdir):
        raise
    finally:
      proc.kill()
      proc.wait()
  return tiny_run.committed_steps(workdir)[-1]


def test_resume_after_sigkill_repeats_the_uninterrupted_run(
    experiment, reference, tmp_path):
  """kill -9 after checkpoint 15, restart: steps 16..30 and the final params
  are those of the run that was never interrupted."""
  for attempt in range(3):
    workdir = tmp_path / f'w{attempt}'
    resumed_from = _kill_after_checkpoint_15(experiment, workdir, tmp_path)
    # The killed run may have saved (and logged) a little past step 15; on a
    # busy machine it may even have finished before the kill: try again.
    if resumed_from < 30:
      break
  assert 15 <= resumed_from < 30, resumed_from
  logged_before = len(tiny_run.metrics(workdir))

  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'starting at step {resumed_from}' in result.stdout
  resumed = tiny_run.metrics(workdir)[logged_before:]
  assert [r['step'] for r in resumed] == list(range(resumed_from + 1, 31))
  expected = {r['step']: r for r in reference[1]}
  for record in resumed:
    want = expected[record['step']]
    for key in set(record) | set(want):
      if key not in TIMING_KEYS:
        assert record.get(key) == want.get(key), (record['step'], key)

  config = tiny_run.load_config(experiment)
  step, params = tiny_run.final_params(config, workdir)
  ref_step, ref_params = tiny_run.final_params(config, reference[0])
  assert step == ref_step == 30
  assert_params_equal(params, ref_params)


def test_sigterm_saves_and_exits_zero(experiment, tmp_path):
  workdir = tmp_path / 'w'
  with open(tmp_path / 'log', 'w') as log:
    proc = tiny_run.start_cli(
        'train', '--config', experiment, '--workdir', str(workdir),
        *tiny_run.flags(**{'train.num_steps': 100_000,
                           'train.checkpoint_every': 100_000}), log=log)
    try:
      tiny_run.wait_for(
          lambda: len(tiny_run.losses(tiny_run.metrics(workdir))) >= 3, proc,
          timeout=240, what='step 3')
      proc.send_signal(signal.SIGTERM)
      returncode = proc.wait(120)
    finally:
      proc.kill()
      proc.wait()
  output = (tmp_path / 'log').read_text()
  assert returncode == 0, output[-3000:]
  reached = max(tiny_run.losses(tiny_run.metrics(workdir)))
  assert tiny_run.committed_steps(workdir) == [reached]
  assert f'saved step {reached}' in output
  assert 'Traceback' not in output


def _truncate_array_data(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*')
           if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    with open(p, 'r+b') as f:
      f.truncate(os.path.getsize(p) // 2)


def test_damaged_checkpoints_fall_back_with_a_warning(experiment, reference,
                                                      tmp_path):
  """Latest (20) with garbled metadata, the one before (15) with truncated
  array data: training resumes from 10, warns, and repeats the reference."""
  workdir = tmp_path / 'w'
  logged = copy_until(reference, 20, workdir)
  ckpts = workdir / 'checkpoints'
  (ckpts / '20' / '_CHECKPOINT_METADATA').write_text('{"truncated": ')
  _truncate_array_data(ckpts / '15')

  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(workdir), '--config.train.num_steps=20')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert 'never retrieved' not in result.stderr
  assert re.search(r'WARNING.*Checkpoint step 20 .* damaged', result.stderr)
  assert re.search(r'WARNING.*Checkpoint step 15 .* cannot be restored',
                   result.stderr)
  assert 'starting at step 10' in result.stdout
  assert (ckpts / '20.corrupt').is_dir() and (ckpts / '15.corrupt').is_dir()
  resumed = tiny_run.metrics(workdir)[logged:]
  assert [r['step'] for r in resumed] == list(range(11, 21))
  np.testing.assert_array_equal([r['train/loss'] for r in resumed],
                                ref_losses(reference, range(11, 21)))


def test_nothing_restorable_is_a_clear_error(experiment, reference, tmp_path):
  workdir = tmp_path / 'w'
  copy_until(reference, 5, workdir)
  _truncate_array_data(workdir / 'checkpoints' / '5')
  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(workdir))
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert 'never retrieved' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'can be restored' in errors[0], result.stderr
  assert tiny_run.committed_steps(workdir) == [5]  # Left for the user.


def test_restore_onto_one_device_continues_the_8_device_run(
    experiment, reference, tmp_path):
  workdir = tmp_path / 'w'
  logged = copy_until(reference, 15, workdir)
  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(workdir), '--config.train.num_steps=20',
                        num_devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("mesh {'data': 1, 'fsdp': 1, 'tensor': 1}; starting at step 15"
          in result.stdout)
  resumed = tiny_run.metrics(workdir)[logged:]
  assert [r['step'] for r in resumed] == list(range(16, 21))
  np.testing.assert_allclose([r['train/loss'] for r in resumed],
                             ref_losses(reference, range(16, 21)), rtol=1e-5)
