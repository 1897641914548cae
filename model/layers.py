"""Building blocks: token embedding with tied logits, positions, feed-forward, norms.

Shape legend: b batch, l length, d d_model (embed), v vocab, f mlp, h heads,
k head dim (kv). Parameters carry logical axis names (`vocab, embed, mlp,
heads, kv, length`) through `nn.with_logical_partitioning`; the rules table that
maps them onto the mesh lives in the experiment config.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.config import TransformerConfig

Array = jax.Array


def matmul(x: Array, kernel: Array, contract: int = 1, *,
           preferred_element_type=None) -> Array:
  """Token-wise projection as one 2-D matmul: x [..., *in] @ kernel [*in, *out].

  `contract` is the number of trailing axes of x (leading axes of kernel)
  summed over. Folding every token into one row axis before the dot, rather
  than handing XLA a [b, l, d] x [d, ...] dot_general, lets XLA:CPU pick
  layouts that avoid transposing the [tokens, mlp] activations in the
  backward pass (measured in docs/performance/cpu.md); on GPUs both forms
  compile to the same GEMM. On CPU the weight gradient also gets its own
  form (`_cpu_matmul`).
  """
  lead = x.shape[:x.ndim - contract]
  in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
  k = math.prod(in_shape)
  x2, kernel2 = x.reshape(-1, k), kernel.reshape(k, -1)
  if jax.default_backend() == 'cpu':
    y = _cpu_matmul(x2, kernel2, preferred_element_type)
  elif (preferred_element_type is not None
        and jnp.dtype(preferred_element_type) == jnp.float32):
    y = f32_out_einsum('nk,km->nm', x2, kernel2)
  else:
    y = jnp.matmul(x2, kernel2, preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out_shape)


def f32_out_einsum(spec: str, a: Array, b: Array) -> Array:
  """`jnp.einsum(spec, a, b)` accumulated and returned in float32.

  For bf16/f16 operands off CPU its backward runs in their dtype. Autodiff
  would hand the backward's two GEMMs the float32 cotangent and promote the
  bf16 operands to match: for GPT-2 small's [tokens, 50,304] logits on a
  GPU those ran as TF32 GEMMs, a large share of the step (profile in
  docs/performance/gpu.md); attention's score GEMMs did the same. Casting
  the cotangent to the operands' dtype first, as PyTorch's autocast does,
  keeps them bf16 GEMMs (which still accumulate in float32). On CPU, and
  for other dtypes, it is plain autodiff.
  """
  if (jax.default_backend() != 'cpu' and a.dtype == b.dtype
      and a.dtype in (jnp.bfloat16, jnp.float16)):
    return _low_precision_backward_einsum(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_backward_einsum(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _low_precision_backward_einsum_fwd(spec, a, b):
  return _low_precision_backward_einsum(spec, a, b), (a, b)


def _low_precision_backward_einsum_bwd(spec, residuals, g):
  a, b = residuals
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
  return vjp(g.astype(a.dtype))


_low_precision_backward_einsum.defvjp(_low_precision_backward_einsum_fwd,
                                      _low_precision_backward_einsum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x: Array, w: Array, preferred_element_type) -> Array:
  """x [n, k] @ w [k, m] whose weight gradient contracts a transposed copy.

  Autodiff writes dw [k, m] as one dot contracting the token axis (axis 0)
  of both x [n, k] and the cotangent g [n, m]. XLA:CPU runs that as an Eigen
  GEMM with a transposed operand, which on the MLP's shapes is slower than
  a plain one. Transposing the narrower of x and g first (a copy XLA fuses
  into the op that produces it) makes it a plain GEMM (the step times before
  and after: docs/performance/cpu.md). The values are autodiff's up to the
  order of the float32 sums; dx is autodiff's own.
  """
  return jnp.matmul(x, w, preferred_element_type=preferred_element_type)


def _cpu_matmul_fwd(x, w, preferred_element_type):
  return _cpu_matmul(x, w, preferred_element_type), (x, w)


def _cpu_matmul_bwd(preferred_element_type, residuals, g):
  x, w = residuals
  _, x_vjp = jax.vjp(lambda x: jnp.matmul(
      x, w, preferred_element_type=preferred_element_type), x)
  (dx,) = x_vjp(g)
  if x.shape[1] <= g.shape[1]:
    dw = jnp.matmul(x.T, g, preferred_element_type=preferred_element_type)
  else:
    dw = jnp.matmul(g.T, x, preferred_element_type=preferred_element_type).T
  return dx, dw.astype(w.dtype)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """`nn.Dense(dot_general=...)` that contracts through `matmul` (2-D)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type)
  return matmul(lhs, rhs, preferred_element_type=preferred_element_type)


