"""TransformerConfig: every hyper-parameter of the network, and named presets.

Layers see only this frozen dataclass, never the experiment config. Train, eval
and decode variants are `.replace(...)` of one config:

  cfg = get_preset('transformer_base', vocab_size=37000)
  train_cfg = cfg.replace(deterministic=False)
  decode_cfg = cfg.replace(decode=True)

The defaults are the paper's choices (Vaswani et al. 2017, base model): post
norm, sinusoidal positions, ReLU, shared source/target embeddings tied to the
output projection with the sqrt(d_model) scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

POSITIONS = ('sinusoidal', 'learned', 'rotary', 'none')
NORM_POSITIONS = ('post', 'pre')
NORM_TYPES = ('layernorm', 'rmsnorm')
ACTIVATIONS = ('relu', 'gelu', 'swiglu')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('xla', 'cudnn')
ROTARY_LAYOUTS = ('half', 'interleaved')
INITS = ('xavier', 'gpt2')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of EncoderDecoder and DecoderLM (see model/transformer.py)."""
  vocab_size: int = 32000
  d_model: int = 512            # embedding / residual stream width
  num_heads: int = 8
  # Key/value heads: None = num_heads (multi-head); fewer for grouped-query
  # attention (Ainslie et al. 2023), 1 for multi-query. Query head i reads
  # kv head i // (num_heads // num_kv_heads), as Llama's repeat_kv does; the
  # KV cache holds only the kv heads.
  num_kv_heads: int | None = None
  head_dim: int | None = None   # None: d_model // num_heads
  mlp_dim: int = 2048           # feed-forward inner width
  num_encoder_layers: int = 6   # 0 for decoder-only models
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1     # residual dropout: sublayer outputs, embedding sums
  attention_dropout_rate: float = 0.0  # on attention weights
  activation_dropout_rate: float = 0.0  # after the feed-forward activation
  positions: str = 'sinusoidal'  # 'sinusoidal' (paper) | 'learned' | 'rotary' | 'none'
  rotary_base: float = 10000.0  # RoPE theta (Llama 2: 1e4, SmolLM2: 1e5)
  # Which features of a head rotate together: 'half' pairs i with i + k/2
  # (GPT-NeoX, Hugging Face Llama), 'interleaved' pairs 2i with 2i + 1
  # (GPT-J, Meta's original Llama, llama.cpp's GGUF q/k layout).
  rotary_layout: str = 'half'
  norm_position: str = 'post'   # 'post' (paper) | 'pre' (GPT-2, modern)
  norm_type: str = 'layernorm'  # 'layernorm' | 'rmsnorm'
  norm_epsilon: float = 1e-6
  activation: str = 'relu'      # 'relu' (paper) | 'gelu' | 'swiglu'
  use_bias: bool = True         # biases in projections and LayerNorms (nanoGPT's bias)
  # Per-projection overrides of use_bias (None: use_bias). Llama: none;
  # Qwen2: qkv only; GPT-2: all.
  qkv_bias: bool | None = None  # query/key/value projections
  out_bias: bool | None = None  # attention output projection
  mlp_bias: bool | None = None  # feed-forward projections
  share_embeddings: bool = True  # one embedding for source and target tokens
  tie_output: bool = True       # logits = decoder output @ embedding^T
  # Tied logits in bf16/f16 compute: True, the logits matmul writes float32
  # (accumulated in f32). False, it writes the compute dtype and the loss
  # upcasts, as PyTorch autocast (nanoGPT's bf16) and MaxText's default do:
  # half the bytes for every pass over [tokens, vocab] (its effect on GPT-2
  # small's MFU: docs/performance/gpu.md). The untied projection always
  # writes the compute dtype.
  float32_logits: bool = True
  # Paper 3.4: embeddings multiplied by sqrt(d_model); initialised with std
  # d_model^-0.5 so the scaled inputs have unit variance. GPT-2: no scaling,
  # init std 0.02.
  scale_embeddings: bool = True
  # Kernel init. 'xavier': Xavier-uniform (the paper's T2T/flax default).
  # 'gpt2': GPT-2's N(0, 0.02) (as nanoGPT and HF GPT2Model), with the
  # projections that write into the residual stream (attention out, MLP wo)
  # at 0.02 / sqrt(2 * layers) and learned positions at 0.02.
  init: str = 'xavier'
  max_len: int = 256            # longest sequence (learned positions, KV cache)
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # parameters stay f32 for mixed precision
  attention_impl: str = 'xla'   # 'xla' einsum, or 'cudnn' fused kernel on GPUs
  # 'xla' causal self-attention in query blocks of this many rows, each
  # against the keys up to its own end: the masked upper triangle is skipped.
  # 0: one block (the full [q, s] matrix).
  attention_block: int = 0
  remat: bool = False           # rematerialise each layer in the backward pass
  deterministic: bool = True    # False in training: dropout on
  decode: bool = False          # True: one token per call with a KV cache

  def __post_init__(self):
    _check_choice('positions', self.positions, POSITIONS)
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('norm_type', self.norm_type, NORM_TYPES)
    _check_choice('activation', self.activation, ACTIVATIONS)
    _check_choice('dtype', self.dtype, DTYPES)
    _check_choice('param_dtype', self.param_dtype, DTYPES)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _check_choice('init', self.init, INITS)
    _check_choice('rotary_layout', self.rotary_layout, ROTARY_LAYOUTS)
    if self.num_kv_heads is not None and (
        self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      raise ValueError(f'TransformerConfig.num_kv_heads={self.num_kv_heads} '
                       f'must divide num_heads={self.num_heads}')
    if self.attention_block < 0:
      raise ValueError(f'TransformerConfig.attention_block must be >= 0 (0: '
                       f'no blocks), got {self.attention_block}')
    for name in ('vocab_size', 'd_model', 'num_heads', 'mlp_dim', 'max_len'):
      if getattr(self, name) <= 0:
        raise ValueError(f'TransformerConfig.{name} must be positive, got '
                         f'{getattr(self, name)}')
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f'TransformerConfig.d_model={self.d_model} is not divisible by '
          f'num_heads={self.num_heads}; choose a divisor or set head_dim')
    if self.positions == 'rotary' and self.head_dim_ % 2:
      raise ValueError(f'TransformerConfig.head_dim must be even for rotary '
                       f'positions, got {self.head_dim_}')
    if self.num_decoder_layers < 1 or self.num_encoder_layers < 0:
      raise ValueError('TransformerConfig needs num_decoder_layers >= 1 and '
                       'num_encoder_layers >= 0')
    for name in ('dropout_rate', 'attention_dropout_rate',
                 'activation_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'TransformerConfig.{name} must be in [0, 1), got '
                         f'{getattr(self, name)}')

  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def bias(self, which: str) -> bool:
    """Whether projection `which` (qkv, out, mlp) has a bias."""
    own = getattr(self, f'{which}_bias')
    return self.use_bias if own is None else own

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> 'TransformerConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'TransformerConfig.{field}={value!r} is not one of '
                     f'{", ".join(allowed)}')


