"""Reliability: kill -9 and --resume give the uninterrupted result, seeds, the EMA, the
non-finite guard, two ranks in sync."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HERE, SMALL, lora, max_diff, ok, run, torchrun
from opd_support import machinery
from opd_support.loras import LORA_FILE


@pytest.mark.parametrize("stage", ["teacher", "dmd"])
def test_sigkill_and_resume_equals_uninterrupted(stage, tmp_path, teacher_dir):
    """A teacher (RL epochs), and a DMD student: opd.distill's loop with two trained adapters (the
    student and its fake score), both restored with their optimizers, or the student's later
    rounds would differ. ("distill", the plain OPD student, runs the same loop with one.)"""
    import signal
    import time
    args = ["--stage", "teacher" if stage == "teacher" else "distill", "--optim_steps", "6", *SMALL]
    if stage != "teacher":
        args += ["--teachers", f"color={teacher_dir}"]
    if stage == "dmd":
        args += ["--loss", "dmd"]
    script = "baselines.py" if stage == "dmd" else "opd.py"
    sub = {"teacher": "teacher-color", "distill": "student", "dmd": "student-dmd"}[stage]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(*args, "--out", a, script=script).returncode == 0
    p = subprocess.Popen([sys.executable, script, *args, "--out", b], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not os.path.isdir(os.path.join(b, sub, "ckpt-0000002")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(b, sub, LORA_FILE))
    # a checkpoint cut off mid-write (no state.pt) and a temporary folder are ignored on resume
    os.makedirs(os.path.join(b, sub, "ckpt-0000099"))
    open(os.path.join(b, sub, "ckpt-0000099", "adapter.safetensors"), "wb").write(b"x")
    os.makedirs(os.path.join(b, sub, ".tmp-ckpt-0000100-1"))
    open(os.path.join(b, sub, ".tmp-ckpt-0000100-1", "state.pt"), "wb").write(b"x")
    r = run(*args, "--out", b, script=script)  # without --resume: refused, nothing touched
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run(*args, "--out", b, "--resume", script=script)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    assert max_diff(lora(os.path.join(a, sub)), lora(os.path.join(b, sub))) <= 1e-6


def test_same_seed_same_weights_other_seed_not(tmp_path):
    args = ["--stage", "teacher", "--optim_steps", "2", *SMALL]
    outs = [str(tmp_path / n) for n in "abc"]
    for o, seed in zip(outs, ["0", "0", "1"]):
        assert run(*args, "--seed", seed, "--out", o).returncode == 0
    a, b, c = (lora(os.path.join(o, "teacher-color")) for o in outs)
    assert max_diff(a, b) == 0 and max_diff(a, c) > 1e-4


def test_ema_follows_flow_grpo_schedule():
    """EMA against a direct evaluation of its recursion: e_s = d_s e_{s-1} + (1 - d_s) p_s on the
    steps s with s % every == 0, d_s = min((1 + s) / (10 + s), decay), e_0 = p_0."""
    w = torch.nn.Parameter(torch.zeros(2))
    ema, expect = machinery.EMA([w], 0.9, 2), torch.zeros(2)
    for s in range(1, 41):
        w.data = torch.tensor([float(s), -2.0 * s])
        ema.step(s)
        if s % 2 == 0:
            d = min((1 + s) / (10 + s), 0.9)
            expect = d * expect + (1 - d) * w.data
    assert torch.allclose(ema.shadow[0], expect, atol=1e-5)
    assert 0 < ema.shadow[0][0] < 40 - 5  # lags behind the weights
    ema.copy_to_params()
    assert torch.equal(w.data, ema.shadow[0])
    off = machinery.EMA([w], 0.0, 1)
    w.data = torch.ones(2); off.step(1); off.copy_to_params()
    assert torch.equal(w.data, torch.ones(2))  # decay 0: the saved weights are the trained ones


def test_non_finite_steps_are_skipped_then_abort():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    bad = 0
    for i in range(2):
        (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()  # a NaN gradient
        _, bad = machinery.guarded_step(opt, [w], 1.0, 3, bad, rank=0)
        assert bad == i + 1 and torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    w.sum().backward()  # a good step resets the count and moves the weights
    _, bad = machinery.guarded_step(opt, [w], 1.0, 3, bad, rank=0)
    assert bad == 0 and not torch.equal(w.detach(), torch.ones(3))
    with pytest.raises(machinery.UserError, match="non-finite"):
        for _ in range(3):
            (w * float("inf")).sum().backward()
            _, bad = machinery.guarded_step(opt, [w], 1.0, 3, bad, rank=0)


def test_torchrun_two_ranks_stay_identical(tmp_path):
    out = str(tmp_path / "o")
    r = torchrun("--stage", "all", "--optim_steps", "2", *SMALL, "--eval_sampler_steps", "4",
                 "--eval_prompts", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ranks in sync") == 2  # teacher and student, checked by comparing the
                                                 # weights
    assert (set(json.load(open(os.path.join(out, "eval.json"))))
            == {"base", "teacher-color", "student"})
    # DMD's second trained adapter (the fake score) is averaged over the ranks too
    r = torchrun("--stage", "distill", "--loss", "dmd", "--optim_steps", "2", *SMALL, "--teachers",
                 f"color={out}/teacher-color", "--out", out, script="baselines.py")
    assert r.returncode == 0 and "student-dmd fake: 2 ranks in sync" in r.stdout, r.stderr[-3000:]
    assert "student-dmd: 2 ranks in sync" in r.stdout
    # the same check catches unsynchronised gradients: each rank its own gradient, averaged over
    # the ranks by optimizer_step (weights equal) or not (world 1 on each: they diverge)
    script = tmp_path / "sync.py"
    script.write_text(
        "import torch\n"
        "from opd_support import machinery\n"
        "rank, world, _ = machinery.dist_setup('cpu')\n"
        "for reduce_over in (world, 1):\n"
        "    w = torch.nn.Parameter(torch.ones(4)); opt = torch.optim.AdamW([w], lr=0.1)\n"
        "    (w * (1.0 - 2 * rank)).sum().backward()\n"
        "    machinery.average_gradients([w], reduce_over)\n"
        "    machinery.guarded_step(opt, [w], 1.0, 5, 0, rank)\n"
        "    try:\n"
        "        machinery.check_in_sync([w], world, rank, 'w')\n"
        "    except machinery.UserError as e:\n"
        "        print('error:', e, flush=True) if rank == 0 else None\n")
    r = torchrun(script=str(script), env={"PYTHONPATH": HERE})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout.count("w: 2 ranks in sync") == 1
            and r.stdout.count("error: ranks diverged") == 1)


def test_resume_with_nothing_saved_says_so(tmp_path):
    r = ok(run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--resume", "--out",
               str(tmp_path / "o")))
    assert "--resume, but" in r.stdout and "holds no checkpoint: starting at step 0" in r.stdout
