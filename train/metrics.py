"""Metrics out of the loop: metrics.jsonl, TensorBoard, progress, throughput, MFU.

`MetricWriter.write(step, {'train/loss': ..., 'eval/bleu': ...})` appends one
JSON line to `workdir/metrics.jsonl`, writes TensorBoard scalars (tensorboardX,
no TensorFlow) and prints a progress line. Only the chief process writes.

FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B): training costs
6*N + 12*L*H*Q*T FLOPs per token, where N is the number of parameters that do
a matmul per token, L the layers, H*Q = heads*head_dim (= d_model in standard
configs) and T the attention context length. The 12*L*H*Q*T term counts the
QK^T and AV matmuls over the full T even for causal masks, as PaLM does.
We count the token-embedding table in N once, as the (tied) output projection
over the vocabulary; the input lookup itself is free. So for a decoder-only LM
N = all parameters; for an untied model pass N without the input table.

MFU = model FLOPs per second / (devices * peak). Peaks below are *dense bf16*
tensor-core numbers from vendor spec sheets (no structured sparsity).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# (pattern on device.device_kind lowercased, dense bf16 FLOP/s). First match
# wins, so specific names come before the families they contain.
PEAK_FLOPS: list[tuple[str, float]] = [
    (r'h100.*pcie', 756e12),
    (r'h100.*nvl', 835e12),
    (r'h100', 989e12),           # SXM (device_kind 'NVIDIA H100 80GB HBM3').
    (r'h200', 989e12),
    (r'a100', 312e12),
    (r'\bl40s\b', 362e12),
    (r'\bl4\b', 121e12),
    (r'tpu v4', 275e12),
    (r'tpu v5 ?lite|tpu v5e', 197e12),
    (r'tpu v5p|tpu v5\b', 459e12),   # v5p reports itself as 'TPU v5'.
    (r'tpu v6 ?lite|tpu v6e|trillium', 918e12),
]

_warned_kinds: set[str] = set()


def _now() -> float:
  return time.monotonic()  # A seam for tests; wall clock for ETAs.


def peak_flops_per_device(device: Any, override: float | None = None
                          ) -> float | None:
  """Dense bf16 peak FLOP/s of `device`, `override` if given, else None.

  CPUs have no datasheet peak (`transflax bench` measures one), so a CPU
  run's MFU is null without a warning; an unknown accelerator warns once.
  """
  if override:
    return float(override)
  kind = getattr(device, 'device_kind', str(device))
  for pattern, flops in PEAK_FLOPS:
    if re.search(pattern, kind.lower()):
      return flops
  if getattr(device, 'platform', None) == 'cpu':
    return None
  if kind not in _warned_kinds:
    _warned_kinds.add(kind)
    logging.warning('Unknown peak FLOP/s for device kind %r: MFU is not '
                    'reported (train/mfu is null). Give the peak per device '
                    'with --config.metrics.peak_flops to enable it.', kind)
  return None


def transformer_train_flops_per_token(num_params: int, num_layers: int,
                                      d_model: int, seq_len: int) -> float:
  """Training FLOPs per token: 6*N + 12*L*d*T (forward + backward)."""
  return 6.0 * num_params + 12.0 * num_layers * d_model * seq_len


def encoder_decoder_train_flops(
    *, encoder_params: int, decoder_params: int, encoder_layers: int,
    decoder_layers: int, d_model: int, src_len: int, tgt_len: int,
    src_tokens: float, tgt_tokens: float) -> float:
  """Training FLOPs of one batch of an encoder-decoder model.

  Encoder tokens pay the encoder weights and self-attention over `src_len`;
  decoder tokens pay the decoder weights (incl. the tied output projection,
  see the module docstring), self-attention over `tgt_len` and
  cross-attention over `src_len`. Cross-attention's K/V projections run on
  source tokens but are decoder weights; counting them per target token is
  the usual simplification.
  """
  enc = transformer_train_flops_per_token(
      encoder_params, encoder_layers, d_model, src_len)
  dec = transformer_train_flops_per_token(
      decoder_params, decoder_layers, d_model, tgt_len + src_len)
  return enc * src_tokens + dec * tgt_tokens


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float | None) -> float:
  """Model FLOPs utilization in [0, 1]; NaN when the peak is unknown."""
  if not peak_flops_per_device or step_time_s <= 0:
    return float('nan')
  return flops_per_step / step_time_s / (num_devices * peak_flops_per_device)


def measure_cpu_peak_flops(n: int = 2048, dtype: Any = jnp.float32,
                           repeats: int = 3,
                           compiler_options: Mapping[str, str] | None = None
                           ) -> float:
  """FLOP/s of an n x n matmul on the CPU, best of `repeats` after warm-up.

  CPUs have no datasheet peak that XLA reaches, so `bench` reports this
  measured number as the CPU "peak" for MFU. With `compiler_options` (those
  of the train step) the matmul is timed both ways and the faster counts.
  """
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((n, n), dtype), cpu)
  b = jax.device_put(jnp.ones((n, n), dtype), cpu)
  best = float('inf')
  for options in ({}, dict(compiler_options or {})):
    matmul = jax.jit(jnp.matmul, compiler_options=options)
    matmul(a, b).block_until_ready()  # Compile and warm caches.
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def _format_count(x: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.1f}{unit}'
  return f'{x:.0f}'


def _to_json_number(value: Any) -> float | int | None:
  """Plain Python number; NaN/inf become null so every line is strict JSON."""
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Writes metrics.jsonl, TensorBoard events and a progress line.

  The progress line reads `train/loss`, `train/tokens_per_sec` and
  `train/mfu` when present; the ETA comes from an exponential moving average
  of wall time per step between writes (so it includes eval and saving).
  """

  def __init__(self, workdir: str, *, total_steps: int, is_chief: bool = True,
               ema: float = 0.1):
    self.total_steps = total_steps
    self.is_chief = is_chief
    self._ema = ema
    self._sec_per_step: float | None = None
    self._last: tuple[int, float] | None = None
    self._bar_open = False
    self._tty = sys.stderr.isatty()
    self._jsonl = self._tb = None
    if not is_chief:
      return
    os.makedirs(workdir, exist_ok=True)
    # Appending keeps the history of a resumed run in one file.
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(logdir=workdir)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.is_chief:
      return
    step = int(step)
    record = {'step': step}
    record.update({k: _to_json_number(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key != 'step' and value is not None:
        self._tb.add_scalar(key, value, step)
    self._tb.flush()
    self._update_timing(step)
    self._progress(step, record)

  def _update_timing(self, step: int) -> None:
    now = _now()
    if self._last is not None and step > self._last[0]:
      dt = (now - self._last[1]) / (step - self._last[0])
      self._sec_per_step = dt if self._sec_per_step is None else (
          self._ema * dt + (1 - self._ema) * self._sec_per_step)
    if self._last is None or step > self._last[0]:
      self._last = (step, now)

  def eta_seconds(self, step: int) -> float:
    if self._sec_per_step is None:
      return float('nan')
    return max(self.total_steps - step, 0) * self._sec_per_step

  def _progress(self, step: int, record: dict[str, Any]) -> None:
    def num(key):
      v = record.get(key)
      return v if isinstance(v, (int, float)) else None

    train_keys = [k for k in record if k.startswith('train/')]
    parts = [f'step {step}/{self.total_steps} '
             f'({100 * step / max(self.total_steps, 1):.1f}%)']
    if train_keys:
      if num('train/loss') is not None:
        parts.append(f'loss {num("train/loss"):.4f}')
      if num('train/tokens_per_sec') is not None:
        parts.append(f'{_format_count(num("train/tokens_per_sec"))} tok/s')
      if num('train/mfu') is not None:
        parts.append(f'MFU {100 * num("train/mfu"):.1f}%')
      parts.append(f'ETA {_format_duration(self.eta_seconds(step))}')
    others = [f'{k} {v:.4g}' for k, v in record.items()
              if k != 'step' and not k.startswith('train/')
              and isinstance(v, (int, float))]
    line = ' | '.join(parts + others)
    if self._tty and train_keys and not others:
      # Redraw one line in place; eval results get their own lines.
      sys.stderr.write('\r' + line.ljust(100)[:200])
      self._bar_open = True
    else:
      if self._bar_open:
        sys.stderr.write('\n')
        self._bar_open = False
      sys.stderr.write(line + '\n')
    sys.stderr.flush()

  def close(self) -> None:
    if self._bar_open:
      sys.stderr.write('\n')
      self._bar_open = False
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
