"""The paper's baselines (baselines.py): each loss against a hand computation, and every method
run tiny from the command line, its LoRA loaded by diffusers."""
import dataclasses
import json
import os
import types

import pytest
import torch

import baselines
import opd
from conftest import ok, randomise, run
from opd_support import config, machinery, prompts, reports, runs, sd3, tiny

ONE = runs.single_process()  # one process, for functions that take a run


def test_joint_batch_routes_each_image_to_its_task_reward(tiny_sd3):
    """Joint RL's mixed batch: each image is scored by its own task's reward (the prompts each
    reward sees are its task's), and advantages are computed within each prompt's group, so a
    task whose reward is 1000 times larger leaves the other task's advantages unchanged."""
    m, cfg = tiny_sd3
    cfg = baselines.rl_config(config.parse_config(["--stage", "joint", "--sampler_steps", "2",
                                                   "--batch_size", "4", "--group_size", "2",
                                                   "--updates_per_epoch", "1"], baselines.Args),
                              "joint")
    seen = {}

    def task(name, scale, train):
        def reward(images, ps, meta):
            seen.setdefault(name, []).extend(ps)
            return scale * images.mean((1, 2, 3))
        return prompts.Task(name, train, train[:1], reward)
    a = task("a", 1.0, ["a red cat", "a blue dog", "a green car"])
    b = task("b", 1000.0, ["a bright cat on the left", "a bright dog on the right"])
    m.trainable = sd3.add_lora(m.tr, "policy", cfg)
    try:
        batches, stats = opd.rl_sample(cfg, m, [a, b], 0, ONE)
        seen_b = seen.pop("b")
        alone, _ = opd.rl_sample(cfg, m, [a], 0, ONE)
    finally:
        sd3.drop_adapters(m)
    assert set(seen["a"]) <= set(a.train) and set(seen_b) <= set(b.train) and len(seen_b) == 4
    for samples in batches:  # zero mean within every prompt's group
        assert torch.allclose(samples.advantages.view(-1, 2).sum(1), torch.zeros(2), atol=1e-4)
    assert torch.equal(batches[0].advantages, alone[0].advantages)  # b's scale does not reach a
    assert stats["reward_b"] > 100 * stats["reward_a"]


