"""Where the tests find the real corpora: $TRANSFLAX_DATA, else ../shared/data."""

import os
import pathlib

import pytest


def data_root() -> pathlib.Path:
  """The data root holding multi30k/ (and tinyshakespeare/); skips the test if absent."""
  for root in (os.environ.get('TRANSFLAX_DATA'),
               pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'):
    if root and (pathlib.Path(root) / 'multi30k' / 'train.en.gz').exists():
      return pathlib.Path(root)
  pytest.skip('Multi30k not found ($TRANSFLAX_DATA or ../shared/data)')
