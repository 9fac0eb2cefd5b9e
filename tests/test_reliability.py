"""Reliability: kill -9 and --resume give the uninterrupted result, seeds, the EMA, the
non-finite guard, two ranks in sync."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HERE, SMALL, lora, max_diff, ok, one_line_error, run, torchrun, tree
from opd_support import machinery
from opd_support.loras import LORA_FILE


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "distill", "dmd"])
def test_killed_or_stopped_then_resumed_equals_uninterrupted(stage, tmp_path, teacher_dir):
    """Three stage kinds: a teacher (RL epochs of two updates), a distillation, and a DMD student
    (opd.distill's loop with a second trained adapter, the fake score, restored with its
    optimizer). kill -9 after the 2nd checkpoint (teacher, DMD), and kill -TERM after the first
    optimizer step (a teacher: mid-epoch): the step in flight finishes, a checkpoint is written,
    one line, exit code 75, well inside 30 s. --resume after either gives the uninterrupted
    run's LoRA (checkpoints change no number: the uninterrupted run saves every step)."""
    import signal
    import time
    args = ["--stage", "teacher" if stage == "teacher" else "distill", "--optim_steps", "6", *SMALL]
    if stage != "teacher":
        args += ["--teachers", f"color={teacher_dir}"]
    if stage == "dmd":
        args += ["--loss", "dmd"]
    script = "baselines.py" if stage == "dmd" else "opd.py"
    sub = {"teacher": "teacher-color", "distill": "student", "dmd": "student-dmd"}[stage]
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    ok(run(*args, "--out", a, script=script))
    if stage != "distill":  # kill -9 (the plain student runs the same loop as DMD's)
        p = _start(args, b, script)
        assert _wait_for(os.path.join(b, sub, "ckpt-0000002", "manifest.json"), p)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL
        assert not os.path.exists(os.path.join(b, sub, LORA_FILE))
        # a checkpoint cut off mid-write (no state.pt) and a temporary folder are ignored
        os.makedirs(os.path.join(b, sub, "ckpt-0000099"))
        open(os.path.join(b, sub, "ckpt-0000099", "adapter.safetensors"), "wb").write(b"x")
        os.makedirs(os.path.join(b, sub, ".tmp-ckpt-0000100-1"))
        open(os.path.join(b, sub, ".tmp-ckpt-0000100-1", "state.pt"), "wb").write(b"x")
        r = run(*args, "--out", b, script=script)  # without --resume: refused, nothing touched
        assert r.returncode == 2 and "--resume" in r.stderr
        r = ok(run(*args, "--out", b, "--resume", script=script))
        assert "resumed" in r.stdout
        assert max_diff(lora(os.path.join(a, sub)), lora(os.path.join(b, sub))) <= 1e-6
    term = [*args, "--save_every", "100"]
    p = _start(term, c, script)
    assert _wait_for(os.path.join(c, sub, "metrics.jsonl"), p, lambda t: '"grad_norm"' in t)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    seconds = time.time() - t0
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 75 and seconds < 30, (p.returncode, err[-2000:])
    assert lines[-1].startswith("stopped at step ") and "--resume continues" in lines[-1]
    step = int(lines[-1].split()[3].rstrip(","))
    assert step < 6  # a teacher: before its next update, inside an epoch or at its end
    assert os.path.isdir(os.path.join(c, sub, f"ckpt-{step:07d}"))
    assert not os.path.exists(os.path.join(c, sub, LORA_FILE))
    r = ok(run(*term, "--out", c, "--resume", script=script))
    assert f"resumed {os.path.join(c, sub)} at step {step}" in r.stdout
    assert max_diff(lora(os.path.join(a, sub)), lora(os.path.join(c, sub))) <= 1e-6


