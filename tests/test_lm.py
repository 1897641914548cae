"""Language models end to end: experiments/shakespeare_char.py and gpt2.py.

The smoke configs train through the real CLI (`python -m train ...`) in a
subprocess, as a user runs them; sampling properties (greedy = top-k 1, KV
cache = full recompute, sliding window = nanoGPT's cropped context) are
checked in-process on a real DecoderLM trained on a tiny repetitive text, so
that its predictions depend on more than the last token.

Tiny Shakespeare comes from $TRANSFLAX_DATA or ../shared/data next to the
repository; tests that need it are skipped without it.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import corpora

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = 'ROMEO:'


def _data_dir():
  for d in (os.environ.get('TRANSFLAX_DATA'), REPO.parent / 'shared' / 'data'):
    if d and (pathlib.Path(d) / 'tinyshakespeare' / 'input.txt').exists():
      return str(d)
  return None


DATA = _data_dir()


@pytest.fixture
def shakespeare_data():
  if DATA is None:
    corpora.missing('tinyshakespeare/input.txt')


needs_data = pytest.mark.usefixtures('shakespeare_data')


def cli(*args: str) -> str:
  """stdout of `python -m train ARGS` run from the repository root; must exit 0.

  On one CPU device, as on a laptop (conftest's 8 simulated devices are for
  the in-process tests; they only slow a subprocess down).
  """
  flags = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count'))
  env = dict(os.environ, TRANSFLAX_DATA=DATA or '', PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  if flags:
    env['XLA_FLAGS'] = flags
  r = subprocess.run([sys.executable, '-m', 'train', *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (f'`transflax {" ".join(args)}` exited '
                             f'{r.returncode}:\n{r.stderr[-4000:]}')
  return r.stdout


def last_json(stdout: str) -> dict:
  return json.loads([l for l in stdout.splitlines() if l.startswith('{')][-1])


# -- Tiny Shakespeare, character level, through the CLI ----------------------

@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
  """(workdir, stdout) of `transflax train` on shakespeare_char.py:smoke."""
  if DATA is None:
    corpora.missing('tinyshakespeare/input.txt')
  workdir = str(tmp_path_factory.mktemp('shakespeare') / 'run')
  out = cli('train', '--config', 'experiments/shakespeare_char.py:smoke',
            '--workdir', workdir)
  return workdir, out


@needs_data
def test_shakespeare_smoke_trains_end_to_end(shakespeare):
  workdir, out = shakespeare
  final = last_json(out)
  assert final['step'] == 12
  assert np.isfinite(final['eval/loss'])
  # log(69) untrained; 12 small steps barely move it, but it must not blow up.
  assert final['eval/loss'] < np.log(69) + 0.5
  config = json.load(open(os.path.join(workdir, 'config.json')))
  # nanoGPT's 65 characters and our 4 special ids.
  assert config['model']['vocab_size'] == 69
  samples = open(os.path.join(workdir, 'samples.txt')).read()
  assert samples.startswith('--- step 12\n\n')  # the prompt '\n', then text
  assert len(samples) > len('--- step 12\n\n') + 20
  assert os.listdir(os.path.join(workdir, 'checkpoints'))


@needs_data
def test_generate_streams_and_is_seeded(shakespeare):
  workdir, _ = shakespeare
  common = ('generate', '--workdir', workdir, '--prompt', PROMPT,
            '--max_new_tokens', '20')
  one = cli(*common, '--seed', '1')
  assert one.startswith(PROMPT) and one.endswith('\n')
  assert len(one) > len(PROMPT) + 5
  # Seeds seed, seed+1: the first repeats the run above, the second differs.
  two = cli(*common, '--seed', '1', '--num_samples', '2')
  samples = re.split(r'^--- sample \d/2\n', two, flags=re.M)[1:]
  assert len(samples) == 2
  assert samples[0] == one
  assert samples[1].startswith(PROMPT)
  assert samples[1] != one


@needs_data
def test_eval_prints_loss_and_perplexity(shakespeare):
  workdir, out = shakespeare
  out = cli('eval', '--workdir', workdir)
  result = json.loads(out.strip().splitlines()[-1])
  assert result['split'] == 'val'
  assert result['eval/perplexity'] == pytest.approx(np.exp(result['eval/loss']))
  # The same checkpoint and batches as the training run's last evaluation.
  assert result['eval/loss'] == pytest.approx(last_json(out)['eval/loss'],
                                              abs=1e-4)


# -- GPT-2 -------------------------------------------------------------------

def test_gpt2_small_dry_run_has_124m_parameters():
  out = cli('train', '--config', 'experiments/gpt2.py:small', '--dry_run')
  total = re.search(r'^\s*total\s+([\d,]+) params', out, flags=re.M)
  assert total, out[:2000]
  n = int(total.group(1).replace(',', ''))
  assert abs(n - 124e6) / 124e6 < 0.01, n
  assert 'vocab 50304' in out  # nanoGPT's padded vocabulary


@needs_data
def test_gpt2_smoke_trains_and_generates(tmp_path):
  workdir = str(tmp_path / 'gpt2')
  final = last_json(cli('train', '--config', 'experiments/gpt2.py:smoke',
                        '--workdir', workdir))
  assert final['step'] == 8 and np.isfinite(final['eval/loss'])
  with open(os.path.join(workdir, 'tokenizer.model'), 'rb') as f:
    assert f.read(1) != b'{'  # a SentencePiece model, not the char vocabulary
  out = cli('generate', '--workdir', workdir, '--prompt', PROMPT,
            '--max_new_tokens', '20', '--seed', '1')
  assert out.startswith(PROMPT) and out.endswith('\n')


# -- sampling properties on a model that learned something -------------------

PHRASE = 'to be or not to be, that is the question\n'  # 41: all block offsets


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(run, params, metrics) of a char LM trained in-process on PHRASEs."""
  from experiments import shakespeare_char
  from train import loop, runs
  root = tmp_path_factory.mktemp('tiny')
  (root / 'train.txt').write_text(PHRASE * 200)
  (root / 'val.txt').write_text(PHRASE * 10)
  c = shakespeare_char.get_config('smoke')
  c.data.corpus = 'text'
  c.data.files.train = str(root / 'train.txt')
  c.data.files.val = str(root / 'val.txt')
  c.train.update(num_steps=40, log_every=5, eval_every=0, checkpoint_every=40)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=5)
  workdir = str(root / 'run')
  loop.train_and_evaluate(c, workdir, evaluate_at_end=False)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = [json.loads(l) for l in f]
  run, params = runs.load(workdir)
  return run, params, metrics


