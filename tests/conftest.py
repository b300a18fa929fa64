"""Shared test fixtures: repo root on sys.path, tiny CPU settings, and a 2-process torchrun launcher."""
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread per test process: the suite runs in parallel with its own subprocesses (torchrun, script runs), and on
# a 2-core machine oversubscribed threads cost more than they give.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device, skipped without one; select with -m cuda '
                                       '(tests/test_cuda.py)')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_torchrun(script, args, nproc=2, timeout=300):
    """Run `torchrun --nproc_per_node=nproc script args` on CPU (gloo); returns the CompletedProcess and fails
    the test with the output if it did not exit 0."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', os.path.join(ROOT, script)] + list(args)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f'torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


def run_script(script, args, timeout=300):
    """Run `python script args` in a subprocess; returns the CompletedProcess (not asserted)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + list(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def torchrun():
    return run_torchrun


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'checkpoint.pt'), map_location='cpu', weights_only=True)
