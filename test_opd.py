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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never use the network
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
    # fp32 velocities up to ~35, rounding amplified by CFG 4.5: equal to 1e-4 (measured 2e-5)
    assert not torch.allclose(ref, base, rtol=1e-3, atol=1e-3)  # the adapter matters ...
    assert torch.allclose(out, ref, atol=1e-4)  # ... and is reproduced, alpha included


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


def test_reduced_run_teacher_beats_base_and_student_keeps_it(tmp_path):
    """`python opd.py` at a reduced scale (the position task alone, half the steps): the
    GRPO-Guard teacher must beat the base on held-out prompts by a margin that a broken reward
    sign, a swapped side, a lost gradient or an unloaded adapter would miss, and the student
    distilled from it must keep most of that gain (the full run's bar is 80%; here half)."""
    out = str(tmp_path / "run")
    r = run("--tasks", "position", "--steps", "30", "--eval_steps", "20", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.load(open(os.path.join(out, "eval.json")))
    base, teacher, student = (table[k]["position"] for k in ("base", "teacher-position", "student"))
    assert teacher - base > 0.03, table  # measured: +0.077 (0.540 -> 0.616), student +0.083, 3 fresh models
    assert student - base > 0.5 * (teacher - base), table


def test_bench_stage_prints_and_writes_numbers(tmp_path):
    r = run("--stage", "bench", "--steps", "1", "--batch_size", "4", "--num_steps", "3", "--tasks", "color,jpeg",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.load(open(tmp_path / "bench.json"))
    assert b["round_s_fused"] > 0 and b["round_s_two_pass"] > 0 and b["tasks"] == 2
    assert b["peak_mb_one_adapter"] > 0 and b["peak_mb_M_teachers"] > 0
    assert b["teacher_adapters_mb"] == pytest.approx(2 * b["adapter_mb"], abs=2e-3)  # 2 teachers, 1 student shape
    assert "two-pass" in r.stdout and "teacher adapters" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--noise_level", "-1"], "noise_level"),
    (["--stage", "bogus"], "unknown stage"),
    (["--stage", "teacher", "--task", "bogus"], "unknown task"),
    (["--stage", "distill", "--loss", "ppo"], "noise_level > 0"),
    (["--stage", "distill", "--teachers", "color=/nonexistent"], "--stage teacher --task color"),
    (["--stage", "teacher", "--task", "ocr", "--prompts", "/nonexistent.txt"], "not found"),
    (["--stage", "teacher", "--reward", "nope"], "unknown reward"),
    (["--model", "/nonexistent/sd3-folder", "--stage", "teacher"], "cannot load model"),
    (["--stage", "teacher", "--reward", "clipscore"], "openai/clip-vit-large-patch14"),
    (["--stage", "teacher", "--reward", "imagereward"], "pip install image-reward"),
    (["--stage", "teacher", "--task", "geneval", "--prompts", "README.md"], "GenEval metadata"),
    (["--stage", "teacher", "--task", "geneval", "--prompts", "requirements.txt.jsonl"], "not found"),
    (["--stage", "teacher", "--task", "ocr", "--prompts", "requirements.txt"], "no quoted text"),
    (["--stage", "teacher", "--lora_targets", "to_q,nope"], "'nope'"),
    (["--stage", "teacher", "--lora_targets", ","], "--lora_targets is empty"),
    (["--stage", "teacher", "--ema", "1"], "--ema must be in [0, 1)"),
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
                          (["--resume", "--lora_targets", "to_q,to_v"], "was trained with --lora_targets to_q,to_k"),
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
             (["--stage", "teacher", "--batch_size", "8", "--group_size", "4"], "does not divide across 3 ranks")]
    for args, needle in cases:
        env = {"WORLD_SIZE": "3"} if "ranks" in needle else None
        r = run(*args, "--out", out, env=env, timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]


def test_ema_follows_flow_grpo_schedule():
    """EMA against a direct evaluation of its recursion: e_s = d_s e_{s-1} + (1 - d_s) p_s on the
    steps s with s % every == 0, d_s = min((1 + s) / (10 + s), decay), e_0 = p_0."""
    cfg = opd.Config(ema=0.9, ema_every=2)
    w = torch.nn.Parameter(torch.zeros(2))
    ema, expect = opd.EMA([w], cfg), torch.zeros(2)
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
    off = opd.EMA([w], opd.Config(ema=0.0, ema_every=1))
    w.data = torch.ones(2); off.step(1); off.copy_to_params()
    assert torch.equal(w.data, torch.ones(2))  # decay 0: the saved weights are the trained ones


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


def _tiny_clip(d, seed=0):
    """A tiny random transformers CLIP saved as a model folder (no download): model, the toy
    byte-level tokenizer, a 32 px image processor; plus a random aesthetic head."""
    import rewards
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(seed)
    tok = opd._toy_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, hidden_act="gelu"),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
                     projection_dim=16, logit_scale_init_value=math.log(50.0))
    model = CLIPModel(cfg).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    torch.save(rewards.AestheticMLP(16).state_dict(), os.path.join(d, rewards.AESTHETIC_HEAD[1]))
    return model, tok


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    model, tok = _tiny_clip(d)
    g = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 256, (5, 3, 32, 32), generator=g) / 255).float()  # exact uint8 values
    prompts = ["a red cat", "a blue dog on the left", "a green car", "a plain picture of a bird", ""]
    with torch.no_grad():  # the reference: CLIPModel's own forward on CLIPProcessor inputs
        from transformers import CLIPImageProcessor
        px = CLIPImageProcessor.from_pretrained(d)([(im * 255).round().byte().permute(1, 2, 0).numpy()
                                                    for im in images], return_tensors="pt").pixel_values
        t = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px)
    return d, model, images, prompts, out


