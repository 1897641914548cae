r"""GPT-2 small (124M) and medium (355M): nanoGPT's train_gpt2 recipe.

  # Shapes, parameter count and shardings, no data needed:
  transflax train --config experiments/gpt2.py:small --dry_run
  # Training on local text (one document per line; UTF-8, plain or .gz):
  transflax train --config experiments/gpt2.py:small --workdir runs/gpt2 \
      --config.data.files.train=owt_train.txt \
      --config.data.files.val=owt_val.txt \
      --config.data.tokenizer.path=gpt2_bpe.model
  # OpenWebText or FineWeb: tokenized once into memory-mapped files (below).
  transflax generate --workdir runs/gpt2 --prompt 'The meaning of life is'
  transflax bench --config experiments/gpt2.py:small --steps 20

Args after the colon: small (default), medium, smoke.

Model: GPT-2 (Radford et al. 2019) as nanoGPT trains it: pre-LayerNorm (eps
1e-5), GELU, learned positions over 1024 tokens, tied input/output embedding
without sqrt(d) scaling (init std 0.02), no biases in the projections or
LayerNorms (nanoGPT's train.py bias=False), no dropout. Small:
12 layers, d_model 768, 12 heads = 124M parameters (`--dry_run` prints
124.4M). Medium: 24 layers, d_model 1024, 16 heads = 355M. As in nanoGPT,
the embedding and logits cover 50,304 ids, GPT-2's 50,257 padded to a
multiple of 64 for the matmul; the 47 ids past the tokenizer are never
targets and never sampled. Init is GPT-2's (model.init='gpt2'): N(0, 0.02),
the residual-branch output projections at 0.02 / sqrt(2 * layers).

Optimizer (nanoGPT config/train_gpt2.py + train.py): AdamW (0.9, 0.95), eps
1e-8, weight decay 0.1 on matrices only, clipping 1.0, 2000 warmup steps,
cosine from 6e-4 to 6e-5 over 600k steps; no label smoothing. Medium uses
3e-4 (GPT-3 paper, Table 2.1, for its 350M model). A step is 480 rows of 1024
tokens (491,520 tokens, nanoGPT's ~0.5M), as `train.grad_accum_steps` = 5
micro-batches of 96 rows: 12 rows per GPU on 8 GPUs, nanoGPT's setting. On
one GPU raise --config.train.grad_accum_steps (below).
Compute is bfloat16 with float32 parameters and optimizer state
(model.dtype); the logits are written in bfloat16 and the loss upcasts them
to float32, as under nanoGPT's autocast (model.float32_logits=False). Add
--config.model.attention_impl=cudnn on Ampere/Hopper GPUs for the fused
attention kernel (no [len, len] matrix in memory). On one 80GB GPU,
micro-batches of 64 rows ran fastest of 16, 32 and 64 (MFU: see README's
results table; the sweep: docs/performance/gpu.md);
--config.train.grad_accum_steps=8 makes the 480-row step 60-row
micro-batches. --config.train.loss_chunk=128 makes the 50,304-wide logits
128 positions at a time instead of all at once: same loss and less memory,
but slower on a GPU (it makes the logits twice, and the scan has its own
cost; on several data-parallel devices it also reduces the embedding
gradient once per chunk, see train/objectives.py); use it only where memory
runs out.

Data: `data.corpus='text'` reads data.files.train / data.files.val, one
document per line, each followed by EOS, and tokenizes them in memory at
start: corpora of a few GB. OpenWebText or FineWeb are tokenized once into
memory-mapped token files instead (data/tokens.py; extra `hf` streams the
dataset), which `data.corpus='tokens'` reads block by block:

  python -m data.tokens --tokenizer gpt2_bpe.model --out owt \
      --hf_dataset Skylion007/openwebtext --val_every 2000  # 0.05% val
  transflax train --config experiments/gpt2.py:small --workdir runs/gpt2 \
      --config.data.corpus=tokens --config.data.files.train=owt/train.bin \
      --config.data.files.val=owt/val.bin \
      --config.data.tokenizer.path=gpt2_bpe.model

(FineWeb: --hf_dataset HuggingFaceFW/fineweb --hf_config sample-10BT. See
data/tokens.py for OpenWebText's loading-script caveat; no download was
tried here.) The
tokenizer is a SentencePiece BPE with byte fallback and 50,257 pieces
(GPT-2's vocabulary size, not its merges). Train it once on a sample of the
corpus, since training on all of OpenWebText would not fit in memory:

  python -c "from data import tokenizer; tokenizer.train_tokenizer(
      'owt_sample.txt', vocab_size=50257, model_type='bpe',
      character_coverage=0.9995, path='gpt2_bpe.model')"

Hardware and expected result: one host with 8 x A100 40GB or better
(nanoGPT's reference; multi-host via mesh.*). nanoGPT reaches val loss ~2.85
on OpenWebText after 600k steps (~295B tokens, ~4 days on 8 x A100). Losses
with our tokenizer are per SentencePiece token, so they compare with that
number only roughly; measured results: see README's results table.

`:smoke` trains a 2-layer model for a few steps on Tiny Shakespeare (one
line = one document) with a 512-piece BPE, on a CPU in seconds, through the
same code path; it needs only $TRANSFLAX_DATA.

Reference: Karpathy, nanoGPT (github.com/karpathy/nanoGPT),
config/train_gpt2.py; Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners".
"""

