"""Runs that chain on the task contract: pretrain -> SFT -> reward model / DPO.

The stages run through the CLI (`python -m train`), as users run them, on
the tiny generated data of tests/tiny_chat.py: init_from copies parameters
exactly and takes the source's tokenizer, a mismatch is one clear error, the
DPO reference is a frozen tree (no optimizer state, no update), a SIGKILLed
SFT or DPO run resumes bit-identically, and the loop's eval and checkpoint
defects stay fixed.
"""

import json
import signal

import jax
import numpy as np
import pytest

import tiny_chat
import tiny_run
from data import tokenizer as tokenizers
from data.errors import UserError
from train import checkpoint, loop, state as state_lib, step as step_lib

pytestmark = [
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited'),
]
TIMING_KEYS = ('train/step_time', 'train/tokens_per_sec', 'train/mfu')


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """{stage: workdir} of a CLI-trained chain, and the experiment file."""
  root = tmp_path_factory.mktemp('chain')
  workdirs = {s: root / s for s in ('pretrain', 'sft', 'reward', 'dpo')}
  experiment = tiny_chat.write(root / 'data', sources={
      'source_sft': str(workdirs['pretrain']),
      'source_reward': str(workdirs['sft']),
      'source_dpo': str(workdirs['sft'])})
  outputs = {}
  for stage in ('pretrain', 'sft', 'dpo', 'reward'):
    r = tiny_run.cli('train', '--config', f'{experiment}:{stage}',
                     '--workdir', str(workdirs[stage]))
    assert r.returncode == 0, f'{stage}:\n{r.stderr[-3000:]}'
    outputs[stage] = r.stdout
  return experiment, workdirs, outputs


def params_of(config, workdir, step=None):
  """(step, params as numpy) of a workdir's checkpoint, on one device."""
  run = loop.Run(config, str(workdir), for_training=False,
                 devices=jax.devices()[:1])
  try:
    restored = run.ckpt.restore(run.abstract_state, step=step)
    return restored[0], jax.device_get(restored[1].params), run
  finally:
    run.ckpt.close()


def flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_each_stage_trains_from_the_one_before(chain):
  experiment, workdirs, outputs = chain
  for stage in ('sft', 'reward', 'dpo'):
    assert 'init_from' in outputs[stage] and 'copied' in outputs[stage], stage
  assert 'initialised fresh: head/bias, head/kernel' in outputs['reward']
  for stage in ('sft', 'dpo', 'reward'):
    losses = tiny_run.losses(tiny_run.metrics(workdirs[stage]))
    assert sorted(losses) == list(range(1, 13)), stage
  # DPO starts at policy = reference: log 2.
  dpo = tiny_run.losses(tiny_run.metrics(workdirs['dpo']))
  assert abs(dpo[1] - np.log(2)) < 1e-5
  results = json.loads((workdirs['dpo'] / 'results.json').read_text())
  assert results['test/kl_token'] > 0 and 'test/accuracy' in results
  reward = json.loads((workdirs['reward'] / 'results.json').read_text())
  assert np.isfinite(reward['reward/offset'])
  # Every run of the chain has the pretraining run's tokenizer.
  tok = (workdirs['pretrain'] / 'tokenizer.model').read_bytes()
  for stage in ('sft', 'reward', 'dpo'):
    assert (workdirs[stage] / 'tokenizer.model').read_bytes() == tok


def test_init_from_copies_parameters_exactly(chain, tmp_path):
  """A fresh run's parameters are the source's, leaf for leaf; a reward
  model's head is the only thing it adds."""
  experiment, workdirs, _ = chain
  pretrain = tiny_chat.load_config(experiment, 'pretrain')
  _, source, _ = params_of(pretrain, workdirs['pretrain'])
  for stage in ('sft', 'reward'):
    config = tiny_chat.load_config(experiment, stage, **{
        'train.init_from': f'{workdirs["pretrain"]}:12'})
    run = loop.Run(config, str(tmp_path / stage), devices=jax.devices()[:1])
    _, state, _ = run.restore_or_init()
    got, want = flat(jax.device_get(state.params)), flat(source)
    assert set(got) - set(want) == (
        {'head/kernel', 'head/bias'} if stage == 'reward' else set())
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    run.ckpt.close()