@pytest.mark.slow
def test_compare_runs_every_method_tiny(tmp_path):
    """--stage compare at toy sizes: teachers, OPD and every student of the same teachers, joint
    RL with both algorithms, cascade NFT; each with its validation curve; one table with every
    model, its time and compute; budget.md, anytime.png, conflict.json / .png; every
    LoRA loads with diffusers' load_lora_weights and changes the model's output. Then the
    learning rate chosen from a grid on the validation prompts (OPD), the runs reused."""
    out = str(tmp_path / "cmp")
    small = ["--tasks", "color,jpeg", "--optim_steps", "2", "--batch_size", "4",
             "--group_size", "2", "--sampler_steps", "3", "--eval_sampler_steps", "3",
             "--eval_prompts", "2", "--eval_seeds", "2", "--out", out]
    ok(run("--stage", "compare", *small, script="baselines.py"))
    table = json.load(open(os.path.join(out, "eval.json")))
    rows = ["base", "teacher-color", "teacher-jpeg", "joint-grpo_guard", "joint-nft", "cascade-nft",
            "student", "student-dance", "student-dmd", "student-flow", "student-offpolicy",
            "student-ppo", "student-sft", "student-tdm"]
    assert list(table) == rows and all({"color", "jpeg", "seconds", "cost"} <= set(v)
                                       for v in table.values())
    assert all(table[k]["seconds"] > 0 and table[k]["cost"] > 0 for k in rows[1:])
    # compute, every transformer pass (x 2 rows with CFG), one with grad counting 2: OPD's
    # 2 rounds x 2 tasks x 4 trajectories, each 2 student steps with grad, 1 without and 2
    # teacher steps; joint NFT's 2 steps x 2 tasks x 4, each 3 sampling steps of the old
    # adapter, then 2 trained times with the trained (grad), old and reference models (CFG 1)
    assert table["student"]["cost"] == 2 * 2 * 4 * 2 * (2 * 2 + 1 + 2)
    assert table["joint-nft"]["cost"] == 2 * 2 * 4 * (3 + 2 * (2 + 1 + 1))
    md = open(os.path.join(out, "eval.md")).read()
    assert all(f"| {k} |" in md for k in rows) and "train time" in md
    budget = open(os.path.join(out, "budget.md")).read()
    assert all(f"| {k} |" in budget for k in rows[1:])
    curve = [json.loads(line) for line in open(os.path.join(out, "student", "metrics.jsonl"))
             if '"val"' in line]
    assert [c["step"] for c in curve] == [0, 2] and set(curve[-1]["val"]) == {"color", "jpeg"}
    conflict = json.load(open(os.path.join(out, "conflict.json")))
    assert "cos_color_jpeg" in conflict["student"] and "cos_color_jpeg" in conflict[
        "joint-grpo_guard"] and "cos_half_color" in conflict["student"]
    assert os.path.getsize(os.path.join(out, "anytime.png")) > 10_000
    assert os.path.isfile(os.path.join(out, "conflict.png"))
    assert json.load(open(os.path.join(out, "student-ppo", "config.json")))["noise_level"] == 0.7
    from PIL import Image
    im = Image.open(os.path.join(out, "samples.png"))
    assert (im.size[1] > 128 * len(rows)
            and im.size[0] > 128 * 4)  # a label band above, a label column
    pipe = tiny.tiny_pipeline()
    x, t = (torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)),
            torch.tensor([500.0]))
    e, _, p, _ = pipe.encode_prompt(["a red cat"], None, None, do_classifier_free_guidance=False,
                                    max_sequence_length=8)
    base = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e,
                            pooled_projections=p)[0]
    for name in rows[3:]:
        pipe.load_lora_weights(os.path.join(out, name), adapter_name=name.replace("-", "_"))
        pipe.set_adapters(name.replace("-", "_"))
        v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e,
                             pooled_projections=p)[0]
        assert not torch.allclose(v, base, atol=1e-6), name
    grid = str(tmp_path / "grid")
    r = ok(run("--stage", "compare", "--methods", "opd", "--lr_grid", "0.5,1",
               *small[:-1], grid, script="baselines.py"))
    chosen = json.load(open(os.path.join(grid, "lr.json")))
    assert set(chosen) == {"teacher-color", "teacher-jpeg", "student"}
    assert chosen["student"]["multiple"] in (0.5, 1) and set(chosen["student"]["scores"]) == \
        {"0.5", "1"} and "chosen on the validation prompts" in r.stdout
    for name in ("student", "teacher-color"):
        assert os.path.isfile(os.path.join(grid, "grid", f"{name}-x0.5", "run.json"))
    assert list(json.load(open(os.path.join(grid, "eval.json")))) == rows[:3] + ["student"]


