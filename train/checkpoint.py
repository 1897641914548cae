"""Checkpoints: Orbax CheckpointManager under `workdir/checkpoints`, averaging.

One step directory holds three items: `state` (the TrainState pytree of
jax.Arrays, sharded or not), `data` (the Grain iterator state of every process,
JSON) and `meta` (JSON: resolved config, tokenizer bytes as base64, vocab
size, ...). Orbax writes a step into a temporary directory and renames it when
complete, so a visible step directory is either whole or was damaged later.

Retention is "the last `keep` plus the best by `best_metric`", expressed with
Orbax 0.12 preservation policies: AnyPreservationPolicy(LatestN, BestN(n=1)).
Checkpoints saved without the metric carry no metrics at all, so BestN never
ranks them and LatestN alone decides their fate.

Restoring reshards: the caller passes a pytree of `jax.ShapeDtypeStruct` with
the *current* mesh's shardings, so a checkpoint written on 8 devices loads onto
1 device or another mesh shape. A damaged latest checkpoint falls back to the
previous one with a warning; see `Checkpointer.restore`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Literal, Sequence

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from data.errors import UserError

PyTree = Any
StepSpec = int | Literal['latest', 'best'] | None
_ITEMS = ('state', 'data', 'meta')


# Orbax warnings that describe what this code does on purpose: saves
# without metrics, the read-only managers of evaluators and averaging, and
# init_from's read of one item of a step.
_BENIGN_ORBAX_WARNINGS = (
    'did not provide metrics',
    'Given directory is read only',
    # init_from reads a step's `state` item on its own, below the step
    # directory that holds this file (train/init_from.py).
    'Metadata file does not exist',
)


class _NoBenignOrbaxWarnings(logging.Filter):
  """Drops `_BENIGN_ORBAX_WARNINGS` (Orbax logs through absl's logger, as do
  we, so the filter matches messages rather than silencing the logger)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return not any(benign in msg for benign in _BENIGN_ORBAX_WARNINGS)


_BENIGN_FILTER = _NoBenignOrbaxWarnings()


def _quiet_benign_orbax_warnings() -> None:
  """Installs the filter on absl's logger when the first Checkpointer is
  made (not at import: importing this module changes no logging)."""
  absl_logger = logging.getLogger('absl')
  if _BENIGN_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_BENIGN_FILTER)


