"""RL (train/rl/): the sampler's log-probs, advantages and losses against
NumPy, PPO and GRPO learning a toy reward, and exact resume after SIGKILL.

The loop tests run on the tiny chat chain of tests/tiny_chat.py (pretrain
-> sft -> reward, trained in-process once per module): the policy and the
frozen reference are the SFT run, prompts are its "repeat: ..." requests,
and the toy reward (experiments/rewards.py:letter_a) is the share of the
letters of a response that are 'a'.
"""

import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_chat
import tiny_run
from data.errors import UserError
from model import DecoderLM, TransformerConfig
from train import loop, partitioning, sampling
from train.rl import advantages, losses
from train.rl import loop as rl_loop, rollout as rollout_lib

pytestmark = [
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited'),
]
TIMING = ('tokens_per_sec', 'seconds', 'rollout_share')


# -- advantages and losses against NumPy -------------------------------------------


def _gae_reference(rewards, values, mask, dones, gamma, lam):
  """Episode by episode: each row's real tokens, cut at every done."""
  b, t = rewards.shape
  adv = np.zeros_like(rewards)
  for r in range(b):
    real = [i for i in range(t) if mask[r, i]]
    episodes, current = [], []
    for i in real:
      current.append(i)
      if dones[r, i]:
        episodes.append(current)
        current = []
    if current:
      episodes.append(current)
    for ep in episodes:
      last = 0.0
      for k in reversed(range(len(ep))):
        i = ep[k]
        next_v = values[r, ep[k + 1]] if k + 1 < len(ep) else 0.0
        delta = rewards[r, i] + gamma * next_v - values[r, i]
        last = delta + gamma * lam * last
        adv[r, i] = last
  return adv, (adv + values) * mask


def test_gae_equals_numpy_with_masks_and_episode_ends():
  rng = np.random.default_rng(0)
  b, t = 5, 9
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  lengths = np.array([9, 5, 1, 7, 3])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  dones = np.zeros((b, t), np.float32)
  dones[0, 3] = dones[3, 2] = dones[3, 4] = 1  # episodes end mid-row
  for gamma, lam in ((1.0, 0.95), (0.9, 1.0), (0.99, 0.0)):
    got_adv, got_ret = advantages.gae(jnp.asarray(rewards), jnp.asarray(values),
                                      jnp.asarray(mask), gamma=gamma, lam=lam,
                                      dones=jnp.asarray(dones))
    want_adv, want_ret = _gae_reference(rewards, values * mask, mask, dones,
                                        gamma, lam)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got_adv)[mask == 0] == 0)


def test_token_rewards_put_the_score_on_the_last_real_token():
  kl = np.full((2, 4), 0.5, np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  got = np.asarray(advantages.token_rewards(jnp.asarray([2.0, -1.0]),
                                            jnp.asarray(kl), jnp.asarray(mask),
                                            0.1))
  np.testing.assert_allclose(got, [[-0.05, -0.05, 1.95, 0.0],
                                   [-0.05, -0.05, -0.05, -1.05]], rtol=1e-6)


def test_kl_estimators_are_zero_at_the_reference_and_k3_nonnegative():
  rng = np.random.default_rng(1)
  logp = jnp.asarray(-rng.random((3, 7)) * 4)
  for est in advantages.KL_ESTIMATORS:
    assert np.all(np.asarray(advantages.kl_estimate(logp, logp, est)) == 0)
  other = jnp.asarray(-rng.random((3, 7)) * 4)
  k3 = np.asarray(advantages.kl_estimate(logp, other, 'k3'))
  assert np.all(k3 >= 0)
  r = np.asarray(other - logp)
  np.testing.assert_allclose(k3, np.exp(r) - 1 - r, rtol=1e-5, atol=1e-6)


def test_group_advantages_equal_the_per_group_formula():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=12).astype(np.float32)
  got = np.asarray(advantages.group_advantages(jnp.asarray(scores), 4))
  for g in range(3):
    s = scores[4 * g:4 * g + 4]
    np.testing.assert_allclose(got[4 * g:4 * g + 4],
                               (s - s.mean()) / (s.std(ddof=1) + 1e-4),
                               rtol=1e-5)
  same = np.asarray(advantages.group_advantages(jnp.ones(8), 4))
  assert np.all(same == 0)  # a group that all scored alike teaches nothing


