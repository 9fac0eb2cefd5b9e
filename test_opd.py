"""Tests: the maths against independent computations, the toy, the script run tiny as a user
would, the options' domains, the rewards against their original projects' conventions.
    python -m pytest -q test_opd.py
"""
import dataclasses
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
import options
import rewards
import tiny

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


def test_group_advantages_global_std():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    a = opd.group_advantages(r, torch.tensor([0, 0, 1, 1]), global_std=True)
    s = r.std(unbiased=False) + 1e-4  # one std over the whole batch, the mean per group
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -10.0, 10.0]) / s)


def test_nft_optimality_probability():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert torch.allclose(opd.nft_r(a), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_against_velocity_form(beta):
    """nft_loss (x0-space, adaptive weights) against its velocity form written out here: with
    v = eps - x0, x0+- - x0 = t (v+- - v), so L = (r ||t (v+ - v)||^2 / w+ + (1 - r) ||t (v- - v)||^2
    / w-) / beta * 5 with w = mean |t (v+- - v)|, element means; its gradient in v_theta
    by hand: dL/dv_theta = 5 / beta (r 2 t^2 beta (v+ - v) / w+ - (1 - r) 2 t^2 beta (v- - v) / w-) / D."""
    g = torch.Generator().manual_seed(0)
    B, D = 3, 24
    x0, eps, v_old = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    v_th = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_(True)
    t, r = torch.tensor([1.0, 0.6, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    loss = opd.nft_loss(v_th, v_old, x0, x_t, t, r, beta)
    loss.sum().backward()
    v, tt = eps - x0, t[:, None]
    with torch.no_grad():
        vp, vn = beta * v_th + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_th
        wp, wn = (tt * (vp - v)).abs().mean(1, keepdim=True), (tt * (vn - v)).abs().mean(1, keepdim=True)
        want = (r * (tt * (vp - v)).pow(2).mean(1) / wp[:, 0] + (1 - r) * (tt * (vn - v)).pow(2).mean(1) / wn[:, 0]) / beta * 5
        grad = 5 / beta * (r[:, None] * 2 * tt**2 * beta * (vp - v) / wp - (1 - r[:, None]) * 2 * tt**2 * beta * (vn - v) / wn) / D
    assert torch.allclose(loss.detach().double(), want, rtol=1e-5) and torch.allclose(v_th.grad, grad, rtol=1e-4, atol=1e-9)


def test_nft_loss_minimum_is_the_positive_policy_on_target():
    """With r = 1 the loss pulls v+ = beta v_theta + (1 - beta) v_old onto the flow-matching
    target eps - x0: zero at v_theta = (eps - x0 - (1 - beta) v_old) / beta, positive around it."""
    g = torch.Generator().manual_seed(1)
    x0, eps, v_old = (torch.randn(2, 8, generator=g) for _ in range(3))
    beta, t, one = 0.5, 0.7, torch.ones(2)
    best = (eps - x0 - (1 - beta) * v_old) / beta
    loss = lambda v: opd.nft_loss(v, v_old, x0, (1 - t) * x0 + t * eps, t, one, beta)
    assert loss(best).abs().max() < 1e-6
    for _ in range(3):
        assert (loss(best + 0.1 * torch.randn(2, 8, generator=g)) > 1e-3).all()


def test_nft_old_adapter_decay_schedule():
    c = opd.Config(nft_decay="75,0.0075,0.999")  # DiffusionNFT's OCR schedule
    assert [opd.nft_decay(c, s) for s in (0, 74, 75, 100, 1000)] == [0.0, 0.0, 0.0, pytest.approx(0.1875), 0.999]
    c = opd.Config()  # GenEval's: min(0.001 step, 0.5)
    assert opd.nft_decay(c, 10) == pytest.approx(0.01) and opd.nft_decay(c, 900) == 0.5


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
def tiny_sd3():
    cfg = opd.resolve(opd.parse_config(["--num_steps", "4"]), "distill")
    dev = torch.device("cpu")
    return opd.SD3(opd.load_pipeline(cfg, dev), cfg, dev), cfg


def _randomise(tr, name, seed):
    g = torch.Generator().manual_seed(seed)
    for n, p in tr.named_parameters():
        if f"lora_B.{name}." in n:
            p.data = 0.3 * torch.randn(p.shape, generator=g)


def _fused_grads(m, cfg, a, two_pass):
    g = torch.Generator().manual_seed(3)
    for p in m.trainable:
        p.grad = None
    prompts = ["a red cat", "a bright dog on the left"]
    opd.distill_trajectory(m.velocity("student", prompts, 4.5), m.velocity("teacher-x", prompts, 4.5),
                           m.noise(2, g), opd.sd3_sigmas(cfg.num_steps), a, [0, 1, 2],
                           backward=lambda l: (m.use("student"), l.backward()), two_pass=two_pass, generator=g)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in m.trainable])


def test_fused_equals_two_pass_gradient_and_checkpointing_changes_nothing(tiny_sd3):
    m, cfg = tiny_sd3
    tr = m.tr
    opd.add_lora(tr, "teacher-x", cfg); _randomise(tr, "teacher-x", 1)
    m.trainable = opd.add_lora(tr, "student", cfg); _randomise(tr, "student", 2)
    m.active = "student"
    grads = [_fused_grads(m, cfg, a, two_pass) for a in (0.0, 0.7) for two_pass in (False, True)]
    tr.enable_gradient_checkpointing()  # --grad_checkpointing: the blocks recomputed in backward
    try:
        ckpt = _fused_grads(m, cfg, 0.0, False)
    finally:
        tr.disable_gradient_checkpointing()
    opd._drop_adapters(m)
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[2], grads[3], rtol=1e-4, atol=1e-7)
    assert torch.allclose(ckpt, grads[0], rtol=1e-5, atol=1e-8)


