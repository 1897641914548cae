"""Test setup: 8 simulated CPU devices, before anything imports jax.

The whole session shares one persistent compilation cache: the in-process
tests and the `python -m train` subprocesses (tests/tiny_run.py) compile the
same small programs many times over, and on 2 cores compiling is much of the
suite's time. The cache hands back the very executable XLA built, so
results are the same with it or without.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="transflax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
  """(experiment file, {stage: workdir}): the tiny chat chain of
  tests/tiny_chat.py (pretrain -> sft -> reward) trained in-process once
  for the RL, judge, chat and serve tests."""
  import tiny_chat
  from train import loop
  root = tmp_path_factory.mktemp("rl_chain")
  workdirs = {s: root / s for s in ("pretrain", "sft", "reward")}
  experiment = tiny_chat.write(root / "data", sources={
      "source_sft": str(workdirs["pretrain"]),
      "source_reward": str(workdirs["sft"]), "source_dpo": ""})
  for stage in ("pretrain", "sft", "reward"):
    loop.train_and_evaluate(tiny_chat.load_config(experiment, stage),
                            str(workdirs[stage]), evaluate_at_end=False)
  return experiment, workdirs
