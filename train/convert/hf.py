"""Hugging Face model folders: config.json + *.safetensors (+ tokenizer).

`read(folder)` gives what an import needs; `write(folder, ...)` is the
export, which `transformers` loads with `from_pretrained(folder)`.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from data import chat
from data import tokenizer as tokenizers
from data.errors import UserError
from model import TransformerConfig, config_from_dict
from train.convert import layouts

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'GPT2LMHeadModel': 'gpt2'}


def read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: not valid JSON ({e})') from None


def _rope_theta(hf: dict, where: str) -> float:
  rope = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  kind = rope.get('rope_type') or scaling.get('rope_type') or scaling.get(
      'type') or 'default'
  if kind != 'default':
    raise UserError(f'{where}: rope scaling {kind!r} is not supported (only '
                    f'plain RoPE); field rope_scaling/rope_parameters')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def model_config(hf: dict, where: str) -> tuple[str, TransformerConfig]:
  """(family, our config) of a transformers config.json dict."""
  archs = hf.get('architectures') or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None:
    family = {'llama': 'llama', 'gpt2': 'gpt2'}.get(hf.get('model_type'))
  if family is None:
    raise UserError(f'{where}: architecture {archs or hf.get("model_type")} '
                    f'is not supported; transflax imports '
                    f'{", ".join(ARCHITECTURES)} (field "architectures")')

  def need(key):
    if key not in hf:
      raise UserError(f'{where}: field {key!r} is missing')
    return hf[key]

  if family == 'gpt2':
    act = hf.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
      raise UserError(f'{where}: activation_function {act!r} is not '
                      f'supported (GPT-2 uses gelu_new)')
    d = need('n_embd')
    fields = dict(
        vocab_size=need('vocab_size'), d_model=d, num_heads=need('n_head'),
        mlp_dim=hf.get('n_inner') or 4 * d, num_encoder_layers=0,
        num_decoder_layers=need('n_layer'), dropout_rate=0.0,
        positions='learned', norm_position='pre', norm_type='layernorm',
        norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-5)),
        activation='gelu', use_bias=True, scale_embeddings=False,
        tie_output=bool(hf.get('tie_word_embeddings', True)),
        max_len=need('n_positions'), init='gpt2')
  else:
    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise UserError(f'{where}: hidden_act {act!r} is not supported (Llama '
                      f'uses silu)')
    h = need('num_attention_heads')
    d = need('hidden_size')
    attention_bias = bool(hf.get('attention_bias', False))
    fields = dict(
        vocab_size=need('vocab_size'), d_model=d, num_heads=h,
        num_kv_heads=hf.get('num_key_value_heads') or h,
        head_dim=hf.get('head_dim') or d // h,
        mlp_dim=need('intermediate_size'), num_encoder_layers=0,
        num_decoder_layers=need('num_hidden_layers'), dropout_rate=0.0,
        positions='rotary', rotary_base=_rope_theta(hf, where),
        norm_position='pre', norm_type='rmsnorm',
        norm_epsilon=float(hf.get('rms_norm_eps', 1e-6)), activation='swiglu',
        use_bias=False, qkv_bias=attention_bias, out_bias=attention_bias,
        mlp_bias=bool(hf.get('mlp_bias', False)), scale_embeddings=False,
        tie_output=bool(hf.get('tie_word_embeddings', False)),
        max_len=hf.get('max_position_embeddings') or 2048, init='gpt2')
  try:
    return family, config_from_dict(fields)
  except ValueError as e:
    raise UserError(f'{where}: {e}') from None


def hf_config(family: str, cfg: TransformerConfig) -> dict:
  """The transformers config.json of our config (export)."""
  if family == 'gpt2':
    return {
        'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
        'vocab_size': cfg.vocab_size, 'n_embd': cfg.d_model,
        'n_head': cfg.num_heads, 'n_layer': cfg.num_decoder_layers,
        'n_positions': cfg.max_len, 'n_inner': cfg.mlp_dim,
        'activation_function': 'gelu_new',
        'layer_norm_epsilon': cfg.norm_epsilon,
        'tie_word_embeddings': cfg.tie_output, 'resid_pdrop': 0.0,
        'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'torch_dtype': 'float32'}
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
      'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_dim_,
      'num_hidden_layers': cfg.num_decoder_layers, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_epsilon,
      'rope_theta': cfg.rotary_base, 'attention_bias': cfg.bias('qkv'),
      'mlp_bias': cfg.bias('mlp'), 'tie_word_embeddings': cfg.tie_output,
      'torch_dtype': 'float32'}


def family_of(cfg: TransformerConfig) -> str:
  """Which HF layout our DecoderLM config can be written as, or a UserError."""
  if cfg.num_encoder_layers:
    raise UserError('export takes decoder-only models (DecoderLM); this is '
                    'an encoder-decoder')
  llama = dict(positions='rotary', norm_type='rmsnorm', activation='swiglu',
               norm_position='pre', scale_embeddings=False,
               rotary_layout='half')
  gpt2 = dict(positions='learned', norm_type='layernorm', activation='gelu',
              norm_position='pre', scale_embeddings=False, use_bias=True,
              qkv_bias=None, out_bias=None, mlp_bias=None, num_kv_heads=None)
  for family, want in (('llama', llama), ('gpt2', gpt2)):
    if all(getattr(cfg, k) == v for k, v in want.items()):
      if family == 'llama' and cfg.bias('qkv') != cfg.bias('out'):
        break
      return family
  raise UserError(
      'this model has neither the Llama layout (pre-RMSNorm, SwiGLU, rotary '
      'half, no embedding scale) nor the GPT-2 layout (pre-LayerNorm, GELU, '
      'learned positions, biases); export writes only those two')


def _safetensors_files(folder: str) -> list[str]:
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(folder, n) for n in names]
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise UserError(f'{folder}: no *.safetensors file (a PyTorch .bin '
                    f'checkpoint? save it again with safe_serialization=True)')
  return files


def read_tensors(folder: str):
  """get(name) -> np.ndarray over every safetensors shard (lazily)."""
  from safetensors import safe_open
  where = {}
  for path in _safetensors_files(folder):
    with safe_open(path, framework='numpy') as f:
      for name in f.keys():
        where[name] = path

  def get(name: str) -> np.ndarray:
    if name not in where:
      raise UserError(f'{folder}: tensor {name!r} is missing from the '
                      f'safetensors files')
    with safe_open(where[name], framework='numpy') as f:
      return f.get_tensor(name)
  return get, set(where)


def read_tokenizer(folder: str, vocab_size: int):
  """(BPETokenizer, ChatTemplate or None) from tokenizer.json (+ its
  tokenizer_config.json), or (None, None) when the folder has none."""
  path = os.path.join(folder, 'tokenizer.json')
  if not os.path.exists(path):
    return None, None
  with open(path, encoding='utf-8') as f:
    text = f.read()
  conf = {}
  conf_path = os.path.join(folder, 'tokenizer_config.json')
  if os.path.exists(conf_path):
    conf = read_json(conf_path)
  from tokenizers import Tokenizer as _HF
  try:
    hf_tok = _HF.from_str(text)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path}: not a tokenizers tokenizer.json ({e})') from None

  def special(key):
    value = conf.get(key)
    if isinstance(value, dict):
      value = value.get('content')
    return hf_tok.token_to_id(value) if value else None

  eos = special('eos_token')
  if eos is None:
    raise UserError(f'{conf_path}: no eos_token; the tokenizer needs one')
  tok = tokenizers.BPETokenizer(
      text, eos_id=eos, bos_id=special('bos_token'),
      pad_id=special('pad_token'), unk_id=special('unk_token'),
      add_bos=bool(conf.get('add_bos_token', False)), vocab_size=vocab_size,
      name=path)
  return tok, chat_template(conf.get('chat_template') or '', tok)


def chat_template(jinja: str, tok) -> chat.ChatTemplate | None:
  """Our ChatTemplate for a checkpoint's Jinja chat template: ChatML (with
  its default system turn, if it writes one) or None when it is another."""
  import re
  if '<|im_start|>' not in jinja or '<|im_end|>' not in jinja:
    return None
  if tok.piece_id('<|im_start|>') is None or tok.piece_id('<|im_end|>') is None:
    return None
  m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", jinja)
  # Literal text only: a capture holding Jinja code ("' + message..."),
  # a template that writes the caller's system turn, is not a default.
  default = (m.group(1) if m and not any(c in m.group(1) for c in "{}'+\"")
             else '')
  base = chat.TEMPLATES['chatml']
  return chat.ChatTemplate(base.name, base.header, base.end, base.separator,
                           default_system=default)


def jinja_template(template: chat.ChatTemplate) -> str:
  """transformers' Jinja chat template of our ChatTemplate."""
  def turn(role):
    piece, text = template.header[role]
    return (f"'{piece}{_escape(text)}' + message['content'] + "
            f"'{template.end}{_escape(template.separator)}'")
  system = ''
  if template.default_system:
    piece, text = template.header['system']
    system = (f"{{% if loop.first and messages[0]['role'] != 'system' %}}"
              f"{{{{ '{piece}{_escape(text)}{_escape(template.default_system)}"
              f"{template.end}{_escape(template.separator)}' }}}}"
              f"{{% endif %}}")
  body = ''.join(
      f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}"
      f"{{{{ {turn(role)} }}}}" for i, role in enumerate(template.header))
  piece, text = template.header['assistant']
  return (f"{{% for message in messages %}}{system}{body}{{% endif %}}"
          f"{{% endfor %}}{{% if add_generation_prompt %}}"
          f"{{{{ '{piece}{_escape(text)}' }}}}{{% endif %}}")


