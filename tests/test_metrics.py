"""Tests for train/metrics.py: jsonl + TensorBoard output, FLOPs/MFU, peaks."""

import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import metrics as metrics_lib, step as step_lib


def test_writer_jsonl_tensorboard_and_progress(tmp_path, capsys):
  with metrics_lib.MetricWriter(str(tmp_path), total_steps=100) as writer:
    writer.write(10, {'train/loss': jnp.float32(2.5), 'train/tokens': 512,
                      'train/tokens_per_sec': 12345.0, 'train/mfu': 0.25})
    writer.write(20, {'train/loss': np.float32(2.0),
                      'train/grad_norm': float('nan')})
    writer.write(20, {'eval/loss': 1.9, 'eval/bleu': 30.1})
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]  # Strict JSON: no NaN.
  assert [r['step'] for r in records] == [10, 20, 20]
  assert records[0] == {'step': 10, 'train/loss': 2.5, 'train/tokens': 512,
                        'train/tokens_per_sec': 12345.0, 'train/mfu': 0.25}
  assert records[1]['train/grad_norm'] is None
  assert records[2] == {'step': 20, 'eval/loss': 1.9, 'eval/bleu': 30.1}
  assert list(tmp_path.glob('events.out.tfevents.*'))
  err = capsys.readouterr().err
  assert 'step 10/100' in err and 'loss 2.5000' in err
  assert '12.3k tok/s' in err and 'MFU 25.0%' in err and 'ETA' in err
  assert 'eval/bleu 30.1' in err

  # Resuming appends to the same file.
  with metrics_lib.MetricWriter(str(tmp_path), total_steps=100) as writer:
    writer.write(30, {'train/loss': 1.0})
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 4


def test_only_chief_writes(tmp_path, capsys):
  with metrics_lib.MetricWriter(str(tmp_path), total_steps=10,
                                is_chief=False) as writer:
    writer.write(1, {'train/loss': 1.0})
  assert not list(tmp_path.iterdir())
  assert capsys.readouterr().err == ''


def test_eta_from_moving_average(tmp_path, monkeypatch):
  clock = iter([0.0, 10.0, 20.0])
  monkeypatch.setattr(metrics_lib, '_now', lambda: next(clock))
  with metrics_lib.MetricWriter(str(tmp_path), total_steps=1000) as writer:
    assert math.isnan(writer.eta_seconds(0))
    writer.write(0, {'train/loss': 1.0})
    writer.write(100, {'train/loss': 1.0})  # 0.1 s/step.
    writer.write(200, {'train/loss': 1.0})
    assert writer.eta_seconds(200) == pytest.approx(800 * 0.1)


def test_flops_and_mfu_known_case():
  # 6N + 12*L*d*T with N=1e8, L=12, d=768, T=1024.
  per_token = metrics_lib.transformer_train_flops_per_token(
      int(1e8), 12, 768, 1024)
  assert per_token == 6e8 + 12 * 12 * 768 * 1024
  # 1e15 FLOPs per step in 1 s on 4 devices of 1e15 peak: 25%.
  assert metrics_lib.mfu(1e15, 1.0, 4, 1e15) == pytest.approx(0.25)
  assert math.isnan(metrics_lib.mfu(1e15, 1.0, 4, None))
  enc_dec = metrics_lib.encoder_decoder_train_flops(
      encoder_params=10, decoder_params=20, encoder_layers=1,
      decoder_layers=2, d_model=4, src_len=8, tgt_len=6, src_tokens=100,
      tgt_tokens=50)
  assert enc_dec == (60 + 12 * 4 * 8) * 100 + (120 + 24 * 4 * 14) * 50


# Dense bf16 peaks from the vendors' datasheets (NVIDIA H100/H200/A100/L4/
# L40S, Google Cloud TPU system architecture pages), for the device_kind
# strings JAX reports. The pairs that share a prefix (H100 PCIe/NVL/SXM,
# TPU v5 lite/v5p, L4/L40S) are the ones a misordered pattern list gets wrong.
DATASHEET = {
    'NVIDIA H100 80GB HBM3': 989.4e12, 'NVIDIA H100 PCIe': 756.5e12,
    'NVIDIA H100 NVL': 835.5e12, 'NVIDIA H200': 989.4e12,
    'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA L4': 121e12,
    'NVIDIA L40S': 362.05e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5': 459e12, 'TPU v6 lite': 918e12,
}


@pytest.mark.parametrize('kind', sorted(DATASHEET))
def test_peak_matches_the_datasheet(kind):
  device = types.SimpleNamespace(device_kind=kind)
  assert metrics_lib.peak_flops_per_device(device) == pytest.approx(
      DATASHEET[kind], rel=2e-3)


def test_every_peak_pattern_is_reachable():
  """No pattern is shadowed by an earlier, broader one: each entry of
  PEAK_FLOPS is the first match of some datasheet device."""
  first = {next(i for i, (p, _) in enumerate(metrics_lib.PEAK_FLOPS)
                if re.search(p, kind.lower())) for kind in DATASHEET}
  assert first == set(range(len(metrics_lib.PEAK_FLOPS)))


def test_peak_unknown_and_override(caplog):
  cpu = jax.devices('cpu')[0]
  assert metrics_lib.peak_flops_per_device(cpu, override=1e12) == 1e12
  assert metrics_lib.peak_flops_per_device(cpu) is None
  assert 'Unknown peak' not in caplog.text  # CPUs have no datasheet peak
  unknown = types.SimpleNamespace(device_kind='Mystery Accelerator 9000')
  assert metrics_lib.peak_flops_per_device(unknown) is None
  assert metrics_lib.peak_flops_per_device(unknown) is None
  assert caplog.text.count('Mystery Accelerator 9000') == 1  # Warned once.


def test_measure_cpu_peak_flops_is_2n3_over_the_best_time(monkeypatch):
  """A clock whose timed intervals are 4, 2, 3, 5 s (and compiles take
  0 s): the best of all repeats, both compiler options, is 2 s, so the
  peak is 2 n^3 / 2."""
  intervals = iter([4.0, 2.0, 3.0, 5.0])
  clock = {'t': 0.0, 'start': True}

  def perf_counter():
    if not clock['start']:
      clock['t'] += next(intervals)
    clock['start'] = not clock['start']
    return clock['t']
  # The module's own `time` only: JAX's compiles read the real clock.
  monkeypatch.setattr(metrics_lib, 'time',
                      types.SimpleNamespace(perf_counter=perf_counter))
  n = 64
  flops = metrics_lib.measure_cpu_peak_flops(
      n=n, repeats=2, compiler_options=step_lib.compiler_options())
  assert flops == 2.0 * n**3 / 2.0
