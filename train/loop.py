"""The training loop: restore, train, evaluate, checkpoint, log; read top to bottom.

  train_and_evaluate(config, workdir)

1. multi-host init and the ('data', 'fsdp', 'tensor') mesh;
2. the task: tokenizer (trained once, kept in the workdir), model, datasets;
3. the sharded TrainState, restored from the latest good checkpoint if any
   (with the data iterator's position), else initialised;
4. jitted train steps with donated state; every `log_every` steps the
   metrics are fetched, checked for NaN/inf and written; every `eval_every`
   eval loss (and BLEU or samples); every `checkpoint_every` an async save.
   SIGTERM/SIGINT finish the step, save and return.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data.errors import UserError
from train import checkpoint, init_from, metrics as metrics_lib, objectives
from train import partitioning, state as state_lib, step as step_lib, tasks

# Fields that fix parameter shapes: a workdir trained with other values cannot
# be resumed.
SHAPE_KEYS = tuple(f'model.{k}' for k in (
    'vocab_size', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim',
    'mlp_dim', 'num_encoder_layers', 'num_decoder_layers', 'activation',
    'positions', 'norm_type', 'use_bias', 'qkv_bias', 'out_bias', 'mlp_bias',
    'share_embeddings', 'tie_output', 'max_len')) + (
        'task', 'tokenizer_sha')


class NonFiniteLoss(UserError):
  """The loss became NaN/inf; the last good checkpoint is kept."""


def mesh_for(config, devices: Sequence[jax.Device] | None = None):
  """(mesh, sharding rules) of `config.mesh`, after partitioning.initialize:
  the first thing a run or a benchmark does."""
  m = config.mesh
  partitioning.initialize(m)
  mesh = partitioning.make_mesh(m.data, m.fsdp, m.tensor, devices)
  return mesh, partitioning.rules_from_config(m.rules)


def task_for(config, workdir: str | None, mesh, rules, *,
             with_tokenizer: bool = True, source=None):
  """(task, rules fitted to its kv heads, lr schedule, optimizer) of `config`
  on `mesh`; `source` (init_from.Source) when a fresh run starts from
  another run."""
  task = tasks.make_task(config, workdir, with_tokenizer=with_tokenizer,
                         source=source)
  rules = partitioning.fit_kv_heads(rules, mesh, task.model_config.kv_heads)
  schedule = state_lib.make_schedule(
      config.optimizer, task.model_config.d_model,
      task.optimizer_steps(config.train.num_steps))
  return task, rules, schedule, state_lib.make_optimizer(config.optimizer,
                                                         schedule)


class Run:
  """Everything a run builds from (config, workdir); shared by train/eval/generate.

  A fresh training run with `train.init_from` resolves its source first: the
  task takes the source's tokenizer, `restore_or_init` its parameters, and
  the frozen trees (`task.frozen_sources()`) are written once into the
  workdir. A run with checkpoints resumes them and never reads the source.
  """

  def __init__(self, config, workdir: str, *, for_training: bool = True,
               devices: Sequence[jax.Device] | None = None):
    """`devices`: the mesh's devices (default: all), e.g. jax.devices()[:1]
    to continue an 8-device run on one device."""
    self.config = config
    self.workdir = workdir
    self.mesh, rules = mesh_for(config, devices)
    self.ckpt = checkpoint.Checkpointer(
        workdir, keep=max(config.train.keep_checkpoints,
                          config.train.average_last or 0),
        best_metric=config.train.best_metric or None,
        best_mode=config.train.best_mode, read_only=not for_training)
    spec = config.train.get('init_from', '')
    try:
      self.source = (init_from.resolve(spec) if spec and for_training
                     and self.ckpt.latest_step() is None else None)
      self.task, self.rules, self.schedule, self.tx = task_for(
          config, workdir, self.mesh, rules, source=self.source)
    except BaseException:
      self.ckpt.close()  # else Orbax's threads outlive the error's exit
      raise
    self.model_config = self.task.model_config
    self.abstract_state, self.shardings = state_lib.abstract_train_state(
        self.task.init_params, self.tx, config.train.seed, self.mesh, self.rules)
    self.param_counts = state_lib.count_params(self.abstract_state.params)
    self.num_params = self.param_counts['total']
    self.abstract_frozen, self.frozen_shardings = {}, {}
    for name in self.task.frozen_sources():
      self.abstract_frozen[name], self.frozen_shardings[name] = (
          state_lib.abstract_params(self.task.init_params, config.train.seed,
                                    self.mesh, self.rules))
    self.last_sample: tuple[int, str] | None = None  # (step, text), LM evals
    self.final_report: dict[str, Any] = {}  # task.finalize's, at the last step
    self._eval_step = None
    self._frozen = None

  @property
  def meta(self) -> dict[str, Any]:
    tok = self.task.tokenizer.serialized
    meta = {
        'task': self.config.task,
        'config': self.config.to_dict(),
        'model': self.model_config.to_dict(),
        'tokenizer': base64.b64encode(tok).decode('ascii'),
        'tokenizer_sha': _sha(tok),
        **self.task.meta(),
    }
    if self.source is not None:
      meta['init_from'] = self.source.record()
    return meta

  def check_workdir(self) -> None:
    """A workdir from another model shape or vocabulary is an error, never a mix."""
    saved = self.ckpt.read_meta()
    if saved is not None:
      checkpoint.check_compatible(saved, self.meta, SHAPE_KEYS,
                                  source=f'{self.ckpt.directory}')

  def restore_or_init(self, step: Any = None):
    """(step, state, data_state): restored if a checkpoint exists, else fresh
    (from train.init_from's parameters when given)."""
    self.check_workdir()
    restored = self.ckpt.restore(self.abstract_state, step=step)
    if restored is not None:
      step, state, data_state, _ = restored
      logging.info('restored step %d from %s', step, self.ckpt.directory)
      return step, state, data_state
    state, _ = state_lib.create_train_state(
        self.task.init_params, self.tx, self.config.train.seed, self.mesh,
        self.rules)
    if self.source is not None:
      params, report = init_from.load_params(
          self.source, state.params, workdir=self.workdir,
          model=self.model_config.to_dict())
      if jax.process_index() == 0:
        print(report, flush=True)
      state = state.replace(params=params)
    self._init_frozen(state.params)
    return 0, state, None

  # -- frozen trees ----------------------------------------------------------
  def _init_frozen(self, params) -> None:
    """Loads each frozen tree from its source and writes it into the workdir."""
    self._frozen = {}
    for name, spec in self.task.frozen_sources().items():
      if spec == tasks.base.INIT_FROM:
        if self.source is None and self.task.needs_source:
          raise UserError(f'task {self.config.task} needs train.init_from: '
                          f'its frozen {name!r} tree is the run it starts '
                          f'from (e.g. the SFT run)')
        tree = params  # the parameters just copied from the source (or
        # a fresh run's first parameters, for a task that needs no source)
      else:
        source = init_from.resolve(spec)
        tree, report = init_from.load_params(
            source, jax.tree.map(jnp.zeros_like, params),
            workdir=self.workdir, model=self.model_config.to_dict(),
            require_all=True)
        logging.info('frozen %s: %s', name, report)
      # A copy: the TrainState's params are donated to the first step.
      tree = jax.tree.map(jnp.copy, tree)
      state_lib.save_frozen(self.workdir, name, tree)
      self._frozen[name] = tree

  @property
  def frozen(self) -> dict[str, Any]:
    """The frozen trees (loaded from the workdir on first use)."""
    if self._frozen is None:
      self._frozen = {name: state_lib.load_frozen(self.workdir, name, abstract)
                      for name, abstract in self.abstract_frozen.items()}
    return self._frozen

  # -- batches and evaluation ------------------------------------------------
  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return partitioning.make_global_batch(local, self.mesh)

  def local_batch_size(self, global_size: int, what: str) -> int:
    n = jax.process_count()
    shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if global_size % shards or global_size % n:
      raise UserError(f'{what}={global_size} must be divisible by the '
                      f'data*fsdp mesh size {shards} and the {n} processes')
    return global_size // n

  @property
  def eval_step(self) -> step_lib.Jitted:
    """The jitted eval step: built once per run, so each batch shape compiles
    once however many evaluations the run makes."""
    if self._eval_step is None:
      self._eval_step = step_lib.jit_eval_step(
          step_lib.make_eval_step(self.task.eval_loss), self.shardings.params,
          self.frozen_shardings, self.mesh, self.rules)
    return self._eval_step

  def evaluate_loss(self, params, split: str,
                    max_batches: int | None = None) -> dict[str, float]:
    """The task's eval metrics over a split, as `eval/<name>`; at most
    `max_batches` batches (default train.max_eval_batches; 0: all)."""
    t = self.config.train
    if max_batches is None:
      max_batches = t.max_eval_batches
    _, batches = self.task.eval_batches(
        split, self.local_batch_size(t.eval_batch_size, 'train.eval_batch_size'),
        jax.process_index(), jax.process_count())
    frozen = self.frozen
    totals, in_flight = None, step_lib.InFlight()
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      sums = self.eval_step(params, frozen, self.global_batch(batch))
      totals = sums if totals is None else jax.tree_util.tree_map(
          jnp.add, totals, sums)
      in_flight.push(totals)
    m = self.task.eval_metrics(step_lib.normalise_eval(totals))
    return {f'eval/{k}': v for k, v in m.items()}

  def flops_per_step(self, batch: dict[str, np.ndarray]) -> float:
    return self.task.flops_per_step(batch, self.param_counts)


def _sha(b: bytes) -> str:
  import hashlib
  return hashlib.sha256(b).hexdigest()[:16]


def _mean_metrics(window: list[dict]) -> dict[str, float]:
  """A log window's metrics: totals (objectives.Total) added, the rest averaged."""
  host = jax.device_get(window)
  out = {}
  for k, v in host[0].items():
    if isinstance(v, objectives.Total):
      out[f'train/{k}'] = float(np.sum([m[k].value for m in host]))
    else:
      out[f'train/{k}'] = float(np.mean([m[k] for m in host]))
  return out


def write_config(config, workdir: str, model_config) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  resolved = config.to_dict()
  resolved['model'] = model_config.to_dict()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(resolved, f, indent=2, sort_keys=True, default=str)


def train_and_evaluate(config, workdir: str, *, evaluate_at_end: bool = True,
                       devices: Sequence[jax.Device] | None = None
                       ) -> dict[str, float]:
  """Trains to config.train.num_steps (resuming if possible); returns the last metrics.

  `devices` restricts the mesh to those devices (default: all of them).
  """
  t = config.train
  run = Run(config, workdir, devices=devices)
  # Restoring first refuses another model's workdir before anything in it
  # (config.json included) is overwritten.
  try:
    step, state, data_state = run.restore_or_init()
  except BaseException:
    run.ckpt.close()
    raise
  write_config(config, workdir, run.model_config)
  counts = run.param_counts
  logging.info('parameters: %s', counts)
  if jax.process_index() == 0:
    print(f'model: {counts["total"]:,} parameters; mesh {dict(run.mesh.shape)}; '
          f'starting at step {step}', flush=True)
  frozen = run.frozen

  local_bs = run.local_batch_size(t.batch_size, 'train.batch_size')
  if local_bs % t.grad_accum_steps:
    raise UserError(f'train.batch_size={t.batch_size} per process must be '
                    f'divisible by train.grad_accum_steps={t.grad_accum_steps}')
  dataset = run.task.train_dataset(local_bs, jax.process_index(),
                                   jax.process_count())
  data_iter = iter(dataset)
  if data_state is not None:
    data_iter.set_state(data_state)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(run.task.loss, run.schedule,
                               grad_accum_steps=t.grad_accum_steps),
      run.shardings, run.frozen_shardings, run.mesh, run.rules)
  peak = metrics_lib.peak_flops_per_device(run.mesh.devices.flat[0],
                                           config.metrics.peak_flops or None)
  writer = metrics_lib.MetricWriter(workdir, total_steps=t.num_steps,
                                    is_chief=jax.process_index() == 0)
  last_good_step = run.ckpt.latest_step()
  window, flops, last_eval = [], 0.0, {}
  evaluated_at = None  # the step of `last_eval`
  in_flight = step_lib.InFlight()
  timer = time.perf_counter()

  def save(step, state):
    # A checkpoint carries the eval metrics of its own step only, so that
    # `best` can only pick a step that was evaluated.
    run.ckpt.save(step, state, data_state=data_iter.get_state(),
                  meta=run.meta, metrics=last_eval if evaluated_at == step else None)
    return step

  def check_finite(window, step):
    # A finite loss with a non-finite gradient still poisons the parameters
    # this step saves, so both must be finite for a checkpoint to be good.
    host = jax.device_get([(m['loss'], m['grad_norm']) for m in window])
    bad = [i for i, (l, g) in enumerate(host)
           if not (np.isfinite(l) and np.isfinite(g))]
    if bad:
      i = bad[0]
      first = step - len(window) + 1 + i  # the first bad step in the window
      kept = (f'the last good checkpoint is step {last_good_step} in '
              f'{run.ckpt.directory}' if last_good_step is not None else
              'no checkpoint had been saved yet')
      raise NonFiniteLoss(
          f'non-finite training loss or gradient at step {first} (loss '
          f'{float(host[i][0])}, gradient norm {float(host[i][1])}); {kept}. '
          f'Lower optimizer.learning_rate, raise optimizer.warmup_steps or '
          f'set optimizer.grad_clip, and resume.')

  try:
    with checkpoint.PreemptionGuard() as guard:
      while step < t.num_steps:
        local = next(data_iter)
        flops += run.flops_per_step(local) * jax.process_count()
        state, m = train_step(state, frozen, run.global_batch(local))
        step += 1
        window.append(m)
        in_flight.push(m)
        if step % t.log_every == 0 or step == t.num_steps:
          out = _mean_metrics(window)
          check_finite(window, step)
          elapsed = time.perf_counter() - timer
          # The first window includes compilation; later ones are steady state.
          out['train/step_time'] = elapsed / len(window)
          if 'train/tokens' in out:
            out['train/tokens_per_sec'] = out['train/tokens'] / elapsed
          out['train/mfu'] = metrics_lib.mfu(flops / len(window),
                                             out['train/step_time'],
                                             run.mesh.size, peak)
          writer.write(step, out)
          window, flops, timer = [], 0.0, time.perf_counter()
        if t.eval_every and (step % t.eval_every == 0 or step == t.num_steps):
          last_eval = run.evaluate_loss(state.params, config.data.eval_split)
          last_eval.update(run.task.periodic(run, state.params, step))
          evaluated_at = step
          writer.write(step, last_eval)
          timer = time.perf_counter()
        stop = guard.should_stop(step)
        if step % t.checkpoint_every == 0 or step == t.num_steps or stop:
          if window:
            check_finite(window, step)
          if step == t.num_steps:
            state, run.final_report = run.task.finalize(run, state, step)
            numbers = {k: v for k, v in run.final_report.items()
                       if isinstance(v, (int, float))}
            if numbers:
              writer.write(step, numbers)
          last_good_step = save(step, state)
          timer = time.perf_counter()
        if stop:
          logging.warning('signal received: saved step %d, exiting', step)
          run.ckpt.wait()
          return {'step': step, **last_eval}
  finally:
    run.ckpt.wait()
    writer.close()

  final = {'step': step, **last_eval}
  if evaluate_at_end:
    final.update(run.task.at_end(run, state, step))
  run.ckpt.close()
  return final
