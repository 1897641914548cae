"""Imported checkpoints equal their reference implementation (`transformers`).

Tiny randomly initialised LlamaForCausalLM (grouped-query, tied and untied)
and GPT2LMHeadModel, built from configs with no download and saved with
save_pretrained, are imported with `transflax import`: logits equal
PyTorch's (float32, max abs diff <= 1e-4), cached decoding equals full
decoding, and export -> transformers gives the same logits again. The real
SmolLM2-135M-Instruct GGUF: greedy chat replies equal transformers' on the
same file, and so does the tokenizer on Multi30k and chitchat lines.
"""

import gzip
import json
import os
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from data import chat  # noqa: E402
from data import tokenizer as tokenizers  # noqa: E402
from data.errors import UserError  # noqa: E402
from train import convert, runs, sampling  # noqa: E402
import corpora  # noqa: E402  (tests/ is on sys.path, as for every test module)
import tiny_run  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + "
          "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
VOCAB = 320
GGUF = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' / (
    'SmolLM2-135M-Instruct.Q4_1.gguf')


def _tokenizer_files(folder: pathlib.Path) -> None:
  """A byte-level BPE tokenizer.json (trained here on a few lines) with
  ChatML's special tokens, and its tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>',
                                      '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(['A man rides a horse.', 'Two dogs play in snow.',
                           'What is the capital of France?'] * 20, trainer)
  tok.save(str(folder / 'tokenizer.json'))
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': '<|im_end|>', 'bos_token': '<|im_start|>',
       'pad_token': '<|im_end|>', 'chat_template': CHATML}))


def _reference(kind: str, folder: pathlib.Path):
  torch.manual_seed(0)
  if kind == 'gpt2':
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=kind == 'llama-tied')
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # random norms and biases too, so every one counts
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'ln_' in name:
        p.copy_(1 + 0.1 * torch.randn_like(p) if 'weight' in name
                else 0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder)
  _tokenizer_files(folder)
  return model


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _ours(workdir: str, tokens: np.ndarray) -> np.ndarray:
  run, params = runs.load(workdir)
  return np.asarray(run.task.module().apply({'params': params}, tokens))


@pytest.fixture(scope='module', params=['llama-gqa', 'llama-tied', 'gpt2'])
def imported(request, tmp_path_factory):
  base = tmp_path_factory.mktemp(request.param)
  model = _reference(request.param, base / 'hf')
  summary = convert.import_checkpoint(str(base / 'hf'), str(base / 'run'))
  return request.param, model, base, summary


def test_imported_logits_equal_transformers(imported):
  kind, model, base, summary = imported
  assert summary['family'] == ('gpt2' if kind == 'gpt2' else 'llama')
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 17))
  diff = np.abs(_ours(str(base / 'run'), tokens) - _torch_logits(model, tokens))
  assert diff.max() <= 1e-4, diff.max()


def test_imported_cached_decoding_equals_full(imported):
  """Greedy continuations through prefill + KV cache, two prompts of
  different lengths in one left-padded batch, equal the argmax of full
  forward passes one token at a time."""
  _, _, base, _ = imported
  run, params = runs.load(str(base / 'run'))
  # Causal: the logits at position t ignore what follows, so one jitted
  # forward over a fixed-length row serves every prefix.
  full = jax.jit(run.task.module().apply)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 9)]
  got = sampling.generate_ids(run, params, prompts, max_new_tokens=8,
                              eos_id=-1)
  for prompt, new in zip(prompts, got):
    ids = list(prompt)
    for _ in range(8):
      row = np.zeros((1, 17), np.int32)
      row[0, :len(ids)] = ids
      logits = full({'params': params}, row)
      ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    assert new == ids[len(prompt):]


def test_export_loads_in_transformers_with_the_same_logits(imported,
                                                           tmp_path):
  kind, model, base, _ = imported
  out = tmp_path / 'exported'
  if kind == 'llama-gqa':  # the command once; the others in-process
    result = tiny_run.cli('export', f'--workdir={base / "run"}', f'--to={out}')
    assert result.returncode == 0, result.stderr[-2000:]
  else:
    convert.export_checkpoint(str(base / 'run'), str(out))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  assert type(loaded) is type(model)
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 11))
  diff = np.abs(_torch_logits(loaded, tokens) - _torch_logits(model, tokens))
  assert diff.max() <= 1e-5, diff.max()
  # The tokenizer and its chat template travel too.
  ours = runs.load(str(base / 'run'))[0].task.tokenizer
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  text = 'A man rides a horse, 2 dogs play.'
  assert theirs.encode(text, add_special_tokens=False) == ours.encode(
      text, add_eos=False)
  assert theirs.eos_token_id == ours.eos_id
  messages = [{'role': 'user', 'content': 'Hi!'},
              {'role': 'assistant', 'content': 'Hello.'}]
  template = chat.load_template(str(base / 'run'), '', ours, save=False)
  rendered = theirs.apply_chat_template(messages, tokenize=False)
  assert theirs(rendered, add_special_tokens=False)['input_ids'] == (
      template.render(ours, messages)[0])


def test_imported_chat_template_renders_like_transformers(imported):
  kind, _, base, _ = imported
  if kind == 'gpt2':
    pytest.skip('one family is enough')
  run, _ = runs.load(str(base / 'run'))
  tok = run.task.tokenizer
  template = chat.load_template(str(base / 'run'), '', tok, save=False)
  messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
  ref = transformers.AutoTokenizer.from_pretrained(base / 'hf')
  text = ref.apply_chat_template(messages, tokenize=False)
  want = ref(text, add_special_tokens=False)['input_ids']
  assert template.render(tok, messages)[0] == list(want)


# -- bad input -------------------------------------------------------------


def test_unsupported_architecture_and_missing_tensor_are_one_error(tmp_path):
  folder = tmp_path / 'hf'
  _reference('llama-gqa', folder)
  conf = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(
      {**conf, 'architectures': ['BertForMaskedLM'], 'model_type': 'bert'}))
  with pytest.raises(UserError, match='BertForMaskedLM.*not supported'):
    convert.import_checkpoint(str(folder), str(tmp_path / 'a'))
  (folder / 'config.json').write_text(json.dumps(conf))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(folder / 'model.safetensors')
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(UserError, match="'model.layers.1.mlp.up_proj.weight' "
                     "is missing"):
    convert.import_checkpoint(str(folder), str(tmp_path / 'b'))
  assert not (tmp_path / 'b').exists()  # nothing half-written is left
  tensors['model.layers.1.mlp.up_proj.weight'] = np.zeros((96, 40), np.float32)
  save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(UserError, match="'model.layers.1.mlp.up_proj.weight' "
                     "has the wrong shape"):
    convert.import_checkpoint(str(folder), str(tmp_path / 'b'))
  tensors['model.layers.1.mlp.up_proj.weight'] = np.zeros((96, 48), np.float32)
  tensors['model.rope_freqs.weight'] = np.zeros((4,), np.float32)
  save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(UserError, match="'model.rope_freqs.weight' .* has no "
                     "place"):
    convert.import_checkpoint(str(folder), str(tmp_path / 'b'))
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='already exists and is not empty'):
    convert.export_checkpoint(str(tmp_path / 'b'), str(tmp_path / 'taken'))
  result = tiny_run.cli('import', f'--from={tmp_path / "nothing.gguf"}',
                        f'--workdir={tmp_path / "c"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: --from {tmp_path / "nothing.gguf"}: no such file or folder')


# -- the real SmolLM2-135M-Instruct GGUF ---------------------------------------

PROMPTS = ['What is the capital of France?', 'Name three colours.',
           'Write a haiku about the sea.']
NEW_TOKENS = 16


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  if not GGUF.exists():
    corpora.missing(str(GGUF))
  workdir = tmp_path_factory.mktemp('smollm2') / 'run'
  convert.import_checkpoint(str(GGUF), str(workdir))
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent,
                                                       gguf_file=GGUF.name)
  return workdir, ref, ref_tok


@pytest.mark.benchmark
def test_smollm2_greedy_chat_equals_transformers(smollm2):
  """`transflax generate --chat` (one prompt, the CLI) and a batch of chat
  prompts of different lengths (left-padded prefill) give transformers'
  greedy tokens on the same GGUF file; logits agree to 3e-4. Why that
  much: transformers' own float32 logits differ from its float64 ones by
  up to 9.3e-5 on these prompts (logits up to ~38, 30 layers), and ours by
  9.5e-5; two float32 sums in different orders may each be that far off,
  in opposite directions (measured between the two: 1.1e-4)."""
  workdir, ref, _ = smollm2
  run, params = runs.load(str(workdir))
  tok = run.task.tokenizer
  template = chat.load_template(str(workdir), '', tok, save=False)
  contexts = [template.prompt(tok, [{'role': 'user', 'content': p}])
              for p in PROMPTS]
  # The template read from the GGUF renders as transformers renders the
  # file's own Jinja template (default system turn included).
  ref_tok = smollm2[2]
  text = ref_tok.apply_chat_template([{'role': 'user', 'content': PROMPTS[0]}],
                                     tokenize=False, add_generation_prompt=True)
  assert ref_tok(text, add_special_tokens=False)['input_ids'] == contexts[0]
  end = template.end_id(tok)
  ours = sampling.generate_ids(
      run, params, contexts, max_new_tokens=NEW_TOKENS, eos_id=end,
      never=sampling.never_sampled(tok, template))
  for context, got in zip(contexts, ours):
    with torch.no_grad():
      want = ref.generate(torch.tensor([context]), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=end,
                          pad_token_id=end)[0, len(context):].tolist()
    assert got == want
  context = contexts[0]
  with torch.no_grad():
    want_logits = ref(torch.tensor([context])).logits.numpy()
  got_logits = np.asarray(jax.jit(run.task.module().apply)(
      {'params': params}, np.asarray([context])))
  assert np.abs(got_logits - want_logits).max() <= 3e-4
  result = tiny_run.cli('generate', f'--workdir={workdir}', '--chat',
                        f'--prompt={PROMPTS[0]}',
                        f'--max_new_tokens={NEW_TOKENS}', num_devices=1)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == tok.decode([ours[0]])[0].strip()


@pytest.mark.benchmark
def test_smollm2_tokenizer_equals_transformers(smollm2):
  workdir, _, ref_tok = smollm2
  tok = tokenizers.load(workdir / 'tokenizer.model')
  data = pathlib.Path(os.environ.get('TRANSFLAX_DATA', GGUF.parents[1] / 'data'))
  lines = []
  for lang in ('en', 'de'):
    with gzip.open(data / 'multi30k' / f'val.{lang}.gz', 'rt',
                   encoding='utf-8') as f:
      lines += [line.rstrip('\n') for line in f][:1000]
  lines += [u for c in chat.chitchat_chats('test') for u in c][:1000]
  assert len(lines) == 3000
  ours = tok.encode(lines, add_eos=False)
  for line, got in zip(lines, ours):
    assert got == ref_tok.encode(line, add_special_tokens=False), line
  assert tok.decode([ours[0]])[0] == lines[0]
