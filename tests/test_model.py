"""Properties of the network: causality, padding, packing, KV cache, sizes, sharding."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import model
from model import DecoderLM, EncoderDecoder, get_preset, init_cache
from train import partitioning

VARIANTS = [
    dict(),  # the paper: post-norm, sinusoidal, relu
    dict(norm_position='pre', positions='rotary', activation='swiglu',
         norm_type='rmsnorm', use_bias=False, attention_block=4),
    dict(positions='learned', activation='gelu', share_embeddings=False,
         tie_output=False),
]


def _tokens(rng, shape, vocab=64):
  return jnp.asarray(rng.integers(4, vocab, size=shape), jnp.int32)


def _init(m, *args):
  return m.init(jax.random.PRNGKey(0), *args)


@pytest.mark.parametrize('overrides', VARIANTS)
def test_decoder_is_causal(overrides):
  rng = np.random.default_rng(0)
  cfg = get_preset('tiny_encdec', **overrides)
  m = EncoderDecoder(cfg)
  src, tgt = _tokens(rng, (2, 7)), _tokens(rng, (2, 9))
  v = _init(m, src, tgt)
  t = 4
  # The decoder input at position i is target i-1, so targets > t may change
  # without affecting logits <= t.
  tgt2 = tgt.at[:, t + 1:].set(_tokens(rng, (2, 9 - t - 1)))
  a, b = m.apply(v, src, tgt), m.apply(v, src, tgt2)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, t + 2:], b[:, t + 2:])


@pytest.mark.parametrize('overrides', VARIANTS[:2])
def test_lm_is_causal(overrides):
  rng = np.random.default_rng(1)
  cfg = get_preset('tiny_lm', **overrides)
  m = DecoderLM(cfg)
  x = _tokens(rng, (2, 12))
  v = _init(m, x)
  t = 5
  x2 = x.at[:, t + 1:].set(_tokens(rng, (2, 12 - t - 1)))
  a, b = m.apply(v, x), m.apply(v, x2)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_encoder_ignores_padding():
  """Padding is what the segment ids say (0), whatever tokens it holds."""
  rng = np.random.default_rng(2)
  cfg = get_preset('tiny_encdec')
  m = EncoderDecoder(cfg)
  src = _tokens(rng, (2, 6))
  v = _init(m, src, _tokens(rng, (2, 5)))
  enc = m.apply(v, src, method=EncoderDecoder.encode)
  for pad in (1, 7):
    padded = jnp.pad(src, ((0, 0), (0, pad)), constant_values=9)
    seg = jnp.pad(jnp.ones_like(src), ((0, 0), (0, pad)))
    enc_p = m.apply(v, padded, seg, method=EncoderDecoder.encode)
    np.testing.assert_allclose(enc_p[:, :6], enc, rtol=1e-5, atol=1e-5)
    # Without segment ids nothing is padding: the extra tokens count.
    unmarked = m.apply(v, padded, method=EncoderDecoder.encode)
    assert not np.allclose(unmarked[:, :6], enc, rtol=1e-3, atol=1e-3)


def _pack(a, b, length):
  """Two sequences into one row -> (tokens, segments, positions), each [1, length]."""
  row = np.zeros(length, np.int32)
  seg = np.zeros(length, np.int32)
  pos = np.zeros(length, np.int32)
  row[:len(a)], row[len(a):len(a) + len(b)] = a, b
  seg[:len(a)], seg[len(a):len(a) + len(b)] = 1, 2
  pos[:len(a)], pos[len(a):len(a) + len(b)] = np.arange(len(a)), np.arange(len(b))
  return (jnp.asarray(row)[None], jnp.asarray(seg)[None], jnp.asarray(pos)[None])


@pytest.mark.parametrize('overrides', VARIANTS[:2])
def test_packing_equals_separate(overrides):
  rng = np.random.default_rng(3)
  cfg = get_preset('tiny_encdec', **overrides)
  m = EncoderDecoder(cfg)
  s1, s2 = rng.integers(4, 64, 5), rng.integers(4, 64, 7)
  t1, t2 = rng.integers(4, 64, 6), rng.integers(4, 64, 4)
  v = _init(m, jnp.asarray(s1)[None], jnp.asarray(t1)[None])
  src, src_seg, src_pos = _pack(s1, s2, 16)
  tgt, tgt_seg, tgt_pos = _pack(t1, t2, 12)
  packed = m.apply(v, src, tgt, src_seg, tgt_seg, src_pos, tgt_pos)
  alone1 = m.apply(v, jnp.asarray(s1)[None], jnp.asarray(t1)[None])
  alone2 = m.apply(v, jnp.asarray(s2)[None], jnp.asarray(t2)[None])
  np.testing.assert_allclose(packed[0, :6], alone1[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 6:10], alone2[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides', VARIANTS[:2])
def test_lm_packing_equals_separate(overrides):
  rng = np.random.default_rng(4)
  cfg = get_preset('tiny_lm', **overrides)
  m = DecoderLM(cfg)
  a, b = rng.integers(4, 64, 5), rng.integers(4, 64, 8)
  v = _init(m, jnp.asarray(a)[None])
  tok, seg, pos = _pack(a, b, 16)
  packed = m.apply(v, tok, seg, pos)
  np.testing.assert_allclose(packed[0, :5], m.apply(v, jnp.asarray(a)[None])[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:13], m.apply(v, jnp.asarray(b)[None])[0],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('block', [4, 5, 12])
def test_block_causal_attention_matches_full(block):
  # Query blocks against keys up to their own end: the same values and
  # gradients as the whole masked matrix, with a ragged last block and with
  # per-row ([b,1,q,s]) and key-only ([b,1,1,s]) masks.
  rng = np.random.default_rng(9)
  q, k, v, w = (jnp.asarray(rng.normal(size=(2, 13, 2, 8)), jnp.float32)
                for _ in range(4))
  seg = jnp.asarray([[1] * 5 + [2] * 8, [1] * 9 + [0] * 4])
  masks = [None, model.attention.segment_mask(seg, seg),
           (seg > 0)[:, None, None, :]]
  for mask in masks:
    def loss(q, k, v, block, mask=mask):
      out = model.attention.dot_product_attention(q, k, v, mask,
                                                  is_causal=True, block=block)
      return jnp.sum(out * w), out

    (_, want), grads_want = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
        q, k, v, 0)
    (_, got), grads_got = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
        q, k, v, block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_got, grads_want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
@pytest.mark.parametrize('contract', [1, 2])
@pytest.mark.parametrize('out_features', [3, 16])
@pytest.mark.parametrize('dtype,preferred', [(jnp.float32, None),
                                             (jnp.bfloat16, jnp.float32)])
def test_matmul_gradients_match_autodiff(contract, out_features, dtype,
                                         preferred, backend, monkeypatch):
  # On CPU `matmul` brings its own VJP (a transposed copy of the narrower of
  # x and the cotangent); elsewhere a bf16 matmul with a float32 output
  # brings one that casts the cotangent to bf16. Values, gradients and their
  # dtypes must be autodiff's of the plain contraction either way.
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  rng = np.random.default_rng(4)
  in_shape = (2, 4) if contract == 2 else (8,)
  x = jnp.asarray(rng.normal(size=(2, 5, *in_shape)), dtype)
  kernel = jnp.asarray(rng.normal(size=(*in_shape, out_features)), dtype)
  spec = 'blhk,hkf->blf' if contract == 2 else 'bld,df->blf'

  def ours(x, kernel):
    return model.layers.matmul(x, kernel, contract,
                               preferred_element_type=preferred)

  def plain(x, kernel):
    return jnp.einsum(spec, x, kernel, preferred_element_type=preferred)

  y, vjp = jax.vjp(ours, x, kernel)
  y_want, vjp_want = jax.vjp(plain, x, kernel)
  g = jnp.asarray(rng.normal(size=y.shape), y.dtype)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert y.dtype == y_want.dtype
  np.testing.assert_allclose(y, y_want, rtol=tol, atol=tol)
  for got, want in zip(vjp(g), vjp_want(g)):
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if backend == 'gpu' and dtype == jnp.bfloat16:
      # The cotangent itself is rounded to bf16: a bf16 operand's error.
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    else:
      np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _dots(jaxpr):
  """Every dot_general in a jaxpr, its sub-jaxprs (scans, custom VJPs) too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