def test_a_resumed_run_reads_itself_not_its_source(chain):
  """Once a run has checkpoints, train.init_from is not read again: even
  a source that is gone does not matter."""
  experiment, workdirs, _ = chain
  config = tiny_chat.load_config(experiment, 'sft', **{
      'train.init_from': '/nonexistent/run'})
  run = loop.Run(config, str(workdirs['sft']), devices=jax.devices()[:1])
  step, _, _ = run.restore_or_init()
  assert step == 12 and run.source is None
  run.ckpt.close()


def test_vocabulary_mismatch_is_one_error_naming_both(chain, tmp_path):
  experiment, workdirs, _ = chain
  other = tmp_path / 'other.model'
  tokenizers.train_tokenizer(['a b c d e f g'] * 50, vocab_size=400,
                             model_type='char', path=other)
  r = tiny_run.cli('train', '--config', f'{experiment}:sft', '--workdir',
                   str(tmp_path / 'w'),
                   f'--config.data.tokenizer.path={other}')
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr
  assert 'vocabulary mismatch' in errors[0]
  assert str(other) in errors[0] and str(workdirs['pretrain']) in errors[0]


def test_a_missing_source_is_one_error_line(chain, tmp_path):
  experiment, _, _ = chain
  r = tiny_run.cli('train', '--config', f'{experiment}:sft', '--workdir',
                   str(tmp_path / 'w'), '--config.train.init_from=/nonexistent')
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      'error: train.init_from=/nonexistent: /nonexistent/config.json not '
      'found; give the --workdir of a run that `transflax train` wrote']


def test_shape_mismatch_is_one_error_naming_both(chain, tmp_path):
  experiment, workdirs, _ = chain
  config = tiny_chat.load_config(experiment, 'sft', **{'model.d_model': 16})
  run = loop.Run(config, str(tmp_path / 'w'), devices=jax.devices()[:1])
  with pytest.raises(UserError) as e:
    run.restore_or_init()
  message = str(e.value)
  assert str(workdirs['pretrain']) in message and str(tmp_path / 'w') in message
  assert 'model.d_model: 32 there, 16 here' in message


def test_the_dpo_reference_is_frozen(chain):
  """The reference is the SFT model, untouched by training; the optimizer
  state holds moments for the trainable parameters only."""
  experiment, workdirs, _ = chain
  sft_cfg = tiny_chat.load_config(experiment, 'sft')
  _, sft_params, _ = params_of(sft_cfg, workdirs['sft'])
  config = tiny_chat.load_config(experiment, 'dpo')
  run = loop.Run(config, str(workdirs['dpo']), for_training=False,
                 devices=jax.devices()[:1])
  restored = run.ckpt.restore(run.abstract_state)
  state = jax.device_get(restored[1])
  reference = flat(jax.device_get(run.frozen['reference']))
  policy, sft = flat(state.params), flat(sft_params)
  assert set(reference) == set(sft) == set(policy)
  for key in sft:
    np.testing.assert_array_equal(reference[key], sft[key], err_msg=key)
  assert any(not np.array_equal(policy[k], sft[k]) for k in sft)
  n = state_lib.count_params(state.params)['total']
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * n  # Adam's mu and nu of the policy, nothing else
  # The loss measures the policy against that fixed reference: as the policy
  # moves, it leaves log 2 (against a copy of itself it never would).
  losses = tiny_run.losses(tiny_run.metrics(workdirs['dpo']))
  assert losses[12] < np.log(2) - 1e-3, losses
  run.ckpt.close()


def _kill_after_checkpoint(experiment, stage, workdir, log, step=4) -> int:
  with open(log, 'w') as f:
    proc = tiny_run.start_cli('train', '--config', f'{experiment}:{stage}',
                              '--workdir', str(workdir), log=f)
    try:
      tiny_run.wait_for(lambda: step in tiny_run.committed_steps(workdir),
                        proc, timeout=240, what=f'checkpoint {step}')
      proc.send_signal(signal.SIGKILL)
      proc.wait(60)
    except AssertionError:
      if 12 not in tiny_run.committed_steps(workdir):
        raise
    finally:
      proc.kill()
      proc.wait()
  return tiny_run.committed_steps(workdir)[-1]