from experiments import defaults

ARGS = ('small', 'medium', 'smoke')


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('gpt2.py', arg, ARGS)
  c = defaults.get_config('gpt2_medium' if arg == 'medium' else 'gpt2_small')
  c.task = 'lm'
  c.data.corpus = 'text'
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.test_split = 'val'
  c.data.seq_len = 1024
  c.data.tokenizer.type = 'sentencepiece'
  c.data.tokenizer.model_type = 'bpe'
  c.data.tokenizer.vocab_size = 50257
  c.data.tokenizer.character_coverage = 0.9995

  # Fixed rather than "the tokenizer's" so --dry_run and bench need no data.
  c.model.vocab_size = 50304        # 50,257 padded to a multiple of 64
  c.model.init = 'gpt2'
  c.model.use_bias = False
  c.model.dropout_rate = 0.0
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.float32_logits = False    # bf16 logits, f32 loss (autocast)

  c.train.batch_size = 480          # x 1024 tokens = 491,520 tokens per step
  c.train.grad_accum_steps = 5      # micro-batches of 96 rows: 12 per GPU on 8
  c.train.num_steps = 600_000
  c.train.label_smoothing = 0.0
  c.train.log_every = 10
  c.train.eval_every = 1000         # nanoGPT eval_interval
  c.train.eval_batch_size = 96
  c.train.max_eval_batches = 25     # 2,400 rows ~ nanoGPT's eval_iters=200 x 12
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3

  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 3e-4 if arg == 'medium' else 6e-4
  c.optimizer.min_lr_ratio = 0.1    # min_lr = learning_rate / 10
  c.optimizer.warmup_steps = 2000
  c.optimizer.decay_steps = 0       # = num_steps (lr_decay_iters = max_iters)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0

  c.sample.prompt = ''              # starts a new document (after EOS)
  c.sample.max_new_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 200

  if arg == 'smoke':
    c.data.corpus = 'tinyshakespeare'
    c.data.seq_len = 64
    c.data.tokenizer.vocab_size = 512  # 4 specials + 256 bytes + merges
    c.data.tokenizer.character_coverage = 1.0
    c.model.update(vocab_size=512, d_model=32, num_heads=4, mlp_dim=128,
                   num_decoder_layers=2, max_len=64, dtype='float32')
    # 8 rows: divisible by the 8 simulated CPU devices of the tests.
    c.train.update(batch_size=16, grad_accum_steps=2, num_steps=8,
                   log_every=4, eval_every=8, checkpoint_every=8,
                   eval_batch_size=16, max_eval_batches=2, keep_checkpoints=1)
    c.optimizer.update(warmup_steps=2, learning_rate=1e-3)
    c.sample.max_new_tokens = 16
  return c
