r"""Multi30k (WMT16 multimodal task 1, text only) translation on a laptop CPU.

  TRANSFLAX_DATA=../shared/data transflax train \
      --config experiments/multi30k.py:en-de --workdir runs/multi30k_en_de

Args after the colon: en-de (default), de-en, en-fr, smoke.

A post-norm Transformer (the paper's architecture) scaled to 29k sentence
pairs: d_model 256, 3+3 layers, 4 heads, a shared 8k unigram vocabulary,
dropout 0.1/attention dropout 0.1, label smoothing 0.1, Adam (0.9, 0.98) with
the paper's rsqrt schedule (scale 2, 1000 warmup steps), 1,200 steps, the
last 5 checkpoints (100 steps apart) averaged. Hardware: a 2-core CPU (or
one GPU). Expected test_2016_flickr sacreBLEU and wall time: see README's
results table (docs/results.md for every pair and machine).

`:smoke` trains a tiny model for a few steps on the same data (seconds),
through the same code path, for tests and notebooks.
"""

from experiments import defaults

PAIRS = {'en-de': ('en', 'de'), 'de-en': ('de', 'en'), 'en-fr': ('en', 'fr')}


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('multi30k.py', arg, (*PAIRS, 'smoke'))
  smoke = arg == 'smoke'
  c = defaults.get_config('transformer_base')
  c.data.corpus = 'multi30k'
  c.data.src_lang, c.data.tgt_lang = PAIRS.get(arg, PAIRS['en-de'])
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.test_split = 'test_2016_flickr'
  c.data.max_length = 64
  c.data.tokenizer.vocab_size = 8000

  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.model.num_encoder_layers = 3
  c.model.num_decoder_layers = 3
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.model.max_len = 128

  # 1,200 steps of 64 packed rows x 64 tokens (~3.9k target tokens): ~13
  # epochs, sized to finish within an hour on 2 CPU cores.
  c.train.batch_size = 64
  c.train.num_steps = 1200
  c.train.label_smoothing = 0.1
  c.train.log_every = 50
  c.train.eval_every = 600
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 5
  c.train.average_last = 5          # the paper averages its last checkpoints
  c.train.eval_batch_size = 128

  c.optimizer.schedule = 'rsqrt'
  c.optimizer.learning_rate = 2.0
  c.optimizer.warmup_steps = 1000
  c.optimizer.b2 = 0.98

  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.batch_size = 128
  c.decode.bleu_every = 600         # validation BLEU on a 256-sentence subset
  c.decode.bleu_sentences = 256

  if smoke:
    c.data.tokenizer.vocab_size = 1000
    c.model.update(d_model=32, num_heads=4, mlp_dim=64, num_encoder_layers=1,
                   num_decoder_layers=1, max_len=96)
    c.train.update(batch_size=16, num_steps=8, log_every=2, eval_every=8,
                   checkpoint_every=4, max_eval_batches=2, eval_batch_size=16,
                   average_last=2, keep_checkpoints=2)
    c.optimizer.warmup_steps = 4
    c.decode.update(bleu_every=0, batch_size=16, test_sentences=16)
    # The 1k-pair validation split trains the tokenizer and the model in
    # seconds; smoke runs check the code path, not the score.
    c.data.train_split = c.data.test_split = 'val'
  return c
