"""Pretrained checkpoints in and out: `transflax import` and `transflax export`.

  transflax import --from SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2
  transflax import --from path/to/hf_model_folder --workdir runs/llama
  transflax export --workdir runs/smollm2 --to exported/

An import writes an ordinary workdir: config.json (task lm, the model's
TransformerConfig), the tokenizer (BPETokenizer), its chat template when the
checkpoint has a ChatML one, and an Orbax checkpoint at step 0 (the
parameters, in float32, and a fresh optimizer state). `generate`, `eval`,
`export` and `train.init_from` take it like any trained run. Export writes
the Hugging Face layout (config.json + model.safetensors, and tokenizer.json
for imported tokenizers) that `transformers` loads: Llama and GPT-2 layouts.
Formats: GGUF (llama architecture, any type the gguf package dequantises)
and Hugging Face folders (LlamaForCausalLM, GPT2LMHeadModel; sharded or
not). Anything else is one UserError naming the field or tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from data import chat, sources
from data.errors import UserError
from train.convert import gguf as gguf_lib
from train.convert import hf as hf_lib
from train.convert import layouts


def read(path: str):
  """(family, TransformerConfig, params numpy tree, tokenizer or None,
  ChatTemplate or None, report lines) of a GGUF file or an HF folder."""
  if not os.path.exists(path):
    raise UserError(f'--from {path}: no such file or folder')
  report = []
  if os.path.isdir(path):
    conf_path = os.path.join(path, 'config.json')
    if not os.path.exists(conf_path):
      raise UserError(f'{path}: no config.json; --from takes a Hugging Face '
                      f'model folder or a .gguf file')
    family, cfg = hf_lib.model_config(hf_lib.read_json(conf_path), conf_path)
    get, names = hf_lib.read_tensors(path)
    tok, template = hf_lib.read_tokenizer(path, cfg.vocab_size)
    report.append(f'{path}: Hugging Face {family} folder')
  else:
    g = gguf_lib.GGUF(path)
    cfg, family = g.model_config(), 'llama'
    get = g.tensor_getter(cfg)
    names = g.hf_names(cfg)
    tok, template = g.tokenizer(cfg.vocab_size)
  # A tensor the model does not read is refused, never dropped unseen.
  unused = sorted(n for n in names - layouts.hf_names(family, cfg)
                  if not layouts.BUFFERS.match(n)
                  and not (n == 'lm_head.weight' and cfg.tie_output))
  if unused:
    raise UserError(f'{path}: tensor {unused[0]!r} (and {len(unused) - 1} '
                    f'more) has no place in a {family} model with this '
                    f'config; transflax does not import it')
    for kind, names in sorted(g.quantization().items()):
      shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
      what = 'dequantised to float32' if kind not in ('F32',) else 'as is'
      report.append(f'{len(names)} tensors in {kind} ({what}): {shown}')
  params = layouts.to_ours(family, cfg, get)
  return family, cfg, params, tok, template, report


def import_checkpoint(src: str, workdir: str) -> dict:
  """Converts `src` into a new workdir; returns a summary (JSON-able)."""
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, 'checkpoints')) or os.path.exists(
      os.path.join(workdir, 'config.json')):
    raise UserError(f'--workdir {workdir} already holds a run; import into '
                    f'a new directory')
  family, cfg, params, tok, template, report = read(src)
  if tok is None:
    raise UserError(f'{src}: no tokenizer (tokenizer.json) beside the model; '
                    f'transflax needs one to make a workdir')
  for line in report:
    print(line, flush=True)
  created = not os.path.exists(workdir)
  try:
    return _write_workdir(src, workdir, family, cfg, params, tok, template,
                          start)
  except BaseException:
    if created:  # a failed import leaves nothing that looks like a run
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _write_workdir(src, workdir, family, cfg, params, tok, template, start):
  from experiments import defaults
  from train import loop, state as state_lib
  from train.tasks import base
  os.makedirs(workdir, exist_ok=True)
  tok.save(os.path.join(workdir, base.TOKENIZER_FILE))
  if template is not None:
    sources.write_atomic(os.path.join(workdir, chat.TEMPLATE_FILE),
                         json.dumps(template.to_json(), indent=2).encode())
  config = defaults.get_config('gpt2_small')
  config.task = 'lm'
  # `transflax eval` of the import: perplexity on Tiny Shakespeare's val
  # split (../shared/data), one line per document; any other text with
  # train.init_from into an lm run with data.corpus=text.
  config.data.corpus = 'tinyshakespeare'
  config.data.seq_len = 512
  config.train.eval_batch_size = 8
  config.data.chat_template = template.name if template else ''
  config.model.update(cfg.to_dict())
  config.train.num_steps = 0
  config.train.label_smoothing = 0.0
  config.sample.prompt = ''
  config.sample.temperature = 0.0
  config.sample.max_new_tokens = 64
  config.imported_from = os.path.abspath(src)
  run = loop.Run(config, workdir)
  try:
    loop.write_config(config, workdir, run.model_config)
    abstract = run.abstract_state
    flat = _flatten(params)
    for (path, a) in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
      key = _key(path)
      if key not in flat:
        raise UserError(f'{src}: no tensor for parameter {key}')
      if tuple(flat[key].shape) != tuple(a.shape):
        name = layouts.source_names(family, cfg).get(key, key)
        raise UserError(f'{src}: tensor {name!r} has the wrong shape for '
                        f'the model its config describes (parameter {key}: '
                        f'{tuple(flat[key].shape)} instead of '
                        f'{tuple(a.shape)})')
    placed = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.device_put(
            np.asarray(flat[_key(p)], a.dtype), a.sharding), abstract.params)
    opt_state = jax.jit(run.tx.init,
                        out_shardings=run.shardings.opt_state)(placed)
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=placed, opt_state=opt_state,
        rng=jax.random.PRNGKey(config.train.seed), tx=run.tx)
    run.ckpt.save(0, state, data_state=None,
                  meta={**run.meta, 'imported_from': os.path.abspath(src)})
    run.ckpt.wait()
  finally:
    run.ckpt.close()
  seconds = time.perf_counter() - start
  return {'workdir': workdir, 'family': family,
          'parameters': int(sum(np.size(v) for v in flat.values())),
          'chat_template': template.name if template else None,
          'vocab_size': cfg.vocab_size, 'seconds': round(seconds, 1)}


def export_checkpoint(workdir: str, dst: str, which: str | None = None) -> dict:
  """Writes the workdir's DecoderLM as a Hugging Face folder `dst`."""
  from train import runs
  from model import DecoderLM
  if os.path.exists(dst) and os.listdir(dst):
    raise UserError(f'--to {dst} already exists and is not empty; export '
                    f'into a new folder (it would overwrite config.json)')
  run, params = runs.load(workdir, which)
  if run.task.module_class is not DecoderLM:
    raise UserError(f'{workdir} holds a {run.config.task!r} model; export '
                    f'writes decoder-only language models (tasks lm, sft, dpo)')
  cfg = run.model_config
  try:
    family = hf_lib.family_of(cfg)
  except UserError as e:
    raise UserError(f'{workdir}: {e}. Train with those layouts (e.g. '
                    f'experiments/llama.py, experiments/gpt2.py) to export') from None
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32),
                      params)
  tok = run.task.tokenizer
  template = getattr(run.task, 'chat_template', None)
  if template is None and os.path.exists(os.path.join(workdir,
                                                      chat.TEMPLATE_FILE)):
    template = chat.load_template(workdir, '', tok, save=False)
  files = hf_lib.write(dst, family, cfg, host, tok, template)
  return {'to': os.path.abspath(dst), 'family': family, 'files': files}


def _key(path) -> str:
  return '/'.join(getattr(k, 'key', str(k)) for k in path)


def _flatten(tree, prefix=()) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out['/'.join(prefix + (k,))] = v
  return out