def test_adaptive_kl_coefficient_follows_its_target():
  fixed = advantages.KLController(0.1)
  fixed.update(kl=50.0, n=16)
  assert fixed.value == 0.1
  ctl = advantages.KLController(0.1, target=6.0, horizon=1000)
  ctl.update(kl=9.0, n=100)  # 50% over the target: the error clips at 0.2
  np.testing.assert_allclose(ctl.value, 0.1 * (1 + 0.2 * 100 / 1000))
  ctl.update(kl=5.4, n=100)  # 10% under
  np.testing.assert_allclose(ctl.value,
                             0.1 * 1.02 * (1 - 0.1 * 100 / 1000))


def test_clipped_losses_equal_numpy():
  rng = np.random.default_rng(3)
  b, t, eps = 4, 6, 0.2
  logp, old = -rng.random((b, t)) * 3, -rng.random((b, t)) * 3
  adv = rng.normal(size=(b, t))
  mask = (rng.random((b, t)) > 0.3).astype(np.float64)
  ratio = np.exp(logp - old)
  per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  loss, weight, m = losses.clipped_policy_loss(f32(logp), f32(old), f32(adv),
                                               f32(mask), clip=eps)
  np.testing.assert_allclose(float(loss), np.sum(per_token * mask), rtol=1e-5)
  assert float(weight) == mask.sum()
  clipped = (-adv * np.clip(ratio, 1 - eps, 1 + eps)) > (-adv * ratio)
  np.testing.assert_allclose(float(m['clip_fraction'].total),
                             np.sum(clipped * mask), rtol=1e-6)
  loss, weight, _ = losses.clipped_policy_loss(
      f32(logp), f32(old), f32(adv), f32(mask), clip=eps, per_sequence=True)
  per_seq = np.sum(per_token * mask, 1) / np.maximum(mask.sum(1), 1)
  np.testing.assert_allclose(float(loss), per_seq[mask.sum(1) > 0].sum(),
                             rtol=1e-5)
  assert float(weight) == np.sum(mask.sum(1) > 0)

  values, old_v, ret = (rng.normal(size=(b, t)) for _ in range(3))
  vclip = old_v + np.clip(values - old_v, -eps, eps)
  want = 0.5 * np.maximum((values - ret) ** 2, (vclip - ret) ** 2)
  loss, weight, _ = losses.clipped_value_loss(f32(values), f32(old_v),
                                              f32(ret), f32(mask), clip=eps)
  np.testing.assert_allclose(float(loss), np.sum(want * mask), rtol=1e-5)


# -- the sampler -----------------------------------------------------------------

CFG = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, mlp_dim=64,
                        num_encoder_layers=0, num_decoder_layers=2, max_len=48,
                        positions='rotary', dropout_rate=0.0,
                        attention_dropout_rate=0.0, deterministic=True)
CONTEXTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19],
            [20, 21, 22], [23, 24, 25, 26], [27] * 6, [28, 29]]


def _params(devices):
  """The tiny LM's params, replicated over a mesh of `devices`."""
  params = DecoderLM(CFG).init(jax.random.PRNGKey(0),
                               jnp.ones((1, 8), jnp.int32))['params']
  mesh = partitioning.make_mesh(len(devices), 1, 1, devices)
  return jax.device_put(params, partitioning.replicated(mesh)), mesh


def _sample(params, mesh, *, eos=3, **kwargs):
  tokens, real = sampling.left_pad(CONTEXTS, 8)
  sharding = partitioning.batch_sharding(mesh)
  state = sampling.sample_batch(
      CFG, params, (jax.device_put(tokens, sharding),
                    jax.device_put(real, sharding)),
      max_new_tokens=12, seed=jax.random.PRNGKey(7), eos_id=eos,
      never=((0, 1), CFG.vocab_size), **kwargs)
  return rollout_lib.Rollout(*rollout_lib._layout(
      jax.device_put(tokens, sharding), jax.device_put(real, sharding),
      state.sequences, state.logprobs, jnp.int32(eos)))


def test_sampler_logprobs_equal_a_full_forward_pass():
  """Prefill + cached steps = one full forward pass of the sampled rows,
  so PPO's first importance ratio is 1."""
  params, mesh = _params(jax.devices()[:1])
  for temperature in (1.0, 0.7):
    roll = _sample(params, mesh, temperature=temperature)
    mask = np.asarray(roll.mask)
    assert mask.sum() > len(CONTEXTS)  # rows sampled several tokens
    full = DecoderLM(CFG).apply({'params': params}, roll.tokens, roll.segments,
                                roll.positions)[:, 7:-1]
    bias = sampling.logits_mask(((0, 1), CFG.vocab_size), CFG.vocab_size)
    logp = jax.nn.log_softmax((full + bias) / temperature, axis=-1)
    want = np.take_along_axis(np.asarray(logp), np.asarray(roll.tokens)[:, 8:,
                                                                       None],
                              axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(roll.logprobs), want * mask,
                               atol=2e-5)