def test_saved_lora_loads_into_fresh_pipeline(tiny_sd3, tmp_path):
    m, cfg = tiny_sd3
    opd.add_lora(m.tr, "policy", cfg); _randomise(m.tr, "policy", 4)
    m.active = "?"
    x = m.noise(2, torch.Generator().manual_seed(0))
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


def test_joint_batch_routes_each_image_to_its_task_reward(tiny_sd3):
    """Joint RL's mixed batch: each image is scored by its own task's reward (the prompts each
    reward sees are its task's), and advantages are computed within each prompt's group, so a
    task whose reward is 1000 times larger leaves the other task's advantages unchanged."""
    m, cfg = tiny_sd3
    cfg = opd.resolve(opd.parse_config(["--stage", "joint", "--num_steps", "2", "--batch_size", "4",
                                        "--group_size", "2"]), "joint")
    seen = {}

    def task(name, scale, prompts):
        def reward(images, ps, meta):
            seen.setdefault(name, []).extend(ps)
            return scale * images.mean((1, 2, 3))
        return opd.Task(name, prompts, prompts[:1], reward)
    a = task("a", 1.0, ["a red cat", "a blue dog", "a green car"])
    b = task("b", 1000.0, ["a bright cat on the left", "a bright dog on the right"])
    m.trainable = opd.add_lora(m.tr, "policy", cfg)
    try:
        batches, rewards_ = opd.rl_sample(cfg, m, [a, b], 0, 0, 1, opd.Timer(m.device))
        seen_b = seen.pop("b")
        alone, _ = opd.rl_sample(cfg, m, [a], 0, 0, 1, opd.Timer(m.device))
    finally:
        opd._drop_adapters(m)
    assert set(seen["a"]) <= set(a.train) and set(seen_b) <= set(b.train) and len(seen_b) == 4
    for prompts, _, adv in batches:  # zero mean within every prompt's group
        assert torch.allclose(adv.view(-1, 2).sum(1), torch.zeros(2), atol=1e-4)
    assert torch.equal(batches[0][2], alone[0][2])  # task b's scale does not reach task a
    assert rewards_["b"] > 100 * rewards_["a"]


def test_prompt_embeddings_stay_within_the_cache_bound(tiny_sd3):
    """10,000 prompts through a 1 MB cache: the cache never holds more than 1 MB beyond the
    prompts of the current request, and a prompt evicted is embedded again, identically."""
    m, cfg = tiny_sd3
    m.cfg = dataclasses.replace(cfg, embed_cache_mb=1.0)
    try:
        per = m.prompt_bytes()
        prompts = [f"a red cat number {i}" for i in range(10_000)]
        first = None
        for i in range(0, len(prompts), 500):
            m.encode(prompts[i:i + 500])
            assert m.cache_bytes <= 2**20 + 501 * per and len(m.cache) <= 2**20 // per + 502
            if first is None:
                first = m.cache[prompts[0]][0].clone()
        assert prompts[0] not in m.cache
        m.encode(prompts[:1])
        assert torch.equal(m.cache[prompts[0]][0], first)
        assert sum(e.nbytes + q.nbytes for e, q in m.cache.values()) == m.cache_bytes
    finally:
        m.cfg = cfg


