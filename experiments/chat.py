r"""The ChatGPT recipe from scratch on a laptop CPU: pretrain -> SFT -> reward model -> DPO / PPO / GRPO.

  pip install -e ".[test]"             # chitchat-dataset, vaderSentiment, openai
  export TRANSFLAX_DATA=../shared/data
  transflax train --config experiments/chat.py:pretrain --workdir runs/chat_pretrain
  transflax train --config experiments/chat.py:sft      --workdir runs/chat_sft
  transflax train --config experiments/chat.py:reward   --workdir runs/chat_reward
  transflax train --config experiments/chat.py:dpo      --workdir runs/chat_dpo
  transflax train --config experiments/chat.py:ppo      --workdir runs/chat_ppo
  transflax train --config experiments/chat.py:grpo     --workdir runs/chat_grpo
  transflax judge --workdir runs/chat_ppo --reward_model runs/chat_reward
  transflax chat --workdir runs/chat_ppo

Args after the colon: pretrain, sft, reward, dpo, ppo, grpo; each with a `-smoke`
twin (e.g. `sft-smoke`) that runs the same code on a tiny model in seconds
and chains from the `-smoke` stage before it (runs/chat_<stage>_smoke).

Each stage starts from the one before (`train.init_from`, README "A run's
workdir"); give --config.train.init_from=WORKDIR to chain other workdirs.
Hardware: a 2-core CPU. Expected results and wall times: see README's
results table (each stage in docs/chat.md).

  pretrain  (input: nothing) a GPT (pre-LayerNorm, GELU, learned
            positions, tied embeddings; d_model 256, 4 layers, 4 heads, 5.3M
            parameters) on the text of the human conversations of PyPI
            chitchat-dataset (one turn per line, 90% of the chats; 5%
            validate, 5% are held out for judging the finished models):
            1,200 steps of 16 x 128 tokens, about one epoch. Its 8k
            SentencePiece vocabulary reserves the chat template's pieces.
  sft       (input: runs/chat_pretrain) instruction tuning on the
            same chats as conversations of up to 6 turns (the first speaker
            is the user), loss on the assistant's turns only, 500 steps of
            16 packed rows of 256 tokens.
  reward    (input: runs/chat_sft) a reward model (the SFT body and
            a scalar head) from human sentiment ratings ranked 4 at a time
            (InstructGPT's K-way loss), 600 steps of 16 rankings; judged on
            held-out human pairs beside VADER.
  dpo       (input: runs/chat_sft, runs/chat_reward) DPO as in the
            DPO paper's controlled-sentiment task: 4 replies of the SFT
            model to each of 2,000 chitchat openings, ranked by the reward
            model, every comparison a pair (train/preference_sampling.py;
            written to the workdir first), 400 steps of 16 pairs, beta 0.1,
            against the frozen SFT model. `--config.data.corpus=sentiment`
            trains on the human-rated sentences as pairs instead.
  ppo       (input: runs/chat_sft, runs/chat_reward) RLHF with
            PPO (train/rl/): per iteration 16 responses of up to 48 tokens
            to chitchat opening turns, scored by the reward model (on the
            response alone, as it was trained), a per-token KL penalty to
            the frozen SFT model (beta 0.05), GAE (gamma 1, lambda 0.95), 4
            epochs of minibatches of 8 for the policy and a value model
            initialised from the reward model; 200 iterations, lr 1e-5.
  grpo      (input: runs/chat_sft, runs/chat_reward) GRPO: 4
            prompts x 4 responses per iteration, advantages normalised
            within each prompt's group, the k3 KL to the SFT model in the
            loss (beta 0.04), one update per iteration; 200 iterations.

`--config.rl.kl_coef=B` (ppo, grpo) and `--config.dpo.beta=B` (dpo) give the
other points of the reward-vs-KL frontier in docs/chat.md
(`python -m experiments.chat_judge ... --plot`, judged by
`transflax judge`: VADER positivity, SmolLM2 perplexity, KL to SFT on
chitchat's held-out test openings).
"""

from experiments import defaults

STAGES = ('pretrain', 'sft', 'reward', 'dpo', 'ppo', 'grpo')


def _model(c, smoke: bool) -> None:
  """The one architecture every stage shares (init_from copies it)."""
  c.model.update(vocab_size=0, d_model=256, num_heads=4, mlp_dim=1024,
                 num_encoder_layers=0, num_decoder_layers=4, max_len=256,
                 dropout_rate=0.0, attention_dropout_rate=0.0,
                 positions='learned', norm_position='pre', activation='gelu',
                 scale_embeddings=False, init='gpt2', norm_epsilon=1e-5)
  if smoke:
    c.model.update(d_model=32, num_heads=4, mlp_dim=64, num_decoder_layers=2,
                   max_len=128)


