"""Tasks: one file per objective, registered by name; `config.task` picks one.

  translation  encoder-decoder translation, label-smoothed cross-entropy, BLEU
  lm           decoder-only next-token prediction on text, samples
  mlm          BERT's masked-token prediction on the Encoder
  sft          instruction tuning on conversations: loss on assistant turns
  reward       a scalar reward model from K-way human rankings (InstructGPT)
  dpo          Direct Preference Optimisation against a frozen reference
  ppo, grpo    RLHF policies (train/rl/policy.py), trained by the RL loop

A task builds its tokenizer, model(s) and datasets from the experiment config
and owns its objective, `loss(params, frozen, batch, rng) -> (loss_sum,
weight, metric_sums)`, its evaluation and its FLOPs per step (see
`base.Task`). The loop, the steps, the shardings and the checkpoints are
shared (train/runs.py picks the RL loop for a task whose `loop` is 'rl');
nothing outside a task's own file branches on which task it is.
"""

from __future__ import annotations

from data.errors import UserError
from train.tasks.base import (REGISTRY, Task, TOKENIZER_FILE, model_config,
                              register, split_files)


def make_task(config, workdir: str | None, *, with_tokenizer: bool = True,
              source=None) -> Task:
  """The task `config.task`; `source` (train.init_from.Source) when a fresh
  run starts from another run's parameters and tokenizer."""
  if config.task not in REGISTRY:
    raise UserError(f'task={config.task!r} is not one of '
                    f'{", ".join(sorted(REGISTRY))}')
  return REGISTRY[config.task](config, workdir, with_tokenizer=with_tokenizer,
                               source=source)


# Registration happens on import; the order is the docstring's.
from train.tasks import translation, lm, mlm, sft, reward, dpo  # noqa: E402,F401
from train.rl import policy  # noqa: E402,F401  (ppo, grpo)

__all__ = ['Task', 'REGISTRY', 'register', 'make_task', 'model_config',
           'split_files', 'TOKENIZER_FILE']
