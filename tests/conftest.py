import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The test models are tiny: one thread beats two (thread sync costs more than the matmuls), and the test
# subprocesses (CLI runs) inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def run_cli(*args, cwd=None, input=None, timeout=600, env=None, check=True):
    """Run `python -m pocketgpt ARGS` as a user would; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "pocketgpt", *map(str, args)], cwd=cwd, input=input, text=True,
                       capture_output=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"pocketgpt {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def one_thread():
    """(Kept for tests that say so explicitly: conftest already runs everything on one thread.) Tiny models run faster single-threaded (and much faster on a busy machine); results are deterministic."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_config(**kw):
    from pocketgpt import GPTConfig

    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)