@pytest.mark.parametrize('overrides', [dict(), dict(float32_logits=False),
                                       dict(attention_block=4)])
def test_bf16_lm_gradient_has_no_float32_matmul(overrides, monkeypatch):
  # With bf16 compute on an accelerator, autodiff of a bf16 x bf16 -> float32
  # product (the tied logits, attention scores) would run its two backward
  # GEMMs in float32: TF32 on an H100, 32 of GPT-2 small's 180 ms step for
  # the logits alone. Traced as for a GPU, no dot_general of the gradient
  # may take a float32 operand, and the logits stay float32 for the loss.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  cfg = get_preset('tiny_lm', dtype='bfloat16', vocab_size=97, **overrides)
  m = DecoderLM(cfg)
  tokens = _tokens(np.random.default_rng(6), (2, 8), vocab=97)
  params = _init(m, tokens)['params']

  def loss(params):
    logits = m.apply({'params': params}, tokens)
    assert logits.dtype == jnp.float32
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  dots = list(_dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  # Forward, d(hidden) and d(embedding) of the logits, at the least.
  assert sum(any(97 in v.aval.shape for v in e.invars) for e in dots) >= 3
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e


def _decode_stepwise(step_fn, cache, tokens):
  outs = []
  for i in range(tokens.shape[1]):
    logits, cache = step_fn(tokens[:, i:i + 1], cache)
    outs.append(logits[:, 0])
  return jnp.stack(outs, axis=1)


@pytest.mark.parametrize('overrides', VARIANTS)
def test_encdec_cached_decode_matches_full(overrides):
  rng = np.random.default_rng(5)
  cfg = get_preset('tiny_encdec', **overrides)
  src = _tokens(rng, (2, 7)).at[1, 5:].set(0)  # one padded source
  src_seg = jnp.ones_like(src).at[1, 5:].set(0)
  tgt = _tokens(rng, (2, 8))
  m = EncoderDecoder(cfg)
  v = _init(m, src, tgt)
  full = m.apply(v, src, tgt, src_seg)
  dm = EncoderDecoder(cfg.replace(decode=True))
  encoded = m.apply(v, src, src_seg, method=EncoderDecoder.encode)
  cache = init_cache(dm, 2, tgt.shape[1], source_len=src.shape[1])

  @jax.jit
  def step(tok, cache):
    logits, mut = dm.apply({'params': v['params'], 'cache': cache}, encoded,
                           src_seg, tok, method=EncoderDecoder.decode,
                           mutable=['cache'])
    return logits, mut['cache']

  stepped = _decode_stepwise(step, cache, model.shift_right(tgt))
  np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides', VARIANTS[:2])
def test_lm_cached_decode_matches_full(overrides):
  rng = np.random.default_rng(6)
  cfg = get_preset('tiny_lm', **overrides)
  x = _tokens(rng, (2, 10))
  m = DecoderLM(cfg)
  v = _init(m, x)
  full = m.apply(v, x)
  dm = DecoderLM(cfg.replace(decode=True))
  cache = init_cache(dm, 2, x.shape[1])

  @jax.jit
  def step(tok, cache):
    logits, mut = dm.apply({'params': v['params'], 'cache': cache}, tok,
                           mutable=['cache'])
    return logits, mut['cache']

  np.testing.assert_allclose(_decode_stepwise(step, cache, x), full,
                             rtol=1e-5, atol=1e-5)


def _num_params(m, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.int32) for s in shapes]
  v = jax.eval_shape(lambda *a: m.init(jax.random.PRNGKey(0), *a), *args)
  return sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(v['params'])))


