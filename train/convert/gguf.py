"""GGUF files (llama.cpp): a Llama-architecture model, its tokenizer and
chat template, dequantised to float32 through the `gguf` package.

llama.cpp stores the q and k projections of Llama models permuted for
rotary on interleaved feature pairs; `read` undoes that, so the weights are
Hugging Face's (rotary 'half' layout) and the same tables (layouts.py) map
them onto ours.
"""

from __future__ import annotations

import collections

import numpy as np

from data import tokenizer as tokenizers
from data.errors import UserError
from model import TransformerConfig, config_from_dict
from train.convert import hf as hf_lib

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre values whose text splitting we reproduce.
PRE_TOKENIZERS = ('default', 'gpt2', 'smollm', 'llama-bpe', 'llama3')
# GGUF tensor name -> Hugging Face Llama name ({i}: the layer).
_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
    'blk.{i}.attn_norm.weight': 'model.layers.{i}.input_layernorm.weight',
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.attn_q.weight': 'model.layers.{i}.self_attn.q_proj.weight',
    'blk.{i}.attn_k.weight': 'model.layers.{i}.self_attn.k_proj.weight',
    'blk.{i}.attn_v.weight': 'model.layers.{i}.self_attn.v_proj.weight',
    'blk.{i}.attn_output.weight': 'model.layers.{i}.self_attn.o_proj.weight',
    'blk.{i}.ffn_gate.weight': 'model.layers.{i}.mlp.gate_proj.weight',
    'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.up_proj.weight',
    'blk.{i}.ffn_down.weight': 'model.layers.{i}.mlp.down_proj.weight',
}