@pytest.mark.parametrize("name,scale", [("pickscore", 1 / 26), ("clipscore", 1 / 30), ("hpsv2", None)])
def test_clip_family_scores_and_scaling(tiny_clip, name, scale):
    import rewards
    d, model, images, prompts, out = tiny_clip
    fn = rewards.load(f"{name}={d}")
    r = fn(images, prompts)
    logits = out.logits_per_image.diagonal()  # exp(logit_scale) * cos
    want = logits * scale if scale else logits / model.logit_scale.exp()
    assert r.shape == (5,) and torch.allclose(r, want, atol=1e-5), (r, want)
    assert torch.equal(fn(images, prompts), r)  # deterministic
    parts = torch.cat([fn(images[:1], prompts[:1]), fn(images[1:], prompts[1:])])
    assert torch.allclose(parts, r, atol=1e-6)  # batch-size invariant
    assert r.std() > 0  # the prompts and images matter


def test_aesthetic_head_on_clip_image_embedding(tiny_clip):
    import rewards
    d, model, images, prompts, out = tiny_clip
    fn = rewards.load(f"aesthetic={d}")
    head = rewards.AestheticMLP(16)
    head.load_state_dict(torch.load(os.path.join(d, rewards.AESTHETIC_HEAD[1])))
    with torch.no_grad():
        want = head.eval()(out.image_embeds).squeeze(-1)  # CLIPModel's image_embeds are unit-norm
    r = fn(images, ["anything"] * 5)
    assert torch.allclose(r, want, atol=1e-5) and torch.allclose(fn(images, [""] * 5), r)


def test_hpsv2_open_clip_checkpoint_converted(tiny_clip, tmp_path):
    """HPSv2.1 ships an open_clip checkpoint: written here in open_clip's layout from the tiny
    CLIP (fused q/k/v in-projection, x @ proj matrices), it must load and score the same."""
    import shutil
    import rewards
    d, model, images, prompts, out = tiny_clip
    sd, oc = model.state_dict(), {"logit_scale": model.logit_scale.detach()}
    for tower, src, n in [("visual.", "vision_model.", 2), ("", "text_model.", 2)]:
        for i in range(n):
            a, b = f"{src}encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
            for w in ("weight", "bias"):
                oc[f"{b}attn.in_proj_{w}"] = torch.cat([sd[f"{a}self_attn.{p}_proj.{w}"] for p in "qkv"])
                for x, y in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                    oc[f"{b}{y}.{w}"] = sd[f"{a}{x}.{w}"]
    e = "vision_model.embeddings."
    oc.update({"visual.conv1.weight": sd[e + "patch_embedding.weight"], "visual.class_embedding": sd[e + "class_embedding"],
               "visual.positional_embedding": sd[e + "position_embedding.weight"],
               "visual.proj": sd["visual_projection.weight"].t(), "text_projection": sd["text_projection.weight"].t(),
               "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
               "positional_embedding": sd["text_model.embeddings.position_embedding.weight"]})
    for x, y in [("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")]:
        for w in ("weight", "bias"):
            oc[f"{y}.{w}"] = sd[f"{x}.{w}"]
    hps = tmp_path / "hps"
    shutil.copytree(d, hps)
    for f in os.listdir(hps):
        if f.endswith(".safetensors"):
            os.remove(hps / f)  # only the open_clip checkpoint holds weights now
    torch.save({"state_dict": oc}, hps / rewards.HPS_FILE)
    r = rewards.load(f"hpsv2={hps}")(images, prompts)
    assert torch.allclose(r, out.logits_per_image.diagonal() / model.logit_scale.exp(), atol=1e-5)


def test_reward_mixture_weights_and_bad_specs():
    import rewards
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    kb = rewards.jpeg_incompressibility(images)
    mix = rewards.load("jpeg_compressibility:1,jpeg_incompressibility:3")  # (-kb + 3 kb) / 4
    assert torch.allclose(mix(images, [""] * 3), kb / 2, atol=1e-6)
    prompts = ["a red cat", "a blue dog", "a green car"]
    both = rewards.load("color:2,jpeg:1")
    want = (2 * rewards.color(images, prompts) - kb) / 3
    assert torch.allclose(both(images, prompts), want, atol=1e-6)
    for bad, says in [("nope", "unknown reward"), ("color:x", "bad weight"), ("color:-1", "positive"),
                      ("color:0", "positive"), ("", "empty"), (" , ", "empty"), ("color=some/model", "no model")]:
        with pytest.raises(ValueError, match=says):
            rewards.load(bad)


