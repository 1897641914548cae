"""Scaled dot-product and multi-head attention, masks, and the KV cache.

Shape legend: b batch, q query length, s key/value length, d d_model,
h heads, n kv heads, g query heads per kv head (h = n g), k head dim.

Masks are boolean [b, 1, q, s] (True = may attend) and are applied with a
select against the most negative float32, never by adding a large constant, so
bf16/fp16 inputs stay finite. Softmax runs in float32.

Grouped-query attention (`num_kv_heads` < `num_heads`): query heads come in
groups of g = h / kv_heads sharing one key/value head; keys and values are
never repeated in memory, the group is an axis of the score einsums.

Decode mode (`config.decode`): self-attention writes the keys and values of
the n >= 1 tokens of a call into a cache of length L (fixed when the cache is
initialised with a full-length call) at slots `decode_index`..+n-1, with
whether each is a real token (a left-padded prompt's padding is not), and
every query sees the real slots up to its own. One call with the whole
prompt fills the cache (prefill); then one token per call.
Cross-attention projects the encoder output once, at index 0, and reuses it
for every later step.

Figures: applied with `mutable=['intermediates']`, every attention also sows
its probabilities [b, h, q, s] as `attention_weights` (train/plots.py reads
them); otherwise nothing is computed or stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.config import TransformerConfig
from model.layers import (apply_rotary, bias_init, dropout, f32_out_einsum,
                          kernel_init, matmul)

Array = jax.Array
_NEG = jnp.finfo(jnp.float32).min


def causal_mask(length: int, start: int = 0) -> Array:
  """[1, 1, l - start, l]: query i (rows start..l-1) may attend to keys j <= i."""
  return (jnp.arange(start, length)[:, None]
          >= jnp.arange(length)[None, :])[None, None]


def padding_mask(query_valid: Array, key_valid: Array) -> Array:
  """query_valid [b, q], key_valid [b, s] (bool) -> [b, 1, q, s]."""
  return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """Packed rows: attend only within the same segment. [b, q], [b, s] -> [b, 1, q, s]."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def dot_product_attention(query: Array, key: Array, value: Array,
                          mask: Array | None, *, is_causal: bool = False,
                          dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None,
                          impl: str = 'xla', block: int = 0) -> Array:
  """softmax(q k^T / sqrt(k)) v.  q [b,q,h,k], k/v [b,s,n,k], mask [b,1,q,s] -> [b,q,h,k].

  `is_causal` adds the causal mask (q == s) without the caller building it,
  which lets the fused kernel skip masked blocks, and the XLA path too when
  `block` > 0: queries are taken `block` rows at a time, each block against
  the keys up to its last row only, so the upper triangle above the diagonal
  blocks is never computed (with n blocks, (n - 1) / 2n of the q x s work;
  the measured gain is in docs/performance/cpu.md).
  Same result up to float rounding, except that attention dropout draws
  each block's mask from its own key (fold_in(dropout_rng, block index)).
  """
  if impl == 'cudnn' and dropout_rng is None:
    # Fused flash-style kernel (Hopper/Ampere); same math, no [q, s] matrix
    # in memory.
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        is_causal=is_causal,
                                        implementation='cudnn')
  depth = query.shape[-1]
  query = query / jnp.sqrt(jnp.asarray(depth, query.dtype))
  # Heads-major [b, h, l, k] operands make both products plain batched
  # matmuls, which XLA:CPU runs faster than the [b, l, h, k] einsums
  # (docs/performance/cpu.md).
  heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
  if not is_causal:
    return heads_major(_attend(heads_major(query), heads_major(key),
                               heads_major(value), mask, dropout_rate,
                               dropout_rng))
  length = query.shape[1]
  size = block if 0 < block < length else length
  query = heads_major(query)
  outs = []
  for i, lo in enumerate(range(0, length, size)):
    hi = min(lo + size, length)
    rows = causal_mask(hi, lo)
    if mask is not None:
      rows = rows & _mask_rows(mask, lo, hi)
    rng = dropout_rng
    if rng is not None and size < length:
      rng = jax.random.fold_in(rng, i)
    # Keys and values are cut before the transpose, which copies them anyway.
    outs.append(_attend(query[:, :, lo:hi], heads_major(key[:, :hi]),
                        heads_major(value[:, :hi]), rows, dropout_rate, rng))
  return heads_major(jnp.concatenate(outs, axis=2))


def _mask_rows(mask: Array, lo: int, hi: int) -> Array:
  """mask [b, 1, q, s] at query rows lo..hi-1 and keys < hi.

  Its q and s axes may have size 1 (broadcast); those stay whole.
  """
  rows = slice(lo, hi) if mask.shape[2] > 1 else slice(None)
  keys = slice(0, hi) if mask.shape[3] > 1 else slice(None)
  return mask[:, :, rows, keys]