def dropout(x: Array, rate: float, rng: Array) -> Array:
  """Inverted dropout drawing 16 random bits per element.

  jax.random.bernoulli spends a 32-bit word (and a float conversion) on each
  element; two 16-bit halves of one word halve the random-number work, which
  on a CPU is most of dropout's cost (attention dropout masks [b, h, q, s];
  the step times: docs/performance/cpu.md). An element is kept iff its
  u16 < t = round((1 - rate) * 2^16) and scaled by 2^16 / t, so E[out] = x
  (exactly in float32; bf16 rounds the scale); the keep probability is off
  by < 2^-17 (0.8 -> 0.800003).
  """
  if rate <= 0.0:
    return x
  threshold = round((1.0 - rate) * 65536)
  if threshold <= 0:
    return jnp.zeros_like(x)
  *lead, last = x.shape
  half = (last + 1) // 2
  words = jax.random.bits(rng, (*lead, half), jnp.uint32)
  u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, 2 * half)
  keep = u16[..., :last] < threshold
  scale = jnp.asarray(65536.0 / threshold, x.dtype)
  return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`nn.Dropout` with `dropout` above; same 'dropout' rng stream and API."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))


def kernel_init(cfg: TransformerConfig, axes, *, residual: bool = False,
                in_axis=-2, out_axis=-1):
  """A kernel initializer with logical axes, per `cfg.init`.

  'xavier': Xavier-uniform over (in_axis, out_axis) (the paper's T2T/flax
  default). 'gpt2': N(0, 0.02); a `residual` kernel (one whose output is
  added to the residual stream) gets std 0.02 / sqrt(2 * layers), GPT-2's
  scaling for the accumulation of 2 residual branches per layer (Radford et
  al. 2019, section 2.3; nanoGPT and HF GPT2Model's _init_weights).
  """
  if cfg.init == 'gpt2':
    layers = cfg.num_encoder_layers + cfg.num_decoder_layers
    std = 0.02 / math.sqrt(2 * layers) if residual else 0.02
    init = nn.initializers.normal(stddev=std)
  else:
    init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                            in_axis=in_axis, out_axis=out_axis)
  return nn.with_logical_partitioning(init, axes)