class GGUF:
  """One GGUF file: metadata fields, tensors by Hugging Face name."""

  def __init__(self, path: str):
    import gguf
    self.path = path
    try:
      self._reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
      raise UserError(f'{path}: not a readable GGUF file ({e})') from None
    self.fields = self._reader.fields
    self._tensors = {t.name: t for t in self._reader.tensors}

  def get(self, key: str, default=None):
    field = self.fields.get(key)
    return default if field is None else field.contents()

  def need(self, key: str):
    value = self.get(key)
    if value is None:
      raise UserError(f'{self.path}: metadata field {key!r} is missing')
    return value

  # -- model ---------------------------------------------------------------
  def model_config(self) -> TransformerConfig:
    arch = self.need('general.architecture')
    if arch != 'llama':
      raise UserError(f'{self.path}: general.architecture={arch!r} is not '
                      f'supported; transflax imports GGUF llama models')
    scaling = self.get(f'{arch}.rope.scaling.type')
    if scaling not in (None, 'none'):
      raise UserError(f'{self.path}: {arch}.rope.scaling.type={scaling!r} is '
                      f'not supported (only plain RoPE)')
    p = lambda k: self.need(f'{arch}.{k}')  # noqa: E731
    d, h = int(p('embedding_length')), int(p('attention.head_count'))
    if 'rope_freqs.weight' in self._tensors:
      raise UserError(f'{self.path}: tensor rope_freqs.weight (Llama 3.1+ '
                      f'RoPE frequency scaling) is not supported (only plain '
                      f'RoPE)')
    vocab = int(self.get(f'{arch}.vocab_size') or
                len(self.need('tokenizer.ggml.tokens')))
    fields = dict(
        vocab_size=vocab, d_model=d, num_heads=h,
        num_kv_heads=int(self.get(f'{arch}.attention.head_count_kv') or h),
        head_dim=int(self.get(f'{arch}.rope.dimension_count') or d // h),
        mlp_dim=int(p('feed_forward_length')), num_encoder_layers=0,
        num_decoder_layers=int(p('block_count')), dropout_rate=0.0,
        positions='rotary',
        rotary_base=float(self.get(f'{arch}.rope.freq_base') or 10000.0),
        norm_position='pre', norm_type='rmsnorm',
        norm_epsilon=float(p('attention.layer_norm_rms_epsilon')),
        activation='swiglu', use_bias=False, scale_embeddings=False,
        tie_output='output.weight' not in self._tensors,
        max_len=int(self.get(f'{arch}.context_length') or 2048), init='gpt2')
    try:
      return config_from_dict(fields)
    except ValueError as e:
      raise UserError(f'{self.path}: {e}') from None

  def quantization(self) -> dict[str, list[str]]:
    """Tensor type name -> the tensors stored in it."""
    out = collections.defaultdict(list)
    for name, t in self._tensors.items():
      out[t.tensor_type.name].append(name)
    return dict(out)

  def hf_names(self, cfg: TransformerConfig) -> set[str]:
    """The file's tensors by Hugging Face name (unknown ones as they are)."""
    table = self._hf_to_gguf(cfg)
    back = {g: h for h, g in table.items()}
    return {back.get(name, name) for name in self._tensors}

  def _hf_to_gguf(self, cfg: TransformerConfig) -> dict[str, str]:
    out = {}
    for g, h in _NAMES.items():
      if '{i}' in g:
        for i in range(cfg.num_decoder_layers):
          out[h.format(i=i)] = g.format(i=i)
      else:
        out[h] = g
    return out

  def tensor_getter(self, cfg: TransformerConfig):
    """get(HF name) -> float32 array, dequantised, q/k un-permuted."""
    import gguf
    hf_to_gguf = self._hf_to_gguf(cfg)

    def get(name: str) -> np.ndarray:
      g = hf_to_gguf.get(name)
      t = self._tensors.get(g) if g else None
      if t is None:
        raise UserError(f'{self.path}: tensor {g or name!r} is missing')
      try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
      except (NotImplementedError, ValueError, KeyError) as e:
        raise UserError(f'{self.path}: tensor {g!r} is stored as '
                        f'{t.tensor_type.name}, which the gguf package cannot '
                        f'dequantise ({e})') from None
      w = np.asarray(w, np.float32).reshape(
          tuple(int(n) for n in reversed(t.shape)))
      if g.endswith('attn_q.weight'):
        w = _unpermute(w, cfg.num_heads)
      elif g.endswith('attn_k.weight'):
        w = _unpermute(w, cfg.kv_heads)
      return w
    return get

  # -- tokenizer -------------------------------------------------------------
  def tokenizer(self, vocab_size: int):
    """(BPETokenizer, ChatTemplate or None) from the tokenizer.ggml fields."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,
                            pre_tokenizers)
    kind = self.need('tokenizer.ggml.model')
    if kind != 'gpt2':
      raise UserError(f'{self.path}: tokenizer.ggml.model={kind!r} is not '
                      f'supported; transflax imports byte-level BPE (gpt2)')
    pre = self.get('tokenizer.ggml.pre') or 'default'
    if pre not in PRE_TOKENIZERS:
      raise UserError(f'{self.path}: tokenizer.ggml.pre={pre!r} is not '
                      f'supported; known: {", ".join(PRE_TOKENIZERS)}')
    tokens = list(self.need('tokenizer.ggml.tokens'))
    merges = [tuple(m.split(' ', 1)) for m in self.need('tokenizer.ggml.merges')]
    types = list(self.get('tokenizer.ggml.token_type') or [])
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=merges, fuse_unk=False))
    if pre == 'smollm':  # SmolLM2's tokenizer.json: digits one by one
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ('llama-bpe', 'llama3'):
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior='isolated'),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == 4]
    if control:
      tok.add_special_tokens(control)
    if user:
      tok.add_tokens(user)
    ident = lambda k: self.get(f'tokenizer.ggml.{k}')  # noqa: E731
    eos = ident('eos_token_id')
    if eos is None:
      raise UserError(f'{self.path}: tokenizer.ggml.eos_token_id is missing')
    bpe = tokenizers.BPETokenizer(
        tok.to_str(), eos_id=int(eos),
        bos_id=None if ident('bos_token_id') is None else int(ident('bos_token_id')),
        pad_id=None if ident('padding_token_id') is None
        else int(ident('padding_token_id')),
        unk_id=None if ident('unknown_token_id') is None
        else int(ident('unknown_token_id')),
        add_bos=bool(ident('add_bos_token')), vocab_size=vocab_size,
        name=self.path)
    template = hf_lib.chat_template(self.get('tokenizer.chat_template') or '',
                                    bpe)
    return bpe, template


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order (rotary pairs interleaved) -> Hugging Face's
  (pairs split in halves): the inverse of convert_hf_to_gguf's permute."""
  rows = w.shape[0]
  return np.ascontiguousarray(
      w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
      .swapaxes(1, 2).reshape(w.shape))
