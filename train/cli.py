"""`transflax` subcommands: train, translate, eval, generate, average, bench,
import, export, judge, chat, serve.

  transflax train --config experiments/multi30k.py:en-de --workdir runs/m30k
  transflax translate --workdir runs/m30k < source.txt > hypotheses.txt
  transflax eval --workdir runs/m30k --split test_2016_flickr
  transflax generate --workdir runs/shakespeare --prompt "ROMEO:"
  transflax average --workdir runs/wmt_base --last 5
  transflax bench --config experiments/gpt2.py:small --steps 20
  transflax import --from model.gguf --workdir runs/smollm2
  transflax generate --workdir runs/smollm2 --chat --prompt "Hi!"
  transflax export --workdir runs/smollm2 --to exported/smollm2
  transflax judge --workdir runs/chat_ppo --reward_model runs/chat_reward
  transflax chat --workdir runs/chat_ppo
  transflax serve --workdir runs/chat_ppo --port 8000

A mistake the user can fix prints one line `error: ...` and exits with 2.
"""

from __future__ import annotations

import difflib
import json
import os
import sys

from absl import flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from data.errors import UserError

COMMANDS = ('train', 'translate', 'eval', 'generate', 'average', 'bench',
            'import', 'export', 'judge', 'chat', 'serve')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'experiment config: experiments/<name>.py[:arg]',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, tokenizer)')
flags.DEFINE_bool('dry_run', False, 'train: print parameters, mesh and shardings, then exit')
flags.DEFINE_string('checkpoint', 'latest', 'latest | best | average | STEP')
flags.DEFINE_string('input', None, 'translate: input file (default stdin)')
flags.DEFINE_string('output', None, 'translate: output file (default stdout)')
flags.DEFINE_integer('beam_size', None, 'beam size (default: the config\'s)')
flags.DEFINE_float('alpha', None, 'length penalty alpha (default: the config\'s)')
flags.DEFINE_integer('batch_size', None, 'sentences per decoding batch')
flags.DEFINE_string('split', None, 'eval: split (default: the config\'s test '
                    'split for translation, its eval split otherwise)')
flags.DEFINE_string('prompt', None, 'generate: prompt text')
flags.DEFINE_integer('max_new_tokens', None, 'generate: tokens to sample')
flags.DEFINE_float('temperature', None, 'generate: 0 = greedy')
flags.DEFINE_integer('top_k', None, 'generate: keep the k most likely tokens (0 = off)')
flags.DEFINE_float('top_p', None, 'generate: nucleus mass (1 = off)')
flags.DEFINE_integer('seed', 0, 'generate: sampling seed')
flags.DEFINE_integer('num_samples', None, 'generate: samples per prompt')
flags.DEFINE_integer('last', None, 'average: number of latest checkpoints')
flags.DEFINE_integer('steps', 20, 'bench: timed train steps')
flags.DEFINE_string('from', None, 'import: a .gguf file or a Hugging Face '
                    'model folder (config.json + *.safetensors)')
flags.DEFINE_string('to', None, 'export: the Hugging Face folder to write')
flags.DEFINE_string('prompts', None, 'judge: prompts file (.jsonl with '
                    '"prompt"/"messages", or one per line; default: '
                    'chitchat\'s held-out test openings)')
flags.DEFINE_string('reference', None, 'judge: the KL\'s reference workdir '
                    '(default: the run\'s frozen reference, else itself)')
flags.DEFINE_string('fluency_model', 'runs/smollm2', 'judge: the imported '
                    'model whose perplexity judges fluency ("" skips it)')
flags.DEFINE_string('reward_model', None, 'judge: also score the replies '
                    'with this reward run')
flags.DEFINE_integer('num_prompts', 160, 'judge: the first N prompts that '
                     'fit (0 = all)')
flags.DEFINE_integer('max_prompt_length', 64, 'judge: longer prompts are '
                     'dropped and counted')
flags.DEFINE_string('system', None, 'chat, serve: a system turn first '
                    '(chat; serve: when a request has none)')
flags.DEFINE_integer('port', 8000, 'serve: the port')
flags.DEFINE_string('host', '127.0.0.1', 'serve: the address to listen on')
flags.DEFINE_integer('max_batch', 8, 'serve: requests decoded together')
flags.DEFINE_bool('chat', False, 'generate: the prompt is a user turn, '
                  'rendered with the workdir\'s chat template; prints the reply')


def _require(name: str) -> str:
  value = getattr(FLAGS, name)
  if value is None:
    raise UserError(f'--{name} is required for `transflax {sys.argv[1]}`')
  return value


