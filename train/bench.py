"""`--dry_run` (shapes, parameter counts, shardings) and `transflax bench` (speed).

The benchmark times the real jitted train step on synthetic batches of the
configured shape (so it needs no corpus beyond the tokenizer's vocabulary
size), reports step time, tokens/s, model TFLOP/s and MFU against the device
peak (on a CPU: a measured f32 matmul), then what the task adds (decode
tokens/s with the KV cache at batch 1 and 32 for language models).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from data.errors import UserError
from train import init_from, loop, metrics as metrics_lib
from train import partitioning, state as state_lib, step as step_lib


def _setup(config):
  """As loop.Run builds a run, without a workdir: the tokenizer is trained
  only when model.vocab_size does not give the vocabulary."""
  mesh, rules = loop.mesh_for(config)
  with_tokenizer = not config.model.vocab_size
  # A stage that starts from another run takes that run's tokenizer.
  spec = config.train.get('init_from', '')
  source = init_from.resolve(spec) if spec and with_tokenizer else None
  task, rules, schedule, tx = loop.task_for(
      config, None, mesh, rules, with_tokenizer=with_tokenizer, source=source)
  return mesh, rules, task, schedule, tx


def dry_run(config) -> None:
  """Prints parameter counts per top-level module, the mesh and every sharding."""
  mesh, rules, task, _, tx = _setup(config)
  abstract, shardings = state_lib.abstract_train_state(
      task.init_params, tx, config.train.seed, mesh, rules)
  counts = state_lib.count_params(abstract.params)
  print(f'task {config.task}: {type(task.module()).__name__}, '
        f'vocab {task.model_config.vocab_size}')
  print(f'mesh {dict(mesh.shape)} over {mesh.devices.size} '
        f'{jax.devices()[0].platform} device(s)')
  for name, n in counts.items():
    print(f'  {name:<24} {n:>14,} params ({n / 1e6:.1f}M)')
  print('parameter shardings:')
  flat = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
  for path, leaf in flat:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    print(f'  {name:<64} {str(leaf.shape):<20} {leaf.sharding.spec}')


def _time(fn, n: int) -> float:
  """Seconds per call of fn() over n calls (fn blocks on its result)."""
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n


def benchmark(config, *, steps: int = 20, warmup: int = 3,
              decode_batches: tuple[int, ...] = (1, 32),
              decode_tokens: int = 64) -> dict[str, Any]:
  """Train-step throughput of `config` on the local devices, plus the task's
  own extra numbers (language models: decode tokens/s with the KV cache at
  each of `decode_batches` rows, `decode_tokens` tokens each)."""
  mesh, rules, task, schedule, tx = _setup(config)
  t = config.train
  state, shardings = state_lib.create_train_state(
      task.init_params, tx, t.seed, mesh, rules)
  # Frozen trees (a DPO reference) are timed as a copy of the params.
  frozen = {name: state.params for name in task.frozen_sources()}
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(task.loss, schedule,
                               grad_accum_steps=t.grad_accum_steps),
      shardings, {name: shardings.params for name in frozen}, mesh, rules)
  if t.batch_size % jax.process_count():
    raise UserError(f'train.batch_size={t.batch_size} is not divisible by the '
                    f'{jax.process_count()} processes')
  local = task.synthetic_batch(t.batch_size // jax.process_count())
  batch = partitioning.make_global_batch(local, mesh)
  frozen = jax.tree.map(jnp.copy, frozen)  # the state is donated
  holder = {'state': state}

  def one_step():
    holder['state'], m = train_step(holder['state'], frozen, batch)
    jax.block_until_ready(m['loss'])

  start = time.perf_counter()
  one_step()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    one_step()
  step_s = _time(one_step, steps)

  params = holder['state'].params
  counts = state_lib.count_params(params)
  # Every process holds an equal share of the global batch.
  flops = task.flops_per_step(local, counts) * jax.process_count()
  device = jax.devices()[0]
  num_devices = jax.device_count()
  if device.platform == 'cpu':
    peak = metrics_lib.measure_cpu_peak_flops(
        compiler_options=step_lib.compiler_options())
    peak_note = 'measured f32 matmul (CPU)'
    # The matmul used every core: that is the host's peak, shared by all
    # (possibly simulated) CPU devices, not one device's.
    num_devices = 1
  else:
    peak = metrics_lib.peak_flops_per_device(device,
                                             config.metrics.peak_flops or None)
    peak_note = 'dense bf16 spec sheet'
  tokens = task.count_tokens(local) * jax.process_count()
  result = {
      'device': f'{jax.device_count()} x {device.device_kind}',
      'params': counts['total'],
      'batch': list(local['inputs'].shape),
      'compile_s': compile_s,
      'step_time_s': step_s,
      'tokens_per_sec': tokens / step_s,
      'model_tflops_per_sec': flops / step_s / 1e12,
      'peak_tflops_per_device': (peak or float('nan')) / 1e12,
      'peak_source': peak_note,
      'mfu': metrics_lib.mfu(flops, step_s, num_devices, peak),
  }
  result.update(task.benchmark_extra(params, decode_batches=decode_batches,
                                     decode_tokens=decode_tokens))
  return result
