"""A run end to end: train a config into a workdir, load a trained one back.

  final = runs.train(config, 'runs/m30k')     # the task's loop; its metrics
  run, params = runs.load('runs/m30k')        # the model the run reported
  run, params = runs.load('runs/m30k', 'latest', say=False)

This module sits above the loops (train/loop.py, train/rl/loop.py) and the
tasks, so the CLI, evaluation, conversion and chat all reach a workdir
through it without importing one another.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from data.errors import UserError
from train import checkpoint, init_from, loop, tasks
from train.rl import loop as rl_loop


def train(config, workdir: str) -> dict[str, Any]:
  """Trains `config.task` into `workdir` with its loop; the final metrics."""
  cls = tasks.REGISTRY.get(config.task)
  if cls is not None and cls.loop == 'rl':
    return rl_loop.train(config, workdir)
  return loop.train_and_evaluate(config, workdir)


def load_workdir_config(workdir: str):
  """The resolved config.json a training run wrote into `workdir` (with
  cuDNN attention swapped for XLA's off a GPU)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: --workdir must be a directory that '
                    f'`transflax train` has written to')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = config.get('model')
  if (model is not None and model.get('attention_impl') == 'cudnn'
      and jax.default_backend() != 'gpu'):
    # The same attention through XLA: a run trained with cuDNN's kernel on
    # GPUs still translates, samples and evaluates on any host.
    logging.info('model.attention_impl: cudnn -> xla on %s',
                 jax.default_backend())
    model.attention_impl = 'xla'
  return config


def reported_checkpoint(workdir: str) -> str:
  """The checkpoint a finished run reported its result from: 'average' when
  it averaged its last checkpoints (results.json says so), else 'latest'."""
  path = os.path.join(workdir, 'results.json')
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return 'latest'
  which = results.get('checkpoint')
  if which is None and results.get('averaged_last'):
    which = 'average'  # results.json from before the key was written
  return which if which in ('latest', 'average') else 'latest'


def load(workdir: str, which: str | None = None, *, say: bool = True):
  """(Run, params) of a trained workdir.

  which: latest | best | average | STEP, or None for the model the run
  reported its result from (`reported_checkpoint`). With `say`, one line on
  stderr names the checkpoint loaded.
  """
  chosen = which is None
  which = reported_checkpoint(workdir) if chosen else which
  if not (which in ('latest', 'best', 'average') or which.isdigit()):
    raise UserError(f'--checkpoint={which!r}: use latest, best, average or a '
                    f'step number')
  run = loop.Run(load_workdir_config(workdir), workdir, for_training=False)
  ckpt = run.ckpt
  step: Any = int(which) if which.isdigit() else which
  if which == 'average':
    step = 'latest'
    ckpt = checkpoint.Checkpointer(workdir, subdir='checkpoints_avg',
                                   best_metric=None, read_only=True)
  if run.task.loop == 'rl' and which != 'average':
    loaded, params = _policy_params(run, workdir, which)
  else:
    restored = ckpt.restore(run.abstract_state, step=step)
    if restored is None:
      hint = ('run `transflax average` first' if which == 'average'
              else 'train first')
      raise UserError(f'no checkpoint in {ckpt.directory}; {hint}')
    loaded, params = restored[0], restored[1].params
  if say and jax.process_index() == 0:
    why = (' (the model the run reported; --checkpoint picks another)'
           if chosen else '')
    folder = 'checkpoints_avg' if which == 'average' else 'checkpoints'
    print(f'loaded {os.path.join(workdir, folder)} step {loaded} '
          f'({which}){why}', file=sys.stderr, flush=True)
  return run, params


def _policy_params(run, workdir: str, which: str):
  """The policy's params of an RL checkpoint (which also holds a value
  model and the KL state), read like train.init_from reads any run's."""
  source = init_from.resolve(f'{workdir}:{which}')
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                       run.abstract_state.params)
  params, _ = init_from.load_params(source, zeros, workdir=workdir,
                                    model=run.model_config.to_dict(),
                                    require_all=True)
  return source.step, params


def average(workdir: str, last_n: int) -> int:
  run = loop.Run(load_workdir_config(workdir), workdir, for_training=False)
  return checkpoint.save_average(workdir, last_n, run.abstract_state)
