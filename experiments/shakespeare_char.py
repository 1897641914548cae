r"""Character-level GPT on Tiny Shakespeare: nanoGPT's shakespeare_char recipes.

  TRANSFLAX_DATA=../shared/data transflax train \
      --config experiments/shakespeare_char.py:cpu --workdir runs/shakespeare
  transflax generate --workdir runs/shakespeare --prompt 'ROMEO:'

Args after the colon: cpu (default), full, smoke.

The data, split and vocabulary are nanoGPT's data/shakespeare_char: the first
90% of input.txt trains, the last 10% validates, one token per character (65
characters; 69 ids with our 4 fixed special ids). The model is nanoGPT's GPT:
pre-LayerNorm (eps 1e-5), GELU, learned positions, tied input/output
embeddings without sqrt(d) scaling (init std 0.02), no biases in the
projections or LayerNorms (nanoGPT's train.py sets bias=False, which its
LayerNorm class honours), dropout on residuals and attention weights
alike. Dense kernels are Xavier-uniform rather than nanoGPT's N(0, 0.02)
with the 1/sqrt(2 * layers) residual scaling: `--config.model.init=gpt2`
gives nanoGPT's (both results: docs/results.md).

Optimizer, as nanoGPT's config/train_shakespeare_char.py on top of train.py:
AdamW (0.9, 0.99), eps 1e-8, weight decay 0.1 on matrices only, global-norm
clipping 1.0, 100 warmup steps then cosine decay from 1e-3 to 1e-4 over the
whole run, no label smoothing.

  cpu   nanoGPT's README "I only have a macbook" command: 4 layers, 4 heads,
        d_model 128, block 64, batch 12, 2000 steps, no dropout. On a CPU
        host it splits the CPU into 2 JAX devices (mesh.cpu_devices; the
        batch is split across cores, with the same losses as one device).
        Target: nanoGPT's val loss 1.88 at step 2000; expected loss and
        wall time: see README's results table.
  full  config/train_shakespeare_char.py: 6 layers, 6 heads, d_model 384,
        block 256, batch 64, dropout 0.2, 5000 steps, for one GPU. Target:
        nanoGPT's best val loss 1.4697; the val loss is lowest part-way
        through and then the model overfits, hence an eval every 250 steps.
        Expected loss and wall time: see README's results table.
        On GPUs add --config.model.dtype=bfloat16 (nanoGPT trains in bf16).
  smoke a tiny model for a few steps on the same data (seconds), through the
        same code path, for tests and notebooks.

Two differences from nanoGPT's loop: it estimates val loss on eval_iters
random batches, we score the whole validation split in order (111k
characters, cheap at both sizes), so the number is exact rather than an
estimate; and its training rows start at random offsets, ours are the fixed
blocks of data/pipeline.lm_train, shuffled every epoch (~1.5 epochs for
`cpu`, ~80 for `full`).

Samples (at every eval, in samples.txt, and `transflax generate`) start from
'\n' like nanoGPT's sample.py: 500 characters, temperature 0.8, top-k 200;
past the block size the context is the last block of characters, as there.

Reference: Karpathy, nanoGPT (github.com/karpathy/nanoGPT), README
"quick start"; the char-level Shakespeare data of Karpathy's char-rnn (2015).
"""

from experiments import defaults

ARGS = ('cpu', 'full', 'smoke')


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('shakespeare_char.py', arg, ARGS)
  c = defaults.get_config('gpt2_small')  # GPT architecture; sizes set below
  c.task = 'lm'
  c.data.corpus = 'tinyshakespeare'
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.test_split = 'val'
  c.data.tokenizer.type = 'char'

  c.model.vocab_size = 0            # the character vocabulary's size (69)
  c.model.use_bias = False          # nanoGPT train.py: bias = False
  c.model.norm_epsilon = 1e-5       # torch LayerNorm's default
  c.model.attention_dropout_rate = 0.0
  c.model.activation_dropout_rate = 0.0

  c.train.label_smoothing = 0.0
  c.train.log_every = 100
  c.train.eval_every = 250          # nanoGPT eval_interval
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_batch_size = 64

  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.min_lr_ratio = 0.1    # nanoGPT min_lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = 0       # = num_steps (lr_decay_iters = max_iters)
  c.optimizer.b1 = 0.9
  # nanoGPT: "make a bit bigger because number of tokens per iter is small"
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0

  c.sample.prompt = '\n'            # nanoGPT sample.py's start
  c.sample.max_new_tokens = 500
  c.sample.temperature = 0.8
  c.sample.top_k = 200

  if arg == 'full':
    c.data.seq_len = 256
    c.model.update(d_model=384, num_heads=6, mlp_dim=4 * 384,
                   num_decoder_layers=6, max_len=256,
                   dropout_rate=0.2, attention_dropout_rate=0.2,
                   attention_block=64)  # skip the causal upper triangle
    c.train.update(batch_size=64, num_steps=5000, log_every=10)
  else:  # cpu and smoke: nanoGPT's CPU command, smoke shrinks it further
    c.data.seq_len = 64
    c.model.update(d_model=128, num_heads=4, mlp_dim=4 * 128,
                   num_decoder_layers=4, max_len=64, dropout_rate=0.0)
    # Val loss once, at step 2000 (the target), and no checkpoints on the
    # way: the benchmark is wall time end to end against nanoGPT's run,
    # whose 20-batch val estimates cost it next to nothing.
    c.train.update(batch_size=12, num_steps=2000, eval_every=2000,
                   checkpoint_every=2000)
    if arg == 'cpu':  # one JAX device per core of a 2-core CPU host
      c.mesh.cpu_devices = 2

  if arg == 'smoke':
    c.data.seq_len = 32
    c.model.update(d_model=32, num_heads=4, mlp_dim=128, num_decoder_layers=2,
                   max_len=32)
    # 8 rows: divisible by the 8 simulated CPU devices of the tests.
    c.train.update(batch_size=8, num_steps=12, log_every=4, eval_every=12,
                   checkpoint_every=6, max_eval_batches=2, eval_batch_size=16)
    c.optimizer.warmup_steps = 2
    c.sample.max_new_tokens = 40   # past max_len: the sliding window
  return c
