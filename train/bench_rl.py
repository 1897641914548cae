"""Seconds per RL iteration (PPO, GRPO): transflax and a peer library, on this host.

  python -m train.bench_rl --peer ours --algo ppo --iterations 5
  python -m train.bench_rl --peer trl --algo grpo --iterations 3
  PYTHONPATH=$VIRTUAL_ENV/trl-1.12.0 \
      python -m train.bench_rl --peer trl --algo ppo --iterations 3

The shape is `experiments/chat.py:ppo`'s: a GPT-2 of d_model 256, 4 layers,
4 heads, vocabulary 8000 (random init, built from a config, nothing is
downloaded), prompts of 32 random tokens, responses of exactly 48 sampled
tokens at temperature 1 (no top-k, no top-p). PPO: 16 rollouts per
iteration, then 4 epochs of 2 minibatches of 8 (8 optimizer steps) with a
policy, a reference, a value model and a reward model. GRPO: 4 prompts x 4
completions, one optimizer step over all 16, a reference (beta 0.04) and a
cheap Python reward (the fraction of even token ids). Both: lr 1e-5,
float32, torch's default thread count.

Ours is the RL loop itself (train/rl/loop.py) on `experiments/chat.py:ppo`
and `:grpo` with rl.max_prompt_length 32 and rl.ignore_eos (every response
48 tokens): policy and reference from runs/chat_sft, PPO's reward and value
models from runs/chat_reward (train those first; same shapes as the peer's
random ones), GRPO's reward the cheap Python `experiments.rewards:letter_a`.
Its rollout time includes scoring; its update, the reference and value
passes and the advantages.

Each run prints one JSON line: the mean over `--iterations` iterations after
a warm-up one, split into rollout (the `generate` calls alone) and update
(everything else: reference, value and reward passes, advantages, the
optimizer steps, the trainer's own bookkeeping).

TRL (PyPI `trl`, not a dependency of this package) dropped its PPO trainer
after 1.12.0, so PPO runs on that release, installed beside the newest:

  pip install --no-deps --target $VIRTUAL_ENV/trl-1.12.0 trl==1.12.0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

VOCAB, PROMPT_LEN, RESPONSE_LEN = 8000, 32, 48
PPO_ROLLOUTS, PPO_EPOCHS, PPO_MINIBATCHES = 16, 4, 2
GRPO_PROMPTS, GRPO_GROUP = 4, 4
LR, KL_COEF, GRPO_BETA = 1e-5, 0.05, 0.04
# Specials first, so every other id is a plain word the prompts may use.
EOS, UNK = '<eos>', '<unk>'
FIRST_WORD = 2

# A peer run must not reach the network (Hub look-ups, telemetry).
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')


def _gpt2_config():
  from transformers import GPT2Config
  return GPT2Config(
      vocab_size=VOCAB, n_positions=256, n_embd=256, n_layer=4, n_head=4,
      n_inner=1024, activation_function='gelu_new', tie_word_embeddings=True,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      summary_first_dropout=0.0, num_labels=1,
      bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _tokenizer():
  """A word-level tokenizer over `w<id>` words: prompts given as text come
  back as exactly the ids they were written from, one token per word."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {EOS: 0, UNK: 1}
  vocab.update({f'w{i}': i for i in range(FIRST_WORD, VOCAB)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                 pad_token=EOS, unk_token=UNK)


def _prompt_ids(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(
      FIRST_WORD, VOCAB, size=(n, PROMPT_LEN))


def _clock(model):
  """A trainer callback that times each iteration (from one optimizer-step
  end to the next, as the trainers report it) and the `generate` calls of
  `model` inside it."""
  import torch
  from transformers import TrainerCallback

  class Clock(TrainerCallback):

    def __init__(self):
      self.ends, self.rollout, self.tokens = [], [0.0], [0]
      generate = model.generate

      def timed(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        self.rollout[-1] += time.perf_counter() - start
        seqs = out if torch.is_tensor(out) else out.sequences
        new = seqs.shape[1] - kwargs['input_ids'].shape[1]
        self.tokens[-1] += seqs.shape[0] * new
        return out

      model.generate = timed

    def on_train_begin(self, args, state, control, **kwargs):
      self.ends, self.rollout, self.tokens = [time.perf_counter()], [0.0], [0]

    def on_step_end(self, args, state, control, **kwargs):
      self.ends.append(time.perf_counter())
      self.rollout.append(0.0)
      self.tokens.append(0)

    def summary(self, skip: int = 1) -> dict:
      """Means over the iterations after the first `skip` (warm-up)."""
      steps = np.diff(self.ends)[skip:]
      rollout = np.array(self.rollout[skip:len(steps) + skip])
      tokens = np.array(self.tokens[skip:len(steps) + skip])
      return {'iterations': len(steps),
              'seconds_per_iteration': float(steps.mean()),
              'rollout_seconds': float(rollout.mean()),
              'update_seconds': float((steps - rollout).mean()),
              'rollout_tokens_per_sec': float(tokens.sum() / rollout.sum()),
              'rollout_tokens': int(tokens.mean())}

  return Clock()


def _common_args(workdir: str) -> dict:
  """TrainingArguments every TRL run shares: CPU, float32, no activation
  checkpointing (TRL turns it on by default), no saving, eval or reporting."""
  return dict(output_dir=workdir, use_cpu=True, bf16=False, fp16=False,
              activation_checkpointing=False, report_to='none',
              save_strategy='no', eval_strategy='no', learning_rate=LR,
              lr_scheduler_type='constant', seed=0, disable_tqdm=True,
              dataloader_num_workers=0)


def _run(trainer, clock, fields: dict) -> dict:
  import torch
  import trl
  trainer.add_callback(clock)
  # The trainers print their logs; stdout carries only the result.
  with contextlib.redirect_stdout(sys.stderr):
    trainer.train()
  return {'impl': f'trl {trl.__version__}', **fields,
          **clock.summary(), 'optim': trainer.args.optim,
          'torch_threads': torch.get_num_threads()}


def trl_ppo_seconds(iterations: int = 3) -> dict:
  """TRL's PPOTrainer (trl.experimental.ppo, up to trl 1.12) on the shape
  above; one iteration is one rollout batch and its PPO epochs."""
  import torch
  from datasets import Dataset
  from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
  try:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
  except ImportError as e:
    raise SystemExit(f'{e}: TRL removed PPO after 1.12.0; see this module\'s '
                     'docstring for installing that release beside it')
  torch.manual_seed(0)
  config = _gpt2_config()
  policy = GPT2LMHeadModel(config)
  value = GPT2ForSequenceClassification(config)
  reward = GPT2ForSequenceClassification(config)
  total = PPO_ROLLOUTS * (iterations + 1)
  data = Dataset.from_dict({'input_ids': _prompt_ids(total).tolist()})
  with tempfile.TemporaryDirectory() as workdir:
    args = PPOConfig(
        **_common_args(workdir),
        # A rollout batch is per_device_train_batch_size x accumulation;
        # each of its num_mini_batches minibatches is one optimizer step.
        per_device_train_batch_size=PPO_ROLLOUTS,
        gradient_accumulation_steps=1, num_mini_batches=PPO_MINIBATCHES,
        num_ppo_epochs=PPO_EPOCHS,
        local_rollout_forward_batch_size=PPO_ROLLOUTS,
        total_episodes=total, response_length=RESPONSE_LEN,
        # No stop token: TRL drops EOS from the policy's generation config,
        # so every response runs to response_length.
        temperature=1.0, stop_token_id=None, missing_eos_penalty=None,
        kl_coef=KL_COEF, gamma=1.0, lam=0.95, num_sample_generations=0)
    trainer = PPOTrainer(args=args, processing_class=_tokenizer(),
                         # None: TRL copies the policy, as a reference
                         # starts out in RLHF.
                         model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=data)
    return _run(trainer, _clock(policy), {
        'algo': 'ppo', 'rollouts': PPO_ROLLOUTS, 'prompt_len': PROMPT_LEN,
        'response_len': RESPONSE_LEN, 'epochs': PPO_EPOCHS,
        'minibatches': PPO_MINIBATCHES,
        'optimizer_steps': PPO_EPOCHS * PPO_MINIBATCHES})


def _fraction_even(completion_ids, **kwargs) -> list[float]:
  """A reward that costs nothing beside the models yet varies within a
  group (one rare target id would score almost every completion 0, leaving
  every advantage 0)."""
  return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


def trl_grpo_seconds(iterations: int = 3) -> dict:
  """TRL's GRPOTrainer on the shape above; one iteration is one generation
  of GRPO_PROMPTS x GRPO_GROUP completions and one optimizer step."""
  import torch
  from datasets import Dataset
  from transformers import GPT2LMHeadModel
  from trl import GRPOConfig, GRPOTrainer
  torch.manual_seed(0)
  texts = [' '.join(f'w{i}' for i in row)
           for row in _prompt_ids(GRPO_PROMPTS * (iterations + 1))]
  rollouts = GRPO_PROMPTS * GRPO_GROUP
  with tempfile.TemporaryDirectory() as workdir:
    # GRPOTrainer builds its reference by loading the policy's checkpoint,
    # so the random policy goes through a local one.
    model_dir = os.path.join(workdir, 'policy')
    GPT2LMHeadModel(_gpt2_config()).save_pretrained(model_dir)
    args = GRPOConfig(
        **_common_args(workdir), model_init_kwargs={'dtype': 'float32'},
        per_device_train_batch_size=rollouts, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=GRPO_GROUP,
        max_steps=iterations + 1, max_completion_length=RESPONSE_LEN,
        temperature=1.0, top_k=0, top_p=1.0, beta=GRPO_BETA,
        disable_dropout=True,
        # EOS is masked until the last token: no completion ends early.
        generation_kwargs={'min_new_tokens': RESPONSE_LEN})
    trainer = GRPOTrainer(model=model_dir, args=args,
                          reward_funcs=_fraction_even,
                          train_dataset=Dataset.from_dict({'prompt': texts}),
                          processing_class=_tokenizer())
    return _run(trainer, _clock(trainer.model), {
        'algo': 'grpo', 'rollouts': rollouts, 'prompts': GRPO_PROMPTS,
        'group': GRPO_GROUP, 'prompt_len': PROMPT_LEN,
        'response_len': RESPONSE_LEN, 'optimizer_steps': 1,
        'loss_type': args.loss_type, 'beta': GRPO_BETA})


def ours_seconds(algo: str, iterations: int = 5) -> dict:
  """transflax's RL loop on the shape above (module docstring)."""
  from experiments import chat
  from train.rl import loop
  config = chat.get_config(algo)
  config.train.update(num_steps=iterations + 1, eval_every=0, log_every=1,
                      checkpoint_every=10**6)
  config.rl.update(max_prompt_length=PROMPT_LEN, max_response_length=RESPONSE_LEN,
                   ignore_eos=True)
  if algo == 'grpo':
    config.rl.update(reward_model='', reward_fn='experiments.rewards:letter_a')
  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(
      sys.stderr):
    loop.train(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f][1:]  # after the warm-up
  rollout = np.mean([r['time/rollout_seconds'] for r in records])
  update = np.mean([r['time/update_seconds'] for r in records])
  rows = config.train.batch_size
  return {'impl': 'transflax', 'algo': algo, 'rollouts': rows,
          'prompt_len': PROMPT_LEN, 'response_len': RESPONSE_LEN,
          'epochs': config.rl.epochs,
          'optimizer_steps': config.rl.epochs * rows // config.rl.minibatch_size,
          'iterations': len(records),
          'seconds_per_iteration': float(rollout + update),
          'rollout_seconds': float(rollout), 'update_seconds': float(update),
          'rollout_tokens_per_sec': float(np.mean(
              [r['rollout/tokens_per_sec'] for r in records])),
          'mesh_cpu_devices': config.mesh.cpu_devices}


PEERS = {('trl', 'ppo'): trl_ppo_seconds, ('trl', 'grpo'): trl_grpo_seconds,
         ('ours', 'ppo'): lambda n: ours_seconds('ppo', n),
         ('ours', 'grpo'): lambda n: ours_seconds('grpo', n)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--peer', choices=['ours', 'trl'], required=True)
  parser.add_argument('--algo', choices=['ppo', 'grpo'], required=True)
  parser.add_argument('--iterations', type=int, default=3,
                      help='timed iterations after one warm-up iteration')
  a = parser.parse_args(argv)
  print(json.dumps(PEERS[a.peer, a.algo](a.iterations)), flush=True)


if __name__ == '__main__':
  main()