class Checkpointer:
  """Saves and restores (state, data iterator state, meta) under a workdir.

  Usage:
    ckpt = Checkpointer(workdir, keep=3, best_metric='eval/loss')
    restored = ckpt.restore(abstract_state)   # None on a fresh workdir
    ckpt.save(step, state, data_state=it.get_state(), meta=meta,
              metrics={'eval/loss': 2.1})
    ckpt.close()

  `read_only=True` never deletes or moves anything (for evaluators running
  beside a trainer); otherwise a step directory that is certainly damaged is
  renamed to `<step>.corrupt` so that the resumed run can save again.
  """

  def __init__(self, workdir: str | epath.PathLike, *, keep: int | None = 3,
               best_metric: str | None = 'eval/loss',
               best_mode: Literal['min', 'max'] = 'min',
               async_save: bool = True, subdir: str = 'checkpoints',
               read_only: bool = False):
    if best_mode not in ('min', 'max'):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be >= 1 or None (keep all), got {keep}')
    # Orbax's array writer takes absolute paths only; --workdir may be relative.
    self.directory = epath.Path(os.path.abspath(os.fspath(workdir))) / subdir
    _quiet_benign_orbax_warnings()
    self.best_metric = best_metric
    self.read_only = read_only
    self._bad: set[int] = set()  # Damaged steps seen but not moved away.
    self._scan_for_damage()

    best_fn = None
    policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
    if best_metric is not None:
      # Missing keys rank worst; only a defensive default, since save() writes
      # metrics only when the best metric is present and finite.
      worst = float('inf') if best_mode == 'min' else float('-inf')
      best_fn = lambda m: float(m.get(best_metric, worst))  # noqa: E731
      # BestN keeps the *last* n after sorting; reverse puts the minimum last.
      policies.append(pp.BestN(get_metric_fn=best_fn,
                               reverse=best_mode == 'min', n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, read_only=read_only,
        # Orbax warns when a read-only manager keeps its default of 1.
        save_interval_steps=0 if read_only else 1,
        preservation_policy=None if read_only else pp.AnyPreservationPolicy(
            policies),
        enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=_ITEMS, options=options)
    except Exception as e:  # Damaged files Orbax reads eagerly (metrics).
      raise UserError(
          f'cannot read the checkpoint directory {self.directory} '
          f'({type(e).__name__}: {e}); move it away (or pass a new '
          '--workdir) to start fresh') from e

  # --- Listing -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(s for s in self._manager.all_steps() if s not in self._bad)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """Best step by `best_metric`; None if none was saved with the metric."""
    if self.best_metric is None:
      return None
    best = self._manager.best_step()
    return None if best in self._bad else best

  def wait(self) -> None:
    """Blocks until asynchronous saves are committed (and old ones deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    # Orbax's close() does not wait for the clean-up of temporary directories
    # that a writable manager starts in the background; a process that exits
    # right after (an early user error) would print that thread's traceback.
    await_cleanup = getattr(self._manager, '_maybe_await_cleanup_tmp_directory',
                            None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- Save ----------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, data_state: dict | None,
           meta: dict, metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts saving `step`; returns False if it was already saved.

    Must be called by every process. Device arrays are copied to host before
    this returns, so the caller may donate `state` to the next step at once.
    `force=True` replaces an existing checkpoint of the same step.
    """
    if self.read_only:
      raise ValueError(f'Checkpointer for {self.directory} is read-only')
    try:
      json.dumps(meta)
    except TypeError as e:
      raise TypeError(f'checkpoint meta must be JSON (bytes as base64): {e}')
    existing = self._manager.all_steps()
    if step in existing:
      if not force:
        logging.info('Checkpoint for step %d already exists; not saving.', step)
        return False
      self.wait()
      self._manager.delete(step)
    newer = [s for s in existing if s > step]
    if newer:
      raise UserError(
          f'{self.directory} already holds checkpoints at steps {newer}, after '
          f'step {step}; saving would mix two training histories. Move those '
          'step directories away or use a new --workdir.')
    tracked = None
    if self.best_metric is not None and metrics:
      numbers = {k: _finite_float(v) for k, v in metrics.items()}
      if numbers.get(self.best_metric) is not None:
        tracked = {k: v for k, v in numbers.items() if v is not None}
    # Grain iterators are per process; Orbax's JSON item is written by the
    # primary process only, so it stores everyone's state.
    data = {'per_process': _gather_json(data_state)}
    self._manager.save(step, metrics=tracked, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta)))
    return True

  # --- Restore -------------------------------------------------------------

  def restore(self, abstract_state: PyTree, *, step: StepSpec = None
              ) -> tuple[int, PyTree, dict | None, dict] | None:
    """Returns (step, state, data_state, meta), or None if there is nothing.

    `abstract_state`: pytree of jax.ShapeDtypeStruct (or jax.Array) whose
    `.sharding` is on the current mesh; the result has those shardings.
    `step`: an int (that exact step; failure is an error), 'latest'/None
    (newest readable one, falling back on damage) or 'best' (the best by
    metric, else falling back like 'latest').
    """
    _check_abstract(abstract_state)
    self.wait()
    steps = self.all_steps()
    if not steps:
      return None
    explicit = isinstance(step, int) and not isinstance(step, bool)
    if explicit:
      if step not in steps:
        raise UserError(f'{self.directory} has no checkpoint for step {step}; '
                        f'available steps: {steps}')
      candidates = [step]
    elif step in (None, 'latest'):
      candidates = steps[::-1]
    elif step == 'best':
      best = self.best_step()
      if best is None:
        logging.warning('No checkpoint in %s has a best %s; restoring the '
                        'latest instead.', self.directory, self.best_metric)
      candidates = [best] * (best is not None) + [
          s for s in steps[::-1] if s != best]
    else:
      raise ValueError(f"step must be an int, 'latest', 'best' or None: {step!r}")

    # Before the first attempt: the noise of a failed one can come at once.
    _quiet_failed_restore_aftermath(self.directory)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    failed: list[int] = []
    error = None
    for s in candidates:
      try:
        out = self._manager.restore(s, args=args)
      except Exception as e:  # Orbax/TensorStore raise many types on damage.
        error = f'{type(e).__name__}: {str(e)[:300]}'
        if explicit:
          raise UserError(
              f'cannot restore step {s} from {self.directory} ({error}); '
              'restore another step, or check that the model config matches '
              'the one the checkpoint was written with') from e
        logging.warning('Checkpoint step %d in %s cannot be restored (%s); '
                        'falling back to an earlier checkpoint.', s,
                        self.directory, error)
        failed.append(s)
        continue
      # An older step restored into the same abstract state, so the failures
      # were damage, not a config mismatch: move them away so saving resumes.
      for bad in failed:
        self._set_aside(bad, 'could not be restored')
      if failed:
        _sync('transflax:checkpoint_fallback')
        self._manager.reload()
      return s, out['state'], _own_data_state(out['data']), out['meta']
    raise UserError(
        f'no checkpoint in {self.directory} can be restored (steps {failed}; '
        f'last error {error}). If the model config changed, use a new '
        '--workdir; if the files are damaged, move the directory away to '
        'start fresh.')

  def read_meta(self, step: int | None = None) -> dict | None:
    """The `meta` item of `step` (default: newest readable), without state.

    Lets the loop run `check_compatible` before building the abstract state.
    """
    steps = self.all_steps() if step is None else [step]
    for s in reversed(steps):
      try:
        return self._manager.restore(
            s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Cannot read meta of checkpoint step %d in %s (%s: %s).',
                        s, self.directory, type(e).__name__, e)
    return None

  # --- Damage handling -----------------------------------------------------

  def _scan_for_damage(self) -> None:
    """Finds step dirs missing a file that every committed step has.

    Cheap (no tensor reads); deeper damage surfaces when restoring. Runs
    before Orbax lists the directory since Orbax parses metrics eagerly.
    Process 0 alone moves damaged steps away while the others wait at the
    barrier, which every process reaches, directory or not: a process that
    skipped it would meet the others at Orbax's next barrier instead.
    """
    if (self.read_only or jax.process_index() == 0) and self.directory.exists():
      for path in sorted(self.directory.iterdir()):
        if not path.name.isdigit() or not path.is_dir():
          continue
        problem = _step_dir_problem(path)
        if problem:
          self._set_aside(int(path.name), problem)
    _sync('transflax:checkpoint_scan')

  def _set_aside(self, step: int, why: str) -> None:
    path = self.directory / str(step)
    if self.read_only:
      logging.warning('Checkpoint step %d in %s is damaged (%s); ignoring it.',
                      step, self.directory, why)
      self._bad.add(step)
      return
    target = self.directory / f'{step}.corrupt'
    if target.exists():
      target = self.directory / f'{step}.corrupt-{int(time.time())}'
    logging.warning('Checkpoint step %d in %s is damaged (%s); moved to %s.',
                    step, self.directory, why, target.name)
    if jax.process_index() == 0 and path.exists():
      path.rename(target)


