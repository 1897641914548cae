"""`python -m train` as a user meets it: one-line errors with exit code 2,
--dry_run, refusing another model's workdir, stopping on a non-finite loss,
and quiet output."""

import json
import re
import shutil

import jax
import ml_collections
import pytest

import tiny_run
from data.errors import UserError
from train import partitioning, runs, tasks

REPO = tiny_run.REPO


def assert_user_error(result, *fragments):
  """Exit 2 and exactly one line on stderr, `error: ...`, naming fragments."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  return tiny_run.write_experiment(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def trained(experiment, tmp_path_factory):
  """A workdir of 2 steps on one device, checkpoints at steps 1 and 2."""
  workdir = tmp_path_factory.mktemp('trained') / 'w'
  result = tiny_run.cli(
      'train', '--config', experiment, '--workdir', str(workdir),
      *tiny_run.flags(**{'train.num_steps': 2, 'train.checkpoint_every': 1}),
      num_devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])['step'] == 2
  assert tiny_run.committed_steps(workdir) == [1, 2]
  return workdir


# -- flag mistakes ------------------------------------------------------------------


@pytest.mark.parametrize('override, named', [
    ('--config.model.nonexistent=3', '--config.model.nonexistent'),
    ('--config.trian.num_steps=3', 'did you mean --config.train'),
])
def test_unknown_config_key_is_one_line_exit_2(experiment, tmp_path, override,
                                               named):
  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(tmp_path / 'w'), override)
  assert_user_error(result, 'unknown config key', named)
  assert not (tmp_path / 'w').exists()


def test_cudnn_attention_off_gpu_is_a_user_error():
  """attention_impl=cudnn on a CPU host names the fix instead of failing
  inside the first trace with cuDNN's RuntimeError."""
  config = ml_collections.ConfigDict({'model': {'vocab_size': 0}})
  assert tasks.model_config(config, 40).attention_impl == 'xla'
  config.model.attention_impl = 'cudnn'
  with pytest.raises(UserError, match='attention_impl=xla'):
    tasks.model_config(config, 40)


def test_cudnn_trained_workdir_loads_with_xla_attention_off_gpu(tmp_path):
  """translate/generate/eval of a workdir trained with cuDNN attention on
  GPUs use XLA's (same math) on a CPU host, where the user cannot override."""
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model': {'attention_impl': 'cudnn', 'num_heads': 2}}))
  config = runs.load_workdir_config(str(tmp_path))
  assert config.model.attention_impl == 'xla'
  assert config.model.num_heads == 2


def test_missing_workdir_or_config_exit_2(experiment, tmp_path):
  assert_user_error(tiny_run.cli('train', '--config', experiment), '--workdir')
  assert_user_error(tiny_run.cli('train', '--workdir', str(tmp_path)),
                    '--config')
  assert_user_error(
      tiny_run.cli('train', '--config', str(tmp_path / 'nope.py'),
                   '--workdir', str(tmp_path)), 'nope.py')


# -- help ---------------------------------------------------------------------------


def test_help_lists_every_command_and_each_commands_flags(capsys):
  """`transflax --help`: one line per command. `transflax CMD --help`: each
  of its flags with its default, and an example that uses only its flags
  (parsed as the command would parse it)."""
  import shlex
  from train import cli
  assert cli.main(['transflax', '--help']) == 0
  listed = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert re.search(rf'^  {name} +\S', listed, re.M), name
  for name, (_, own, example) in cli.COMMANDS.items():
    assert cli.main(['transflax', name, '--help']) == 0
    text = capsys.readouterr().out
    for flag in own:
      assert re.search(rf'^  --(\[no\])?{flag}\b', text, re.M), (name, flag)
    assert f'  {example}' in text
    argv = shlex.split(example.split(' <')[0])
    assert argv[:2] == ['transflax', name]
    cli.FLAGS.unparse_flags()
    try:
      positional = cli._parse_flags(argv[:1] + argv[2:])
      cli._check_command_flags(name, positional)
    finally:
      cli.FLAGS.unparse_flags()
  assert cli.main(['transflax', 'transalte']) == 2
  assert 'did you mean translate?' in capsys.readouterr().err


def test_another_commands_flag_is_one_line_exit_2(trained):
  assert_user_error(tiny_run.cli('translate', '--workdir', str(trained),
                                 '--prompt', 'hi'),
                    '--prompt is not a flag of `transflax translate`',
                    'generate')
  assert_user_error(tiny_run.cli('eval', '--workdir', str(trained), 'extra'),
                    "unexpected argument 'extra'")


