"""Tests: the maths against independent computations, the toy and the script run tiny.
    python -m pytest -q test_opd.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal

import opd

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("n", [1, 10, 40])
def test_schedule_equals_diffusers(n):
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(n)
    assert torch.allclose(opd.sd3_sigmas(n), s.sigmas.float(), atol=1e-6)
    assert torch.allclose(opd.sd3_sigmas(n)[:-1] * 1000, s.timesteps.float(), atol=1e-3)


def rederived_mean(x, v, t, tn, a):
    """METHOD.md's second (expanded) form of the mean, written independently."""
    sig = a * math.sqrt(t / ((1 - tn) if t >= 1 else (1 - t)))
    dt = tn - t
    return (1 + sig**2 * dt / (2 * t)) * x + (1 + sig**2 * (1 - t) / (2 * t)) * v * dt, sig * math.sqrt(-dt)


@pytest.mark.parametrize("j", [0, 3, 8])
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_sde_step_matches_rederivation_and_normal(j, a):
    g = torch.Generator().manual_seed(0)
    sig = opd.sd3_sigmas(10)
    t, tn = sig[j].item(), sig[j + 1].item()
    x, v, eps = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    x_next, mu, std = opd.sde_step(x, v, t, tn, a, noise=eps)
    mu_ref, std_ref = rederived_mean(x.double(), v.double(), t, tn, a)
    assert torch.allclose(mu.double(), mu_ref, atol=1e-5)
    assert torch.allclose(std.double(), torch.full((3,), std_ref, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(x_next, mu + std_ref * eps, atol=1e-5)
    lp = Normal(mu, std[:, None, None]).log_prob(x_next).flatten(1)
    assert torch.allclose(opd.gaussian_logp(x_next, mu, std, "sum"), lp.sum(1), atol=1e-4)
    assert torch.allclose(opd.gaussian_logp(x_next, mu, std), lp.mean(1), atol=1e-5)
    assert torch.isfinite(x_next).all() and std.gt(0).all()  # t = 1 (j = 0) included


def test_ode_is_euler_fp32_and_draws_no_noise():
    x, v = torch.randn(2, 3).bfloat16(), torch.randn(2, 3).bfloat16()
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    x_next, mu, std = opd.sde_step(x, v, 0.6, 0.5, 0.0, generator=g)
    assert x_next.dtype == torch.float32 and torch.equal(g.get_state(), state)
    assert torch.allclose(x_next, x.float() + v.float() * (0.5 - 0.6)) and std.eq(0).all()


def test_closed_form_kl_matches_monte_carlo():
    """KL(N(mu_S, s^2) || N(mu_T, s^2)) by sampling, 4 standard errors; opd_loss is per element."""
    g = torch.Generator().manual_seed(0)
    D, n, s = 8, 200_000, 0.3
    mu_s, mu_t = torch.randn(D, generator=g) * 0.2, torch.randn(D, generator=g) * 0.2
    x = mu_s + s * torch.randn(n, D, generator=g)
    log_ratio = (Normal(mu_s, s).log_prob(x) - Normal(mu_t, s).log_prob(x)).sum(1)
    mc, se = log_ratio.mean(), log_ratio.std() / n**0.5
    closed = opd.opd_loss(mu_s[None], mu_t[None], torch.tensor([s]))[0] * D
    assert abs(closed - mc) < 4 * se
    # ODE (std = 0): 1/2 ||mu_S - mu_T||^2 / D
    assert torch.allclose(opd.opd_loss(mu_s[None], mu_t[None], torch.zeros(1))[0], 0.5 * (mu_s - mu_t).pow(2).mean())


@pytest.mark.parametrize("s", [0.05, 0.5])
def test_ppo_gradient_mean_equals_closed_form(s):
    """Per-draw gradients of rho * Delta w.r.t. mu_S: their mean is the closed-form gradient
    (each coordinate within 4 Monte-Carlo standard errors)."""
    g = torch.Generator().manual_seed(0)
    n, D = 100_000, 6
    mu_t = torch.randn(D, generator=g) * s
    mu0 = torch.randn(D, generator=g) * s
    mu = mu0.expand(n, D).clone().requires_grad_(True)
    x_next = mu0 + s * torch.randn(n, D, generator=g)
    std = torch.full((n,), s)
    opd.step_loss(mu, mu_t.expand(n, D), std, x_next, "ppo").sum().backward()
    per_draw = mu.grad
    mu1 = mu0.clone().requires_grad_(True)
    opd.opd_loss(mu1[None], mu_t[None], torch.tensor([s])).sum().backward()
    mean, se = per_draw.mean(0), per_draw.std(0) / n**0.5
    assert ((mean - mu1.grad).abs() < 4 * se).all()
    assert per_draw.std(0).gt(0).all()  # the PPO estimator has variance, the closed form none


def test_grpo_guard_ratio():
    g = torch.Generator().manual_seed(0)
    B, D, s, dt = 4, 10, 0.2, -0.1
    mu_old, eps = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    x_next, mu = mu_old + s * eps, mu_old + 0.01 * torch.randn(B, D, generator=g)
    std, adv = torch.full((B,), s), torch.ones(B)
    # with A = 1 and no clipping the loss is -ratio
    loss = opd.grpo_loss(mu, mu_old, x_next, std, dt, adv, 1e9, ratio_norm=True, dt_reweight=False)
    assert torch.allclose(torch.log(-loss), (eps * (mu - mu_old)).mean(1), atol=1e-6)
    # plain Flow-GRPO: the ratio of element-mean densities
    loss = opd.grpo_loss(mu, mu_old, x_next, std, dt, adv, 1e9, ratio_norm=False, dt_reweight=False)
    ref = (Normal(mu, s).log_prob(x_next) - Normal(mu_old, s).log_prob(x_next)).mean(1)
    assert torch.allclose(torch.log(-loss), ref, atol=1e-5)
    # on-policy the ratio is exactly 1; 1/|dt| reweighting
    loss = opd.grpo_loss(mu_old, mu_old, x_next, std, dt, 3 * adv, 2e-6)
    assert torch.equal(loss, torch.full((B,), -3.0) / 0.1)
    # clipping: a positive advantage gains nothing beyond 1 + e
    far = mu_old + 0.5 * eps * s
    loss = opd.grpo_loss(far, mu_old, x_next, std, dt, adv, 1e-3, dt_reweight=False)
    assert torch.allclose(loss, torch.full((B,), -(1 + 1e-3)))


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    a = opd.group_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.allclose(a[:3].mean(), torch.tensor(0.0), atol=1e-6) and a[3:].eq(0).all()
    assert torch.allclose(a[:3].std(unbiased=False), torch.tensor(1.0), atol=1e-3)


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", "import opd, sys; print(sorted(m for m in sys.modules if m.startswith(('diffusers','transformers','peft'))))"],
                         cwd=HERE, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- the toy
def test_sanity_quick():
    import sanity
    out = sanity.main(["--quick", "--figure", ""])
    n_fixed = 4
    for a, rel, se, _ in out["grad"][:n_fixed]:
        assert rel < 4 * se + 0.02  # PPO is unbiased ...
    rel_var = [row[3] for row in out["grad"][:n_fixed]]
    assert rel_var[-1] > 5 * rel_var[0]  # ... with a variance that grows as a shrinks (a = 1 -> 0.1)
    traj = out["grad"][n_fixed:]
    assert all(vp > vc for _, vc, vp in traj) and traj[-1][2] / traj[-1][1] > traj[0][2] / traj[0][1]
    noise = out["noise"]
    assert noise["teacher"] > noise["base"] + 0.3 and noise["hit"][0.0] is not None
    t = out["multitask"]
    for k in ("upper", "right", "mode"):
        gain = t[f"teacher-{k}"][k] - t["base"][k]
        assert gain > 0.3 and t["OPD"][k] - t["base"][k] > 0.8 * gain  # OPD keeps >= 80% of each gain
    assert t["OPD"]["avg"] > max(t["joint RL"]["avg"], t["cascade RL"]["avg"])


# ------------------------------------------------------------------------------------- SD3 path
@pytest.fixture(scope="module")
def tiny():
    cfg = opd.resolve(opd.parse_config(["--num_steps", "4"]), "distill")
    dev = torch.device("cpu")
    return opd.SD3(opd.load_pipeline(cfg, dev), cfg, dev), cfg


def _randomise(tr, name, seed):
    g = torch.Generator().manual_seed(seed)
    for n, p in tr.named_parameters():
        if f"lora_B.{name}." in n:
            p.data = 0.3 * torch.randn(p.shape, generator=g)


def test_fused_equals_two_pass_gradient(tiny):
    m, cfg = tiny
    tr = m.tr
    opd.add_lora(tr, "teacher-x", cfg); _randomise(tr, "teacher-x", 1)
    params = m.trainable = opd.add_lora(tr, "student", cfg); _randomise(tr, "student", 2)
    m.active = "student"
    sig, prompts = opd.sd3_sigmas(cfg.num_steps), ["a red cat", "a bright dog on the left"]
    grads = []
    for a in (0.0, 0.7):
        for two_pass in (False, True):
            g = torch.Generator().manual_seed(3)
            for p in params:
                p.grad = None
            opd.distill_trajectory(m.velocity("student", prompts, 4.5), m.velocity("teacher-x", prompts, 4.5),
                                   m.noise(2, g), sig, a, [0, 1, 2], backward=lambda l: l.backward(),
                                   two_pass=two_pass, generator=g)
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
    opd._drop_adapters(m)
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[2], grads[3], rtol=1e-4, atol=1e-7)


def test_saved_lora_loads_into_fresh_pipeline(tiny, tmp_path):
    m, cfg = tiny
    opd.add_lora(m.tr, "policy", cfg); _randomise(m.tr, "policy", 4)
    m.active = "?"
    x, g = m.noise(2, torch.Generator().manual_seed(0)), None
    ref = m.velocity("policy", ["a red cat", "a blue car"], 4.5)(x, torch.tensor(0.5))
    base = m.velocity(None, ["a red cat", "a blue car"], 4.5)(x, torch.tensor(0.5))
    opd.save_lora(str(tmp_path), m.tr, "policy")
    opd._drop_adapters(m)
    pipe = opd.load_pipeline(cfg, torch.device("cpu"))
    pipe.load_lora_weights(str(tmp_path))  # plain diffusers loading
    m2 = opd.SD3(pipe, cfg, torch.device("cpu"))
    m2.active = pipe.transformer.active_adapters()[0]
    out = m2.velocity(m2.active, ["a red cat", "a blue car"], 4.5)(x, torch.tensor(0.5))
    assert not torch.allclose(ref, base, atol=1e-4)  # the adapter matters ...
    assert torch.allclose(out, ref, atol=1e-5)  # ... and is reproduced, alpha included


# ------------------------------------------------------------------------------------- the script
def run(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "opd.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_script_tiny_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    small = ["--steps", "2", "--batch_size", "8", "--group_size", "4", "--eval_steps", "4",
             "--eval_prompts", "2", "--out", out, "--tasks", "color,position"]
    r = run("--stage", "all", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.load(open(os.path.join(out, "eval.json")))
    assert set(table) == {"base", "teacher-color", "teacher-position", "student"}
    assert all(set(v) == {"color", "position"} for v in table.values())
    assert os.path.isfile(os.path.join(out, "samples.png")) and "| model |" in open(os.path.join(out, "eval.md")).read()
    rows = [json.loads(l) for l in open(os.path.join(out, "student", "metrics.jsonl"))]
    assert len(rows) == 2 and {"time_teacher", "time_backward", "model_share"} <= set(rows[0])
    # a finished stage is reused, not redone
    r = run("--stage", "distill", *small)
    assert r.returncode == 0 and "reused" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--noise_level", "-1"], "noise_level"),
    (["--stage", "bogus"], "unknown stage"),
    (["--stage", "teacher", "--task", "bogus"], "unknown task"),
    (["--stage", "distill", "--loss", "ppo"], "noise_level > 0"),
    (["--stage", "distill", "--teachers", "color=/nonexistent"], "--stage teacher --task color"),
    (["--stage", "teacher", "--task", "ocr", "--prompts", "/nonexistent.txt"], "not found"),
    (["--stage", "teacher", "--reward", "nope"], "unknown reward"),
    (["--model", "/nonexistent/sd3-folder", "--stage", "teacher"], "cannot load model"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path):
    r = run(*args, "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]


# ------------------------------------------------------------------------------------- reliability
SMALL = ["--batch_size", "8", "--group_size", "4", "--num_steps", "4", "--save_every", "1", "--tasks", "color"]


def _lora(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, opd.LORA_FILE))


def _max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _tree(d):
    """Every file under d with its bytes: to show that a failed run touched nothing."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t"))
    r = run("--stage", "teacher", "--steps", "2", *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(out, "teacher-color")


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_sigkill_and_resume_equals_uninterrupted(stage, tmp_path, teacher_dir):
    import signal
    import time
    args = ["--stage", stage, "--steps", "6", *SMALL]
    if stage == "distill":
        args += ["--teachers", f"color={teacher_dir}"]
    sub = "teacher-color" if stage == "teacher" else "student"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(*args, "--out", a).returncode == 0
    p = subprocess.Popen([sys.executable, "opd.py", *args, "--out", b], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not os.path.isdir(os.path.join(b, sub, "ckpt-0000002")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(b, sub, opd.LORA_FILE))
    # a checkpoint cut off mid-write (no state.pt) and a temporary folder are ignored on resume
    os.makedirs(os.path.join(b, sub, "ckpt-0000099")); open(os.path.join(b, sub, "ckpt-0000099", "adapter.safetensors"), "wb").write(b"x")
    os.makedirs(os.path.join(b, sub, ".tmp-ckpt-0000100-1")); open(os.path.join(b, sub, ".tmp-ckpt-0000100-1", "state.pt"), "wb").write(b"x")
    r = run(*args, "--out", b)  # without --resume: refused, nothing touched
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run(*args, "--out", b, "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    assert _max_diff(_lora(os.path.join(a, sub)), _lora(os.path.join(b, sub))) <= 1e-6


def test_same_seed_same_weights_other_seed_not(tmp_path):
    args = ["--stage", "teacher", "--steps", "2", *SMALL]
    outs = [str(tmp_path / n) for n in "abc"]
    for o, seed in zip(outs, ["0", "0", "1"]):
        assert run(*args, "--seed", seed, "--out", o).returncode == 0
    a, b, c = (_lora(os.path.join(o, "teacher-color")) for o in outs)
    assert _max_diff(a, b) == 0 and _max_diff(a, c) > 1e-4


def test_bad_resume_and_foreign_checkpoint_touch_nothing(tmp_path):
    out = str(tmp_path / "o")
    assert run("--stage", "teacher", "--steps", "2", *SMALL, "--out", out).returncode == 0
    os.remove(os.path.join(out, "teacher-color", opd.LORA_FILE))  # now an unfinished run
    before = _tree(out)
    for extra, needle in [(["--resume", "--lora_rank", "8"], "--lora_rank 32"),
                          (["--resume", "--lora_alpha", "16"], "--lora_alpha 64"),
                          (["--resume", "--model", "sd35m-random"], "--model tiny"),
                          ([], "--resume")]:
        r = run("--stage", "teacher", "--steps", "2", *SMALL, "--out", out, *extra)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]
    assert _tree(out) == before


def test_more_bad_inputs(tmp_path, teacher_dir):
    from safetensors.torch import save_file
    bad = tmp_path / "other-model"
    bad.mkdir()  # a LoRA whose shapes fit another model
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 96),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(96, 4)},
              str(bad / opd.LORA_FILE))
    (tmp_path / "empty.txt").write_text("\n\n")
    out = str(tmp_path / "o")
    cases = [(["--stage", "distill", "--teachers", f"color={bad}"], "does not fit"),
             (["--stage", "teacher", "--task", "ocr", "--prompts", str(tmp_path / "empty.txt")], "is empty"),
             (["--stage", "teacher", "--batch_size", "8"], "does not divide across 3 ranks")]
    for args, needle in cases:
        env = {"WORLD_SIZE": "3"} if "ranks" in needle else None
        r = run(*args, "--out", out, env=env, timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]


def test_non_finite_steps_are_skipped_then_abort():
    cfg = opd.Config(max_bad_steps=3)
    w = torch.nn.Parameter(torch.ones(3))
    opt = opd.make_optimizer([w], opd.resolve(cfg, "teacher"))
    bad = 0
    for i in range(2):
        (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()  # a NaN gradient
        _, bad = opd.guarded_step(opt, [w], cfg, bad, rank=0)
        assert bad == i + 1 and torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    w.sum().backward()  # a good step resets the count and moves the weights
    _, bad = opd.guarded_step(opt, [w], cfg, bad, rank=0)
    assert bad == 0 and not torch.equal(w.detach(), torch.ones(3))
    with pytest.raises(opd.UserError, match="non-finite"):
        for _ in range(3):
            (w * float("inf")).sum().backward()
            _, bad = opd.guarded_step(opt, [w], cfg, bad, rank=0)


# ------------------------------------------------------------------------------------- torchrun
def torchrun(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "opd.py", *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=e)


def test_torchrun_two_ranks_stay_identical(tmp_path):
    out = str(tmp_path / "o")
    r = torchrun("--stage", "all", "--steps", "2", *SMALL, "--eval_steps", "4", "--eval_prompts", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ranks in sync") == 2  # teacher and student, checked by comparing the weights
    assert set(json.load(open(os.path.join(out, "eval.json")))) == {"base", "teacher-color", "student"}
    # without gradient sync (the DDP trap) the ranks drift apart, and the check says so
    r = torchrun("--stage", "teacher", "--steps", "2", *SMALL, "--out", str(tmp_path / "n"),
                 env={"OPD_TEST_NO_GRAD_SYNC": "1"})
    assert r.returncode != 0 and "ranks diverged" in r.stderr


# ------------------------------------------------------------------------------------- rewards
def _render(text, w=512, h=256):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).text((20, h // 2 - 30), text, fill="black", font=ImageFont.load_default(size=56))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text_offline():
    import rewards
    fn = rewards.load("ocr")
    target = 'a street sign that says "Hello World"'
    texts = ["Hello World", "Helo World", "Helo Wrld", ""]
    r = fn(torch.stack([_render(t) for t in texts]), [target] * len(texts))
    assert r.shape == (4,) and r[0] >= 0.9 and r[3] == 0
    for t, got in zip(texts[1:3], r[1:3]):  # a misspelled render scores as its edit distance predicts
        want = 1 - rewards._levenshtein(t.lower().replace(" ", ""), "helloworld") / len("helloworld")
        assert abs(got.item() - want) < 1e-6, (t, got, want)