class _NoUnawaitedReadErrors(logging.Filter):
  """Drops asyncio's reports of failed reads of `directories` nobody awaited."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if not msg.startswith(('Task exception was never retrieved',
                           'Future exception was never retrieved')):
      return True
    error = record.exc_info[1] if record.exc_info else None
    text = f'{msg} {error}'
    return not any(d in text for d in self.directories)


_UNAWAITED_READ_ERRORS = _NoUnawaitedReadErrors()


def _quiet_failed_restore_aftermath(directory: epath.Path) -> None:
  """Keeps the tracebacks of reads that outlive a failed restore off stderr.

  When one array of a checkpoint in `directory` cannot be read, Orbax's
  restore stops at the first error and closes its asyncio loop while reads of
  other arrays are still in flight. Their ends show up as tracebacks:
  TensorStore threads calling `loop.call_soon_threadsafe` (RuntimeError
  'Event loop is closed', printed as unraisable exceptions), and asyncio's
  'Task/Future exception was never retrieved' for the other failed reads.
  The failure itself is what `restore` reports and handles, so exactly these
  are dropped; every other unraisable exception and asyncio error still shows.
  Installed at the first restore and left in place, because these reports
  arrive from other threads after `restore` has returned.
  """
  _UNAWAITED_READ_ERRORS.directories.add(str(directory))
  asyncio_logger = logging.getLogger('asyncio')
  if _UNAWAITED_READ_ERRORS not in asyncio_logger.filters:
    asyncio_logger.addFilter(_UNAWAITED_READ_ERRORS)
  previous = sys.unraisablehook
  if getattr(previous, 'transflax_closed_loop_filter', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'
        and any(f.name == 'call_soon_threadsafe'
                for f in traceback.extract_tb(e.__traceback__))):
      return
    previous(unraisable)

  hook.transflax_closed_loop_filter = True
  sys.unraisablehook = hook


def _step_dir_problem(path: epath.Path) -> str | None:
  """Names what is wrong with a finalized step directory, or None."""
  for item in _ITEMS:
    if not (path / item).is_dir():
      return f'item {item!r} is missing'
  for name in ('_CHECKPOINT_METADATA', 'metrics/metrics', 'meta/metadata',
               'data/metadata', 'state/_METADATA'):
    file = path / name
    if not file.exists():
      if name == 'metrics/metrics':
        continue  # Saved without metrics: fine.
      return f'{name} is missing'
    try:
      json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      return f'{name} is not valid JSON ({e})'
  return None


def _finite_float(value: Any) -> float | None:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if np.isfinite(value) else None


def _check_abstract(tree: PyTree) -> None:
  for leaf in jax.tree.leaves(tree):
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(
          'restore needs every leaf of abstract_state to carry the target '
          f'sharding (jax.ShapeDtypeStruct(..., sharding=...)); got {leaf!r}')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _gather_json(obj: Any) -> list[Any]:
  """The JSON value of every process, in process order (collective)."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(rows[i, :sizes[i]]).decode())
          for i in range(len(sizes))]


