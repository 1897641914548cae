"""Scalar heads on a DecoderLM: reward models (and, later, value functions).

`ScalarLM` is a DecoderLM whose vocabulary projection is replaced by one
scalar per position. Its parameter tree is the DecoderLM's (`embedding`,
`decoder`) plus `head`, so a reward model starts from an SFT run with
`train.init_from` by copying every shared path; the head starts fresh
(OpenRLHF's value-head initialisation, N(0, 1/(d+1))). The untied output
projection of an LM, if it had one, is simply not used.

Shape legend: b batch, l length, d d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.layers import bias_init
from model.transformer import DecoderLM

Array = jax.Array


class ScalarHead(nn.Module):
  """[..., d] -> [...]: one linear unit with a bias, computed in float32.

  The bias is what InstructGPT's reward normalisation shifts: after
  training, a reference set is made to score 0 on average (train/tasks/reward.py).
  """
  d_model: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0 / (self.d_model + 1)),
        ('embed', None))
    kernel = self.param('kernel', init, (self.d_model, 1), self.param_dtype)
    bias = self.param('bias', bias_init((None,)), (1,), self.param_dtype)
    return (x.astype(jnp.float32) @ kernel.astype(jnp.float32)
            + bias.astype(jnp.float32))[..., 0]


class ScalarLM(DecoderLM):
  """A DecoderLM body with a scalar head: [b, l] tokens -> [b, l] scalars."""

  def setup(self):
    super().setup()
    self.head = ScalarHead(self.config.d_model, self.config.params_dtype)

  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None) -> Array:
    hidden = super().__call__(tokens, segment_ids, positions,
                              return_hidden=True)
    return nn.with_logical_constraint(self.head(hidden), ('batch', 'length'))

  def score(self, tokens: Array, segment_ids: Array,
            positions: Array | None = None) -> Array:
    """[b] scalars read at each row's last real token (the last position
    with segment id > 0: the end-of-turn token of a rendered reply), as
    InstructGPT reads its reward. Trailing padding cannot change it: the
    decoder is causal."""
    values = self(tokens, segment_ids, positions)
    last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)
    return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]