@pytest.mark.parametrize('name,paper', [('transformer_base', 65e6),
                                        ('transformer_big', 213e6)])
def test_paper_sizes(name, paper):
  n = _num_params(EncoderDecoder(get_preset(name, vocab_size=37000)),
                  (1, 8), (1, 8))
  assert abs(n - paper) / paper < 0.05, n


def test_gpt2_small_size():
  n = _num_params(DecoderLM(get_preset('gpt2_small')), (1, 8))
  assert abs(n - 124e6) / 124e6 < 0.01, n


@pytest.mark.parametrize('use_bias', [True, False])
def test_use_bias_covers_layernorms(use_bias):
  # nanoGPT's bias=False leaves no bias anywhere, LayerNorms included.
  m = DecoderLM(get_preset('tiny_lm', use_bias=use_bias))
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 8), jnp.int32)))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nn.unbox(v['params']))]
  norms = [p for p in paths if 'norm' in p]
  assert norms and any('scale' in p for p in norms)
  assert any('bias' in p for p in norms) == use_bias
  assert any('bias' in p for p in paths) == use_bias


@pytest.mark.parametrize('init', ['xavier', 'gpt2'])
def test_kernel_init_std(init):
  """Each kernel's std is its init's: Xavier sqrt(2 / (fan_in + fan_out)), or
  GPT-2's 0.02 with residual-branch outputs at 0.02 / sqrt(2 * layers)."""
  cfg = get_preset('tiny_lm', d_model=128, num_heads=4, mlp_dim=512,
                   num_decoder_layers=8, init=init)
  params = nn.unbox(_init(DecoderLM(cfg), jnp.zeros((1, 8), jnp.int32)))
  layer = params['params']['decoder']['layer_3']
  attn, mlp = layer['self_attention'], layer['mlp']
  kernels = {'query': (attn['query_kernel'], 128, 128),
             'out': (attn['out_kernel'], 128, 128),
             'wi': (mlp['wi']['kernel'], 128, 512),
             'wo': (mlp['wo']['kernel'], 512, 128)}
  for name, (k, fan_in, fan_out) in kernels.items():
    if init == 'xavier':
      want = (2 / (fan_in + fan_out)) ** 0.5
    else:
      want = 0.02 / 4.0 if name in ('out', 'wo') else 0.02  # sqrt(2 * 8) = 4
    assert abs(float(jnp.std(k)) / want - 1) < 0.05, (name, float(jnp.std(k)), want)
  pos = params['params']['decoder']['decoder_positions']['pos_embedding']
  assert abs(float(jnp.std(pos)) / (0.02 if init == 'gpt2' else 0.01) - 1) < 0.05


