"""Two processes x 4 CPU devices (gloo collectives over 127.0.0.1) train like
one process with 8 devices.

Each host reads its own slice of the corpus (data/pipeline.py shards examples
by process), so in general the global batches of a 1- and a 2-process run
differ. Here the corpus has exactly one global batch of blocks: every step of
either run sees all of them, so the losses must agree, and they only do if
the hosts read disjoint halves and their rows are assembled into one global
batch. Dropout is off because its masks follow rows, and row order differs.
"""

import socket

import numpy as np
import pytest

import tiny_run
from train import loop

pytestmark = [
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]

STEPS = 10


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  experiment = tiny_run.write_experiment(tmp_path / 'exp',
                                         num_blocks=tiny_run.BATCH)
  overrides = {'train.num_steps': STEPS, 'train.eval_every': STEPS,
               'model.dropout_rate': 0.0}

  single = tmp_path / 'single'
  loop.train_and_evaluate(tiny_run.load_config(experiment, **overrides),
                          str(single), evaluate_at_end=False)

  multi = tmp_path / 'multi'
  port = free_port()
  logs, procs = [], []
  try:
    for i in range(2):
      logs.append(open(tmp_path / f'process{i}.log', 'w'))
      procs.append(tiny_run.start_cli(
          'train', '--config', experiment, '--workdir', str(multi),
          *tiny_run.flags(**overrides, **{
              'mesh.coordinator_address': f'127.0.0.1:{port}',
              'mesh.num_processes': 2, 'mesh.process_id': i}),
          num_devices=4, log=logs[i]))
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()
    for f in logs:
      f.close()
  outputs = [(tmp_path / f'process{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], '\n\n'.join(o[-3000:] for o in outputs)

  # Process 0 saw the whole 8-device mesh and alone wrote metrics.
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outputs[0]
  assert 'starting at step' not in outputs[1]
  assert 'loss' not in outputs[1]
  records = tiny_run.metrics(multi)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, STEPS + 1)), 'one writer per step'
  assert len(list(multi.glob('events.out.tfevents.*'))) == 1

  want = tiny_run.metrics(single)
  np.testing.assert_allclose(
      [r['train/loss'] for r in records if 'train/loss' in r],
      [r['train/loss'] for r in want if 'train/loss' in r], rtol=1e-4)
  # The eval split is sharded by rows of each global batch: the same rows.
  evals = [r for r in records if 'eval/loss' in r]
  want_evals = [r for r in want if 'eval/loss' in r]
  assert len(evals) == len(want_evals) == 1
  for key in ('eval/loss', 'eval/tokens'):
    np.testing.assert_allclose(evals[0][key], want_evals[0][key], rtol=1e-4)
  # Both processes' data iterators were checkpointed.
  assert tiny_run.committed_steps(multi) == [5, 10]
