"""The tutorials in notebooks/ run: each is executed top to bottom in a kernel.

The notebooks are stored without outputs (the second test checks it), so a
notebook that no longer runs against the library fails here, not in a
reader's hands. Each executes in a fresh `python3` kernel of this Python
(the venv the project is installed in), with notebooks/ as its working
directory and the environment of the test session minus the simulated
devices of conftest.py: a notebook sees the devices a user's would.
"""

import json
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'notebooks').glob('*.ipynb'))
TIMEOUT = 600  # seconds per cell; each notebook runs in about 2 minutes


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags)
  # The project is found even where it is not installed (a plain checkout).
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
  return env


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  import nbclient
  import nbformat
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  nb = nbformat.read(path, as_version=4)
  # The `python3` kernel of this interpreter (the venv the project is
  # installed in), not whichever `python3` kernelspec a Jupyter elsewhere on
  # the machine has registered. Its files go to tmp_path, not the repo.
  kernels = tmp_path / 'kernels'
  (kernels / 'python3').mkdir(parents=True)
  (kernels / 'python3' / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'Python 3', 'language': 'python'}))
  manager = KernelManager(
      kernel_name='python3', connection_file=str(tmp_path / 'kernel.json'),
      kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = nbclient.NotebookClient(
      nb, km=manager, timeout=TIMEOUT, kernel_name='python3',
      resources={'metadata': {'path': str(path.parent)}})
  try:
    client.execute(env=_kernel_env())
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{path.name}: a cell failed:\n{e}', pytrace=False)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
  import nbformat
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != 'code':
      continue
    assert not cell.get('outputs') and cell.get('execution_count') is None, (
        f'{path.name} cell {i} has outputs or an execution count; clear them '
        f'(jupyter nbconvert --clear-output --inplace {path.name})')