def test_loss_falls_on_a_tiny_corpus(tiny):
  _, _, metrics = tiny
  losses = [m['train/loss'] for m in metrics if 'train/loss' in m]
  assert len(losses) == 8
  assert losses[0] > 2.0  # steps 1-5: still near log(vocab)
  assert losses[-1] < 0.5 * losses[0], losses


def _greedy(run, params, prompt, n, **kw):
  from train import sampling
  return sampling.generate_text(run, params, prompt, max_new_tokens=n,
                                **{'temperature': 0.0, 'top_k': 0, 'top_p': 1.0,
                                   'seed': 0, **kw})


def test_top_k_1_is_greedy(tiny):
  run, params, _ = tiny
  greedy = _greedy(run, params, 'to be', 20)
  hot = dict(temperature=2.0, seed=3)
  assert _greedy(run, params, 'to be', 20, top_k=1, **hot) == greedy
  assert _greedy(run, params, 'to be', 20, **hot) != greedy  # not vacuous


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_kv_cache_matches_recomputing_the_prefix(tiny, temperature):
  """Greedy and sampled text (same keys) match evaluate.uncached_step's."""
  from data import tokenizer as tokenizers
  from model import generate
  from train import evaluate, sampling
  run, params, _ = tiny
  prompt, new = 'to be', 26  # 'to be' = start + 4 forced: 30 <= max_len 32
  cached = _greedy(run, params, prompt, new, temperature=temperature, seed=7)
  start, forced = sampling.prompt_ids(run.task.tokenizer, prompt)
  total = len(forced) + new
  assert total <= run.model_config.max_len
  uncached, init = evaluate.uncached_step(run.task.module(), params, None,
                                          None, total)
  mask = sampling.logits_mask(sampling.never_sampled(run.task.tokenizer),
                              run.model_config.vocab_size)

  def step(tokens, cache):
    logits, cache = uncached(tokens, cache)
    return logits + mask, cache

  seqs = generate.temperature_sample(
      jnp.asarray([forced]), init(1), step, jax.random.PRNGKey(7),
      eos_id=tokenizers.EOS_ID, temperature=temperature, max_decode_len=total,
      start_id=start)
  ids = np.asarray(seqs)[0, len(forced):]
  assert len(set(ids.tolist())) >= 5  # a real continuation, not one token
  assert np.all(ids >= 4)  # no special ids: EOS, PAD are never sampled
  assert cached == prompt + run.task.tokenizer.decode([ids])[0]