@pytest.mark.slow
def test_a_stop_inside_an_rl_epoch_resumes_exactly(tmp_path):
    """SIGUSR1 after the first update of a 4-update GRPO-Guard epoch: the run stops before its
    next update (not at the epoch's end), exit code 75, its checkpoint holding the weights the
    epoch began with; --resume draws the epoch's samples again from them and ends with the
    uninterrupted run's LoRA and training rows (max difference <= 1e-6)."""
    import signal
    import time
    args = ["--stage", "teacher", "--optim_steps", "8", "--updates_per_epoch", "4", *SMALL,
            "--batch_size", "16", "--save_every", "100"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ok(run(*args, "--out", a))
    p = _start(args, b, "opd.py")
    rows = os.path.join(b, "teacher-color", "metrics.jsonl")
    assert _wait_for(rows, p, lambda t: '"step": 1,' in t and '"grad_norm"' in t)
    t0 = time.time()
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    seconds = time.time() - t0
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert p.returncode == 75 and seconds < 30, (p.returncode, err[-2000:])
    step = int(last.split()[3].rstrip(","))
    assert 1 <= step <= 3, last  # inside the first epoch (steps 0..3), not at its end
    from opd_support import checkpoints as ck
    state = ck.read_state(os.path.join(b, "teacher-color", f"ckpt-{step:07d}", "state.pt"))
    assert state["step"] == step and state["epoch_start"]
    r = ok(run(*args, "--out", b, "--resume"))
    assert f"at step {step}" in r.stdout
    assert max_diff(lora(os.path.join(a, "teacher-color")), lora(os.path.join(b, "teacher-color"))
                    ) <= 1e-6
    rows_a, rows_b = ([{k: v for k, v in json.loads(line).items() if k != "elapsed"}
                       for line in open(os.path.join(o, "teacher-color", "metrics.jsonl"))]
                      for o in (a, b))
    assert len(rows_a) == len(rows_b) == 8
    for x, y in zip(rows_a, rows_b):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-6 * (1 + abs(x[k])) for k in x)


@pytest.mark.slow
def test_resume_continues_a_finished_run_or_says_it_is_done(tmp_path, teacher_dir):
    """A distillation that finished at step 2 (its checkpoint written at its end, --save_every
    20), then --resume --optim_steps 4: it continues from that checkpoint and ends with the LoRA
    of one 4-step run (max difference <= 1e-6). Asked for no more steps, or more without
    --resume, it says in one line that it is done and changes nothing; asked to continue with
    another rank and learning rate, one line lists both, exit code 2, nothing changes."""
    args = ["--stage", "distill", "--teachers", f"color={teacher_dir}", *SMALL, "--save_every",
            "20"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ok(run(*args, "--optim_steps", "4", "--out", a))
    ok(run(*args, "--optim_steps", "2", "--out", b))
    r = ok(run(*args, "--optim_steps", "4", "--resume", "--out", b))
    assert "resumed" in r.stdout and "at step 2" in r.stdout
    student = os.path.join(b, "student")
    assert max_diff(lora(os.path.join(a, "student")), lora(student)) <= 1e-6
    before = tree(b)
    for extra, needle in [(["--optim_steps", "3", "--resume"], "(--overwrite to redo)"),
                          (["--optim_steps", "4", "--resume"], "(--overwrite to redo)"),
                          (["--optim_steps", "6"], "(--resume continues it to step 6)")]:
        r = ok(run(*args, *extra, "--out", b))
        done = [line for line in r.stdout.splitlines() if "reused" in line]
        assert len(done) == 1 and "trained for --optim_steps 4" in done[0] and needle in done[0]
    for steps in ("6", "4"):  # to continue, or done: either way not the run it asks for
        r = run(*args, "--optim_steps", steps, "--resume", "--lora_rank", "8", "--lr", "0.01",
                "--out", b)
        one_line_error(r, f"{student} was trained with --lora_rank 32 (now 8), --lr 0.003 (now "
                          f"0.01)")
    assert tree(b) == before


def test_resume_compares_every_option_but_those_that_may_change(teacher_dir, tmp_path):
    """One rule over every Config field: each one changed alone stops --resume with one line
    naming it, unless it is among those that may change (config.RESUMABLE; a teacher's also
    TEACHER_RESUMABLE, which a student's run compares), against a checkpoint's config and a
    finished run's config.json alike; several changed are listed together."""
    import dataclasses
    import shutil
    from opd_support import checkpoints as ck
    from opd_support import runs
    from opd_support.config import RESUMABLE, TEACHER_RESUMABLE, Config
    saved = ck.read_state(os.path.join(teacher_dir, ck.checkpoints(teacher_dir)[-1],
                                       "state.pt"))["config"]
    cfg = Config(**saved)
    student = str(tmp_path / "student")  # the same checkpoints in a folder of another stage
    shutil.copytree(teacher_dir, student)

    def other(v):
        return not v if type(v) is bool else v + 1 if type(v) is int else \
            v * 2 + 1 if type(v) is float else v + ",x"
    assert ck.check_resume(teacher_dir, cfg)[1]["step"] == 2
    for f in dataclasses.fields(Config):
        changed = dataclasses.replace(cfg, **{f.name: other(getattr(cfg, f.name))})
        for folder, free in [(teacher_dir, RESUMABLE | TEACHER_RESUMABLE),
                             (student, RESUMABLE)]:
            for check in (lambda: ck.check_resume(folder, changed),  # the checkpoint's
                          lambda: runs.plan(folder, dataclasses.replace(changed, resume=True),
                                            "x")):  # a finished run's config.json
                if f.name in free:
                    check()
                else:
                    with pytest.raises(machinery.UserError, match=f"--{f.name} "):
                        check()
    both = dataclasses.replace(cfg, lora_rank=8, seed=3, optim_steps=99)
    with pytest.raises(machinery.UserError) as e:
        ck.check_resume(teacher_dir, both)
    assert "--seed 0 (now 3), --lora_rank 32 (now 8): give the same" in str(e.value)
    assert "\n" not in str(e.value) and "optim_steps" not in str(e.value)


@pytest.mark.slow
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


@pytest.mark.slow
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
        "        print('error:', e, flush=True) if rank == 0 else None\n"
        "machinery.leave(0)\n")  # as every entry point ends: an interpreter shutdown can abort
    r = torchrun(script=str(script), env={"PYTHONPATH": HERE})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout.count("w: 2 ranks in sync") == 1
            and r.stdout.count("error: ranks diverged") == 1)