# -- --dry_run ------------------------------------------------------------------------


def _param_lines(stdout: str) -> dict[str, int]:
  return {m.group(1): int(m.group(2).replace(',', ''))
          for m in re.finditer(r'^\s+(\S+)\s+([\d,]+) params', stdout, re.M)}


def test_dry_run_prints_params_mesh_and_shardings(experiment):
  result = tiny_run.cli('train', '--config', experiment, '--dry_run',
                        *tiny_run.flags(**{'mesh.data': 2, 'mesh.fsdp': 2,
                                           'mesh.tensor': 2}))
  assert result.returncode == 0, result.stderr[-3000:]
  counts = _param_lines(result.stdout)
  assert set(counts) == {'decoder', 'embedding', 'total'}
  assert counts['total'] == counts['decoder'] + counts['embedding']
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8" in result.stdout
  assert re.search(r"mlp/wi/kernel\s+\(32, 64\)\s+P\('fsdp', 'tensor'\)",
                   result.stdout), result.stdout


def test_cpu_devices_splits_the_host_cpu(experiment):
  """mesh.cpu_devices sets the CPU device count before JAX starts (it wins
  over the 8 the test environment asks XLA for); after JAX has started it
  only warns."""
  result = tiny_run.cli('train', '--config', experiment, '--dry_run',
                        '--config.mesh.cpu_devices=3')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} over 3" in result.stdout
  assert jax.device_count() == 8   # JAX has started in this process,
  partitioning.use_cpu_devices(3)  # so this only warns
  assert jax.device_count() == 8


def test_dry_run_of_a_full_size_config_needs_no_data(tmp_path):
  """multi30k.py at full size, with an empty data dir: shapes only."""
  empty = tmp_path / 'no_data'
  empty.mkdir()
  result = tiny_run.cli(
      'train', '--config', str(REPO / 'experiments' / 'multi30k.py'),
      '--dry_run', '--config.model.vocab_size=8000',
      f'--config.data.dir={empty}')
  assert result.returncode == 0, result.stderr[-3000:]
  counts = _param_lines(result.stdout)
  assert set(counts) == {'encoder', 'decoder', 'shared_embedding', 'total'}
  assert counts['shared_embedding'] == 8000 * 256
  assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')
  assert 'vocab 8000' in result.stdout and "mesh {'data': 8" in result.stdout
  assert list(empty.iterdir()) == []


# -- workdirs ---------------------------------------------------------------------------


@pytest.mark.parametrize('override, key', [
    ({'model.d_model': 64}, 'model.d_model: checkpoint=32, current=64'),
    ({'model.vocab_size': 64}, 'model.vocab_size: checkpoint=32, current=64'),
])
def test_workdir_of_another_model_is_refused(experiment, trained, override,
                                             key):
  config_json = (trained / 'config.json').read_text()
  result = tiny_run.cli('train', '--config', experiment, '--workdir',
                        str(trained), *tiny_run.flags(**override),
                        num_devices=1)
  assert_user_error(result, key, str(trained))
  # Nothing in the workdir was touched.
  assert (trained / 'config.json').read_text() == config_json
  assert tiny_run.committed_steps(trained) == [1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    experiment, trained, tmp_path):
  """Resumed at step 2 with a learning rate of 1e30: step 3 still computes a
  finite loss (and saves), step 4's is NaN."""
  workdir = tmp_path / 'w'
  shutil.copytree(trained, workdir)
  result = tiny_run.cli(
      'train', '--config', experiment, '--workdir', str(workdir),
      *tiny_run.flags(**{'train.num_steps': 10, 'train.checkpoint_every': 1,
                         'optimizer.learning_rate': 1e30}), num_devices=1)
  assert_user_error(result, 'non-finite training loss', 'at step 4 ',
                    'last good checkpoint is step 3')
  assert tiny_run.committed_steps(workdir) == [1, 2, 3]
  assert max(tiny_run.losses(tiny_run.metrics(workdir))) == 3


def test_eval_output_is_quiet(trained):
  """Orbax's routine warnings (read-only managers) do not reach the user."""
  result = tiny_run.cli('eval', '--workdir', str(trained), num_devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out['split'] == 'val' and out['eval/loss'] > 0
  assert 'read only' not in result.stderr, result.stderr
  assert 'CheckpointManagerOptions' not in result.stderr, result.stderr