def bias_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Embed(nn.Module):
  """Token embedding [v, d]; `attend` gives the tied output logits.

  Paper 3.4: the embedding is shared with the pre-softmax projection and
  multiplied by sqrt(d_model) on input. With `scale_embeddings` the table is
  initialised with std d^-0.5, so scaled inputs have unit variance and the
  logits x @ E^T start small; without it (GPT-2) std 0.02 and no scaling.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    std = cfg.d_model ** -0.5 if cfg.scale_embeddings else 0.02
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=std),
                                     ('vocab', 'embed')),
        (cfg.vocab_size, cfg.d_model), cfg.params_dtype)

  def __call__(self, tokens: Array) -> Array:
    """tokens [b, l] int32 -> [b, l, d]."""
    cfg = self.config
    x = jnp.take(jnp.asarray(self.embedding, cfg.compute_dtype), tokens, axis=0)
    if cfg.scale_embeddings:
      x = x * jnp.sqrt(jnp.asarray(cfg.d_model, cfg.compute_dtype))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

  def attend(self, x: Array) -> Array:
    """x [b, l, d] -> logits [b, l, v] = x @ E^T, float32.

    Accumulated in float32; written in float32 or, with float32_logits off,
    rounded to the compute dtype first (see TransformerConfig).
    """
    emb = jnp.asarray(self.embedding, self.config.compute_dtype)
    if self.config.float32_logits:
      logits = matmul(x, emb.T, preferred_element_type=jnp.float32)
    else:
      logits = matmul(x, emb.T).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def sinusoid_encoding(positions: Array, d_model: int) -> Array:
  """Paper 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(same).

  positions [b, l] (int) -> [b, l, d] float32, sin and cos interleaved.
  """
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2) / d_model))
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(*positions.shape, d_model)


class AddPositions(nn.Module):
  """Adds absolute position encodings (sinusoidal or learned) to [b, l, d].

  Rotary and 'none' add nothing here (rotary acts inside attention).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    cfg = self.config
    if cfg.positions == 'sinusoidal':
      pe = sinusoid_encoding(positions, cfg.d_model)
    elif cfg.positions == 'learned':
      table = self.param(
          'pos_embedding',
          nn.with_logical_partitioning(
              nn.initializers.normal(stddev=0.02 if cfg.init == 'gpt2' else 0.01),
              ('length', 'embed')),
          (cfg.max_len, cfg.d_model), cfg.params_dtype)
      pe = jnp.take(table, positions, axis=0)
    else:
      return x
    return x + pe.astype(x.dtype)


def apply_rotary(x: Array, positions: Array, base: float,
                 layout: str = 'half') -> Array:
  """Rotary position embedding (Su et al. 2021).

  x [b, l, h, k], positions [b, l] -> [b, l, h, k]; computed in float32.
  Feature pair i (frequency base^(-2i/k)) is (i, i + k/2) in the 'half'
  layout (GPT-NeoX, Hugging Face) and (2i, 2i + 1) in 'interleaved' (GPT-J,
  llama.cpp); the two are the same map up to a permutation of the head's
  features, which a converter applies to the q/k projections.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  if layout == 'interleaved':
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the embed axis, with logical-axis parameters."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    common = dict(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                  param_dtype=cfg.params_dtype,
                  scale_init=nn.with_logical_partitioning(
                      nn.initializers.ones_init(), ('embed',)))
    if cfg.norm_type == 'rmsnorm':
      return nn.RMSNorm(**common)(x)
    return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=bias_init(('embed',)),
                        **common)(x)


class MlpBlock(nn.Module):
  """Position-wise feed-forward: [b, l, d] -> act(x W1 + b1) W2 + b2 -> [b, l, d].

  SwiGLU (Shazeer 2020) uses two input projections, silu(x W0) * (x W1).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config

    def dense(features, axes, name):
      return nn.Dense(features, use_bias=cfg.bias('mlp'),
                      dtype=cfg.compute_dtype,
                      param_dtype=cfg.params_dtype,
                      dot_general=dense_dot_general,
                      kernel_init=kernel_init(cfg, axes, residual=name == 'wo'),
                      bias_init=bias_init(axes[1:]), name=name)

    if cfg.activation == 'swiglu':
      h = (nn.silu(dense(cfg.mlp_dim, ('embed', 'mlp'), 'wi_0')(x))
           * dense(cfg.mlp_dim, ('embed', 'mlp'), 'wi_1')(x))
    else:
      h = dense(cfg.mlp_dim, ('embed', 'mlp'), 'wi')(x)
      # GPT-2 uses the tanh approximation of GELU.
      h = nn.relu(h) if cfg.activation == 'relu' else nn.gelu(h, approximate=True)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = Dropout(cfg.activation_dropout_rate)(h, deterministic=cfg.deterministic)
    return dense(cfg.d_model, ('mlp', 'embed'), 'wo')(h)
