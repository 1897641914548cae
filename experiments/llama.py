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

SmolLM2 (HuggingFaceTB, Allal et al. 2025): Llama architecture, grouped-query
attention, SwiGLU, RMSNorm, RoPE theta 1e5, tied embeddings, a 49,152-piece
byte-level BPE. Llama 3.2 1B's RoPE frequency scaling ("llama3") is not
implemented: the preset gives its shape, not its checkpoint.
"""

from experiments import defaults
from model import get_preset

PRESETS = ('smollm2_135m', 'smollm2_360m', 'llama3_2_1b')


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('llama.py', arg, PRESETS + ('sft', 'sft-smoke'))
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
  smoke = arg == 'sft-smoke'
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
