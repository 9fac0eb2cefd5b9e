"""When does OPD win: the conflicting toy tasks' rewards by hand, the gradient-conflict meter
against a hand computation, the plateau rule on made-up curves, the new tasks run tiny."""
import json
import os

import pytest
import torch

import rewards
from conftest import ok, run
from opd_support import conflict, evaluation, tiny


def test_conflicting_rewards_by_hand():
    """vivid = max - min of the mean colour, faded = 1 - that, exact = 1 within 0.15 of the
    named colour: on flat made images, and pixel noise does not move the first two."""
    im = torch.zeros(4, 3, 8, 8)
    im[0] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red
    im[1] = 0.5  # grey
    im[2] = torch.tensor([0.8, 0.3, 0.1]).view(3, 1, 1)
    im[3] = torch.tensor([0.9, 0.05, 0.1]).view(3, 1, 1)
    prompts = ["a vivid red cat"] * 4
    assert torch.allclose(rewards.vivid(im, prompts), torch.tensor([1.0, 0.0, 0.7, 0.85]))
    assert torch.allclose(rewards.faded(im, prompts), torch.tensor([0.0, 1.0, 0.3, 0.15]))
    # distances to red: 0, 0.866, sqrt(0.04 + 0.09 + 0.01) = 0.374, sqrt(0.01 + 0.0025 + 0.01)
    assert rewards.EXACT_TOL == 0.15
    assert torch.equal(rewards.exact(im, ["a red cat"] * 4), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    noisy = im + 0.05 * torch.randn(im.shape, generator=g)  # zero-mean noise: the mean stays
    assert torch.allclose(rewards.vivid(noisy, prompts), rewards.vivid(im, prompts), atol=0.03)
    assert rewards.load("vivid:1,faded:1")(im, prompts).eq(0.5).all()  # they oppose exactly


def test_toy_splits_share_no_prompt_and_wording_sets_the_gap():
    for name in ("color", "position", "jpeg", "vivid", "faded", "exact"):
        train, val, test = tiny.toy_prompts(name)
        assert train and val and test and not (set(train) & set(val) | set(train) & set(test)
                                               | set(val) & set(test)), name
    vivid, faded = tiny.toy_prompts("vivid")[0], tiny.toy_prompts("faded", "word")[0]
    apart = [sum(a != b for a, b in zip(v.split(), f.split())) for v, f in zip(vivid, faded)]
    assert apart == [1] * len(vivid)  # one word apart
    far = tiny.toy_prompts("faded", "template")[0]
    assert all(len(set(v.split()) ^ set(f.split())) > 4 for v, f in zip(vivid, far))


def test_meter_against_gradients_known_by_hand():
    """Two tasks whose halves' gradients are fixed vectors (loss = h . w): the cosines, the
    split-half cosines, Adam's preconditioned cosine from its state before the step, and the
    first-order change of each task's loss under the step taken, each against a direct
    computation."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, generator=g))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01)
    meter = conflict.Meter([w])
    h = {(t, k): torch.randn(6, generator=g, dtype=torch.float64) for t in "ab" for k in (0, 1)}
    for step in range(3):  # the third step's row, with Adam's state from the two before
        meter.start()
        for (t, k), v in h.items():
            ((v.float() * (step + 1)) @ w / 2).backward()  # each task's share: 1/M of its loss
            meter.mark(t, k)
        meter.before_step(opt)
        before = w.detach().double().clone()
        v = opt.state[w]["exp_avg_sq"].double() / (1 - 0.999 ** 2) if step == 2 else None
        opt.step()
        row = meter.row()
        opt.zero_grad(set_to_none=True)
    ga, gb = [(h[t, 0] + h[t, 1]) * 3 / 2 for t in "ab"]

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    p = 1 / (v.sqrt() + 1e-8)  # the state after two steps: the third step's own gradient not in
    assert row["cos_a_b"] == pytest.approx(cos(ga, gb), abs=1e-6)
    assert row["cos_adam_a_b"] == pytest.approx(cos(p * ga, p * gb), abs=1e-6)
    assert row["cos_half_a"] == pytest.approx(cos(h["a", 0], h["a", 1]), abs=1e-6)
    assert row["cos_adam_half_b"] == pytest.approx(cos(p * h["b", 0], p * h["b", 1]), abs=1e-6)
    step_taken = w.detach().double() - before
    assert row["dloss_b"] == pytest.approx(float(2 * gb @ step_taken), rel=1e-5)  # fp32 grads


def meter_rows(halves, steps, dim, seed=0):
    """The meter's rows over `steps` optimizer steps taken as runs.optimizer_step takes them
    (AdamW with the tiny default's settings, clip 1): halves(step, generator) ->
    {(task, half): gradient (dim,)}, each added by its own backward."""
    import types
    from opd_support import runs
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(dim, generator=g))
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=1e-4)
    run = types.SimpleNamespace(params=[w], opt=opt, world=1, rank=0, bad_steps=0,
                                conflict=conflict.Meter([w]))
    cfg = types.SimpleNamespace(grad_clip=1.0, max_bad_steps=5)
    rows = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)  # the loops' cycle: zero_grad, backward passes, step
        run.conflict.start()
        for (task, half), grad in halves(step, g).items():
            (grad @ w).backward()
            run.conflict.mark(task, half)
        runs.optimizer_step(cfg, run)
        rows.append(run.conflict_row)
    return rows


def mean_se(xs):
    xs = torch.tensor([x for x in xs if x is not None], dtype=torch.float64)
    return float(xs.mean()), float(xs.std() / len(xs) ** 0.5)


def test_meter_reads_known_answers():
    """Identical gradients +1, anti-parallel -1, orthogonal (disjoint weights) 0, raw and after
    Adam's preconditioning, at every step after the first; independent noise reads 0 within
    3 standard errors over 60 steps, raw and preconditioned (the preconditioner taken after the
    step read -0.05 here), and its split-half cosine 0."""
    dim = 400
    e = torch.zeros(2, dim)
    e[0, :200], e[1, 200:] = 1, 1
    cases = {"same": (e[0], e[0]), "opposite": (e[0], -e[0]), "orthogonal": (e[0], e[1])}
    for name, (ga, gb) in cases.items():
        rows = meter_rows(lambda s, g: {("a", 0): ga, ("a", 1): ga, ("b", 0): gb, ("b", 1): gb},
                          4, dim)
        want = {"same": 1.0, "opposite": -1.0, "orthogonal": 0.0}[name]
        assert all(r["cos_a_b"] == pytest.approx(want, abs=1e-6) for r in rows), name
        assert "cos_adam_a_b" not in rows[0]  # no state before the first step
        assert all(r["cos_adam_a_b"] == pytest.approx(want, abs=1e-6) for r in rows[1:]), name
    rows = meter_rows(lambda s, g: {(t, h): torch.randn(dim, generator=g) for t in "ab"
                                    for h in (0, 1)}, 60, dim)
    for key in ("cos_a_b", "cos_adam_a_b", "cos_half_a", "cos_adam_half_b"):
        mean, se = mean_se(r.get(key) for r in rows)
        assert abs(mean) < 3 * se + 1e-9, (key, mean, se)


def test_noise_correction_recovers_a_known_cosine():
    """Each task's halves are its signal / 2 plus independent noise 3x the signal's norm per
    half (split-half cosine about 0.03, like joint RL's): the raw cross-task cosine is about
    0.06 x the signals' cosine of -0.4; corrected() from the run's mean cosines gives -0.4
    back within 0.1, and a zero signal leaves it undefined."""
    dim, g0 = 4000, torch.Generator().manual_seed(1)
    a = torch.randn(dim, generator=g0)
    ortho = torch.randn(dim, generator=g0)
    ortho -= (ortho @ a) / (a @ a) * a
    b = -0.4 * a / a.norm() + (1 - 0.4**2) ** 0.5 * ortho / ortho.norm()
    a, b = a / a.norm(), b  # unit signals with cos(a, b) = -0.4
    noise = 3.0 / dim ** 0.5

    def halves(step, g):
        return {(t, h): s / 2 + noise * torch.randn(dim, generator=g)
                for t, s in (("a", a), ("b", b)) for h in (0, 1)}
    rows = meter_rows(halves, 200, dim)
    raw, half_a, half_b = (mean_se(r[k] for r in rows)[0]
                           for k in ("cos_a_b", "cos_half_a", "cos_half_b"))
    assert -0.06 < raw < 0, raw  # attenuated about 15-fold
    assert conflict.corrected(raw, half_a, half_b) == pytest.approx(-0.4, abs=0.1)
    assert conflict.corrected(raw, half_a, -0.01) is None
    assert conflict.reliability(1.0) == 1 and conflict.reliability(1 / 3) == pytest.approx(0.5)


def test_plateau_rule_on_made_up_curves():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    flat = [0.1, 0.3, 0.5, 0.501, 0.499, 0.502]
    noisy_peak = [0.1, 0.5, 0.3, 0.4, 0.45, 0.49]
    assert not evaluation.plateaued(rising, 3, 0.005)
    assert evaluation.plateaued(flat, 3, 0.005)  # best of the last 3 beats 0.5 by 0.002
    assert evaluation.plateaued(noisy_peak, 3, 0.005)  # nothing beat the early best
    assert not evaluation.plateaued(flat[:3], 3, 0.005)  # too few evaluations to judge


@pytest.mark.slow
def test_conflict_tasks_run_and_joint_rl_logs_cosines_and_the_floor(tmp_path):
    """The three new tasks from the command line, `baselines.py --stage joint --model
    tiny-conflict --tasks vivid,faded,exact --log_conflict`, tiny: every
    training row of metrics.jsonl has each pair's raw and preconditioned cosine, each task's
    split-half cosine and first-order loss change; validation rows by --eval_every."""
    out = str(tmp_path / "o")
    ok(run("--stage", "joint", "--model", "tiny-conflict", "--tasks", "vivid,faded,exact",
           "--log_conflict",
           "--optim_steps", "2", "--batch_size", "8", "--group_size", "4", "--sampler_steps", "3",
           "--eval_every", "2", "--eval_sampler_steps", "3", "--eval_prompts", "1",
           "--eval_seeds", "1", "--out", out, script="baselines.py"))
    rows = [json.loads(line) for line in open(os.path.join(out, "joint-grpo_guard",
                                                            "metrics.jsonl"))]
    train = [r for r in rows if "grad_norm" in r]
    pairs = ["vivid_faded", "vivid_exact", "faded_exact"]
    assert len(train) == 2 and all(f"cos_{p}" in r for r in train for p in pairs)
    assert all(f"cos_adam_{p}" in train[1] for p in pairs)  # Adam's state exists after a step
    assert all(f"cos_half_{t}" in r and f"dloss_{t}" in r for r in train
               for t in ("vivid", "faded")) and train[0]["lr"] > 0
    assert [r["step"] for r in rows if "val" in r] == [0, 2]
    assert set(rows[0]["val"]) == {"vivid", "faded", "exact"}


def test_nft_update_marks_both_halves_of_each_task(tiny_sd3):
    """DiffusionNFT's update in two micro-batches: the meter gets each task's first and second
    half, so joint NFT logs its split-half cosine (an inner loop's variable once overwrote the
    micro-batch's index: every micro-batch was marked as the second half)."""
    import opd
    from opd_support import config, prompts, runs, sd3
    m, _ = tiny_sd3
    cfg = config.resolve(config.parse_config(
        ["--stage", "teacher", "--algo", "nft", "--sampler_steps", "3", "--batch_size", "4",
         "--group_size", "2", "--micro_batch", "2", "--optim_steps", "1"]), "teacher")
    task = prompts.make_task("color", cfg)
    try:
        sd3.add_lora(m.tr, "old", cfg)
        params = m.trainable = sd3.add_lora(m.tr, "policy", cfg)
        m.active = "?"
        run = runs.single_process()
        run.conflict = conflict.Meter(params)
        samples, _ = opd.rl_sample(cfg, m, [task], 0, run)
        run.conflict.start()
        opd.nft_update(cfg, m, samples, torch.arange(4), 0, run)
        run.conflict.before_step(torch.optim.AdamW(params))
        row = run.conflict.row()
    finally:
        sd3.drop_adapters(m)
    assert row["cos_half_color"] is not None and -1 <= row["cos_half_color"] <= 1