def test_reward_offline_error_names_the_model(tmp_path):
    """No network: the first call (or --time) stops with one line naming the model id."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for spec, model_id in [("clipscore", "openai/clip-vit-large-patch14"), ("pickscore", "yuvalkirstain/PickScore_v1"),
                           ("geneval", "facebook/mask2former-swin-small-coco-instance"),
                           ("hpsv2", "xswu/HPSv2/HPS_v2.1_compressed.pt")]:
        r = subprocess.run([sys.executable, "rewards.py", "--time", spec], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and model_id in lines[0] and "network" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "rewards.py", "--list"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0 and all(n in r.stdout for n in ["ocr", "pickscore", "hpsv2", "geneval", "aesthetic"])


# GenEval rules on synthetic detections (no detector)
def _det(cls, box, score=0.95):
    return {"class": cls, "score": score, "box": box, "mask": None}


def _geneval(dets, meta, colours=None):
    import rewards
    objects = rewards.geneval_select(dets, meta.get("tag"))
    return rewards.geneval_check(objects, meta, lambda c, ds: [colours[id(d)] for d in ds] if colours else [])


def test_geneval_counting():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    dogs = [_det("dog", (10 * i, 0, 10 * i + 8, 8)) for i in range(5)]
    assert _geneval(dogs[:3], meta)[0]
    assert not _geneval(dogs[:2], meta)[0]                                   # too few
    ok, why = _geneval(dogs[:4], meta)
    assert not ok and "dog < 4" in why                                       # too many
    assert not _geneval(dogs[:2] + [_det("dog", (60, 0, 68, 8), 0.5)], meta)[0]  # counting needs 0.9
    assert _geneval(dogs[:3] + [_det("cat", (0, 20, 8, 28))], meta)[0]       # other classes do not count


def test_geneval_position():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bench = _det("bench", (60, 40, 90, 60))
    assert _geneval([bench, _det("dog", (0, 40, 30, 60))], meta)[0]
    assert not _geneval([bench, _det("dog", (95, 40, 120, 60))], meta)[0]  # right of it
    assert not _geneval([bench, _det("dog", (50, 40, 80, 60))], meta)[0]   # overlapping: no clear relation
    assert not _geneval([_det("dog", (0, 40, 30, 60))], meta)[0]           # no target
    assert not _geneval([bench, _det("dog", (0, 40, 30, 60), 0.2)], meta)[0]  # below 0.3 confidence
    import rewards
    assert rewards.relative_position((0, 0, 10, 10), (0, 50, 10, 60)) == {"above"}
    assert rewards.relative_position((40, 40, 50, 50), (0, 0, 10, 10)) == {"right of", "below"}


def test_geneval_colour_attribution():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}]}
    car, bench = _det("car", (0, 0, 10, 10)), _det("bench", (20, 0, 30, 10))
    assert _geneval([car, bench], meta, {id(car): "red", id(bench): "blue"})[0]
    ok, why = _geneval([car, bench], meta, {id(car): "blue", id(bench): "red"})
    assert not ok and "red car" in why and "blue bench" in why            # colours swapped
    assert not _geneval([car], meta, {id(car): "red"})[0]                  # the bench is missing


def test_geneval_detector_code_path(tiny_clip, tmp_path):
    """The transformers Mask2Former path on a tiny random detector whose class head is forced to
    'dog': dogs are found (boxes inside the image), cats are not, colours come from CLIP."""
    import rewards
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)
    torch.manual_seed(0)
    names = ["person", "dog", "cat", "bench"]
    cfg = Mask2FormerConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1] * 4, num_heads=[1] * 4,
                                   window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, feature_size=32, mask_feature_dim=32, num_queries=8, encoder_layers=1, decoder_layers=2,
        encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2, common_stride=4,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    det = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        det.class_predictor.weight.zero_()
        det.class_predictor.bias.fill_(-10).index_fill_(0, torch.tensor([1]), 10.0)  # always 'dog'
    det.save_pretrained(tmp_path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(tmp_path)
    fn = rewards.GenEval(str(tmp_path), clip_id=tiny_clip[0])
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    dets = fn.detect(images)
    assert all(d and all(x["class"] == "dog" and x["score"] > 0.3 for x in d) for d in dets)
    assert all(0 <= x["box"][0] < x["box"][2] <= 48 and 0 <= x["box"][1] < x["box"][3] <= 48 for d in dets for x in d)
    want_dog = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    want_cat = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    r = fn(images, ["a photo of a dog", "a photo of a cat"], [want_dog, want_cat])
    assert r.tolist() == [1.0, 0.0]
    colours = fn.colours(images[0], "dog", dets[0])
    assert len(colours) == len(dets[0]) and set(colours) <= set(rewards.GENEVAL_COLORS)
    with pytest.raises(ValueError, match="GenEval metadata"):
        fn(images, ["a dog", "a cat"], [{}, {}])