def _escape(text: str) -> str:
  return text.replace('\\', '\\\\').replace("'", "\\'").replace('\n', '\\n')


def write(folder: str, family: str, cfg: TransformerConfig, params: dict,
          tokenizer=None, template=None) -> list[str]:
  """Writes config.json + model.safetensors (+ tokenizer.json and
  tokenizer_config.json with the chat template); the files."""
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  tensors = layouts.to_hf(family, cfg, params)
  if family == 'gpt2' and cfg.tie_output:
    tensors.pop('lm_head.weight', None)
  conf = hf_config(family, cfg)
  written = []
  if isinstance(tokenizer, tokenizers.BPETokenizer):
    conf.update(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
                pad_token_id=tokenizer.pad_id)
    with open(os.path.join(folder, 'tokenizer.json'), 'w',
              encoding='utf-8') as f:
      f.write(tokenizer.tokenizer_json)
    token = lambda i: None if i is None else tokenizer.token(i)  # noqa: E731
    tok_conf = {'tokenizer_class': 'PreTrainedTokenizerFast',
                'eos_token': token(tokenizer.eos_id),
                'bos_token': token(tokenizer.bos_id),
                'pad_token': token(tokenizer.pad_id),
                'unk_token': token(tokenizer.unk_id),
                'add_bos_token': tokenizer.add_bos,
                'clean_up_tokenization_spaces': False}
    if template is not None:
      tok_conf['chat_template'] = jinja_template(template)
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
      json.dump(tok_conf, f, indent=2)
    written += ['tokenizer.json', 'tokenizer_config.json']
  weights = os.path.join(folder, 'model.safetensors')
  save_file(tensors, weights, metadata={'format': 'pt'})
  os.chmod(weights, 0o644)  # like the other files (it is written as 0600)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(conf, f, indent=2)
  return ['config.json', 'model.safetensors'] + written
