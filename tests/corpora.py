"""Where the tests find the real corpora: $TRANSFLAX_DATA, else ../shared/data.

A test that needs a corpus (or the SmolLM2 GGUF) calls `missing(what)` when
it is absent: on a laptop without the data that skips the test, but where
the data must be there (CI: .ci/run sets TRANSFLAX_REQUIRE_DATA=1, and any
CI=true environment) it fails, so a lost corpus cannot turn tests into
silent skips.
"""

import os
import pathlib

import pytest


def required() -> bool:
  return bool(os.environ.get('TRANSFLAX_REQUIRE_DATA')) or (
      os.environ.get('CI', '').lower() in ('1', 'true', 'yes'))


def missing(what: str):
  """Skips the test, or fails it where the data is required."""
  message = (f'{what} not found ($TRANSFLAX_DATA={os.environ.get("TRANSFLAX_DATA")!r}, '
             f'../shared/data)')
  if required():
    pytest.fail(f'{message}; this run requires the data (TRANSFLAX_REQUIRE_DATA '
                f'or CI is set): put ../shared beside the checkout', pytrace=False)
  pytest.skip(message)


def data_root() -> pathlib.Path:
  """The data root holding multi30k/ (and tinyshakespeare/), else `missing`."""
  for root in (os.environ.get('TRANSFLAX_DATA'),
               pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'):
    if root and (pathlib.Path(root) / 'multi30k' / 'train.en.gz').exists():
      return pathlib.Path(root)
  missing('Multi30k (multi30k/train.en.gz)')
