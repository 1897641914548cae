r"""Llama-family models: pretrained checkpoints imported, sized, fine-tuned.

  transflax import --from ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2
  transflax generate --workdir runs/smollm2 --chat --prompt "What is the capital of France?"
  transflax train --config experiments/llama.py:smollm2_135m --dry_run   # 134.5M parameters
  transflax train --config experiments/llama.py:llama3_2_1b --dry_run    # 1.24B, shardings
  TRANSFLAX_DATA=../shared/data transflax train --config experiments/llama.py:sft --workdir runs/smollm2_sft

Args after the colon:
  smollm2_135m, smollm2_360m, llama3_2_1b
            the preset's shape (model/config.py) as a causal LM on plain
            text, for `--dry_run` (parameter counts, mesh, shardings) and
            training from scratch (give --config.data.files.train=...).
  sft       instruction tuning of the imported SmolLM2-135M-Instruct
            (runs/smollm2, `transflax import` above) on chitchat
            conversations, its own ChatML template and tokenizer (init_from),
            loss on the assistant's turns. bf16 compute is for accelerators;
            on a CPU keep float32.
  sft-smoke the same for 4 steps of 2 short conversations.
  reward    the ChatGPT recipe's reward model from the pretrained model: the
            SmolLM2 body and a fresh scalar head on the human sentiment
            ratings ranked 4 at a time (as experiments/chat.py:reward).
            Input: runs/smollm2.
  dpo       DPO from SmolLM2 on pairs among 2 of its own replies per
            chitchat opening, ranked by that reward model (as
            chat.py:dpo). Input: runs/smollm2, runs/smollm2_reward.
  ppo       PPO from SmolLM2 with that reward model, a value model from it
            and a KL penalty to SmolLM2. Input: the same.
            These three are short CPU runs (their sizes are in the config:
            a few dozen optimizer steps of a few examples, a 135M-parameter
            model per role), a demonstration that the chain works on a real
            pretrained checkpoint, not a tuned result; each has a -smoke twin
            of 2-4 steps (runs/smollm2_<stage>_smoke).

SmolLM2 (HuggingFaceTB, Allal et al. 2025): Llama architecture, grouped-query
attention, SwiGLU, RMSNorm, RoPE theta 1e5, tied embeddings, a 49,152-piece
byte-level BPE. Llama 3.2 1B's RoPE frequency scaling ("llama3") is not
implemented: the preset gives its shape, not its checkpoint.
"""

from experiments import defaults
from model import get_preset

PRESETS = ('smollm2_135m', 'smollm2_360m', 'llama3_2_1b')


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('llama.py', arg, PRESETS + tuple(
      f'{s}{x}' for s in ('sft', 'reward', 'dpo', 'ppo') for x in ('', '-smoke')))
  if arg in PRESETS:
    c = defaults.get_config(arg)
    c.model.vocab_size = get_preset(arg).vocab_size
    c.task = 'lm'
    c.data.corpus = 'text'
    c.data.seq_len = 2048
    c.train.update(batch_size=64, num_steps=100_000, label_smoothing=0.0)
    c.optimizer.update(schedule='cosine', learning_rate=3e-4,
                       warmup_steps=2000, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.1, grad_clip=1.0)
    return c
  stage, smoke = arg.removesuffix('-smoke'), arg.endswith('-smoke')
  if stage != 'sft':
    return _post_training(stage, smoke)
  c = defaults.get_config('smollm2_135m')
  c.model.vocab_size = 0  # the imported tokenizer's (init_from)
  c.task = 'sft'
  c.data.corpus = 'chitchat'
  c.data.chat_template = 'chatml'
  c.data.train_split, c.data.eval_split, c.data.test_split = (
      'train', 'val', 'test')
  c.data.max_length, c.data.max_turns = (64, 2) if smoke else (512, 6)
  c.train.update(batch_size=2 if smoke else 16, num_steps=4 if smoke else 300,
                 eval_every=4 if smoke else 100,
                 checkpoint_every=4 if smoke else 100,
                 max_eval_batches=1 if smoke else 20,
                 eval_batch_size=2 if smoke else 16, log_every=1 if smoke
                 else 10, label_smoothing=0.0, keep_checkpoints=2,
                 init_from='runs/smollm2')
  c.optimizer.update(schedule='cosine', learning_rate=2e-5, warmup_steps=20,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                     grad_clip=1.0)
  c.sample.update(prompt='hi! how was your day?', max_new_tokens=32,
                  temperature=0.0, num_samples=1)
  return c


def _post_training(stage: str, smoke: bool):
  """reward, dpo and ppo from the imported SmolLM2-135M-Instruct."""
  suffix = '_smoke' if smoke else ''
  c = defaults.get_config('smollm2_135m')
  c.model.vocab_size = 0
  c.data.chat_template = 'chatml'
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.test_split = 'test' if stage == 'reward' else ''
  c.mesh.cpu_devices = 1
  c.train.update(label_smoothing=0.0, keep_checkpoints=1, best_metric='',
                 log_every=1, init_from='runs/smollm2', seed=0)
  c.optimizer.update(schedule='constant', warmup_steps=0, b1=0.9, b2=0.95,
                     eps=1e-8, weight_decay=0.0, grad_clip=1.0)
  c.sample.update(prompt='hi! how was your day?', max_new_tokens=32,
                  temperature=0.0, num_samples=1)
  reward = f'runs/smollm2_reward{suffix}'
  if stage == 'reward':
    c.task = 'reward'
    c.data.corpus = 'sentiment'
    c.data.max_length = 64
    # normalise=False: InstructGPT's offset would score all 15,665 training
    # sentences with the 135M model, longer than the training itself on a
    # CPU; rankings, DPO's pairs and PPO's whitened advantages ignore it.
    c.reward.update(k=4, tie_margin=0.5, pair_gap=1.0, normalise=False)
    c.train.update(batch_size=4, num_steps=30, eval_every=30,
                   checkpoint_every=30, max_eval_batches=8, eval_batch_size=8)
    c.optimizer.learning_rate = 2e-5
  elif stage == 'dpo':
    c.task = 'dpo'
    c.data.corpus = 'sampled'
    c.data.max_length = 112
    c.dpo.update(beta=0.1, reward_model=reward, samples=2,
                 max_prompt_length=48, max_response_length=48,
                 train_prompts=64, eval_prompts=16, keep_unfinished=True)
    c.train.update(batch_size=4, num_steps=16, eval_every=16,
                   checkpoint_every=16, max_eval_batches=4, eval_batch_size=4)
    c.optimizer.learning_rate = 5e-6
  else:
    c.task = 'ppo'
    c.data.corpus = 'chitchat'
    c.rl.update(reward_model=reward, reward_context='response',
                max_prompt_length=48, max_response_length=32,
                temperature=1.0, epochs=2, minibatch_size=4, kl_coef=0.05,
                value_init='reward')
    c.train.update(batch_size=8, num_steps=4, eval_every=4,
                   checkpoint_every=4, eval_batch_size=8)
    c.optimizer.learning_rate = 2e-6
  if smoke:
    c.data.max_length = min(c.data.max_length, 64)
    c.train.update(batch_size=2, num_steps=2, eval_every=2, checkpoint_every=2,
                   max_eval_batches=1, eval_batch_size=2)
    c.reward.sources = 'tweets'
    c.dpo.update(train_prompts=4, eval_prompts=2, max_response_length=8,
                 max_prompt_length=32)
    c.rl.update(max_response_length=8, max_prompt_length=32,
                minibatch_size=2)
    c.train.eval_batch_size = 2
  return c