def get_config(arg: str | None = None):
  arg = defaults.choose_arg(
      'chat.py', arg, STAGES + tuple(f'{s}-smoke' for s in STAGES))
  stage, smoke = arg.removesuffix('-smoke'), arg.endswith('-smoke')
  suffix = '_smoke' if smoke else ''
  c = defaults.get_config('gpt2_small')
  _model(c, smoke)
  c.data.chat_template = 'simple'
  c.data.tokenizer.vocab_size = 1000 if smoke else 8000
  c.data.train_split, c.data.eval_split, c.data.test_split = (
      'train', 'val', 'test')
  c.mesh.cpu_devices = 2            # one JAX device per core of a CPU host
  c.train.update(label_smoothing=0.0, log_every=50, eval_batch_size=32,
                 keep_checkpoints=2, best_metric='eval/loss', seed=0)
  c.optimizer.update(schedule='cosine', b1=0.9, b2=0.95, eps=1e-8,
                     weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1)
  c.sample.update(prompt='hi! how was your day?', max_new_tokens=48,
                  temperature=0.8, top_k=50, num_samples=1)

  if stage == 'pretrain':
    c.task = 'lm'
    c.data.corpus = 'chitchat'
    c.data.seq_len = 128
    c.sample.prompt = 'so what do you like to do for fun?'
    c.train.update(batch_size=16, num_steps=1200, eval_every=600,
                   checkpoint_every=600, max_eval_batches=40)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=200)
  elif stage == 'sft':
    c.task = 'sft'
    c.data.corpus = 'chitchat'
    c.data.max_length, c.data.max_turns = 256, 6
    c.train.update(batch_size=16, num_steps=500, eval_every=250,
                   checkpoint_every=250, max_eval_batches=20,
                   init_from=f'runs/chat_pretrain{suffix}')
    c.optimizer.update(learning_rate=3e-4, warmup_steps=50)
  elif stage == 'reward':
    c.task = 'reward'
    c.data.corpus = 'sentiment'
    c.data.max_length = 96
    c.reward.update(k=4, tie_margin=0.5, pair_gap=1.0)
    c.train.update(batch_size=16, num_steps=600, eval_every=300,
                   checkpoint_every=300, init_from=f'runs/chat_sft{suffix}')
    c.optimizer.update(learning_rate=1e-4, warmup_steps=50)
  elif stage == 'dpo':
    c.task = 'dpo'
    # The DPO paper's controlled-sentiment setup: pairs among K = 4 replies
    # of the SFT model to each chat opening, ranked by the reward model.
    c.data.corpus = 'sampled'
    c.data.max_length = 128
    c.data.test_split = ''          # chitchat's test openings are the judge's
    c.dpo.update(beta=0.1, loss_type='sigmoid', label_smoothing=0.0,
                 reward_model=f'runs/chat_reward{suffix}', samples=4,
                 max_prompt_length=64, max_response_length=48,
                 train_prompts=2000, eval_prompts=128)
    c.train.update(batch_size=16, num_steps=400, eval_every=200,
                   checkpoint_every=200, max_eval_batches=20,
                   init_from=f'runs/chat_sft{suffix}')
    c.optimizer.update(learning_rate=1e-5 if not smoke else 1e-4,
                       warmup_steps=20, schedule='constant')

  elif stage in ('ppo', 'grpo'):
    c.task = stage
    # One JAX device using both cores: an RL update's minibatches of 8 rows
    # run faster than split over 2 devices (docs/rl.md, Results).
    c.mesh.cpu_devices = 1
    c.data.corpus = 'chitchat'      # prompts: each chat's opening user turn
    c.rl.update(reward_model=f'runs/chat_reward{suffix}',
                reward_context='response', max_prompt_length=64,
                max_response_length=48, temperature=1.0)
    c.train.update(init_from=f'runs/chat_sft{suffix}', batch_size=16,
                   num_steps=200, eval_every=50, checkpoint_every=50,
                   log_every=10, eval_batch_size=32, best_metric='')
    c.optimizer.update(learning_rate=1e-5, warmup_steps=0, schedule='constant',
                       weight_decay=0.0)
    if stage == 'ppo':
      c.rl.update(epochs=4, minibatch_size=8, kl_coef=0.05, value_init='reward')
    else:
      c.rl.update(group_size=4, epochs=1, minibatch_size=16, kl_coef=0.04)

  if smoke:
    c.data.tokenizer.max_sentences = 20000
    c.data.seq_len = 32
    c.data.max_length = min(c.data.max_length, 128)
    c.train.update(batch_size=8, num_steps=6, log_every=2, eval_every=6,
                   checkpoint_every=3, max_eval_batches=2, eval_batch_size=8)
    c.optimizer.warmup_steps = 2
    c.sample.max_new_tokens = 8
    c.reward.sources = 'tweets'
    if stage == 'dpo':
      c.dpo.update(max_prompt_length=32, max_response_length=16,
                   train_prompts=32, eval_prompts=16, keep_unfinished=True)
    if stage in ('ppo', 'grpo'):
      c.rl.update(max_prompt_length=32, max_response_length=16)
      c.train.update(batch_size=8, num_steps=4, eval_every=2,
                     checkpoint_every=2, log_every=1)
      c.rl.minibatch_size = 4 if stage == 'ppo' else 8
      c.optimizer.learning_rate = 1e-4
  return c
