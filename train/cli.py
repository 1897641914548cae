"""The `transflax` command line: `transflax COMMAND [flags]`.

`transflax --help` lists the commands; `transflax COMMAND --help` lists a
command's flags with their defaults and an example. Each command takes only
its own flags (another command's flag is an error). A mistake the user can
fix prints one line `error: ...` and exits with 2.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys

from absl import flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from data import errors
from data.errors import UserError

# name: (one line, its flags, an example). `transflax --help` prints the
# first column; `transflax NAME --help` the rest.
COMMANDS = {
    'train': ('train an experiment config into a workdir (resumes if it has '
              'checkpoints)',
              ('config', 'workdir', 'dry_run'),
              'transflax train --config experiments/multi30k.py:en-de '
              '--workdir runs/m30k --config.train.num_steps=600'),
    'translate': ('translate lines of stdin (or --input) with a translation '
                  'run',
                  ('workdir', 'checkpoint', 'input', 'output', 'beam_size',
                   'alpha', 'batch_size'),
                  'transflax translate --workdir runs/m30k < source.en > '
                  'hypotheses.de'),
    'eval': ('score a split: BLEU and chrF for translation, loss and '
             'perplexity otherwise',
             ('workdir', 'checkpoint', 'split', 'beam_size', 'alpha',
              'batch_size'),
             'transflax eval --workdir runs/m30k --split test_2016_flickr'),
    'generate': ('sample text from a language model (--chat: a reply to a '
                 'user turn)',
                 ('workdir', 'checkpoint', 'prompt', 'chat', 'max_new_tokens',
                  'temperature', 'top_k', 'top_p', 'seed', 'num_samples'),
                 'transflax generate --workdir runs/shakespeare --prompt '
                 '"ROMEO:" --temperature 0.8'),
    'average': ('average the last N checkpoints into checkpoints_avg/',
                ('workdir', 'last'),
                'transflax average --workdir runs/wmt_base --last 5'),
    'bench': ('time train steps of a config: step time, tokens/s, MFU',
              ('config', 'steps'),
              'transflax bench --config experiments/gpt2.py:small --steps 20'),
    'import': ('a GGUF file or Hugging Face folder into a new workdir',
               ('from', 'workdir'),
               'transflax import --from model.gguf --workdir runs/smollm2'),
    'export': ('a decoder-only workdir as a Hugging Face folder',
               ('workdir', 'to', 'checkpoint'),
               'transflax export --workdir runs/smollm2 --to '
               'exported/smollm2'),
    'judge': ('score a chat model\'s replies: VADER positivity, fluency, KL '
              'to a reference',
              ('workdir', 'checkpoint', 'prompts', 'reference',
               'fluency_model', 'reward_model', 'num_prompts',
               'max_prompt_length', 'max_new_tokens', 'temperature', 'seed'),
              'transflax judge --workdir runs/chat_ppo --reward_model '
              'runs/chat_reward'),
    'chat': ('talk to a chat model in the terminal, replies streamed',
             ('workdir', 'checkpoint', 'system', 'max_new_tokens',
              'temperature', 'top_p', 'top_k', 'seed'),
             'transflax chat --workdir runs/smollm2'),
    'serve': ('an OpenAI-compatible HTTP server (/v1/chat/completions)',
              ('workdir', 'checkpoint', 'host', 'port', 'max_batch', 'system'),
              'transflax serve --workdir runs/smollm2 --port 8000'),
    'plot': ('PNG learning curves of runs overlaid: --workdir DIR [DIR ...] '
             '(needs the plot extra)',
             ('workdir',),
             'transflax plot --workdir runs/chat_ppo runs/chat_ppo_b0.2'),
    'attention': ('PNG attention heatmaps per layer and head for one input '
                  '(needs the plot extra)',
                  ('workdir', 'checkpoint', 'text', 'target'),
                  'transflax attention --workdir runs/m30k --text "A dog '
                  'runs on the beach."'),
}
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'experiment config: experiments/<name>.py[:arg]',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, '
                    'tokenizer)')
flags.DEFINE_bool('dry_run', False, 'train: print parameters, mesh and shardings, then exit')
flags.DEFINE_string('checkpoint', None, 'latest | best | average | STEP '
                    '(default: the model the run reported its result from)')
flags.DEFINE_string('input', None, 'translate: input file (default stdin)')
flags.DEFINE_string('output', None, 'translate: output file (default stdout)')
flags.DEFINE_integer('beam_size', None, 'beam size (default: the config\'s)')
flags.DEFINE_float('alpha', None, 'length penalty alpha (default: the config\'s)')
flags.DEFINE_integer('batch_size', None, 'sentences per decoding batch')
flags.DEFINE_string('split', None, 'eval: split (default: the config\'s test '
                    'split for translation, its eval split otherwise)')
flags.DEFINE_string('prompt', None, 'generate: prompt text')
flags.DEFINE_integer('max_new_tokens', None, 'generate, chat, judge: tokens '
                     'to sample (default: generate: the run\'s sample '
                     'config; chat: 128, at most half the context; judge: 48)')
flags.DEFINE_float('temperature', None, 'generate, chat, judge: 0 = greedy '
                   '(default: generate, chat: the run\'s sample config; '
                   'judge: 1)')
flags.DEFINE_integer('top_k', None, 'generate, chat: keep the k most likely '
                     'tokens, 0 = off (default: the run\'s sample config)')
flags.DEFINE_float('top_p', None, 'generate, chat: nucleus mass, 1 = off '
                   '(default: the run\'s sample config)')
flags.DEFINE_integer('seed', 0, 'generate: sampling seed')
flags.DEFINE_integer('num_samples', None, 'generate: samples per prompt '
                     '(default: the run\'s sample config)')
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
flags.DEFINE_string('text', None, 'attention: the input (the source sentence '
                    'of a translation run)')
flags.DEFINE_string('target', None, 'attention: the translation to attend '
                    'over (default: the model\'s own)')


def _require(name: str) -> str:
  value = getattr(FLAGS, name)
  if value is None:
    raise UserError(f'--{name} is required for `transflax {sys.argv[1]}`')
  return value


def _cmd_train() -> None:
  config = FLAGS.config
  if config is None:
    raise UserError('--config is required, e.g. --config experiments/multi30k.py:en-de')
  if FLAGS.dry_run:
    from train import bench
    bench.dry_run(config)
    return
  from train import runs
  final = runs.train(config, _require('workdir'))
  if jax.process_index() == 0:  # One result line per run, not per host.
    print(json.dumps({k: v for k, v in final.items()
                      if isinstance(v, (int, float, str))}, sort_keys=True))


def _cmd_translate() -> None:
  from train import evaluate, runs
  run, params = runs.load(_require('workdir'), FLAGS.checkpoint)
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
  from train import runs
  run, params = runs.load(_require('workdir'), FLAGS.checkpoint)
  result = run.task.evaluate_split(run, params, FLAGS.split,
                                   beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
                                   batch_size=FLAGS.batch_size)
  print(json.dumps(result, sort_keys=True))


def _cmd_generate() -> None:
  from train import runs, sampling
  run, params = runs.load(_require('workdir'), FLAGS.checkpoint)
  if not hasattr(run.task, 'sample'):
    raise UserError(f'{FLAGS.workdir} holds a {run.config.task!r} run, which '
                    f'does not generate text; `transflax generate` needs a '
                    f'decoder-only LM (task lm, sft, dpo, ppo or grpo, or an imported '
                    f'model)')
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
  from train import runs
  step = runs.average(_require('workdir'), _require('last'))
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
      model, max_new_tokens=(FLAGS.max_new_tokens
                             or min(128, model.config.max_len // 2)),
      temperature=(s.get('temperature', 0.7) if FLAGS.temperature is None
                   else FLAGS.temperature),
      top_p=s.get('top_p', 1.0) if FLAGS.top_p is None else FLAGS.top_p,
      top_k=s.get('top_k', 0) if FLAGS.top_k is None else FLAGS.top_k,
      seed=FLAGS.seed)


def _cmd_serve() -> None:
  from train import serve
  serve.serve(_require('workdir'), FLAGS.checkpoint, host=FLAGS.host,
              port=FLAGS.port, max_batch=FLAGS.max_batch, system=FLAGS.system)


def _cmd_plot(*more_workdirs: str) -> None:
  from train import plots
  print(plots.plot_runs([_require('workdir'), *more_workdirs]))


def _cmd_attention() -> None:
  from train import plots
  for path in plots.plot_attention(_require('workdir'), _require('text'),
                                   FLAGS.target, FLAGS.checkpoint):
    print(path)


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


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses absl flags and the config; every mistake becomes one UserError.
  Returns the arguments that are not flags."""
  sys.argv = argv  # config_flags reads the --config.a.b overrides from here
  try:
    positional = FLAGS(argv)[1:]
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
  return positional


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ['usage: transflax COMMAND [flags]', '', 'commands:']
  lines += [f'  {name:<{width}}  {line}'
            for name, (line, _, _) in COMMANDS.items()]
  lines += ['', '`transflax COMMAND --help` lists its flags with their '
            'defaults and an example.']
  return '\n'.join(lines)


