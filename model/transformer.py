"""Encoder, Decoder, EncoderDecoder (Vaswani et al. 2017) and DecoderLM (GPT).

Shape legend: b batch, s source length, t target length, d d_model, v vocab.

Padding is data, never inferred from a token id: rows carry segment ids (1,
2, ... per packed example, 0 on padding) and positions restarting at 0 per
example; attention never crosses a segment, and a model called without
segment ids treats every position as real. The decoder shifts its targets
right inside the model (start token 0, also at every packed segment start),
so a batch holds the targets as they are scored.

Decode mode (`config.decode=True`): initialise the cache with `init_cache`,
then call `decode` (EncoderDecoder) with one token [b, 1] per step, or
`__call__` (DecoderLM) with a prompt [b, n] once and one token per step,
with `mutable=['cache']`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import MultiHeadAttention, padding_mask, segment_mask
from model.config import TransformerConfig
from model.layers import (AddPositions, Dropout, Embed, MlpBlock, Norm,
                          dense_dot_general, kernel_init)

Array = jax.Array


def shift_right(targets: Array, segments: Array | None = None) -> Array:
  """[b, t] -> [b, t]: decoder inputs, 0 at the start of every segment."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  if segments is not None:
    prev = jnp.pad(segments, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(segments == prev, shifted, 0)
  return shifted


def _default_positions(tokens: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class _Residual(nn.Module):
  """One sublayer with its norm, dropout and residual, pre- or post-norm."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, sublayer) -> Array:
    cfg = self.config
    drop = Dropout(cfg.dropout_rate)
    if cfg.norm_position == 'pre':
      y = sublayer(Norm(cfg, name='norm')(x))
      return x + drop(y, deterministic=cfg.deterministic)
    y = sublayer(x)
    return Norm(cfg, name='norm')(x + drop(y, deterministic=cfg.deterministic))


class EncoderLayer(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array) -> Array:
    cfg = self.config
    attn = MultiHeadAttention(cfg, kind='self', name='self_attention')
    x = _Residual(cfg, name='attention_block')(
        x, lambda y: attn(y, y, mask, q_positions=positions,
                          kv_positions=positions))
    x = _Residual(cfg, name='mlp_block')(x, MlpBlock(cfg, name='mlp'))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  """Masked self-attention, optional encoder-decoder attention, feed-forward."""
  config: TransformerConfig
  cross_attention: bool = True

  @nn.compact
  def __call__(self, x: Array, self_mask: Array | None, positions: Array,
               encoded: Array | None = None, cross_mask: Array | None = None,
               decode_index: Array | None = None) -> Array:
    cfg = self.config
    attn = MultiHeadAttention(cfg, kind='self', causal=True,
                              name='self_attention')
    x = _Residual(cfg, name='attention_block')(
        x, lambda y: attn(y, y, self_mask, q_positions=positions,
                          kv_positions=positions, decode_index=decode_index))
    if self.cross_attention:
      cross = MultiHeadAttention(cfg, kind='cross', name='cross_attention')
      x = _Residual(cfg, name='cross_block')(
          x, lambda y: cross(y, encoded, cross_mask, decode_index=decode_index))
    x = _Residual(cfg, name='mlp_block')(x, MlpBlock(cfg, name='mlp'))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


def _maybe_remat(cls, config: TransformerConfig):
  # Rematerialise per layer to trade compute for activation memory.
  return nn.remat(cls) if config.remat and not config.decode else cls


def _embed(config: TransformerConfig, embed: Embed, tokens: Array,
           positions: Array, name: str) -> Array:
  """Token embedding + positions + dropout (paper 5.4) -> [b, l, d]."""
  x = embed(tokens)
  x = AddPositions(config, name=f'{name}_positions')(x, positions)
  return Dropout(config.dropout_rate)(x, deterministic=config.deterministic)


class Encoder(nn.Module):
  """Embeds source tokens and applies the encoder stack. -> [b, s, d]."""
  config: TransformerConfig
  embed: Embed

  @nn.compact
  def __call__(self, inputs: Array, segments: Array | None = None,
               positions: Array | None = None) -> Array:
    cfg = self.config
    positions = _default_positions(inputs) if positions is None else positions
    mask = None
    if segments is not None:  # padding (segment 0) is a segment of its own
      mask = padding_mask(segments > 0, segments > 0) & segment_mask(
          segments, segments)
    x = _embed(cfg, self.embed, inputs, positions, 'encoder')
    layer = _maybe_remat(EncoderLayer, cfg)
    for i in range(cfg.num_encoder_layers):
      x = layer(cfg, name=f'layer_{i}')(x, mask, positions)
    if cfg.norm_position == 'pre':
      x = Norm(cfg, name='final_norm')(x)
    return x


class Decoder(nn.Module):
  """The decoder stack and output logits; cross-attention iff `encoded` is given.

  Training/eval: `tokens` [b, t] are the decoder inputs (already shifted).
  Decode mode: `tokens` [b, n] are the next n inputs (n = 1 per step, or a
  whole prompt at once), `valid` [b, n] marks the real ones (False on a
  left-padded prompt's padding); positions count each row's real tokens.
  """
  config: TransformerConfig
  embed: Embed
  cross_attention: bool = True

  @nn.compact
  def __call__(self, tokens: Array, *, valid: Array | None = None,
               segments: Array | None = None, positions: Array | None = None,
               encoded: Array | None = None, encoded_valid: Array | None = None,
               encoded_segments: Array | None = None,
               return_hidden: bool = False, last_only: bool = False) -> Array:
    """logits [b, t, v]; return_hidden: the final hidden states [b, t, d]
    instead (after the last norm), for a loss that makes logits in chunks;
    last_only: the last position's only ([b, 1, ...]; a prefill's)."""
    cfg = self.config
    decode_index = None
    self_mask = cross_mask = None
    if cfg.decode:
      # decode_index: the cache slot of the call's first token (shared by
      # every row); next_position: each row's position of its next real
      # token, which differs from the slot when a prompt was left-padded.
      index = self.variable('cache', 'decode_index',
                            lambda: jnp.zeros((), jnp.int32))
      next_position = self.variable(
          'cache', 'next_position',
          lambda: jnp.zeros(tokens.shape[:1], jnp.int32))
      if self.is_initializing():
        positions = _default_positions(tokens)
      else:
        decode_index = index.value
        index.value = decode_index + tokens.shape[1]
        real = (jnp.ones(tokens.shape, jnp.int32) if valid is None
                else valid.astype(jnp.int32))
        # Padding takes the position of the next real token (never seen).
        positions = next_position.value[:, None] + jnp.cumsum(real, 1) - real
        next_position.value = next_position.value + real.sum(1)
        if valid is not None:
          self_mask = valid[:, None, None, :]  # which new keys are real
      if encoded is not None:
        cross_mask = encoded_valid[:, None, None, :]
    else:
      positions = _default_positions(tokens) if positions is None else positions
      # Causality is added by the attention itself (is_causal): a purely
      # causal decoder passes no mask, and a fused kernel reads none.
      if valid is not None:
        self_mask = padding_mask(valid, valid)
      if segments is not None:
        seg = segment_mask(segments, segments)
        self_mask = seg if self_mask is None else self_mask & seg
      if encoded is not None:
        q_valid = valid if valid is not None else jnp.ones(tokens.shape, bool)
        cross_mask = padding_mask(q_valid, encoded_valid)
        if segments is not None and encoded_segments is not None:
          cross_mask = cross_mask & segment_mask(segments, encoded_segments)

    x = _embed(cfg, self.embed, tokens, positions, 'decoder')
    layer = _maybe_remat(DecoderLayer, cfg)
    for i in range(cfg.num_decoder_layers):
      x = layer(cfg, cross_attention=self.cross_attention, name=f'layer_{i}')(
          x, self_mask, positions, encoded, cross_mask, decode_index)
    if last_only:
      x = x[:, -1:]
    if cfg.norm_position == 'pre':
      x = Norm(cfg, name='final_norm')(x)
    if return_hidden:
      return x
    if cfg.tie_output:
      return self.embed.attend(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=cfg.params_dtype,
                      dot_general=dense_dot_general,
                      kernel_init=kernel_init(cfg, ('embed', 'vocab')),
                      name='logits')(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      ('batch', 'length', 'vocab'))


class EncoderDecoder(nn.Module):
  """The Transformer for translation: logits [b, t, v] from inputs [b, s], targets [b, t]."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      self.shared_embedding = Embed(cfg)
      src_embed = tgt_embed = self.shared_embedding
    else:
      self.source_embedding = Embed(cfg)
      self.target_embedding = Embed(cfg)
      src_embed, tgt_embed = self.source_embedding, self.target_embedding
    self.encoder = Encoder(cfg, embed=src_embed)
    self.decoder = Decoder(cfg, embed=tgt_embed, cross_attention=True)

  def encode(self, inputs: Array, inputs_segmentation: Array | None = None,
             inputs_position: Array | None = None) -> Array:
    """inputs [b, s] -> encoded [b, s, d]."""
    return self.encoder(inputs, inputs_segmentation, inputs_position)

  def decode(self, encoded: Array, inputs_segmentation: Array, targets: Array,
             targets_segmentation: Array | None = None,
             targets_position: Array | None = None) -> Array:
    """-> logits [b, t, v] (float32).

    inputs_segmentation [b, s]: the source's segment ids, 0 on padding (an
    unpacked row: 1 on its tokens). Training/eval: `targets` [b, t] as
    scored (shifted right here). Decode mode: `targets` [b, 1] is the
    previous output token (0 at the first step).
    """
    encoded_valid = inputs_segmentation > 0
    if self.config.decode:
      return self.decoder(targets, encoded=encoded, encoded_valid=encoded_valid)
    valid = None if targets_segmentation is None else targets_segmentation > 0
    return self.decoder(
        shift_right(targets, targets_segmentation), valid=valid,
        segments=targets_segmentation, positions=targets_position,
        encoded=encoded, encoded_valid=encoded_valid,
        encoded_segments=inputs_segmentation)

  def __call__(self, inputs: Array, targets: Array,
               inputs_segmentation: Array | None = None,
               targets_segmentation: Array | None = None,
               inputs_position: Array | None = None,
               targets_position: Array | None = None) -> Array:
    encoded = self.encode(inputs, inputs_segmentation, inputs_position)
    if inputs_segmentation is None:
      inputs_segmentation = jnp.ones(inputs.shape, jnp.int32)
    return self.decode(encoded, inputs_segmentation, targets,
                       targets_segmentation, targets_position)


class DecoderLM(nn.Module):
  """Decoder-only causal LM (GPT): logits [b, l, v] for the next token at each position."""
  config: TransformerConfig

  def setup(self):
    self.embed = Embed(self.config, name='embedding')
    self.decoder = Decoder(self.config, embed=self.embed, cross_attention=False)

  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, *,
               return_hidden: bool = False, last_only: bool = False) -> Array:
    """tokens [b, l] -> logits [b, l, v] (last_only: [b, 1, v], the last
    position's).

    Decode mode: the next tokens [b, n] through the KV cache (a prompt, then
    one per step); segment_ids [b, n] > 0 marks real tokens (a left-padded
    batch of prompts; its padding is never attended to).

    return_hidden: the final hidden states [b, l, d] instead; `logits` turns
    them (or a slice of them) into logits.
    """
    valid = None if segment_ids is None else segment_ids > 0
    if self.config.decode:
      return self.decoder(tokens, valid=valid, last_only=last_only)
    return self.decoder(tokens, valid=valid, segments=segment_ids,
                        positions=positions, return_hidden=return_hidden,
                        last_only=last_only)

  def logits(self, hidden: Array) -> Array:
    """hidden [..., d] (from return_hidden) -> logits [..., v], float32.

    Tied output embeddings only: an untied projection lives inside the
    decoder's compact call.
    """
    if not self.config.tie_output:
      raise ValueError('DecoderLM.logits needs model.tie_output=True')
    return self.embed.attend(hidden)


class MaskedLM(nn.Module):
  """The Encoder as BERT pretrains it: logits [b, l, v] for every position,
  through the token embedding (tied output), from tokens [b, l] some of
  which the objective has masked (train/tasks/mlm.py)."""
  config: TransformerConfig

  def setup(self):
    self.embed = Embed(self.config, name='embedding')
    self.encoder = Encoder(self.config, embed=self.embed)

  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None) -> Array:
    return self.embed.attend(self.encoder(tokens, segment_ids, positions))


def init_cache(model: nn.Module, batch_size: int, max_decode_len: int,
               source_len: int | None = None):
  """A zero KV cache for `model` (whose config has decode=True), shapes only.

  EncoderDecoder needs `source_len` (the encoder output length); the cache
  holds [batch, max_decode_len, heads, head_dim] keys/values per layer.
  """
  shapes = _cache_shapes(type(model), model.config, batch_size,
                         max_decode_len, source_len)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=64)
def _cache_shapes(cls, config: TransformerConfig, batch_size: int,
                  max_decode_len: int, source_len: int | None):
  # Tracing the model's init is slow for deep models: once per shape.
  model = cls(config)
  tokens = jnp.ones((batch_size, max_decode_len), jnp.int32)
  if cls is EncoderDecoder:
    inputs = jnp.ones((batch_size, source_len), jnp.int32)
    init = functools.partial(model.init, jax.random.PRNGKey(0), inputs, tokens)
  else:
    init = functools.partial(model.init, jax.random.PRNGKey(0), tokens)
  return jax.eval_shape(init)['cache']
