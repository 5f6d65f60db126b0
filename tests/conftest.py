"""Shared fixtures: a tiny synthetic config and a work directory trained once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import pytest

from configs import synthetic
from launch import common

# The suite checks the math against NumPy references and across meshes and processes at float32
# tolerances, which a GPU's default matmul precision (TF32, ~1e-3 relative) cannot meet. Set in the
# environment too, so that the processes the tests start inherit it. CPU float32 is unchanged.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])
# Same seed, same parameters: what the entry points ask of a GPU (their run_cli), asked here for
# the tests that train in this process.
common.deterministic_gpu_ops()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """The default synthetic config, shrunk to run in seconds."""
  c = synthetic.get_config()
  c.data.synthetic.update(num_users=300, num_items=200, num_interactions=9000, num_categories=8)
  c.data.history_length = 8
  c.train.batch_size = 256
  c.train.num_epochs = 4.0
  c.train.log_every_steps = 5
  c.train.checkpoint_every_steps = 10
  c.train.update(eval_every_steps=0, select_by="")  # no periodic validation: no best checkpoint
  c.eval.user_batch_size = 128
  return c


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A work directory with a finished tiny training run (shared, read-only for tests)."""
  from two_tower.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("trained"))
  train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  """A private copy of the trained work directory, without index and candidates, to write into."""
  path = str(tmp_path / "work")
  shutil.copytree(trained_workdir, path, ignore=shutil.ignore_patterns("index", "candidates"))
  return path


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600):
  """Runs `python -m module args...` from the repo root; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