def _softmax(query: Array, key: Array, mask: Array | None) -> Array:
  """Heads-major, queries already scaled: [b,h,q,k], [b,n,s,k] -> float32
  weights [b,h,q,s], or [b,n,g,q,s] for grouped-query attention (n < h)."""
  b, h, q, k = query.shape
  n = key.shape[1]
  if n != h:  # grouped-query: the g query heads of a kv head in one einsum
    query = query.reshape(b, n, h // n, q, k)
    mask = None if mask is None else mask[:, :, None]
    spec = 'bngqk,bnsk->bngqs'
  else:
    spec = 'bhqk,bhsk->bhqs'
  logits = f32_out_einsum(spec, query, key)
  if mask is not None:
    logits = jnp.where(mask, logits, _NEG)
  return jax.nn.softmax(logits, axis=-1)


def _attend(query: Array, key: Array, value: Array, mask: Array | None,
            dropout_rate: float, dropout_rng: Array | None) -> Array:
  """Heads-major, queries already scaled: [b,h,q,k], [b,n,s,k] -> [b,h,q,k]."""
  b, h, q, k = query.shape
  weights = _softmax(query, key, mask)
  if dropout_rng is not None and dropout_rate > 0.0:
    weights = dropout(weights, dropout_rate, dropout_rng)
  weights = weights.astype(value.dtype)
  spec = 'bngqs,bnsk->bngqk' if weights.ndim == 5 else 'bhqs,bhsk->bhqk'
  return jnp.einsum(spec, weights, value).reshape(b, h, q, k)


def attention_weights(query: Array, key: Array, mask: Array | None, *,
                      is_causal: bool = False) -> Array:
  """softmax(q k^T / sqrt(k)) as float32 [b, h, q, s], masked like
  `dot_product_attention` (q [b,q,h,k], k [b,s,n,k], mask [b,1,q,s]): the
  probabilities its XLA path multiplies the values with (before dropout).
  A query row whose keys are all masked (padding) is uniform."""
  depth = query.shape[-1]
  query = query / jnp.sqrt(jnp.asarray(depth, query.dtype))
  if is_causal:
    causal = causal_mask(query.shape[1])
    mask = causal if mask is None else mask & causal
  b, q, h, _ = query.shape
  weights = _softmax(jnp.swapaxes(query, 1, 2), jnp.swapaxes(key, 1, 2), mask)
  return weights.reshape(b, h, q, key.shape[1])


class MultiHeadAttention(nn.Module):
  """Multi-head attention (paper 3.2.2) with rotary positions and a KV cache.

  Attributes:
    config: the model config.
    kind: 'self' (encoder/decoder self-attention; cached in decode mode when
      `causal`), or 'cross' (decoder attending to the encoder output).
    causal: causal self-attention (decoder); enables the KV cache in decode.
  """
  config: TransformerConfig
  kind: str = 'self'
  causal: bool = False

  def _proj_params(self, name, shape, axes, in_axis, out_axis):
    cfg = self.config
    init = kernel_init(cfg, axes, residual=name == 'out', in_axis=in_axis,
                       out_axis=out_axis)
    kernel = self.param(f'{name}_kernel', init, shape, cfg.params_dtype)
    bias = None
    if cfg.bias('out' if name == 'out' else 'qkv'):
      bshape = shape[1:] if name != 'out' else shape[-1:]
      bias = self.param(f'{name}_bias', bias_init(axes[1:] if name != 'out'
                                                  else axes[-1:]),
                        bshape, cfg.params_dtype)
    return kernel, bias

  def _in_shape(self, name: str):
    """(kernel shape, logical axes) of the query/key/value projection."""
    cfg = self.config
    if name == 'query' or cfg.num_kv_heads is None:
      return (cfg.d_model, cfg.num_heads, cfg.head_dim_), ('embed', 'heads',
                                                           'kv')
    # kv heads: split over `tensor` like query heads when the rules allow
    # (the run drops the rule when the mesh does not divide them).
    return (cfg.d_model, cfg.kv_heads, cfg.head_dim_), ('embed', 'kv_heads',
                                                        'kv')

  def _project_in(self, name: str, x: Array) -> Array:
    """x [b, l, d] -> [b, l, h, k] (key/value: [b, l, n, k])."""
    cfg = self.config
    shape, axes = self._in_shape(name)
    kernel, bias = self._proj_params(name, shape, axes, 0, (1, 2))
    y = matmul(x, jnp.asarray(kernel, cfg.compute_dtype))
    if bias is not None:
      y = y + jnp.asarray(bias, cfg.compute_dtype)
    return nn.with_logical_constraint(y, ('batch', 'length', axes[1], 'kv'))

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array, mask: Array | None, *,
               q_positions: Array | None = None,
               kv_positions: Array | None = None,
               decode_index: Array | None = None) -> Array:
    """x_q [b, q, d], x_kv [b, s, d], mask [b, 1, q, s] -> [b, q, d].

    In decode mode `decode_index` is the position of the single query token.
    """
    cfg = self.config
    x_q = x_q.astype(cfg.compute_dtype)
    x_kv = x_kv.astype(cfg.compute_dtype)
    query = self._project_in('query', x_q)
    rotary = cfg.positions == 'rotary' and self.kind == 'self'
    if rotary:
      query = apply_rotary(query, q_positions, cfg.rotary_base,
                           cfg.rotary_layout)

    if self.kind == 'cross' and cfg.decode:
      key, value = self._cross_cache(x_kv, decode_index)
    else:
      key = self._project_in('key', x_kv)
      value = self._project_in('value', x_kv)
      if rotary:
        key = apply_rotary(key, kv_positions, cfg.rotary_base,
                           cfg.rotary_layout)
      if self.kind == 'self' and self.causal and cfg.decode:
        key, value, mask = self._self_cache(key, value, mask, decode_index)

    dropout_rng = None
    if not cfg.deterministic and cfg.attention_dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    # Causality is applied here, not in the caller's mask, so a fused kernel
    # can skip masked blocks; in decode mode the cache mask already has it.
    is_causal = self.causal and not cfg.decode
    out = dot_product_attention(query, key, value, mask, is_causal=is_causal,
                                dropout_rate=cfg.attention_dropout_rate,
                                dropout_rng=dropout_rng,
                                impl=cfg.attention_impl,
                                block=cfg.attention_block)
    if self.is_mutable_collection('intermediates'):
      # Only when asked (apply(..., mutable=['intermediates'])), for figures:
      # the weights are recomputed beside the attention, which stays as is.
      self.sow('intermediates', 'attention_weights',
               attention_weights(query, key, mask, is_causal=is_causal))
    kernel, bias = self._proj_params(
        'out', (cfg.num_heads, cfg.head_dim_, cfg.d_model),
        ('heads', 'kv', 'embed'), (0, 1), 2)
    y = matmul(out, jnp.asarray(kernel, cfg.compute_dtype), contract=2)
    if bias is not None:
      y = y + jnp.asarray(bias, cfg.compute_dtype)
    return nn.with_logical_constraint(y, ('batch', 'length', 'embed'))

  def _self_cache(self, key, value, mask, decode_index):
    """Writes this call's keys/values [b, n, kv, k] at slots decode_index..;
    returns the whole cache and the mask [b, 1, n, L] of what each query sees.

    `mask` [b, 1, 1, n] (or None: all real) says which of the n tokens are
    real; padding is written but never attended to. The first
    (initialising) call sees the full length L and only creates the cache.
    """
    b, length, h, k = key.shape
    decoding = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros,
                               (b, length, h, k), key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                 (b, length, h, k), value.dtype)
    cached_real = self.variable('cache', 'cached_real', jnp.zeros,
                                (b, length), jnp.bool_)
    if not decoding:
      return key, value, mask
    real = (jnp.ones((b, length), jnp.bool_) if mask is None
            else jnp.broadcast_to(mask[:, 0, 0, :], (b, length)))
    start = (0, decode_index, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                      start)
    cached_real.value = jax.lax.dynamic_update_slice(cached_real.value, real,
                                                     (0, decode_index))
    max_len = cached_key.value.shape[1]
    # The query at slot decode_index + i sees the real slots 0..that one.
    seen = (jnp.arange(max_len)[None, :]
            <= decode_index + jnp.arange(length)[:, None])  # [n, L]
    mask = seen[None, None] & cached_real.value[:, None, None, :]
    return cached_key.value, cached_value.value, mask

  def _cross_cache(self, x_kv, decode_index):
    """Projects the encoder output at step 0 only; later steps reuse it."""
    b, s, _ = x_kv.shape
    cfg = self.config
    shape = (b, s, cfg.kv_heads, cfg.head_dim_)
    initialised = self.has_variable('cache', 'cross_key')
    ck = self.variable('cache', 'cross_key', jnp.zeros, shape, cfg.compute_dtype)
    cv = self.variable('cache', 'cross_value', jnp.zeros, shape,
                       cfg.compute_dtype)
    # Parameters are read outside the cond so no module is called inside it.
    k_kernel, k_bias = self._proj_params('key', *self._in_shape('key'), 0,
                                         (1, 2))
    v_kernel, v_bias = self._proj_params('value', *self._in_shape('value'), 0,
                                         (1, 2))

    def project(x, kernel, bias):
      y = matmul(x, jnp.asarray(kernel, cfg.compute_dtype))
      return y if bias is None else y + jnp.asarray(bias, cfg.compute_dtype)

    def compute():
      return project(x_kv, k_kernel, k_bias), project(x_kv, v_kernel, v_bias)

    if not initialised:
      return compute()
    key, value = jax.lax.cond(decode_index == 0, compute,
                              lambda: (ck.value, cv.value))
    ck.value, cv.value = key, value
    return key, value