def test_invalid_config_names_field():
  with pytest.raises(ValueError, match='num_heads'):
    get_preset('tiny_lm', d_model=30, num_heads=4)
  with pytest.raises(ValueError, match='positions.*sinusoidal'):
    get_preset('tiny_lm', positions='alibi')
  with pytest.raises(ValueError, match='unknown preset'):
    get_preset('nope')


def test_bf16_masking_stays_finite():
  rng = np.random.default_rng(7)
  cfg = get_preset('tiny_encdec', dtype='bfloat16')
  m = EncoderDecoder(cfg)
  src = _tokens(rng, (2, 6)).at[:, 3:].set(0)
  tgt = _tokens(rng, (2, 5)).at[:, 2:].set(0)
  v = _init(m, src, tgt)
  logits = m.apply(v, src, tgt, (src > 0).astype(jnp.int32),
                   (tgt > 0).astype(jnp.int32))
  assert np.isfinite(np.asarray(logits)).all()


def test_sharded_forward_matches_single_device():
  rng = np.random.default_rng(8)
  cfg = get_preset('tiny_encdec', d_model=64, num_heads=4, mlp_dim=128)
  m = EncoderDecoder(cfg)
  src, tgt = _tokens(rng, (4, 8)), _tokens(rng, (4, 6))
  rules = partitioning.DEFAULT_RULES
  mesh = partitioning.make_mesh(2, 2, 2)
  abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), src, tgt))
  shardings = partitioning.logical_to_sharding(
      nn.get_partition_spec(abstract), mesh, rules)
  with mesh, nn.logical_axis_rules(rules):
    v = jax.jit(lambda: m.init(jax.random.PRNGKey(0), src, tgt),
                out_shardings=shardings)()
    kernel = v['params']['encoder']['layer_0']['mlp']['wi']['kernel'].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (32, 64)
    emb = v['params']['shared_embedding']['embedding'].value
    assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
    batch = jax.device_put((src, tgt), partitioning.batch_sharding(mesh))
    sharded = jax.jit(m.apply)(v, *batch)
  single = m.apply(jax.device_get(nn.unbox(v)), src, tgt)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rate', [0.1, 0.2, 0.5])
