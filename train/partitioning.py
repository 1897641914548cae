"""Device mesh ('data', 'fsdp', 'tensor'), logical-axis rules, shardings, multi-host.

Parameters and activations are annotated with logical axis names
(`batch, length, embed, heads, kv_heads, kv, mlp, vocab`); one rules table maps them onto
mesh axes. With the default rules:

  data    pure data parallelism: batch split, parameters replicated;
  fsdp    batch split too, and parameters/optimizer state split along `embed`
          (ZeRO-3 style: all-gathered per layer in the forward pass);
  tensor  Megatron-style tensor parallelism over heads, mlp and vocab.

`-1` for one mesh axis fills the devices left over by the others.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Rule order matters: the first rule whose mesh axis is still free wins, so an
# activation [batch, length, embed] keeps `fsdp` for the batch and leaves
# embed unsplit, while a kernel [embed, mlp] is split over fsdp and tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),  # grouped-query key/value heads (see fit_kv_heads)
    ('kv', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None):
  """Normalises a rules table from a config (lists from JSON) into tuples."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def fit_kv_heads(rules, mesh: Mesh, kv_heads: int):
  """`rules` with the grouped-query `kv_heads` axis replicated when the mesh
  axes it maps to do not divide `kv_heads` (SmolLM2's 3 kv heads on a
  tensor axis of 2 or 4), and added (replicated) to an older rules table.
  Query heads keep their split; each device reads the kv heads it needs."""
  out, seen = [], False
  for name, axes in rules:
    if name == 'kv_heads':
      seen = True
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if kv_heads % size:
        logging.info('kv_heads=%d not divisible by mesh axes %s (%d): '
                     'replicated', kv_heads, names, size)
        axes = None
    out.append((name, axes))
  if not seen:
    out.append(('kv_heads', None))
  return tuple(out)


def maybe_initialize_distributed(coordinator: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts multi-host JAX when configured or when the cluster says so.

  Explicit arguments (config `mesh.coordinator_address` etc.) win; otherwise
  JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or a cluster
  JAX auto-detects (SLURM, TPU pods, Open MPI) trigger it. One process and no
  cluster: nothing to do.
  """
  env = os.environ
  coordinator = coordinator or env.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and 'JAX_NUM_PROCESSES' in env:
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and 'JAX_PROCESS_ID' in env:
    process_id = int(env['JAX_PROCESS_ID'])
  cluster = any(k in env for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                                   'OMPI_COMM_WORLD_SIZE'))
  if not coordinator and not cluster:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info('jax.distributed: process %d of %d', jax.process_index(),
               jax.process_count())


def initialize(mesh_config) -> None:
  """What a run (train, eval, generate, bench) sets before its first JAX
  computation, from the config's `mesh` group.

  Random bits must not depend on the mesh, so DP, FSDP, TP and resharded
  restores draw the same dropout masks (the default in recent JAX, but pinned
  since exact resume and mesh invariance rely on it); then the CPU device
  count and multi-host JAX.
  """
  m = mesh_config
  jax.config.update('jax_threefry_partitionable', True)
  use_cpu_devices(m.get('cpu_devices', 0))
  maybe_initialize_distributed(
      m.coordinator_address or None, m.num_processes or None,
      None if m.process_id < 0 else m.process_id)


def use_cpu_devices(n: int) -> None:
  """Config `mesh.cpu_devices`: split the host CPU into n JAX devices (0: one).

  On a host without accelerators the mesh's data axis then runs n batch
  shards side by side. A small model's step is hundreds of small ops that
  XLA:CPU mostly runs one at a time on one core, so one device per core is
  faster (docs/performance/cpu.md); a large model's big matmuls already use
  every core and gain nothing. Accelerator
  hosts are unaffected: their meshes hold no CPU devices. Must run before
  the first JAX computation; after it (a notebook or test that already ran
  JAX) the devices stay as they are, with a warning if they differ.
  """
  if n <= 0:
    return
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # backends already initialised
    if jax.default_backend() == 'cpu' and jax.local_device_count() != n:
      # Once: a second run loaded in the same process (a judge's reference,
      # a DPO stage's sampler) would only repeat it.
      logging.log_first_n(
          logging.WARNING, 'mesh.cpu_devices=%d ignored: JAX already runs '
          'with %d CPU devices (set it before the first JAX computation)', 1,
          n, jax.local_device_count())


def mesh_shape(data: int, fsdp: int, tensor: int,
               num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry so the product equals the device count."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError('mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor '
                    'may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f'mesh: {num_devices} devices are not divisible by '
                      f'the fixed mesh axes (product {known}); change '
                      f'mesh.data/mesh.fsdp/mesh.tensor')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f'mesh: data*fsdp*tensor = {sizes} uses '
                    f'{int(np.prod(sizes))} devices but {num_devices} are '
                    f'available; set one of mesh.data/mesh.fsdp/mesh.tensor '
                    f'to -1')
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  if devices == list(jax.devices()) and jax.process_count() > 1:
    # Topology-aware placement: tensor groups stay within a host.
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> Any:
  """Pytree of logical PartitionSpecs (or boxed values) -> NamedShardings."""
  specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [b, ...] (any rank) are split over data and fsdp along
  their rows, replicated over tensor."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
