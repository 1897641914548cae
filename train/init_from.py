"""`train.init_from=WORKDIR[:STEP|best|average]`: start from another run.

Runs chain (pretrain -> SFT -> reward model -> DPO): a fresh run takes the
source run's tokenizer and copies every parameter whose path exists in both
trees; the rest (a reward model's scalar head, say) keeps its fresh
initialisation. What was copied, left fresh and left unused is logged. A
shape mismatch on a shared path, or a tokenizer other than the source's, is
one UserError naming both workdirs. The source is read only when the new run
starts: restarting the new run resumes its own checkpoints.

  latest (default)  the source's newest checkpoint
  best              its best by its train.best_metric
  average           its checkpoints_avg/ (`transflax average`, average_last)
  STEP              that step
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from data import tokenizer as tokenizers
from data.errors import UserError
from train import checkpoint

_CHOICES = ('latest', 'best', 'average')


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved init_from: the source run's checkpoint step and its meta."""
  spec: str
  workdir: str
  which: str
  step: int
  state_dir: epath.Path  # .../<checkpoints or checkpoints_avg>/<step>/state
  meta: dict

  def tokenizer(self):
    import base64
    return tokenizers.from_serialized(base64.b64decode(self.meta['tokenizer']),
                                      name=f'{self.workdir} (init_from)')

  def describe(self) -> str:
    return f'{self.workdir} step {self.step} ({self.which})'

  def record(self) -> dict[str, Any]:
    """What a checkpoint's meta keeps about where its run started."""
    return {'workdir': os.path.abspath(self.workdir), 'which': self.which,
            'step': self.step, 'tokenizer_sha': self.meta.get('tokenizer_sha')}


def parse(spec: str) -> tuple[str, str]:
  """'runs/x' -> ('runs/x', 'latest'); 'runs/x:best' / ':average' / ':1200'."""
  head, sep, tail = spec.rpartition(':')
  if sep and (tail in _CHOICES or tail.isdigit()):
    return head, tail
  return spec, 'latest'


def resolve(spec: str) -> Source:
  """Finds the source checkpoint of `spec`; a UserError if there is none."""
  workdir, which = parse(spec)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise UserError(f'train.init_from={spec}: {config_path} not found; give '
                    f'the --workdir of a run that `transflax train` wrote')
  with open(config_path) as f:
    train_cfg = json.load(f).get('train', {})
  subdir = 'checkpoints_avg' if which == 'average' else 'checkpoints'
  ckpt = checkpoint.Checkpointer(
      workdir, subdir=subdir, read_only=True,
      best_metric=train_cfg.get('best_metric') or None,
      best_mode=train_cfg.get('best_mode', 'min'))
  try:
    steps = ckpt.all_steps()
    if which.isdigit():
      step = int(which) if int(which) in steps else None
    elif which == 'best':
      step = ckpt.best_step()
      if step is None and steps:
        logging.warning('init_from %s: no best checkpoint by %s; taking the '
                        'latest', workdir, train_cfg.get('best_metric'))
        step = steps[-1]
    else:
      step = steps[-1] if steps else None
    if step is None:
      hint = ('run `transflax average` on it first' if which == 'average'
              else f'available steps: {steps}')
      raise UserError(f'train.init_from={spec}: no checkpoint {which} in '
                      f'{ckpt.directory}; {hint}')
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if meta is None:
    raise UserError(f'train.init_from={spec}: cannot read the meta of step '
                    f'{step} in {workdir}/{subdir}')
  return Source(spec, workdir, which, step,
                ckpt.directory / str(step) / 'state', meta)


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _source_params(source: Source) -> dict[str, Any]:
  """path -> ArrayMetadata of the source's params, without reading arrays."""
  tree = ocp.PyTreeCheckpointer().metadata(source.state_dir).item_metadata.tree
  return {_key(p): m for p, m in
          jax.tree_util.tree_flatten_with_path(tree['params'])[0]}


def _model_diff(source: Source, model: dict) -> str:
  theirs = source.meta.get('model', {})
  diffs = [f'model.{k}: {theirs[k]!r} there, {v!r} here'
           for k, v in sorted(model.items())
           if k in theirs and theirs[k] != v and k not in (
               'deterministic', 'decode', 'dropout_rate', 'dtype', 'remat',
               'attention_impl', 'attention_dropout_rate',
               'activation_dropout_rate', 'attention_block')]
  return '; '.join(diffs)


def load_params(source: Source, params, *, workdir: str, model: dict,
                require_all: bool = False):
  """`params` (the new run's, sharded) with every leaf whose path the source
  has replaced by the source's value, restored straight into its sharding.

  `model`: the new run's TransformerConfig as a dict (named in errors).
  `require_all`: every leaf must come from the source (a frozen tree has no
  training to fill the rest in).
  Returns (params, a one-line report of what was copied, left fresh, unused).
  """
  theirs = _source_params(source)
  ours = {_key(p): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  shared = [k for k in ours if k in theirs]
  bad = [f'{k} {tuple(theirs[k].shape)} there, {tuple(ours[k].shape)} here'
         for k in shared if tuple(theirs[k].shape) != tuple(ours[k].shape)]
  if bad or not shared:
    diff = _model_diff(source, model)
    what = (f'parameter shapes differ: {"; ".join(bad[:3])}'
            + (f' (and {len(bad) - 3} more)' if len(bad) > 3 else '')
            if bad else 'no parameter path is shared')
    raise UserError(
        f'train.init_from: {source.describe()} does not fit the model of '
        f'{workdir}: {what}.' + (f' Model settings that differ: {diff}.'
                                 if diff else '')
        + ' Give this run the source\'s model settings, or start from '
        'another run.')
  missing = [k for k in ours if k not in theirs]
  if require_all and missing:
    raise UserError(
        f'{source.describe()} lacks parameters this run needs from it: '
        f'{", ".join(missing[:3])}' + (f' (and {len(missing) - 3} more)'
                                      if len(missing) > 3 else '')
        + f'; give a workdir of the model {workdir} expects')
  item: dict[str, Any] = {}
  for k in shared:  # nested dict of the shared leaves, with our shardings
    node = item
    *parents, leaf = k.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jax.ShapeDtypeStruct(ours[k].shape, ours[k].dtype,
                                      sharding=ours[k].sharding)
  args = ocp.args.PyTreeRestore(
      item={'params': item},
      restore_args=ocp.checkpoint_utils.construct_restore_args(
          {'params': item}),
      partial_restore=True)
  restored = ocp.PyTreeCheckpointer().restore(source.state_dir, args=args)
  loaded = {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      restored['params'])[0]}
  fresh = missing
  unused = [k for k in theirs if k not in ours]
  copied = sum(int(np.prod(ours[k].shape)) for k in shared)
  report = (f'init_from {source.describe()}: copied {len(shared)} arrays '
            f'({copied:,} parameters)'
            + (f'; initialised fresh: {", ".join(fresh)}' if fresh else '')
            + (f'; not used: {", ".join(unused)}' if unused else ''))
  paths = jax.tree_util.tree_flatten_with_path(params)
  leaves = [loaded.get(_key(p), leaf) for p, leaf in paths[0]]
  return jax.tree_util.tree_unflatten(paths[1], leaves), report
