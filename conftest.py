"""What the test files share: running a script as a user would, the tiny model in-process, a
small teacher, and the assertions they repeat."""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never use the network

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--batch_size", "8", "--group_size", "4", "--sampler_steps", "4", "--save_every", "1",
         "--tasks", "color"]


def run(*args, script="opd.py", env=None, timeout=600):
    """`python <script> args...` in the repository, as a user types it."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, script, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=e)


def torchrun(*args, script="opd.py", env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           script, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=e)


def ok(r):
    """A finished command's exit code 0, with its stderr's tail as the message otherwise."""
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_line_error(r, needle):
    """Bad input: exit code 2 and exactly one line on stderr, which contains needle."""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]


def lora(run_dir):
    from safetensors.torch import load_file
    from opd_support.loras import LORA_FILE
    return load_file(os.path.join(run_dir, LORA_FILE))


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def tree(d):
    """Every file under d with its bytes: to show that a failed run touched nothing."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def randomise(tr, name, seed):
    """Give an adapter's B (zero at init) random values, so that it changes the model."""
    g = torch.Generator().manual_seed(seed)
    for n, p in tr.named_parameters():
        if f"lora_B.{name}." in n:
            p.data = 0.3 * torch.randn(p.shape, generator=g)


@pytest.fixture(scope="session")
def tiny_sd3():
    from opd_support import config, sd3
    cfg = config.resolve(config.parse_config(["--sampler_steps", "4"]), "distill")
    dev = torch.device("cpu")
    return sd3.SD3(sd3.load_pipeline(cfg, dev), cfg, dev), cfg


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t"))
    ok(run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--out", out))
    return os.path.join(out, "teacher-color")
