"""Decode speed of an imported model, side by side with `transformers`.

  python -m train.bench_decode --workdir runs/smollm2 \
      --reference ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf

The same chat prompt at batch 1 and 16, greedy, exactly --new_tokens new
tokens per row (no early stop), prefill included, timed after one untimed
run that compiles (ours) or warms up (PyTorch). The reference is
transformers' `generate` on the same weights (a GGUF file, or an HF folder),
in float32 with torch's default threads. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import time



def _ours(workdir: str, context: list[int], batch: int, new: int,
          repeats: int) -> float:
  from train import runs, sampling
  run, params = runs.load(workdir)
  contexts = [context] * batch
  sampling.generate_ids(run, params, contexts, max_new_tokens=new, eos_id=-1)
  start = time.perf_counter()
  for _ in range(repeats):
    out = sampling.generate_ids(run, params, contexts, max_new_tokens=new,
                                eos_id=-1)
  seconds = (time.perf_counter() - start) / repeats
  assert all(len(o) == new for o in out)
  return batch * new / seconds


def _reference(path: str, context: list[int], batch: int, new: int,
               repeats: int) -> float:
  import torch
  import transformers
  kwargs = {'dtype': torch.float32}
  if path.endswith('.gguf'):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) or '.', gguf_file=os.path.basename(path),
        **kwargs)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
  model.eval()
  ids = torch.tensor([context] * batch)

  def go():
    with torch.no_grad():
      return model.generate(ids, attention_mask=torch.ones_like(ids),
                            max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0)
  go()
  start = time.perf_counter()
  for _ in range(repeats):
    out = go()
  seconds = (time.perf_counter() - start) / repeats
  assert out.shape[1] == len(context) + new
  return batch * new / seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--reference', default='', help='GGUF file or HF folder')
  p.add_argument('--prompt', default='What is the capital of France?')
  p.add_argument('--batches', default='1,16')
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--only', choices=('ours', 'reference', 'both'),
                 default='both')
  a = p.parse_args()
  from data import chat
  from data import tokenizer as tokenizers
  from train.tasks import base
  tok = tokenizers.load(os.path.join(a.workdir, base.TOKENIZER_FILE))
  template = chat.load_template(a.workdir, '', tok, save=False)
  messages = [{'role': 'user', 'content': a.prompt}]
  context = (template.prompt(tok, messages) if template
             else tok.encode(a.prompt, add_eos=False))
  for batch in [int(b) for b in a.batches.split(',')]:
    row = {'batch': batch, 'new_tokens': a.new_tokens,
           'prompt_tokens': len(context)}
    if a.only in ('ours', 'both'):
      row['transflax_tokens_per_sec'] = round(
          _ours(a.workdir, context, batch, a.new_tokens, a.repeats), 1)
    if a.reference and a.only in ('reference', 'both'):
      row['transformers_tokens_per_sec'] = round(
          _reference(a.reference, context, batch, a.new_tokens, a.repeats), 1)
    if len(row) == 5:
      row['ratio'] = round(row['transflax_tokens_per_sec']
                           / row['transformers_tokens_per_sec'], 2)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