def _flag_help(name: str) -> str:
  """`--name=DEFAULT` and the help text, without its 'command:' prefix."""
  flag = FLAGS[name]
  text = re.sub(r'^[a-z, ]+: ', '', flag.help or '')
  if name == 'config':
    return (f'  --config=FILE[:ARG]\n      {text}; override any key with '
            f'--config.a.b=VALUE')
  if flag.flag_type() == 'bool':
    return f'  --[no]{name} (default: {str(flag.default).lower()})\n      {text}'
  if flag.default is None and '(default:' in text:
    return f'  --{name}\n      {text}'
  default = 'none' if flag.default is None else repr(flag.default)
  return f'  --{name} (default: {default})\n      {text}'


def _command_help(command: str) -> str:
  line, names, example = COMMANDS[command]
  return '\n'.join([f'transflax {command}: {line}', '', 'flags:',
                    *map(_flag_help, names), '', 'example:',
                    f'  {example}'])


def _check_command_flags(command: str, positional: list[str]) -> None:
  """Another command's flag, or a stray argument, is a UserError."""
  own = COMMANDS[command][1]
  for name in sorted({n for names in (c[1] for c in COMMANDS.values())
                      for n in names} - set(own)):
    if FLAGS[name].present:
      users = [c for c, (_, names, _) in COMMANDS.items() if name in names]
      raise UserError(f'--{name} is not a flag of `transflax {command}` (it '
                      f'is for {", ".join(users)}); see `transflax {command} '
                      f'--help`')
  if positional and command != 'plot':
    raise UserError(f'unexpected argument {positional[0]!r} for `transflax '
                    f'{command}`; see `transflax {command} --help`')


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  command = argv[1] if len(argv) > 1 else None
  wants_help = any(a in ('-h', '--help', '--helpfull') for a in argv[1:])
  if command in (None, '-h', '--help', '--helpfull', 'help'):
    print(_usage(), file=sys.stdout if wants_help or command else sys.stderr)
    return 0 if command else 2
  if command not in COMMANDS:
    near = difflib.get_close_matches(command, list(COMMANDS), n=1)
    hint = f'; did you mean {near[0]}?' if near else ''
    print(f'error: unknown command {command!r}{hint}\n\n{_usage()}',
          file=sys.stderr)
    return 2
  if wants_help:
    print(_command_help(command))
    return 0
  # Our warnings stay visible; Orbax's routine INFO chatter does not.
  logging.set_verbosity(logging.WARNING)
  try:
    positional = _parse_flags(argv[:1] + argv[2:])
    _check_command_flags(command, positional)
    sys.argv = argv
    globals()[f'_cmd_{command}'](*positional)
  except UserError as e:
    return errors.report(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