@pytest.mark.parametrize('stage', ['sft', 'dpo'])
def test_sigkill_then_resume_is_bit_identical(chain, tmp_path, stage):
  experiment, workdirs, _ = chain
  for attempt in range(3):
    workdir = tmp_path / f'w{attempt}'
    resumed_from = _kill_after_checkpoint(experiment, stage, workdir,
                                          tmp_path / 'killed.log')
    if resumed_from < 12:
      break
  assert 4 <= resumed_from < 12, resumed_from
  logged = len(tiny_run.metrics(workdir))
  r = tiny_run.cli('train', '--config', f'{experiment}:{stage}', '--workdir',
                   str(workdir))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'starting at step {resumed_from}' in r.stdout
  assert 'init_from' not in r.stdout  # the source is not read again
  resumed = [m for m in tiny_run.metrics(workdir)[logged:] if 'train/loss' in m]
  want = {m['step']: m for m in tiny_run.metrics(workdirs[stage])
          if 'train/loss' in m}
  assert [m['step'] for m in resumed] == list(range(resumed_from + 1, 13))
  for record in resumed:
    for key in set(record) | set(want[record['step']]):
      if key not in TIMING_KEYS:
        assert record.get(key) == want[record['step']].get(key), (
            record['step'], key)
  config = tiny_chat.load_config(experiment, stage)
  got = flat(params_of(config, workdir)[1])
  ref = flat(params_of(config, workdirs[stage])[1])
  for key in ref:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_generate_and_eval_read_a_chat_workdir(chain):
  experiment, workdirs, _ = chain
  r = tiny_run.cli('generate', '--workdir', str(workdirs['sft']), '--prompt',
                   'repeat: sun', '--max_new_tokens', '6', '--num_samples', '1',
                   num_devices=1)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'repeat:' not in r.stdout  # a reply, not the prompt continued
  r = tiny_run.cli('eval', '--workdir', str(workdirs['dpo']), num_devices=1)
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result['eval/kl_token'] >= 0 and 'eval/accuracy' in result
  r = tiny_run.cli('generate', '--workdir', str(workdirs['reward']),
                   num_devices=1)
  assert r.returncode == 2 and 'does not generate text' in r.stderr


# -- defects of the loop ------------------------------------------------------------


def test_the_eval_step_compiles_once_per_run(chain, tmp_path, monkeypatch):
  experiment, _, _ = chain
  made = []
  real = step_lib.jit_eval_step

  def spy(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(step_lib, 'jit_eval_step', spy)
  config = tiny_chat.load_config(experiment, 'sft', **{
      'train.eval_every': 4, 'train.checkpoint_every': 100})
  loop.train_and_evaluate(config, str(tmp_path / 'w'), evaluate_at_end=False)
  assert len(made) == 1 and made[0].jitted._cache_size() == 1
  evals = [m for m in tiny_run.metrics(tmp_path / 'w') if 'eval/loss' in m]
  assert [m['step'] for m in evals] == [4, 8, 12]


def test_a_checkpoint_carries_only_its_own_steps_eval(chain, tmp_path):
  """Evaluated at 6 and 12, saved at 4, 8, 12: checkpoint 8 must not claim
  step 6's eval loss, so `best` can only be an evaluated step."""
  experiment, _, _ = chain
  workdir = tmp_path / 'w'
  config = tiny_chat.load_config(experiment, 'sft', **{
      'train.eval_every': 6, 'train.checkpoint_every': 4,
      'train.best_metric': 'eval/loss'})
  loop.train_and_evaluate(config, str(workdir), evaluate_at_end=False)
  ckpts = workdir / 'checkpoints'
  with_metrics = [s for s in (4, 8, 12)
                  if (ckpts / str(s) / 'metrics' / 'metrics').exists()]
  assert with_metrics == [12]
  with checkpoint.Checkpointer(workdir, best_metric='eval/loss',
                               read_only=True) as ckpt:
    assert ckpt.best_step() == 12


# -- the objectives through the tasks, on the chain's trained models -----------------


def _task_and_params(experiment, stage, workdir):
  config = tiny_chat.load_config(experiment, stage)
  _, params, run = params_of(config, workdir)
  return run, params


def _eval_batch(run, split='val'):
  _, batches = run.task.eval_batches(split, 8, 0, 1)
  return {k: jax.numpy.asarray(v) for k, v in next(iter(batches)).items()}


def test_sft_prompt_tokens_are_context_never_targets(chain):
  experiment, workdirs, _ = chain
  run, params = _task_and_params(experiment, 'sft', workdirs['sft'])
  batch = _eval_batch(run)
  mask = np.asarray(batch['loss_mask'])
  assert 0 < mask.sum() < (np.asarray(batch['inputs_segmentation']) > 0).sum()
  eval_loss = jax.jit(run.task.eval_loss)
  base = eval_loss(params, {}, batch)
  # Any target where the mask is 0 (prompt, headers, padding) may change.
  scrambled = dict(batch, targets=jax.numpy.where(
      batch['loss_mask'] > 0, batch['targets'], 7))
  again = eval_loss(params, {}, scrambled)
  assert float(again[0]) == float(base[0]) and float(again[1]) == float(base[1])
  # The loss's gradient reaches the logits at masked positions only.
  from train import objectives

  @jax.jit
  def logits_grad(params, batch):
    logits = run.task.module().apply({'params': params}, batch['inputs'],
                                     batch['inputs_segmentation'],
                                     batch['inputs_position'])
    return jax.grad(lambda l: objectives.token_loss(
        l, batch['targets'], batch['loss_mask'])[0])(logits)

  grad = logits_grad(params, batch)
  per_position = np.abs(np.asarray(grad)).sum(-1)
  assert np.all(per_position[mask == 0] == 0)
  assert np.all(per_position[mask == 1] > 0)


def test_sft_packed_rows_equal_one_conversation_per_row(chain):
  experiment, workdirs, _ = chain
  run, params = _task_and_params(experiment, 'sft', workdirs['sft'])
  from data import pipeline
  examples = run.task.examples('val')[:12]
  length = run.config.data.max_length
  packed = next(iter(pipeline.sequence_train(
      examples, batch_size=4, max_length=length, seed=0)))
  assert packed['inputs_segmentation'].max() >= 2  # really packed
  n = int(packed['inputs_segmentation'].max(axis=1).sum())
  # The same conversations, one per row: the packer took the first n of
  # epoch 0's order.
  order = pipeline.epoch_order(len(examples), 0, 0)[:n]
  alone = pipeline.sequence_eval_batches([examples[i] for i in order],
                                         batch_size=n, max_length=length)
  unpacked = next(iter(alone))
  eval_loss = jax.jit(run.task.eval_loss)
  a = eval_loss(params, {}, {k: jax.numpy.asarray(v)
                             for k, v in packed.items()})
  b = eval_loss(params, {}, {k: jax.numpy.asarray(v)
                             for k, v in unpacked.items()})
  assert float(a[1]) == float(b[1])  # the same target tokens
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5)