def load_workdir_config(workdir: str):
  """The resolved config.json a training run wrote into `workdir` (with
  cuDNN attention swapped for XLA's off a GPU)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: --workdir must be a directory that '
                    f'`transflax train` has written to')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = config.get('model')
  if (model is not None and model.get('attention_impl') == 'cudnn'
      and jax.default_backend() != 'gpu'):
    # The same attention through XLA: a run trained with cuDNN's kernel on
    # GPUs still translates, samples and evaluates on any host.
    logging.info('model.attention_impl: cudnn -> xla on %s',
                 jax.default_backend())
    model.attention_impl = 'xla'
  return config


def _cmd_train() -> None:
  config = FLAGS.config
  if config is None:
    raise UserError('--config is required, e.g. --config experiments/multi30k.py:en-de')
  if FLAGS.dry_run:
    from train import bench
    bench.dry_run(config)
    return
  from train import tasks
  final = tasks.trainer(config)(config, _require('workdir'))
  if jax.process_index() == 0:  # One result line per run, not per host.
    print(json.dumps({k: v for k, v in final.items()
                      if isinstance(v, (int, float, str))}, sort_keys=True))


def _cmd_translate() -> None:
  from train import evaluate
  run, params = evaluate.load(_require('workdir'), FLAGS.checkpoint)
  if not hasattr(run.task, 'corpus'):
    raise UserError(f'{FLAGS.workdir} holds a {run.config.task!r} run; '
                    f'`transflax translate` needs a translation run')
  src = open(FLAGS.input, encoding='utf-8') if FLAGS.input else sys.stdin
  lines = [line.rstrip('\n') for line in src]
  out = evaluate.translate(run, params, lines, beam_size=FLAGS.beam_size,
                           alpha=FLAGS.alpha, batch_size=FLAGS.batch_size)
  dst = open(FLAGS.output, 'w', encoding='utf-8') if FLAGS.output else sys.stdout
  dst.writelines(o + '\n' for o in out)
  dst.flush()


def _cmd_eval() -> None:
  from train import evaluate
  run, params = evaluate.load(_require('workdir'), FLAGS.checkpoint)
  result = run.task.evaluate_split(run, params, FLAGS.split,
                                   beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
                                   batch_size=FLAGS.batch_size)
  print(json.dumps(result, sort_keys=True))


def _cmd_generate() -> None:
  from train import evaluate, sampling
  run, params = evaluate.load(_require('workdir'), FLAGS.checkpoint)
  if not hasattr(run.task, 'sample'):
    raise UserError(f'{FLAGS.workdir} holds a {run.config.task!r} run, which '
                    f'does not generate text; `transflax generate` needs a '
                    f'decoder-only LM (task lm, sft or dpo)')
  if FLAGS.chat and getattr(run.task, 'chat_template', None) is None:
    from data import chat
    template = chat.load_template(run.workdir, '', run.task.tokenizer,
                                  save=False)
    if template is None:
      raise UserError(f'{FLAGS.workdir} has no chat template '
                      f'({chat.TEMPLATE_FILE}); drop --chat, or use a chat '
                      f'run (sft, dpo, or an imported chat model)')
    run.task.chat_template = template
  s = run.config.sample
  sampling.generate_samples(
      run, params, FLAGS.prompt if FLAGS.prompt is not None else s.prompt,
      max_new_tokens=FLAGS.max_new_tokens or s.max_new_tokens,
      temperature=s.temperature if FLAGS.temperature is None else FLAGS.temperature,
      top_k=s.top_k if FLAGS.top_k is None else FLAGS.top_k,
      top_p=s.top_p if FLAGS.top_p is None else FLAGS.top_p,
      seed=FLAGS.seed, num_samples=FLAGS.num_samples or s.num_samples,
      stream=sys.stdout)


def _cmd_average() -> None:
  from train import evaluate
  step = evaluate.average(_require('workdir'), _require('last'))
  print(f'averaged the last {FLAGS.last} checkpoints into '
        f'{os.path.join(FLAGS.workdir, "checkpoints_avg", str(step))}')


def _cmd_bench() -> None:
  from train import bench
  if FLAGS.config is None:
    raise UserError('--config is required for `transflax bench`')
  print(json.dumps(bench.benchmark(FLAGS.config, steps=FLAGS.steps), indent=2))


def _cmd_import() -> None:
  from train import convert
  src = FLAGS['from'].value
  if src is None:
    raise UserError('--from is required for `transflax import` (a .gguf '
                    'file or a Hugging Face model folder)')
  print(json.dumps(convert.import_checkpoint(src, _require('workdir'))))


def _cmd_export() -> None:
  from train import convert
  print(json.dumps(convert.export_checkpoint(
      _require('workdir'), _require('to'), FLAGS.checkpoint)))


def _cmd_judge() -> None:
  from train import judge
  result = judge.judge(
      _require('workdir'), prompts=FLAGS.prompts, checkpoint=FLAGS.checkpoint,
      reference=FLAGS.reference, fluency_model=FLAGS.fluency_model or None,
      reward_model=FLAGS.reward_model, num_prompts=FLAGS.num_prompts,
      max_new_tokens=FLAGS.max_new_tokens or 48,
      max_prompt_length=FLAGS.max_prompt_length,
      temperature=1.0 if FLAGS.temperature is None else FLAGS.temperature,
      seed=FLAGS.seed)
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in result.items() if k != 'samples'}))


def _cmd_chat() -> None:
  from train import chat
  model = chat.ChatModel(_require('workdir'), FLAGS.checkpoint,
                         system=FLAGS.system)
  s = model.run.config.get('sample') or {}
  chat.terminal(
      model, max_new_tokens=FLAGS.max_new_tokens or 128,
      temperature=(s.get('temperature', 0.7) if FLAGS.temperature is None
                   else FLAGS.temperature),
      top_p=s.get('top_p', 1.0) if FLAGS.top_p is None else FLAGS.top_p,
      top_k=s.get('top_k', 0) if FLAGS.top_k is None else FLAGS.top_k,
      seed=FLAGS.seed)


def _cmd_serve() -> None:
  from train import serve
  serve.serve(_require('workdir'), FLAGS.checkpoint, host=FLAGS.host,
              port=FLAGS.port, max_batch=FLAGS.max_batch, system=FLAGS.system)


def _override_paths(argv: list[str]) -> list[str]:
  """Dotted keys of the `--config.a.b=v` / `--config.a.b v` flags in argv."""
  return [arg.lstrip('-')[len('config.'):].split('=', 1)[0]
          for arg in argv if arg.lstrip('-').startswith('config.')]


def _without_overrides(argv: list[str]) -> list[str]:
  out, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
    elif arg.lstrip('-').startswith('config.'):
      # `--config.a.b VALUE`: the value goes too.
      skip = ('=' not in arg and i + 1 < len(argv)
              and not argv[i + 1].startswith('--'))
    else:
      out.append(arg)
  return out


def _unknown_key(config, path: str) -> str | None:
  """Why `path` is not a key of `config` (with a suggestion), or None."""
  node, parts = config, path.split('.')
  for i, part in enumerate(parts):
    where = 'config.' + '.'.join(parts[:i]) if i else 'the config'
    if not isinstance(node, ml_collections.ConfigDict):
      return (f'unknown config key --config.{path}: {where} is a '
              f'{type(node).__name__}, not a group of keys')
    if part not in node:
      near = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = (f'; did you mean --config.{".".join(parts[:i] + near)}?'
              if near else '')
      return f'unknown config key --config.{path}: {where} has no {part!r}{hint}'
    node = node[part]
  return None


def _unknown_override(argv: list[str]) -> str | None:
  """Names an override of a key the config lacks, or None.

  config_flags applies overrides while it loads the file and then fails with
  a bare KeyError/AttributeError, so the config is re-read without them.
  Only runs on the error path.
  """
  paths = _override_paths(argv)
  if not paths:
    return None
  base = _without_overrides(argv)
  try:
    FLAGS.unparse_flags()
    sys.argv = base  # config_flags reads overrides from sys.argv
    FLAGS(base)
    config = FLAGS.config
    problems = [_unknown_key(config, p) for p in paths]
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    sys.argv = argv
  return next((p for p in problems if p), None)


def _one_line(error: BaseException) -> str:
  """A flag error as one line: config_flags embeds whole tracebacks."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and any(l.startswith('Traceback') for l in lines):
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(lines)


def _parse_flags(argv: list[str]) -> None:
  """Parses absl flags and the config; every mistake becomes one UserError."""
  sys.argv = argv  # config_flags reads the --config.a.b overrides from here
  try:
    FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    problem = _unknown_override(argv)
    if problem:
      raise UserError(problem) from None
    if isinstance(e, (flags.Error, AttributeError, KeyError)):
      raise UserError(_one_line(e)) from None
    raise
  config = FLAGS.config
  if config is not None:
    try:  # config_flags defers a config file's load error to its first use.
      config.keys  # pylint: disable=pointless-statement
    except OSError as e:
      cause = e.__cause__ or e
      last = [l.strip() for l in str(cause).splitlines() if l.strip()][-1]
      raise UserError(f'cannot load the --config file: {last}') from None


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help(include_special_flags=False))
    return 0
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f'usage: transflax {{{",".join(COMMANDS)}}} [flags]; see the '
          f'module docstring of train/cli.py', file=sys.stderr)
    return 2
  command = argv[1]
  # Our warnings stay visible; Orbax's routine INFO chatter does not.
  logging.set_verbosity(logging.WARNING)
  try:
    _parse_flags(argv[:1] + argv[2:])
    sys.argv = argv
    globals()[f'_cmd_{command}']()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