def test_sliding_window_past_max_len_matches_cropped_context(tiny):
  """Past max_len, each token comes from the last max_len tokens, as in nanoGPT.

  Sampled at temperature 1 with generate_text's key for step i,
  fold_in(key, i): greedy text of a small model soon repeats itself whatever
  the context. The weights are scaled up so that the logits depend strongly
  on the whole window: an off-by-one window changes most samples.
  """
  from train import sampling
  run, params, _ = tiny
  params = jax.tree_util.tree_map(lambda p: 3 * p, params)
  tok, max_len = run.task.tokenizer, run.model_config.max_len
  prompt, new, key = 'to be', 60, jax.random.PRNGKey(5)
  start, forced = sampling.prompt_ids(tok, prompt)
  module = run.task.module()
  mask = sampling.logits_mask(sampling.never_sampled(tok),
                              run.model_config.vocab_size)
  forward = jax.jit(lambda p, x: module.apply({'params': p}, x) + mask)
  fed, out = [start], []
  for i in range(len(forced) + new):
    context = fed[-max_len:]
    # Right-padding is invisible to the causal positions that matter.
    window = np.zeros((1, max_len), np.int32)
    window[0, :len(context)] = context
    logits = forward(params, jnp.asarray(window))[0, len(context) - 1]
    sampled = jax.random.categorical(jax.random.fold_in(key, i), logits)
    token = forced[i] if i < len(forced) else int(sampled)
    out.append(token)
    fed.append(token)
  expected = prompt + tok.decode([out[len(forced):]])[0]
  assert len(expected) == len(prompt) + new  # character LMs never stop early
  assert _greedy(run, params, prompt, new, temperature=1.0, seed=5) == expected


# -- bench -------------------------------------------------------------------

@needs_data
def test_bench_runs_on_the_smoke_config(monkeypatch):
  from experiments import shakespeare_char
  from train import bench, metrics
  monkeypatch.setenv('TRANSFLAX_DATA', DATA)
  # The real 2048^3 matmul costs seconds; any positive peak checks the path.
  monkeypatch.setattr(metrics, 'measure_cpu_peak_flops', lambda **_: 1e12)
  result = bench.benchmark(shakespeare_char.get_config('smoke'), steps=1,
                           warmup=0, decode_batches=(2,), decode_tokens=8)
  assert result['params'] > 0 and result['batch'] == [8, 32]
  for key in ('step_time_s', 'tokens_per_sec', 'model_tflops_per_sec',
              'decode_tokens_per_sec_batch2'):
    assert np.isfinite(result[key]) and result[key] > 0, key
  assert np.isfinite(result['mfu']) and result['mfu'] > 0


def test_streamed_text_is_the_returned_text(tiny):
  """Streaming reads tokens back every few steps, across the switch to the
  sliding window too; what it writes is exactly the unstreamed sample."""
  import io
  from train import sampling
  run, params, _ = tiny
  prompt, new = 'to be', 45  # 5 prompt + 45 > max_len 32, not a multiple of 8
  kw = dict(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, seed=2)
  plain = sampling.generate_text(run, params, prompt, **kw)
  out = io.StringIO()
  streamed = sampling.generate_text(run, params, prompt, stream=out, **kw)
  assert streamed == plain and len(plain) == len(prompt) + new
  assert out.getvalue() == plain + '\n'