@pytest.mark.slow
def test_noise_ablation_stage_writes_curves(tmp_path, teacher_dir):
    """--stage noise --seeds 0,1: every run per seed (both SDE weights), its curves, and the
    seeds' summary of rounds to 50 / 75 / 90% of the final gain."""
    top = str(tmp_path / "noise")
    r = run("--stage", "noise", "--tasks", "color", "--teachers", f"color={teacher_dir}",
            "--optim_steps", "2", "--batch_size", "4", "--sampler_steps", "3", "--eval_every", "1",
            "--eval_sampler_steps", "3", "--eval_prompts", "1", "--eval_seeds", "1",
            "--seeds", "0,1", "--out", top, script="baselines.py")
    assert r.returncode == 0, r.stderr[-2000:]
    out = os.path.join(top, "seed-1")
    assert json.load(open(os.path.join(out, "noise", "student-a0.0", "config.json")))["seed"] == 1
    summary = json.load(open(os.path.join(top, "seeds.json")))
    assert (summary["seeds"] == [0, 1]
            and set(summary["runs"]) == {"a0.0", "a0.3", "a0.7", "a0.3-sigma", "a0.7-sigma"})
    gains = [json.load(open(os.path.join(top, f"seed-{s}",
                                         "noise.json")))["levels"]["a0.0"]["mean_gain"][-1]
             for s in (0, 1)]
    assert summary["runs"]["a0.0"]["final_mean_gain"]["mean"] == pytest.approx(sum(gains) / 2)
    assert "rounds to 50%" in open(os.path.join(top, "seeds.md")).read()
    res = json.load(open(os.path.join(out, "noise.json")))
    assert set(res["levels"]) == {"a0.0", "a0.3", "a0.7", "a0.3-sigma", "a0.7-sigma"}
    assert all(v["rounds"] == [0, 1, 2] and set(v["rounds_to"]) == {"0.5", "0.75", "0.9"}
               for v in res["levels"].values())
    assert os.path.isfile(os.path.join(out, "noise.png")) and "rounds to 50/75/90%" in r.stdout
    c = json.load(open(os.path.join(out, "noise", "student-a0.7-sigma", "config.json")))
    assert (c["noise_level"], c["sde_weight"]) == (0.7, "sigma")
    tiny.tiny_pipeline().load_lora_weights(os.path.join(out, "noise", "student-a0.7-sigma"),
                                           adapter_name="s")


def test_later_seeds_train_the_first_seeds_choice_and_the_given_one(tmp_path):
    """--seeds: a later seed trains what --lr_choice gave and what the first seed's grid chose
    (the grid's choice wins for a run in both)."""
    os.makedirs(tmp_path / "seed-0")
    (tmp_path / "seed-0" / "lr.json").write_text(json.dumps(
        {"student": {"multiple": 2.0, "lr": 6e-3, "scores": {"1": 0.1, "2": 0.2}},
         "teacher-a": {"multiple": 1.0, "lr": 1e-3, "scores": {"1": 0.3, "2": 0.2}}}))
    got = json.loads(baselines.lr_choice(str(tmp_path), 0, '{"teacher-b": 2, "student": 1}'))
    assert got == {"teacher-b": 2, "student": 2.0, "teacher-a": 1.0}
    assert json.loads(baselines.lr_choice(str(tmp_path / "none"), 0, "")) == {}