def test_reward_ignores_response_order_and_trailing_padding(chain):
  experiment, workdirs, _ = chain
  run, params = _task_and_params(experiment, 'reward', workdirs['reward'])
  batch = _eval_batch(run)
  loss = jax.jit(lambda p, b: run.task.loss(p, {}, b, None))
  base = loss(params, batch)
  perm = np.array([2, 0, 3, 1])
  shuffled = {k: v[:, perm] for k, v in batch.items()}
  again = loss(params, shuffled)
  np.testing.assert_allclose(float(again[0]), float(base[0]), rtol=1e-6)
  assert float(again[1]) == float(base[1])
  for key in ('accuracy', 'margin'):
    np.testing.assert_allclose(float(again[2][key].total),
                               float(base[2][key].total), rtol=1e-5, atol=1e-6)
  scores = jax.jit(lambda p, b: run.task.scores(p, b, None))
  padded = {k: jax.numpy.pad(v, ((0, 0), (0, 0), (0, 8))) if v.ndim == 3
            else v for k, v in batch.items()}
  np.testing.assert_allclose(scores(params, padded), scores(params, batch),
                             rtol=1e-5, atol=1e-6)


def test_dpo_starts_at_log_2_and_its_gradient_prefers_chosen(chain):
  experiment, workdirs, _ = chain
  run, params = _task_and_params(experiment, 'sft', workdirs['sft'])
  dpo_config = tiny_chat.load_config(experiment, 'dpo')
  dpo_run = loop.Run(dpo_config, str(workdirs['dpo']), for_training=False,
                     devices=jax.devices()[:1])
  task = dpo_run.task
  batch = _eval_batch(dpo_run)
  frozen = {'reference': params}  # policy = reference
  loss, weight, _ = jax.jit(task.eval_loss)(params, frozen, batch)
  np.testing.assert_allclose(float(loss / weight), np.log(2), rtol=1e-6)

  @jax.jit
  def margin(p):
    logits, flat_batch = task._logits(p, batch, None)
    logp = task._sequence_logprobs(logits, flat_batch)
    return jax.numpy.sum(logp[:, 0] - logp[:, 1])

  grads = jax.jit(jax.grad(lambda p: task.loss(p, frozen, batch, None)[0]))(
      params)
  stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
  assert float(margin(stepped)) > float(margin(params))
  dpo_run.ckpt.close()