def test_dropout_rate_and_expectation(rate):
  # 16-bit draws: keep iff u16 < t, kept values scaled by 2^16 / t.
  x = jnp.ones((64, 257))  # odd last axis: one half-word is dropped
  y = np.asarray(model.layers.dropout(x, rate, jax.random.PRNGKey(0)))
  t = round((1 - rate) * 65536)
  kept = y != 0
  # 16,448 draws: the keep fraction's std is < 0.004.
  assert abs(kept.mean() - (1 - rate)) < 0.02
  np.testing.assert_allclose(y[kept], 65536 / t, rtol=1e-6)
  assert abs(y.mean() - 1.0) < 0.03
  again = np.asarray(model.layers.dropout(x, rate, jax.random.PRNGKey(0)))
  other = np.asarray(model.layers.dropout(x, rate, jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(again, y)
  assert (other != y).any()
  # Columns are not correlated by the two halves of a word sharing a draw.
  assert abs(kept[:, 0::2].mean() - kept[:, 1::2].mean()) < 0.03


def test_dropout_zero_rate_and_train_mode():
  x = jnp.arange(12.0).reshape(3, 4)
  assert model.layers.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
  rng = np.random.default_rng(9)
  cfg = get_preset('tiny_lm', dropout_rate=0.3, attention_dropout_rate=0.3)
  tokens = _tokens(rng, (2, 8))
  v = DecoderLM(cfg).init(jax.random.PRNGKey(0), tokens)
  train = DecoderLM(cfg.replace(deterministic=False))
  a = train.apply(v, tokens, rngs={'dropout': jax.random.PRNGKey(1)})
  b = train.apply(v, tokens, rngs={'dropout': jax.random.PRNGKey(1)})
  c = train.apply(v, tokens, rngs={'dropout': jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert not np.allclose(np.asarray(a), np.asarray(DecoderLM(cfg).apply(v, tokens)))


# -- Llama-family options: grouped-query attention, rotary layouts, prefill ---

LLAMA = dict(norm_position='pre', positions='rotary', activation='swiglu',
             norm_type='rmsnorm', use_bias=False, num_heads=4, num_kv_heads=2,
             scale_embeddings=False)


def test_grouped_query_equals_repeated_kv_heads():
  """GQA = multi-head attention whose key/value heads are the kv heads
  repeated per group (Llama's repeat_kv): query head i reads kv head i // g."""
  rng = np.random.default_rng(10)
  x = _tokens(rng, (2, 9))
  gqa = get_preset('tiny_lm', **LLAMA)
  v = nn.unbox(_init(DecoderLM(gqa), x))
  mha = gqa.replace(num_kv_heads=None)
  params = jax.tree.map(lambda a: a, v['params'])
  for i in range(gqa.num_decoder_layers):
    attn = params['decoder'][f'layer_{i}']['self_attention']
    for name in ('key_kernel', 'value_kernel'):
      assert attn[name].shape[1] == 2
      attn[name] = jnp.repeat(attn[name], 2, axis=1)
  np.testing.assert_allclose(DecoderLM(gqa).apply(v, x),
                             DecoderLM(mha).apply({'params': params}, x),
                             rtol=1e-5, atol=1e-5)


def test_interleaved_rotary_equals_half_with_permuted_heads():
  """llama.cpp's layout: rotary on interleaved pairs with the q/k output
  features permuted is the same model as the 'half' layout."""
  rng = np.random.default_rng(11)
  x = _tokens(rng, (2, 9))
  half = get_preset('tiny_lm', **LLAMA)
  v = nn.unbox(_init(DecoderLM(half), x))
  k = half.head_dim_
  # feature j of the half layout sits at perm[j] in the interleaved one
  order = np.stack([np.arange(k // 2), np.arange(k // 2) + k // 2], 1).ravel()
  params = jax.tree.map(lambda a: a, v['params'])
  for i in range(half.num_decoder_layers):
    attn = params['decoder'][f'layer_{i}']['self_attention']
    for name in ('query_kernel', 'key_kernel'):
      attn[name] = attn[name][..., order]
  inter = half.replace(rotary_layout='interleaved')
  np.testing.assert_allclose(DecoderLM(half).apply(v, x),
                             DecoderLM(inter).apply({'params': params}, x),
                             rtol=1e-5, atol=1e-5)


def _prefill_then_step(cfg, params, tokens, real, n_prompt):
  """Logits of a cached run: tokens[:, :n_prompt] in one call, then one per
  step. -> [b, l, v]"""
  dm = DecoderLM(cfg.replace(decode=True))
  cache = init_cache(dm, tokens.shape[0], tokens.shape[1])
  logits, mut = dm.apply({'params': params, 'cache': cache},
                         tokens[:, :n_prompt], real[:, :n_prompt],
                         mutable=['cache'])
  out, cache = [logits], mut['cache']
  for i in range(n_prompt, tokens.shape[1]):
    logits, mut = dm.apply({'params': params, 'cache': cache},
                           tokens[:, i:i + 1], mutable=['cache'])
    out.append(logits)
    cache = mut['cache']
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize('overrides', [LLAMA, dict(positions='learned',
                                                   norm_position='pre')])
def test_prefill_then_steps_equals_full(overrides):
  rng = np.random.default_rng(12)
  cfg = get_preset('tiny_lm', **overrides)
  x = _tokens(rng, (2, 10))
  v = nn.unbox(_init(DecoderLM(cfg), x))
  full = DecoderLM(cfg).apply(v, x)
  cached = _prefill_then_step(cfg, v['params'], x, jnp.ones_like(x), 6)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_left_padded_prefill_equals_each_row_alone():
  """Rows of different prompt lengths in one batch, left-padded: the padding
  is never attended to and positions count real tokens, so every row's
  logits are its own run's."""
  rng = np.random.default_rng(13)
  cfg = get_preset('tiny_lm', **LLAMA)
  short, long = _tokens(rng, (1, 7)), _tokens(rng, (1, 10))
  v = nn.unbox(_init(DecoderLM(cfg), long))
  pad = jnp.zeros((1, 3), jnp.int32)
  batch = jnp.concatenate([jnp.concatenate([pad, short], 1), long], 0)
  real = jnp.concatenate([jnp.concatenate([pad, jnp.ones_like(short)], 1),
                          jnp.ones_like(long)], 0)
  both = _prefill_then_step(cfg, v['params'], batch, real, 8)
  np.testing.assert_allclose(both[1], DecoderLM(cfg).apply(v, long)[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both[0, 3:], DecoderLM(cfg).apply(v, short)[0],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kv_heads,split', [(2, True), (1, False)])
def test_grouped_query_shards_over_tensor(kv_heads, split):
  """kv heads split over `tensor` when it divides them, else replicated
  (fit_kv_heads); either way the sharded forward equals one device's."""
  rng = np.random.default_rng(14)
  cfg = get_preset('tiny_lm', **{**LLAMA, 'num_kv_heads': kv_heads})
  m = DecoderLM(cfg)
  x = _tokens(rng, (4, 8))
  mesh = partitioning.make_mesh(2, 2, 2)
  rules = partitioning.fit_kv_heads(partitioning.DEFAULT_RULES, mesh, kv_heads)
  abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
  shardings = partitioning.logical_to_sharding(
      nn.get_partition_spec(abstract), mesh, rules)
  with mesh, nn.logical_axis_rules(rules):
    v = jax.jit(lambda: m.init(jax.random.PRNGKey(0), x),
                out_shardings=shardings)()
    key = v['params']['decoder']['layer_0']['self_attention']['key_kernel']
    assert key.value.sharding.spec[1] == ('tensor' if split else None)
    sharded = jax.jit(m.apply)(v, jax.device_put(
        x, partitioning.batch_sharding(mesh)))
  single = m.apply(jax.device_get(nn.unbox(v)), x)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,size', [('smollm2_135m', 134.5e6),
                                       ('smollm2_360m', 361.8e6),
                                       ('llama3_2_1b', 1.236e9)])
def test_llama_family_sizes(name, size):
  n = _num_params(DecoderLM(get_preset(name)), (1, 8))
  assert abs(n - size) / size < 0.005, n