def config_from_dict(d: dict[str, Any]) -> TransformerConfig:
  """Builds a config from a (possibly partial) dict; unknown keys are an error."""
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f'unknown TransformerConfig field(s) {", ".join(unknown)}; '
                     f'known fields: {", ".join(sorted(fields))}')
  return TransformerConfig(**d)


_LLAMA = dict(dropout_rate=0.0, positions='rotary', norm_position='pre',
              norm_type='rmsnorm', norm_epsilon=1e-5, activation='swiglu',
              use_bias=False, scale_embeddings=False, tie_output=True,
              init='gpt2')

# The paper's Table 3 sizes. Dropout 0.1 for base, 0.3 for big (EN-DE).
_PRESETS: dict[str, dict[str, Any]] = {
    'transformer_base': dict(
        d_model=512, num_heads=8, mlp_dim=2048, num_encoder_layers=6,
        num_decoder_layers=6, dropout_rate=0.1),
    'transformer_big': dict(
        d_model=1024, num_heads=16, mlp_dim=4096, num_encoder_layers=6,
        num_decoder_layers=6, dropout_rate=0.3),
    # GPT-2 small (124M with vocab 50,257): pre-LN, GELU, learned positions,
    # 1024 context, tied output embedding without scaling.
    'gpt2_small': dict(
        vocab_size=50257, d_model=768, num_heads=12, mlp_dim=3072,
        num_encoder_layers=0, num_decoder_layers=12, dropout_rate=0.0,
        positions='learned', norm_position='pre', activation='gelu',
        scale_embeddings=False, max_len=1024, norm_epsilon=1e-5),
    'gpt2_medium': dict(
        vocab_size=50257, d_model=1024, num_heads=16, mlp_dim=4096,
        num_encoder_layers=0, num_decoder_layers=24, dropout_rate=0.0,
        positions='learned', norm_position='pre', activation='gelu',
        scale_embeddings=False, max_len=1024, norm_epsilon=1e-5),
    # Llama-family shapes (pre-RMSNorm, SwiGLU, RoPE, grouped-query
    # attention, no biases). SmolLM2 (HuggingFaceTB): tied embeddings,
    # 49,152-piece byte-level BPE; `transflax import` reads the weights.
    'smollm2_135m': dict(
        vocab_size=49152, d_model=576, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, num_encoder_layers=0, num_decoder_layers=30,
        **_LLAMA, rotary_base=100000.0, max_len=8192),
    'smollm2_360m': dict(
        vocab_size=49152, d_model=960, num_heads=15, num_kv_heads=5,
        mlp_dim=2560, num_encoder_layers=0, num_decoder_layers=32,
        **_LLAMA, rotary_base=100000.0, max_len=8192),
    # Llama-3.2-1B's shape (1.24B parameters, tied). Its checkpoints also
    # rescale RoPE frequencies ("llama3" rope_scaling), which the import
    # refuses: this preset is for sizing and training from scratch.
    'llama3_2_1b': dict(
        vocab_size=128256, d_model=2048, num_heads=32, num_kv_heads=8,
        mlp_dim=8192, num_encoder_layers=0, num_decoder_layers=16,
        **_LLAMA, rotary_base=500000.0, max_len=131072),
    # Tiny configs for tests: seconds on a CPU.
    'tiny_encdec': dict(
        vocab_size=64, d_model=32, num_heads=4, mlp_dim=64,
        num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
        max_len=64),
    'tiny_lm': dict(
        vocab_size=64, d_model=32, num_heads=4, mlp_dim=64,
        num_encoder_layers=0, num_decoder_layers=2, dropout_rate=0.0,
        positions='learned', norm_position='pre', activation='gelu',
        scale_embeddings=False, max_len=64),
}


def get_preset(name: str, **overrides: Any) -> TransformerConfig:
  """A named preset with field overrides, e.g. get_preset('transformer_base', vocab_size=37000)."""
  if name not in _PRESETS:
    raise ValueError(f'unknown preset {name!r}; choose one of '
                     f'{", ".join(_PRESETS)}')
  return config_from_dict({**_PRESETS[name], **overrides})