def test_mlm_learns_to_restore_masked_tokens(chain, tmp_path):
  """The contract holds an objective that is not next-token prediction."""
  experiment, _, _ = chain
  config = tiny_chat.load_config(experiment, 'mlm')
  final = loop.train_and_evaluate(config, str(tmp_path / 'w'))
  losses = tiny_run.losses(tiny_run.metrics(tmp_path / 'w'))
  assert losses[30] < losses[1] - 1.0, losses
  assert 0 < final['eval/accuracy'] and final['eval/loss'] < losses[1]


def test_a_reward_model_of_human_sentiment_is_judged_beside_vader(chain,
                                                                  tmp_path):
  """Real human rankings (tweets): the held-out pairs, VADER on the same
  pairs, and InstructGPT's normalisation: after training, the training
  responses score 0 on average with the checkpoint's own head."""
  from corpora import data_root
  experiment, workdirs, _ = chain
  root = data_root()
  # A fresh model long enough for tweets in the tiny vocabulary, with the
  # chain's tokenizer (no init_from: its positions would be too few).
  config = tiny_chat.load_config(experiment, 'reward', **{
      'data.corpus': 'sentiment', 'data.dir': str(root),
      'data.max_length': 160, 'model.max_len': 160, 'train.init_from': '',
      'data.tokenizer.path': str(workdirs['pretrain'] / 'tokenizer.model'),
      'reward.sources': 'tweets', 'train.num_steps': 4,
      'train.eval_batch_size': 128})
  loop.train_and_evaluate(config, str(tmp_path / 'w'))
  results = json.loads((tmp_path / 'w' / 'results.json').read_text())
  tweets = results['heldout']['tweets']
  assert tweets['pairs'] > 40_000 and tweets['sentences'] > 350
  assert abs(tweets['vader'] - 0.93) < 0.01  # VADER's own accuracy on them
  assert 0.0 <= tweets['reward_model'] <= 1.0
  step, params, run = params_of(config, tmp_path / 'w')
  responses = sorted({t for r in run.task.rankings('train')
                      for t in r.responses})
  scores = run.task.score_texts(run, params, responses)
  assert step == 4 and abs(float(np.nanmean(scores))) < 1e-4
  assert abs(results['reward/offset']) > 1e-3  # the shift did something


def test_a_frozen_tree_from_another_run_is_copied_whole(chain, tmp_path):
  """A frozen tree named by a workdir (as PPO's reward model will be) is that
  run's parameters exactly; one it cannot fill completely is an error."""
  from train import tasks
  from train.tasks import reward, sft
  experiment, workdirs, _ = chain

  class Anchored(sft.SFT):
    name = 'test_anchored_sft'

    def frozen_sources(self):
      return {'anchor': str(workdirs['pretrain'])}

  class AnchoredReward(reward.RewardModel):
    name = 'test_anchored_reward'

    def frozen_sources(self):  # a reward model's head is not in an LM
      return {'anchor': str(workdirs['pretrain'])}

  for cls in (Anchored, AnchoredReward):
    tasks.REGISTRY[cls.name] = cls
  try:
    config = tiny_chat.load_config(experiment, 'sft',
                                   task='test_anchored_sft')
    run = loop.Run(config, str(tmp_path / 'a'), devices=jax.devices()[:1])
    run.restore_or_init()
    _, want, _ = params_of(tiny_chat.load_config(experiment, 'pretrain'),
                           workdirs['pretrain'])
    got = flat(jax.device_get(run.frozen['anchor']))
    assert set(got) == set(flat(want))
    for key, value in flat(want).items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
    run.ckpt.close()
    config = tiny_chat.load_config(experiment, 'reward',
                                   task='test_anchored_reward')
    run = loop.Run(config, str(tmp_path / 'b'), devices=jax.devices()[:1])
    with pytest.raises(UserError, match='lacks parameters.*head/'):
      run.restore_or_init()
    run.ckpt.close()
  finally:
    for cls in (Anchored, AnchoredReward):
      tasks.REGISTRY.pop(cls.name)
