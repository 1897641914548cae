"""`transflax` subcommands: train, translate, eval, generate, average, bench.

  transflax train --config experiments/multi30k.py:en-de --workdir runs/m30k
  transflax translate --workdir runs/m30k < source.txt > hypotheses.txt
  transflax eval --workdir runs/m30k --split test_2016_flickr
  transflax generate --workdir runs/shakespeare --prompt "ROMEO:"
  transflax average --workdir runs/wmt_base --last 5
  transflax bench --config experiments/gpt2.py:small --steps 20

A mistake the user can fix prints one line `error: ...` and exits with 2.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from data.errors import UserError

COMMANDS = ('train', 'translate', 'eval', 'generate', 'average', 'bench')
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
flags.DEFINE_string('split', None, 'eval: split (default: the config\'s test split)')
flags.DEFINE_string('prompt', None, 'generate: prompt text')
flags.DEFINE_integer('max_new_tokens', None, 'generate: tokens to sample')
flags.DEFINE_float('temperature', None, 'generate: 0 = greedy')
flags.DEFINE_integer('top_k', None, 'generate: keep the k most likely tokens (0 = off)')
flags.DEFINE_float('top_p', None, 'generate: nucleus mass (1 = off)')
flags.DEFINE_integer('seed', 0, 'generate: sampling seed')
flags.DEFINE_integer('num_samples', None, 'generate: samples per prompt')
flags.DEFINE_integer('last', None, 'average: number of latest checkpoints')
flags.DEFINE_integer('steps', 20, 'bench: timed train steps')


def _require(name: str) -> str:
  value = getattr(FLAGS, name)
  if value is None:
    raise UserError(f'--{name} is required for `transflax {sys.argv[1]}`')
  return value


def load_workdir_config(workdir: str):
  """The resolved config.json a training run wrote into `workdir`."""
  import ml_collections
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: --workdir must be a directory that '
                    f'`transflax train` has written to')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _cmd_train() -> None:
  config = FLAGS.config
  if config is None:
    raise UserError('--config is required, e.g. --config experiments/multi30k.py:en-de')
  if FLAGS.dry_run:
    from train import bench
    bench.dry_run(config)
    return
  from train import loop
  final = loop.train_and_evaluate(config, _require('workdir'))
  print(json.dumps({k: v for k, v in final.items()
                    if isinstance(v, (int, float, str))}, sort_keys=True))


def _cmd_translate() -> None:
  from train import evaluate
  run, params = evaluate.load(_require('workdir'), FLAGS.checkpoint)
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
  result = evaluate.evaluate_split(run, params, FLAGS.split,
                                   beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
                                   batch_size=FLAGS.batch_size)
  print(json.dumps(result, sort_keys=True))


def _cmd_generate() -> None:
  from train import evaluate, sampling
  run, params = evaluate.load(_require('workdir'), FLAGS.checkpoint)
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


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f'usage: transflax {{{",".join(COMMANDS)}}} [flags]; see the '
          f'module docstring of train/cli.py', file=sys.stderr)
    return 2
  command = argv[1]
  try:
    FLAGS(argv[:1] + argv[2:])
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)
  sys.argv = argv
  try:
    globals()[f'_cmd_{command}']()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