def test_top_k_one_is_greedy():
  params, mesh = _params(jax.devices()[:1])
  greedy = _sample(params, mesh, temperature=0.0)
  top1 = _sample(params, mesh, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  assert np.all(np.asarray(top1.logprobs) == 0)  # a point mass


def test_rollouts_are_the_same_on_one_device_and_eight():
  one = _sample(*_params(jax.devices()[:1]), temperature=1.0)
  eight = _sample(*_params(jax.devices()[:8]), temperature=1.0)
  assert len(eight.tokens.sharding.device_set) == 8  # rows split over 8
  np.testing.assert_array_equal(one.tokens, eight.tokens)
  np.testing.assert_array_equal(one.mask, eight.mask)
  np.testing.assert_allclose(one.logprobs, eight.logprobs, atol=1e-5)


# -- the loop ------------------------------------------------------------------


def _rl_overrides(workdirs, algorithm='ppo', **more):
  prompts = str(pathlib.Path(workdirs['sft']).parent / 'data' / 'sft.jsonl')
  o = {'task': algorithm, 'train.init_from': str(workdirs['sft']),
       'data.files.train': prompts, 'data.files.val': prompts,
       'rl.reward_fn': 'experiments.rewards:brevity', 'rl.value_init': 'policy',
       'rl.max_prompt_length': 32, 'rl.max_response_length': 12,
       'rl.minibatch_size': 8, 'rl.epochs': 4, 'rl.kl_coef': 0.05,
       'train.batch_size': 16, 'train.num_steps': 8, 'train.eval_every': 8,
       'train.eval_batch_size': 8, 'train.checkpoint_every': 4,
       'train.log_every': 1, 'optimizer.learning_rate': 3e-3}
  if algorithm == 'grpo':
    o.update({'rl.group_size': 4, 'rl.epochs': 2, 'rl.kl_coef': 0.02})
  o.update(more)
  return o


def _train(chain, workdir, **overrides):
  experiment, workdirs = chain
  config = tiny_chat.load_config(experiment, 'sft',
                                 **_rl_overrides(workdirs, **overrides))
  rl_loop.train(config, str(workdir))
  return tiny_run.metrics(workdir)


def _series(records, key):
  return [r[key] for r in records if key in r]


def _check_learned(records):
  rewards = _series(records, 'rollout/reward_mean')
  assert len(rewards) == 8
  # The first minibatch runs on the policy that sampled: ratio 1, no clip.
  np.testing.assert_allclose(_series(records, 'train/first_ratio'), 1.0,
                             atol=1e-4)
  assert _series(records, 'train/first_clip_fraction') == [0.0] * 8
  evals = _series(records, 'eval/reward_mean')
  assert abs(_series(records, 'eval/kl')[0]) < 1e-4  # policy = reference
  assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.05, rewards
  assert evals[-1] > evals[0] + 0.05, evals
  return _series(records, 'rollout/kl')


def test_ppo_raises_the_reward_and_a_large_beta_keeps_the_reference(
    chain, tmp_path):
  free = _train(chain, tmp_path / 'ppo')
  kls = _check_learned(free)
  assert max(kls) < 8.0, kls  # nats per response: bounded
  held = _train(chain, tmp_path / 'held', **{'rl.kl_coef': 20.0})
  rise = {name: np.diff(_series(rec, 'eval/reward_mean'))[0]
          for name, rec in (('free', free), ('held', held))}
  final_kl = {name: _series(rec, 'eval/kl')[-1]
              for name, rec in (('free', free), ('held', held))}
  assert final_kl['held'] < 0.3 * final_kl['free'], final_kl
  assert rise['held'] < 0.3 * rise['free'], rise


def test_grpo_raises_the_reward(chain, tmp_path):
  records = _train(chain, tmp_path / 'grpo', algorithm='grpo')
  _check_learned(records)


def test_ppo_with_the_reward_model_ptx_and_refusals(chain, tmp_path,
                                                   monkeypatch):
  experiment, workdirs = chain
  text = pathlib.Path(workdirs['sft']).parent / 'data' / 'text.txt'
  records = _train(chain, tmp_path / 'rm', **{
      'rl.reward_fn': '', 'rl.reward_model': str(workdirs['reward']),
      'rl.value_init': 'reward', 'train.num_steps': 3, 'train.eval_every': 0,
      'rl.ptx_coef': 30.0, 'rl.ptx_corpus': 'text', 'rl.ptx_files': str(text),
      'rl.ptx_length': 16})
  assert all(np.isfinite(_series(records, 'rollout/reward_mean')))
  ptx = _series(records, 'train/ptx_loss')  # PPO-ptx: the LM loss is trained
  assert len(ptx) == 3 and ptx[-1] < ptx[0] - 0.1, ptx
  # A non-finite reward stops the run; nothing is saved after it.
  (tmp_path / 'nan_reward.py').write_text(
      'def nan(prompt, response):\n  return float("nan")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(rl_loop.NonFinite, match='non-finite reward'):
    _train(chain, tmp_path / 'nan', **{'rl.reward_fn': 'nan_reward:nan'})
  assert tiny_run.committed_steps(tmp_path / 'nan') == []
  for bad, message in (({'rl.reward_model': str(workdirs['sft'])},
                        'holds a \'sft\' run'),
                       ({'rl.reward_model': str(workdirs['pretrain'])},
                        'holds a \'lm\' run'),
                       ({'rl.reward_fn': 'experiments.rewards'},
                        'MODULE:FUNCTION'),
                       ({'rl.reward_fn': 'experiments.rewards:nope'},
                        'no attribute')):
    with pytest.raises(UserError, match=message):
      _train(chain, tmp_path / 'bad', **{'rl.reward_fn': '',
                                         'rl.reward_model': '', **bad})


def test_sigkill_mid_run_then_resume_is_bit_identical(chain, tmp_path):
  experiment, workdirs = chain
  # The adaptive KL coefficient moves every iteration: its state resumes too.
  overrides = _rl_overrides(workdirs, **{'train.checkpoint_every': 2,
                                         'train.num_steps': 6,
                                         'train.eval_every': 0,
                                         'rl.kl_target': 0.5,
                                         'rl.kl_horizon': 64})
  reference = tmp_path / 'reference'
  config = tiny_chat.load_config(experiment, 'sft', **overrides)
  rl_loop.train(config, str(reference))
  args = ['train', '--config', f'{experiment}:sft',
          *tiny_run.flags(**overrides)]
  workdir = tmp_path / 'killed'
  with open(tmp_path / 'killed.log', 'w') as log:
    proc = tiny_run.start_cli(*args, '--workdir', str(workdir), log=log)
    try:
      tiny_run.wait_for(lambda: 2 in tiny_run.committed_steps(workdir), proc,
                        timeout=240, what='checkpoint 2')
      proc.send_signal(signal.SIGKILL)
      proc.wait(60)
    finally:
      proc.kill()
      proc.wait()
  resumed_from = tiny_run.committed_steps(workdir)[-1]
  assert resumed_from < 6, 'the run finished before it was killed'
  # The resumed run gets SIGTERM after an iteration: it saves and exits 0.
  logged = len(tiny_run.metrics(workdir))
  with open(tmp_path / 'terminated.log', 'w') as log:
    proc = tiny_run.start_cli(*args, '--workdir', str(workdir), log=log)
    try:
      tiny_run.wait_for(lambda: len(tiny_run.metrics(workdir)) > logged, proc,
                        timeout=240, what='an iteration after resuming')
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(120) == 0
    finally:
      proc.kill()
      proc.wait()
  log_text = (tmp_path / 'terminated.log').read_text()
  assert f'starting at iteration {resumed_from}' in log_text, log_text[-2000:]
  stopped_at = tiny_run.committed_steps(workdir)[-1]
  assert stopped_at > resumed_from
  r = tiny_run.cli(*args, '--workdir', str(workdir))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'starting at iteration {stopped_at}' in r.stdout or stopped_at == 6
  want = {m['step']: m for m in tiny_run.metrics(reference)}
  got = {m['step']: m for m in tiny_run.metrics(workdir)}
  for step in range(resumed_from + 1, 7):
    for key in want[step]:
      if not any(t in key for t in TIMING):
        assert got[step][key] == want[step][key], (step, key)
  config = tiny_chat.load_config(experiment, 'sft', **overrides)
  ours = _params_of(config, workdir)
  theirs = _params_of(config, reference)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)


def _params_of(config, workdir):
  """The policy, value model and KL state of the last checkpoint."""
  run = loop.Run(config, str(workdir), for_training=False)
  try:
    reward = rl_loop.rewards_lib.make(config, run)
    value = rl_loop.ValueModel(run, reward)
    restored = run.ckpt.restore(rl_loop._abstract(run, value))
    return jax.device_get(restored[1])
  finally:
    run.ckpt.close()
