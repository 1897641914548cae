"""Hugging Face tensor names and layouts <-> transflax parameter paths.

Two families, each a table of (our path, HF name, to ours, to HF):

  llama  LlamaForCausalLM (SmolLM2, Llama 2/3, Qwen2-style biases): pre
         RMSNorm, SwiGLU, rotary ('half' layout), grouped-query attention.
  gpt2   GPT2LMHeadModel: pre LayerNorm, GELU (tanh), learned positions,
         biases everywhere, fused c_attn, Conv1D ([in, out]) weights.

HF linear weights are [out, in]; ours are [in, ...out] kernels with heads
split out: query_kernel [d, h, k], out_kernel [h, k, d]. A model's config
says which entries exist (biases, an untied output).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from model import TransformerConfig

Path = tuple[str, ...]
# (our path, HF name, HF array -> ours, ours -> HF array)
Entry = tuple[Path, str, Callable[[np.ndarray], np.ndarray],
              Callable[[np.ndarray], np.ndarray]]


def _same(x):
  return x


def _transpose(x):
  return np.ascontiguousarray(x.T)


def _norm(cfg: TransformerConfig) -> str:
  return 'RMSNorm_0' if cfg.norm_type == 'rmsnorm' else 'LayerNorm_0'


def llama_entries(cfg: TransformerConfig) -> list[Entry]:
  d, h, n, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim_
  norm = _norm(cfg)

  def heads_in(heads):  # HF [heads * k, d] -> ours [d, heads, k]
    return (lambda w: np.ascontiguousarray(w.T.reshape(d, heads, k)),
            lambda p: np.ascontiguousarray(p.reshape(d, heads * k).T))

  def heads_bias(heads):
    return (lambda b: b.reshape(heads, k), lambda p: p.reshape(heads * k))

  out = [
      (('embedding', 'embedding'), 'model.embed_tokens.weight', _same, _same),
      (('decoder', 'final_norm', norm, 'scale'), 'model.norm.weight', _same,
       _same),
  ]
  if not cfg.tie_output:
    out.append((('decoder', 'logits', 'kernel'), 'lm_head.weight', _transpose,
                _transpose))
  for i in range(cfg.num_decoder_layers):
    ours, hf = ('decoder', f'layer_{i}'), f'model.layers.{i}'
    attn = ours + ('self_attention',)
    out += [
        (ours + ('attention_block', 'norm', norm, 'scale'),
         f'{hf}.input_layernorm.weight', _same, _same),
        (ours + ('mlp_block', 'norm', norm, 'scale'),
         f'{hf}.post_attention_layernorm.weight', _same, _same),
        (attn + ('query_kernel',), f'{hf}.self_attn.q_proj.weight',
         *heads_in(h)),
        (attn + ('key_kernel',), f'{hf}.self_attn.k_proj.weight',
         *heads_in(n)),
        (attn + ('value_kernel',), f'{hf}.self_attn.v_proj.weight',
         *heads_in(n)),
        (attn + ('out_kernel',), f'{hf}.self_attn.o_proj.weight',
         lambda w: np.ascontiguousarray(w.T.reshape(h, k, d)),
         lambda p: np.ascontiguousarray(p.reshape(h * k, d).T)),
        (ours + ('mlp', 'wi_0', 'kernel'), f'{hf}.mlp.gate_proj.weight',
         _transpose, _transpose),
        (ours + ('mlp', 'wi_1', 'kernel'), f'{hf}.mlp.up_proj.weight',
         _transpose, _transpose),
        (ours + ('mlp', 'wo', 'kernel'), f'{hf}.mlp.down_proj.weight',
         _transpose, _transpose),
    ]
    if cfg.bias('qkv'):
      for name, proj, heads in (('query', 'q', h), ('key', 'k', n),
                                ('value', 'v', n)):
        out.append((attn + (f'{name}_bias',),
                    f'{hf}.self_attn.{proj}_proj.bias', *heads_bias(heads)))
    if cfg.bias('out'):
      out.append((attn + ('out_bias',), f'{hf}.self_attn.o_proj.bias', _same,
                  _same))
    if cfg.bias('mlp'):
      for ours_name, hf_name in (('wi_0', 'gate_proj'), ('wi_1', 'up_proj'),
                                 ('wo', 'down_proj')):
        out.append((ours + ('mlp', ours_name, 'bias'),
                    f'{hf}.mlp.{hf_name}.bias', _same, _same))
  return out


def gpt2_entries(cfg: TransformerConfig) -> list[Entry]:
  """GPT-2's fused c_attn [d, 3d] is split into query/key/value here; the
  inverse (export) is `gpt2_fuse`."""
  d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim_
  norm = _norm(cfg)
  out = [
      (('embedding', 'embedding'), 'transformer.wte.weight', _same, _same),
      (('decoder', 'decoder_positions', 'pos_embedding'),
       'transformer.wpe.weight', _same, _same),
  ]
  for part in ('scale', 'bias'):
    hf_part = 'weight' if part == 'scale' else 'bias'
    out.append((('decoder', 'final_norm', norm, part),
                f'transformer.ln_f.{hf_part}', _same, _same))
  if not cfg.tie_output:
    out.append((('decoder', 'logits', 'kernel'), 'lm_head.weight', _transpose,
                _transpose))
  for i in range(cfg.num_decoder_layers):
    ours, hf = ('decoder', f'layer_{i}'), f'transformer.h.{i}'
    attn = ours + ('self_attention',)
    for part in ('scale', 'bias'):
      hf_part = 'weight' if part == 'scale' else 'bias'
      out += [(ours + ('attention_block', 'norm', norm, part),
               f'{hf}.ln_1.{hf_part}', _same, _same),
              (ours + ('mlp_block', 'norm', norm, part),
               f'{hf}.ln_2.{hf_part}', _same, _same)]
    for j, name in enumerate(('query', 'key', 'value')):
      out += [
          (attn + (f'{name}_kernel',), f'{hf}.attn.c_attn.weight#{j}',
           lambda w, j=j: np.ascontiguousarray(
               w[:, j * d:(j + 1) * d].reshape(d, h, k)), None),
          (attn + (f'{name}_bias',), f'{hf}.attn.c_attn.bias#{j}',
           lambda b, j=j: b[j * d:(j + 1) * d].reshape(h, k), None)]
    out += [
        (attn + ('out_kernel',), f'{hf}.attn.c_proj.weight',
         lambda w: w.reshape(h, k, d), lambda p: p.reshape(h * k, d)),
        (attn + ('out_bias',), f'{hf}.attn.c_proj.bias', _same, _same),
        (ours + ('mlp', 'wi', 'kernel'), f'{hf}.mlp.c_fc.weight', _same,
         _same),
        (ours + ('mlp', 'wi', 'bias'), f'{hf}.mlp.c_fc.bias', _same, _same),
        (ours + ('mlp', 'wo', 'kernel'), f'{hf}.mlp.c_proj.weight', _same,
         _same),
        (ours + ('mlp', 'wo', 'bias'), f'{hf}.mlp.c_proj.bias', _same, _same),
    ]
  return out


def entries(family: str, cfg: TransformerConfig) -> list[Entry]:
  return {'llama': llama_entries, 'gpt2': gpt2_entries}[family](cfg)


def source_names(family: str, cfg: TransformerConfig) -> dict[str, str]:
  """Our parameter path ('a/b/c') -> the HF tensor it is made from."""
  return {'/'.join(path): name.split('#')[0]
          for path, name, _, _ in entries(family, cfg)}


def hf_names(family: str, cfg: TransformerConfig) -> set[str]:
  """The HF tensors the table reads."""
  return {name.split('#')[0] for _, name, _, _ in entries(family, cfg)}


# Tensors a checkpoint may hold that carry no parameter: GPT-2's causal-mask
# buffers, rotary frequency caches of older transformers.
BUFFERS = re.compile(r'.*(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$')


def to_ours(family: str, cfg: TransformerConfig, get: Callable[[str], np.ndarray]
            ) -> dict:
  """Our nested params dict (float32 numpy) from `get(hf_name)`, which
  raises a UserError naming a missing tensor. 'NAME#j' is part j of a fused
  tensor NAME."""
  from data.errors import UserError
  params: dict = {}
  for path, name, to, _ in entries(family, cfg):
    raw = np.asarray(get(name.split('#')[0]), np.float32)
    try:
      value = to(raw)
    except ValueError:
      raise UserError(f'tensor {name.split("#")[0]!r} has shape {raw.shape}, '
                      f'which does not fit the model its config describes') from None
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return params


def to_hf(family: str, cfg: TransformerConfig, params: dict
          ) -> dict[str, np.ndarray]:
  """HF tensors (float32) by name from our nested params (numpy)."""
  def get(path):
    node = params
    for key in path:
      node = node[key]
    return np.asarray(node, np.float32)

  out, fused = {}, {}
  for path, name, _, back in entries(family, cfg):
    if '#' in name:  # GPT-2's c_attn: concatenated along the output axis
      base, j = name.split('#')
      x = get(path)
      fused.setdefault(base, {})[int(j)] = x.reshape(x.shape[0], -1) if (
          x.ndim == 3) else x.reshape(-1)
      continue
    out[name] = np.ascontiguousarray(back(get(path)))
  for base, parts in fused.items():
    out[base] = np.concatenate([parts[j] for j in range(3)], axis=-1)
  return out