def _own_data_state(data: dict) -> dict | None:
  states = data.get('per_process', [])
  if len(states) != jax.process_count():
    logging.warning('Checkpoint has data-iterator state for %d processes but '
                    'this run has %d; the data iterator starts afresh.',
                    len(states), jax.process_count())
    return None
  return states[jax.process_index()]


def check_compatible(saved_meta: dict, current_meta: dict,
                     keys: Sequence[str], *, source: str = 'the checkpoint'
                     ) -> None:
  """Raises UserError if dotted `keys` (e.g. 'model.num_layers') differ."""
  missing = object()

  def get(tree, dotted):
    for part in dotted.split('.'):
      if not isinstance(tree, dict) or part not in tree:
        return missing
      tree = tree[part]
    return tree

  show = lambda v: '<missing>' if v is missing else repr(v)  # noqa: E731
  diffs = [f'{k}: checkpoint={show(get(saved_meta, k))}, '
           f'current={show(get(current_meta, k))}'
           for k in keys if not _same(get(saved_meta, k),
                                      get(current_meta, k), missing)]
  if diffs:
    raise UserError(
        f'{source} was written with a different model/vocabulary: '
        + '; '.join(diffs) + '. Resume with the original settings or use a '
        'new --workdir.')


def _same(saved: Any, current: Any, missing: object) -> bool:
  # A key added to the model config later (None: the old behaviour) is
  # absent from older checkpoints, which stay resumable.
  return saved == current or (saved is missing and current is None)


# --- Checkpoint averaging ----------------------------------------------------


def _params(state: PyTree) -> PyTree:
  return state['params'] if isinstance(state, dict) else state.params


def _with_params(state: PyTree, params: PyTree) -> PyTree:
  if isinstance(state, dict):
    return {**state, 'params': params}
  return state.replace(params=params)


