"""Shared defaults for every experiment; experiments import and change them.

Every key is documented here once. `--config.a.b=v` on the command line
overrides one field; an unknown key is an error (the ConfigDict is locked).
`model.*` are exactly the fields of model.TransformerConfig.
"""

from __future__ import annotations

import ml_collections

from model import get_preset
from train import partitioning


def choose_arg(experiment: str, arg: str | None, choices) -> str:
  """The `--config experiments/X.py:ARG` argument: the first choice when
  absent, else one of `choices` (a ValueError naming the file otherwise)."""
  arg = arg or choices[0]
  if arg not in choices:
    raise ValueError(f'experiments/{experiment}: unknown arg {arg!r}; use one '
                     f'of {", ".join(choices)}')
  return arg


def get_config(preset: str = 'transformer_base') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'translation'            # translation | lm | mlm | sft | reward | dpo | ppo | grpo

  c.data = ml_collections.ConfigDict()
  c.data.dir = ''                   # '' -> $TRANSFLAX_DATA -> ~/.cache/transflax
  # translation: multi30k | wmt | parallel; lm, mlm: tinyshakespeare | text |
  # tokens | chitchat; sft: chitchat | jsonl; reward: sentiment | jsonl; dpo: sentiment | jsonl | sampled
  c.data.corpus = 'multi30k'
  c.data.src_lang = 'en'
  c.data.tgt_lang = 'de'
  c.data.wmt_dataset = 'wmt14'      # HF datasets name (corpus=wmt)
  c.data.wmt_pair = 'de-en'         # HF datasets config (corpus=wmt)
  # corpus=parallel/text: split -> 'SRC,TGT' files, one .tsv, or 'F1,F2' text;
  # corpus=tokens: split -> one token file of data/tokens.py (DIR/train.bin).
  c.data.files = ml_collections.ConfigDict(dict(train='', val='', test=''))
  c.data.train_split = 'train'
  c.data.eval_split = 'val'         # eval loss (and BLEU) during training
  c.data.test_split = 'test_2016_flickr'  # final evaluation
  c.data.max_length = 64            # translation: tokens per packed row side;
                                    # sft/reward/dpo: tokens per conversation
  c.data.max_turns = 6              # sft on chitchat: turns per conversation
  c.data.pack = True                # several examples per row (translation)
  c.data.seq_len = 256              # lm: block length
  # Chat template (data/chat.py): simple | chatml | '' (none). A pretraining
  # LM reserves its control pieces in the tokenizer; sft/reward/dpo render
  # conversations with it (a run started with init_from keeps the source's).
  c.data.chat_template = ''
  c.data.tokenizer = ml_collections.ConfigDict()
  c.data.tokenizer.type = 'sentencepiece'  # sentencepiece | char
  c.data.tokenizer.path = ''        # use this trained model instead of training
  c.data.tokenizer.vocab_size = 8000
  c.data.tokenizer.model_type = 'unigram'  # unigram | bpe | char
  c.data.tokenizer.character_coverage = 1.0
  c.data.tokenizer.max_sentences = 0  # train on a seeded sample; 0 = all

  # TransformerConfig fields; vocab_size 0 = the tokenizer's size.
  c.model = ml_collections.ConfigDict(get_preset(preset).to_dict())
  c.model.vocab_size = 0
  # Fields whose default is None get a typed placeholder, so a
  # --config.model.<field>=... override is accepted and type-checked.
  placeholder = ml_collections.config_dict.placeholder
  for field, kind in (('head_dim', int), ('num_kv_heads', int),
                      ('qkv_bias', bool), ('out_bias', bool),
                      ('mlp_bias', bool)):
    c.model[field] = placeholder(kind) if c.model[field] is None else c.model[field]

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100_000
  c.train.batch_size = 128          # global rows per step (all hosts)
  c.train.grad_accum_steps = 1      # micro-batches per step (same update)
  c.train.seed = 0
  # WORKDIR[:STEP|best|average]: a fresh run starts from that run's
  # parameters (every path both models have) and tokenizer; see
  # train/init_from.py. Ignored when the workdir already has checkpoints.
  c.train.init_from = ''
  c.train.label_smoothing = 0.1     # paper 5.4
  c.train.z_loss = 0.0
  c.train.loss_chunk = 0            # LM: logits made this many positions at a time (0: all)
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.eval_batch_size = 64      # global rows per eval batch
  c.train.max_eval_batches = 0      # 0: the whole eval split
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3      # the last K, plus the best by best_metric
  c.train.best_metric = 'eval/loss'
  c.train.best_mode = 'min'
  c.train.average_last = 0          # >0: average the last N checkpoints at the end

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.schedule = 'rsqrt'    # rsqrt (paper) | cosine | constant
  c.optimizer.learning_rate = 1.0   # rsqrt: scale of d^-0.5 * min(..); else peak
  c.optimizer.warmup_steps = 4000
  c.optimizer.decay_steps = 0       # cosine: 0 = train.num_steps
  c.optimizer.min_lr_ratio = 0.1    # cosine: final lr / peak lr
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 0.0       # global-norm clipping; 0 = off

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1: the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.cpu_devices = 0            # CPU-only hosts: JAX devices (0: one)
  c.mesh.rules = [list(r) for r in partitioning.DEFAULT_RULES]
  c.mesh.coordinator_address = ''   # multi-host: host:port of process 0
  c.mesh.num_processes = 0          # 0: from the environment
  c.mesh.process_id = -1            # -1: from the environment

  c.decode = ml_collections.ConfigDict()   # translation
  c.decode.beam_size = 4
  c.decode.alpha = 0.6              # GNMT length penalty exponent
  c.decode.max_extra_len = 50       # max output length = source length + 50
  c.decode.batch_size = 64
  c.decode.bleu_every = 0           # steps between validation BLEU; 0 = off
  c.decode.bleu_sentences = 0       # validation sentences for BLEU; 0 = all
  c.decode.test_sentences = 0       # test sentences scored at the end; 0 = all

  c.sample = ml_collections.ConfigDict()   # language models
  c.sample.prompt = '\n'
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 200
  c.sample.top_p = 1.0
  c.sample.num_samples = 1

  c.reward = ml_collections.ConfigDict()   # task reward (and dpo's data)
  c.reward.k = 4                    # responses per ranking (InstructGPT: 4-9)
  c.reward.tie_margin = 0.5         # sentiment: ratings closer than this tie
  c.reward.sources = 'tweets,movies,amazon'  # sentiment rating files used
  c.reward.pair_gap = 1.0           # held-out human pairs: ratings this far apart
  c.reward.normalise = True         # shift the bias: training responses score 0

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1                  # strength of the KL to the reference
  c.dpo.loss_type = 'sigmoid'       # sigmoid (DPO) | ipo
  c.dpo.label_smoothing = 0.0       # > 0: conservative DPO (sigmoid only)
  c.dpo.disable_dropout = True      # policy without dropout, as TRL's default
  # data.corpus=sampled (train/preference_sampling.py): pairs from dpo.samples
  # replies per prompt of train.init_from's model, ranked by dpo.reward_model.
  c.dpo.reward_model = ''           # a reward run (WORKDIR[:STEP|best])
  c.dpo.samples = 4                 # replies per prompt (K)
  c.dpo.sample_temperature = 1.0
  c.dpo.max_prompt_length = 64      # longer prompts are dropped, counted
  c.dpo.max_response_length = 48    # replies cut here take no part...
  c.dpo.keep_unfinished = False     # ... unless this is True
  c.dpo.train_prompts = 0           # prompts of the train split (0 = all)
  c.dpo.eval_prompts = 0            # prompts of the eval split (0 = all)

  # RL (tasks ppo, grpo; train/rl/): train.num_steps counts iterations and
  # train.batch_size the responses sampled per iteration.
  c.rl = ml_collections.ConfigDict()
  c.rl.reward_model = ''            # WORKDIR[:STEP|best] of a `reward` run, or
  c.rl.reward_fn = ''               # MODULE:FUNCTION (prompt, response) -> float
  c.rl.reward_context = 'conversation'  # conversation | response (reward model input)
  c.rl.missing_eos_penalty = 0.0    # subtracted from a response cut at max length
  c.rl.max_prompt_length = 64       # tokens; longer prompts are dropped, counted
  c.rl.max_response_length = 48     # new tokens per response
  c.rl.temperature = 1.0            # sampling (the loss uses the same distribution)
  c.rl.top_k = 0                    # 0 = off (the ratio is then exact)
  c.rl.top_p = 1.0
  c.rl.ignore_eos = False           # True: every response runs to max_response_length (benchmarks)
  c.rl.group_size = 4               # grpo: samples per prompt (G)
  c.rl.epochs = 4                   # passes over each rollout batch
  c.rl.minibatch_size = 8           # responses per optimizer step
  c.rl.clip = 0.2                   # ratio clip epsilon
  c.rl.kl_coef = 0.05               # beta: ppo's KL penalty in the reward; grpo's in the loss
  c.rl.kl_estimator = 'k1'          # ppo's per-token KL: k1 | k3 (grpo: always k3)
  c.rl.kl_target = 0.0              # > 0: adapt beta toward this KL per response
  c.rl.kl_horizon = 10000           # adaptive KL horizon (responses)
  c.rl.gamma = 1.0                  # GAE discount
  c.rl.lam = 0.95                   # GAE lambda
  c.rl.whiten_advantages = True     # ppo
  c.rl.value_init = 'reward'        # ppo critic from: reward (InstructGPT) | policy
  c.rl.value_learning_rate = 0.0    # 0: optimizer.learning_rate
  c.rl.value_clip = 0.2
  c.rl.scale_rewards = True         # grpo: divide by the group's std
  c.rl.loss_norm = 'token'          # token (DAPO, TRL) | sequence (GRPO paper)
  c.rl.ptx_coef = 0.0               # PPO-ptx: pretraining loss weight (InstructGPT: 27.8)
  c.rl.ptx_corpus = ''              # chitchat | tinyshakespeare | text (rl.ptx_files)
  c.rl.ptx_files = ''               # corpus=text: FILE[,FILE...]
  c.rl.ptx_length = 64              # tokens per pretraining row

  c.metrics = ml_collections.ConfigDict()
  c.metrics.peak_flops = 0.0        # per-device peak FLOP/s; 0 = look up
  return c