# ------------------------------------------------------------------------------------- the script
def run(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "opd.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=e)


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
    assert teacher - base > 0.03, table  # measured: +0.168 (0.542 -> 0.710), student +0.173
    assert student - base > 0.5 * (teacher - base), table
    assert table["student"]["seconds"] > 0 and "| student |" in open(os.path.join(out, "eval.md")).read()
    r = run("--stage", "distill", "--tasks", "position", "--out", out)  # a finished stage is reused
    assert r.returncode == 0 and "reused" in r.stdout


def test_reduced_nft_teacher_improves_its_task(tmp_path):
    """A DiffusionNFT teacher (CFG-free ODE samples of the old adapter, the forward-process loss)
    on the colour task beats the base, both sampled CFG-free as NFT's models are evaluated."""
    out = str(tmp_path / "nft")
    r = run("--stage", "teacher", "--task", "color", "--algo", "nft", "--steps", "30", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(os.path.join(out, "teacher-color", "config.json")))["guidance"] == 1.0
    r = run("--stage", "eval", "--tasks", "color", "--eval_steps", "20", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.load(open(os.path.join(out, "eval.json")))  # the base at CFG 4.5, the NFT teacher at 1
    cfg = opd.resolve(opd.parse_config(["--stage", "eval", "--tasks", "color", "--eval_steps", "20"]), "eval")
    dev = torch.device("cpu")
    m = opd.SD3(opd.load_pipeline(cfg, dev), cfg, dev)
    base_cfg_free = opd.held_out(cfg, m, [opd.make_task("color", cfg)], None, 1.0, 0, 1)["color"]
    assert table["teacher-color"]["color"] - base_cfg_free > 0.04, (table, base_cfg_free)  # measured +0.101 (0.585 -> 0.686)


def test_compare_runs_every_method_tiny(tmp_path):
    """--stage compare at toy sizes: teachers, OPD with its held-out curve, joint RL with both
    algorithms, cascade NFT, the SFT / PPO / DanceOPD / FlowOPD students; one table with every
    model, its time and the avg; labelled samples.png; every LoRA loads with diffusers'
    load_lora_weights and changes the model's output."""
    out = str(tmp_path / "cmp")
    small = ["--tasks", "color,jpeg", "--steps", "2", "--batch_size", "4", "--group_size", "2", "--num_steps", "3",
             "--eval_steps", "3", "--eval_prompts", "2", "--eval_seeds", "2", "--out", out]
    r = run("--stage", "compare", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.load(open(os.path.join(out, "eval.json")))
    rows = ["base", "teacher-color", "teacher-jpeg", "joint-grpo_guard", "joint-nft", "cascade-nft", "student",
            "student-sft", "student-ppo", "student-dance", "student-flow"]
    assert list(table) == rows and all({"color", "jpeg", "seconds"} <= set(v) for v in table.values())
    assert all(table[k]["seconds"] > 0 for k in rows[1:])
    md = open(os.path.join(out, "eval.md")).read()
    assert all(f"| {k} |" in md for k in rows) and "train time" in md
    reach = json.load(open(os.path.join(out, "compare.json")))
    assert set(reach) == {"joint-grpo_guard", "joint-nft", "cascade-nft"} and all("says" in r for r in reach.values())
    curve = [json.loads(l) for l in open(os.path.join(out, "student", "metrics.jsonl")) if "held_out" in l]
    assert [c["step"] for c in curve] == [0, 1, 2] and set(curve[-1]["held_out"]) == {"color", "jpeg"}
    assert json.load(open(os.path.join(out, "student-ppo", "config.json")))["noise_level"] == 0.7
    assert json.load(open(os.path.join(out, "joint-nft", "run.json")))["trajectories"] == 4 * 2 * 4  # budget: T + D B_D / B_T
    from PIL import Image
    im = Image.open(os.path.join(out, "samples.png"))
    assert im.size[1] > 128 * len(rows) and im.size[0] > 128 * 4  # a label band above, a label column
    pipe = tiny.tiny_pipeline()
    x, t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    e, _, p, _ = pipe.encode_prompt(["a red cat"], None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    base = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p)[0]
    for name in rows[3:]:
        pipe.load_lora_weights(os.path.join(out, name), adapter_name=name.replace("-", "_"))
        pipe.set_adapters(name.replace("-", "_"))
        v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p)[0]
        assert not torch.allclose(v, base, atol=1e-6), name


def test_noise_ablation_stage_writes_curves(tmp_path, teacher_dir):
    out = str(tmp_path / "noise")
    r = run("--stage", "noise", "--tasks", "color", "--teachers", f"color={teacher_dir}", "--steps", "2",
            "--batch_size", "4", "--num_steps", "3", "--eval_every", "1", "--eval_steps", "3", "--eval_prompts", "1",
            "--eval_seeds", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(os.path.join(out, "noise.json")))
    assert set(res["levels"]) == {"0.0", "0.3", "0.7"} and all(v["rounds"] == [0, 1, 2] for v in res["levels"].values())
    assert os.path.isfile(os.path.join(out, "noise.png")) and "rounds to 90%" in r.stdout


@pytest.mark.parametrize("task", ["ocr", "geneval", "aesthetic"])
def test_real_tasks_run_with_built_in_prompts(task, tmp_path):
    """No --prompts: the built-in sets. OCR (rapidocr ships its models) trains on the tiny model;
    GenEval and the aesthetic mix need downloads and stop at once with one line naming a model."""
    r = run("--task", task, "--stage", "teacher", "--steps", "2", "--batch_size", "4", "--group_size", "2",
            "--num_steps", "3", "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    if task == "ocr":
        assert r.returncode == 0, r.stderr[-2000:]
        assert os.path.isfile(tmp_path / "o" / "teacher-ocr" / opd.LORA_FILE)
    else:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "network" in lines[0], r.stderr[-1500:]


def test_bench_prints_flops_saved_bytes_and_memory(tmp_path):
    r = run("--stage", "bench", "--steps", "1", "--batch_size", "4", "--num_steps", "3", "--tasks", "color,jpeg",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.load(open(tmp_path / "bench.json"))
    assert b["round_s_fused"] > 0 and b["round_s_two_pass"] > 0 and b["tasks"] == 2
    assert b["peak_mb_one_adapter"] > 0 and b["peak_mb_M_teachers"] > 0
    assert b["teacher_adapters_mb"] == pytest.approx(2 * b["adapter_mb"], abs=2e-3)  # 2 teachers, 1 student shape
    assert b["round_tflop_two_pass"] > b["round_tflop_fused"] > 0 and b["tflops_fused"] > 0
    assert 0 < b["saved_mb_per_trained_step_checkpointing"] < b["saved_mb_per_trained_step"]
    assert "TFLOP/s" in r.stdout and "gradient checkpointing" in r.stdout
    r = run("--stage", "bench", "--device", "meta", "--model", "sd35m-random", "--out", str(tmp_path / "meta"))
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.load(open(tmp_path / "meta" / "count.json"))
    d = c["distill"]  # SD3.5-M's transformer at 512 px, 3 trajectories x CFG: about 12 GB saved, 1 GB checkpointed
    assert d["forward_batch"] == 6 and 5 < d["saved_gb"] < 30 and 0.3 < d["saved_gb_checkpointing"] < 0.2 * d["saved_gb"]
    assert 4.4 < d["weights_gb"] < 4.9 and c["teacher"]["forward_batch"] == 18


def test_flop_formula_equals_flop_counter():
    """transformer_flops against torch's FlopCounterMode (meta device: shapes only) on the tiny
    transformer and on a 3-block SD3.5-M-width one with a dual-attention block: the matrix
    products exactly, attention (bmm of the decomposed SDPA) apart."""
    import bench
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode
    for c in [dict(tiny.build_offline("tiny").transformer.config),
              dict(tiny.SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0, 1))]:
        c = {k: v for k, v in c.items() if not k.startswith("_")}
        with torch.device("meta"):
            tr = SD3Transformer2DModel(**c)
        B, side, n_txt = 2, 8, 13
        args = dict(hidden_states=torch.empty(B, 16, side, side, device="meta"), timestep=torch.ones(B, device="meta"),
                    encoder_hidden_states=torch.empty(B, n_txt, c["joint_attention_dim"], device="meta"),
                    pooled_projections=torch.empty(B, c["pooled_projection_dim"], device="meta"), return_dict=False)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tr(**args)
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        lin, att = bench.transformer_flops(c, B, (side // c["patch_size"]) ** 2, n_txt)
        assert lin == counts["aten.addmm"] + counts.get("aten.mm", 0) + counts["aten.convolution"], c["num_layers"]
        assert att == counts["aten.bmm"]


def test_saved_bytes_counts_what_backward_keeps():
    """saved_bytes on graphs whose saved tensors are known: y = x W^T (W frozen) keeps x; relu keeps
    its output; a parameter is not counted; a view of a counted storage is not counted twice."""
    import bench
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with bench.saved_bytes([w]) as out:
        y = torch.relu(x @ w.t())  # mm keeps x (and w: a parameter); relu keeps y (4 x 8)
    assert out["bytes"] == x.nbytes + y.nbytes
    with bench.saved_bytes([]) as out:
        z = (x[:2] * 2).sum() + (x[2:] * 3).sum()  # mul by a constant keeps nothing
        q = x[:2] * x[2:]  # keeps both views of x's one storage
    assert out["bytes"] == x.nbytes


# ------------------------------------------------------------------------------------- options
def _main(args, capsys, monkeypatch):
    """opd.main in this process, with the model loading replaced by a failure: input that passes
    every check would reach it (and fail the test) instead of training. (exit code, stderr lines)."""
    def reached(*a, **k):
        raise AssertionError(f"the checks let {args} through to the model")
    monkeypatch.setattr(opd, "dist_setup", reached)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        opd.main(args)
    return e.value.code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


def _fields():
    return [(f.name, bad) for f in dataclasses.fields(opd.Config) for bad in f.metadata["rule"].bad]


def test_every_option_has_a_rule_with_values_outside_it():
    for f in dataclasses.fields(opd.Config):
        rule = f.metadata["rule"]
        assert rule.says and (rule.bad or rule is options.FLAG), f.name
        if f.default is not None:
            assert rule.ok(f.default), (f.name, f.default)  # the defaults are inside the domains


@pytest.mark.parametrize("name,bad", _fields())
def test_out_of_domain_value_is_one_line_exit_2(name, bad, tmp_path, capsys, monkeypatch):
    """Every field, every value its Rule names as outside the domain: one line on stderr that
    names the option, exit code 2, and --out untouched (here: not even made)."""
    out = str(tmp_path / "o")
    args = [f"--{name}", bad] + ([] if name == "out" else ["--out", out])
    before = open(__file__, "rb").read()
    code, lines = _main(args, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and f"--{name}" in lines[0], lines
    assert not os.path.exists(out) and open(__file__, "rb").read() == before


@pytest.mark.parametrize("args,needle", [
    (["--stage", "teacher", "--batch_size", "8", "--group_size", "3"], "not a multiple of --group_size"),
    (["--stage", "teacher", "--noise_level", "0"], "needs --noise_level > 0"),
    (["--stage", "distill", "--loss", "ppo"], "needs --noise_level > 0"),
    (["--stage", "distill", "--loss", "sft", "--noise_level", "0.7"], "must be 0"),
    (["--stage", "distill", "--loss", "dance", "--two_pass"], "--two_pass applies"),
    (["--stage", "distill", "--train_steps", "3-12"], "must lie in 0..9"),
    (["--resume", "--overwrite"], "contradict"),
    (["--resolution", "30"], "multiple of 4"),
    (["--model", "sd35m-random", "--resolution", "520"], "multiple of 16"),
    (["--teacher_guidance", "ocr=1"], "not among"),
    (["--stage", "eval", "--export_geneval"], "needs the geneval task"),
    (["--stage", "teacher", "--device", "meta"], "--stage bench only"),
    (["--stage", "distill", "--teachers", "color=/nonexistent"], "--stage teacher --task color"),
    (["--bogus_option", "1"], "unrecognized arguments"),
    (["--lr"], "expected one argument"),
])
def test_relations_between_options(args, needle, tmp_path, capsys, monkeypatch):
    code, lines = _main([*args, "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA accepts --device cuda")
def test_device_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    code, lines = _main(["--device", "cuda", "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 2 and lines == ["error: --device cuda: no CUDA device is available"]


def test_bad_files_are_one_line_naming_the_path(tmp_path):
    """Prompt files that are not UTF-8, a folder, empty, or not metadata: one line, exit 2,
    through the real command line (the model-free checks run before the model loads)."""
    (tmp_path / "latin1.txt").write_bytes('a sign that says "caf\xe9"\n'.encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    cases = [(["--prompts", str(tmp_path / "latin1.txt")], "latin1.txt"), (["--prompts", str(tmp_path)], "--prompts"),
             (["--prompts", str(tmp_path / "empty.txt")], "is empty"),
             (["--task", "geneval", "--prompts", str(tmp_path / "bad.jsonl")], "not a JSON object"),
             (["--task", "ocr", "--test_prompts", str(tmp_path / "latin1.txt")], "not UTF-8")]
    for args, needle in cases:
        r = run("--stage", "teacher", "--task", "ocr", *args, "--out", str(tmp_path / "o"), timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr[-1500:])
    assert not os.path.exists(tmp_path / "o")


def test_base_only_eval_and_eval_of_any_subset(tmp_path, teacher_dir):
    """--stage eval on a fresh --out evaluates the base alone (it crashed in peft before); with
    one teacher folder and an extra --lora it evaluates those."""
    out = str(tmp_path / "fresh")
    small = ["--stage", "eval", "--tasks", "color", "--eval_steps", "3", "--eval_prompts", "1", "--eval_seeds", "1"]
    r = run(*small, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(json.load(open(os.path.join(out, "eval.json")))) == ["base"]
    r = run(*small, "--out", out, "--lora", f"mine.v2={teacher_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(json.load(open(os.path.join(out, "eval.json")))) == ["base", "mine.v2"]


@pytest.mark.parametrize("args,needle", [
    (["--stage", "teacher", "--task", "ocr", "--prompts", "/nonexistent.txt"], "--prompts"),
    (["--stage", "teacher", "--reward", "nope"], "unknown reward"),
    (["--model", "/nonexistent/sd3-folder", "--stage", "teacher"], "cannot load model"),
    (["--stage", "teacher", "--reward", "clipscore"], "openai/clip-vit-large-patch14"),
    (["--stage", "teacher", "--reward", "imagereward"], "THUDM/ImageReward"),
    (["--stage", "teacher", "--task", "geneval", "--prompts", "README.md"], "GenEval metadata"),
    (["--stage", "teacher", "--task", "ocr", "--prompts", "requirements.txt"], "no quoted text"),
    (["--stage", "teacher", "--lora_targets", "to_q,nope"], "'nope'"),
    (["--stage", "teacher", "--lr", "-1"], "--lr: got -1.0, accepts a finite number in (0, 1]"),
])
def test_bad_input_through_the_command_line(args, needle, tmp_path):
    r = run(*args, "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
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
    out = str(tmp_path / "o")
    cases = [(["--stage", "distill", "--teachers", f"color={bad}"], "does not fit"),
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
    tok = tiny.toy_tokenizer()
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
                           ("hpsv2", "xswu/HPSv2/HPS_v2.1_compressed.pt"), ("imagereward", "THUDM/ImageReward")]:
        r = subprocess.run([sys.executable, "rewards.py", "--time", spec], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and model_id in lines[0] and "network" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "rewards.py", "--list"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0 and all(n in r.stdout for n in ["ocr", "pickscore", "hpsv2", "geneval_partial", "aesthetic",
                                                              "imagereward"])


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


# ------------------------------------------------------------------------------------- rewards vs their projects
def test_ocr_target_and_score_follow_flow_grpo():
    """Flow-GRPO reads the text between the first two straight double quotes and gives full
    reward when it appears inside the text read. Curly quotes next; single quotes last, and
    never an apostrophe."""
    assert rewards.ocr_target('A bird\'s-eye view with "poona" near the tower\'s top') == "poona"
    assert rewards.ocr_target('a mug saying \u201cgood morning\u201d') == "good morning"
    assert rewards.ocr_target("the dog's bowl with 'bone' on it") == "bone"
    assert rewards.ocr_target('"first" then \u201csecond\u201d') == "first"
    with pytest.raises(ValueError, match="no quoted text"):
        rewards.ocr_target("a bird's-eye view of the tower's top")
    assert rewards.ocr_score("Welcome to the POONA shop", "poona") == 1.0  # inside the read text
    assert rewards.ocr_score("poona", "Poo Na") == 1.0  # case and spaces ignored
    assert rewards.ocr_score("pona", "poona") == pytest.approx(0.8)  # one edit of five
    assert rewards.ocr_score("", "poona") == 0.0 and rewards.ocr_score("x" * 40, "poona") == 0.0


def test_missing_package_error_names_the_real_cause():
    with pytest.raises(rewards.RewardError, match="No module named 'no_such_module_xyz'"):
        rewards._package("demo", "no_such_module_xyz", "no-such-package")


def test_geneval_threshold_is_strict_as_geneval():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert not _geneval([_det("dog", (0, 0, 8, 8), rewards.THRESHOLD)], meta)[0]  # GenEval keeps score > 0.3
    assert _geneval([_det("dog", (0, 0, 8, 8), rewards.THRESHOLD + 1e-6)], meta)[0]


def test_geneval_partial_score_as_flow_grpo():
    """Flow-GRPO's partial score, by hand: one term per clause, averaged."""
    def partial(dets, meta, colours=None):
        objects = rewards.geneval_select(dets, meta.get("tag"))
        return rewards.geneval_partial(objects, meta, lambda c, ds: [colours[id(d)] for d in ds])
    dogs = [_det("dog", (10 * i, 0, 10 * i + 8, 8)) for i in range(5)]
    count = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    assert partial(dogs[:3], count) == 1.0
    assert partial(dogs[:2], count) == pytest.approx(2 / 3) and partial(dogs[:5], count) == pytest.approx(1 / 3)
    car, bench = _det("car", (0, 0, 10, 10)), _det("bench", (20, 0, 30, 10))
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}]}
    assert partial([car, bench], attr, {id(car): "red", id(bench): "green"}) == pytest.approx(3 / 4)  # 1, 1, 1, 0
    assert partial([car], attr, {id(car): "red"}) == pytest.approx(2 / 4)  # the bench: count 0 and colour 0
    pos = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    b = _det("bench", (60, 40, 90, 60))
    assert partial([b, _det("dog", (0, 40, 30, 60))], pos) == 1.0
    assert partial([b, _det("dog", (95, 40, 120, 60))], pos) == pytest.approx(2 / 3)  # 1, 1, position 0
    assert partial([_det("dog", (0, 40, 30, 60))], pos) == pytest.approx(1 / 3)  # no bench: 0; dog 1; no target 0


def test_geneval_maps_detector_classes_by_index():
    """GenEval names detections by class index (its object_names.txt, COCO order): an 80-class
    head whose label file spells 'sofa' or 'tvmonitor' still yields 'couch' and 'tv'. Other
    heads map by name, aliases applied."""
    darknet = dict(enumerate(rewards.GENEVAL_CLASSES))
    darknet.update({57: "sofa", 62: "tvmonitor", 64: "mouse", 65: "remote", 66: "keyboard", 3: "motorbike"})
    names = rewards.geneval_classes(darknet)
    assert names == rewards.GENEVAL_CLASSES and names[57] == "couch" and names[64] == "computer mouse"
    assert rewards.geneval_classes({0: "person", 1: "sofa", 2: "potted_plant", 3: "tv-monitor"}) == \
        ["person", "couch", "potted plant", "tv"]


def test_geneval_colour_crops_get_the_clip_transform(tiny_clip):
    """Each detection's crop (grey #999 outside its mask, cut to its box) goes through CLIP's own
    transform, short side to the input size (bicubic) then a centre crop: not squashed."""
    g = rewards.GenEval("unused", clip_id=tiny_clip[0])
    g.clip.load()
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[10:40, 4:20] = True
    det = {"box": (4, 10, 20, 40), "mask": mask}  # 16 wide, 30 tall
    px = g.crops(image, [det])
    crop = torch.where(mask, image, torch.full_like(image, 0.6))[None, :, 10:40, 4:20]
    want = rewards.clip_pixels(crop, g.clip.size, g.clip.mean, g.clip.std)
    assert px.shape == (1, 3, g.clip.size, g.clip.size) and torch.allclose(px, want)
    squashed = torch.nn.functional.interpolate(crop, size=(g.clip.size,) * 2, mode="bilinear")
    assert not torch.allclose(px, rewards.clip_pixels(squashed, g.clip.size, g.clip.mean, g.clip.std), atol=1e-3)


def test_geneval_export_is_read_as_geneval_reads_it(tmp_path):
    """export_geneval's layout read back the way GenEval's evaluate_images.py walks it: numeric
    folders, metadata.jsonl one JSON object, samples/<5 digits>.png."""
    import re
    from PIL import Image
    metas = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rewards.export_geneval(str(tmp_path), [metas[0]] * 2 + [metas[1]] * 2, [0, 0, 1, 1], [0, 1, 0, 1], images)
    found = {}
    for sub in sorted(os.listdir(tmp_path)):
        assert sub.isdigit()
        meta = json.load(open(tmp_path / sub / "metadata.jsonl"))
        files = sorted(f for f in os.listdir(tmp_path / sub / "samples") if re.match(r"\d+\.png", f))
        found[meta["prompt"]] = [Image.open(tmp_path / sub / "samples" / f).size for f in files]
    assert found == {"a photo of a cat": [(16, 16)] * 2, "a photo of two dogs": [(16, 16)] * 2}


def test_built_in_prompt_sets():
    import prompts
    train, test, meta = prompts.builtin("geneval")
    assert len(train) > 2000 and len(test) > 100 and not set(train) & set(test)
    tags = {meta[p]["tag"] for p in train + test}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for p in train + test:  # every prompt is GenEval's template on its metadata
        m = meta[p]
        inc = m["include"]
        assert m["prompt"] == p and all(i["class"] in rewards.GENEVAL_CLASSES for i in inc)
        if m["tag"] == "counting":
            assert p == f"a photo of {prompts.NUMBERS[inc[0]['count']]} {prompts.plural(inc[0]['class'])}"
            assert m["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        if m["tag"] == "position":
            assert p == f"a photo of {prompts.with_article(inc[1]['class'])} {inc[1]['position'][0]} " \
                        f"{prompts.with_article(inc[0]['class'])}" and inc[1]["position"][1] == 0
        if "color" in inc[0]:
            assert all(i["class"] != "person" and i["color"] in rewards.GENEVAL_COLORS for i in inc)
    assert "a photo of an airplane" in train + test and "a photo of three benchs" in train + test  # GenEval's plural rule
    for task in ("ocr", "aesthetic"):
        tr, te, _ = prompts.builtin(task)
        assert len(tr) > 1000 and len(te) > 50 and not set(tr) & set(te) and prompts.builtin(task)[0] == tr
    assert all(rewards.ocr_target(p) for p in prompts.builtin("ocr")[0])


def _imagereward_reference(sd, cfg, px, ids, mask):
    """ImageReward's score written from its package's structure (timm ViT, BLIP's BERT with
    cross-attention, the MLP, the normalisation), on the checkpoint's raw tensors."""
    import torch.nn.functional as F
    W = lambda k: sd[k + ".weight"]
    lin = lambda x, k: F.linear(x, W(k), sd[k + ".bias"])
    ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], W(k), sd[k + ".bias"], eps)

    def attention(q, k, v, heads, add=0.0):
        B, N, D = q.shape
        split = lambda t: t.reshape(B, -1, heads, D // heads).transpose(1, 2)
        a = (split(q) @ split(k).transpose(-1, -2) / (D // heads) ** 0.5 + add).softmax(-1)
        return (a @ split(v)).transpose(1, 2).reshape(B, N, D)
    v = "blip.visual_encoder."
    x = F.conv2d(px, W(v + "patch_embed.proj"), sd[v + "patch_embed.proj.bias"], stride=cfg["patch"])
    x = torch.cat([sd[v + "cls_token"].expand(len(px), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(cfg["vision_layers"]):
        b = f"{v}blocks.{i}."
        q, k, vv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attention(q, k, vv, cfg["vision_heads"]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = ln(W(t + "embeddings.word_embeddings")[ids] + W(t + "embeddings.position_embeddings")[: ids.shape[1]],
           t + "embeddings.LayerNorm", 1e-12)
    pad = ((1.0 - mask[:, None, None, :].float()) * -10000.0)
    for i in range(cfg["text_layers"]):
        l = f"{t}encoder.layer.{i}."
        for part, kv, add in [("attention.", h, pad), ("crossattention.", img, 0.0)]:
            s = l + part + "self."
            a = attention(lin(h, s + "query"), lin(kv, s + "key"), lin(kv, s + "value"), cfg["text_heads"], add)
            h = ln(lin(a, l + part + "output.dense") + h, l + part + "output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, l + "intermediate.dense")), l + "output.dense") + h, l + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):  # the MLP's Linear layers (Dropout between, no activation)
        r = lin(r, f"mlp.layers.{j}")
    return (r[:, 0] - rewards.IMAGEREWARD_NORM[0]) / rewards.IMAGEREWARD_NORM[1]


def test_imagereward_checkpoint_on_transformers_blip(tmp_path):
    """A tiny random checkpoint in ImageReward's layout (ImageReward.pt: blip.visual_encoder.*,
    blip.text_encoder.*, mlp.layers.*, names from its package's source), med_config.json and a
    BERT tokenizer: the reward loads it into transformers' BLIP and scores as the reference."""
    from transformers import BertTokenizer
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)
    Dv, Dt, V = 32, 32, 40
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "the", "left", "photo", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(V - len(words))]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    cfg = {"patch": 16, "vision_layers": 1, "vision_heads": 1, "text_layers": 2, "text_heads": 2}
    sd, v, t = {}, "blip.visual_encoder.", "blip.text_encoder."
    sd.update({v + "patch_embed.proj.weight": r(Dv, 3, 16, 16), v + "patch_embed.proj.bias": r(Dv),
               v + "cls_token": r(1, 1, Dv), v + "pos_embed": r(1, 5, Dv)})
    lin = lambda k, o, i: sd.update({k + ".weight": r(o, i), k + ".bias": r(o)})
    norm = lambda k, d: sd.update({k + ".weight": 1 + r(d), k + ".bias": r(d)})
    b = v + "blocks.0."
    norm(b + "norm1", Dv); lin(b + "attn.qkv", 3 * Dv, Dv); lin(b + "attn.proj", Dv, Dv); norm(b + "norm2", Dv)
    lin(b + "mlp.fc1", 4 * Dv, Dv); lin(b + "mlp.fc2", Dv, 4 * Dv); norm(v + "norm", Dv)
    sd.update({t + "embeddings.word_embeddings.weight": r(V, Dt), t + "embeddings.position_embeddings.weight": r(40, Dt),
               t + "embeddings.position_ids": torch.arange(40)[None]})
    norm(t + "embeddings.LayerNorm", Dt)
    for i in range(2):
        l = f"{t}encoder.layer.{i}."
        for part, kv in [("attention.", Dt), ("crossattention.", Dv)]:
            lin(l + part + "self.query", Dt, Dt); lin(l + part + "self.key", Dt, kv); lin(l + part + "self.value", Dt, kv)
            lin(l + part + "output.dense", Dt, Dt); norm(l + part + "output.LayerNorm", Dt)
        lin(l + "intermediate.dense", 64, Dt); lin(l + "output.dense", Dt, 64); norm(l + "output.LayerNorm", Dt)
    for j, (o, i) in zip((0, 2, 4, 6, 7), [(1024, Dt), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        lin(f"mlp.layers.{j}", o, i)
    sd.update({"blip.vision_proj.weight": r(8, Dv), "blip.vision_proj.bias": r(8)})  # unused by the score
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(dict(
        vocab_size=V, hidden_size=Dt, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, layer_norm_eps=1e-12, encoder_width=Dv, hidden_act="gelu", add_cross_attention=True)))
    fn = rewards.load(f"imagereward={tmp_path}")
    images = torch.rand(3, 3, 48, 40, generator=g)
    prompts_ = ["a red cat", "a photo of a dog on the left", "the cat"]
    got = fn(images, prompts_)
    tok = BertTokenizer.from_pretrained(tmp_path)(prompts_, padding="max_length", truncation=True, max_length=35,
                                                  return_tensors="pt")
    px = rewards.clip_pixels(images, 32, rewards.CLIP_MEAN, rewards.CLIP_STD)
    with torch.no_grad():
        want = _imagereward_reference(sd, cfg, px, tok.input_ids, tok.attention_mask)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert got.std() > 0