def test_compare_seeds_summary_by_hand(tmp_path):
    """Mean, sample sd and OPD's paired differences over seeds' tables, against a hand computation
    on made-up tables; a difference with the same sign in every seed and |mean| > sd is starred,
    one whose 95% paired t-interval excludes 0 gets two stars."""
    tables = [{"base": {"a": 0.0, "seconds": 0}, "teacher-a": {"a": 1.0, "seconds": 10},
               "student": {"a": 0.9, "seconds": 5}, "joint-x": {"a": 0.5, "seconds": 30}},
              {"base": {"a": 0.0, "seconds": 0}, "teacher-a": {"a": 1.0, "seconds": 12},
               "student": {"a": 0.7, "seconds": 7}, "joint-x": {"a": 0.8, "seconds": 20}},
              {"base": {"a": 0.0, "seconds": 0}, "teacher-a": {"a": 1.0, "seconds": 11},
               "student": {"a": 0.8, "seconds": 6}, "joint-x": {"a": 0.6, "seconds": 25}}]
    for s, t in enumerate(tables):
        os.makedirs(tmp_path / f"seed-{s}")
        (tmp_path / f"seed-{s}" / "eval.json").write_text(json.dumps(t))
    reports.compare_seeds(str(tmp_path), [0, 1, 2], ["a"])
    res = json.load(open(tmp_path / "seeds.json"))
    st = res["models"]["student"]
    assert st["a"]["mean"] == pytest.approx(0.8) and st["a"]["sd"] == pytest.approx(0.1)
    assert st["seconds"]["values"] == [15, 19, 17]  # a student's time includes its teachers'
    d = res["opd_minus"]["joint-x"]["a"]  # 0.4, -0.1, 0.2
    assert d["values"] == pytest.approx([0.4, -0.1, 0.2]) and d["mean"] == pytest.approx(0.5 / 3)
    assert d["sd"] == pytest.approx(((0.4 - 0.5 / 3) ** 2 + (-0.1 - 0.5 / 3) ** 2
                                     + (0.2 - 0.5 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert d["ci95"] == pytest.approx(4.302653 * d["sd"] / 3 ** 0.5)  # t_{0.975, 2}, from tables
    md = open(tmp_path / "seeds.md").read()
    assert "| joint-x | 0.167 ± 0.252 |" in md  # signs differ: no star
    # -0.1, -0.3, -0.2 below the teacher in every seed and |mean| 0.2 > sd 0.1, but inside the
    # 95% interval's half-width 4.303 x 0.1 / sqrt(3) = 0.248: one star
    assert "| teacher-a | -0.200 ± 0.100 * |" in md
    assert "| base | 0.800 ± 0.100 ** |" in md  # 0.8 > 0.248: the interval excludes 0
    assert "| base | 0.000 ± 0.000 | 0.000 ± 0.000 | - |" in md  # no training time
    assert "| student | 0.800 ± 0.100 | 0.800 ± 0.100 | 17 ± 2 s |" in md  # 15, 19, 17 s


def test_noise_seeds_summary_by_hand(tmp_path):
    """Rounds to 50 / 75 / 90% and the final gain over seeds, and each SDE run minus the ODE run
    paired by seed (rounds to 90% over the seeds where both reached it), on made-up curves."""
    ode = [(10, 0.08), (12, 0.09), (14, 0.07)]  # (rounds to 90%, final gain) per seed
    sde = [(12, 0.07), (None, -0.01), (18, 0.06)]
    for s in range(3):
        lv = lambda r, g: {"mean_gain": [0.0, g], "rounds_to": {"0.5": 2, "0.75": 4, "0.9": r}}
        os.makedirs(tmp_path / f"seed-{s}")
        (tmp_path / f"seed-{s}" / "noise.json").write_text(json.dumps(
            {"levels": {"a0.0": lv(*ode[s]), "a0.7": lv(*sde[s])}}))
    reports.noise_seeds(str(tmp_path), [0, 1, 2])
    res = json.load(open(tmp_path / "seeds.json"))["runs"]
    assert res["a0.7"]["rounds_to"]["0.9"]["values"] == [12, 18]  # seed 1 never reached it
    d = res["a0.7"]["minus_a0.0"]
    assert d["rounds_to_0.9"]["values"] == [2, 4]  # seeds 0 and 2 only
    assert (d["rounds_to_0.9"]["mean"] == pytest.approx(3)
            and d["rounds_to_0.9"]["sd"] == pytest.approx(2 ** 0.5))
    assert d["rounds_to_0.9"]["ci95"] == pytest.approx(12.706205)  # t_{0.975, 1} x sd / sqrt(2),
                                                                   # sd = sqrt(2)
    assert d["final_mean_gain"]["values"] == pytest.approx([-0.01, -0.1, -0.01])
    assert "minus_a0.0" not in res["a0.0"]
    md = open(tmp_path / "seeds.md").read()
    # rounds +2, +4: the same sign and 3 > 1.41 (*), inside 12.7 x 1.41 / sqrt(2) = 12.7 (not **);
    # gains -0.01, -0.10, -0.01: |mean| 0.04 < sd 0.052, no mark
    assert "| a0.7 | +0.040 ± 0.044 | 2.0 ± 0.0 (n 3) | 4.0 ± 0.0 (n 3) | 15.0 ± 4.2 (n 2) | " \
           "3.0 ± 1.4 * (n 2) | -0.040 ± 0.052 |" in md


def _linear(w):
    """A toy velocity v(x, t) = w x + t (t a float or (B,)), the same for every call."""
    return lambda x, t: (w * x + torch.as_tensor(t, dtype=torch.float32)
                         .reshape(-1, *[1] * (x.dim() - 1)))


def test_sft_is_flow_matching_on_the_teachers_samples():
    """--loss sft: the teacher's ODE sample x0, then per trained step t ~ U(0, 1) and eps ~ N(0, I)
    from the generator, loss mean (v_S(x_t) - (eps - x0))^2; the logged loss and the student's
    gradient against the same written out by hand."""
    sigmas = opd.sd3_sigmas(4)
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    w = torch.tensor(0.5, requires_grad=True)
    teacher, student = _linear(torch.tensor(-0.8)), _linear(w)
    x0, logged = baselines.sft_trajectory(student, teacher, x, opd.Sampler(sigmas, 0.0, [0, 1]),
                                          torch.Generator().manual_seed(5))
    ref = x.clone()  # the teacher's Euler ODE by hand
    for j in range(4):
        ref = ref + (-0.8 * ref + sigmas[j]) * (sigmas[j + 1] - sigmas[j])
    assert torch.allclose(x0, ref, atol=1e-6)
    g, w2, expect = torch.Generator().manual_seed(5), torch.tensor(0.5, requires_grad=True), 0
    for _ in range(2):
        t, eps = torch.rand(3, generator=g), torch.randn(ref.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * ref + tt * eps
        expect = expect + ((w2 * x_t + tt) - (eps - ref)).pow(2).mean() / 2
    expect.backward()
    assert logged == pytest.approx(float(expect), abs=1e-6)
    assert w.grad.abs() > 0 and torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_offpolicy_is_the_closed_form_on_the_teachers_states():
    sigmas = opd.sd3_sigmas(3)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    w, w2 = (torch.tensor(0.3, requires_grad=True) for _ in range(2))
    teacher, student = _linear(torch.tensor(-0.8)), _linear(w)
    _, logged = baselines.offpolicy_trajectory(student, teacher, x,
                                               opd.Sampler(sigmas, 0.0, [0, 1]))
    traj = opd.rollout(teacher, x, sigmas, 0.0)
    expect = 0
    for j in (0, 1):  # on the teacher's states: 1/2 mean (mu_S - mu_T)^2, mean over the 2 steps
        xj, dt = traj["states"][:, j], sigmas[j + 1] - sigmas[j]
        mu_s = xj + (w2 * xj + sigmas[j]) * dt
        mu_t = xj + teacher(xj, sigmas[j]) * dt
        expect = expect + 0.5 * (mu_s - mu_t).pow(2).mean() / 2
    expect.backward()
    assert logged == pytest.approx(float(expect), abs=1e-7)
    assert torch.allclose(w.grad, w2.grad, atol=1e-7) and w.grad.abs() > 0


def test_dance_query_is_beta_5_2_over_the_states():
    """DanceOPD's query index int(u n), u ~ Beta(5, 2): the empirical distribution of 40,000
    draws against Beta(5, 2)'s cdf F(x) = 6 x^5 - 5 x^6 at every state boundary, and against
    40,000 indices from torch.distributions.Beta's own sampler (each within 0.01; the standard
    error of a frequency is below 0.0025)."""
    n = 10
    q = baselines.dance_query(n, 40_000, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = (torch.distributions.Beta(5.0, 2.0).sample((40_000,)) * n).long()
    for k in range(1, n):
        x = k / n
        assert abs((q < k).float().mean() - (6 * x**5 - 5 * x**6)) < 0.01, k
        assert abs((q < k).float().mean() - (ref < k).float().mean()) < 0.01, k
    assert q.min() >= 0 and q.max() == n - 1


def test_dance_loss_at_each_samples_query_state_against_the_routed_teacher():
    sigmas = opd.sd3_sigmas(5)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    w, w2 = (torch.tensor(0.3, requires_grad=True) for _ in range(2))
    teacher, student = _linear(torch.tensor(-0.8)), _linear(w)
    _, logged = baselines.dance_trajectory(student, teacher, x, opd.Sampler(sigmas, 0.0, [0]),
                                           torch.Generator().manual_seed(3))
    q = baselines.dance_query(5, 4, torch.Generator().manual_seed(3))
    states = opd.rollout(_linear(torch.tensor(0.3)), x, sigmas, 0.0)["states"]
    x_q, t_q = states[torch.arange(4), q], sigmas[q].view(-1, 1, 1, 1)
    expect = ((w2 * x_q + t_q) - (-0.8 * x_q + t_q)).pow(2).mean()
    expect.backward()
    assert logged == pytest.approx(float(expect), abs=1e-6)
    assert torch.allclose(w.grad, w2.grad, atol=1e-6) and w.grad.abs() > 0


def test_flow_advantages_are_per_step_over_the_whole_batch():
    r = torch.tensor([[1.0, 10.0], [2.0, 30.0], [4.0, 20.0]])
    def col(c):  # mean and unbiased std of one step's three rewards, by hand
        mean = sum(c) / 3
        std = (sum((x - mean) ** 2 for x in c) / 2) ** 0.5
        return [(x - mean) / (std + 1e-4) for x in c]
    want = torch.stack([torch.tensor(col(r[:, 0].tolist())),
                        torch.tensor(col(r[:, 1].tolist()))], 1)
    assert torch.allclose(baselines.stepwise_advantages(r, 1), want, atol=1e-6)


FLOW_PROMPTS = ["a red cat", "a blue dog", "a green car", "a bright dog on the left"]


def _flow_grads(m, cfg):
    for p in m.trainable:
        p.grad = None
    task = prompts.Task("color", FLOW_PROMPTS, [], None)
    losses = baselines.flow_round(cfg, m, [task], 0, ONE, {"color": 4.5})
    return torch.cat([p.grad.flatten() for p in m.trainable]), losses["color"]


def _flow_by_hand(m, cfg):
    """The same rollouts (micro-batch by micro-batch from the same generator), the teacher's
    log-density of each step taken, advantages per step over all 4, then the on-policy clipped-PPO
    gradient: -mean_{b, j} A_bj grad log p_S(x_{j+1} | x_j)."""
    mine = prompts.draw_prompts(cfg, prompts.Task("color", FLOW_PROMPTS, [], None), 0, 0, 4)
    g, sig, a = machinery.rng(cfg.seed, "rollout", 0, 0, step=0), opd.sd3_sigmas(3), 0.7
    parts = [(s, opd.rollout(m.velocity("student", mine[s], 4.5), m.noise(len(mine[s]), g), sig,
                             a, g))
             for s in machinery.chunks(4, cfg.micro_batch)]
    r = []
    for s, traj in parts:
        teacher, xs = m.velocity("teacher-color", mine[s], 4.5), traj["states"]
        with torch.no_grad():
            r.append(torch.stack([opd.gaussian_logp(xs[:, j + 1],
                                                    opd.transition(xs[:, j],
                                                                   teacher(xs[:, j], sig[j]),
                                                                   sig[j], sig[j + 1], a)[0],
                                                    traj["stds"][:, j])
                                  for j in (0, 1)], 1))
    r = torch.cat(r)
    adv = (r - r.mean(0)) / (r.std(0) + 1e-4)
    for p in m.trainable:
        p.grad = None
    for s, traj in parts:
        student, xs = m.velocity("student", mine[s], 4.5), traj["states"]
        for j in (0, 1):
            mu = opd.transition(xs[:, j], student(xs[:, j], sig[j]), sig[j], sig[j + 1], a)[0]
            (-(adv[s, j] * opd.gaussian_logp(xs[:, j + 1], mu, traj["stds"][:, j])).sum()
             / 8).backward()
    return torch.cat([p.grad.flatten() for p in m.trainable])


def test_flow_round_normalises_over_the_round_not_the_micro_batch(tiny_sd3):
    """FlowOPD's gradient against a hand computation, with the round's 4 trajectories in one
    forward and in micro-batches of 2: the advantages are over all 4 either way (per micro-batch
    they would differ; with micro-batches of 1 they would all be 0)."""
    m, _ = tiny_sd3
    cfg = config.resolve(config.parse_config(["--stage", "distill", "--loss", "flow",
                                              "--noise_level", "0.7", "--sampler_steps", "3",
                                              "--batch_size", "4"], baselines.Args), "distill")
    sd3.add_lora(m.tr, "teacher-color", cfg)
    randomise(m.tr, "teacher-color", 1)
    m.trainable = sd3.add_lora(m.tr, "student", cfg)
    randomise(m.tr, "student", 2)
    m.active = "student"
    try:
        out = []
        for micro in (0, 2):
            c = dataclasses.replace(cfg, micro_batch=micro)
            out.append((*_flow_grads(m, c), _flow_by_hand(m, c)))
    finally:
        sd3.drop_adapters(m)
    for grad, loss, hand in out:
        assert grad.abs().sum() > 0 and abs(loss) < 1e-5  # on-policy: the loss is -mean A = 0
        assert torch.allclose(grad, hand, rtol=1e-4, atol=1e-7)


def _predictions(loss_fn, seed, B=3, D=12):
    """x0_hat (with its gradient from loss_fn's sum), x0_teacher, x0_fake, loss_fn's value and the
    per-sample normaliser mean|x0_hat - x0_teacher|, on random float64 tensors."""
    g_ = torch.Generator().manual_seed(seed)
    x0_hat, x0_t, x0_f = (torch.randn(B, D, generator=g_, dtype=torch.float64) for _ in range(3))
    x0_hat.requires_grad_(True)
    loss = loss_fn(x0_hat, x0_t, x0_f)
    loss.sum().backward()
    return x0_hat, x0_t, x0_f, loss, (x0_hat.detach() - x0_t).abs().mean(1, keepdim=True)


def test_dmd_loss_gradient_is_the_normalised_fake_minus_teacher_direction():
    """d/dx0_hat of dmd_loss = g / D with g = (x0_fake - x0_teacher) / mean|x0_hat - x0_teacher|
    per sample (DMD2's normaliser), and the loss value 1/2 mean g^2, by hand on small tensors."""
    x0_hat, x0_t, x0_f, loss, w = _predictions(baselines.dmd_loss, 0)
    D = x0_hat.shape[1]
    g = (x0_f - x0_t) / w
    assert (torch.allclose(x0_hat.grad, g / D)
            and torch.allclose(loss.detach(), 0.5 * g.pow(2).mean(1)))


def test_tdm_loss_and_fake_loss_by_hand():
    x0_hat, x0_t, x0_f, loss, w = _predictions(baselines.tdm_loss, 1)
    (B, D), g_ = x0_hat.shape, torch.Generator().manual_seed(1)
    # target = x0_hat + (x0_t - x0_f): loss = mean (x0_t - x0_f)^2 / w, gradient
    # -2 (x0_t - x0_f) / (D w)
    assert torch.allclose(loss.detach(), (x0_t - x0_f).pow(2).mean(1) / w[:, 0])
    assert torch.allclose(x0_hat.grad, -2 * (x0_t - x0_f) / (D * w))
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    eps_mix, z = (torch.randn(B, D, generator=g_, dtype=torch.float64) for _ in range(2))
    snr = ((1 - t) / t) ** 2  # 0.0123, 1, 81 -> min(., 5)
    want = (x0_f - x0_hat.detach()).pow(2).mean(1) \
        * torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) \
        * torch.exp(-0.5 * eps_mix.pow(2).mean(1)) / torch.exp(-0.5 * z.pow(2).mean(1))
    assert torch.allclose(baselines.tdm_fake_loss(x0_f, x0_hat.detach(), t, eps_mix, z), want)


def test_tdm_renoise_stays_in_the_stage_and_on_the_forward_marginal():
    """t' in [max(s, 0.02), t_k]; x' = (1 - t') x0_hat + t' eps_mix exactly; with eps_hat ~
    N(0, I) eps_mix is N(0, I) (Monte Carlo, mean and variance within 5 standard errors), i.e. x'
    is the forward process's sample at t' around x0_hat."""
    g = torch.Generator().manual_seed(2)
    n, D = 4000, 64
    sig = opd.sd3_sigmas(10)
    k = torch.randint(9, (n,), generator=g)
    x0_hat, eps_hat = torch.randn(n, D, generator=g) * 0.5, torch.randn(n, D, generator=g)
    x, t, eps_mix, z = baselines.tdm_renoise(x0_hat, eps_hat, sig[k], sig[k + 1], g)
    assert (t >= sig[k + 1].clamp(min=0.02) - 1e-7).all() and (t <= sig[k] + 1e-7).all()
    assert torch.allclose(x, (1 - t[:, None]) * x0_hat + t[:, None] * eps_mix, atol=1e-5)
    e = eps_mix.flatten()
    assert abs(e.mean()) < 5 / len(e) ** 0.5 and abs(e.var() - 1) < 5 * (2 / len(e)) ** 0.5
    assert z.shape == x.shape


@pytest.mark.parametrize("loss", ["dmd", "tdm"])
def test_dmd_tdm_student_loss_reaches_only_the_student(tiny_sd3, monkeypatch, loss):
    """No gradient reaches the fake from the student's loss: its grads are None on entry to its
    update (DMD's student loss comes before) and after the round exactly what its own update left
    (TDM's comes after); the teacher's stay None; the student's are non-zero; the fake moved."""
    m, _ = tiny_sd3
    cfg = config.resolve(config.parse_config(["--stage", "distill", "--loss", loss,
                                              "--sampler_steps", "3", "--batch_size", "2"],
                                             baselines.Args), "distill")
    sd3.add_lora(m.tr, "teacher-color", cfg)
    randomise(m.tr, "teacher-color", 1)
    fake = sd3.add_lora(m.tr, "fake", cfg)
    student = m.trainable = sd3.add_lora(m.tr, "student", cfg)
    randomise(m.tr, "student", 2)
    m.active = "?"
    teacher = [p for n, p in m.tr.named_parameters() if ".teacher-color." in n]
    before, seen, left, inner = [p.detach().clone() for p in fake], [], [], baselines.update_fake

    def update_fake(*a, **k):  # what the fake's grads were on entry, and what its update left
        seen.append([p.grad for p in fake])
        inner(*a, **k)
        left.append([p.grad.clone() for p in fake])
    monkeypatch.setattr(baselines, "update_fake", update_fake)
    monkeypatch.setattr(baselines, "DMD_FAKE_UPDATES", 1)
    run_ = types.SimpleNamespace(rank=0, world=1, params=student, extra={
        "fake": runs.Adapter(fake, torch.optim.AdamW(fake, lr=1e-2), 10.0)})
    try:
        baselines.ROUNDS[loss](cfg, m, [prompts.Task("color", FLOW_PROMPTS, [], None)], 0, run_,
                               {"color": 4.5})
        after = [p.grad for p in fake]
        grads, teacher_grads = [p.grad for p in student], [p.grad for p in teacher]
        moved = max((p.detach() - q).abs().max().item() for p, q in zip(fake, before))
    finally:
        sd3.drop_adapters(m)
    assert len(seen) == 1 and all(g is None for g in seen[0])
    assert all(torch.equal(g, g_left) for g, g_left in zip(after, left[0], strict=True))
    assert all(g is None for g in teacher_grads)
    assert (all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
            and moved > 0)


@pytest.mark.slow
def test_dmd_and_tdm_run_from_the_command_line_and_their_loras_load(tmp_path, teacher_dir):
    """`baselines.py --stage distill --loss dmd|tdm`, tiny; diffusers' load_lora_weights loads the
    student. Every other student runs from the
    command line in the compare test, whose LoRAs it loads the same way."""
    pipe = tiny.tiny_pipeline()
    for loss in ("dmd", "tdm"):
        out = str(tmp_path / loss)
        ok(run("--stage", "distill", "--loss", loss, "--tasks", "color", "--teachers",
               f"color={teacher_dir}", "--optim_steps", "2", "--batch_size", "4",
               "--sampler_steps", "3", "--out", out, script="baselines.py"))
        pipe.load_lora_weights(os.path.join(out, f"student-{loss}"), adapter_name=loss)
    assert len(pipe.get_list_adapters()["transformer"]) == 2
