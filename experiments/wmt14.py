r"""WMT 2014 English->German: the Transformer base and big models of the paper.

  pip install -e ".[hf]"    # WMT arrives through Hugging Face datasets
  transflax train --config experiments/wmt14.py:base --workdir runs/wmt14_base
  transflax eval --workdir runs/wmt14_base --checkpoint average

Args after the colon: base (default), big, smoke.

Vaswani et al. 2017, "Attention Is All You Need" (arXiv:1706.03762), Table 3
sizes and section 5: post-norm, sinusoidal positions, shared source/target
embeddings tied to the output; label smoothing 0.1; Adam (0.9, 0.98, 1e-9)
with lr = d_model^-0.5 * min(s^-0.5, s * 4000^-1.5); beam 4, alpha 0.6,
maximum output length = input length + 50; the final model averages the last
5 (base) or 20 (big) checkpoints, which the paper wrote every 10 minutes.

  model   d_model heads mlp   layers dropout steps  params  paper BLEU  paper time
  base    512     8     2048  6+6    0.1     100k   ~63M    27.3        12 h, 8 P100
  big     1024    16    4096  6+6    0.3     300k   ~213M   28.4        3.5 days, 8 P100

Data: `load_dataset('wmt14', 'de-en')` (4.5M pairs), newstest2013
('validation', 3,000 sentences) for eval loss and BLEU during training,
newstest2014 ('test', 3,003 sentences) for the final score. One shared BPE
vocabulary of 37,000 pieces (paper: "about 37000 tokens"), trained once into
the workdir.

Batches: the paper batched by length to ~25k source + ~25k target tokens.
Here 96 packed rows of 256 tokens per side = 24,576 token slots per side per
step; packing fills most of them (the target side fuller: German is longer).
96 rows divide over 1, 2, 4, 8, 16 or 32 data-parallel devices; on fewer or
smaller devices keep the step the same with --config.train.grad_accum_steps=N
(N micro-batches of 96/N rows).

Checkpoints every 1,250 (base) / 600 (big) steps: the paper's 10 minutes at
its 8-P100 speed (100k steps in 12 h; 300k in 3.5 days).

Hardware: one GPU or TPU host with 8 accelerators (e.g. 8x A100/H100 or a TPU
v3-8/v4-8); compute in bfloat16 with float32 parameters, optimizer state and
logits (--config.model.dtype=float32 for the paper's full precision). Runtime
there is not yet measured; the paper's is in the table. The workdir needs
~4 GB (base) / ~50 GB (big: 20 kept checkpoints of 213M params with Adam
moments) of checkpoint space.

Expected newstest2014 BLEU: the paper's 27.3 (base) and 28.4 (big) are
tokenized BLEU with compound splitting; `transflax eval` reports sacreBLEU
(detokenized, 13a), typically about 0.5-1 BLEU lower for the same
translations. Measured results: see README's results table.

`:smoke` is the base recipe shrunk to seconds on a laptop CPU: a tiny model,
a few steps, on the local Multi30k files (WMT needs the network and ~1.4 GB
of downloads), through the same code path otherwise.
"""

from experiments import defaults

VARIANTS = ('base', 'big', 'smoke')


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('wmt14.py', arg, VARIANTS)
  big = arg == 'big'
  # Table 3 sizes; the big preset carries dropout 0.3 (the EN-DE big model).
  c = defaults.get_config('transformer_big' if big else 'transformer_base')

  c.data.corpus = 'wmt'
  c.data.wmt_dataset = 'wmt14'
  c.data.wmt_pair = 'de-en'
  c.data.src_lang, c.data.tgt_lang = 'en', 'de'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'  # newstest2013
  c.data.test_split = 'test'        # newstest2014, 3,003 sentences
  c.data.max_length = 256           # per side per packed row; longer pairs dropped
  c.data.pack = True
  c.data.tokenizer.model_type = 'bpe'
  c.data.tokenizer.vocab_size = 37000
  # WMT's crawled text holds thousands of rare characters; byte fallback
  # spells the rarest 0.01% instead of spending pieces on them.
  c.data.tokenizer.character_coverage = 0.9999
  # SentencePiece keeps its training sentences in memory: a seeded 4M-line
  # sample of the 9M (both sides) is plenty for a 37k vocabulary.
  c.data.tokenizer.max_sentences = 4_000_000

  # Fixed, not "the tokenizer's", so --dry_run counts parameters without data
  # and every workdir of this experiment has the same shapes.
  c.model.vocab_size = 37000
  c.model.max_len = 256             # the longest row; decoding stops there too
  c.model.attention_dropout_rate = 0.0  # the paper drops residuals only
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'

  c.train.num_steps = 300_000 if big else 100_000
  c.train.batch_size = 96           # x 256 tokens per side: ~25k tokens
  c.train.label_smoothing = 0.1
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_batch_size = 64
  c.train.checkpoint_every = 600 if big else 1250  # ~10 paper minutes
  c.train.average_last = 20 if big else 5
  c.train.keep_checkpoints = c.train.average_last
  c.train.best_metric = 'eval/loss'

  c.optimizer.schedule = 'rsqrt'
  c.optimizer.learning_rate = 1.0   # exactly the paper's formula
  c.optimizer.warmup_steps = 4000
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 0.0

  c.decode.beam_size = 4
  c.decode.alpha = 0.6
  c.decode.max_extra_len = 50
  c.decode.batch_size = 128
  c.decode.bleu_every = 10_000      # newstest2013 BLEU: progress you can read
  c.decode.bleu_sentences = 0
  c.decode.test_sentences = 0

  if arg == 'smoke':
    # Local files instead of WMT; everything else keeps the recipe's path
    # (BPE, packing, rsqrt, beam 4, checkpoint averaging).
    c.data.corpus = 'multi30k'
    c.data.train_split = 'val'      # 1,014 pairs: the tokenizer trains in seconds
    c.data.eval_split = 'val'
    c.data.test_split = 'test_2016_flickr'
    c.data.max_length = 32
    c.data.tokenizer.vocab_size = 600
    c.data.tokenizer.character_coverage = 1.0
    c.model.vocab_size = 0          # the tokenizer's
    c.model.update(d_model=32, num_heads=4, mlp_dim=64, num_encoder_layers=1,
                   num_decoder_layers=1, max_len=64, dtype='float32')
    c.train.update(num_steps=6, batch_size=16, log_every=2, eval_every=6,
                   max_eval_batches=2, eval_batch_size=16, checkpoint_every=3,
                   average_last=2, keep_checkpoints=2)
    c.optimizer.warmup_steps = 4
    c.decode.update(batch_size=16, bleu_every=0, test_sentences=8,
                    max_extra_len=10)
  return c