def _average(workdir, last_n: int, abstract_state: PyTree, subdir: str):
  if last_n < 1:
    raise ValueError(f'last_n must be >= 1, got {last_n}')
  ckpt = Checkpointer(workdir, subdir=subdir, best_metric=None, read_only=True)
  try:
    steps = ckpt.all_steps()
    if len(steps) < last_n:
      raise UserError(
          f'averaging the last {last_n} checkpoints needs {last_n}, but '
          f'{ckpt.directory} holds {len(steps)} ({steps}); train with a larger '
          'checkpoint keep count (>= the number to average) or average fewer.')
    total = None
    for s in steps[-last_n:]:
      _, state, data_state, meta = ckpt.restore(abstract_state, step=s)
      params32 = jax.tree.map(lambda x: x.astype(jnp.float32), _params(state))
      total = params32 if total is None else jax.tree.map(
          jnp.add, total, params32)
    avg = jax.tree.map(lambda t, a: (t / last_n).astype(a.dtype), total,
                       _params(abstract_state))
    # `state` etc. are from the newest step, the last one in the loop.
    return avg, steps[-last_n:], state, data_state, meta
  finally:
    ckpt.close()


def average_checkpoints(workdir, last_n: int, abstract_state: PyTree, *,
                        subdir: str = 'checkpoints') -> PyTree:
  """Mean of `params` over the last `last_n` checkpoints (float32 sum).

  The paper averages the last 5 (base) or 20 (big) checkpoints, so train with
  `keep >= last_n`. Results keep the dtypes and shardings of abstract_state.
  """
  return _average(workdir, last_n, abstract_state, subdir)[0]


def save_average(workdir, last_n: int, abstract_state: PyTree, *,
                 subdir: str = 'checkpoints') -> int:
  """Writes the latest state with averaged params to `checkpoints_avg/<step>`.

  The result is a normal checkpoint: `Checkpointer(workdir,
  subdir='checkpoints_avg').restore(...)` loads it. Returns its step.
  """
  params, steps, state, data_state, meta = _average(
      workdir, last_n, abstract_state, subdir)
  meta = {**meta, 'averaged_steps': steps}
  with Checkpointer(workdir, subdir='checkpoints_avg', keep=None,
                    best_metric=None, async_save=False) as out:
    out.save(steps[-1], _with_params(state, params), data_state=data_state,
             meta=meta, force=True)
  return steps[-1]


# --- Preemption ----------------------------------------------------------------


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop polls between steps.

    with PreemptionGuard() as guard:
      for step in ...:
        state = train_step(...)
        if guard.should_stop(step):
          ckpt.save(...); break          # then exit 0

  A second SIGINT raises KeyboardInterrupt, so Ctrl-C twice still kills a
  stuck run. Previous handlers come back on exit. With several processes,
  `should_stop` makes them agree: JAX's preemption service when it runs (it
  owns SIGTERM then, so we leave SIGTERM alone), else an all-gather of the
  flag every `sync_every` steps.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
               *, sync_every: int = 1):
    self.requested = False
    self.signal: int | None = None
    self._signals = tuple(signals)
    self._sync_every = sync_every
    self._previous: dict[int, Any] = {}

  def _jax_preemption_service(self) -> bool:
    if jax.process_count() == 1:
      return False
    # JAX has no public way to ask whether its preemption service runs (the
    # service that multihost_utils.reached_preemption_sync_point needs); the
    # private read is guarded and falls back to our own signal handling.
    try:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
      return False

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      logging.warning('PreemptionGuard outside the main thread cannot install '
                      'signal handlers; signals keep their default action.')
      return self
    for sig in self._signals:
      if sig == signal.SIGTERM and self._jax_preemption_service():
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal = signum
    logging.warning('Received %s: finishing this step, saving a checkpoint, '
                    'then exiting.', signal.Signals(signum).name)

  def should_stop(self, step: int) -> bool:
    """Whether every process should save and stop after `step`."""
    if jax.process_count() == 1:
      return self.requested
    if self._jax_preemption_service() and (
        multihost_utils.reached_preemption_sync_point(step)):
      return True
    if step % self._sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))
