r"""Masked language modelling (BERT's pretraining objective) on human conversations.

  pip install -e ".[chat]"
  transflax train --config experiments/mlm.py:chitchat --workdir runs/mlm

Args after the colon: chitchat (default), smoke.

Devlin et al. 2019 (BERT), section 3.1: in every block of text 15% of the
tokens are chosen; 80% of those become [MASK], 10% a random token, 10% stay;
the loss is the cross-entropy of the original tokens at the chosen positions
only, through the tied input embedding. The network is the paper's
Transformer encoder (post-norm, here with GELU and learned positions, as
BERT): d_model 256, 4 layers, 4 heads, FFN 1024, an 8k SentencePiece
vocabulary with a reserved <mask> piece, blocks of 128 tokens of the
chitchat conversations (one turn per line; the 90% train split). Masks are
drawn afresh at every step (RoBERTa's dynamic masking) from the step's key,
so a resumed run masks as the uninterrupted one.

`:smoke` trains a tiny model for a few steps (seconds), through the same
code path. The objective's tests are in tests/test_post_training.py.
"""

from experiments import defaults


def get_config(arg: str | None = None):
  arg = defaults.choose_arg('mlm.py', arg, ('chitchat', 'smoke'))
  c = defaults.get_config('transformer_base')
  c.task = 'mlm'
  c.data.corpus = 'chitchat'
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.seq_len = 128
  c.data.tokenizer.vocab_size = 8000
  c.model.update(vocab_size=0, d_model=256, num_heads=4, mlp_dim=1024,
                 num_encoder_layers=4, num_decoder_layers=1, max_len=128,
                 positions='learned', activation='gelu', dropout_rate=0.1,
                 attention_dropout_rate=0.1, scale_embeddings=False)
  c.mesh.cpu_devices = 2
  c.train.update(batch_size=16, num_steps=1000, log_every=50, eval_every=500,
                 checkpoint_every=500, max_eval_batches=20, eval_batch_size=32,
                 label_smoothing=0.0)
  c.optimizer.update(schedule='cosine', learning_rate=5e-4, warmup_steps=100,
                     b2=0.98, eps=1e-6, weight_decay=0.01, grad_clip=1.0)
  if arg == 'smoke':
    c.data.seq_len = 32
    c.data.tokenizer.update(vocab_size=1000, max_sentences=20000)
    c.model.update(d_model=32, num_heads=4, mlp_dim=64, num_encoder_layers=2,
                   max_len=32)
    c.train.update(batch_size=8, num_steps=6, log_every=2, eval_every=6,
                   checkpoint_every=6, max_eval_batches=2, eval_batch_size=8)
    c.optimizer.warmup_steps = 2
  return c