@pytest.mark.slow
def test_resume_with_nothing_saved_says_so(tmp_path):
    r = ok(run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--resume", "--out",
               str(tmp_path / "o")))
    assert "--resume, but" in r.stdout and "holds no checkpoint: starting at step 0" in r.stdout


def _start(args, out, script="opd.py"):
    return subprocess.Popen([sys.executable, script, *args, "--out", out], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path, p, pred=lambda text: True, timeout=300):
    """Wait until the file exists (and its text satisfies pred) while p runs."""
    import time
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if os.path.isfile(path) and pred(open(path).read()):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_the_one_before(tmp_path):
    args = ["--stage", "teacher", "--optim_steps", "6", *SMALL]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ok(run(*args, "--out", a))
    ok(run(*args, "--out", b))
    run_dir = os.path.join(b, "teacher-color")
    os.remove(os.path.join(run_dir, LORA_FILE))  # an unfinished run, checkpoints 4 and 6 kept
    state = os.path.join(run_dir, "ckpt-0000006", "state.pt")
    open(state, "r+b").truncate(os.path.getsize(state) // 2)  # a copy cut off by a failure
    r = ok(run(*args, "--out", b, "--resume"))
    warn = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "ckpt-0000006" in warn[0] and "ckpt-0000004" in warn[0]
    assert "state.pt has" in warn[0] and "at step 4" in r.stdout
    assert max_diff(lora(os.path.join(a, "teacher-color")), lora(run_dir)) <= 1e-6
    os.remove(os.path.join(run_dir, LORA_FILE))
    for ck in os.listdir(run_dir):
        if ck.startswith("ckpt-"):
            with open(os.path.join(run_dir, ck, "adapter.safetensors"), "r+b") as f:
                f.write(b"garbage!")  # same size, another sha256
    r = run(*args, "--out", b, "--resume")
    one_line = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(one_line) == 1 and "is intact" in one_line[0], r.stderr


def test_a_full_disk_is_one_line_and_keeps_what_was_saved(tmp_path, monkeypatch):
    """A write error while saving a checkpoint (simulated: torch.save raises ENOSPC): one
    UserError naming the folder and the space needed, no temporary folder, the earlier
    checkpoint intact and still verified."""
    import errno
    from opd_support import checkpoints as ck
    run_dir = str(tmp_path)
    w = {"w": torch.ones(1000)}
    state = {"step": 1, "optimizers": [], "config": {}, "emas": [], "aux": [],
             "torch_rng": torch.get_rng_state(), "x": torch.zeros(10)}
    ck.save_checkpoint(run_dir, 1, [w], state)
    before = tree(run_dir)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(machinery.UserError, match=rf"cannot write to {run_dir}: No space left on "
                                                  r"device \(about 0 MB needed"):
        ck.save_checkpoint(run_dir, 2, [w], {**state, "step": 2})
    assert tree(run_dir) == before and ck.verify(os.path.join(run_dir, "ckpt-0000001")) is None


@pytest.mark.slow
def test_a_full_tmpfs_is_one_line(tmp_path):
    """The same through the command line on a 64 kB tmpfs (where this machine may mount one):
    the first checkpoint does not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        r = run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--out", str(disk / "o"))
        one_line_error(r, f"cannot write to {disk / 'o' / 'teacher-color'}: No space left")
        assert not [d for d in os.listdir(disk / "o" / "teacher-color") if d.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_one_run_per_folder(tmp_path):
    """A second run on a folder in use stops with one line naming the holder's pid and host;
    the lock of a killed run (its pid gone) is taken over with one line."""
    import signal
    import socket
    out = str(tmp_path / "o")
    p = _start(["--stage", "teacher", "--optim_steps", "40", *SMALL], out)
    assert _wait_for(os.path.join(out, "run.lock"), p, lambda t: t.endswith("}"))
    r = run("--stage", "eval", "--tasks", "color", "--out", out)
    one_line_error(r, f"is in use by another run (pid {p.pid} on host {socket.gethostname()}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = ok(run("--stage", "eval", "--tasks", "color", "--eval_sampler_steps", "2",
               "--eval_prompts", "1", "--eval_seeds", "1", "--out", out))
    assert f"left by a run that is gone (pid {p.pid}" in r.stdout
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released at the end


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA accepts --device cuda")
def test_bench_gpu_check_without_cuda_is_one_line(tmp_path):
    r = run("--gpu_check", "--device", "cuda", "--out", str(tmp_path), script="bench.py")
    one_line_error(r, "--device cuda: no CUDA device is available")


@pytest.mark.slow
def test_tensorboard_wandb_and_the_curves_command(tmp_path):
    """--log_to tensorboard writes the rows of metrics.jsonl as event files (read back with
    tensorboard's own reader); --log_to wandb hands the same rows to wandb.log (a stand-in
    package records them); `python -m opd_support.curves` draws the run."""
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import json, os\n"
        "class Run:\n"
        "    def __init__(self, **kw):\n"
        "        self.path = os.path.join(kw['dir'], 'wandb-rows.jsonl')\n"
        "    def log(self, row, step=None):\n"
        "        open(self.path, 'a').write(json.dumps({'step': step, **row}) + '\\n')\n"
        "    def finish(self):\n"
        "        pass\n"
        "def init(**kw):\n"
        "    return Run(**kw)\n")
    out = str(tmp_path / "o")
    ok(run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--eval_every", "2",
           "--eval_sampler_steps", "2", "--eval_prompts", "1", "--eval_seeds", "1",
           "--log_to", "tensorboard,wandb", "--out", out,
           env={"PYTHONPATH": str(tmp_path / "fake"), "WANDB_MODE": "offline"}))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = os.path.join(out, "teacher-color")
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    want = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    want |= {f"val/{t}" for r in rows if "val" in r for t in r["val"]}
    assert {"reward_color", "grad_norm", "clipfrac", "lr", "elapsed", "val/color"} <= want == tags
    assert [e.step for e in acc.Scalars("grad_norm")] == [1, 2]
    logged = [json.loads(line) for line in open(os.path.join(run_dir, "wandb-rows.jsonl"))]
    assert [r["step"] for r in logged] == [r["step"] for r in rows]
    assert logged[1]["grad_norm"] == rows[1]["grad_norm"]
    r = ok(subprocess.run([sys.executable, "-m", "opd_support.curves", out], cwd=HERE,
                          capture_output=True, text=True, timeout=120))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000 and "teacher-color" in r.stdout


def test_prompts_are_drawn_without_replacement_per_epoch():
    """Each pass over a task's train prompts (an epoch) visits every prompt once, in a fresh
    order each epoch; a draw is a function of (seed, draw) alone (what --resume relies on)."""
    from opd_support import config, prompts
    task = prompts.Task("t", [f"p{i}" for i in range(10)], [], None)
    cfg = config.Config()
    draws = [prompts.draw_prompts(cfg, task, d, 0, 4) for d in range(5)]  # 20 = 2 epochs
    flat = [p for d in draws for p in d]
    assert sorted(flat[:10]) == sorted(task.train) == sorted(flat[10:])
    assert flat[:10] != flat[10:]  # another order in the second epoch
    assert prompts.draw_prompts(cfg, task, 3, 0, 4) == draws[3]  # the same draw again
    other = prompts.draw_prompts(config.Config(seed=1), task, 0, 0, 4)
    assert other != draws[0] and prompts.draw_prompts(cfg, task, 0, 1, 4) != draws[0]


def test_three_ema_updates_with_the_same_weights_are_one_with_the_cube_of_the_decay():
    """The official trainer steps its EMA three times in a row with unchanged weights about every
    8th optimizer step; at the schedule's plateau (decay 0.9) that is one update with 0.729:
    --ema 0.729 --ema_every 8 reproduces it."""
    w = torch.nn.Parameter(torch.zeros(3))
    three, once = machinery.EMA([w], 0.9, 8), machinery.EMA([w], 0.729, 8)
    for s in range(96, 400, 8):  # s > 80: min((1 + s) / (10 + s), 0.9) = 0.9
        w.data = torch.tensor([1.0, -2.0, 0.5]) * s
        for _ in range(3):
            three.step(s)
        once.step(s)
    assert torch.allclose(three.shadow[0], once.shadow[0], rtol=1e-5)
